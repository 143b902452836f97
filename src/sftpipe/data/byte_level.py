"""Exact and faster encoding for GPT-2-style byte-level BPE tokenizers (SmolLM2, GPT-2, ...).

The Rust tokenizer spends most of its time per token (regex, byte mapping, cache lookup, a
string and offsets per token) even when every word is a cache hit, and on Chinese it runs BPE
over whole sentences (a run of ideographs is one pre-token) that never repeat. Chat data
repeats a few thousand English words and a few thousand Chinese characters endlessly, so
`ByteLevelEncoder` does what the tokenizer does with the regex in Python and a dictionary from
each pre-token (or piece of one) to its tokens, filled by the tokenizer itself:

1. the text is split at the tokenizer's added tokens (longest match first, as the tokenizer
   does), and each piece between them is encoded alone, as the tokenizer does;
2. a piece made of ASCII, CJK ideographs and common full-width punctuation is split with the
   GPT-2 pre-tokenizer regex written for exactly those characters (their Unicode categories
   are the same in every Unicode version), and each pre-token is looked up;
3. a Chinese pre-token is cut between characters wherever no token of the vocabulary holds the
   last byte of one character followed by the first byte of the next: no BPE merge can cross
   there, so each piece encodes on its own (`_cjk_chunker`);
4. any other piece goes to the Rust tokenizer, in one batch.

It serves only tokenizers whose pipeline is exactly that (`for_tokenizer` returns None for any
other: a normalizer, another pre-tokenizer, prefix spaces, truncation, ...), and returns
encodings with the same ids and character offsets, so labels come out the same way
(`chat_templates.token_ranges`). Tests compare it with the Rust tokenizer on every ASCII
character, on Chinese, on added tokens and on real chat data, and the tokenize stage checks it
against the Rust tokenizer on the first conversation of every batch.
"""

from __future__ import annotations

import itertools
import json
import operator
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable
from typing import Any

_SPACE = r"\t\n\x0b\x0c\r "
# Beyond ASCII, characters whose Unicode category is the same in every Unicode version the
# tokenizer's regex engine may know, and that Chinese text is mostly made of: the CJK unified
# ideographs assigned since Unicode 11 (letters) and common full-width punctuation (neither
# letters, numbers nor spaces).
_CJK = "\u4e00-\u9fef"
_CJK_PUNCTUATION = (
    "\u2018\u2019\u201c\u201d\u3001\u3002\u300a\u300b\uff01\uff08\uff09\uff0c\uff1a\uff1b\uff1f"
)
_KNOWN = re.compile(rf"[\x00-\x7f{_CJK}{_CJK_PUNCTUATION}]*").fullmatch
_CJK_WORD = re.compile(rf" ?[{_CJK}]+").fullmatch
# The GPT-2 pre-tokenizer regex, 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|
# \s+(?!\S)|\s+, for text of those characters.
_SPLIT = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z{_CJK}]+| ?[0-9]+| ?[^{_SPACE}A-Za-z0-9{_CJK}]+"
    rf"|[{_SPACE}]+(?![^{_SPACE}])|[{_SPACE}]+"
)
_IDS = operator.attrgetter("ids")
_WALK = 8  # pieces walked from a segment's start before working the whole segment out
# Pre-tokens kept, ~300 bytes each (English chat data has far fewer distinct words; Chinese is
# cached by character).
_CACHE_LIMIT = 1 << 18


def _byte_level() -> dict[int, str]:
    """GPT-2's byte -> character map: printable bytes stand for themselves, the others
    (controls, space, ...) for 256 + their rank among those."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + r) for r, b in enumerate(others)}


_TO_BYTE_LEVEL = str.maketrans({b: c for b, c in _byte_level().items() if b < 128})
_BYTE_OF = {c: b for b, c in _byte_level().items()}
# What the ByteLevel post-processor trims off a token's ends: the byte-level space, and what
# Rust's `char::is_whitespace` calls whitespace (Unicode White_Space; not \x1c-\x1f, which
# Python's isspace includes), found only in added tokens (byte-level tokens have none).
_TRIMMED = "Ġ\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
_TRIMMED += "\u2028\u2029\u202f\u205f\u3000"


class _Word:
    """A pre-token's (or an added token's) ids and each token's [start, end) offsets relative
    to the pre-token's start."""

    __slots__ = ("ends", "ids", "starts")

    def __init__(self, ids: tuple[int, ...], starts: tuple[int, ...], ends: tuple[int, ...]):
        self.ids, self.starts, self.ends = ids, starts, ends

    def token_to_chars(self, token: int) -> tuple[int, int]:
        return self.starts[token], self.ends[token]

    def char_to_token(self, char: int) -> int | None:
        for token, (start, end) in enumerate(zip(self.starts, self.ends, strict=True)):
            if start <= char < end:
                return token
        return None


