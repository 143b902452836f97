"""Where the input is: a single file, a directory (every data file under it), a glob
(`data/*.jsonl`, `s3://bucket/shards/part-*.parquet`) or an `s3://` object or prefix, or a
Hugging Face dataset (a `save_to_disk` folder, `hf://...`: `sftpipe.data.hf`); how the files
are split into shards for a fanned-out clean; and the fingerprint KFP's cache keys clean on.

Hidden files and folders (`.x`, `_SUCCESS`, `_tmp/`) are skipped; with `file_format=auto` only
names with a data suffix (`.jsonl`, `.json`, `.csv`, `.tsv`, `.parquet`, optionally `.gz`) count.
"""

from __future__ import annotations

import fnmatch
import glob
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sftpipe import storage
from sftpipe.data import hf
from sftpipe.errors import SftpipeError

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Source:
    """One input (a file, or a dataset): its URI and the name locations are reported with."""

    uri: str
    name: str


def data_suffix(name: str) -> str | None:
    base = name[:-3] if name.endswith(".gz") else name
    return _SUFFIXES.get(Path(base).suffix.lower())


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _list_s3_keys(uri: str, prefix: str) -> list[str]:
    bucket, _ = storage.split_s3(uri)
    return sorted(storage.list_keys(bucket, prefix, uri))


def list_sources(uri: str, file_format: str = "auto") -> list[Source]:
    """The input files at `uri`, in a stable (sorted) order. Raises when there are none."""
    if not uri:
        raise SftpipeError("data_uri", "no input data given", "pass --data-uri PATH or s3://...")
    if hf.is_hub_uri(uri):
        return [Source(uri, hf.parse_hub_uri(uri).label)]
    saved = hf.saved_dataset_dir(uri)
    if saved is not None:  # a `save_to_disk` folder: one source, named by the folder
        name = Path(uri).name if saved == Path(uri) else f"{Path(uri).name}/{saved.name}"
        return [Source(str(saved), name)]
    wanted = (lambda rel: True) if file_format != "auto" else (lambda rel: bool(data_suffix(rel)))
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        if _GLOB.search(key):
            root = key[: _GLOB.search(key).start()].rpartition("/")[0]  # type: ignore[union-attr]
            keys = [k for k in _list_s3_keys(uri, root) if fnmatch.fnmatchcase(k, key)]
            base = f"{root}/" if root else ""
        else:
            keys = _list_s3_keys(uri, key)
            if key in keys:
                return [Source(uri, key.rpartition("/")[2])]
            base = f"{key.rstrip('/')}/" if key else ""
            keys = [k for k in keys if k.startswith(base)]
        _refuse_saved_datasets(uri, [PurePosixPath(k) for k in keys])
        found = [
            Source(f"s3://{bucket}/{k}", k[len(base) :])
            for k in keys
            if not k.endswith("/") and not _hidden(k[len(base) :]) and wanted(k[len(base) :])
        ]
        if not found:
            raise SftpipeError(
                uri,
                "no data files under this S3 prefix",
                "check the bucket and prefix (aws s3 ls), or point at one object",
            )
        return found
    if _GLOB.search(uri):
        root = Path(uri[: _GLOB.search(uri).start()].rpartition("/")[0] or ".")  # type: ignore[union-attr]
        paths = sorted(Path(p) for p in glob.glob(uri, recursive=True) if Path(p).is_file())
        found = [Source(str(p), p.relative_to(root).as_posix()) for p in paths]
    else:
        path = Path(uri)
        if path.is_file():
            return [Source(uri, path.name)]
        if not path.is_dir():
            raise SftpipeError(uri, "no such file or directory", "check the path")
        root = path
        files = [p for p in sorted(path.rglob("*")) if p.is_file()]
        _refuse_nested_datasets(uri, files)
        found = [
            Source(str(p), p.relative_to(root).as_posix())
            for p in files
            if not _hidden(p.relative_to(root).as_posix())
            and wanted(p.relative_to(root).as_posix())
        ]
    if not found:
        raise SftpipeError(
            uri,
            "no data files found (.jsonl, .json, .csv, .tsv, .parquet, optionally .gz)",
            "check the path, or set --file-format for other file names",
        )
    return found


def _refuse_saved_datasets(uri: str, keys: list[PurePosixPath]) -> None:
    """A saved Hugging Face dataset in S3 would be read as its JSON metadata files (its rows
    are in .arrow files): refused with what to do instead."""
    folder = hf.saved_dataset_folder(keys)
    if folder is not None:
        raise SftpipeError(
            uri,
            f"s3://{storage.split_s3(uri)[0]}/{folder} is a saved Hugging Face dataset "
            "(save_to_disk); sftpipe reads those from a local folder only",
            "write it as Parquet to S3 (Dataset.to_parquet) or copy it to a local/volume path",
        )


def _refuse_nested_datasets(uri: str, files: list[Path]) -> None:
    """A saved dataset inside a folder of files would be read as its JSON metadata files, and
    its rows (in .arrow files) would be left out without a word: refused instead."""
    folder = hf.saved_dataset_folder(files)
    if folder is not None:
        raise SftpipeError(
            uri,
            f"{folder} is a saved Hugging Face dataset inside a folder of data files",
            "point data_uri at the dataset folder itself (one dataset per run)",
        )


def shard_sources(sources: list[Source], num_shards: int) -> list[list[Source]]:
    """Split the files into at most `num_shards` groups of similar size (by count, contiguous,
    so that shard order is file order); for `dsl.ParallelFor` fan-out of clean."""
    num_shards = max(1, min(num_shards, len(sources)))
    size, extra = divmod(len(sources), num_shards)
    shards, start = [], 0
    for index in range(num_shards):
        end = start + size + (index < extra)
        shards.append(sources[start:end])
        start = end
    return shards


def fingerprint(sources: list[Source]) -> str:
    """What KFP's cache keys clean on: the files' metadata (`storage.fingerprint`), or for a
    Hugging Face dataset its own fingerprint (`hf.fingerprint`)."""
    if len(sources) == 1 and (
        hf.is_hub_uri(sources[0].uri) or hf.saved_dataset_dir(sources[0].uri)
    ):
        return hf.fingerprint(sources[0].uri)
    return storage.fingerprint([source.uri for source in sources])
