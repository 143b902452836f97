import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftpipe.config import DataConfig
from sftpipe.errors import SftpipeError
from sftpipe.stages import clean
from sftpipe.stages.clean import read_jsonl


def chat(*turns, system=None):
    roles = ["user", "assistant"]
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
    return {"messages": messages}


GOOD = [
    chat("Hi", "Hello!"),
    chat("你好", "你好！有什么可以帮你？", system="Be brief."),
    chat("a", "b", "c", "d"),
]

BAD_LINES = {
    "malformed_json": '{"messages": [',
    "not_an_object": "[1, 2]",
    "missing_columns": '{"question": "q"}',
    "missing_messages": '{"messages": "hi"}',
    "bad_message": '{"messages": [{"role": "user"}]}',
    "wrong_type": '{"messages": [{"role": "user", "content": 3}]}',
    "unknown_role": '{"messages": [{"role": "robot", "content": "x"}]}',
    "empty_conversation": '{"messages": [{"role": "user", "content": " \\u200b "}]}',
    "bad_turn_order": json.dumps(
        {
            "messages": [
                {"role": "user", "content": "q1"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a"},
            ]
        }
    ),
    "no_assistant_turn": json.dumps(chat("q1", "a1", "q2")),
}


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def run(tmp_path, **config):
    report = clean.run(
        DataConfig(**config), tmp_path / "c.jsonl", tmp_path / "q.jsonl", tmp_path / "r.html"
    )
    return report, read_jsonl(tmp_path / "c.jsonl"), read_jsonl(tmp_path / "q.jsonl")


def test_every_reason_is_quarantined_with_its_line(tmp_path):
    lines = [json.dumps(row, ensure_ascii=False) for row in GOOD] + list(BAD_LINES.values())
    lines.append(json.dumps(GOOD[0]))  # exact duplicate
    uri = write(tmp_path / "raw.jsonl", lines)
    report, kept, bad = run(tmp_path, data_uri=uri, max_bad_fraction=0.9)

    assert [row["source"] for row in kept] == ["raw.jsonl:1", "raw.jsonl:2", "raw.jsonl:3"]
    quarantined = {row["reason"]: row for row in bad}
    assert set(quarantined) == set(BAD_LINES) | {"duplicate"}
    for line_number, reason in enumerate(BAD_LINES, start=len(GOOD) + 1):
        assert quarantined[reason]["source"] == f"raw.jsonl:{line_number}"
        assert quarantined[reason]["raw"] == lines[line_number - 1]
    assert quarantined["duplicate"]["detail"].startswith("same content as raw.jsonl:1")
    assert report.rows_in == len(lines) and report.rows_out == 3
    metrics = report.metrics()
    assert metrics["dropped_duplicate"] == 1 and metrics["rows_quarantined"] == len(BAD_LINES) + 1
    assert metrics["rows_bad"] == len(BAD_LINES)
    page = (tmp_path / "r.html").read_text()
    assert "bad_turn_order" in page and "raw.jsonl:" in page and "Languages" in page


def test_long_runs_print_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(clean, "_BATCH_RECORDS", 4)
    monkeypatch.setattr(clean, "_PROGRESS_SECONDS", 0.0)  # a line after every batch
    for name in ("a", "b"):
        rows = [chat(f"{name} question {i}", f"answer {i}") for i in range(20)]
        write(tmp_path / "in" / f"{name}.jsonl", [json.dumps(row) for row in rows])
    run(tmp_path, data_uri=str(tmp_path / "in"), num_workers=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if "rows/s" in line]
    assert len(lines) >= 8 and all(line.startswith("[clean] ") for line in lines)
    assert lines[0].endswith("0/2 files read") and lines[-1].endswith("1/2 files read")
    assert lines[-1].startswith("[clean] 36 rows")  # printed before the tenth batch is counted


def test_text_is_normalized_scrubbed_and_empty_turns_dropped(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "  Ｈｉ\u200b  there, mail me at a.b@example.com "},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": "<p>Hello</p>\r\n\r\n\r\nfriend, call 13812345678"},
        ]
    }
    uri = write(tmp_path / "raw.jsonl", [json.dumps(row)])
    report, (kept,), _ = run(tmp_path, data_uri=uri)
    assert kept["messages"] == [
        {"role": "user", "content": "Hi there, mail me at <EMAIL>"},
        {"role": "assistant", "content": "Hello\n\nfriend, call <PHONE>"},
    ]
    assert kept["lang"] == "en" and kept["group"] == kept["id"]
    assert report.empty_turns_dropped == 1
    assert report.metrics()["pii_email"] == 1 and report.metrics()["pii_phone"] == 1
    _, (raw,), _ = run(tmp_path, data_uri=uri, scrub_pii="none", strip_html=False)
    assert "a.b@example.com" in raw["messages"][0]["content"]
    assert raw["messages"][1]["content"].startswith("<p>Hello</p>")


