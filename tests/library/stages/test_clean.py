import json

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
    "missing_messages": '{"conversations": []}',
    "bad_message": '{"messages": [{"role": "user", "content": 3}]}',
    "unknown_role": '{"messages": [{"role": "robot", "content": "x"}]}',
    "empty_conversation": '{"messages": [{"role": "user", "content": " \\u200b "}]}',
    "bad_turn_order": json.dumps(
        chat("q1", "a1")["messages"][:1] * 2 + [{"role": "assistant", "content": "a"}]
    ).join(['{"messages": ', "}"]),
    "no_assistant_turn": json.dumps(chat("q1", "a1", "q2")),
}


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_every_reason_is_quarantined_with_its_line(tmp_path):
    lines = [json.dumps(row, ensure_ascii=False) for row in GOOD] + list(BAD_LINES.values())
    lines.append(json.dumps(GOOD[0]))  # exact duplicate
    uri = write(tmp_path / "raw.jsonl", lines)
    report = clean.run(
        DataConfig(data_uri=uri, max_bad_fraction=0.9),
        tmp_path / "clean.jsonl",
        tmp_path / "bad.jsonl",
    )

    kept = read_jsonl(tmp_path / "clean.jsonl")
    assert [row["source"] for row in kept] == ["raw.jsonl:1", "raw.jsonl:2", "raw.jsonl:3"]
    quarantined = {row["reason"]: row for row in read_jsonl(tmp_path / "bad.jsonl")}
    assert set(quarantined) == set(BAD_LINES) | {"duplicate"}
    for line_number, reason in enumerate(BAD_LINES, start=len(GOOD) + 1):
        assert quarantined[reason]["source"] == f"raw.jsonl:{line_number}"
        assert quarantined[reason]["raw"] == lines[line_number - 1]
    assert report.rows_in == len(lines) and report.rows_out == 3
    metrics = report.metrics()
    assert metrics["dropped_duplicate"] == 1 and metrics["rows_quarantined"] == len(BAD_LINES) + 1


def test_text_is_normalized_and_empty_turns_dropped(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "  Ｈｉ\u200b  there "},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": "Hello\r\n\r\n\r\nfriend"},
        ]
    }
    uri = write(tmp_path / "raw.jsonl", [json.dumps(row)])
    report = clean.run(DataConfig(data_uri=uri), tmp_path / "c.jsonl", tmp_path / "q.jsonl")
    (kept,) = read_jsonl(tmp_path / "c.jsonl")
    assert kept["messages"] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello\n\nfriend"},
    ]
    assert report.empty_turns_dropped == 1


def test_dedupe_after_normalization_can_be_disabled(tmp_path):
    lines = [json.dumps(chat("Hi", "Yo")), json.dumps(chat(" Hi ", "Yo\u200b"))]
    uri = write(tmp_path / "raw.jsonl", lines)
    on = clean.run(DataConfig(data_uri=uri), tmp_path / "a.jsonl", tmp_path / "qa.jsonl")
    off = clean.run(
        DataConfig(data_uri=uri, dedupe=False), tmp_path / "b.jsonl", tmp_path / "qb.jsonl"
    )
    assert (on.rows_out, off.rows_out) == (1, 2)


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


def test_empty_and_missing_inputs(tmp_path):
    empty = write(tmp_path / "empty.jsonl", [])
    with pytest.raises(SftpipeError, match="empty.jsonl: no rows in the input"):
        clean.run(DataConfig(data_uri=empty), tmp_path / "c", tmp_path / "q")
    with pytest.raises(SftpipeError, match="missing.jsonl: no such file"):
        clean.run(
            DataConfig(data_uri=str(tmp_path / "missing.jsonl")), tmp_path / "c", tmp_path / "q"
        )
    with pytest.raises(SftpipeError, match="no input data given"):
        clean.run(DataConfig(), tmp_path / "c", tmp_path / "q")


def test_reads_s3_and_digests_are_stable(seaweedfs, s3_env, tmp_path):
    body = ("\n".join(json.dumps(row, ensure_ascii=False) for row in GOOD) + "\n").encode()
    seaweedfs.client().put_object(Bucket=s3_env, Key="data/chat.jsonl", Body=body)
    config = DataConfig(data_uri=f"s3://{s3_env}/data/chat.jsonl")
    first = clean.run(config, tmp_path / "a.jsonl", tmp_path / "qa.jsonl")
    local = write(tmp_path / "chat.jsonl", body.decode().splitlines())
    second = clean.run(DataConfig(data_uri=local), tmp_path / "b.jsonl", tmp_path / "qb.jsonl")
    assert first.rows_out == 3
    assert first.input_digest == second.input_digest
    assert first.output_digest == second.output_digest
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
