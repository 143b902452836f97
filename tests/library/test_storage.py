import pytest

from sftpipe import storage
from sftpipe.errors import SftpipeError


def test_atomic_file_publishes_only_on_success(tmp_path):
    target = tmp_path / "out.jsonl"
    with storage.atomic_file(target) as handle:
        handle.write("ok\n")
    assert target.read_text() == "ok\n"
    with pytest.raises(RuntimeError), storage.atomic_file(target) as handle:
        handle.write("half")
        raise RuntimeError("step died")
    assert target.read_text() == "ok\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_atomic_dir_replaces_whole_directory(tmp_path):
    target = tmp_path / "model"
    with storage.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), storage.atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("died")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_iter_lines_local_handles_crlf(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"a\r\nb\n\nc")
    assert list(storage.iter_lines(str(path))) == [(1, b"a"), (2, b"b"), (3, b""), (4, b"c")]


def test_missing_local_file_names_it(tmp_path):
    with pytest.raises(SftpipeError, match="nope.jsonl: no such file"):
        list(storage.iter_lines(str(tmp_path / "nope.jsonl")))


def test_s3_round_trip_and_errors(seaweedfs, s3_env, tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("line1\nline2\n")
    (folder / "sub" / "w.safetensors").write_bytes(b"weights")
    storage.upload_dir(folder, f"s3://{s3_env}/prefix")
    assert list(storage.iter_lines(f"s3://{s3_env}/prefix/a.txt")) == [(1, b"line1"), (2, b"line2")]
    copy = storage.local_dir(f"s3://{s3_env}/prefix", cache_root=tmp_path)
    assert (copy / "sub" / "w.safetensors").read_bytes() == b"weights"
    light = storage.local_dir(f"s3://{s3_env}/prefix", tmp_path, skip_suffixes=(".safetensors",))
    assert not (light / "sub" / "w.safetensors").exists()

    with pytest.raises(SftpipeError, match="no such object"):
        list(storage.iter_lines(f"s3://{s3_env}/prefix/missing.jsonl"))
    with pytest.raises(SftpipeError, match="bucket does not exist"):
        list(storage.iter_lines("s3://no-such-bucket-here/x.jsonl"))
    with pytest.raises(SftpipeError, match="no objects under this prefix"):
        storage.local_dir(f"s3://{s3_env}/empty-prefix")
