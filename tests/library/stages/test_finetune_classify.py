"""Sequence classification: tokenize's classification rows (input_ids + label, label map in the
Parquet metadata) fine-tune an encoder with a fresh head."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from fixtures.classification import write_split
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sftpipe.config import TrainConfig
from sftpipe.data import vocabulary
from sftpipe.data.tokenized import schema_metadata
from sftpipe.errors import SftpipeError
from sftpipe.modeling import classify, optim
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


def decoder_accuracy(model_dir, path):
    """Accuracy of an exported decoder classifier, batches padded as finetune pads them."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    rows = pq.read_table(path).to_pylist()
    batch = classify.collate(rows, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        predicted = classify.logits(model, batch).argmax(-1)
    return float((predicted == batch["labels"]).float().mean())


def test_decoder_head_pools_the_last_real_token_whatever_the_padding(tiny_model_dir):
    # The tiny Llama pads with its end-of-turn token (id 2), as SmolLM2 does.
    torch.manual_seed(0)
    model = classify.load_model(tiny_model_dir, {"negative": 0, "positive": 1}).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    pad = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    assert model.config.pad_token_id == pad
    rows = [{"input_ids": [5, 6, 7, 8, 9, 10], "label": 0}, {"input_ids": [11, 12], "label": 1}]
    with torch.no_grad():
        batched = classify.logits(model, classify.collate(rows, pad))
        alone = [classify.logits(model, classify.collate([row], pad))[0] for row in rows]
    # Same fp32 math on fewer columns: equal to rounding.
    torch.testing.assert_close(batched, torch.stack(alone), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_decoder_classifier_learns_and_exports_its_head(tiny_model_dir, splits, tmp_path, method):
    config = TrainConfig(
        method=method,
        max_steps=40,
        learning_rate=3e-3 if method == "full" else 1e-2,
        micro_batch_size=16,
        eval_every=10,
        class_weights=True,
        precision="fp32",
    )
    report = finetune.run(config, str(tiny_model_dir), *splits, tmp_path / "out")
    assert report.best_validation_loss < report.history[0]["validation_loss"]
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForSequenceClassification"]
    assert exported["pad_token_id"] == 2 and exported["id2label"]["1"] == "positive"
    # The trained head is in the export (LoRA: peft's modules_to_save copy, merged back).
    assert decoder_accuracy(tmp_path / "out", splits[1]) >= 0.9


def test_same_seed_and_config_give_identical_weights_and_losses(encoder, splits, tmp_path):
    """Two runs of one config: bit-identical validation losses and exported weights (data
    order, dropout masks and the fresh head all come from the seed)."""
    config = TrainConfig(
        max_steps=6, learning_rate=1e-3, micro_batch_size=8, eval_every=3, precision="fp32"
    )
    runs = [finetune.run(config, str(encoder), *splits, tmp_path / name) for name in "ab"]
    assert [h for h in runs[0].history if "validation_loss" in h] == [
        h for h in runs[1].history if "validation_loss" in h
    ]
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in "ab"]
    assert weights[0] == weights[1]


@pytest.mark.parametrize(
    ("kind", "method"), [("extended", "full"), ("extended", "lora"), ("plain", "full")]
)
def test_added_tokens_are_learned_and_exported(
    minilm_encoder, unknown_script_splits, tmp_path, kind, method
):
    """The label sits only in characters MiniLM's vocabulary lacks: as [UNK] nothing tells the
    classes apart; with tokenize's extend_vocabulary the grown embeddings learn them (with
    LoRA too: the embeddings then train in full and are merged into the export)."""
    train, validation, _ = unknown_script_splits[kind]
    config = TrainConfig(
        method=method,
        max_steps=40,
        learning_rate=1e-2,
        embedding_learning_rate=3e-2,
        micro_batch_size=16,
        eval_every=10,
        precision="fp32",
        lora_target_modules="query,value",
    )
    out = tmp_path / "out"
    finetune.run(config, str(minilm_encoder), train, validation, out)
    added = vocabulary.added_tokens(schema_metadata(train))
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    base_size = len(AutoTokenizer.from_pretrained(minilm_encoder))
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings == base_size + len(added)
    # The exported tokenizer encodes the texts as tokenize did.
    rows = pq.read_table(validation).to_pylist()
    assert [tokenizer(r["text"])["input_ids"] for r in rows] == [r["input_ids"] for r in rows]
    majority = max(sum(r["label"] for r in rows), sum(1 - r["label"] for r in rows)) / len(rows)
    if kind == "plain":
        assert accuracy(out, validation) <= majority + 0.1
    else:
        assert accuracy(out, validation) >= 0.9 > majority + 0.1


def test_embeddings_get_their_own_learning_rate(encoder):
    model = classify.load_model(encoder, {"negative": 0, "positive": 1})
    embedding = model.get_input_embeddings().weight
    groups = optim.param_groups(model, 0.1, embedding_lr=5e-2)
    assert [g["params"] for g in groups if g.get("lr") == 5e-2] == [[embedding]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert all(all(p is not embedding for p in g["params"]) for g in groups[:2])
    assert len(optim.param_groups(model, 0.1)) == 2
