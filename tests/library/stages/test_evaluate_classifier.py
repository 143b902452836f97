"""evaluate on classification data: base (fresh head) vs tuned vs the TF-IDF baseline, the
gate on macro F1 with the worst-class recall guard, confusion matrices and the report."""

import html

import numpy as np
import pytest
from transformers import AutoTokenizer

from sftpipe.config import EvalConfig, RegisterConfig
from sftpipe.data.tokenized import read_parquet
from sftpipe.stages import evaluate
from sftpipe.tasks import classification

GATE = RegisterConfig().gate_spec(classification.TASK.default_gate)
CONFIG = EvalConfig(num_samples=5, eval_batch_size=8)


@pytest.fixture(scope="module")
def result(encoder, splits, tuned_classifier, tmp_path_factory):
    report = tmp_path_factory.mktemp("report") / "report.html"
    train, validation = splits
    outcome = evaluate.run(
        CONFIG, GATE, str(encoder), tuned_classifier, validation, report, train_path=train
    )
    return outcome, report


def test_three_classifiers_are_scored_on_the_same_rows(splits, result):
    outcome, _ = result
    m = outcome.metrics
    rows = read_parquet(splits[1])
    assert m["validation_rows"] == len(rows) == 32
    for model in ("base", "tuned", "tfidf"):
        for name in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "min_class_recall"):
            assert 0.0 <= m[f"{model}_{name}"] <= 1.0
        for label in ("negative", "positive"):
            assert f"{model}_recall.{label}" in m and f"{model}_f1.{label}" in m
        matrix = outcome.confusion.matrices[model]
        assert matrix.sum() == 32 and m[f"{model}_accuracy"] == np.trace(matrix) / 32
    # The tuned model learned the words; the fresh head of the base did not.
    assert m["tuned_accuracy"] >= 0.9 and m["tuned_macro_f1"] > m["base_macro_f1"]
    assert m["tuned_validation_loss"] < m["base_validation_loss"]
    assert m["tfidf_accuracy"] >= 0.9  # the words are easy for n-grams too
    assert outcome.confusion.names == ["negative", "positive"]
    # Each row's true label is what the data says.
    assert [s.reference for s in outcome.samples] == [
        ["negative", "positive"][r["label"]] for r in rows
    ]


def test_gate_uses_macro_f1_and_the_worst_class_recall(result):
    outcome, _ = result
    assert [c.metric for c in outcome.decision.checks] == ["macro_f1", "min_class_recall"]
    assert outcome.decision.passed and outcome.metrics["gate_passed"] == 1.0


def test_base_head_is_the_same_every_time(encoder, splits, tuned_classifier, tmp_path, result):
    again = evaluate.run(
        CONFIG, GATE, str(encoder), tuned_classifier, splits[1], tmp_path / "r.html"
    )
    assert again.metrics["base_validation_loss"] == result[0].metrics["base_validation_loss"]
    assert "tfidf_accuracy" not in again.metrics  # no training split: no baseline


def test_report_shows_matrices_per_class_metrics_and_examples(result):
    outcome, report = result
    page = report.read_text()
    assert "Quality gate" in page and "TF-IDF + LogReg" in page and "Per class" in page
    assert "Confusion matrices" in page and "macro F1" in page
    assert page.count("data:image/png;base64,") == 2  # loss curve and the confusion matrices
    # Examples the models disagree on come first.
    disputed = [s for s in outcome.samples if len(set(s.answers.values())) > 1]
    assert disputed and html.escape(disputed[0].prompt) in page
    assert page.count("<tr><td>I ") == CONFIG.num_samples
    assert set(outcome.plots) == {"confusion_matrix.png"}


def test_rows_follow_another_tokenizer(splits, tiny_model_dir, encoder):
    rows = read_parquet(splits[1])
    same = AutoTokenizer.from_pretrained(encoder)
    assert classification.for_tokenizer(rows, same) is rows
    shifted = [row | {"input_ids": [1, *row["input_ids"]]} for row in rows]
    again = classification.for_tokenizer(shifted, same)
    assert [r["input_ids"] for r in again] == [r["input_ids"] for r in rows]


def test_base_reads_the_texts_with_its_own_vocabulary(
    minilm_encoder, unknown_script_splits, tmp_path, capsys
):
    """A model tuned with added tokens (extend_vocabulary): the base model has no embeddings
    for them, so it scores the texts re-tokenized with its own tokenizer."""
    from sftpipe.config import TrainConfig
    from sftpipe.stages import finetune

    train, validation, _ = unknown_script_splits["extended"]
    config = TrainConfig(
        max_steps=30, learning_rate=1e-2, embedding_learning_rate=3e-2, micro_batch_size=16
    )
    finetune.run(config, str(minilm_encoder), train, validation, tmp_path / "tuned")
    outcome = evaluate.run(
        CONFIG, GATE, str(minilm_encoder), tmp_path / "tuned", validation, tmp_path / "r.html"
    )
    assert "re-tokenizing the evaluation texts" in capsys.readouterr().out
    assert outcome.metrics["tuned_macro_f1"] >= 0.9 > outcome.metrics["base_macro_f1"]
    assert outcome.decision.passed
