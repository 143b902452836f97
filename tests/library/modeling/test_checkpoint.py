import json

import pytest

from sftpipe import storage
from sftpipe.errors import SftpipeError
from sftpipe.modeling import checkpoint
from sftpipe.modeling.checkpoint import MANIFEST, CheckpointStore


def writer(text):
    def write(folder):
        (folder / "state.txt").write_text(text)

    return write


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ckpt")
    request.getfixturevalue("seaweedfs")
    bucket = request.getfixturevalue("s3_env")
    return f"s3://{bucket}/runs/abc"


def test_keeps_the_newest_complete_checkpoints(store_uri, tmp_path):
    store = CheckpointStore(store_uri, keep=2)
    assert store.complete_steps() == [] and store.latest(tmp_path) is None
    for step in (5, 10, 15):
        store.save(step, writer(f"at {step}"))
    assert store.complete_steps() == [10, 15]
    latest = store.latest(tmp_path / "dl")
    assert (latest / "state.txt").read_text() == "at 15"
    manifest = json.loads((latest / MANIFEST).read_text())
    assert manifest["step"] == 15 and set(manifest["files"]) == {"state.txt"}


def test_incomplete_and_corrupt_checkpoints_are_never_used(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"), keep=3)
    store.save(5, writer("good"))
    store.save(10, writer("will be corrupted"))
    (tmp_path / "ckpt" / "step-00000010" / "state.txt").write_text("bit rot")
    # A checkpoint that died before its manifest was written:
    (tmp_path / "ckpt" / "step-00000015").mkdir()
    (tmp_path / "ckpt" / "step-00000015" / "state.txt").write_text("half")
    assert store.complete_steps() == [5, 10]
    assert (store.latest(tmp_path) / "state.txt").read_text() == "good"


def test_failed_upload_keeps_the_previous_checkpoint(seaweedfs, s3_env, tmp_path, monkeypatch):
    store = CheckpointStore(f"s3://{s3_env}/runs/x", keep=2)
    store.save(5, writer("good"))
    calls = []

    def broken_upload(path, uri):
        calls.append(uri)
        raise SftpipeError(uri, "connection reset")

    monkeypatch.setattr(storage, "upload_file", broken_upload)
    monkeypatch.setattr(checkpoint.time, "sleep", lambda s: None)
    with pytest.raises(SftpipeError, match="failed after 4 attempts"):
        store.save(10, writer("never published"))
    assert len(calls) == 4  # retried with backoff, then gave up
    monkeypatch.undo()
    assert store.complete_steps() == [5]
    assert (store.latest(tmp_path) / "state.txt").read_text() == "good"


def test_missing_bucket_is_a_clear_error(seaweedfs, s3_env):
    with pytest.raises(SftpipeError, match="checkpoint bucket does not exist"):
        CheckpointStore("s3://no-such-bucket-xyz/ckpt").complete_steps()
