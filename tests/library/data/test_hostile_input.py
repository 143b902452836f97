"""Hostile input through the real clean stage: every kind of bad input ends as quarantined rows
with a reason code and `file:line` (or as one SftpipeError line naming the file), never as a
traceback, and no row vanishes.

Two tests: a table of bad-input kinds (one file each, good rows around the bad one, all cleaned
in one run), and a seeded fuzz run over mixed good and broken records in every file format
(JSONL, JSON array, CSV, TSV, Parquet, each also gzipped) that accounts for every record.
`SFTPIPE_FUZZ_SEEDS=200` runs more seeds than the default.
"""

from __future__ import annotations

import collections
import csv
import gzip
import io
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftpipe.config import DataConfig
from sftpipe.data import raw_records, streams
from sftpipe.errors import SftpipeError
from sftpipe.stages import clean
from sftpipe.stages.clean import read_jsonl

LIMIT = 256 << 10  # MAX_RECORD_BYTES in these tests, so that "too large" costs little
KEPT = "kept"
# Reasons a good record may still end with (it duplicates another one by chance).
GOOD_ENDINGS = {KEPT, "duplicate", "near_duplicate"}


@pytest.fixture(autouse=True)
def small_limits(monkeypatch):
    monkeypatch.setattr(raw_records, "MAX_RECORD_BYTES", LIMIT)


def chat(text: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Question about {text}?"},
            {"role": "assistant", "content": f"An answer about {text}."},
        ]
    }


def line(record) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode()


def run_clean(folder: Path, out: Path, **config):
    report = clean.run(
        DataConfig(data_uri=str(folder), max_bad_fraction=1.0, num_workers=2, **config),
        out / "cleaned.jsonl",
        out / "quarantine.jsonl",
        out / "report.html",
    )
    ends = [(row["source"], KEPT) for row in read_jsonl(out / "cleaned.jsonl")]
    ends += [(row["source"], row["reason"]) for row in read_jsonl(out / "quarantine.jsonl")]
    return report, ends


# ----------------------------------------------------------------------------------------------
# The table of kinds: name -> (file name, builder). A builder returns the file's bytes and the
# expected end of every record: {line (or "row N"): KEPT or a reason}.
# ----------------------------------------------------------------------------------------------

Built = tuple[bytes, dict[str, str]]


def jsonl_around(bad: bytes, reason: str, tag: str) -> Built:
    """A good line, the bad one, a good line."""
    body = b"\n".join([line(chat(f"{tag} first")), bad, line(chat(f"{tag} last"))]) + b"\n"
    return body, {"1": KEPT, "2": reason, "3": KEPT}


def msgs(*pairs) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


JSONL_LINES: dict[str, tuple[bytes, str]] = {
    "jsonl_malformed": (b'{"messages": [', "malformed_json"),
    "jsonl_trailing_comma": (b'{"messages": [], }', "malformed_json"),
    "jsonl_bad_utf8": (b'{"messages": "caf\xe9"}', "bad_encoding"),
    "jsonl_gbk_bytes": ("这是中文".encode("gbk"), "bad_encoding"),
    "jsonl_nested_100k_arrays": (b"[" * 100_000 + b"]" * 100_000, "nested_too_deep"),
    "jsonl_nested_30k_objects": (b'{"a":' * 30_000 + b"1" + b"}" * 30_000, "nested_too_deep"),
    "jsonl_array_record": (b"[1, 2]", "not_an_object"),
    "jsonl_number_record": (b"42", "not_an_object"),
    "jsonl_string_record": (b'"hello"', "not_an_object"),
    "jsonl_null_record": (b"null", "not_an_object"),
    "jsonl_5000_digit_number": (b'{"n": ' + b"9" * 5000 + b"}", "malformed_json"),
    "jsonl_bom_mid_file": (b"\xef\xbb\xbf" + line(chat("bom")), "malformed_json"),
    "jsonl_missing_columns": (b'{"question": "q"}', "missing_columns"),
    "jsonl_messages_not_list": (b'{"messages": "hi"}', "missing_messages"),
    "jsonl_message_without_content": (b'{"messages": [{"role": "user"}]}', "bad_message"),
    "jsonl_unknown_role": (line(msgs(("robot", "x"))), "unknown_role"),
    "jsonl_content_int": (line(msgs(("user", 3))), "wrong_type"),
    "jsonl_image_part": (
        line(msgs(("user", [{"type": "image_url", "image_url": "x"}]), ("assistant", "a"))),
        "wrong_type",
    ),
    "jsonl_part_not_object": (line(msgs(("user", ["text"]), ("assistant", "a"))), "wrong_type"),
    "jsonl_sharegpt_unknown_from": (
        line({"conversations": [{"from": "alien", "value": "x"}]}),
        "unknown_role",
    ),
    "jsonl_alpaca_float_output": (line({"instruction": "q", "output": 4.5}), "wrong_type"),
    "jsonl_prompt_list_malformed": (
        line({"prompt": '[{"role": "user"', "completion": "a"}),
        "malformed_json",
    ),
    "jsonl_zero_width_only": (line(msgs(("user", " \u200b "))), "empty_conversation"),
    "jsonl_bad_turn_order": (
        line(msgs(("user", "q1"), ("user", "q2"), ("assistant", "a"))),
        "bad_turn_order",
    ),
    "jsonl_no_assistant": (
        line(msgs(("user", "q"), ("assistant", "a"), ("user", "q2"))),
        "no_assistant_turn",
    ),
    "jsonl_line_too_large": (line(chat("x" * (LIMIT + 10))), "record_too_large"),
    "jsonl_lone_surrogate_kept": (
        b'{"messages": [{"role": "user", "content": "a\\ud800b"}, '
        b'{"role": "assistant", "content": "ok surrogate"}]}',
        KEPT,
    ),
    "jsonl_nul_and_controls_kept": (line(chat("nul\x00 and \x01\x7f controls")), KEPT),
}


