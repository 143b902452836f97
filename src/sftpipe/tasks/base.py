"""What a task is: everything that differs between kinds of training data, in one place.

A task is chosen once from the data (`sftpipe.tasks.of_tokenized`, `of_cleaned`) and then
consulted by every stage, which never branches on the task's name: tokenize asks which
tokenizer it needs, finetune which model and loss, evaluate and register how to score a model,
register how to log it to MLflow, the CLI whether one can chat with it. A new task is one new
module that implements `Task`, and one line in `sftpipe.tasks.TASKS`.

Task modules keep their heavy imports (torch, transformers) inside functions, so that
`sftpipe.tasks` stays cheap to import for the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sftpipe.config import EvalConfig, TrainConfig
from sftpipe.evaluation import gate
from sftpipe.evaluation.results import EvalResult


@dataclass(frozen=True)
class MlflowFlavor:
    """How register logs a model of this task with `mlflow.transformers.log_model`: the
    transformers pipeline it wraps, and log_model's task-specific arguments."""

    pipeline_task: str
    log_model_args: dict[str, Any]


class Task(Protocol):
    name: str  # "chat", "classification": tags, metadata and the metrics table use it
    default_gate: gate.TaskGate  # the gate when gate_metric / gate_guards are empty
    chat_template: bool  # its tokenizer must render conversations (chat template)
    token_labels: bool  # its rows carry per-token labels (loss tokens; train rows can be packed)
    can_chat: bool  # `sftpipe chat` can talk to its models
    peft_task_type: str  # what LoRA adapts: "CAUSAL_LM", "SEQ_CLS"

    def recognizes_tokenized(self, metadata: dict[str, str]) -> bool:
        """Whether a tokenized Parquet file with this schema metadata holds this task's rows."""
        ...

    def recognizes_cleaned(self, label: str | None) -> bool:
        """Whether a cleaned row (its label, None for rows without one) is this task's."""
        ...

    def training_batches(self) -> Any:
        """The module finetune batches with: `collate(rows, pad_id)` and `mean_loss(...)`
        (`sftpipe.modeling.lm` or `sftpipe.modeling.classify`)."""
        ...

    def check_training(
        self,
        config: TrainConfig,
        rows: list[dict[str, Any]],
        labels: dict[str, int] | None,
        where: str,
    ) -> None:
        """Refuse, in one line, training settings or rows this task cannot train on."""
        ...

    def load_for_training(
        self, config: TrainConfig, model_dir: Path, base_model: str, labels: dict[str, int] | None
    ) -> Any:
        """The base model with this task's head, on the CPU (finetune places it)."""
        ...

    def loss_module(
        self,
        model: Any,
        config: TrainConfig,
        rows: list[dict[str, Any]],
        labels: dict[str, int] | None,
    ) -> Any:
        """The training loss as a torch module (DDP wraps it), summed over what one unit of
        loss is for this task."""
        ...

    def evaluate(
        self,
        config: EvalConfig,
        spec: gate.GateSpec,
        base_model: str,
        tuned_dir: Path,
        validation_path: Path,
        report_path: Path,
        train_path: Path | None,
    ) -> EvalResult:
        """Base vs tuned on the validation set, the gate, the HTML report."""
        ...

    def rescore(
        self,
        folder: Path,
        uri: str,
        label: str,
        config: EvalConfig,
        validation_path: Path,
        with_generation: bool,
    ) -> dict[str, float] | None:
        """A downloaded model's metrics on this validation set (register's champion re-score);
        None when the model cannot be scored on it."""
        ...

    def mlflow_flavor(self, max_new_tokens: int) -> MlflowFlavor: ...
