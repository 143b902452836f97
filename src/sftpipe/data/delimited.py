"""CSV and TSV files read as a stream of rows (a header row names the columns; quoted fields
may hold delimiters, quotes and newlines). A row is bounded in all its fields together, not
only field by field.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import IO

from sftpipe.data import raw_records as raw
from sftpipe.data.raw_records import RawRecord
from sftpipe.data.schemas import Reason
from sftpipe.data.sources import Source
from sftpipe.errors import SftpipeError


def read_csv(source: Source, stream: IO[bytes], delimiter: str) -> Iterator[RawRecord]:
    csv.field_size_limit(raw.MAX_RECORD_BYTES)
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")  # type: ignore[arg-type]
    try:
        yield from _csv_rows(source, text, delimiter)
    finally:
        text.detach()  # leave the underlying stream open: the digest still reads it


class _RowTooLarge(Exception):
    pass


class _BoundedLines:
    """The physical lines of a CSV text for `csv.reader`, each read with a bound, counted, and
    summed per row (a quoted field spans lines): a row over `MAX_RECORD_BYTES` characters in
    all its fields raises `_RowTooLarge` once the rest of its current line is consumed."""

    def __init__(self, text: IO[str]) -> None:
        self.text = text
        self.count = 0  # physical lines read
        self.row_chars = 0  # characters of the row being read; reset before each row
        self.oversized = 0  # characters of the last oversized row

    def __iter__(self) -> _BoundedLines:
        return self

    def __next__(self) -> str:
        line = self.text.readline(raw.MAX_RECORD_BYTES + 1)
        if not line:
            raise StopIteration
        self.count += 1
        self.row_chars += len(line)
        if self.row_chars > raw.MAX_RECORD_BYTES:
            size = self.row_chars
            while not line.endswith(("\n", "\r")) and (line := self.text.readline(1 << 20)):
                size += len(line)
            self.oversized = size
            raise _RowTooLarge
        return line


def _csv_rows(source: Source, text: IO[str], delimiter: str) -> Iterator[RawRecord]:
    lines = _BoundedLines(text)
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except (csv.Error, _RowTooLarge) as exc:
        problem = str(exc) or f"more than {raw.MAX_RECORD_BYTES >> 20} MiB"
        raise SftpipeError(
            source.uri, f"unreadable header row ({problem})", "check the file"
        ) from None
    header = [name.strip() for name in header]
    last = lines.count
    while True:
        start = last + 1
        lines.row_chars = 0
        try:
            row = next(reader)
        except StopIteration:
            return
        except _RowTooLarge:
            last = lines.count
            # The reader stopped inside the row: a fresh one starts at the next line.
            reader = csv.reader(lines, delimiter=delimiter)
            yield RawRecord(
                f"{source.name}:{start}",
                error=Reason.RECORD_TOO_LARGE,
                detail=f"the row has more than {raw.MAX_RECORD_BYTES >> 20} MiB "
                f"({lines.oversized:,} characters so far, lines {start}-{last})",
            )
            continue
        except csv.Error as exc:
            last = lines.count
            yield RawRecord(
                f"{source.name}:{start}",
                error=Reason.MALFORMED_ROW,
                detail=f"unreadable CSV row: {exc}",
            )
            continue
        last = lines.count
        if not row or all(not cell.strip() for cell in row):
            continue
        location = f"{source.name}:{start}"
        joined = delimiter.join(row)
        if bad := raw.not_utf8(location, joined):
            yield bad
            continue
        if len(row) != len(header):
            yield RawRecord(
                location,
                error=Reason.MALFORMED_ROW,
                detail=f"the row has {len(row)} fields, the header has {len(header)} "
                f"({', '.join(header)}); quote fields that contain {delimiter!r} or newlines",
                preview=raw.preview(joined),
            )
            continue
        yield RawRecord(location, payload=dict(zip(header, row, strict=True)))