class _Segment:
    """A piece the Rust tokenizer encoded (offsets relative to the piece's start)."""

    __slots__ = ("encoding", "ids")

    def __init__(self, encoding: Any) -> None:
        self.encoding, self.ids = encoding, encoding.ids

    def token_to_chars(self, token: int) -> tuple[int, int]:
        return self.encoding.token_to_chars(token)

    def char_to_token(self, char: int) -> int | None:
        return self.encoding.char_to_token(char)


class Encoding:
    """Pieces that tile a text (pre-tokens, added tokens, Rust-encoded runs), as one encoding:
    what `chat_templates.token_ranges` and the stage read of a `tokenizers.Encoding` (ids,
    `char_to_token`, `token_to_chars` in characters).

    The pieces come in segments (the runs between added tokens, and the added tokens), whose
    starts in characters and tokens are known; where the pieces of a segment start is worked
    out only for the segments that labels ask about."""

    __slots__ = ("_char_starts", "_inner", "_parts", "_pieces", "_segments", "_token_starts", "ids")

    def __init__(
        self,
        pieces: list[Any],
        parts: list[str],
        segments: list[int],
        char_starts: list[int],
    ) -> None:
        """`parts[i]` is the text of `pieces[i]`; segment k holds pieces `segments[k]` up to
        `segments[k + 1]` and starts at character `char_starts[k]` (both lists end with the
        end of the text)."""
        self._pieces, self._parts = pieces, parts
        self._segments, self._char_starts = segments, char_starts
        # The ids segment by segment, noting where each segment's tokens start.
        ids: list[int] = []
        token_starts = []
        for first, stop in itertools.pairwise(segments):
            token_starts.append(len(ids))
            ids += itertools.chain.from_iterable(map(_IDS, pieces[first:stop]))
        token_starts.append(len(ids))
        self.ids, self._token_starts = ids, token_starts
        self._inner: dict[int, tuple[list[int], list[int]]] = {}

    def _piece(self, segment: int, char: int = -1, token: int = -1) -> tuple[int, int, int]:
        """The piece of `segment` that holds character `char`, or token `token`: its index, and
        its first character and token. Labels ask about the first few pieces of a segment (a
        reply starts after its role header), so those are walked; further in, the whole
        segment is worked out once."""
        first, stop = self._segments[segment], self._segments[segment + 1]
        at_char, at_token = self._char_starts[segment], self._token_starts[segment]
        for index in range(first, min(stop, first + _WALK)):
            length, count = len(self._parts[index]), len(self._pieces[index].ids)
            if char < at_char + length if char >= 0 else token < at_token + count:
                return index, at_char, at_token
            at_char, at_token = at_char + length, at_token + count
        if segment not in self._inner:
            lengths = map(len, self._parts[first:stop])
            counts = map(len, map(_IDS, self._pieces[first:stop]))
            self._inner[segment] = (
                list(itertools.accumulate(lengths, initial=self._char_starts[segment])),
                list(itertools.accumulate(counts, initial=self._token_starts[segment])),
            )
        char_starts, token_starts = self._inner[segment]
        if char >= 0:
            at = bisect_right(char_starts, char) - 1
        else:
            at = bisect_right(token_starts, token) - 1
        return first + at, char_starts[at], token_starts[at]

    def token_to_chars(self, token: int) -> tuple[int, int]:
        segment = bisect_right(self._token_starts, token) - 1
        index, at_char, at_token = self._piece(segment, token=token)
        start, end = self._pieces[index].token_to_chars(token - at_token)
        return at_char + start, at_char + end

    def char_to_token(self, char: int) -> int | None:
        """The first token whose offsets contain `char`: one of its piece's (a token's offsets
        lie within its piece)."""
        segment = bisect_right(self._char_starts, char) - 1
        if not 0 <= segment < len(self._segments) - 1:
            return None
        index, at_char, at_token = self._piece(segment, char=char)
        token = self._pieces[index].char_to_token(char - at_char)
        return None if token is None else at_token + token


