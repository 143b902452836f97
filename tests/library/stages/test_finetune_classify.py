"""Sequence classification: tokenize's classification rows (input_ids + label, label map in the
Parquet metadata) fine-tune an encoder with a fresh head."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from fixtures.classification import write_split
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sftpipe.config import TrainConfig
from sftpipe.errors import SftpipeError
from sftpipe.modeling import classify
from sftpipe.stages import finetune


def accuracy(model_dir, path):
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    rows = pq.read_table(path).to_pylist()
    batch = classify.collate(rows, pad_id=0)
    with torch.no_grad():
        predicted = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.argmax(-1)
    return float((predicted == batch["labels"]).float().mean())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_classifier_learns_and_exports_its_label_map(encoder, splits, tmp_path, method):
    config = TrainConfig(
        method=method,
        max_steps=40,
        learning_rate=1e-2,
        micro_batch_size=16,
        eval_every=10,
        class_weights=True,
        precision="fp32",
        lora_target_modules="query,value",
    )
    report = finetune.run(config, str(encoder), *splits, tmp_path / "out")
    first = report.history[0]["validation_loss"]
    # A random-init encoder: full fine-tuning fits it; adapters on it learn slower but sort.
    assert report.best_validation_loss < first - (0.2 if method == "full" else 0.0)
    assert accuracy(tmp_path / "out", splits[1]) >= 0.9
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["id2label"] == {"0": "negative", "1": "positive"}


def test_class_weights_balance_the_classes():
    rows = [{"label": 0}] * 6 + [{"label": 1}] * 2
    weights = classify.class_weights(rows, 2)
    assert weights.tolist() == pytest.approx([8 / 12, 8 / 4])
    assert float((weights[torch.tensor([r["label"] for r in rows])]).mean()) == pytest.approx(1.0)


def test_labels_outside_the_map_fail_before_training(encoder, splits, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    bad = write_split(tmp_path / "bad.parquet", tokenizer, 8, 3, label_map={"negative": 0})
    with pytest.raises(SftpipeError, match=r"label ids \[1\] are not in the label map"):
        finetune.run(TrainConfig(max_steps=1), str(encoder), bad, splits[1], tmp_path / "o")
    assert not (tmp_path / "o").exists()
