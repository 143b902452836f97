"""Sources: where the input files are (file, directory, glob, s3:// object or prefix)."""

import pytest

from sftpipe.data.sources import list_sources, shard_sources
from sftpipe.errors import SftpipeError


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
    shards = shard_sources(list_sources(str(tmp_path / "d")), 2)
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


def test_a_saved_dataset_in_s3_is_refused_not_read_as_json(seaweedfs, s3_env, tmp_path):
    """Its rows are in .arrow files; its JSON metadata would pass for data files."""
    import datasets

    datasets.Dataset.from_list([{"text": "hi", "label": "a"}]).save_to_disk(str(tmp_path / "ds"))
    for path in (tmp_path / "ds").iterdir():
        seaweedfs.client().upload_file(str(path), s3_env, f"saved/ds/{path.name}")
    for uri in (f"s3://{s3_env}/saved/ds", f"s3://{s3_env}/saved", f"s3://{s3_env}/saved/*/*"):
        with pytest.raises(SftpipeError, match=f"s3://{s3_env}/saved/ds is a saved Hugging Face"):
            list_sources(uri)
