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


def test_rng_state_round_trips_every_generator_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np
    import torch

    from sftpipe.modeling.checkpoint import rank_rng_state, rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian is part of NumPy's state
    torch.save([rng_state()], tmp_path / "trainer.pt")
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)

    saved = torch.load(tmp_path / "trainer.pt", weights_only=True)
    state, exact = rank_rng_state(saved, rank=0, size=1)
    set_rng_state(state)
    assert exact
    drawn = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert drawn[:2] == expected[:2] and torch.equal(drawn[2], expected[2])


def test_each_rank_gets_its_own_state_and_other_process_counts_are_flagged():
    import torch

    from sftpipe.modeling.checkpoint import rank_rng_state

    saved = ["rank0", "rank1"]
    assert rank_rng_state(saved, 1, 2) == ("rank1", True)
    assert rank_rng_state(saved, 2, 3) == ("rank0", False)  # 3 processes resuming 2
    older = torch.get_rng_state()  # checkpoints before per-rank states: one CPU state
    assert rank_rng_state(older, 0, 1) == (older, True)
    assert rank_rng_state(older, 1, 2)[1] is False
