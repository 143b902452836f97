"""evaluate for classification data (`text` + `label`, a label map in the Parquet metadata).

Three classifiers answer the same validation rows:

- **base**: the base model with a fresh classification head (seeded), which is what fine-tuning
  started from: the floor;
- **tuned**: the fine-tuned model;
- **tfidf**: TF-IDF character n-grams + logistic regression trained on the same training
  split: what a cheap classic model achieves, so users see whether fine-tuning was worth it.

Each gets accuracy, macro and per-class precision / recall / F1 and a confusion matrix
(`sftpipe.evaluation.class_metrics`); base and tuned also the mean
cross-entropy (`validation_loss`). The
gate decides tuned vs base (default: macro F1, with the worst class's recall as a guard).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftpipe.config import EvalConfig
from sftpipe.data.tokenized import read_label_map, read_parquet
from sftpipe.evaluation import class_metrics, gate, report
from sftpipe.modeling import classify, lm, models
from sftpipe.progress import format_duration
from sftpipe.stages.evaluate import (
    EvalResult,
    Sample,
    generation_dtype,
    model_digest,
    training_history,
)

BASE_HEAD_SEED = 0  # the fresh head of the base model: the same floor every run


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
    device: torch.device,
    dtype: torch.dtype | None,
    label: str,
) -> ClassifierScores:
    """Cross-entropy and the confusion-matrix metrics of one classifier on `rows`."""
    start = time.perf_counter()
    log_probs = classify.log_probabilities(
        model, rows, tokenizer.pad_token_id, config.eval_batch_size, device, dtype
    )
    true = np.array([row["label"] for row in rows], dtype=np.int64)
    loss = -float(log_probs[torch.arange(len(rows)), torch.from_numpy(true)].mean())
    predicted = log_probs.argmax(dim=-1).numpy()
    metrics, matrix = score_predictions(true, predicted, names)
    metrics = {"validation_loss": loss} | metrics
    seconds = time.perf_counter() - start
    metrics["examples_per_s"] = len(rows) / max(seconds, 1e-9)
    print(
        f"[evaluate] {label}: accuracy {metrics['accuracy']:.4f}, macro F1 "
        f"{metrics['macro_f1']:.4f}, loss {loss:.4f} ({len(rows)} texts in {seconds:.1f} s)",
        flush=True,
    )
    return ClassifierScores(metrics, predicted, matrix)


def for_tokenizer(rows: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """The rows tokenized by `tokenizer` (a champion with another vocabulary), same length cap."""
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
    torch.manual_seed(BASE_HEAD_SEED)
    return classify.load_model(base_dir, labels, uri)


def run(
    config: EvalConfig,
    spec: gate.GateSpec,
    base_model: str,
    tuned_model_dir: str | Path,
    train_path: str | Path | None,
    validation_path: str | Path,
    report_path: str | Path,
) -> EvalResult:
    start = time.perf_counter()
    device = lm.default_device()
    # fp32 on CPUs: bf16 autocast re-casts every weight per batch, which costs more than it
    # saves on encoder-sized matrices (MiniLM forward, batch 8 x 64: 382 ms fp32, 675 ms bf16).
    dtype = generation_dtype(device, lm.autocast_dtype("auto", device))
    labels = read_label_map(validation_path)
    names = names_of(labels)
    rows = read_parquet(validation_path)
    tuned_dir = Path(tuned_model_dir)
    tokenizer = models.load_tokenizer(tuned_dir, str(tuned_dir), chat=False)
    base_dir = models.fetch(base_model)
    base_digest = model_digest(base_dir)

    scores: dict[str, ClassifierScores] = {}
    for name, load in (
        ("base", lambda: load_base_classifier(base_dir, labels, base_model)),
        ("tuned", lambda: classify.load_model(tuned_dir, labels, str(tuned_dir))),
    ):
        model = load()
        scores[name] = score_classifier(model, tokenizer, rows, names, config, device, dtype, name)
        del model
    true = np.array([row["label"] for row in rows], dtype=np.int64)
    if train_path is not None:
        train = read_parquet(train_path)
        predicted = class_metrics.tfidf_baseline(
            [r["text"] for r in train], [r["label"] for r in train], [r["text"] for r in rows]
        )
        metrics, matrix = score_predictions(true, predicted, names)
        scores["tfidf"] = ClassifierScores(metrics, predicted, matrix)
        print(
            f"[evaluate] tfidf baseline: accuracy {metrics['accuracy']:.4f}, macro F1 "
            f"{metrics['macro_f1']:.4f}",
            flush=True,
        )

    decision = gate.decide(spec, scores["base"].metrics, scores["tuned"].metrics)
    metrics = {f"{name}_{k}": v for name, s in scores.items() for k, v in s.metrics.items()}
    metrics |= {
        "validation_loss_improvement": (
            scores["base"].metrics["validation_loss"] - scores["tuned"].metrics["validation_loss"]
        ),
        "validation_rows": float(len(rows)),
        **decision.metrics(),
        "evaluation_seconds": time.perf_counter() - start,
    }
    samples = [
        Sample(
            prompt=row["text"],
            reference=names[row["label"]],
            answers={name: names[int(result.predicted[i])] for name, result in scores.items()},
        )
        for i, row in enumerate(rows)
    ]
    confusion = report.Confusion(names, {name: s.confusion for name, s in scores.items()})
    plots = {"confusion_matrix.png": report.confusion_png(confusion)}
    history = training_history(tuned_dir)
    report.write_eval_report(
        report_path,
        metrics,
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
        f"{format_duration(metrics['evaluation_seconds'])}",
        flush=True,
    )
    return EvalResult(metrics, samples, decision, base_digest, plots, confusion)
