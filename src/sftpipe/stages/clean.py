"""clean: raw records in, normalized, validated, de-duplicated examples out.

Reads every input file (`sftpipe.data.sources` finds them: a file, directory, glob or s3://
prefix; `sftpipe.data.readers` reads JSONL, JSON array, CSV/TSV, Parquet, gzip) as a stream, and
turns each record (`sftpipe.data.records`) into the internal example shape: a chat conversation
(`Conversation`) or a classification text + label (`Classified`).
Each example is normalized (`sftpipe.data.text.normalize`), PII is replaced by placeholders
(`sftpipe.data.pii`), empty turns are dropped, and a conversation must read: optional system
prompt, then user and assistant turns alternating, ending with the assistant. Length, turn
and language filters apply; exact and near duplicates (`sftpipe.data.dedupe`) are removed, or with
`dedupe` off kept with a common `group` so that they land on the same side of the split.

Every rejected row goes to the quarantine with a reason code, a one-line detail and its source
location (`file:line`, `file:row N` for Parquet). The step fails only when more than
`max_bad_fraction` of the rows are broken (filters and duplicates not counted), naming the top
reasons and an example.

The work is two passes, which is also how a cluster fans out (`plan_shards`, `run_shard`,
`merge`): pass 1 reads and cleans files (worker processes, batches of records, bounded
read-ahead) into a shard folder holding the candidate rows, their exact-duplicate keys and
MinHash signatures; pass 2 (`merge`) de-duplicates globally over all shards and writes the
cleaned file, so sharding never changes the result. Memory stays bounded: rows stream through
files, signatures are read from their file in chunks, and only a few compact arrays per row
are held (keys, one band's hashes, cluster roots: ~120 bytes per row at the peak).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import shutil
import tempfile
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftpipe import storage
from sftpipe.config import DataConfig
from sftpipe.data import dedupe, langid, parallel, pii
from sftpipe.data.raw_records import PREVIEW_MARGIN, RAW_PREVIEW, RawRecord
from sftpipe.data.readers import parse_json, read_records
from sftpipe.data.records import (
    RecordOptions,
    parse_columns,
    parse_label_map,
    parse_languages,
    to_example,
)
from sftpipe.data.schemas import FILTER_REASONS, Message, QuarantineRow, Reason, Rejected
from sftpipe.data.sources import Source, list_sources, shard_sources
from sftpipe.data.text import normalize
from sftpipe.errors import SftpipeError

ROWS_FILE, SIGNATURES_FILE = "rows.jsonl", "signatures.u32"
KEYS_FILE, KINDS_FILE = "keys.npy", "kinds.npy"
QUARANTINE_FILE, STATS_FILE = "quarantine.jsonl", "stats.json"
_BATCH_RECORDS, _BATCH_BYTES = 512, 4 << 20
_PROGRESS_SECONDS = 10.0  # between progress lines
_ID_PREFIX = '{"id": "'  # every cleaned row starts with its id, then its group: fixed offsets
_GROUP_AT = len(_ID_PREFIX) + 32 + len('", "group": "')


@dataclass(frozen=True)
class CleanOptions:
    """What a worker needs from the config (picklable)."""

    records: RecordOptions
    strip_html: bool
    pii_kinds: tuple[str, ...]
    min_chars: int
    max_chars: int
    max_turn_chars: int
    max_turns: int
    languages: frozenset[str]

    @classmethod
    def from_config(cls, config: DataConfig) -> CleanOptions:
        return cls(
            records=RecordOptions(
                record_format=config.record_format,
                columns=parse_columns(config.columns),
                label_map=tuple(parse_label_map(config.label_map).items()),
                translation_instruction=config.translation_instruction,
                translation_languages=parse_languages(config.translation_languages),
            ),
            strip_html=config.strip_html,
            pii_kinds=pii.parse_kinds(config.scrub_pii),
            min_chars=config.min_chars,
            max_chars=config.max_chars,
            max_turn_chars=config.max_turn_chars,
            max_turns=config.max_turns,
            languages=frozenset(c.strip() for c in config.languages.split(",") if c.strip()),
        )


@dataclass
class Stats:
    """Counts that shards add up: rows, reasons with a first example each, PII, languages,
    labels, and histograms of characters (log2 bins) and turns."""

    rows_in: int = 0
    kept: int = 0
    empty_turns_dropped: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, dict[str, str]] = field(default_factory=dict)
    pii: collections.Counter[str] = field(default_factory=collections.Counter)
    languages: collections.Counter[str] = field(default_factory=collections.Counter)
    labels: collections.Counter[str] = field(default_factory=collections.Counter)
    chars: collections.Counter[int] = field(default_factory=collections.Counter)
    turns: collections.Counter[int] = field(default_factory=collections.Counter)
    tasks: collections.Counter[str] = field(default_factory=collections.Counter)

    def reject(self, reason: str, source: str, detail: str, raw: str) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, {"source": source, "detail": detail, "raw": raw[:500]})

    def add(self, other: Stats) -> None:
        self.rows_in += other.rows_in
        self.kept += other.kept
        self.empty_turns_dropped += other.empty_turns_dropped
        for name in ("dropped", "pii", "languages", "labels", "chars", "turns", "tasks"):
            getattr(self, name).update(getattr(other, name))
        for reason, example in other.examples.items():
            self.examples.setdefault(reason, example)

    def to_json(self) -> dict[str, Any]:
        return {k: dict(v) if isinstance(v, dict) else v for k, v in vars(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stats:
        stats = cls(rows_in=data["rows_in"], kept=data["kept"])
        stats.empty_turns_dropped = data["empty_turns_dropped"]
        stats.examples = data["examples"]
        for name in ("dropped", "pii", "languages", "labels", "tasks"):
            getattr(stats, name).update(data[name])
        for name in ("chars", "turns"):
            getattr(stats, name).update({int(k): v for k, v in data[name].items()})
        return stats


@dataclass
class CleanReport:
    rows_in: int = 0
    rows_out: int = 0
    empty_turns_dropped: int = 0
    task: str = "chat"
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)
    input_digest: str = ""
    output_digest: str = ""
    sources: int = 0
    seconds: float = 0.0

    @property
    def bad_rows(self) -> int:
        return sum(n for r, n in self.dropped.items() if r not in FILTER_REASONS)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_quarantined": sum(self.dropped.values()),
            "rows_bad": self.bad_rows,
            "empty_turns_dropped": self.empty_turns_dropped,
            "input_files": self.sources,
            "seconds": round(self.seconds, 3),
        }
        from sftpipe.data.schemas import TOKENIZE_REASONS

        out.update(
            {
                f"dropped_{reason.value}": self.dropped[reason.value]
                for reason in Reason
                if reason not in TOKENIZE_REASONS
            }
        )
        out.update({f"pii_{kind}": self.stats.pii[kind] for kind in pii.KINDS})
        out.update({f"language_{code}": n for code, n in sorted(self.stats.languages.items())})
        return {k: float(v) for k, v in out.items()}


def conversation_id(messages: list[Message]) -> str:
    blob = json.dumps(messages, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def example_id(example: dict[str, Any]) -> str:
    if "messages" in example:
        return conversation_id(example["messages"])
    blob = json.dumps([example["text"], example["label"]], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# One record
# ----------------------------------------------------------------------------------------------


def _check_turn_order(messages: list[Message]) -> None:
    if not messages:
        raise Rejected(Reason.EMPTY_CONVERSATION, "no non-empty turns")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            order = " -> ".join(m["role"] for m in messages)
            raise Rejected(
                Reason.BAD_TURN_ORDER,
                f"turn {index} is {message['role']}, expected {expected} ({order})",
            )
    if not turns or turns[-1]["role"] != "assistant":
        raise Rejected(
            Reason.NO_ASSISTANT_TURN, "the conversation does not end with an assistant turn"
        )


def clean_example(
    example: dict[str, Any], options: CleanOptions, pii_counts: collections.Counter[str]
) -> tuple[dict[str, Any], int, str]:
    """Normalize, scrub and check one example; returns it, the empty turns dropped and the
    text that near-duplicate detection and the language guess look at. Raises `Rejected`."""
    empty = 0
    if "messages" in example:
        messages: list[Message] = []
        for message in example["messages"]:
            content = normalize(message["content"], options.strip_html)
            if options.pii_kinds:
                content, counts = pii.scrub(content, options.pii_kinds)
                pii_counts.update(counts)
            if not content:
                empty += 1
                continue
            messages.append({"role": message["role"], "content": content})
        _check_turn_order(messages)
        lengths = [len(m["content"]) for m in messages]
        turns = sum(m["role"] != "system" for m in messages)
        cleaned: dict[str, Any] = {"messages": messages}
        text = "\n".join(m["content"] for m in messages)
    else:
        content = normalize(example["text"], options.strip_html)
        if options.pii_kinds:
            content, counts = pii.scrub(content, options.pii_kinds)
            pii_counts.update(counts)
        if not content:
            raise Rejected(Reason.EMPTY_CONVERSATION, "the text is empty after normalization")
        lengths, turns = [len(content)], 1
        cleaned = {"text": content, "label": example["label"]}
        text = content
    total = sum(lengths)
    if total < options.min_chars:
        raise Rejected(Reason.TOO_SHORT, f"{total} characters < min_chars={options.min_chars}")
    if total > options.max_chars:
        raise Rejected(Reason.TOO_LONG, f"{total:,} characters > max_chars={options.max_chars:,}")
    if max(lengths) > options.max_turn_chars:
        raise Rejected(
            Reason.TURN_TOO_LONG,
            f"a turn has {max(lengths):,} characters > max_turn_chars={options.max_turn_chars:,}",
        )
    if turns > options.max_turns:
        raise Rejected(Reason.TOO_MANY_TURNS, f"{turns} turns > max_turns={options.max_turns}")
    return cleaned, empty, text


@dataclass
class BatchResult:
    lines: list[str]
    keys: list[int]
    classification: list[bool]
    signatures: np.ndarray
    quarantine: list[str]
    stats: Stats


def process_batch(options: CleanOptions, records: list[RawRecord]) -> BatchResult:
    """Clean a batch of raw records (runs in a worker process)."""
    stats = Stats()
    lines: list[str] = []
    keys: list[int] = []
    classification: list[bool] = []
    texts: list[str] = []
    quarantine: list[str] = []
    for record in records:
        stats.rows_in += 1
        try:
            if record.error is not None:
                raise Rejected(record.error, record.detail)
            example = to_example(parse_json(record), options.records)
            cleaned, empty, text = clean_example(example, options, stats.pii)
            lang = langid.detect(text)
            if options.languages and lang not in options.languages:
                raise Rejected(
                    Reason.LANGUAGE,
                    f"language {lang} is not in languages={','.join(sorted(options.languages))}",
                )
        except Rejected as rejected:
            # Rejected rows are shown (quarantine, report, MLflow): scrubbed like kept ones.
            kinds = options.pii_kinds
            raw = pii.scrub_shown(record.preview or _raw_text(record), kinds, RAW_PREVIEW)
            detail = pii.scrub_shown(rejected.detail, kinds, len(rejected.detail))
            stats.reject(rejected.reason.value, record.location, detail, raw)
            quarantine.append(
                _dumps(
                    QuarantineRow(
                        source=record.location, reason=rejected.reason.value, detail=detail, raw=raw
                    )
                )
            )
            continue
        row_id = example_id(cleaned)
        row: dict[str, Any] = {"id": row_id, "group": row_id}
        if "label" in cleaned:
            row["label"] = cleaned["label"]
            stats.labels[cleaned["label"]] += 1
        row["lang"] = lang
        row.update((k, v) for k, v in cleaned.items() if k != "label")
        row["source"] = record.location
        lines.append(_dumps(row))
        keys.append(int(row_id[:16], 16))
        classification.append("label" in cleaned)
        texts.append(text)
        stats.kept += 1
        stats.empty_turns_dropped += empty
        stats.tasks["classification" if "label" in cleaned else "chat"] += 1
        stats.languages[lang] += 1
        stats.chars[len(text).bit_length()] += 1
        stats.turns[len(cleaned.get("messages", [1]))] += 1
    return BatchResult(lines, keys, classification, dedupe.signatures(texts), quarantine, stats)


def _raw_text(record: RawRecord) -> str:
    """The record's start as text, a margin longer than shown (scrubbed before the cut)."""
    payload = record.payload
    size = RAW_PREVIEW + PREVIEW_MARGIN
    if isinstance(payload, bytes):
        return payload[: size * 4].decode("utf-8", "replace")[:size]
    try:
        return json.dumps(payload, ensure_ascii=False, default=str)[:size]
    except (TypeError, ValueError, RecursionError):
        try:
            return repr(payload)[:size]
        except RecursionError:
            return f"<a {type(payload).__name__} nested too deep to show>"


