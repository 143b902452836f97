"""Exact and faster encoding for GPT-2-style byte-level BPE tokenizers (SmolLM2, GPT-2, ...).

The Rust tokenizer spends most of its time per token (regex, byte mapping, cache lookup, a
string and offsets per token) even when every word is a cache hit. Chat data repeats the same
few thousand English words endlessly, so `ByteLevelEncoder` does for ASCII text what the
tokenizer does, with the regex in Python and a dictionary from each pre-token to its token ids:

1. the text is split at the tokenizer's added tokens (longest match first, as the tokenizer
   does), and each piece between them is encoded alone, as the tokenizer does;
2. a piece that is all ASCII is split with the GPT-2 pre-tokenizer regex, written for ASCII
   (where Unicode letters, numbers and spaces are exactly [A-Za-z], [0-9] and [\\t\\n\\v\\f\\r ]),
   and each pre-token is looked up in the dictionary, filled by the tokenizer's own BPE model;
3. any other piece goes to the Rust tokenizer, in one batch.

It serves only tokenizers whose pipeline is exactly that (`for_tokenizer` returns None for any
other: a normalizer, another pre-tokenizer, prefix spaces, truncation, ...), and returns
encodings with the same ids and character offsets, so labels come out the same way
(`chat_templates.token_ranges`). Tests compare it with the Rust tokenizer on every ASCII
character and on real chat data, and the tokenize stage checks it against the Rust tokenizer on
the first conversation of every batch.
"""

from __future__ import annotations

import itertools
import json
import operator
import re
from bisect import bisect_right
from collections.abc import Callable
from typing import Any

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_SPACE = r"\t\n\x0b\x0c\r "
_ASCII_SPLIT = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_SPACE}A-Za-z0-9]+"
    rf"|[{_SPACE}]+(?![^{_SPACE}])|[{_SPACE}]+"
)
_IDS = operator.attrgetter("ids")
_CACHE_LIMIT = 1 << 20  # pre-tokens kept (English chat data has far fewer distinct words)


def _byte_level_ascii() -> dict[int, str]:
    """GPT-2's byte -> character map, for the ASCII bytes: printable ones stand for
    themselves, the others (controls, space) for 256 + their rank among those."""
    printable = set(range(ord("!"), ord("~") + 1))
    others = [b for b in range(256) if b not in printable and not (0xA1 <= b <= 0xFF and b != 0xAD)]
    mapping = {b: chr(b) for b in printable}
    mapping |= {b: chr(256 + rank) for rank, b in enumerate(others) if b < 128}
    return mapping


_TO_BYTE_LEVEL = str.maketrans(_byte_level_ascii())
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
    `char_to_token`, `token_to_chars` in characters)."""

    __slots__ = ("_char_starts", "_parts", "_pieces", "_token_starts", "ids")

    def __init__(self, pieces: list[Any], parts: list[str]) -> None:
        self._pieces, self._parts = pieces, parts  # parts[i]: the text of pieces[i]
        self.ids = list(itertools.chain.from_iterable(map(_IDS, pieces)))
        self._char_starts: list[int] = []

    def _locate(self) -> None:
        """Where each piece starts, in characters and in tokens (needed for labels only)."""
        if not self._char_starts:
            self._char_starts = list(itertools.accumulate(map(len, self._parts), initial=0))
            counts = map(len, map(_IDS, self._pieces))
            self._token_starts = list(itertools.accumulate(counts, initial=0))

    def token_to_chars(self, token: int) -> tuple[int, int]:
        self._locate()
        at = bisect_right(self._token_starts, token) - 1
        start, end = self._pieces[at].token_to_chars(token - self._token_starts[at])
        return self._char_starts[at] + start, self._char_starts[at] + end

    def char_to_token(self, char: int) -> int | None:
        """The first token whose offsets contain `char`: one of its piece's (a token's offsets
        lie within its piece)."""
        self._locate()
        at = bisect_right(self._char_starts, char) - 1
        if not 0 <= at < len(self._pieces):
            return None
        token = self._pieces[at].char_to_token(char - self._char_starts[at])
        return None if token is None else self._token_starts[at] + token


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


class ByteLevelEncoder:
    """`encode_batch(texts)` with the ids and offsets of `tokenizer.backend_tokenizer.
    encode_batch(texts, add_special_tokens=False)`; build it with `for_tokenizer`."""

    def __init__(self, backend: Any, added: dict[str, int], trim_offsets: bool) -> None:
        self.backend = backend
        self.trim_offsets = trim_offsets
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
        return cls(backend, {t["content"]: t["id"] for t in added}, trims)

    def _added_word(self, content: str, token_id: int) -> _Word:
        starts, ends = (0,), (len(content),)
        if self.trim_offsets:  # Rust trims the whitespace at an added token's ends too
            starts, ends = _trim([content], starts, ends)
        return _Word((token_id,), starts, ends)

    def _word(self, word: str) -> _Word:
        byte_level = word.translate(_TO_BYTE_LEVEL)
        tokens = self.backend.model.tokenize(byte_level)
        values = [t.value for t in tokens]
        if "".join(values) != byte_level:
            # The vocabulary lacks some of its bytes (SmolLM2 has no \x04, for one), which the
            # model drops or makes unknown tokens, and Rust's offsets then follow rules of
            # their own (from byte lengths): take them from Rust, for this pre-token alone.
            encoding = self.backend.encode(word, add_special_tokens=False)
            starts = tuple(start for start, _ in encoding.offsets)
            ends = tuple(end for _, end in encoding.offsets)
            return _Word(tuple(encoding.ids), starts, ends)
        ends = tuple(itertools.accumulate(map(len, values)))
        starts = (0, *ends[:-1])
        if self.trim_offsets:
            starts, ends = _trim(values, starts, ends)
        return _Word(tuple(t.id for t in tokens), starts, ends)

    def encode_batch(self, texts: list[str]) -> list[Encoding]:
        """One encoding per text."""
        lookup, added, split_words = self.cache.__getitem__, self.added, _ASCII_SPLIT.findall
        plans: list[tuple[list[Any], list[str]]] = []
        rust: list[str] = []  # the pieces that are not all ASCII
        holes: list[tuple[list[Any], int]] = []  # where each of them goes
        for text in texts:
            pieces: list[Any] = []
            parts: list[str] = []
            for position, part in enumerate(self.split_added(text)):
                if not part:
                    continue
                if position % 2:  # an added token
                    pieces.append(added[part])
                elif part.isascii():
                    words = split_words(part)
                    pieces += map(lookup, words)
                    parts += words
                    continue
                else:
                    holes.append((pieces, len(pieces)))
                    pieces.append(None)
                    rust.append(part)
                parts.append(part)
            plans.append((pieces, parts))
        if rust:
            encoded = self.backend.encode_batch(rust, add_special_tokens=False)
            for (pieces, at), encoding in zip(holes, encoded, strict=True):
                pieces[at] = _Segment(encoding)
        return [Encoding(pieces, parts) for pieces, parts in plans]


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
