"""Causal-LM math shared by finetune and evaluate: batching, token-summed loss, precision."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from sftpipe.modeling import attention
from sftpipe.modeling.distributed import SINGLE, World

IGNORE_INDEX = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")  # what collate feeds the model


def collate(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenized rows into tensors. Padding never carries a label (IGNORE_INDEX) and is
    never found by token id (pad may equal end-of-turn).

    Plain rows (one conversation each) get an attention mask. Packed rows (several samples,
    `position_ids` restarting at 0 per sample) get position_ids and no mask: the model then
    keeps the samples apart (see `isolates_packed_samples`), and trailing padding, a segment
    of its own, is never attended to by real tokens under the causal mask."""
    packed = "position_ids" in rows[0]
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask_or_positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        if packed:
            mask_or_positions[i, :n] = torch.tensor(row["position_ids"])
            mask_or_positions[i, n:] = torch.arange(width - n)
        else:
            mask_or_positions[i, :n] = 1
    key = "position_ids" if packed else "attention_mask"
    batch = {"input_ids": input_ids, "labels": labels, key: mask_or_positions}
    batch |= loss_positions(labels)
    # Sample boundaries for varlen attention (modeling/attention.py), found here on the host;
    # a plain row is one sample (its right padding is never attended to by real tokens).
    if packed:
        batch["cu_seq_lens"] = attention.cu_seq_lens(mask_or_positions)
    else:
        batch["cu_seq_lens"] = torch.arange(0, len(rows) * width + 1, width, dtype=torch.int32)
    return batch


def loss_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where the loss is scored, found on the host where the batch is built: `loss_index`, the
    flat indices (into batch x length) of the positions whose next token carries a label, and
    `loss_targets`, those labels in the same order. With them the loss selects hidden states
    by index; a boolean mask or a count read on the GPU would wait for the device every
    micro-batch."""
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return {
        "loss_index": torch.nonzero(predicts.reshape(-1)).reshape(-1),
        "loss_targets": labels[:, 1:][labels[:, 1:] != IGNORE_INDEX],
    }


@torch.no_grad()
def isolates_packed_samples(model: Any, device: torch.device) -> bool:
    """Whether this model, given position_ids that restart at 0, keeps packed samples from
    attending to each other: two short sequences packed into one row must give the logits they
    give alone."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = core.training
    core.eval()
    vocab = core.get_input_embeddings().num_embeddings
    first = torch.arange(3, 8, device=device).remainder(vocab)[None]
    second = torch.arange(9, 13, device=device).remainder(vocab)[None]
    alone = core(input_ids=second, use_cache=False).logits
    positions = torch.cat([torch.arange(5), torch.arange(4)]).to(device)[None]
    packed = core(
        input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False
    ).logits[:, 5:]
    core.train(was_training)
    return bool(torch.allclose(alone, packed, atol=1e-4, rtol=1e-3))


