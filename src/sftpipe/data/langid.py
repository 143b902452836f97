"""A small, fast language guess for the language filter and the report's language mix.

It works from writing systems, which is what matters for tokenization and what can be told
reliably without a model: Chinese (Han without kana), Japanese (kana), Korean (Hangul),
Cyrillic, Arabic, and Latin-script text, which is called English when enough of its words are
common English words and `latin` otherwise. Letters are counted on the first 2,000 characters.
"""

from __future__ import annotations

import re

import numpy as np

LANGUAGES = ("zh", "ja", "ko", "en", "latin", "cyrillic", "arabic", "other")
_SAMPLE = 2000

# Letters of each script as code point ranges (first, last), counted in one vectorized pass.
_SCRIPT_RANGES = {
    "zh": ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF)),
    "kana": ((0x3040, 0x30FF),),
    "ko": ((0xAC00, 0xD7AF), (0x1100, 0x11FF), (0x3130, 0x318F)),
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F)),
    "cyrillic": ((0x400, 0x4FF),),
    "arabic": ((0x600, 0x6FF),),
}
_SCRIPT_NAMES = tuple(_SCRIPT_RANGES)
_RANGES = sorted(
    (first, last, index)
    for index, ranges in enumerate(_SCRIPT_RANGES.values())
    for first, last in ranges
)
# Sorted edges first_0, last_0 + 1, first_1, ...: a code point with an odd insertion index
# (side="right") lies in range (index - 1) // 2.
_EDGES = np.array([edge for first, last, _ in _RANGES for edge in (first, last + 1)], np.uint32)
_SCRIPT_OF_RANGE = np.array([index for _, _, index in _RANGES], dtype=np.int64)
# ASCII text is handled as bytes, in C: letters counted by deleting every other byte, words
# (runs of a-z after lowering, as `_WORD` finds them) split after turning the rest into spaces.
_NOT_ASCII_LETTER = bytes(b for b in range(128) if not chr(b).isalpha())
_ASCII_WORD_BREAKS = bytes(b if ord("a") <= b <= ord("z") else ord(" ") for b in range(256))
_WORD = re.compile(r"[a-z]+")
_ENGLISH = frozenset(
    [
        "a",
        "about",
        "after",
        "all",
        "also",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "because",
        "been",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "for",
        "from",
        "get",
        "had",
        "has",
        "have",
        "he",
        "her",
        "him",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "just",
        "like",
        "make",
        "me",
        "more",
        "my",
        "no",
        "not",
        "now",
        "of",
        "on",
        "one",
        "or",
        "other",
        "our",
        "out",
        "said",
        "she",
        "so",
        "some",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "up",
        "us",
        "use",
        "was",
        "we",
        "were",
        "what",
        "when",
        "which",
        "who",
        "will",
        "with",
        "would",
        "you",
        "your",
    ]
)


_ENGLISH_BYTES = frozenset(word.encode() for word in _ENGLISH)


def detect(text: str) -> str:
    """One of LANGUAGES for `text` (`other` when it has no letters of a known script)."""
    sample = text[:_SAMPLE]
    ascii_bytes = sample.encode("ascii") if sample.isascii() else None
    if ascii_bytes is not None:
        counts = {"latin": len(ascii_bytes.translate(None, _NOT_ASCII_LETTER))}
    else:
        counts = _script_counts(sample)
    total = sum(counts.values())
    if total == 0:
        return "other"
    kana = counts.get("kana", 0)
    if kana and kana * 10 >= counts.get("zh", 0):  # any real amount of kana: Japanese
        counts["ja"] = kana + counts.get("zh", 0)
        counts.pop("zh", None)
    counts.pop("kana", None)
    best = max(counts, key=lambda name: counts[name])
    if best != "latin":
        return best
    if ascii_bytes is not None:
        words = ascii_bytes.lower().translate(_ASCII_WORD_BREAKS).split()
        english = sum(map(_ENGLISH_BYTES.__contains__, words))
    else:
        words = _WORD.findall(sample.lower())
        english = sum(map(_ENGLISH.__contains__, words))
    if words and english >= 0.15 * len(words):
        return "en"
    return "latin"


def _script_counts(sample: str) -> dict[str, int]:
    """Letters of each script in `sample`, in `_SCRIPT_RANGES` order (ties go to the first)."""
    codes = np.frombuffer(sample.encode("utf-32-le"), dtype=np.uint32)
    slot = np.searchsorted(_EDGES, codes, side="right")
    inside = slot[(slot & 1) == 1]
    counts = np.bincount(_SCRIPT_OF_RANGE[(inside - 1) // 2], minlength=len(_SCRIPT_NAMES))
    return dict(zip(_SCRIPT_NAMES, counts.tolist(), strict=True))
