"""Readers: every file format as a stream of raw records, every way a file can be bad."""

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftpipe.data import raw_records, readers, streams
from sftpipe.data.readers import read_records
from sftpipe.data.schemas import Rejected
from sftpipe.data.sources import Source
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
            out.append((r.location, readers.parse_json(r)))
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
    monkeypatch.setattr(raw_records, "MAX_RECORD_BYTES", 1 << 20)
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
    monkeypatch.setattr(streams.storage, "open_binary", lambda uri: stream)
    reader = read_records(Source("endless.jsonl", "endless.jsonl"))
    for _ in range(100_000):  # ~7 MB of records from a stream that never ends
        next(reader)
    assert stream.read_bytes < 16 << 20  # read ahead: a few buffers, not the whole input
