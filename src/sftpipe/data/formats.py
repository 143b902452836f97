"""Reading raw training data: where the files are, how each file is parsed, and how each record
becomes sftpipe's one internal example shape.

Files (`list_sources`): a single file, a directory (every data file under it), a glob
(`data/*.jsonl`, `s3://bucket/shards/part-*.parquet`) or an `s3://` object or prefix. Formats,
from the name or forced with `file_format`: JSONL, JSON array (or JSONL named .json), CSV, TSV
and Parquet, each optionally gzip-compressed (`.gz`). Everything is read as a stream: memory
does not grow with the file (a record larger than `MAX_RECORD_BYTES` is quarantined, not read).

Records (`to_example`), auto-detected per record from its columns or forced with
`record_format`:

| format | columns | becomes |
|---|---|---|
| messages | `messages`: [{role, content}] (system/developer, user, assistant) | the messages |
| sharegpt | `conversations`: [{from, value}] (human/gpt/system) | the messages |
| alpaca | `instruction`, optional `input`, `output`, optional `system` | user, assistant |
| prompt_completion | `prompt`, `completion` (text or message lists) | user, assistant |
| classification | `text`, `label` | text + label name |
| translation | `source`, `target`, `source_lang`, `target_lang` (or a pair) | user, assistant |

A problem becomes a `Rejected` with a reason code and a one-line detail; the reader never
stops at a bad record, so good rows are never lost to a bad neighbour.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import fnmatch
import glob
import gzip
import hashlib
import io
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sftpipe import storage
from sftpipe.data.schemas import Message, Reason
from sftpipe.errors import SftpipeError

MAX_RECORD_BYTES = 64 << 20  # one record (line, array element, CSV row); larger is quarantined
RAW_PREVIEW = 2000  # characters of a rejected record kept in the quarantine

FILE_FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "parquet")
RECORD_FORMATS = (
    "auto",
    "messages",
    "sharegpt",
    "alpaca",
    "prompt_completion",
    "classification",
    "translation",
)
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_GLOB = re.compile(r"[*?\[]")


class Rejected(Exception):
    """A record that cannot become an example: a reason code and a one-line detail."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------
