"""Hugging Face datasets as input, read as records like files are (same record formats, same
quarantine, same column mapping):

- a directory written by `datasets`' `save_to_disk`: a `Dataset` (it holds `state.json`), or a
  `DatasetDict` (it holds `dataset_dict.json`; its `train` split is read, or point `data_uri`
  at `DIR/<split>`). Memory-mapped, not loaded. Locations: `DIR:row N`.
- `hf://NAME[/CONFIG][:SPLIT]`: `datasets.load_dataset(NAME, CONFIG, split=SPLIT,
  streaming=True)`, so a large set is never held in memory; SPLIT defaults to `train`. NAME is
  `name` or `org/name`; a third path segment is the config (`hf://org/name/config:test`); a
  path (starting with `/`, `./` or `../`) is a local, script-free folder of data files that
  `datasets` loads the same way (`hf:///data/folder:train`). Locations: `hf://NAME:SPLIT#row N`.

Class-label columns (`ClassLabel` features) are read as their names, not their ids.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from sftpipe import storage
from sftpipe.errors import SftpipeError

HUB_PREFIX = "hf://"
_NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_BATCH = 1024


@dataclass(frozen=True)
class HubDataset:
    """A parsed `hf://` URI."""

    name: str
    config: str | None
    split: str

    @property
    def label(self) -> str:
        """How locations name it: `hf://NAME[/CONFIG]:SPLIT`."""
        config = f"/{self.config}" if self.config else ""
        return f"{HUB_PREFIX}{self.name}{config}:{self.split}"


def is_hub_uri(uri: str) -> bool:
    return uri.startswith(HUB_PREFIX)


def parse_hub_uri(uri: str) -> HubDataset:
    """`hf://org/name/config:split` -> HubDataset("org/name", "config", "split")."""
    rest = uri[len(HUB_PREFIX) :]
    path, _, split = rest.rpartition(":") if ":" in rest else (rest, "", "train")
    split = split or "train"
    if path.startswith(("/", "./", "../")):  # a local folder of data files, for `datasets`
        return HubDataset(path, None, split)
    parts = path.split("/")
    if not 1 <= len(parts) <= 3 or not all(_NAME_PART.fullmatch(p) for p in parts):
        raise SftpipeError(
            uri,
            "not a Hugging Face dataset name",
            "write hf://NAME, hf://ORG/NAME, hf://ORG/NAME/CONFIG, each optionally :SPLIT",
        )
    name = "/".join(parts[:2])
    return HubDataset(name, parts[2] if len(parts) == 3 else None, split)


def saved_dataset_folder(files: Sequence[PurePath]) -> PurePath | None:
    """The first folder among `files` (a listing: local paths or S3 keys) that holds a saved
    dataset's metadata (`state.json` beside `dataset_info.json`, or `dataset_dict.json`)."""
    names = set(files)
    for file in files:
        if file.name == "dataset_dict.json" or (
            file.name == "state.json" and file.with_name("dataset_info.json") in names
        ):
            return file.parent
    return None


def saved_dataset_dir(uri: str) -> Path | None:
    """The `save_to_disk` directory of one split at `uri` (a DatasetDict's `train` split), or
    None when `uri` is not a saved dataset."""
    if storage.is_s3(uri) or is_hub_uri(uri):
        return None
    path = Path(uri)
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return path
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        if "train" in splits:
            return path / "train"
        if len(splits) == 1:
            return path / splits[0]
        raise SftpipeError(
            uri,
            f"a saved DatasetDict with splits {', '.join(splits)} and no train split",
            f"point data_uri at one split's folder, e.g. {path / splits[0]}",
        )
    return None


def _class_labels(features: Any) -> dict[str, Any]:
    """The columns whose values are class ids, with their `ClassLabel` (to read names)."""
    from datasets import ClassLabel

    return {name: f for name, f in (features or {}).items() if isinstance(f, ClassLabel)}


def _named(row: dict[str, Any], labels: dict[str, Any]) -> dict[str, Any]:
    for name, feature in labels.items():
        value = row.get(name)
        if isinstance(value, int) and 0 <= value < feature.num_classes:
            row[name] = feature.int2str(value)
    return row


def read_saved(path: Path, name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, row) for every row of a saved dataset, in order."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, Arrow errors
        raise SftpipeError(
            str(path),
            f"not a readable saved dataset ({_short(exc)})",
            "write it again with Dataset.save_to_disk",
        ) from None
    labels = _class_labels(dataset.features)
    batches = dataset.iter(batch_size=_BATCH)
    number = 0
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # a damaged Arrow file
            raise SftpipeError(
                str(path),
                f"reading row {number + 1} failed ({_short(exc)})",
                "write it again with Dataset.save_to_disk",
            ) from None
        if batch is None:
            return
        columns = list(batch)
        for values in zip(*batch.values(), strict=True):
            number += 1
            yield f"{name}:row {number}", _named(dict(zip(columns, values, strict=True)), labels)


def read_hub(uri: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, row) for every row of an `hf://` dataset, streamed."""
    dataset = parse_hub_uri(uri)
    rows = _load_streaming(uri, dataset)
    labels = _class_labels(getattr(rows, "features", None))
    iterator = iter(rows)
    number = 0
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # a connection lost while streaming, a broken shard
            raise SftpipeError(
                uri, f"reading row {number + 1} failed ({_short(exc)})", _HUB_FIX
            ) from None
        number += 1
        yield f"{dataset.label}#row {number}", _named(dict(row), labels)


_HUB_FIX = (
    "without network access (HF_HUB_OFFLINE=1, or no route to huggingface.co) only cached "
    "datasets load: save it with `datasets` where the Hub is reachable (save_to_disk) and point "
    "data_uri at that folder; otherwise check the name, config and split"
)


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}"


def _load_streaming(uri: str, dataset: HubDataset) -> Any:
    import datasets

    try:
        return datasets.load_dataset(
            dataset.name, dataset.config, split=dataset.split, streaming=True
        )
    except Exception as exc:  # ConnectionError, DatasetNotFoundError, ValueError (bad split)
        raise SftpipeError(uri, f"cannot load it ({_short(exc)})", _HUB_FIX) from None


def digest_rows(rows: Iterator[tuple[str, dict[str, Any]]], sha256: Any) -> Iterator[Any]:
    """Pass rows through, hashing their content (the input digest of a dataset)."""
    for location, row in rows:
        sha256.update(json.dumps(row, sort_keys=True, default=str).encode())
        yield location, row


def fingerprint(uri: str) -> str:
    """What KFP's cache keys clean on for a dataset: its files' sizes and modification times
    (saved datasets, local folders), the Hub's revision of it, or (the revision cannot be
    known offline) a fresh value, so that clean runs again instead of reusing stale output."""
    local = saved_dataset_dir(uri) or (Path(parse_hub_uri(uri).name) if is_hub_uri(uri) else None)
    if local is not None and local.is_dir():
        files = sorted(str(p) for p in local.rglob("*") if p.is_file())
        return hashlib.sha256(f"{uri}\n{storage.fingerprint(files)}".encode()).hexdigest()
    dataset = parse_hub_uri(uri)
    try:
        from huggingface_hub import HfApi

        revision = HfApi().dataset_info(dataset.name).sha
    except Exception:  # offline or unknown: no digest, no cache hit
        revision = f"unknown-{uuid.uuid4().hex}"
    return hashlib.sha256(f"{dataset.label}\n{revision}".encode()).hexdigest()
