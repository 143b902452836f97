"""evaluate: the base model against the tuned model on the same validation set, then the
quality gate and an HTML report.

What "scoring a model" means is the task's (`sftpipe.tasks`): loss, perplexity and generated
answers for chat; confusion-matrix metrics and a TF-IDF baseline for classification. This stage
chooses the task from the validation data and runs its evaluation.
"""

from __future__ import annotations

from pathlib import Path

from sftpipe import tasks
from sftpipe.config import EvalConfig
from sftpipe.evaluation import gate
from sftpipe.evaluation.results import EvalResult
from sftpipe.tasks.base import Task


def run(
    config: EvalConfig,
    spec: gate.GateSpec,
    base_model: str,
    tuned_model_dir: str | Path,
    validation_path: str | Path,
    report_path: str | Path,
    train_path: str | Path | None = None,
    task: Task | None = None,
) -> EvalResult:
    """Base vs tuned on the validation set, then the gate (`spec`), and the report at
    `report_path`. Classification also trains the TF-IDF baseline on `train_path`."""
    task = task or tasks.of_tokenized(validation_path)
    return task.evaluate(
        config,
        spec,
        base_model,
        Path(tuned_model_dir),
        Path(validation_path),
        Path(report_path),
        None if train_path is None else Path(train_path),
    )
