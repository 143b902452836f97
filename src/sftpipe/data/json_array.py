"""JSON-array files read as a stream of elements, without holding the file: a scanner tracks
strings and nesting depth to find where each element ends, and json.loads parses it. Elements
too large, too deep or malformed are quarantined one by one; text after the closing `]` too.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from typing import IO

from sftpipe.data import raw_records as raw
from sftpipe.data.raw_records import RawRecord
from sftpipe.data.schemas import Reason
from sftpipe.data.sources import Source

# JSON nesting deeper than this in a JSON-array element is quarantined unparsed: the parsed
# element travels to a worker process, and pickling recurses once per level. (JSONL lines are
# parsed in the worker, up to Python's own recursion limit.)
MAX_NESTING = 256

_STRUCTURAL = re.compile(r'["\[\]{},]')
_STRING_BODY = re.compile(r'(?:[^"\\]|\\.)*"', re.DOTALL)
_WHITESPACE = " \t\r\n"


class _ArrayScanner:
    """Finds the end of the current top-level element across chunks (state kept between
    calls): `scan(buf, pos)` returns the index of the `,` or `]` that ends it, or -1."""

    def __init__(self) -> None:
        self.depth = 0
        self.deepest = 0
        self.in_string = False

    def scan(self, buf: str, pos: int) -> tuple[int, int]:
        """(end index or -1, position reached)."""
        while True:
            if self.in_string:
                match = _STRING_BODY.match(buf, pos)
                if match is None:
                    # An escape split by the chunk edge: stay before the backslash.
                    back = len(buf) - 1 if buf.endswith("\\") else len(buf)
                    return -1, max(pos, back)
                pos, self.in_string = match.end(), False
                continue
            match = _STRUCTURAL.search(buf, pos)
            if match is None:
                return -1, len(buf)
            char, pos = match.group(), match.end()
            if char == '"':
                self.in_string = True
            elif char in "[{":
                self.depth += 1
                if self.depth > self.deepest:
                    self.deepest = self.depth
            elif char in "]}":
                if self.depth == 0:
                    return pos - 1, pos - 1
                self.depth -= 1
            elif self.depth == 0:  # a comma between elements
                return pos - 1, pos - 1


def read_json_array(source: Source, stream: IO[bytes]) -> Iterator[RawRecord]:
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    buf, pos, line, eof = "", 0, 1, False
    index = 0

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        chunk = stream.read(1 << 20)
        eof = not chunk
        text = decoder.decode(chunk, final=eof)
        if not buf and text.startswith("\ufeff"):
            text = text[1:]
        buf = buf[pos:] + text
        pos = 0
        return bool(text) or not eof

    def skip_space() -> bool:
        nonlocal pos, line
        while True:
            while pos < len(buf) and buf[pos] in _WHITESPACE:
                line += buf[pos] == "\n"
                pos += 1
            if pos < len(buf):
                return True
            if not more():
                return False

    def trailing() -> Iterator[RawRecord]:
        """Each non-blank line after the closing ], quarantined (never silently dropped)."""
        nonlocal pos
        while skip_space():
            start_line, head, size = line, "", 0
            while True:
                newline = buf.find("\n", pos)
                piece = buf[pos : newline if newline >= 0 else len(buf)]
                head += piece[: max(0, raw.RAW_PREVIEW + raw.PREVIEW_MARGIN - len(head))]
                size += len(piece)
                if newline >= 0:
                    pos = newline  # skip_space counts the newline
                    break
                pos = len(buf)
                if not more():
                    break
            yield RawRecord(
                f"{source.name}:{start_line}",
                error=Reason.TRAILING_DATA,
                detail=f"{size:,} characters after the closing ] of the JSON array; a .json "
                "file holds one array: move these rows into it, or into a .jsonl file",
                preview=raw.preview(head),
            )

    if not skip_space():
        return  # an empty file
    if buf[pos] != "[":
        yield RawRecord(
            f"{source.name}:{line}",
            error=Reason.MALFORMED_JSON,
            detail="a .json file must hold one JSON array of records (or one object per line)",
            preview=raw.preview(buf[pos:]),
        )
        return
    pos += 1
    while True:
        if not skip_space():
            yield RawRecord(
                f"{source.name}:{line}",
                error=Reason.TRUNCATED_JSON,
                detail=f"the JSON array is truncated after element {index} (no closing ])",
            )
            return
        if buf[pos] == "]":
            pos += 1
            yield from trailing()
            return
        if buf[pos] == "," and index:
            pos += 1
            continue
        start_line, start = line, pos
        scanner = _ArrayScanner()
        end, reached = scanner.scan(buf, pos)
        skipped, head = 0, ""  # an oversized element: characters dropped so far, its start
        while end < 0:
            if skipped or reached - start > raw.MAX_RECORD_BYTES:
                # Too large to keep: drop what was scanned (the scanner keeps its state).
                head = head or buf[start : start + raw.RAW_PREVIEW + raw.PREVIEW_MARGIN]
                line += buf.count("\n", start, reached)
                skipped += reached - start
                start = reached
            offset = reached - start
            pos = start
            if not more():
                if scanner.depth == 0 and not scanner.in_string:
                    # The last element is whole; only the closing ] is missing (reported next).
                    start, end = pos, len(buf)
                    break
                yield RawRecord(
                    f"{source.name}:{start_line}",
                    error=Reason.TRUNCATED_JSON,
                    detail=f"the JSON array is truncated: element {index} starting at line "
                    f"{start_line} never ends",
                    preview=raw.preview(buf[pos:]),
                )
                return
            start = 0
            end, reached = scanner.scan(buf, offset)
        text = buf[start:end]
        line += text.count("\n")
        pos = end
        index += 1
        location = f"{source.name}:{start_line}"
        if skipped or len(text) > raw.MAX_RECORD_BYTES:
            head = head or text[: raw.RAW_PREVIEW + raw.PREVIEW_MARGIN]
            yield RawRecord(
                location,
                error=Reason.RECORD_TOO_LARGE,
                detail=f"element {index - 1} has more than {raw.MAX_RECORD_BYTES >> 20} MiB "
                f"({skipped + len(text):,} characters)",
                preview=raw.preview(head),
            )
            continue
        if scanner.deepest > MAX_NESTING:
            yield RawRecord(
                location,
                error=Reason.NESTED_TOO_DEEP,
                detail=f"element {index - 1} nests {scanner.deepest} levels deep "
                f"(more than {MAX_NESTING})",
                preview=raw.preview(text),
            )
            continue
        if bad := raw.not_utf8(location, text):
            yield bad
            continue
        try:
            record = json.loads(text)
        except ValueError as exc:
            yield RawRecord(
                location,
                error=Reason.MALFORMED_JSON,
                detail=f"element {index - 1} is not valid JSON: {exc}",
                preview=raw.preview(text),
            )
            continue
        except RecursionError:
            yield RawRecord(
                location,
                error=Reason.NESTED_TOO_DEEP,
                detail=f"element {index - 1} nests too deep to parse",
                preview=raw.preview(text),
            )
            continue
        yield RawRecord(location, payload=record, preview="")