# Where the files are
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One input file: its URI and the name that locations are reported with."""

    uri: str
    name: str


def _data_suffix(name: str) -> str | None:
    base = name[:-3] if name.endswith(".gz") else name
    return _SUFFIXES.get(Path(base).suffix.lower())


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _list_s3_keys(uri: str, prefix: str) -> list[str]:
    bucket, _ = storage.split_s3(uri)
    paginator = storage.s3_client().get_paginator("list_objects_v2")
    pages = storage._s3_call(uri, lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix)))
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def list_sources(uri: str, file_format: str = "auto") -> list[Source]:
    """The input files at `uri`, in a stable (sorted) order. Raises when there are none."""
    if not uri:
        raise SftpipeError("data_uri", "no input data given", "pass --data-uri PATH or s3://...")
    wanted = (lambda rel: True) if file_format != "auto" else (lambda rel: bool(_data_suffix(rel)))
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        if _GLOB.search(key):
            root = key[: _GLOB.search(key).start()].rpartition("/")[0]  # type: ignore[union-attr]
            keys = [k for k in _list_s3_keys(uri, root) if fnmatch.fnmatchcase(k, key)]
            base = f"{root}/" if root else ""
        else:
            keys = _list_s3_keys(uri, key)
            if key in keys:
                return [Source(uri, key.rpartition("/")[2])]
            base = f"{key.rstrip('/')}/" if key else ""
            keys = [k for k in keys if k.startswith(base)]
        found = [
            Source(f"s3://{bucket}/{k}", k[len(base) :])
            for k in keys
            if not k.endswith("/") and not _hidden(k[len(base) :]) and wanted(k[len(base) :])
        ]
        if not found:
            raise SftpipeError(
                uri,
                "no data files under this S3 prefix",
                "check the bucket and prefix (aws s3 ls), or point at one object",
            )
        return found
    if _GLOB.search(uri):
        root = Path(uri[: _GLOB.search(uri).start()].rpartition("/")[0] or ".")  # type: ignore[union-attr]
        paths = sorted(Path(p) for p in glob.glob(uri, recursive=True) if Path(p).is_file())
        found = [Source(str(p), p.relative_to(root).as_posix()) for p in paths]
    else:
        path = Path(uri)
        if path.is_file():
            return [Source(uri, path.name)]
        if not path.is_dir():
            raise SftpipeError(uri, "no such file or directory", "check the path")
        root = path
        found = [
            Source(str(p), p.relative_to(root).as_posix())
            for p in sorted(path.rglob("*"))
            if p.is_file()
            and not _hidden(p.relative_to(root).as_posix())
            and wanted(p.relative_to(root).as_posix())
        ]
    if not found:
        raise SftpipeError(
            uri,
            "no data files found (.jsonl, .json, .csv, .tsv, .parquet, optionally .gz)",
            "check the path, or set --file-format for other file names",
        )
    return found


def shard_sources(sources: list[Source], num_shards: int) -> list[list[Source]]:
    """Split the files into at most `num_shards` groups of similar size (by count, contiguous,
    so that shard order is file order); for `dsl.ParallelFor` fan-out of clean."""
    num_shards = max(1, min(num_shards, len(sources)))
    size, extra = divmod(len(sources), num_shards)
    shards, start = [], 0
    for index in range(num_shards):
        end = start + size + (index < extra)
        shards.append(sources[start:end])
        start = end
    return shards


# ----------------------------------------------------------------------------------------------
# Reading files as streams of raw records
# ----------------------------------------------------------------------------------------------


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
    by_name = _data_suffix(source.name)
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


# ----------------------------------------------------------------------------------------------
# Records -> examples
# ----------------------------------------------------------------------------------------------

_OPENAI_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
LANGUAGE_NAMES = {
    "ar": "Arabic",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fr": "French",
    "hi": "Hindi",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "nl": "Dutch",
    "pt": "Portuguese",
    "ru": "Russian",
    "vi": "Vietnamese",
    "zh": "Chinese",
    "zh-cn": "Simplified Chinese",
    "zh-tw": "Traditional Chinese",
}


@dataclass(frozen=True)
class RecordOptions:
    """What `to_example` needs from the config (picklable, for worker processes)."""

    record_format: str = "auto"
    label_map: tuple[tuple[str, int], ...] = ()
    translation_instruction: str = ""
    translation_languages: tuple[str, str] | None = None


def parse_label_map(value: str) -> dict[str, int]:
    """`neg,pos` -> {"neg": 0, "pos": 1}; a JSON object {"neg": 0, ...} as given; "" -> {}."""
    value = value.strip()
    if not value:
        return {}
    if value.startswith("{"):
        mapping = json.loads(value)
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in mapping.items()
        ):
            raise ValueError("a JSON label map must map label names to integer ids")
        if sorted(mapping.values()) != list(range(len(mapping))):
            raise ValueError("label ids must be 0..N-1, each used once")
        return mapping
    names = [name.strip() for name in value.split(",")]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise ValueError("label names must be non-empty and distinct")
    return {name: index for index, name in enumerate(names)}


def parse_languages(value: str) -> tuple[str, str] | None:
    value = value.strip()
    if not value:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError("write the default translation pair as source,target, e.g. en,zh")
    return parts[0], parts[1]


def detect_record_format(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record and "label" in record:
        return "classification"
    if ("source" in record and "target" in record) or "translation" in record:
        return "translation"
    raise Rejected(
        Reason.MISSING_COLUMNS,
        f"no known record format in columns {sorted(record)[:12]}: expected messages, "
        "conversations, instruction+output, prompt+completion, text+label or source+target",
    )


_REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "translation": ("source", "target"),
}


def _text(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    kind = "null" if value is None else type(value).__name__
    raise Rejected(Reason.WRONG_TYPE, f"{field} is {kind}, expected text")


def _maybe_json_list(value: Any) -> Any:
    """CSV cells and Parquet strings hold message lists as JSON text."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise Rejected(
                Reason.MALFORMED_JSON, f"message list is not valid JSON: {exc}"
            ) from None
    return value


def _content(value: Any, field: str) -> str:
    """OpenAI content: text, or a list of parts of which only text parts are supported."""
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise Rejected(
                    Reason.WRONG_TYPE,
                    f"{field}[{index}] is a {kind!r} part; only text is supported",
                )
            texts.append(_text(part.get("text"), f"{field}[{index}].text"))
        return "\n".join(texts)
    return _text(value, field)


def _messages(value: Any, field: str, key_role: str, key_text: str, roles: dict[str, str]) -> list:
    value = _maybe_json_list(value)
    if not isinstance(value, list):
        raise Rejected(Reason.MISSING_MESSAGES, f"{field} is not a list of messages")
    messages: list[Message] = []
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict) or key_role not in message or key_text not in message:
            raise Rejected(
                Reason.BAD_MESSAGE, f"{where} must be an object with {key_role!r} and {key_text!r}"
            )
        role = message[key_role]
        if not isinstance(role, str) or role.lower() not in roles:
            raise Rejected(
                Reason.UNKNOWN_ROLE,
                f"{where} has {key_role} {role!r}; expected one of {sorted(set(roles))}",
            )
        messages.append(
            {
                "role": roles[role.lower()],
                "content": _content(message[key_text], f"{where}.{key_text}"),
            }
        )
    return messages