def test_near_duplicates_are_removed_or_grouped(tmp_path):
    answer = "A list is mutable and a tuple is immutable; both keep their order. " * 3
    near = answer.replace("both keep", "both do keep")
    lines = [
        json.dumps(chat("List vs tuple?", answer)),
        json.dumps(chat("How do I boil an egg?", "Simmer it for nine minutes, then cool it.")),
        json.dumps(chat("List vs tuple?", near)),
        json.dumps(chat(" List vs tuple? ", answer + "\u200b")),  # exact after normalization
    ]
    uri = write(tmp_path / "raw.jsonl", lines)
    _, kept, bad = run(tmp_path, data_uri=uri)
    assert [r["source"] for r in kept] == ["raw.jsonl:1", "raw.jsonl:2"]
    assert {(b["source"], b["reason"]) for b in bad} == {
        ("raw.jsonl:3", "near_duplicate"),
        ("raw.jsonl:4", "duplicate"),
    }
    assert "similar (est. Jaccard) to raw.jsonl:1" in next(
        b["detail"] for b in bad if b["reason"] == "near_duplicate"
    )
    _, kept, _ = run(tmp_path, data_uri=uri, dedupe=False)
    assert len(kept) == 4 and kept[2]["group"] == kept[3]["group"] == kept[0]["id"]
    assert kept[1]["group"] == kept[1]["id"]
    _, kept, _ = run(tmp_path, data_uri=uri, near_duplicate_threshold=0.0)
    assert len(kept) == 3  # exact duplicates only


def test_filters(tmp_path):
    lines = [
        json.dumps(chat("Hi", "Hello there!")),
        json.dumps(chat("你好", "你好，很高兴认识你。")),
        json.dumps(chat("x" * 50, "y")),
        json.dumps(chat("q", "a", "q", "a", "q", "a")),
    ]
    uri = write(tmp_path / "raw.jsonl", lines)
    _, kept, bad = run(tmp_path, data_uri=uri, languages="zh")
    assert [r["source"] for r in kept] == ["raw.jsonl:2"]
    assert {b["reason"] for b in bad} == {"language"}
    _, kept, bad = run(tmp_path, data_uri=uri, max_turn_chars=40, max_turns=4, min_chars=4)
    assert {b["source"]: b["reason"] for b in bad} == {
        "raw.jsonl:3": "turn_too_long",
        "raw.jsonl:4": "too_many_turns",
    }
    _, _, bad = run(tmp_path, data_uri=uri, max_chars=12, min_chars=7)
    assert {b["source"]: b["reason"] for b in bad} == {
        "raw.jsonl:1": "too_long",
        "raw.jsonl:3": "too_long",
        "raw.jsonl:4": "too_short",
    }
    with pytest.raises(SftpipeError, match="all 4 rows were filtered out"):
        run(tmp_path, data_uri=uri, languages="ko")