def jsonl_kind(name: str) -> Callable[[], Built]:
    bad, reason = JSONL_LINES[name]
    return lambda: jsonl_around(bad, reason, name)


def json_array(elements: list[bytes], after: bytes = b"]\n") -> bytes:
    """One element per line: element i starts on line i + 2."""
    return b"[\n" + b",\n".join(elements) + b"\n" + after


def json_kinds(tag: str) -> dict[str, Callable[[], Built]]:
    good = [line(chat(f"{tag} {i}")) for i in range(2)]
    return {
        "json_trailing_rows": lambda: (
            json_array(good, b"]\n" + line(chat(f"{tag} lost")) + b"\n\n" + b"garbage\n"),
            {"2": KEPT, "3": KEPT, "5": "trailing_data", "7": "trailing_data"},
        ),
        "json_trailing_on_bracket_line": lambda: (
            json_array(good, b"] " + line(chat(f"{tag} same line"))),
            {"2": KEPT, "3": KEPT, "4": "trailing_data"},
        ),
        "json_no_closing_bracket": lambda: (
            json_array(good, b""),
            {"2": KEPT, "3": KEPT, "4": "truncated_json"},
        ),
        "json_element_never_ends": lambda: (
            json_array([good[0], b'{"messages": [{"role": "user", "content": "cut'], b""),
            {"2": KEPT, "3": "truncated_json"},
        ),
        # not starting with [: read as JSONL (one object per line, named .json)
        "json_top_level_scalar": lambda: (b"42\n", {"1": "not_an_object"}),
        "json_top_level_garbage": lambda: (b"<html>\n", {"1": "malformed_json"}),
        "json_element_malformed": lambda: (
            json_array([good[0], b'{"n": tru}', good[1]]),
            {"2": KEPT, "3": "malformed_json", "4": KEPT},
        ),
        "json_element_nested_100k": lambda: (
            json_array([good[0], b"[" * 100_000 + b"]" * 100_000, good[1]]),
            {"2": KEPT, "3": "nested_too_deep", "4": KEPT},
        ),
        "json_element_nested_300": lambda: (
            json_array([good[0], b'{"a":' * 300 + b"1" + b"}" * 300, good[1]]),
            {"2": KEPT, "3": "nested_too_deep", "4": KEPT},
        ),
        "json_element_bad_utf8": lambda: (
            json_array([good[0], b'{"messages": "caf\xe9"}', good[1]]),
            {"2": KEPT, "3": "bad_encoding", "4": KEPT},
        ),
        "json_element_too_large_then_more": lambda: (
            json_array([good[0], line(chat("y" * (3 * LIMIT))), good[1]]),
            {"2": KEPT, "3": "record_too_large", "4": KEPT},
        ),
        "json_element_not_object": lambda: (
            json_array([good[0], b"[1, 2]", good[1]]),
            {"2": KEPT, "3": "not_an_object", "4": KEPT},
        ),
        "json_double_comma_kept": lambda: (
            b"[\n" + good[0] + b",\n,\n" + good[1] + b"\n]\n",
            {"2": KEPT, "4": KEPT},
        ),
    }