def _translation(record: dict[str, Any], options: RecordOptions) -> list[Message]:
    pair = options.translation_languages
    if "translation" in record and isinstance(record["translation"], dict):
        if pair is None:
            raise Rejected(
                Reason.MISSING_COLUMNS,
                "a translation object needs --translation-languages source,target to pick the pair",
            )
        source_lang, target_lang = pair
        texts = record["translation"]
        if source_lang not in texts or target_lang not in texts:
            raise Rejected(
                Reason.MISSING_COLUMNS,
                f"the translation object has {sorted(texts)}, not {source_lang} and {target_lang}",
            )
        source, target = texts[source_lang], texts[target_lang]
    else:
        source, target = record.get("source"), record.get("target")
        source_lang = record.get("source_lang") or record.get("src_lang") or (pair or ("", ""))[0]
        target_lang = record.get("target_lang") or record.get("tgt_lang") or (pair or ("", ""))[1]
        if not source_lang or not target_lang:
            raise Rejected(
                Reason.MISSING_COLUMNS,
                "translation rows need source_lang and target_lang columns "
                "(or --translation-languages source,target)",
            )
    source, target = _text(source, "source"), _text(target, "target")
    names = [
        LANGUAGE_NAMES.get(str(code).lower(), str(code)) for code in (source_lang, target_lang)
    ]
    instruction = options.translation_instruction.format(source_lang=names[0], target_lang=names[1])
    return [
        {"role": "user", "content": f"{instruction}\n\n{source}" if instruction else source},
        {"role": "assistant", "content": target},
    ]


def _label(value: Any, label_map: dict[str, int]) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        kind = "null" if value is None else type(value).__name__
        raise Rejected(Reason.WRONG_TYPE, f"label is {kind}, expected a name or an integer id")
    if not label_map:
        return str(value)
    if isinstance(value, str) and value in label_map:
        return value
    if isinstance(value, int):
        for name, index in label_map.items():
            if index == value:
                return name
    if str(value) in label_map:
        return str(value)
    names = ", ".join(label_map)
    raise Rejected(Reason.UNKNOWN_LABEL, f"label {value!r} is not in the label map ({names})")


def to_example(record: Any, options: RecordOptions) -> dict[str, Any]:
    """One record as `{"messages": [...]}` (chat) or `{"text": ..., "label": name}`
    (classification), not yet normalized. Raises `Rejected`."""
    if not isinstance(record, dict):
        raise Rejected(
            Reason.NOT_AN_OBJECT, f"a record must be an object, not {type(record).__name__}"
        )
    kind = options.record_format
    if kind == "auto":
        kind = detect_record_format(record)
    else:
        missing = [c for c in _REQUIRED[kind] if c not in record]
        if kind == "translation" and "translation" in record:
            missing = []
        if missing:
            raise Rejected(
                Reason.MISSING_COLUMNS,
                f"{kind} records need {', '.join(_REQUIRED[kind])}; missing {', '.join(missing)} "
                f"(columns: {', '.join(sorted(record)[:12])})",
            )
    if kind == "messages":
        return {
            "messages": _messages(record["messages"], "messages", "role", "content", _OPENAI_ROLES)
        }
    if kind == "sharegpt":
        return {
            "messages": _messages(
                record["conversations"], "conversations", "from", "value", _SHAREGPT_ROLES
            )
        }
    if kind == "alpaca":
        instruction = _text(record["instruction"], "instruction")
        extra = record.get("input")
        prompt = instruction
        if extra not in (None, ""):
            prompt = f"{instruction}\n\n{_text(extra, 'input')}"
        messages: list[Message] = []
        if record.get("system") not in (None, ""):
            messages.append({"role": "system", "content": _text(record["system"], "system")})
        messages += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(record["output"], "output")},
        ]
        return {"messages": messages}
    if kind == "prompt_completion":
        prompt, completion = (_maybe_json_list(record[k]) for k in ("prompt", "completion"))
        if isinstance(prompt, list) or isinstance(completion, list):
            return {
                "messages": _messages(prompt, "prompt", "role", "content", _OPENAI_ROLES)
                + _messages(completion, "completion", "role", "content", _OPENAI_ROLES)
            }
        return {
            "messages": [
                {"role": "user", "content": _text(prompt, "prompt")},
                {"role": "assistant", "content": _text(completion, "completion")},
            ]
        }
    if kind == "classification":
        return {
            "text": _text(record["text"], "text"),
            "label": _label(record["label"], dict(options.label_map)),
        }
    return {"messages": _translation(record, options)}
