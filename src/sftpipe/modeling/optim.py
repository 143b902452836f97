"""The fine-tuning optimizer and schedule (AdamW without decay on biases and norms, linear
warmup then cosine or linear decay), and the seed-determined data order of the steps."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from sftpipe.config import TrainConfig
from sftpipe.modeling import distributed


def param_groups(
    model: torch.nn.Module, weight_decay: float, embedding_lr: float = 0.0
) -> list[dict[str, Any]]:
    """Decay matrices only: biases and norm weights (1-D tensors) keep their scale. With
    `embedding_lr`, the input embeddings form a group of their own at that learning rate."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    embedding_ids = set()
    if embedding_lr:
        embeddings = model.get_input_embeddings()  # type: ignore[operator]
        embedding_ids = {id(p) for p in embeddings.parameters() if p.requires_grad}
    rest = [p for p in trainable if id(p) not in embedding_ids]
    groups = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
    ]
    if embedding_ids:
        embedding = [p for p in trainable if id(p) in embedding_ids]
        groups.append({"params": embedding, "weight_decay": weight_decay, "lr": embedding_lr})
    return groups


def lr_factor(
    step: int, total: int, warmup: int, floor: float = 0.1, shape: str = "cosine"
) -> float:
    """Linear warmup to 1, then cosine (or linear) decay to `floor` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    decay = 1 - progress if shape == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * decay


def build_optimizer(
    config: TrainConfig, model: Any, fsdp: bool, total_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW and its warmup-then-decay schedule."""
    optimizer = torch.optim.AdamW(
        param_groups(
            distributed.sharded(model) if fsdp else model,
            config.weight_decay,
            config.embedding_learning_rate,
        ),
        lr=config.learning_rate,
        betas=(0.9, 0.95),
        eps=1e-8,
        # The fused kernel (CPU and CUDA) updates each tensor in one pass: 5.6x faster than
        # foreach on this CPU for SmolLM2-sized weights and no temporaries (0.4 GB less peak).
        # FSDP's sharded DTensor parameters keep the default implementation.
        fused=not fsdp,
    )
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, shape=config.lr_schedule)
    )
    return optimizer, scheduler


def shuffled_windows(
    rows: Sequence[dict[str, Any]], size: int, seed: int
) -> Iterator[list[dict[str, Any]]]:
    """Endless windows of `size` rows (one optimizer step's data), drawn from consecutive epochs
    in seed-determined orders. Every window is full, so every process gets its share."""
    epoch, pending = 0, []
    while True:
        generator = torch.Generator().manual_seed(seed + epoch)
        pending += torch.randperm(len(rows), generator=generator).tolist()
        while len(pending) >= size:
            yield [rows[i] for i in pending[:size]]
            pending = pending[size:]
        epoch += 1
