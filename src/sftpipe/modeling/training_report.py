"""What a fine-tuning run reports: the summary and history exported beside the weights
(`TrainReport`, `read_report`), one optimizer step's numbers and the throughput between log
lines, and the early-stopping state the validation loop keeps."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

TRAINING_LOG = "sftpipe_training.json"  # history and summary, saved beside the weights
BEST_FILE = "best.pt"  # the best weights so far (scratch space and checkpoints)


@dataclass
class TrainReport:
    steps: int = 0
    epochs: float = 0.0
    train_loss: float = float("nan")
    best_validation_loss: float = float("inf")
    best_step: int = 0
    exported_step: int = 0  # best_step, or the last step with export_best off
    stopped_early: bool = False
    tokens: int = 0
    loss_tokens: int = 0
    tokens_per_second: float = 0.0
    mfu: float = 0.0
    seconds: float = 0.0
    precision: str = "fp32"
    history: list[dict[str, float]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        skip = {"history", "precision"}
        return {k: float(v) for k, v in asdict(self).items() if k not in skip}


@dataclass
class EarlyStopping:
    """Tracks the best validation loss; `stop` turns true after `patience` validations in a
    row without improvement (never when patience is 0)."""

    patience: int
    best: float = float("inf")
    best_step: int = 0
    stale: int = 0

    def update(self, loss: float, step: int) -> bool:
        """Record a validation loss; returns whether it is a new best."""
        if loss < self.best:
            self.best, self.best_step, self.stale = loss, step, 0
            return True
        self.stale += 1
        return False

    @property
    def stop(self) -> bool:
        return bool(self.patience) and self.stale >= self.patience


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    loss_tokens: int
    seconds: float


@dataclass
class Throughput:
    """Tokens and seconds since the last log line (validation time is not counted)."""

    seconds: float = 0.0
    tokens: int = 0

    def add(self, result: StepResult) -> None:
        self.seconds += result.seconds
        self.tokens += result.tokens


def read_report(output_dir: str | Path) -> TrainReport:
    """The report `run` exported beside the weights."""
    return TrainReport(**json.loads((Path(output_dir) / TRAINING_LOG).read_text()))
