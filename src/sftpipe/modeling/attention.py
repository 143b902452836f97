"""Variable-length attention for packed rows: each sample attends only to itself, with no
[length x length] mask.

A packed row holds several samples whose `position_ids` restart at 0. transformers' SDPA path
keeps them apart by building a dense block-causal boolean mask per forward (batch x length^2:
8 x 2048^2 = 32 MiB, rebuilt every micro-batch, and SDPA with an arbitrary mask cannot use the
flash kernel). Here the samples are described by their cumulative lengths over the flattened
batch (`cu_seq_lens`, computed once per batch on the host by `lm.collate`) and attention runs
per sample:

- on CUDA in bf16/fp16: PyTorch's own flash-attention varlen kernel
  (`torch.nn.attention.varlen.varlen_attn`, causal, grouped-query heads natively), which has a
  backward and a fake implementation, so it also runs under `torch.compile`;
- elsewhere (CPU, fp32): PyTorch's SDPA once per sample, causal (cost sum(len_i^2), exact).

Installed as a transformers attention implementation (`use`). It is a TRAINING implementation:
no attention-mask function is registered, so transformers neither builds a mask nor scans
position_ids for packing (a host synchronization per forward). Training rows are right-padded
(`lm.collate`), where causal attention alone never lets a real token see padding; left-padded
batches (generation) must not use it, and the name never reaches a saved config (transformers
does not serialize it), so an exported model loads with its default attention.

Without precomputed `cu_seq_lens` (e.g. a direct model call with packed position_ids) the
samples are found from the position_ids here, which costs one host synchronization.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch
import torch.nn.functional as F

NAME = "sftpipe_varlen"


def cu_seq_lens(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative sample boundaries (int32, starting at 0, ending at batch x length) of rows
    whose positions restart at 0 per sample. A sample starts where a position does not follow
    the previous one, and at every row's start: samples never span rows."""
    positions = position_ids.reshape(position_ids.shape[0], -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    boundaries = torch.nonzero(starts.reshape(-1)).reshape(-1)
    end = torch.tensor([positions.numel()], device=positions.device)
    return torch.cat([boundaries, end]).to(torch.int32)


def _find_varlen_kernel() -> tuple[Any, frozenset[str]] | None:
    """PyTorch's varlen attention and the keyword arguments this release takes (torch 2.13 has
    `window_size` and `enable_gqa`; earlier releases take `is_causal`), or None before it
    existed."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


# Looked up once, at import: a module constant, which torch.compile reads without a graph break.
_VARLEN = _find_varlen_kernel()


def _flash_varlen_serves(query: torch.Tensor, dropout: float) -> bool:
    return (
        _VARLEN is not None
        and query.device.type == "cuda"
        and query.dtype in (torch.float16, torch.bfloat16)
        and dropout == 0.0
        and query.shape[-1] <= 256  # the flash kernels' head-dimension limit
    )


def _per_sample(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu: torch.Tensor,
    scale: float | None,
    dropout: float,
) -> torch.Tensor:
    """Causal SDPA one sample at a time. query (tokens, heads, dim) -> same shape."""
    bounds = cu.tolist()
    grouped = query.shape[1] != key.shape[1]
    pieces = []
    for start, end in itertools.pairwise(bounds):
        q, k, v = (t[start:end].transpose(0, 1)[None] for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=grouped
        )
        pieces.append(out[0].transpose(0, 1))
    return torch.cat(pieces)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu: torch.Tensor,
    max_length: int,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention within each sample of a flattened batch.

    query (tokens, heads, dim); key, value (tokens, kv_heads, dim) with heads a multiple of
    kv_heads; `cu`: cumulative sample lengths (int32, on the tensors' device); `max_length`: an
    upper bound of the longest sample (the row width will do). Returns (tokens, heads, dim)."""
    if _flash_varlen_serves(query, dropout):
        varlen_attn, takes = _VARLEN  # type: ignore[misc]
        options: dict[str, Any] = {"scale": scale}
        if "window_size" in takes:
            options["window_size"] = (-1, 0)  # causal
        else:
            options["is_causal"] = True
        if query.shape[1] != key.shape[1]:
            if "enable_gqa" in takes:
                options["enable_gqa"] = True
            else:  # an older release: one key/value head per query head
                group = query.shape[1] // key.shape[1]
                key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        return varlen_attn(query, key, value, cu, cu, max_length, max_length, **options)
    return _per_sample(query, key, value, cu, scale, dropout)


def _kernel_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's on that device (the projections' output dtype
    under autocast, which RoPE may have promoted to fp32), else the query's."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (batch, heads, length, dim), key and
    value (batch, kv_heads, kv_length, dim); returns (batch, length, heads, dim)."""
    batch, heads, length, dim = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal or key.shape[2] != length or attention_mask is not None:
        # Not a causal self-attention over the whole row (a KV-cache step, an encoder, an
        # explicit mask): transformers' own SDPA function.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=query.device)[None]
        cu = cu_seq_lens(positions.expand(batch, -1))
    cu = cu.to(device=query.device, dtype=torch.int32, non_blocking=True)
    max_length = int(kwargs.get("max_length_q") or length)
    dtype = _kernel_dtype(query)
    flat = [
        t.transpose(1, 2).reshape(batch * length, t.shape[1], dim).to(dtype)
        for t in (query, key, value)
    ]
    with torch.autocast(query.device.type, enabled=False):
        out = varlen_attention(*flat, cu, max_length, scaling, dropout if module.training else 0.0)
    return out.reshape(batch, length, heads, dim), None


def use(model: Any) -> bool:
    """Give a causal LM that attends with SDPA this attention; True if it did."""
    from transformers import AttentionInterface

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, attention_forward)
    model.set_attn_implementation(NAME)
    return config._attn_implementation == NAME


def batch_kwargs(batch: dict[str, torch.Tensor], model: Any) -> dict[str, Any]:
    """The model kwargs that hand a packed batch's precomputed sample boundaries to this
    attention (none for other attentions or plain rows). The row width bounds the longest
    sample, so no device value is read back."""
    cu = batch.get("cu_seq_lens")
    if cu is None or getattr(model.config, "_attn_implementation", None) != NAME:
        return {}
    width = batch["input_ids"].shape[1]
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": width, "max_length_k": width}