def _pre_tokenizer_is_gpt2(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return False
    if spec.get("type") == "Sequence" and len(spec.get("pretokenizers", [])) == 1:
        spec = spec["pretokenizers"][0]
    return (
        spec.get("type") == "ByteLevel"
        and spec.get("use_regex", True)
        and not spec.get("add_prefix_space", True)
    )


def _trims_offsets(spec: dict[str, Any] | None) -> bool | None:
    """Whether the post-processor trims spaces off offsets; None for one this module does not
    reproduce (a ByteLevel one that adds prefix spaces, or an unknown kind)."""
    if spec is None or spec.get("type") == "TemplateProcessing":  # no special tokens added here
        return False
    if spec.get("type") == "Sequence":
        trims = [_trims_offsets(s) for s in spec.get("processors", [])]
        return None if None in trims else any(trims)
    if spec.get("type") == "ByteLevel":
        if not spec.get("trim_offsets", True):
            return False
        return None if spec.get("add_prefix_space", True) else True
    return None


class _Cache(dict):
    """Pre-token -> `_Word`, filled on a miss (up to `_CACHE_LIMIT` entries)."""

    def __init__(self, encode: Callable[[str], _Word]) -> None:
        super().__init__()
        self.encode = encode

    def __missing__(self, word: str) -> _Word:
        encoded = self.encode(word)
        if len(self) < _CACHE_LIMIT:
            self[word] = encoded
        return encoded


def _cjk_chunker(vocab: Iterable[str]) -> Callable[[str], list[str]]:
    """Splits a CJK word (an optional space, then ideographs) into the pieces that BPE encodes
    on their own: between any two characters, except where a token of the vocabulary holds the
    last byte of the first followed by the first byte of the second (only there can a merge
    cross). Chinese words are new strings every time; their characters are not."""
    pairs: set[tuple[int, int]] = set()
    for token in vocab:
        if all(c in _BYTE_OF for c in token):  # a byte-level token, not an added one
            raw = bytes(_BYTE_OF[c] for c in token)
            pairs.update(itertools.pairwise(raw))
    ideographs = range(0x4E00, 0x9FF0)
    joins: dict[int, set[int]] = {}  # last byte of a first character -> first bytes that join
    for last, first in pairs:
        if 0xE4 <= first <= 0xE9 and (last == 0x20 or 0x80 <= last <= 0xBF):
            joins.setdefault(last, set()).add(first)
    alternatives = []
    for last, firsts in sorted(joins.items()):
        ends = (
            " " if last == 0x20 else "".join(chr(c) for c in ideographs if c & 0x3F == last & 0x3F)
        )
        starts = "".join(
            f"{chr(max(ideographs.start, (f & 0x0F) << 12))}-"
            f"{chr(min(ideographs.stop - 1, ((f & 0x0F) << 12) + 0xFFF))}"
            for f in sorted(firsts)
        )
        alternatives.append(f"[{ends}](?=[{starts}])")
    # A piece: characters that each join the next, then one more.
    return re.compile("(?:" + "|".join(alternatives) + ")*." if alternatives else ".").findall


class ByteLevelEncoder:
    """`encode_batch(texts)` with the ids and offsets of `tokenizer.backend_tokenizer.
    encode_batch(texts, add_special_tokens=False)`; build it with `for_tokenizer`."""

    def __init__(
        self, backend: Any, added: dict[str, int], trim_offsets: bool, vocab: Iterable[str]
    ) -> None:
        self.backend = backend
        self.trim_offsets = trim_offsets
        self.cjk_chunks = _cjk_chunker(vocab)
        # Longest first: at one position the tokenizer takes the longest added token.
        names = sorted(added, key=len, reverse=True)
        self.split_added = re.compile("(" + "|".join(map(re.escape, names)) + ")").split
        self.added = {name: self._added_word(name, i) for name, i in added.items()}
        self.cache = _Cache(self._word)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> ByteLevelEncoder | None:
        """The encoder for a transformers fast tokenizer, or None when its pipeline is not
        exactly the one this module reproduces."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return None
        spec = json.loads(backend.to_str())
        model = spec.get("model", {})
        trims = _trims_offsets(spec.get("post_processor"))
        if (
            spec.get("normalizer") is not None
            or not _pre_tokenizer_is_gpt2(spec.get("pre_tokenizer"))
            or model.get("type") != "BPE"
            or model.get("dropout") not in (None, 0.0)
            or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")
            or trims is None
        ):
            return None
        added = spec.get("added_tokens", [])
        if any(t["lstrip"] or t["rstrip"] or t["single_word"] for t in added) or not added:
            return None
        if len({t["normalized"] for t in added}) > 1:
            return None  # Rust splits at the non-normalized ones first, wherever the others are
        return cls(backend, {t["content"]: t["id"] for t in added}, trims, model["vocab"])

    def _added_word(self, content: str, token_id: int) -> _Word:
        starts, ends = (0,), (len(content),)
        if self.trim_offsets:  # Rust trims the whitespace at an added token's ends too
            starts, ends = _trim([content], starts, ends)
        return _Word((token_id,), starts, ends)

    def _word(self, word: str) -> _Word:
        if word.isascii():
            byte_level = word.translate(_TO_BYTE_LEVEL)
            tokens = self.backend.model.tokenize(byte_level)
            values = [t.value for t in tokens]
            if "".join(values) == byte_level:  # one character a byte: offsets are lengths
                ends = tuple(itertools.accumulate(map(len, values)))
                starts = (0, *ends[:-1])
                if self.trim_offsets:
                    starts, ends = _trim(values, starts, ends)
                return _Word(tuple(t.id for t in tokens), starts, ends)
        # Not ASCII (offsets in characters, not bytes), or the vocabulary lacks some of its
        # bytes (SmolLM2 has no \x04, for one), which the model drops or makes unknown tokens,
        # and Rust's offsets then follow rules of their own: Rust encodes this pre-token alone.
        encoding = self.backend.encode(word, add_special_tokens=False)
        starts = tuple(start for start, _ in encoding.offsets)
        ends = tuple(end for _, end in encoding.offsets)
        return _Word(tuple(encoding.ids), starts, ends)

    def encode_batch(self, texts: list[str]) -> list[Encoding]:
        """One encoding per text."""
        lookup, added, split_words = self.cache.__getitem__, self.added, _SPLIT.findall
        plans: list[tuple[list[Any], list[str], list[int], list[int]]] = []
        rust: list[str] = []  # the pieces neither ASCII nor of the known CJK characters
        holes: list[tuple[list[Any], int]] = []  # where each of them goes
        for text in texts:
            pieces: list[Any] = []
            parts: list[str] = []
            segments: list[int] = []  # each segment's first piece
            char_starts: list[int] = []  # and first character
            position = 0
            for index, part in enumerate(self.split_added(text)):
                if not part:
                    continue
                segments.append(len(pieces))
                char_starts.append(position)
                position += len(part)
                if index % 2:  # an added token
                    pieces.append(added[part])
                elif part.isascii():  # the common case: no test per word
                    words = split_words(part)
                    pieces += map(lookup, words)
                    parts += words
                    continue
                elif _KNOWN(part):
                    for word in split_words(part):
                        if _CJK_WORD(word):
                            chunks = self.cjk_chunks(word)
                            pieces += map(lookup, chunks)
                            parts += chunks
                        else:
                            pieces.append(lookup(word))
                            parts.append(word)
                    continue
                else:
                    holes.append((pieces, len(pieces)))
                    pieces.append(None)
                    rust.append(part)
                parts.append(part)
            segments.append(len(pieces))
            char_starts.append(position)
            plans.append((pieces, parts, segments, char_starts))
        if rust:
            encoded = self.backend.encode_batch(rust, add_special_tokens=False)
            for (pieces, at), encoding in zip(holes, encoded, strict=True):
                pieces[at] = _Segment(encoding)
        return [Encoding(*plan) for plan in plans]


def _trim(
    values: list[str], starts: tuple[int, ...], ends: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ByteLevel post-processor's offset trimming (without prefix spaces): leading and
    trailing spaces (Ġ, or whitespace in an added token) come off each token's offsets."""
    trimmed_starts, trimmed_ends = [], []
    for value, start, end in zip(values, starts, ends, strict=True):
        leading = len(value) - len(value.lstrip(_TRIMMED))
        trailing = len(value) - len(value.rstrip(_TRIMMED))
        if leading:
            start = min(start + leading, end)
        if trailing:
            end = max(end - trailing, start)
        trimmed_starts.append(start)
        trimmed_ends.append(end)
    return tuple(trimmed_starts), tuple(trimmed_ends)
