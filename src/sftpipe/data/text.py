"""Text normalization shared by the data stages. Language-neutral: nothing here assumes that
words are separated by spaces, so Chinese and English go through the same path.

`normalize` runs, in order: mojibake repair (ftfy, only on text that can hold mojibake), HTML
tag removal and entity unescaping (outside code), Unicode NFKC, removal of zero-width and
control characters, whitespace clean-up (code indentation kept) and CJK punctuation: NFKC
turns full-width punctuation into ASCII, which is right inside Latin text and wrong inside
Chinese or Japanese text, so punctuation that sits against CJK characters is made full-width
again (`你好!` and `你好！` both become `你好！`, which also makes them exact duplicates).
"""

from __future__ import annotations

import functools
import html
import re
import sys
import unicodedata

# Zero-width and invisible formatting characters that survive NFKC (ZWSP, ZWNJ, ZWJ, word
# joiner, BOM, soft hyphen, bidi controls). ZWJ inside emoji sequences goes too: a training set
# gains nothing from it and it breaks exact de-duplication.
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064\ufeff]")
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_INDENT = re.compile(r"[ \t]*")
_BLANK_LINES = re.compile(r"\n{3,}")

# UTF-8 read as Latin-1 or Windows-1252 (the usual mojibake, "â€™" for "'") always contains
# characters from these ranges; text without any of them cannot hold that kind of mojibake, so
# ftfy (tens of microseconds per string) runs only on text that has one.
_MOJIBAKE_HINT = re.compile(
    "[\u0080-\u00ff\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
    "\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]"
)

# HTML: tags of the usual scraped markup (not any `<word>`, so `<T>` in code or `<EMAIL>`
# placeholders stay), whole script/style blocks, and entities.
_HTML_BLOCK = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_BREAK = re.compile(
    r"[ \t]*(?:<(?:br|hr)\s*/?>|</(?:p|div|li|h[1-6]|tr|table|blockquote|pre)\s*>)[ \t]*", re.I
)
_HTML_TAG = re.compile(
    r"</?(?:a|abbr|b|big|blockquote|body|br|center|code|div|em|font|h[1-6]|head|hr|html|i|img|"
    r"li|ol|p|pre|small|span|strong|sub|sup|table|tbody|td|th|thead|tr|tt|u|ul)\b[^<>]*>",
    re.IGNORECASE,
)
_ENTITY = re.compile(r"&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,30});")
# Markdown code: fenced blocks and inline spans are left exactly as written.
_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]+`", re.DOTALL)

# CJK ideographs, kana and CJK symbols (Hangul is left out: Korean uses ASCII punctuation).
_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff01-\uff60"
_FULL = {",": "，", "!": "！", "?": "？", ":": "：", ";": "；", "(": "（", ")": "）"}
_CJK_AFTER = re.compile(f"(?<=[{_CJK}])[ \t]*([,!?:;)])")
_CJK_OPEN = re.compile(f"[(](?=[{_CJK}])")
_SPACE_AFTER_FULL = re.compile(f"([，！？：；）])[ \t]+(?=[{_CJK}])")


@functools.cache
def _control_chars() -> re.Pattern[str]:
    """Every control, format, surrogate and private-use character except newline and tab
    (built once per process, only when text has a non-printable character)."""
    ranges: list[str] = []
    start = None
    for code in range(sys.maxunicode + 2):
        bad = code <= sys.maxunicode and (
            unicodedata.category(chr(code)) in ("Cc", "Cf", "Cs", "Co") and chr(code) not in "\n\t"
        )
        if bad and start is None:
            start = code
        elif not bad and start is not None:
            ranges.append(f"\\U{start:08x}-\\U{code - 1:08x}")
            start = None
    return re.compile(f"[{''.join(ranges)}]")


def _outside_code(text: str, fix: object) -> str:
    """Apply `fix` to the parts of `text` that are not Markdown code."""
    if "`" not in text:
        return fix(text)  # type: ignore[operator]
    parts, last = [], 0
    for match in _CODE.finditer(text):
        parts.append(fix(text[last : match.start()]))  # type: ignore[operator]
        parts.append(match.group())
        last = match.end()
    parts.append(fix(text[last:]))  # type: ignore[operator]
    return "".join(parts)


def _strip_html(text: str) -> str:
    if "<" in text:
        text = _HTML_BLOCK.sub("", text)
        text = _HTML_BREAK.sub("\n", text)
        text = _HTML_TAG.sub("", text)
    if "&" in text:
        text = _ENTITY.sub(lambda m: html.unescape(m.group()), text)
    return text


def repair_mojibake(text: str) -> str:
    """Undo UTF-8 decoded as Latin-1/Windows-1252 (`doesnâ€™t` -> `doesn't`), with ftfy."""
    if text.isascii() or not _MOJIBAKE_HINT.search(text):
        return text
    import ftfy

    return ftfy.fix_encoding(text)


def cjk_punctuation(text: str) -> str:
    """Full-width punctuation against CJK characters, ASCII punctuation elsewhere (after NFKC,
    which made it all ASCII)."""
    if text.isascii():
        return text
    text = _CJK_AFTER.sub(lambda m: _FULL[m.group(1)], text)
    text = _CJK_OPEN.sub("（", text)
    return _SPACE_AFTER_FULL.sub(r"\1", text)


def normalize(text: str, strip_html: bool = True) -> str:
    """Mojibake repaired, HTML removed (outside code; `strip_html`), NFKC, no control or
    zero-width characters, runs of spaces inside a line collapsed to one (leading indentation
    kept: answers contain code), no trailing spaces, at most one blank line in a row, CJK
    punctuation made full-width, stripped ends."""
    text = repair_mojibake(text.replace("\r\n", "\n").replace("\r", "\n"))
    if strip_html and ("<" in text or "&" in text):
        text = _outside_code(text, _strip_html)
    text = unicodedata.normalize("NFKC", text)
    text = _INVISIBLE.sub("", text)
    if not text.replace("\n", "").replace("\t", "").isprintable():
        text = _control_chars().sub("", text)
    if "\n" in text or "  " in text or "\t" in text:
        text = "\n".join(_normalize_line(line) for line in text.split("\n"))
        text = _BLANK_LINES.sub("\n\n", text)
    text = cjk_punctuation(text)
    return text.strip("\n").rstrip().lstrip(" \t")


def _normalize_line(line: str) -> str:
    indent = _INDENT.match(line).end()  # type: ignore[union-attr]
    return line[:indent] + _HORIZONTAL_SPACE.sub(" ", line[indent:]).rstrip()
