"""Pass 2 of clean (`merge`): the shard folders that pass 1 (`sftpipe.stages.clean.run_shard`)
wrote, de-duplicated globally (exact and near) into the cleaned file and the quarantine, and the
bad-fraction check. Also the shard folder's file names, which both passes share."""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sftpipe import storage
from sftpipe.config import DataConfig
from sftpipe.data import dedupe
from sftpipe.data.cleaning import CleanReport, Stats, dump_row
from sftpipe.data.raw_records import RAW_PREVIEW
from sftpipe.data.schemas import FILTER_REASONS, QuarantineRow, Reason
from sftpipe.errors import SftpipeError

ROWS_FILE, SIGNATURES_FILE = "rows.jsonl", "signatures.u32"
KEYS_FILE, KINDS_FILE = "keys.npy", "kinds.npy"
QUARANTINE_FILE, STATS_FILE = "quarantine.jsonl", "stats.json"
_ID_PREFIX = '{"id": "'  # every cleaned row starts with its id, then its group: fixed offsets
_GROUP_AT = len(_ID_PREFIX) + 32 + len('", "group": "')


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
            check_bad_fraction(config, report)
    report.output_digest = storage.sha256_file(cleaned_path)
    return report


def _reject_merged(handle: Any, stats: Stats, line: str, reason: Reason, detail: str) -> None:
    row = json.loads(line)
    stats.reject(reason.value, row["source"], detail, line)
    handle.write(
        dump_row(
            QuarantineRow(
                source=row["source"],
                reason=reason.value,
                detail=detail,
                raw=line[:RAW_PREVIEW],
            )
        )
        + "\n"
    )


def check_bad_fraction(config: DataConfig, report: CleanReport) -> None:
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
