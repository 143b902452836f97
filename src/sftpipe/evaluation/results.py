"""What an evaluation produces, whatever the task: the metrics (`base_*`, `tuned_*`, ...), the
gate decision, the examples shown in the report, the plots; and the two facts about model
folders every evaluation reads (the base model's content digest, finetune's loss history)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from sftpipe.evaluation import gate, report
from sftpipe.modeling.models import TRAINING_LOG


@dataclass
class Sample:
    """One validation example and each model's answer to it (chat: a generated reply;
    classification: a label name)."""

    prompt: str
    reference: str
    answers: dict[str, str] = field(default_factory=dict)
    ended: dict[str, bool] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: list[Sample]
    decision: gate.Decision
    base_model_digest: str
    plots: dict[str, bytes]
    confusion: report.Confusion | None = None  # classification only


def training_history(model_dir: Path) -> list[dict[str, float]]:
    """The loss history finetune exported next to the model (empty for other models)."""
    path = model_dir / TRAINING_LOG
    return json.loads(path.read_text())["history"] if path.exists() else []


def model_digest(model_dir: Path) -> str:
    """A content digest of a model folder (every file's path and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
