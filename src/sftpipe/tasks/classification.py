"""The classification task: `text` + `label` rows (a label map in the Parquet metadata), a
sequence-classification head on an encoder or decoder.

Evaluation: three classifiers answer the same validation rows:

- **base**: the base model with a fresh classification head (seeded), which is what fine-tuning
  started from: the floor;
- **tuned**: the fine-tuned model;
- **tfidf**: TF-IDF character n-grams + logistic regression trained on the same training
  split: what a cheap classic model achieves, so users see whether fine-tuning was worth it.

Each gets accuracy, macro and per-class precision / recall / F1 and a confusion matrix
(`sftpipe.evaluation.class_metrics`); base and tuned also the mean cross-entropy
(`validation_loss`). The gate decides tuned vs base (default: macro F1, with the worst class's
recall as a guard).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftpipe.config import EvalConfig, TrainConfig
from sftpipe.data.schemas import LABEL_MAP_KEY
from sftpipe.data.tokenized import read_label_map, read_parquet
from sftpipe.evaluation import class_metrics, gate, metrics
from sftpipe.evaluation.results import EvalResult, Sample, model_digest, training_history
from sftpipe.progress import format_duration
from sftpipe.tasks.base import MlflowFlavor

BASE_HEAD_SEED = 0  # the fresh head of the base model: the same floor every run
INPUT_EXAMPLE_TEXTS = ["This was great, I would buy it again.", "质量很差，不推荐。"]


@dataclass(frozen=True)
class ClassifierScores:
    metrics: dict[str, float]
    predicted: np.ndarray  # label id per validation row
    confusion: np.ndarray


def names_of(labels: dict[str, int]) -> list[str]:
    """Label names in id order."""
    return [name for name, _ in sorted(labels.items(), key=lambda item: item[1])]


def score_predictions(
    true: np.ndarray, predicted: np.ndarray, names: list[str]
) -> tuple[dict[str, float], np.ndarray]:
    matrix = class_metrics.confusion_matrix(true, predicted, len(names))
    return class_metrics.summarize(matrix, names), matrix


def score_classifier(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    names: list[str],
    config: EvalConfig,
    device: Any,
    dtype: Any,
    label: str,
) -> ClassifierScores:
    """Cross-entropy and the confusion-matrix metrics of one classifier on `rows`."""
    import torch

    from sftpipe.modeling import classify

    start = time.perf_counter()
    log_probs = classify.log_probabilities(
        model, rows, tokenizer.pad_token_id, config.eval_batch_size, device, dtype
    )
    true = np.array([row["label"] for row in rows], dtype=np.int64)
    loss = -float(log_probs[torch.arange(len(rows)), torch.from_numpy(true)].mean())
    predicted = log_probs.argmax(dim=-1).numpy()
    scores, matrix = score_predictions(true, predicted, names)
    scores = {"validation_loss": loss} | scores
    seconds = time.perf_counter() - start
    scores["examples_per_s"] = len(rows) / max(seconds, 1e-9)
    print(
        f"[evaluate] {label}: accuracy {scores['accuracy']:.4f}, macro F1 "
        f"{scores['macro_f1']:.4f}, loss {loss:.4f} ({len(rows)} texts in {seconds:.1f} s)",
        flush=True,
    )
    return ClassifierScores(scores, predicted, matrix)


def for_tokenizer(rows: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """The rows tokenized by `tokenizer` (a champion or base model with another vocabulary),
    same length cap."""
    budget = max((len(row["input_ids"]) for row in rows), default=1)
    encoded = tokenizer(
        [row["text"] for row in rows],
        add_special_tokens=True,
        truncation=True,
        max_length=budget,
    )["input_ids"]
    if all(ids == list(row["input_ids"]) for ids, row in zip(encoded, rows, strict=True)):
        return rows
    print("[evaluate] another tokenizer: re-tokenizing the evaluation texts", flush=True)
    return [row | {"input_ids": ids} for row, ids in zip(rows, encoded, strict=True)]


def load_base_classifier(base_dir: Path, labels: dict[str, int], uri: str) -> Any:
    import torch

    from sftpipe.modeling import classify

    torch.manual_seed(BASE_HEAD_SEED)
    return classify.load_model(base_dir, labels, uri)


def _dtype(device: Any) -> Any:
    # fp32 on CPUs: bf16 autocast re-casts every weight per batch, which costs more than it
    # saves on encoder-sized matrices (MiniLM forward, batch 8 x 64: 382 ms fp32, 675 ms bf16).
    from sftpipe.modeling import lm
    from sftpipe.modeling.generation import generation_dtype

    return generation_dtype(device, lm.autocast_dtype("auto", device))


class ClassificationTask:
    name = metrics.CLASSIFICATION
    # Macro F1 weighs every class alike (accuracy hides a rare class); the recall guard stops
    # a model that wins on average by giving up one class (the worst class may lose 5 points).
    default_gate = gate.TaskGate(primary="macro_f1", guards="min_class_recall:0.05")
    chat_template = False  # an encoder has no chat template, and needs none
    token_labels = False  # one label per row
    can_chat = False
    peft_task_type = "SEQ_CLS"

    def recognizes_tokenized(self, metadata: dict[str, str]) -> bool:
        return LABEL_MAP_KEY in metadata

    def recognizes_cleaned(self, label: str | None) -> bool:
        return label is not None

    def training_batches(self) -> Any:
        from sftpipe.modeling import classify

        return classify

    def check_training(
        self,
        config: TrainConfig,
        rows: list[dict[str, Any]],
        labels: dict[str, int] | None,
        where: str,
    ) -> None:
        from sftpipe.errors import SftpipeError
        from sftpipe.modeling import classify

        if config.method == "qlora":
            raise SftpipeError("method", "qlora is for causal LMs", "use lora or full to classify")
        classify.check_labels(rows, labels or {}, where)

    def load_for_training(
        self, config: TrainConfig, model_dir: Path, base_model: str, labels: dict[str, int] | None
    ) -> Any:
        from sftpipe.modeling import classify

        return classify.load_model(model_dir, labels or {}, base_model)

    def loss_module(
        self,
        model: Any,
        config: TrainConfig,
        rows: list[dict[str, Any]],
        labels: dict[str, int] | None,
    ) -> Any:
        from sftpipe.modeling import classify

        count = len(labels or {})
        weights = classify.class_weights(rows, count) if config.class_weights else None
        return classify.ClassLoss(model, weights)  # per example

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
        from sftpipe.evaluation import report
        from sftpipe.modeling import classify, lm, models

        start = time.perf_counter()
        device = lm.default_device()
        dtype = _dtype(device)
        labels = read_label_map(validation_path)
        names = names_of(labels)
        rows = read_parquet(validation_path)
        tokenizer = models.load_tokenizer(tuned_dir, str(tuned_dir), chat=False)
        base_dir = models.fetch(base_model)
        base_digest = model_digest(base_dir)
        # The base model reads the texts with its own tokenizer: the tuned one may have more
        # tokens (tokenize's extend_vocabulary), which the base embeddings do not have.
        base_tokenizer = models.load_tokenizer(base_dir, base_model, chat=False)

        scores: dict[str, ClassifierScores] = {}
        for name, load, its_tokenizer, its_rows in (
            (
                "base",
                lambda: load_base_classifier(base_dir, labels, base_model),
                base_tokenizer,
                for_tokenizer(rows, base_tokenizer),
            ),
            (
                "tuned",
                lambda: classify.load_model(tuned_dir, labels, str(tuned_dir)),
                tokenizer,
                rows,
            ),
        ):
            model = load()
            scores[name] = score_classifier(
                model, its_tokenizer, its_rows, names, config, device, dtype, name
            )
            del model
        true = np.array([row["label"] for row in rows], dtype=np.int64)
        if train_path is not None:
            train = read_parquet(train_path)
            predicted = class_metrics.tfidf_baseline(
                [r["text"] for r in train], [r["label"] for r in train], [r["text"] for r in rows]
            )
            tfidf, matrix = score_predictions(true, predicted, names)
            scores["tfidf"] = ClassifierScores(tfidf, predicted, matrix)
            print(
                f"[evaluate] tfidf baseline: accuracy {tfidf['accuracy']:.4f}, macro F1 "
                f"{tfidf['macro_f1']:.4f}",
                flush=True,
            )

        decision = gate.decide(spec, scores["base"].metrics, scores["tuned"].metrics)
        result = {f"{name}_{k}": v for name, s in scores.items() for k, v in s.metrics.items()}
        result |= {
            "validation_loss_improvement": (
                scores["base"].metrics["validation_loss"]
                - scores["tuned"].metrics["validation_loss"]
            ),
            "validation_rows": float(len(rows)),
            **decision.metrics(),
            "evaluation_seconds": time.perf_counter() - start,
        }
        samples = [
            Sample(
                prompt=row["text"],
                reference=names[row["label"]],
                answers={name: names[int(s.predicted[i])] for name, s in scores.items()},
            )
            for i, row in enumerate(rows)
        ]
        confusion = report.Confusion(names, {name: s.confusion for name, s in scores.items()})
        plots = {"confusion_matrix.png": report.confusion_png(confusion)}
        history = training_history(tuned_dir)
        report.write_eval_report(
            report_path,
            result,
            decision,
            spec,
            history,
            report.classification_samples(samples, config.num_samples),
            plots,
            config.max_new_tokens,
            confusion=confusion,
        )
        print(
            f"[evaluate] gate {decision.summary()} | evaluated in "
            f"{format_duration(result['evaluation_seconds'])}",
            flush=True,
        )
        return EvalResult(result, samples, decision, base_digest, plots, confusion)

    def rescore(
        self,
        folder: Path,
        uri: str,
        label: str,
        config: EvalConfig,
        validation_path: Path,
        with_generation: bool,
    ) -> dict[str, float] | None:
        """None for a classifier of other labels, which cannot be scored on this set."""
        from sftpipe.modeling import classify, lm, models

        device = lm.default_device()
        dtype = lm.autocast_dtype("auto", device)
        labels = read_label_map(validation_path)
        tokenizer = models.load_tokenizer(folder, uri, chat=False)
        theirs = json.loads((folder / "config.json").read_text()).get("label2id")
        if theirs != labels:
            return None
        rows = for_tokenizer(read_parquet(validation_path), tokenizer)
        model = classify.load_model(folder, labels, uri)
        return score_classifier(
            model, tokenizer, rows, names_of(labels), config, device, dtype, label
        ).metrics

    def mlflow_flavor(self, max_new_tokens: int) -> MlflowFlavor:
        return MlflowFlavor(
            "text-classification",
            {"task": "text-classification", "input_example": INPUT_EXAMPLE_TEXTS},
        )


TASK = ClassificationTask()
