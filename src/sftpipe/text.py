"""Text normalization shared by the data stages. Language-neutral: nothing here assumes that
words are separated by spaces, so Chinese and English go through the same path."""

from __future__ import annotations

import re
import unicodedata

# Zero-width and invisible formatting characters that survive NFKC (ZWSP, ZWNJ, ZWJ, word
# joiner, BOM, soft hyphen, bidi controls). ZWJ inside emoji sequences goes too: a training set
# gains nothing from it and it breaks exact de-duplication.
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064\ufeff]")
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_INDENT = re.compile(r"[ \t]*")
_BLANK_LINES = re.compile(r"\n{3,}")


def _is_control(char: str) -> bool:
    return char not in "\n\t" and unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co")


def normalize(text: str) -> str:
    """NFKC, no control or zero-width characters, runs of spaces inside a line collapsed to one
    (leading indentation kept: answers contain code), no trailing spaces, at most one blank line
    in a row, stripped ends."""
    text = unicodedata.normalize("NFKC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _INVISIBLE.sub("", text)
    if any(_is_control(c) for c in text):
        text = "".join(c for c in text if not _is_control(c))
    text = "\n".join(_normalize_line(line) for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip("\n").rstrip().lstrip(" \t")


def _normalize_line(line: str) -> str:
    indent = _INDENT.match(line).end()  # type: ignore[union-attr]
    return line[:indent] + _HORIZONTAL_SPACE.sub(" ", line[indent:]).rstrip()
