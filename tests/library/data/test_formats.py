"""Readers and record formats: every file format, every way a record can be bad."""

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftpipe.data import formats
from sftpipe.data.formats import (
    RecordOptions,
    Rejected,
    Source,
    list_sources,
    read_records,
    to_example,
)
from sftpipe.errors import SftpipeError

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}


def records(path, file_format="auto"):
    return list(read_records(Source(str(path), path.name), file_format))


def parsed(path, file_format="auto"):
    out = []
    for r in records(path, file_format):
        if r.error:
            out.append((r.location, r.error.value, r.detail))
            continue
        try:
            out.append((r.location, formats.parse_json(r)))
        except Rejected as rejected:
            out.append((r.location, rejected.reason.value, rejected.detail))
    return out


def test_jsonl_with_bom_crlf_bad_bytes_and_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"n": 1}\r\n\r\n{"n": 2}\r\n{"n": "caf\xe9"}\n{"n": \n{"n": 5}')
    got = parsed(path)
    assert got[0] == ("a.jsonl:1", {"n": 1})
    assert got[1] == ("a.jsonl:3", {"n": 2})
    assert got[2][:2] == ("a.jsonl:4", "bad_encoding") and "0xe9 at column 11" in got[2][2]
    assert got[3][:2] == ("a.jsonl:5", "malformed_json")
    assert got[4] == ("a.jsonl:6", {"n": 5})  # no newline at the end: still read


def test_gzip_is_detected_by_content(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"n": 1}\n{"n": 2}\n'))
    assert [p[1] for p in parsed(path)] == [{"n": 1}, {"n": 2}]


def test_a_10_mb_line_is_read_and_a_larger_than_limit_line_is_skipped(tmp_path, monkeypatch):
    big = json.dumps({"text": "x" * (10 << 20), "label": "a"})
    path = tmp_path / "big.jsonl"
    path.write_text(f'{big}\n{{"n": 2}}\n', encoding="utf-8")
    got = parsed(path)
    assert len(got[0][1]["text"]) == 10 << 20 and got[1] == ("big.jsonl:2", {"n": 2})
    monkeypatch.setattr(formats, "MAX_RECORD_BYTES", 1 << 20)
    got = parsed(path)
    assert got[0][:2] == ("big.jsonl:1", "record_too_large") and got[1] == ("big.jsonl:2", {"n": 2})


def test_json_array_elements_with_locations_malformed_and_truncated(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"n": 1},\n {"n": tru},\n {"s": "a]},\\"{"}, \n {"n": 4', encoding="utf-8")
    got = parsed(path)
    assert got[0] == ("a.json:2", {"n": 1})
    assert got[1][:2] == ("a.json:3", "malformed_json")
    assert got[2] == ("a.json:4", {"s": 'a]},"{'})
    assert got[3][:2] == ("a.json:5", "truncated_json") and "never ends" in got[3][2]
    whole = tmp_path / "b.json"
    whole.write_text(json.dumps([CHAT] * 3), encoding="utf-8")
    assert [p[1] for p in parsed(whole)] == [CHAT] * 3
    lines = tmp_path / "c.json"  # JSONL named .json
    lines.write_text(json.dumps(CHAT) + "\n" + json.dumps(CHAT) + "\n", encoding="utf-8")
    assert [p[1] for p in parsed(lines)] == [CHAT] * 2


def test_json_array_is_split_across_read_chunks(tmp_path, monkeypatch):
    rows = [{"i": i, "s": 'é\\"' * (i % 7)} for i in range(3000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    assert [p[1] for p in parsed(path)] == rows


def test_csv_with_embedded_newlines_quotes_and_bad_rows(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(
        b'\xef\xbb\xbfinstruction,output\r\n"Say ""hi""","Hello,\nworld"\r\nonly one field\r\n'
        b"ok,fine\r\n"
    )
    got = parsed(path)
    assert got[0] == ("a.csv:2", {"instruction": 'Say "hi"', "output": "Hello,\nworld"})
    assert got[1][:2] == ("a.csv:4", "malformed_row") and "1 fields" in got[1][2]
    assert got[2] == ("a.csv:5", {"instruction": "ok", "output": "fine"})
    tsv = tmp_path / "a.tsv"
    tsv.write_text("text\tlabel\n好看\tpos\n", encoding="utf-8")
    assert parsed(tsv) == [("a.tsv:2", {"text": "好看", "label": "pos"})]


def test_parquet_and_forced_format(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT, {"prompt": "a", "completion": "b"}]), path)
    got = parsed(path)
    assert got[0][0] == "a.parquet:row 1" and got[0][1]["messages"] == CHAT["messages"]
    other = tmp_path / "data.bin"
    other.write_bytes(path.read_bytes())
    assert len(parsed(other)) == 2  # sniffed from the PAR1 magic
    text = tmp_path / "data.txt"
    text.write_text("a,b\n1,2\n")
    with pytest.raises(SftpipeError, match="cannot tell the file format"):
        records(text)
    assert parsed(text, "csv") == [("data.txt:2", {"a": "1", "b": "2"})]


def test_empty_files(tmp_path):
    for name in ("e.jsonl", "e.json", "e.csv"):
        (tmp_path / name).write_bytes(b"")
        assert records(tmp_path / name) == []


class CountingStream(io.RawIOBase):
    """An endless JSONL stream that counts what was read from it."""

    def __init__(self):
        self.read_bytes = 0
        self.line = (json.dumps(CHAT) + "\n").encode()

    def readable(self):
        return True

    def readinto(self, buffer):
        data = (self.line * (len(buffer) // len(self.line) + 1))[: len(buffer)]
        buffer[: len(data)] = data
        self.read_bytes += len(data)
        return len(data)


def test_reading_streams_without_materializing_the_file(monkeypatch):
    stream = CountingStream()
    monkeypatch.setattr(formats.storage, "open_binary", lambda uri: stream)
    reader = read_records(Source("endless.jsonl", "endless.jsonl"))
    for _ in range(100_000):  # ~7 MB of records from a stream that never ends
        next(reader)
    assert stream.read_bytes < 16 << 20  # read ahead: a few buffers, not the whole input


def test_list_sources_file_dir_glob(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in (
        "d/b.jsonl",
        "d/a.csv.gz",
        "d/sub/c.parquet",
        "d/.hidden.jsonl",
        "d/_SUCCESS",
        "d/notes.txt",
    ):
        (tmp_path / name).write_text("")
    names = [s.name for s in list_sources(str(tmp_path / "d"))]
    assert names == ["a.csv.gz", "b.jsonl", "sub/c.parquet"]
    assert [s.name for s in list_sources(str(tmp_path / "d" / "*.jsonl"))] == ["b.jsonl"]
    assert [s.name for s in list_sources(str(tmp_path / "d" / "b.jsonl"))] == ["b.jsonl"]
    with pytest.raises(SftpipeError, match="no such file or directory"):
        list_sources(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SftpipeError, match="no data files found"):
        list_sources(str(tmp_path / "empty"))
    shards = formats.shard_sources(list_sources(str(tmp_path / "d")), 2)
    assert [[s.name for s in shard] for shard in shards] == [
        ["a.csv.gz", "b.jsonl"],
        ["sub/c.parquet"],
    ]


def test_list_sources_s3(seaweedfs, s3_env):
    client = seaweedfs.client()
    for key in ("data/p1.jsonl", "data/p2.jsonl.gz", "data/x/_tmp.jsonl", "other.jsonl"):
        client.put_object(Bucket=s3_env, Key=key, Body=b"")
    assert [s.name for s in list_sources(f"s3://{s3_env}/data")] == ["p1.jsonl", "p2.jsonl.gz"]
    assert [s.name for s in list_sources(f"s3://{s3_env}/data/p*.jsonl")] == ["p1.jsonl"]
    assert [s.uri for s in list_sources(f"s3://{s3_env}/other.jsonl")] == [
        f"s3://{s3_env}/other.jsonl"
    ]
    with pytest.raises(SftpipeError, match=f"s3://{s3_env}/missing: no data files under"):
        list_sources(f"s3://{s3_env}/missing")


OPTIONS = RecordOptions(translation_instruction="Translate from {source_lang} to {target_lang}.")


@pytest.mark.parametrize(
    ("record", "messages"),
    [
        (
            {"messages": [{"role": "developer", "content": "Be brief."}, *CHAT["messages"]]},
            [("system", "Be brief."), ("user", "Hi"), ("assistant", "Yo")],
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "a"}]},
                    {"role": "assistant", "content": "b"},
                ]
            },
            [("user", "a"), ("assistant", "b")],
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "S"},
                    {"from": "human", "value": "Q"},
                    {"from": "gpt", "value": "A"},
                ]
            },
            [("system", "S"), ("user", "Q"), ("assistant", "A")],
        ),
        (
            {"instruction": "Translate", "input": "bonjour", "output": "hello"},
            [("user", "Translate\n\nbonjour"), ("assistant", "hello")],
        ),
        ({"instruction": "Hi", "input": "", "output": "Yo"}, [("user", "Hi"), ("assistant", "Yo")]),
        ({"prompt": "2+2?", "completion": "4"}, [("user", "2+2?"), ("assistant", "4")]),
        (
            {
                "prompt": json.dumps([{"role": "user", "content": "q"}]),
                "completion": [{"role": "assistant", "content": "a"}],
            },
            [("user", "q"), ("assistant", "a")],
        ),
        (
            {"source": "Hello", "target": "你好", "source_lang": "en", "target_lang": "zh"},
            [("user", "Translate from English to Chinese.\n\nHello"), ("assistant", "你好")],
        ),
    ],
)
def test_record_formats_become_conversations(record, messages):
    example = to_example(record, OPTIONS)
    assert [(m["role"], m["content"]) for m in example["messages"]] == messages


