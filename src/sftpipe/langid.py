"""A small, fast language guess for the language filter and the report's language mix.

It works from writing systems, which is what matters for tokenization and what can be told
reliably without a model: Chinese (Han without kana), Japanese (kana), Korean (Hangul),
Cyrillic, Arabic, and Latin-script text, which is called English when enough of its words are
common English words and `latin` otherwise. Letters are counted on the first 2,000 characters.
"""

from __future__ import annotations

import re

LANGUAGES = ("zh", "ja", "ko", "en", "latin", "cyrillic", "arabic", "other")
_SAMPLE = 2000

_SCRIPTS = {
    "zh": re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"),
    "kana": re.compile("[\u3040-\u30ff]"),
    "ko": re.compile("[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]"),
    "latin": re.compile("[A-Za-z\u00c0-\u024f]"),
    "cyrillic": re.compile("[\u0400-\u04ff]"),
    "arabic": re.compile("[\u0600-\u06ff]"),
}
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


def detect(text: str) -> str:
    """One of LANGUAGES for `text` (`other` when it has no letters of a known script)."""
    sample = text[:_SAMPLE]
    if sample.isascii():
        counts = {"latin": len(_SCRIPTS["latin"].findall(sample))}
    else:
        counts = {name: len(pattern.findall(sample)) for name, pattern in _SCRIPTS.items()}
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
    words = _WORD.findall(sample.lower())
    if words and sum(w in _ENGLISH for w in words) >= 0.15 * len(words):
        return "en"
    return "latin"
