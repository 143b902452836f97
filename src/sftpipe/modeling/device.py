"""What keeps a GPU busy in the training loop: batches copied without stalls, the loss read back
only when it is logged, blocks compiled one by one, and memory checked before the first step.

- `to_device`: on CUDA, a batch built on the host goes through pinned (page-locked) memory and
  a non-blocking copy, so the host goes on queueing work while it travels;
- `DeviceSum`: the loss of every micro-batch summed on the device; `.value()` (one host
  synchronization) is called at logging steps only;
- `compile_blocks`: `torch.compile` of each transformer block rather than the whole model: all
  blocks share one compiled graph (same code, same shapes), so compiling takes the time of one
  block, and the embedding / loss stay eager;
- `check_memory` and `out_of_memory`: a model that cannot fit the GPU is one line with the
  memory it needs and the options, before the first step; a CUDA out-of-memory error during
  training becomes the same line with the step.
"""

from __future__ import annotations

from typing import Any

import torch

from sftpipe.errors import SftpipeError

MEMORY_OPTIONS = (
    "use --method lora or qlora, --gradient-checkpointing, --distributed-strategy fsdp on "
    "several GPUs, or a smaller --micro-batch-size"
)
GIB = 1 << 30


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on `device`. On CUDA through pinned memory, non-blocking: the copy is ordered
    on the current stream before any kernel that reads it, and the host does not wait."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


class DeviceSum:
    """A running sum of detached scalars kept on their device: adding never synchronizes;
    `value()` reads it (one synchronization) and starts over."""

    def __init__(self) -> None:
        self._total: torch.Tensor | None = None

    def add(self, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._total = value if self._total is None else self._total + value

    def value(self) -> float:
        total, self._total = self._total, None
        return 0.0 if total is None else float(total)


def transformer_blocks(model: Any) -> torch.nn.ModuleList | None:
    """The decoder layers of a transformers model (inside a peft wrapper too), or None."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in core.modules():
        layers = getattr(module, "layers", None) or getattr(module, "h", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers
    return None


def compile_blocks(model: Any, **options: Any) -> int:
    """`torch.compile` each transformer block in place (state_dict keys unchanged); the number
    compiled (0: no block list found, nothing done)."""
    blocks = transformer_blocks(model)
    if blocks is None:
        return 0
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def training_bytes(model: Any, optimizer_bytes_per_parameter: int = 8) -> int:
    """A lower bound of the GPU memory a step needs before activations: the weights, a
    gradient for each trainable weight, and AdamW's two fp32 moments per trainable weight."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    moments = sum(p.numel() for p in trainable) * optimizer_bytes_per_parameter
    return weights + gradients + moments


def check_memory(model: Any, device: torch.device, free_bytes: int | None = None) -> None:
    """One line before the first step if the weights, gradients and optimizer state alone
    exceed the device's free memory (activations come on top). CPU: no check."""
    if device.type != "cuda" and free_bytes is None:
        return
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    needed = training_bytes(model)
    if needed > free_bytes:
        raise SftpipeError(
            "finetune",
            f"the model needs at least {needed / GIB:.1f} GiB of {device} memory for weights, "
            f"gradients and optimizer state before activations, {free_bytes / GIB:.1f} GiB free",
            MEMORY_OPTIONS,
        )


def out_of_memory(error: BaseException, step: int, device: torch.device, kept: str) -> Exception:
    """The one-line error for a CUDA out-of-memory error at `step` (`kept`: which checkpoint
    survives, e.g. 'the last checkpoint is kept')."""
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return SftpipeError(
        "finetune",
        f"out of {device} memory at step {step} (peak {peak / GIB:.1f} GiB allocated); {kept}",
        MEMORY_OPTIONS,
    )
