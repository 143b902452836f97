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
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from sftpipe import storage
from sftpipe.data import hf
from sftpipe.data.schemas import Reason, Rejected
from sftpipe.data.sources import Source, data_suffix
from sftpipe.errors import SftpipeError

MAX_RECORD_BYTES = 64 << 20  # one record (line, array element, CSV row); larger is quarantined
RAW_PREVIEW = 2000  # characters of a rejected record kept in the quarantine
# Previews are read this much longer, so that PII crossing the cut is scrubbed whole before
# the cut (`pii.scrub_shown`).
PREVIEW_MARGIN = 256
# A gzip stream that expands more than this (decompressed / stored bytes) is refused: text
# compresses 3-10x, very repetitive JSONL ~50x, a "zip bomb" ~1000x (deflate's limit).
MAX_GZIP_RATIO = 200
_GZIP_RATIO_GRACE = 16 << 20  # decompressed bytes before the ratio is checked (small files)
# JSON nesting deeper than this in a JSON-array element is quarantined unparsed: the parsed
# element travels to a worker process, and pickling recurses once per level. (JSONL lines are
# parsed in the worker, up to Python's own recursion limit.)
MAX_NESTING = 256


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
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        self.sha256.update(data)
        self.bytes_read += len(data)
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


@dataclass(frozen=True)
class StreamFault:
    """Why a compressed stream stopped early, and the (1-based) line it stopped in."""

    reason: Reason
    detail: str
    line: int


class _Gunzip(io.RawIOBase):
    """Gunzips a stream; a damaged stream (truncated, corrupt, or expanding like a bomb) reads
    as an early end with `fault` set, instead of an exception in the middle of a reader."""

    def __init__(self, compressed: IO[bytes], hashing: _Hashing) -> None:
        self._gzip = gzip.GzipFile(fileobj=compressed)  # type: ignore[arg-type]
        self._hashing = hashing
        self.fault: StreamFault | None = None
        self.bytes_out = 0
        self.newlines = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.fault is not None:
            return 0
        try:
            data = self._gzip.read1(len(buffer))
        except EOFError:
            return self._stop(
                Reason.TRUNCATED_FILE,
                "the gzip stream ends early (the file is truncated: copy or upload it again)",
            )
        except (zlib.error, gzip.BadGzipFile, OSError) as exc:
            return self._stop(
                Reason.CORRUPT_FILE, f"the gzip stream is corrupt ({exc}): the rest is unreadable"
            )
        self.bytes_out += len(data)
        self.newlines += data.count(b"\n")
        stored = self._hashing.bytes_read
        if self.bytes_out > _GZIP_RATIO_GRACE and self.bytes_out > MAX_GZIP_RATIO * stored:
            return self._stop(
                Reason.TOO_COMPRESSED,
                f"the gzip stream expands more than {MAX_GZIP_RATIO}x ({self.bytes_out:,} bytes "
                f"from {stored:,}): refused as a decompression bomb; the rest is skipped",
            )
        buffer[: len(data)] = data
        return len(data)

    def _stop(self, reason: Reason, detail: str) -> int:
        where = f"after {self.bytes_out:,} decompressed bytes"
        self.fault = StreamFault(reason, f"{detail} ({where})", self.newlines + 1)
        return 0


@contextlib.contextmanager
def open_stream(source: Source) -> Iterator[tuple[IO[bytes], _Hashing, _Gunzip | None]]:
    """A buffered binary stream of the file's content (gunzipped when it is gzip data), the
    hashing layer under it, which gives the digest of the stored bytes, and the gunzip layer
    (None for plain files), whose `fault` says why a damaged stream ended early."""
    hashing = _Hashing(storage.open_binary(source.uri))
    stream: IO[bytes] = io.BufferedReader(hashing, 1 << 20)
    gunzip = None
    try:
        if stream.peek(2)[:2] == b"\x1f\x8b":  # type: ignore[attr-defined]
            gunzip = _Gunzip(stream, hashing)
            stream = io.BufferedReader(gunzip, 1 << 20)
        yield stream, hashing, gunzip
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
    if hf.is_hub_uri(source.uri) or hf.saved_dataset_dir(source.uri):
        yield from _read_dataset(source, digests)
        return
    with open_stream(source) as (stream, hashing, gunzip):
        kind = file_format_of(source, stream, file_format)
        if kind == "json":
            head = stream.peek(64)[:64].lstrip(b"\xef\xbb\xbf \t\r\n")  # type: ignore[attr-defined]
            kind = "json" if head.startswith(b"[") or not head else "jsonl"
        if kind == "jsonl":
            records = _read_jsonl(source, stream)
        elif kind == "json":
            records = _read_json_array(source, stream)
        elif kind in ("csv", "tsv"):
            records = _read_csv(source, stream, "\t" if kind == "tsv" else ",")
        else:
            records = _read_parquet(source, stream, gunzip)
        yield from records if gunzip is None else _with_fault(source, records, gunzip)
        if digests is not None:
            digests[source.uri] = hashing.drain()


