"""Stopping and resuming a fine-tuning run: the SIGTERM flag the loop checks after each step,
and `restore`, which loads a checkpoint written by the finetune stage."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from sftpipe.modeling import checkpoint as checkpoints
from sftpipe.modeling import distributed
from sftpipe.modeling.distributed import World
from sftpipe.modeling.training_report import BEST_FILE, EarlyStopping, TrainReport


class SigtermFlag:
    """Kubernetes sends SIGTERM before it kills a pod: note it, and let the loop checkpoint and
    stop at the end of the current step."""

    def __init__(self) -> None:
        self.set = False
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        print("[finetune] SIGTERM: stopping after this step", flush=True)
        self.set = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def restore(
    folder: Path,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    best_file: Path,
    world: World = distributed.SINGLE,
) -> tuple[int, EarlyStopping, TrainReport]:
    """Load a checkpoint written by `run` (with any strategy and number of processes) into the
    model and optimizer, its best weights into `best_file` on the main process, and this rank's
    random generators; returns the step, the early-stopping state and the report so far. Every
    process calls it."""
    weights = torch.load(folder / "model.pt", weights_only=True, mmap=True)
    trainer = torch.load(folder / "trainer.pt", weights_only=True)
    distributed.load_state(model, weights, optimizer, trainer["optimizer"])
    if world.is_main:
        if (folder / BEST_FILE).exists():
            shutil.copyfile(folder / BEST_FILE, best_file)
        else:  # the checkpoint's own weights were the best
            torch.save(weights, best_file)
    del weights
    scheduler.load_state_dict(trainer["scheduler"])
    scaler.load_state_dict(trainer["scaler"])
    rng, exact = checkpoints.rank_rng_state(trainer["rng"], world.rank, world.size)
    checkpoints.set_rng_state(rng)
    if not exact and world.is_main:
        print(
            f"[finetune] the checkpoint was written by another number of processes: random "
            f"draws (dropout) differ from an uninterrupted run on {world.size}",
            flush=True,
        )
    state = json.loads((folder / "trainer_state.json").read_text())
    return state["step"], EarlyStopping(**state["early_stopping"]), TrainReport(**state["report"])
