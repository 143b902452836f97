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

Where the parts live: one record and a batch of them (`CleanOptions`, `Stats`, `CleanReport`,
`process_batch`) in `sftpipe.data.cleaning`; pass 2 (`merge`) in `sftpipe.data.shard_merge`;
this stage drives pass 1 and the shards.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftpipe.config import DataConfig
from sftpipe.data import dedupe, parallel
from sftpipe.data.cleaning import CleanOptions, CleanReport, Stats, process_batch
from sftpipe.data.cleaning import conversation_id as conversation_id  # re-exported
from sftpipe.data.raw_records import RawRecord
from sftpipe.data.readers import read_records
from sftpipe.data.shard_merge import (
    KEYS_FILE,
    KINDS_FILE,
    QUARANTINE_FILE,
    ROWS_FILE,
    SIGNATURES_FILE,
    STATS_FILE,
    merge,
)
from sftpipe.data.sources import Source, list_sources, shard_sources

_BATCH_RECORDS, _BATCH_BYTES = 512, 4 << 20
_PROGRESS_SECONDS = 10.0  # between progress lines


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


def read_jsonl(path: str | Path) -> list[Any]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
