"""Reading one input file as a stream of raw records: JSONL, JSON array (or JSONL named .json),
CSV, TSV and Parquet, each optionally gzip-compressed (detected from the content). Memory does
not grow with the file: a record larger than `MAX_RECORD_BYTES` is quarantined, not read.

A record that cannot be read becomes a `RawRecord` with a reason code, its location
(`file:line`, `file:row N`) and a one-line detail; the reader never stops at a bad record, so
good rows are never lost to a bad neighbour.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import hashlib
import io
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from sftpipe import storage
from sftpipe.data.schemas import Reason, Rejected
from sftpipe.data.sources import Source, data_suffix
from sftpipe.errors import SftpipeError

MAX_RECORD_BYTES = 64 << 20  # one record (line, array element, CSV row); larger is quarantined
RAW_PREVIEW = 2000  # characters of a rejected record kept in the quarantine


@dataclass(frozen=True)
class RawRecord:
    """One record as read: where it is, and either its JSON bytes (JSONL, parsed later, in a
    worker), the parsed object (JSON array, CSV, Parquet) or why it could not be read."""

    location: str
    payload: Any = None
    raw_json: bool = False
    error: Reason | None = None
    detail: str = ""
    preview: str = ""


class _Hashing(io.RawIOBase):
    """Passes the bytes of a file or S3 body through, hashing them (the input digest)."""

    def __init__(self, body: Any) -> None:
        self._body = body
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        self.sha256.update(data)
        return len(data)

    def drain(self) -> str:
        """Hash what was not read (a reader may stop early) and return the hex digest."""
        while data := self._body.read(1 << 20):
            self.sha256.update(data)
        return self.sha256.hexdigest()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


@contextlib.contextmanager
def open_stream(source: Source) -> Iterator[tuple[IO[bytes], _Hashing]]:
    """A buffered binary stream of the file's content (gunzipped when it is gzip data), and the
    hashing layer under it, which gives the digest of the stored bytes."""
    hashing = _Hashing(storage.open_binary(source.uri))
    stream: IO[bytes] = io.BufferedReader(hashing, 1 << 20)
    try:
        if stream.peek(2)[:2] == b"\x1f\x8b":  # type: ignore[attr-defined]
            stream = io.BufferedReader(gzip.GzipFile(fileobj=stream), 1 << 20)  # type: ignore[arg-type]
        yield stream, hashing
    finally:
        stream.close()
        hashing.close()


def file_format_of(source: Source, stream: IO[bytes], forced: str = "auto") -> str:
    if forced != "auto":
        return forced
    by_name = data_suffix(source.name)
    if by_name:
        return by_name
    head = stream.peek(4)[:4]  # type: ignore[attr-defined]
    if head == b"PAR1":
        return "parquet"
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first in (b"{", b"["):
        return "jsonl" if first == b"{" else "json"
    raise SftpipeError(
        source.uri,
        "cannot tell the file format from the name or the content",
        "name it .jsonl/.json/.csv/.tsv/.parquet or pass --file-format",
    )


def read_records(
    source: Source, file_format: str = "auto", digests: dict[str, str] | None = None
) -> Iterator[RawRecord]:
    """Every record of one file, in order, as `RawRecord`s (errors included, never raised).
    When the file has been read, `digests[source.uri]` is the SHA-256 of its stored bytes."""
    with open_stream(source) as (stream, hashing):
        kind = file_format_of(source, stream, file_format)
        if kind == "json":
            head = stream.peek(64)[:64].lstrip(b"\xef\xbb\xbf \t\r\n")  # type: ignore[attr-defined]
            kind = "json" if head.startswith(b"[") or not head else "jsonl"
        if kind == "jsonl":
            yield from _read_jsonl(source, stream)
        elif kind == "json":
            yield from _read_json_array(source, stream)
        elif kind in ("csv", "tsv"):
            yield from _read_csv(source, stream, "\t" if kind == "tsv" else ",")
        else:
            yield from _read_parquet(source, stream)
        if digests is not None:
            digests[source.uri] = hashing.drain()


def _preview(data: bytes | str) -> str:
    if isinstance(data, bytes):
        data = data[: RAW_PREVIEW * 4].decode("utf-8", "replace")
    return data[:RAW_PREVIEW]


def _read_jsonl(source: Source, stream: IO[bytes]) -> Iterator[RawRecord]:
    number = 0
    while True:
        line = stream.readline(MAX_RECORD_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):
            size = len(line)
            while (rest := stream.readline(1 << 20)) and (size := size + len(rest)):
                if rest.endswith(b"\n"):
                    break
            yield RawRecord(
                f"{source.name}:{number}",
                error=Reason.RECORD_TOO_LARGE,
                detail=f"the line has more than {MAX_RECORD_BYTES >> 20} MiB ({size:,} bytes)",
                preview=_preview(line),
            )
            continue
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield RawRecord(f"{source.name}:{number}", payload=line, raw_json=True)


# JSON array: split the top-level array into elements without holding the file. A scanner
# tracks strings and nesting depth to find where each element ends; json.loads parses it.
_STRUCTURAL = re.compile(r'["\[\]{},]')
_STRING_BODY = re.compile(r'(?:[^"\\]|\\.)*"', re.DOTALL)
_SURROGATE = re.compile("[\udc80-\udcff]")
_WHITESPACE = " \t\r\n"


class _ArrayScanner:
    """Finds the end of the current top-level element across chunks (state kept between
    calls): `scan(buf, pos)` returns the index of the `,` or `]` that ends it, or -1."""

    def __init__(self) -> None:
        self.depth = 0
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
            elif char in "]}":
                if self.depth == 0:
                    return pos - 1, pos - 1
                self.depth -= 1
            elif self.depth == 0:  # a comma between elements
                return pos - 1, pos - 1


def _read_json_array(source: Source, stream: IO[bytes]) -> Iterator[RawRecord]:
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

    if not skip_space():
        return  # an empty file
    if buf[pos] != "[":
        yield RawRecord(
            f"{source.name}:{line}",
            error=Reason.MALFORMED_JSON,
            detail="a .json file must hold one JSON array of records (or one object per line)",
            preview=_preview(buf[pos:]),
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
            return
        if buf[pos] == "," and index:
            pos += 1
            continue
        start_line, start = line, pos
        scanner = _ArrayScanner()
        end, reached = scanner.scan(buf, pos)
        while end < 0:
            if reached - start > MAX_RECORD_BYTES:
                yield RawRecord(
                    f"{source.name}:{start_line}",
                    error=Reason.RECORD_TOO_LARGE,
                    detail=f"element {index} has more than {MAX_RECORD_BYTES >> 20} MiB; "
                    "the rest of the file is skipped",
                    preview=_preview(buf[start : start + RAW_PREVIEW]),
                )
                return
            offset = reached - start
            pos = start
            if not more():
                yield RawRecord(
                    f"{source.name}:{start_line}",
                    error=Reason.TRUNCATED_JSON,
                    detail=f"the JSON array is truncated: element {index} starting at line "
                    f"{start_line} never ends",
                    preview=_preview(buf[pos:]),
                )
                return
            start = 0
            end, reached = scanner.scan(buf, offset)
        text = buf[start:end]
        line += text.count("\n")
        pos = end
        index += 1
        location = f"{source.name}:{start_line}"
        if _SURROGATE.search(text):
            yield RawRecord(
                location,
                error=Reason.BAD_ENCODING,
                detail="bytes that are not UTF-8 (re-encode the file as UTF-8)",
                preview=_preview(text.encode("utf-8", "surrogateescape")),
            )
            continue
        try:
            record = json.loads(text)
        except ValueError as exc:
            yield RawRecord(
                location,
                error=Reason.MALFORMED_JSON,
                detail=f"element {index - 1} is not valid JSON: {exc}",
                preview=_preview(text),
            )
            continue
        yield RawRecord(location, payload=record, preview="")


def _read_csv(source: Source, stream: IO[bytes], delimiter: str) -> Iterator[RawRecord]:
    csv.field_size_limit(MAX_RECORD_BYTES)
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")  # type: ignore[arg-type]
    try:
        yield from _csv_rows(source, text, delimiter)
    finally:
        text.detach()  # leave the underlying stream open: the digest still reads it


def _csv_rows(source: Source, text: IO[str], delimiter: str) -> Iterator[RawRecord]:
    reader = csv.reader(text, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise SftpipeError(source.uri, f"unreadable header row ({exc})", "check the file") from None
    header = [name.strip() for name in header]
    last = reader.line_num
    while True:
        start = last + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            last = reader.line_num
            yield RawRecord(
                f"{source.name}:{start}",
                error=Reason.MALFORMED_ROW,
                detail=f"unreadable CSV row: {exc}",
            )
            continue
        last = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        location = f"{source.name}:{start}"
        joined = delimiter.join(row)
        if _SURROGATE.search(joined):
            yield RawRecord(
                location,
                error=Reason.BAD_ENCODING,
                detail="bytes that are not UTF-8 (re-encode the file as UTF-8)",
                preview=_preview(joined.encode("utf-8", "surrogateescape")),
            )
            continue
        if len(row) != len(header):
            yield RawRecord(
                location,
                error=Reason.MALFORMED_ROW,
                detail=f"the row has {len(row)} fields, the header has {len(header)} "
                f"({', '.join(header)}); quote fields that contain {delimiter!r} or newlines",
                preview=_preview(joined),
            )
            continue
        yield RawRecord(location, payload=dict(zip(header, row, strict=True)))


def _read_parquet(source: Source, stream: IO[bytes]) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryFile(prefix="sftpipe-") as handle:
        # Parquet needs random access: spool the (possibly remote or gzipped) stream to disk.
        shutil.copyfileobj(stream, handle, 1 << 20)
        handle.seek(0)
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as exc:
            raise SftpipeError(
                source.uri, f"not a readable Parquet file ({exc})", "check the file"
            ) from None
        number = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield RawRecord(f"{source.name}:row {number}", payload=record)


def parse_json(record: RawRecord) -> Any:
    """The parsed object of a record (JSONL lines are parsed here, in the worker)."""
    if not record.raw_json:
        return record.payload
    line: bytes = record.payload
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(
            Reason.BAD_ENCODING,
            f"byte 0x{line[exc.start]:02x} at column {exc.start + 1} is not UTF-8 "
            "(re-encode the file as UTF-8, e.g. iconv -f GBK -t UTF-8)",
        ) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise Rejected(Reason.MALFORMED_JSON, f"not valid JSON: {exc}") from None