def test_too_many_bad_rows_fail_without_publishing(tmp_path):
    lines = [json.dumps(GOOD[0]), "{nope", "{nope", '{"messages": 1}']
    uri = write(tmp_path / "raw.jsonl", lines)
    with pytest.raises(SftpipeError) as caught:
        clean.run(
            DataConfig(data_uri=uri, max_bad_fraction=0.5),
            tmp_path / "c.jsonl",
            tmp_path / "q.jsonl",
        )
    message = str(caught.value)
    assert "\n" not in message
    assert "3 of 4 rows are bad" in message and "malformed_json=2" in message
    assert "raw.jsonl:2" in message and "--max-bad-fraction" in message
    assert not (tmp_path / "c.jsonl").exists() and not (tmp_path / "q.jsonl").exists()


def test_empty_and_missing_inputs(tmp_path, seaweedfs, s3_env):
    empty = write(tmp_path / "empty.jsonl", [])
    with pytest.raises(SftpipeError, match="empty.jsonl: no rows in the input"):
        clean.run(DataConfig(data_uri=empty), tmp_path / "c", tmp_path / "q")
    (tmp_path / "zero.jsonl").write_bytes(b"")
    with pytest.raises(SftpipeError, match="no rows in the input"):
        clean.run(DataConfig(data_uri=str(tmp_path / "zero.jsonl")), tmp_path / "c", tmp_path / "q")
    with pytest.raises(SftpipeError, match="missing.jsonl: no such file"):
        clean.run(
            DataConfig(data_uri=str(tmp_path / "missing.jsonl")), tmp_path / "c", tmp_path / "q"
        )
    with pytest.raises(SftpipeError, match=f"s3://{s3_env}/nope/: no data files under"):
        clean.run(DataConfig(data_uri=f"s3://{s3_env}/nope/"), tmp_path / "c", tmp_path / "q")
    with pytest.raises(SftpipeError, match="no input data given"):
        clean.run(DataConfig(), tmp_path / "c", tmp_path / "q")


def test_bad_inputs_keep_every_good_row(tmp_path):
    """One folder with every kind of bad input next to good rows: each bad record is named by
    file and line, and every good row survives."""
    folder = tmp_path / "data"
    folder.mkdir()
    good = json.dumps(GOOD[0])
    (folder / "a.jsonl").write_bytes(
        b"\xef\xbb\xbf" + good.encode() + b"\r\n" + b'{"messages": [{"role": "user", '
        b'"content": "caf\xe9"}]}\r\n' + json.dumps(chat("q", "a")).encode() + b"\r\n"
    )
    (folder / "b.json").write_text(
        "[" + json.dumps(chat("one", "1")) + ",\n" + json.dumps(chat("two", "2"))[:-5],
        encoding="utf-8",
    )
    (folder / "c.csv").write_text(
        'prompt,completion\n"Say ""hi""\nplease","Hi,\nthere"\nlonely\n',
        encoding="utf-8",
    )
    (folder / "d.jsonl").write_text(
        json.dumps({"text": "x" * (10 << 20), "label": "a"}) + "\n", encoding="utf-8"
    )
    (folder / "e.jsonl").write_text("", encoding="utf-8")
    report, kept, bad = run(tmp_path, data_uri=str(folder), max_bad_fraction=1.0)
    assert [r["source"] for r in kept] == ["a.jsonl:1", "a.jsonl:3", "b.json:1", "c.csv:2"]
    assert kept[3]["messages"][0]["content"] == 'Say "hi"\nplease'
    got = {b["source"]: b["reason"] for b in bad}
    assert got == {
        "a.jsonl:2": "bad_encoding",
        "b.json:2": "truncated_json",
        "c.csv:5": "malformed_row",  # the record before spans lines 2-4
        "d.jsonl:1": "too_long",  # 10 MB of text > max_chars
    }
    assert report.sources == 5


