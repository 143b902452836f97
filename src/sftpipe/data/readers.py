"""Reading one input as a stream of raw records: JSONL, JSON array (or JSONL named .json;
`json_array`), CSV and TSV (`delimited`) and Parquet, each optionally gzip-compressed (detected
from the content; `streams`), and Hugging Face datasets (`hf`). Memory does not grow with the
file: a record larger than `raw_records.MAX_RECORD_BYTES` is quarantined, not read.

A record that cannot be read becomes a `RawRecord` with a reason code, its location
(`file:line`, `file:row N`) and a one-line detail; the reader never stops at a bad record, so
good rows are never lost to a bad neighbour.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from sftpipe.data import hf
from sftpipe.data import raw_records as raw
from sftpipe.data.delimited import read_csv
from sftpipe.data.json_array import read_json_array
from sftpipe.data.raw_records import PREVIEW_MARGIN, RAW_PREVIEW, RawRecord
from sftpipe.data.schemas import Reason, Rejected
from sftpipe.data.sources import Source, data_suffix
from sftpipe.data.streams import Gunzip, open_stream
from sftpipe.errors import SftpipeError

# What stages import from here (the record shape and the preview size).
__all__ = ["PREVIEW_MARGIN", "RAW_PREVIEW", "RawRecord", "parse_json", "read_records"]


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
            records = read_json_array(source, stream)
        elif kind in ("csv", "tsv"):
            records = read_csv(source, stream, "\t" if kind == "tsv" else ",")
        else:
            records = _read_parquet(source, stream, gunzip)
        yield from records if gunzip is None else _with_fault(source, records, gunzip)
        if digests is not None:
            digests[source.uri] = hashing.drain()


def _with_fault(
    source: Source, records: Iterator[RawRecord], gunzip: Gunzip
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
            shown = last.payload if last.raw_json else json.dumps(last.payload, default=str)
            preview = last.preview or raw.preview(shown)
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


def _read_jsonl(source: Source, stream: IO[bytes]) -> Iterator[RawRecord]:
    number, limit = 0, raw.MAX_RECORD_BYTES
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        number += 1
        if len(line) > limit and not line.endswith(b"\n"):
            size = len(line)
            while (rest := stream.readline(1 << 20)) and (size := size + len(rest)):
                if rest.endswith(b"\n"):
                    break
            yield RawRecord(
                f"{source.name}:{number}",
                error=Reason.RECORD_TOO_LARGE,
                detail=f"the line has more than {limit >> 20} MiB ({size:,} bytes)",
                preview=raw.preview(line),
            )
            continue
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield RawRecord(f"{source.name}:{number}", payload=line, raw_json=True)


def _read_parquet(
    source: Source, stream: IO[bytes], gunzip: Gunzip | None = None
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