def csv_file(rows: list[list[str]], delimiter: str = ",") -> bytes:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


def csv_kinds(tag: str) -> dict[str, Callable[[], Built]]:
    head = ["prompt", "completion"]
    first, last = [f"{tag} q1", f"{tag} a1"], [f"{tag} q9", f"{tag} a9"]

    def with_bad(bad: bytes, reason: str, delimiter: str = ",") -> Built:
        """Header, a good row, the bad row (line 3), a good row."""
        body = csv_file([head, first], delimiter) + bad + b"\n" + csv_file([last], delimiter)
        return body, {"2": KEPT, "3": reason, str(4 + bad.count(b"\n")): KEPT}

    return {
        "csv_wrong_field_count": lambda: with_bad(b"only one field", "malformed_row"),
        "csv_bad_utf8": lambda: with_bad(b"caf\xe9,x", "bad_encoding"),
        "csv_row_too_large_fields_small": lambda: with_bad(
            b",".join([b"z" * (LIMIT // 2)] * 3), "record_too_large"
        ),
        "csv_field_too_large": lambda: with_bad(b"z" * (2 * LIMIT) + b",a", "record_too_large"),
        "csv_nested_100k_cell": lambda: with_bad(b"[" * 100_000 + b",a", "nested_too_deep"),
        "csv_malformed_message_list_cell": lambda: with_bad(
            b'"[{""role"": ""user""",a', "malformed_json"
        ),
        "csv_nul_byte_kept": lambda: with_bad(b"nul\x00byte,ok", KEPT),
        "csv_unclosed_quote_last": lambda: (
            csv_file([head, first]) + b'"never closed,\nmore\n',
            {"2": KEPT, "3": "malformed_row"},
        ),
        "csv_header_only": lambda: (b"prompt,completion\n", {}),
        "tsv_wrong_field_count": lambda: with_bad(b"a\tb\tc", "malformed_row", "\t"),
        "tsv_quoted_newlines_kept": lambda: with_bad(b'"multi\nline"\tok', KEPT, "\t"),
    }


def parquet_bytes(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def parquet_kinds(tag: str) -> dict[str, Callable[[], Built]]:
    def rows(bad: dict) -> list[dict]:
        return [chat(f"{tag} a"), bad, chat(f"{tag} b")]

    expect = {"row 1": KEPT, "row 3": KEPT}
    return {
        "parquet_null_content": lambda: (
            parquet_bytes(rows(msgs(("user", None), ("assistant", "a")))),
            {**expect, "row 2": "wrong_type"},
        ),
        "parquet_empty_messages": lambda: (
            parquet_bytes(rows({"messages": []})),
            {**expect, "row 2": "empty_conversation"},
        ),
        "parquet_unknown_role": lambda: (
            parquet_bytes(rows(msgs(("robot", "x")))),
            {**expect, "row 2": "unknown_role"},
        ),
    }


def gzip_kinds(tag: str) -> dict[str, Callable[[], Built]]:
    three = b"".join(line(chat(f"{tag} {i}")) + b"\n" for i in range(3))
    packed = gzip.compress(three)
    kept = {"1": KEPT, "2": KEPT, "3": KEPT}
    array = json_array([line(chat(f"{tag} array {i}")) for i in range(2)])
    table = csv_file([["prompt", "completion"], [f"{tag} q", f"{tag} a"]])
    return {
        # the 8-byte trailer (CRC, size) cut off: every line decompresses, then the stream ends
        "gzip_truncated_trailer": lambda: (packed[:-8], {**kept, "4": "truncated_file"}),
        "gzip_header_only": lambda: (packed[:10], {"1": "truncated_file"}),
        "gzip_bad_crc": lambda: (
            packed[:-8] + b"\0\0\0\0" + packed[-4:],
            {**kept, "4": "corrupt_file"},
        ),
        "gzip_trailing_garbage": lambda: (packed + b"garbage!", {**kept, "4": "corrupt_file"}),
        "gzip_two_members_kept": lambda: (
            packed + gzip.compress(line(chat(f"{tag} 3")) + b"\n"),
            {**kept, "4": KEPT},
        ),
        "gzip_bomb": lambda: (gzip.compress(b"\0" * (100 << 20), 9), {"1": "too_compressed"}),
        "gzip_truncated_json_array": lambda: (
            gzip.compress(array)[:-8],
            {"2": KEPT, "3": KEPT, "5": "truncated_file"},
        ),
        "gzip_truncated_csv": lambda: (
            gzip.compress(table)[:-8],
            {"2": KEPT, "3": "truncated_file"},
        ),
    }


SUFFIX = {"jsonl": ".jsonl", "json": ".json", "csv": ".csv", "tsv": ".tsv", "parquet": ".parquet"}


def all_kinds() -> dict[str, tuple[str, Callable[[], Built]]]:
    """Every kind: its file name and builder (whose good rows carry the kind's name, so that no
    file duplicates another)."""
    kinds: dict[str, tuple[str, Callable[[], Built]]] = {}
    for name in JSONL_LINES:
        kinds[name] = (f"{name}.jsonl", jsonl_kind(name))
    for maker in (json_kinds, csv_kinds, parquet_kinds, gzip_kinds):
        for name in maker(""):
            if maker is gzip_kinds:
                inner = (
                    ".json" if name.endswith("array") else ".csv" if name.endswith("csv") else ""
                )
                file = f"{name}{inner or '.jsonl'}.gz"
            else:
                file = f"{name}{SUFFIX[name.split('_')[0]]}"
            kinds[name] = (file, lambda maker=maker, name=name: maker(name)[name]())
    return kinds


KINDS = all_kinds()


@pytest.fixture(scope="module")
def kinds_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    (folder / "in").mkdir()
    expected: dict[str, str] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(raw_records, "MAX_RECORD_BYTES", LIMIT)
        patch.setattr(streams, "_GZIP_RATIO_GRACE", 1 << 20)
        for file, build in KINDS.values():
            data, ends = build()
            (folder / "in" / file).write_bytes(data)
            expected.update({f"{file}:{where}": end for where, end in ends.items()})
        # without de-duplication: the good rows of a file are alike on purpose
        report, ends = run_clean(folder / "in", folder, dedupe=False)
    return report, expected, ends


def test_at_least_40_kinds_of_bad_input():
    bad = [name for name in KINDS if not name.endswith(("_kept", "_header_only"))]
    assert len(bad) >= 40, len(bad)


@pytest.mark.parametrize("name", list(KINDS))
def test_bad_input_kind_is_quarantined_by_location(kinds_run, name):
    _, expected, ends = kinds_run
    file = KINDS[name][0]
    got = sorted((loc, end) for loc, end in ends if loc.startswith(f"{file}:"))
    want = sorted((loc, end) for loc, end in expected.items() if loc.startswith(f"{file}:"))
    assert got == want


def test_kinds_run_accounts_for_every_row(kinds_run):
    report, _, ends = kinds_run
    locations = collections.Counter(loc for loc, _ in ends)
    assert [loc for loc, n in locations.items() if n > 1] == []
    assert report.rows_in == report.rows_out + sum(report.dropped.values()) == len(ends)


@pytest.mark.parametrize(
    ("name", "data", "words"),
    [
        ("corrupt.parquet", b"PAR1" + b"\0" * 100 + b"PAR1", "not a readable Parquet file"),
        ("cut.parquet", parquet_bytes([chat("p")])[:-20], "not a readable Parquet file"),
        ("cut.parquet.gz", gzip.compress(parquet_bytes([chat("p")]))[:-8], "gzip stream ends"),
        # the header's quote never closes: every row is read into the header
        ("bad_header.csv", b'"a,b\nx,y\n', "no rows in the input"),
        ("mystery.bin", b"\x00\x01binary", "cannot tell the file format"),
    ],
)
def test_unreadable_files_fail_with_one_line(tmp_path, name, data, words):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(SftpipeError) as caught:
        clean.run(DataConfig(data_uri=str(tmp_path / name)), tmp_path / "c", tmp_path / "q")
    message = str(caught.value)
    assert name in message and words in message and "\n" not in message
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------------------------
# Fuzz: seeded mixes of good and broken records in every file format
# ----------------------------------------------------------------------------------------------

ALPHABET = 'abcdefghij klmnop 中文字 émoji🙂 "quoted" back\\slash, comma\ttab <b>x</b> 123'


def text(rng: random.Random) -> str:
    words = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(8, 40)))
    return f"{rng.getrandbits(64):x} {words}"  # the hex makes duplicates unlikely


def good_record(rng: random.Random) -> dict:
    q, a = text(rng), text(rng)
    shape = rng.randrange(4)
    if shape == 0:
        return msgs(("user", q), ("assistant", a))
    if shape == 1:
        return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if shape == 2:
        return {"instruction": q, "input": "", "output": a}
    return {"prompt": q, "completion": a}


def bad_json_line(rng: random.Random) -> tuple[bytes, str]:
    good = line(good_record(rng))
    choices = [
        (good.decode()[: rng.randint(1, len(good.decode()) - 2)].encode(), "malformed_json"),
        (good.replace(b"e", b"\xe9", 1) if b"e" in good else b"\xff", "bad_encoding"),
        (b"[" * rng.randint(5_000, 100_000), "nested_too_deep"),
        (b"[1]", "not_an_object"),
        (line({"other": text(rng)}), "missing_columns"),
        (line(msgs(("wizard", text(rng)))), "unknown_role"),
        (line(msgs(("user", rng.randint(0, 9)))), "wrong_type"),
        (line(msgs(("user", text(rng)))), "no_assistant_turn"),
        (line(msgs(("assistant", text(rng)), ("user", text(rng)))), "bad_turn_order"),
        (line(chat("w" * (LIMIT + rng.randint(1, 999)))), "record_too_large"),
    ]
    bad, reason = rng.choice(choices)
    if reason == "nested_too_deep":
        bad = bad + b"]" * len(bad)
    return bad, reason


def fuzz_jsonl(rng: random.Random) -> Built:
    lines, expected = [], {}
    for _ in range(rng.randint(5, 40)):
        if rng.random() < 0.15:
            lines.append(rng.choice([b"", b"   ", b"\t"]))  # blank: not a record
            continue
        if rng.random() < 0.6:
            lines.append(line(good_record(rng)))
            expected[str(len(lines))] = KEPT
        else:
            bad, reason = bad_json_line(rng)
            lines.append(bad)
            expected[str(len(lines))] = reason
    ending = rng.choice([b"\n", b"\r\n"])
    return ending.join(lines) + rng.choice([ending, b""]), expected


def fuzz_json(rng: random.Random) -> Built:
    elements, expected, number = [], {}, 2
    for _ in range(rng.randint(3, 30)):
        record = good_record(rng)
        pretty = rng.random() < 0.3
        if rng.random() < 0.6:
            data = json.dumps(record, ensure_ascii=False, indent=1 if pretty else None).encode()
            expected[str(number)] = KEPT
        else:
            data, reason = rng.choice(
                [
                    (b'{"n": tru}', "malformed_json"),
                    (b"[" * 400 + b"]" * 400, "nested_too_deep"),
                    (b'{"messages": "caf\xe9"}', "bad_encoding"),
                    (b'"text"', "not_an_object"),
                    (line(chat("v" * (LIMIT + 5))), "record_too_large"),
                    (line({"messages": text(rng)}), "missing_messages"),
                ]
            )
            expected[str(number)] = reason
        elements.append(data)
        number += data.count(b"\n") + 1
    body = json_array(elements)
    if rng.random() < 0.3:  # rows after the closing bracket
        extra = rng.randint(1, 3)
        body += b"".join(line(good_record(rng)) + b"\n" for _ in range(extra))
        for i in range(extra):
            expected[str(number + 1 + i)] = "trailing_data"
    elif rng.random() < 0.2:  # no closing bracket at all
        body = body[: -len(b"]\n")]
        expected[str(body.count(b"\n") + 1)] = "truncated_json"
    return body, expected


def fuzz_csv(rng: random.Random, delimiter: str) -> Built:
    body = csv_file([["prompt", "completion"]], delimiter)
    expected, number = {}, 2
    for _ in range(rng.randint(3, 30)):
        if rng.random() < 0.6:
            record = good_record(rng)
            q, a = (record.get(k) for k in ("prompt", "completion"))
            row = csv_file([[q or text(rng), a or text(rng)]], delimiter)
            reason = KEPT
        else:
            row, reason = rng.choice(
                [
                    (b"lonely" + b"\n", "malformed_row"),
                    (delimiter.encode().join([b"a", b"b", b"c"]) + b"\n", "malformed_row"),
                    (b"caf\xe9" + delimiter.encode() + b"x\n", "bad_encoding"),
                    (
                        delimiter.encode().join([b"u" * (LIMIT // 2)] * 3) + b"\n",
                        "record_too_large",
                    ),
                    (b"[" * 20_000 + delimiter.encode() + b"a\n", "nested_too_deep"),
                ]
            )
        body += row
        expected[str(number)] = reason
        number += row.count(b"\n")
    return body, expected


def fuzz_parquet(rng: random.Random) -> Built:
    rows, expected = [], {}
    for i in range(rng.randint(3, 30)):
        if rng.random() < 0.6:
            rows.append(msgs(("user", text(rng)), ("assistant", text(rng))))
            expected[f"row {i + 1}"] = KEPT
        else:
            row, reason = rng.choice(
                [
                    (msgs(("user", None), ("assistant", "a")), "wrong_type"),
                    (msgs(("robot", text(rng)), ("assistant", "a")), "unknown_role"),
                    (msgs(("user", text(rng)), ("user", "a")), "bad_turn_order"),
                    ({"messages": []}, "empty_conversation"),
                ]
            )
            rows.append(row)
            expected[f"row {i + 1}"] = reason
    return parquet_bytes(rows), expected


FUZZ_FORMATS: dict[str, Callable[[random.Random], Built]] = {
    ".jsonl": fuzz_jsonl,
    ".json": fuzz_json,
    ".csv": lambda rng: fuzz_csv(rng, ","),
    ".tsv": lambda rng: fuzz_csv(rng, "\t"),
    ".parquet": fuzz_parquet,
}


def fuzz_folder(seed: int, folder: Path) -> tuple[dict[str, str], dict[str, int]]:
    """Files of every format (each also gzipped, some gzipped files cut short) with mixed good
    and broken records; returns the expected end of every record, and per cut file the line
    its stream breaks in, at the latest."""
    rng = random.Random(seed)
    expected: dict[str, str] = {}
    cut: dict[str, int] = {}
    folder.mkdir(parents=True)
    for index, (suffix, make) in enumerate(list(FUZZ_FORMATS.items()) * 2):
        data, ends = make(rng)
        name = f"f{index}{suffix}"
        if index >= len(FUZZ_FORMATS):
            name += ".gz"
            packed = gzip.compress(data)
            if suffix in (".jsonl", ".csv") and rng.random() < 0.5:
                cut[name] = data.count(b"\n") + 1
                packed = packed[: rng.randint(10, len(packed) - 1)]
            data = packed
        (folder / name).write_bytes(data)
        expected.update({f"{name}:{where}": end for where, end in ends.items()})
    return expected, cut


SEEDS = range(int(os.environ.get("SFTPIPE_FUZZ_SEEDS", "4")))


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_every_record_is_accounted_for(tmp_path, seed):
    expected, cut = fuzz_folder(seed, tmp_path / "in")
    report, ends = run_clean(tmp_path / "in", tmp_path)  # a traceback fails the test

    assert report.rows_in == report.rows_out + sum(report.dropped.values()) == len(ends)
    counts = collections.Counter(loc for loc, _ in ends)
    assert [loc for loc, n in counts.items() if n > 1] == []  # each location exactly once
    got = dict(ends)
    for name, last_line in cut.items():
        # a cut stream: records before the break as planned, then one fault row, nothing after
        mine = {loc: end for loc, end in got.items() if loc.startswith(f"{name}:")}
        faults = [loc for loc, end in mine.items() if end in ("truncated_file", "corrupt_file")]
        assert len(faults) == 1, mine
        fault_line = int(faults[0].rsplit(":", 1)[1])
        assert fault_line <= last_line
        planned = {
            loc: end
            for loc, end in expected.items()
            if loc.startswith(f"{name}:") and int(loc.rsplit(":", 1)[1]) < fault_line
        }
        assert {loc for loc in mine if loc != faults[0]} == set(planned)
        for loc, end in planned.items():
            assert mine[loc] == end or (end == KEPT and mine[loc] in GOOD_ENDINGS), loc
        for loc in list(expected):
            if loc.startswith(f"{name}:"):
                del expected[loc]
        for loc in mine:
            del got[loc]
    assert sorted(got) == sorted(expected)
    wrong = {
        loc: (want, got[loc])
        for loc, want in expected.items()
        if got[loc] != want and not (want == KEPT and got[loc] in GOOD_ENDINGS)
    }
    assert wrong == {}