def test_every_file_format_and_gzip(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [chat(f"q{i}", f"a{i}") for i in range(4)]
    (folder / "1.jsonl.gz").write_bytes(gzip.compress((json.dumps(rows[0]) + "\n").encode()))
    (folder / "2.json").write_text(json.dumps([rows[1]]), encoding="utf-8")
    (folder / "3.tsv").write_text("instruction\toutput\nq2\ta2\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([rows[3]]), folder / "4.parquet")
    _, kept, _ = run(tmp_path, data_uri=str(folder))
    assert [r["messages"] for r in kept] == [r["messages"] for r in rows]
    assert [r["source"] for r in kept] == ["1.jsonl.gz:1", "2.json:1", "3.tsv:2", "4.parquet:row 1"]


def test_classification_and_translation_records(tmp_path):
    lines = [
        json.dumps({"text": "这部电影很好看", "label": "pos"}, ensure_ascii=False),
        json.dumps({"text": "Terrible.", "label": 0}),
        json.dumps({"text": "Meh.", "label": "neutral"}),
    ]
    uri = write(tmp_path / "cls.jsonl", lines)
    report, kept, bad = run(tmp_path, data_uri=uri, label_map="neg,pos", max_bad_fraction=0.5)
    assert report.task == "classification"
    assert [(r["text"], r["label"]) for r in kept] == [
        ("这部电影很好看", "pos"),
        ("Terrible.", "neg"),
    ]
    assert list(kept[0])[:3] == ["id", "group", "label"]
    assert bad[0]["reason"] == "unknown_label" and bad[0]["source"] == "cls.jsonl:3"
    uri = write(tmp_path / "tr.jsonl", [json.dumps({"source": "Good morning", "target": "早上好"})])
    _, (kept,), _ = run(tmp_path, data_uri=uri, translation_languages="en,zh")
    assert kept["messages"][0]["content"].endswith("from English to Chinese.\n\nGood morning")


def test_parallel_and_sharded_runs_give_the_same_bytes(tmp_path):
    lines = [
        json.dumps(chat(f"question {i % 2000}", f"answer {i % 2000} " * 3)) for i in range(4000)
    ]
    lines[7] = "{broken"
    half = len(lines) // 2
    data = tmp_path / "data"
    data.mkdir()
    write(data / "p1.jsonl", lines[:half])
    write(data / "p2.jsonl", lines[half:])
    config = DataConfig(data_uri=str(data), num_workers=2)
    clean.run(config, tmp_path / "a.jsonl", tmp_path / "qa.jsonl")
    clean.run(config.model_copy(update={"num_workers": 1}), tmp_path / "b.jsonl", tmp_path / "qb")
    shards = clean.plan_shards(config, 2)
    assert len(shards) == 2
    folders = []
    for index, shard in enumerate(shards):
        clean.run_shard_json(config, shard, tmp_path / f"shard{index}")
        folders.append(tmp_path / f"shard{index}")
    report = clean.merge(config, folders, tmp_path / "m.jsonl", tmp_path / "qm.jsonl")
    expected = (tmp_path / "a.jsonl").read_bytes()
    assert (tmp_path / "b.jsonl").read_bytes() == expected
    assert (tmp_path / "m.jsonl").read_bytes() == expected
    # every row of p2 repeats one of p1: found across shards
    assert report.dropped["duplicate"] == 1999 and report.dropped["malformed_json"] == 1


def test_reads_s3_and_digests_are_stable(seaweedfs, s3_env, tmp_path):
    body = ("\n".join(json.dumps(row, ensure_ascii=False) for row in GOOD) + "\n").encode()
    seaweedfs.client().put_object(Bucket=s3_env, Key="data/chat.jsonl", Body=body)
    config = DataConfig(data_uri=f"s3://{s3_env}/data/chat.jsonl")
    first = clean.run(config, tmp_path / "a.jsonl", tmp_path / "qa.jsonl")
    local = write(tmp_path / "chat.jsonl", body.decode().splitlines())
    second = clean.run(DataConfig(data_uri=local), tmp_path / "b.jsonl", tmp_path / "qb.jsonl")
    assert first.rows_out == 3
    import hashlib

    assert first.input_digest == second.input_digest == hashlib.sha256(body).hexdigest()
    assert first.output_digest == second.output_digest
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    prefix = clean.run(
        DataConfig(data_uri=f"s3://{s3_env}/data"), tmp_path / "p.jsonl", tmp_path / "qp.jsonl"
    )
    assert prefix.rows_out == 3
