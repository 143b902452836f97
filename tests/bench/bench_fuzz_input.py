"""The hostile-input fuzz over many seeds, with the figures of docs/data.md: records checked,
tracebacks, records unaccounted for, locations reported twice, records that ended with another
reason than the generator planned.

    .venv/bin/python tests/bench/bench_fuzz_input.py 200
"""

from __future__ import annotations

import collections
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "library" / "data"))

import test_hostile_input as fuzz

from sftpipe.data import raw_records


def main(seeds: int) -> None:
    raw_records.MAX_RECORD_BYTES = fuzz.LIMIT
    counts: collections.Counter[str] = collections.Counter(
        dict.fromkeys(
            [
                "files",
                "cut gzip files",
                "records checked",
                "tracebacks",
                "records unaccounted for",
                "locations reported twice",
                "records with another reason",
            ],
            0,
        )
    )
    planned: collections.Counter[str] = collections.Counter()
    for seed in range(seeds):
        folder = Path(tempfile.mkdtemp(prefix="sftpipe-fuzz-"))
        expected, cut = fuzz.fuzz_folder(seed, folder / "in")
        counts["files"] += sum(1 for _ in (folder / "in").iterdir())
        counts["cut gzip files"] += len(cut)
        try:
            report, ends = fuzz.run_clean(folder / "in", folder)
        except Exception:
            counts["tracebacks"] += 1
            traceback.print_exc()
            continue
        if report.rows_in != report.rows_out + sum(report.dropped.values()):
            counts["runs where rows_in != rows_out + quarantined"] += 1
        seen = collections.Counter(location for location, _ in ends)
        counts["locations reported twice"] += sum(n - 1 for n in seen.values() if n > 1)
        got = dict(ends)
        for location, want in expected.items():
            if any(location.startswith(f"{name}:") for name in cut):
                continue  # a cut stream: what was planned after the break is not there
            counts["records checked"] += 1
            planned[want] += 1
            if location not in got:
                counts["records unaccounted for"] += 1
            elif got[location] != want and not (
                want == fuzz.KEPT and got[location] in fuzz.GOOD_ENDINGS
            ):
                counts["records with another reason"] += 1
        for name in cut:
            mine = [end for location, end in ends if location.startswith(f"{name}:")]
            counts["records checked"] += len(mine)
            if sum(end in ("truncated_file", "corrupt_file") for end in mine) != 1:
                counts["cut files without exactly one fault row"] += 1
    print(f"seeds: {seeds}; " + "; ".join(f"{k}: {v:,}" for k, v in counts.items()))
    print("planned ends:", dict(planned.most_common()))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
