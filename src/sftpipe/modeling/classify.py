"""Sequence classification (sentiment, topics) for the finetune stage: batching, the loss, and
validation. Rows come from tokenize as `input_ids` + `label` (an id of the label map kept in
the Parquet schema metadata under `sftpipe.label_map`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sftpipe.data import tokenized
from sftpipe.errors import SftpipeError
from sftpipe.modeling import lm, models
from sftpipe.modeling.distributed import SINGLE, World


def label_map(path: str | Path) -> dict[str, int] | None:
    """The label -> id map of a classification Parquet file; None for chat data."""
    return tokenized.label_map(path)


def collate(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        attention_mask[i, : len(row["input_ids"])] = 1
    labels = torch.tensor([row["label"] for row in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def class_weights(rows: Sequence[dict[str, Any]], num_labels: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over the examples), so rare classes count as much."""
    counts = Counter(row["label"] for row in rows)
    return torch.tensor([len(rows) / (num_labels * max(counts[k], 1)) for k in range(num_labels)])


def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 class logits of a collated batch (its labels are not the model's input)."""
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return output.logits.float()


class ClassLoss(torch.nn.Module):
    """Summed (optionally class-weighted) cross-entropy of a batch, as a module for DDP."""

    def __init__(self, model: Any, weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("weights", weights, persistent=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(
            logits(self.model, batch), batch["labels"], weight=self.weights, reduction="sum"
        )


def mean_loss(
    model: Any,
    rows: Sequence[dict[str, Any]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    world: World = SINGLE,
) -> float:
    """Mean (unweighted) cross-entropy per example over `rows`."""

    def summed(chunk: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, int]:
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        with lm.autocast(device, dtype):
            loss = F.cross_entropy(logits(model, batch), batch["labels"], reduction="sum")
        return loss, len(chunk)

    return lm.mean_over(model, rows, batch_size, world, summed)


@torch.no_grad()
def log_probabilities(
    model: Any,
    rows: Sequence[dict[str, Any]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """Class log-probabilities of every row (rows x classes, fp32, in the rows' order); rows of
    similar length are batched together so little is padding."""
    model.eval().to(device)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    out = torch.empty((len(rows), model.config.num_labels), dtype=torch.float32)
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in chunk], pad_id).items()}
        with lm.autocast(device, dtype):
            out[chunk] = torch.log_softmax(logits(model, batch), dim=-1).cpu()
    return out


def check_labels(rows: Sequence[dict[str, Any]], labels: dict[str, int], where: str) -> None:
    bad = sorted({row["label"] for row in rows} - set(labels.values()))
    if bad:
        raise SftpipeError(
            where,
            f"label ids {bad} are not in the label map {labels}",
            "tokenize the data again with the same label map",
        )


def load_model(model_dir: Path, labels: dict[str, int], uri: str = "") -> Any:
    """An AutoModelForSequenceClassification with a head sized for `labels` (a fresh head when
    the base is a plain encoder or has another number of classes).

    Decoders (Llama, GPT-2, ...) classify from the last token: transformers' heads take the
    rightmost position whose id is not `config.pad_token_id`, which handles right padding (what
    `collate` does) and left padding alike, but only when that id is the one the batches are
    padded with. A decoder config often has none (GPT-2) or another one than the tokenizer, so
    it is set here from the tokenizer saved with the model, the one `collate` pads with."""
    from transformers import AutoModelForSequenceClassification

    id2label = {i: name for name, i in labels.items()}
    pad_token_id = models.load_tokenizer(model_dir, uri, chat=False).pad_token_id
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            model_dir,
            num_labels=len(labels),
            id2label=id2label,
            label2id=labels,
            pad_token_id=pad_token_id,
            ignore_mismatched_sizes=True,
            dtype="float32",
        )
    except Exception as exc:  # transformers raises many types for unusable weights
        raise SftpipeError(
            uri or str(model_dir),
            f"cannot load a classifier from it ({type(exc).__name__}: {exc})",
            "use an encoder or decoder checkpoint with its config.json",
        ) from None