def _projects_hidden_states_directly(model: Any) -> bool:
    """Whether logits are just lm_head(hidden): then only loss-bearing positions need the
    vocabulary projection, which is most of the compute for small models with big vocabularies.
    Models that scale or soft-cap logits take the plain forward path, and so do FSDP roots:
    their own parameters (embeddings, head) are gathered only in their forward."""
    from torch.distributed.fsdp import FSDPModule

    config = model.config
    return (
        model.base_model is not model
        and not isinstance(model, FSDPModule)
        and model.get_output_embeddings() is not None
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) in (None, 1.0)
    )


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over loss-bearing positions, and their count.

    Summing (not averaging) lets the caller normalize by the loss-bearing tokens of a whole
    gradient-accumulation window, so micro-batching never changes the gradient.
    """
    if "loss_index" not in batch:  # a batch not built by collate
        batch = batch | loss_positions(batch["labels"])
    index, targets = batch["loss_index"], batch["loss_targets"]
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch} | {"use_cache": False}
    inputs |= attention.batch_kwargs(batch, model)
    if _projects_hidden_states_directly(model):
        hidden = model.base_model(**inputs).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        loss = chunked_cross_entropy(model.get_output_embeddings(), hidden, targets)
    else:
        logits = model(**inputs).logits
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, index)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, index.numel()


LOGITS_CHUNK_BYTES = 64 << 20  # fp32 logits per chunk of chunked_cross_entropy
SHAPE_ROWS = 64  # chunks are padded to a multiple of this many rows


def _pad_rows(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with zero rows appended up to a multiple of SHAPE_ROWS rows. The number of
    loss-bearing tokens changes every step; on CPUs, oneDNN caches a primitive (with its own
    buffers) per matmul shape, so unpadded chunks grow memory step after step (tiny GPT-2,
    bench-train, bf16: 2.1 GB peak RSS after 60 steps instead of ~1 GB)."""
    missing = -len(tensor) % SHAPE_ROWS
    if not missing:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((missing, *tensor.shape[1:]))])


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, `rows` at a time, with
    the gradients computed chunk by chunk in forward and scaled in backward: the logits of all
    loss-bearing tokens, their fp32 copies and their gradients never exist at once, and
    nothing is recomputed. Matmuls run in the autocast dtype, as the model's own head would."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows):
        device = hidden.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        weight_lp = weight.to(low) if low is not None else weight
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(targets), rows):
            real = min(rows, len(targets) - start)
            chunk = _pad_rows(hidden[start : start + real].to(weight_lp.dtype))
            chunk_targets = _pad_rows(targets[start : start + real, None])
            logits = chunk @ weight_lp.t()
            logits32 = logits.float()
            logsumexp = torch.logsumexp(logits32, -1, keepdim=True)
            loss += (logsumexp - logits32.gather(1, chunk_targets))[:real].sum()
            if want_hidden or want_weight:
                grad = torch.exp_(logits32.sub_(logsumexp))  # softmax, in place
                grad.scatter_add_(1, chunk_targets, grad.new_full(chunk_targets.shape, -1.0))
                grad[real:] = 0.0  # padding rows
                grad = grad.to(logits.dtype)
                if want_hidden:
                    grad_hidden[start : start + real] = (grad @ weight_lp)[:real]
                if want_weight:
                    grad_weight += grad.t() @ chunk
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `targets` without the full logits: for
    a large vocabulary their fp32 copies and gradients outweigh the model's activations
    (SmolLM2-135M, 8 x 256 tokens: ~0.4 GB). A head that is not a plain bias-free Linear
    (e.g. with a LoRA adapter) takes the plain path."""
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    rows = LOGITS_CHUNK_BYTES // (4 * head.weight.shape[0]) // SHAPE_ROWS * SHAPE_ROWS
    rows = min(max(rows, SHAPE_ROWS), 16 * SHAPE_ROWS)  # few shapes, whatever the vocabulary
    weight = head.weight
    if not torch.is_grad_enabled():  # needs_input_grad ignores no_grad: no gradients to compute
        hidden, weight = hidden.detach(), weight.detach()
    return _LinearCrossEntropy.apply(hidden, weight, targets, rows)


class TokenLoss(torch.nn.Module):
    """`loss_sum` as a module, so DistributedDataParallel can wrap it (its gradient hooks run
    through `forward`)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_sum(self.model, batch)[0]


def matmul_parameters(model: Any) -> int:
    """Parameters that take part in a matmul per token (the N of 6·N FLOPs per token): all but
    the input embeddings, which are a lookup, unless the output projection shares them (tied
    embeddings, as in SmolLM2). Counting a lookup table would double an encoder's MFU."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embeddings is None or (output is not None and output.weight is embeddings.weight):
        return total
    return total - embeddings.weight.numel()


def cpu_supports_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting (None: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_matmul_flops(device: torch.device, dtype: torch.dtype | None) -> float:
    """The denominator of MFU in FLOP/s: the datasheet dense peak of a known GPU, else measured
    (see `sftpipe.modeling.peak_flops`, which also says which one)."""
    from sftpipe.modeling.peak_flops import peak

    return peak(device, dtype).flops


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batches(rows: Sequence[dict[str, Any]], size: int) -> Iterator[Sequence[dict[str, Any]]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


@torch.no_grad()
def mean_over(
    model: Any,
    rows: Sequence[dict[str, Any]],
    batch_size: int,
    world: World,
    summed: Callable[[Sequence[dict[str, Any]]], tuple[torch.Tensor, int]],
) -> float:
    """Mean of a summed loss over `rows` in eval mode: `summed(chunk)` gives a chunk's loss sum
    and its count. Rows are shared out across data-parallel processes and the sums gathered;
    sorting by length keeps padding low and does not change the result."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(rows, key=lambda row: len(row["input_ids"]))[world.rank :: world.size]
    for chunk in batches(ordered, batch_size):
        loss, n = summed(chunk)
        total, count = total + float(loss), count + n
    model.train(was_training)
    total, count = world.sum(total, count)
    return total / max(count, 1)


def mean_loss(
    model: Any,
    rows: Sequence[dict[str, Any]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    world: World = SINGLE,
) -> float:
    """Token-weighted mean cross-entropy over the loss-bearing tokens of `rows`."""

    def summed(chunk: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, int]:
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        with autocast(device, dtype):
            return loss_sum(model, batch)

    return mean_over(model, rows, batch_size, world, summed)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