def test_classification_and_label_maps():
    assert to_example({"text": "好看", "label": "pos"}, OPTIONS) == {"text": "好看", "label": "pos"}
    mapped = RecordOptions(label_map=tuple(formats.parse_label_map("neg,pos").items()))
    assert to_example({"text": "t", "label": 1}, mapped)["label"] == "pos"
    with pytest.raises(Rejected) as caught:
        to_example({"text": "t", "label": "meh"}, mapped)
    assert caught.value.reason.value == "unknown_label" and "(neg, pos)" in caught.value.detail
    assert formats.parse_label_map('{"b": 1, "a": 0}') == {"b": 1, "a": 0}
    with pytest.raises(ValueError):
        formats.parse_label_map('{"a": 0, "b": 2}')


@pytest.mark.parametrize(
    ("record", "reason", "words"),
    [
        ([1, 2], "not_an_object", "not list"),
        ({"question": "q"}, "missing_columns", "no known record format"),
        ({"messages": "hi"}, "missing_messages", "not a list"),
        ({"messages": [{"role": "user"}]}, "bad_message", "'role' and 'content'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "unknown_role", "'robot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "wrong_type", "content is int"),
        ({"instruction": "q", "output": 4.5}, "wrong_type", "output is float"),
        ({"text": "t", "label": True}, "wrong_type", "label is bool"),
        ({"source": "a", "target": "b"}, "missing_columns", "source_lang"),
    ],
)
def test_bad_records(record, reason, words):
    with pytest.raises(Rejected) as caught:
        to_example(record, OPTIONS)
    assert caught.value.reason.value == reason and words in caught.value.detail


def test_forced_record_format_names_missing_columns():
    with pytest.raises(Rejected, match="alpaca records need instruction, output; missing output"):
        to_example({"instruction": "x"}, RecordOptions(record_format="alpaca"))
