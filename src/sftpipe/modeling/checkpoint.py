"""Resumable training checkpoints in a local folder or under an s3:// prefix.

Layout: `<uri>/step-00000120/` holds the files of one checkpoint and a `MANIFEST.json` with
each file's size and sha256. The manifest is written last (uploaded after every part, or the
folder renamed into place locally), so a checkpoint without one is incomplete and never used:
a crash or a failed upload mid-checkpoint leaves the previous one as the newest good one. Only
the newest `keep` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftpipe import storage
from sftpipe.errors import SftpipeError

MANIFEST = "MANIFEST.json"
PREFIX = "step-"


def _name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _step_of(name: str) -> int | None:
    digits = name.removeprefix(PREFIX)
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else None


def _retry(action: Callable[[], None], what: str, attempts: int = 4, delay: float = 1.0) -> None:
    """Retry transient object-store failures with exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            action()
            return
        except SftpipeError as exc:
            if attempt == attempts:
                raise SftpipeError(
                    what,
                    f"failed after {attempts} attempts ({exc})",
                    "the previous checkpoint is still the newest good one",
                ) from None
            time.sleep(delay * 2 ** (attempt - 1))


class CheckpointStore:
    def __init__(self, uri: str, keep: int = 2) -> None:
        self.uri, self.keep = uri.rstrip("/"), max(1, keep)

    # --- listing -----------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        """Steps that have a published manifest, oldest first."""
        if storage.is_s3(self.uri):
            steps = set()
            for key in storage.list_objects(self.uri) if self._bucket_exists() else []:
                parts = key.rsplit("/", 2)
                if (
                    len(parts) >= 2
                    and parts[-1] == MANIFEST
                    and (step := _step_of(parts[-2])) is not None
                ):
                    steps.add(step)
            return sorted(steps)
        root = Path(self.uri)
        if not root.is_dir():
            return []
        return sorted(
            step
            for child in root.iterdir()
            if (step := _step_of(child.name)) is not None and (child / MANIFEST).exists()
        )

    def _bucket_exists(self) -> bool:
        bucket, _ = storage.split_s3(self.uri)
        try:
            storage.s3_client().head_bucket(Bucket=bucket)
        except Exception:  # botocore ClientError: no such bucket / no access
            raise SftpipeError(
                self.uri,
                "the checkpoint bucket does not exist or is not readable",
                "create it or fix --checkpoint-uri",
            ) from None
        return True

    # --- saving ------------------------------------------------------------------------------
    def save(self, step: int, write: Callable[[Path], None]) -> None:
        """`write(folder)` fills a temporary folder; it is then published as checkpoint `step`."""
        with tempfile.TemporaryDirectory(prefix="sftpipe-ckpt-") as tmp:
            folder = Path(tmp) / _name(step)
            folder.mkdir()
            write(folder)
            manifest = {
                "step": step,
                "created": time.time(),
                "files": {
                    p.name: {"bytes": p.stat().st_size, "sha256": storage.sha256_file(p)}
                    for p in sorted(folder.iterdir())
                },
            }
            (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if storage.is_s3(self.uri):
                target = f"{self.uri}/{_name(step)}"
                for part in [*sorted(manifest["files"]), MANIFEST]:  # the manifest goes last
                    _retry(
                        lambda part=part: storage.upload_file(folder / part, f"{target}/{part}"),
                        f"{target}/{part}",
                    )
            else:
                root = Path(self.uri)
                root.mkdir(parents=True, exist_ok=True)
                staging = root / f".{_name(step)}.partial-{os.getpid()}"
                shutil.rmtree(staging, ignore_errors=True)
                shutil.copytree(folder, staging)
                shutil.rmtree(root / _name(step), ignore_errors=True)
                os.replace(staging, root / _name(step))
        self._prune()

    def _prune(self) -> None:
        for step in self.complete_steps()[: -self.keep]:
            if storage.is_s3(self.uri):
                bucket, _ = storage.split_s3(self.uri)
                # The manifest first: a half-deleted checkpoint must not look complete.
                keys = storage.list_objects(f"{self.uri}/{_name(step)}")
                keys.sort(key=lambda key: not key.endswith(MANIFEST))
                for key in keys:
                    storage.s3_client().delete_object(Bucket=bucket, Key=key)
            else:
                folder = Path(self.uri) / _name(step)
                (folder / MANIFEST).unlink(missing_ok=True)
                shutil.rmtree(folder, ignore_errors=True)

    # --- loading -----------------------------------------------------------------------------
    def latest(self, dest: Path) -> Path | None:
        """The newest complete checkpoint whose files match its manifest, as a local folder
        under `dest`; None when there is none. A corrupt one is skipped for the one before."""
        for step in reversed(self.complete_steps()):
            folder = self._fetch(step, dest)
            if self._verified(folder):
                return folder
            print(
                f"[checkpoint] {self.uri}/{_name(step)} does not match its manifest; skipped",
                flush=True,
            )
        return None

    def _fetch(self, step: int, dest: Path) -> Path:
        if not storage.is_s3(self.uri):
            return Path(self.uri) / _name(step)
        dest.mkdir(parents=True, exist_ok=True)
        folder = dest / _name(step)
        shutil.rmtree(folder, ignore_errors=True)
        downloaded = storage.local_dir(f"{self.uri}/{_name(step)}", cache_root=dest)
        downloaded.rename(folder)
        return folder

    @staticmethod
    def _verified(folder: Path) -> bool:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        for name, meta in manifest["files"].items():
            path = folder / name
            if not path.exists() or path.stat().st_size != meta["bytes"]:
                return False
            if storage.sha256_file(path) != meta["sha256"]:
                return False
        return True


# --- random number generators ------------------------------------------------------------------
# Every process draws its own dropout masks (its micro-batches differ in shape, so their streams
# drift apart): a checkpoint keeps each rank's states, as HF Trainer's rng_state_<rank>.pth do,
# so a resumed run on the same number of processes draws what an uninterrupted one would.


def rng_state() -> dict[str, Any]:
    """This process's generators: Python, NumPy, torch CPU and (when present) this CUDA
    device. Plain types and tensors only, so `torch.load(weights_only=True)` reads them."""
    version, keys, gauss = random.getstate()
    numpy = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(keys), gauss],
        "numpy": {
            "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
            "pos": int(numpy["state"]["pos"]),
            "has_gauss": int(numpy["has_gauss"]),
            "gauss": float(numpy["gauss"]),
        },
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any] | torch.Tensor) -> None:
    """Restore what `rng_state` returned (a bare tensor: an older checkpoint's CPU state)."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rank_rng_state(saved: list[Any] | torch.Tensor, rank: int, size: int) -> tuple[Any, bool]:
    """The state this rank resumes with, and whether it is exactly its own: a checkpoint of
    another number of processes gives rank r the state of rank r mod saved (deterministic, but
    dropout then differs from an uninterrupted run)."""
    if isinstance(saved, torch.Tensor):  # older checkpoints: rank 0's CPU state only
        return saved, size == 1
    return saved[rank % len(saved)], len(saved) == size
