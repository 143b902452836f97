"""The model a fine-tuning run trains (or exports into): loaded for the task, placed on its
device with a one-line error when the weights do not fit, with adapters and gradient
checkpointing as configured, and checked against the token ids of the data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftpipe.config import TrainConfig
from sftpipe.data import vocabulary
from sftpipe.errors import SftpipeError
from sftpipe.modeling import attention, distributed, dropout_attention, lean_layers, lm, lora
from sftpipe.modeling import device as placement
from sftpipe.tasks.base import Task


@dataclass
class Data:
    """The tokenized splits and what they say about the task."""

    train_rows: list[dict[str, Any]]
    validation_rows: list[dict[str, Any]]
    labels: dict[str, int] | None  # None: chat SFT of a causal LM
    template: str  # the chat template tokenize rendered with (an override included)
    where: str  # the training split's path, for error messages
    task: Task  # chosen once from the data (sftpipe.tasks)
    added_tokens: list[str] = field(default_factory=list)  # tokenize's extend_vocabulary


def _core(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_model(
    config: TrainConfig,
    model_dir: Path,
    base_model: str,
    labels: dict[str, int] | None,
    device: torch.device,
    task: Task,
    vocab_size: int = 0,
) -> Any:
    """The model to train (or to export into): the base model for the task on `device`, with
    gradient checkpointing and adapters as configured, and input embeddings grown to
    `vocab_size` rows (tokens added by tokenize's extend_vocabulary; 0: as they are)."""
    model = task.load_for_training(config, model_dir, base_model, labels)
    if vocab_size:
        vocabulary.grow_embeddings(model, vocab_size)
    model = place(model, device) if config.method != "qlora" else model
    if config.lean_layers:
        lean_layers.apply(model)
        dropout_attention.use(model)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(
            {"use_reentrant": False}, every_n_layers=config.gradient_checkpointing_every
        )
    if config.method in ("lora", "qlora"):
        # New tokens' embeddings start untrained: with adapters they train in full.
        model = lora.apply(model, config, task.peft_task_type, train_embeddings=bool(vocab_size))
    return model


def place(model: Any, device: torch.device) -> Any:
    """`model` moved to `device`; weights that alone do not fit are one line, not a CUDA
    traceback (the full check, with gradients and optimizer state, follows in build_model)."""
    try:
        return model.to(device)
    except torch.OutOfMemoryError:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        raise SftpipeError(
            "finetune",
            f"the model's weights alone ({weights / placement.GIB:.1f} GiB) do not fit "
            f"{device} memory",
            placement.MEMORY_OPTIONS,
        ) from None


def build_model(
    config: TrainConfig,
    model_dir: Path,
    base_model: str,
    data: Data,
    device: torch.device,
    dtype: torch.dtype | None,
    fsdp: bool,
    vocab_size: int = 0,
) -> Any:
    """The model, placed (or sharded) and checked against the data."""
    # FSDP: load on the CPU; sharding moves each rank's shards to the GPU, so the model never
    # has to fit one GPU whole.
    model = load_model(
        config,
        model_dir,
        base_model,
        data.labels,
        torch.device("cpu") if fsdp else device,
        data.task,
        vocab_size,
    )
    if fsdp:
        distributed.shard(_core(model), device, dtype)
    elif config.method != "qlora":
        placement.check_memory(model, device)  # one line before the first step, not an OOM
    if data.task.token_labels and device.type == "cuda":
        # Packed rows through the flash varlen kernel: no per-forward mask (modeling/attention)
        attention.use(_core(model))
    # In place, so state_dict keys (checkpoints, export) stay those of the plain model; dynamic
    # shapes, since every micro-batch has its own width. Block by block where the model has a
    # block list: one compiled graph serves them all.
    if config.compile and not placement.compile_blocks(model, dynamic=True):
        _core(model).base_model.compile(dynamic=True)
    check_data_fits_model(data.train_rows + data.validation_rows, model, data.where)
    if "position_ids" in data.train_rows[0] and not lm.isolates_packed_samples(model, device):
        raise SftpipeError(
            data.where,
            f"{type(model).__name__} lets packed samples attend to each other",
            "tokenize with --no-packing for this model",
        )
    return model


def check_data_fits_model(rows: Sequence[dict[str, Any]], model: Any, where: str) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    largest = max(max(row["input_ids"]) for row in rows)
    if largest >= vocab:
        raise SftpipeError(
            where,
            f"token id {largest} is outside the model's vocabulary ({vocab})",
            "tokenize with the same base model you fine-tune",
        )
