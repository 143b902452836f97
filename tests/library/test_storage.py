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


# --- object keys that would land outside the download folder ---------------------------------
# Keys are what the object store lists under a prefix. SeaweedFS itself refuses keys with a `..`
# segment (InvalidRequest) and folds `//` into `/` (measured: tests below); AWS S3 and other
# stores keep such keys as written. Where a test needs the store to list one, the real listing
# of SeaweedFS is extended with it (`_listing_with`): that is the one part that cannot run here.
HOSTILE_RESTS = ["../../x.txt", "a/../../../x.txt", "/abs/x.txt", "..", "a/.."]


@pytest.mark.parametrize("rest", HOSTILE_RESTS)
def test_path_under_refuses_keys_that_leave_the_folder(tmp_path, rest):
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(SftpipeError) as caught:
        storage.path_under(dest, rest, f"s3://b/m/{rest}")
    message = str(caught.value)
    assert message.startswith(f"s3://b/m/{rest}: the object key maps outside the download folder")
    assert "\n" not in message


def test_path_under_refuses_a_symlink_out_of_the_folder(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "link").symlink_to(tmp_path)
    with pytest.raises(SftpipeError, match="maps outside"):
        storage.path_under(dest, "link/x.txt", "s3://b/m/link/x.txt")


@pytest.mark.parametrize("rest", ["a.txt", "sub/a.txt", "./a.txt", "sub//a.txt", "a..b/c..txt"])
def test_path_under_keeps_ordinary_keys(tmp_path, rest):
    assert storage.path_under(tmp_path, rest, "s3://b/k") == tmp_path / rest


def _listing_with(monkeypatch, extra_keys):
    """storage.list_objects answering the real listing plus `extra_keys` (see above)."""
    real = storage.list_objects

    def listing(uri):
        _bucket, prefix = storage.split_s3(uri)
        return real(uri) + [k for k in extra_keys if k.startswith(prefix.rstrip("/") + "/")]

    monkeypatch.setattr(storage, "list_objects", listing)


def _nothing_written_outside(root, before):
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == before


def test_seaweedfs_round_trip_of_a_prefix_and_its_odd_keys(seaweedfs, s3_env, tmp_path):
    client = storage.s3_client()
    client.put_object(Bucket=s3_env, Key="m/config.json", Body=b"{}")
    client.put_object(Bucket=s3_env, Key="m/sub/w.bin", Body=b"w")
    client.put_object(Bucket=s3_env, Key="m//abs/y.txt", Body=b"y")  # stored as m/abs/y.txt
    for bad in ("m/../../x.txt", "m/a/../../../z.txt"):
        with pytest.raises(Exception, match="InvalidRequest"):
            client.put_object(Bucket=s3_env, Key=bad, Body=b"x")
    copy = storage.local_dir(f"s3://{s3_env}/m", cache_root=tmp_path)
    files = {p.relative_to(copy).as_posix(): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert files == {"config.json": b"{}", "sub/w.bin": b"w", "abs/y.txt": b"y"}


@pytest.mark.parametrize("rest", ["../../escaped.txt", "/escaped-abs.txt"])
def test_models_fetch_refuses_a_hostile_key(seaweedfs, s3_env, tmp_path, monkeypatch, rest):
    from sftpipe.modeling import models

    storage.s3_client().put_object(Bucket=s3_env, Key="base/config.json", Body=b"{}")
    _listing_with(monkeypatch, [f"base/{rest}"])
    monkeypatch.setattr(storage.tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SftpipeError, match="maps outside the download folder") as caught:
        models.fetch(f"s3://{s3_env}/base")
    assert str(caught.value).startswith(f"s3://{s3_env}/base/{rest}: ")
    _nothing_written_outside(tmp_path, [])  # the partial download folder is removed too


def test_checkpoint_fetch_refuses_a_hostile_key(seaweedfs, s3_env, tmp_path, monkeypatch):
    from sftpipe.modeling.checkpoint import CheckpointStore

    store = CheckpointStore(f"s3://{s3_env}/ckpt", keep=2)
    store.save(1, lambda folder: (folder / "weights.bin").write_bytes(b"w"))
    _listing_with(monkeypatch, ["ckpt/step-00000001/../../../../escaped.txt"])
    dest = tmp_path / "resume"
    with pytest.raises(SftpipeError, match="maps outside the download folder"):
        store.latest(dest)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path.parent / "escaped.txt").exists()


# --- the digest clean's KFP cache is keyed on ------------------------------------------------
def test_fingerprint_of_local_files_follows_their_content(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("one\n")
    b.write_text("two\n")
    first = storage.fingerprint([str(a), str(b)])
    assert storage.fingerprint([str(b), str(a)]) == first  # order-free
    assert len(first) == 64
    a.write_text("one, rewritten\n")  # new data at the same path
    assert storage.fingerprint([str(a), str(b)]) != first
    assert storage.fingerprint([str(a)]) != storage.fingerprint([str(a), str(b)])
    with pytest.raises(SftpipeError, match="missing.jsonl: cannot read it"):
        storage.fingerprint([str(tmp_path / "missing.jsonl")])


def test_fingerprint_of_s3_objects_follows_their_etags(seaweedfs, s3_env):
    client = storage.s3_client()
    client.put_object(Bucket=s3_env, Key="data/p-0.jsonl", Body=b"one\n")
    client.put_object(Bucket=s3_env, Key="data/p-1.jsonl", Body=b"two\n")
    uris = [f"s3://{s3_env}/data/p-0.jsonl", f"s3://{s3_env}/data/p-1.jsonl"]
    first = storage.fingerprint(uris)
    assert storage.fingerprint(uris) == first
    client.put_object(Bucket=s3_env, Key="data/p-1.jsonl", Body=b"TWO\n")  # same size, new data
    second = storage.fingerprint(uris)
    assert second != first
    client.put_object(Bucket=s3_env, Key="data/p-1.jsonl", Body=b"two\n")
    assert storage.fingerprint(uris) == first  # ETags are content hashes here
    with pytest.raises(SftpipeError, match="p-9.jsonl: no such object"):
        storage.fingerprint([*uris, f"s3://{s3_env}/data/p-9.jsonl"])


def test_list_files_of_a_folder_and_a_prefix(seaweedfs, s3_env, tmp_path):
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "a.json").write_text("{}")
    (tmp_path / "m" / "sub" / "b.bin").write_bytes(b"b")
    assert storage.list_files(str(tmp_path / "m")) == [
        str(tmp_path / "m" / "a.json"),
        str(tmp_path / "m" / "sub" / "b.bin"),
    ]
    storage.upload_dir(tmp_path / "m", f"s3://{s3_env}/m")
    assert storage.list_files(f"s3://{s3_env}/m") == [
        f"s3://{s3_env}/m/a.json",
        f"s3://{s3_env}/m/sub/b.bin",
    ]
    with pytest.raises(SftpipeError, match="no such directory"):
        storage.list_files(str(tmp_path / "missing"))