def _dumps(row: Any) -> str:
    return json.dumps(row, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# Pass 1: files -> a shard folder
# ----------------------------------------------------------------------------------------------


def _batches(
    sources: Iterable[Source], file_format: str, digests: dict[str, str]
) -> Iterator[list[RawRecord]]:
    batch: list[RawRecord] = []
    size = 0
    for source in sources:
        for record in read_records(source, file_format, digests):
            batch.append(record)
            size += len(record.payload) if isinstance(record.payload, bytes) else 256
            if len(batch) >= _BATCH_RECORDS or size >= _BATCH_BYTES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


@dataclass(frozen=True)
class ShardSummary:
    folder: Path
    rows_in: int
    rows_kept: int


def run_shard(config: DataConfig, sources: list[Source], folder: str | Path) -> ShardSummary:
    """Pass 1 over `sources` into `folder`: candidate rows (JSONL), their exact keys and
    MinHash signatures, the quarantine so far and the counts (stats.json, with digests)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    options = CleanOptions.from_config(config)
    stats = Stats()
    keys = array("Q")
    classification = array("b")
    digests: dict[str, str] = {}
    signature_file = dedupe.SignatureFile(folder / SIGNATURES_FILE)
    signature_file.path.unlink(missing_ok=True)
    batches = _batches(sources, config.file_format, digests)
    with (
        (folder / ROWS_FILE).open("w", encoding="utf-8") as rows,
        (folder / QUARANTINE_FILE).open("w", encoding="utf-8") as bad,
    ):
        work = functools.partial(process_batch, options)
        start = shown = time.perf_counter()
        for result in parallel.ordered_map(work, batches, config.num_workers):
            if time.perf_counter() - shown >= _PROGRESS_SECONDS:
                shown = time.perf_counter()
                print(
                    f"[clean] {stats.rows_in:,} rows | {stats.rows_in / (shown - start):,.0f} "
                    f"rows/s | {len(digests)}/{len(sources)} files read",
                    flush=True,
                )
            rows.writelines(line + "\n" for line in result.lines)
            bad.writelines(line + "\n" for line in result.quarantine)
            keys.extend(result.keys)
            classification.extend(result.classification)
            if result.lines:
                signature_file.append(result.signatures)
            stats.add(result.stats)
    np.save(
        folder / KEYS_FILE, np.frombuffer(keys, dtype=np.uint64) if keys else np.zeros(0, np.uint64)
    )
    np.save(folder / KINDS_FILE, np.frombuffer(classification, dtype=np.int8).astype(bool))
    summary = stats.to_json() | {
        "signature_rows": signature_file.rows,
        "sources": [[s.uri, s.name, digests.get(s.uri, "")] for s in sources],
    }
    (folder / STATS_FILE).write_text(json.dumps(summary, ensure_ascii=False), encoding="utf-8")
    return ShardSummary(folder, stats.rows_in, stats.kept)


def plan_shards(config: DataConfig, num_shards: int) -> list[str]:
    """The input files split into at most `num_shards` groups, each as a JSON string (what a
    `dsl.ParallelFor` iterates over; `run_shard_json` takes one)."""
    sources = list_sources(config.data_uri, config.file_format)
    return [
        json.dumps([[s.uri, s.name] for s in shard]) for shard in shard_sources(sources, num_shards)
    ]


def run_shard_json(config: DataConfig, shard: str, folder: str | Path) -> ShardSummary:
    sources = [Source(uri, name) for uri, name in json.loads(shard)]
    return run_shard(config, sources, folder)


# ----------------------------------------------------------------------------------------------
# Pass 2: shards -> the cleaned file
# ----------------------------------------------------------------------------------------------


class _Signatures:
    """The signatures of several shards, read as one file (copied into one when there are
    several shards)."""

    def __init__(self, folders: list[Path], rows: list[int], scratch: Path) -> None:
        if len(folders) == 1:
            self.path = folders[0] / SIGNATURES_FILE
        else:
            self.path = scratch / SIGNATURES_FILE
            with self.path.open("wb") as out:
                for folder in folders:
                    if (folder / SIGNATURES_FILE).exists():
                        with (folder / SIGNATURES_FILE).open("rb") as part:
                            shutil.copyfileobj(part, out, 1 << 20)
        self.rows = sum(rows)

    def file(self) -> dedupe.SignatureFile:
        return dedupe.SignatureFile(self.path, self.rows)


class _Roots:
    """Where the rows that others point to (cluster roots) start in the shard files, noted
    as the merge pass goes by them (a root always comes before its duplicates), so that a
    duplicate can name its root's id and source by reading that one line again. Memory: the
    sorted root indices and their (shard, offset), 20 bytes per root, instead of the rows."""

    def __init__(self, root: np.ndarray, folders: list[Path]) -> None:
        self.rows = np.unique(root[root != np.arange(root.size)])
        self.shard = np.zeros(self.rows.size, dtype=np.int32)
        self.offset = np.zeros(self.rows.size, dtype=np.int64)
        self.folders = folders
        self.handles: dict[int, Any] = {}
        self.seen = 0
        self.next = int(self.rows[0]) if self.rows.size else -1
        # Popular roots (many duplicates) are read once.
        self.id_and_source = functools.lru_cache(maxsize=4096)(self._read)

    def passing(self, row: int, shard: int, offset: int) -> None:
        """Row `row` starts at byte `offset` of shard `shard` (called for every row, in order)."""
        if row != self.next:
            return
        self.shard[self.seen], self.offset[self.seen] = shard, offset
        self.seen += 1
        self.next = int(self.rows[self.seen]) if self.seen < self.rows.size else -1

    def _read(self, row: int) -> tuple[str, str]:
        at = int(np.searchsorted(self.rows, row))
        shard = int(self.shard[at])
        if shard not in self.handles:
            self.handles[shard] = (self.folders[shard] / ROWS_FILE).open("rb")
        handle = self.handles[shard]
        handle.seek(int(self.offset[at]))
        data = json.loads(handle.readline())
        return data["id"], data["source"]

    def __enter__(self) -> _Roots:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles.values():
            handle.close()


def merge(
    config: DataConfig,
    shard_folders: list[str | Path],
    cleaned_path: str | Path,
    quarantine_path: str | Path,
    report_path: str | Path | None = None,
) -> CleanReport:
    """Pass 2: de-duplicate the shards' rows globally (exact and near), quarantine duplicates
    and rows of another task than the first row's, check the bad fraction, and publish the
    cleaned JSONL, the quarantine JSONL and (optionally) the HTML report atomically."""
    start = time.perf_counter()
    folders = [Path(f) for f in shard_folders]
    stats = Stats()
    key_parts, kind_parts, sig_rows, sources = [], [], [], []
    for folder in folders:
        summary = json.loads((folder / STATS_FILE).read_text(encoding="utf-8"))
        stats.add(Stats.from_json(summary))
        sig_rows.append(summary["signature_rows"])
        sources.extend(summary["sources"])
        key_parts.append(np.load(folder / KEYS_FILE))
        kind_parts.append(np.load(folder / KINDS_FILE))
    keys = np.concatenate(key_parts) if key_parts else np.zeros(0, dtype=np.uint64)
    is_classification = np.concatenate(kind_parts) if kind_parts else np.zeros(0, dtype=bool)
    report = CleanReport(sources=len(sources))
    report.input_digest = (
        sources[0][2]
        if len(sources) == 1
        else hashlib.sha256("".join(f"{n}\t{d}\n" for _, n, d in sources).encode()).hexdigest()
    )
    task_is_classification = bool(is_classification[0]) if is_classification.size else False
    report.task = "classification" if task_is_classification else "chat"
    mixed = is_classification != task_is_classification

    with tempfile.TemporaryDirectory(prefix="sftpipe-merge-") as scratch:
        signatures = _Signatures(folders, sig_rows, Path(scratch))
        sig = signatures.file() if config.near_duplicate_threshold > 0 else None
        keys_for_dedupe = keys.copy()
        keys_for_dedupe[mixed] = np.arange(int(mixed.sum()), dtype=np.uint64) ^ np.uint64(
            0xA5A5A5A5A5A5A5A5
        )  # rows of another task take part in nothing
        root, exact, similarity = dedupe.clusters(
            keys_for_dedupe, sig, config.near_duplicate_threshold
        )
        merge_rejects = Stats()
        with (
            storage.atomic_file(cleaned_path) as cleaned,
            storage.atomic_file(quarantine_path) as bad,
            _Roots(root, folders) as roots,
        ):
            index = 0
            for shard, folder in enumerate(folders):
                with (folder / QUARANTINE_FILE).open(encoding="utf-8") as part:
                    shutil.copyfileobj(part, bad, 1 << 20)
                offset = 0
                with (folder / ROWS_FILE).open("rb") as rows:
                    for raw in rows:
                        i, index = index, index + 1
                        roots.passing(i, shard, offset)
                        offset += len(raw)
                        line = raw.decode("utf-8").rstrip("\n")
                        if mixed[i]:
                            _reject_merged(
                                bad,
                                merge_rejects,
                                line,
                                Reason.MIXED_TASK,
                                f"a {'classification' if is_classification[i] else 'chat'} "
                                f"row in {report.task} data (the first row decides the task)",
                            )
                            continue
                        r = int(root[i])
                        if r != i:
                            group_id, group_source = roots.id_and_source(r)
                            if config.dedupe:
                                reason = Reason.DUPLICATE if exact[i] else Reason.NEAR_DUPLICATE
                                how = (
                                    "same content as"
                                    if exact[i]
                                    else f"~{similarity[i]:.0%} similar (est. Jaccard) to"
                                )
                                _reject_merged(
                                    bad,
                                    merge_rejects,
                                    line,
                                    reason,
                                    f"{how} {group_source} (id {group_id})",
                                )
                                continue
                            line = line[:_GROUP_AT] + group_id + line[_GROUP_AT + 32 :]
                        cleaned.write(line + "\n")
                        report.rows_out += 1
            stats.dropped.update(merge_rejects.dropped)
            for reason, example in merge_rejects.examples.items():
                stats.examples.setdefault(reason, example)
            report.stats = stats
            report.rows_in = stats.rows_in
            report.empty_turns_dropped = stats.empty_turns_dropped
            report.dropped = collections.Counter({r: n for r, n in stats.dropped.items() if n})
            report.examples = {
                r: f"{e['source']}: {e['detail']}" for r, e in stats.examples.items()
            }
            report.seconds = time.perf_counter() - start
            if report_path is not None:
                from sftpipe.data.report import write_clean_report

                write_clean_report(report_path, report, config)
            _check_bad_fraction(config, report)
    report.output_digest = storage.sha256_file(cleaned_path)
    return report


def _reject_merged(handle: Any, stats: Stats, line: str, reason: Reason, detail: str) -> None:
    row = json.loads(line)
    stats.reject(reason.value, row["source"], detail, line)
    handle.write(
        _dumps(
            QuarantineRow(
                source=row["source"],
                reason=reason.value,
                detail=detail,
                raw=line[:RAW_PREVIEW],
            )
        )
        + "\n"
    )


def run(
    config: DataConfig,
    cleaned_path: str | Path,
    quarantine_path: str | Path,
    report_path: str | Path | None = None,
) -> CleanReport:
    """Clean `config.data_uri` into `cleaned_path` (JSONL of `Conversation` or `Classified`),
    `quarantine_path` (JSONL of `QuarantineRow`) and, with `report_path`, an HTML report. All
    are published atomically."""
    start = time.perf_counter()
    sources = list_sources(config.data_uri, config.file_format)
    with tempfile.TemporaryDirectory(prefix="sftpipe-clean-") as scratch:
        run_shard(config, sources, Path(scratch) / "shard")
        report = merge(
            config, [Path(scratch) / "shard"], cleaned_path, quarantine_path, report_path
        )
    report.seconds = time.perf_counter() - start
    return report


def _check_bad_fraction(config: DataConfig, report: CleanReport) -> None:
    if report.rows_in == 0:
        raise SftpipeError(
            config.data_uri, "no rows in the input", "check that the file is not empty"
        )
    bad = report.bad_rows
    if bad / report.rows_in > config.max_bad_fraction or (report.rows_out == 0 and bad):
        top = ", ".join(f"{reason}={n}" for reason, n in report.dropped.most_common(3))
        worst = next(r for r, _ in report.dropped.most_common() if r not in FILTER_REASONS)
        raise SftpipeError(
            config.data_uri,
            f"{bad} of {report.rows_in} rows are bad (> max_bad_fraction="
            f"{config.max_bad_fraction}): {top}; e.g. {report.examples[worst]}",
            "fix the data or raise --max-bad-fraction",
        )
    if report.rows_out == 0:
        top = ", ".join(f"{reason}={n}" for reason, n in report.dropped.most_common(3))
        raise SftpipeError(
            config.data_uri,
            f"all {report.rows_in} rows were filtered out: {top}; "
            f"e.g. {report.examples[report.dropped.most_common(1)[0][0]]}",
            "loosen the filters (min_chars, max_chars, languages, ...)",
        )


def read_jsonl(path: str | Path) -> list[Any]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