def _with_fault(
    source: Source, records: Iterator[RawRecord], gunzip: _Gunzip
) -> Iterator[RawRecord]:
    """The records of a gzipped file, and when its stream broke, one record for the fault at
    the line it broke in. A record read from that same (cut) line is replaced by the fault,
    keeping its text as the preview, so that each location is reported once."""
    last: RawRecord | None = None
    for record in records:
        if last is not None:
            yield last
        last = record
    fault = gunzip.fault
    if fault is None:
        if last is not None:
            yield last
        return
    location = f"{source.name}:{fault.line}"
    preview = ""
    if last is not None:
        if last.location == location:
            preview = last.preview or _preview(last.payload if last.raw_json else "")
        else:
            yield last
    yield RawRecord(location, error=fault.reason, detail=fault.detail, preview=preview)


def _read_dataset(source: Source, digests: dict[str, str] | None) -> Iterator[RawRecord]:
    """The rows of a Hugging Face dataset; its digest hashes the rows (there are no bytes of
    one file to hash)."""
    sha256 = hashlib.sha256()
    saved = hf.saved_dataset_dir(source.uri)
    rows = hf.read_saved(saved, source.name) if saved else hf.read_hub(source.uri)
    for location, row in hf.digest_rows(rows, sha256):
        yield RawRecord(location, payload=row)
    if digests is not None:
        digests[source.uri] = sha256.hexdigest()


def _preview(data: bytes | str) -> str:
    size = RAW_PREVIEW + PREVIEW_MARGIN
    if isinstance(data, bytes):
        data = data[: size * 4].decode("utf-8", "replace")
    return data[:size]


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
                self.deepest = max(self.deepest, self.depth)
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

    def trailing() -> Iterator[RawRecord]:
        """Each non-blank line after the closing ], quarantined (never silently dropped)."""
        nonlocal pos
        while skip_space():
            start_line, head, size = line, "", 0
            while True:
                newline = buf.find("\n", pos)
                piece = buf[pos : newline if newline >= 0 else len(buf)]
                head += piece[: max(0, RAW_PREVIEW + PREVIEW_MARGIN - len(head))]
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
                preview=_preview(head),
            )

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
            if skipped or reached - start > MAX_RECORD_BYTES:
                # Too large to keep: drop what was scanned (the scanner keeps its state).
                head = head or buf[start : start + RAW_PREVIEW + PREVIEW_MARGIN]
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
        if skipped or len(text) > MAX_RECORD_BYTES:
            head = head or text[: RAW_PREVIEW + PREVIEW_MARGIN]
            yield RawRecord(
                location,
                error=Reason.RECORD_TOO_LARGE,
                detail=f"element {index - 1} has more than {MAX_RECORD_BYTES >> 20} MiB "
                f"({skipped + len(text):,} characters)",
                preview=_preview(head),
            )
            continue
        if scanner.deepest > MAX_NESTING:
            yield RawRecord(
                location,
                error=Reason.NESTED_TOO_DEEP,
                detail=f"element {index - 1} nests {scanner.deepest} levels deep "
                f"(more than {MAX_NESTING})",
                preview=_preview(text),
            )
            continue
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
        except RecursionError:
            yield RawRecord(
                location,
                error=Reason.NESTED_TOO_DEEP,
                detail=f"element {index - 1} nests too deep to parse",
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
        line = self.text.readline(MAX_RECORD_BYTES + 1)
        if not line:
            raise StopIteration
        self.count += 1
        self.row_chars += len(line)
        if self.row_chars > MAX_RECORD_BYTES:
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
        problem = str(exc) or f"more than {MAX_RECORD_BYTES >> 20} MiB"
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
                detail=f"the row has more than {MAX_RECORD_BYTES >> 20} MiB "
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


def _read_parquet(
    source: Source, stream: IO[bytes], gunzip: _Gunzip | None = None
) -> Iterator[RawRecord]:
    """Parquet rows. A damaged Parquet file is one error line (its footer, which says where
    the rows are, is at the end: there is nothing to salvage row by row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryFile(prefix="sftpipe-") as handle:
        # Parquet needs random access: spool the (possibly remote or gzipped) stream to disk.
        shutil.copyfileobj(stream, handle, 1 << 20)
        if gunzip is not None and gunzip.fault is not None:
            raise SftpipeError(source.uri, gunzip.fault.detail, "check the file") from None
        handle.seek(0)
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as exc:
            raise SftpipeError(
                source.uri, f"not a readable Parquet file ({exc})", "check the file"
            ) from None
        number = 0
        batches = parquet.iter_batches(batch_size=1024)
        while True:
            try:
                batch = next(batches, None)
                rows = [] if batch is None else batch.to_pylist()
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise SftpipeError(
                    source.uri,
                    f"unreadable Parquet data after row {number} ({exc})",
                    "check the file (rewrite it with pyarrow or pandas)",
                ) from None
            if batch is None:
                return
            for record in rows:
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
    except RecursionError:
        raise Rejected(Reason.NESTED_TOO_DEEP, "the JSON nests too deep to parse") from None
