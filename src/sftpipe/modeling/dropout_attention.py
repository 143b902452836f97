"""Attention with dropout on CPU, ~3x faster than PyTorch's SDPA for the same function.

PyTorch's `scaled_dot_product_attention` has no fused CPU kernel for `dropout_p > 0`: it takes
its math path, which draws one Bernoulli sample per attention weight (most of its time) and
converts the weights between bf16 and fp32 several times. GPT-2-style models train with
attention dropout (`attn_pdrop=0.1`), so for them attention was most of a training step on CPU.

This attention computes the same function in one autograd Function:
- the keep mask comes from 16 random bits per weight (four per 64-bit draw), so a weight is
  dropped with probability round(p * 65536) / 65536 (0.1000061 for p = 0.1), and the kept
  weights are scaled by the exact inverse of that keep probability, so the expectation is
  unchanged; the draws come from the torch generator, so a seeded run repeats;
- softmax and its backward run in the input dtype (PyTorch's CPU kernels accumulate in fp32),
  with no extra fp32 copies of the weights; it keeps q, k, v, the weights and the keep mask.

tiny GPT-2 (4 heads x 64, 8 x 256 tokens, bf16): 18 ms forward + backward per layer instead of
52 ms; outputs and gradients within bf16 rounding of an fp64 reference (tested).

Installed as a transformers attention implementation only on CPU models whose config has
attention dropout; every call it cannot serve (no dropout, eval mode, grouped-query heads, a
float mask, another device) goes to transformers' SDPA attention unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch

NAME = "sftpipe_cpu_dropout"
_LEVELS = 1 << 16  # a weight's 16 random bits


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A boolean keep mask (weight kept with probability 1 - round(p * 2^16) / 2^16) and the
    scale that keeps the expectation unchanged."""
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None)  # all 64 bits uniform (the default range leaves the top one 0)
    dropped_levels = round(p * _LEVELS)
    keep = words.view(torch.int16)[:count].view(shape) >= dropped_levels - _LEVELS // 2
    return keep, _LEVELS / (_LEVELS - dropped_levels)


class _DropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, v, allowed: torch.Tensor, scale: float, p: float):
        scores = torch.matmul(q * scale, k.transpose(-1, -2))
        scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, -1)
        keep, rescale = _keep_mask(weights.shape, p, q.device)
        ctx.save_for_backward(q, k, v, weights, keep)
        ctx.scale, ctx.rescale = scale, rescale
        return torch.matmul((weights * rescale).mul_(keep), v)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        q, k, v, weights, keep = ctx.saved_tensors
        grad = grad.to(q.dtype)
        grad_v = torch.matmul((weights * ctx.rescale).mul_(keep).transpose(-1, -2), grad)
        grad_weights = torch.matmul(grad, v.transpose(-1, -2)).mul_(keep)
        grad_scores = torch.ops.aten._softmax_backward_data(grad_weights, weights, -1, q.dtype)
        grad_scores.mul_(ctx.rescale * ctx.scale)
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, None, None, None


def dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    p: float,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale, masked where `allowed` is False), dropout `p`, times v.
    q, k, v: (batch, heads, length, head_dim); allowed broadcasts to (batch, heads, len, len)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))
    with torch.autocast("cpu", enabled=False):
        return _DropoutAttention.apply(q, k, v, allowed, scale, p)


def _attention_forward(
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
    """transformers' attention-function signature; returns (batch, length, heads, head_dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    served = (
        dropout > 0
        and query.device.type == "cpu"
        and query.shape[1] == key.shape[1]
        and key.shape[2] == length
        and (attention_mask is None or attention_mask.dtype == torch.bool)
    )
    if not served:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        attention_mask = torch.ones(length, length, dtype=torch.bool, device=query.device)
        if causal:
            attention_mask = attention_mask.tril()
    out = dropout_attention(query, key, value, attention_mask, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None


_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


def _attention_dropout(config: Any) -> float:
    return max(float(getattr(config, name, 0.0) or 0.0) for name in _DROPOUT_FIELDS)


def use(model: Any) -> bool:
    """Give a CPU model that attends with SDPA and has attention dropout this attention; True
    if it did. The name never reaches a saved config (transformers does not serialize it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = getattr(model, "config", None)
    if (
        config is None
        or getattr(config, "_attn_implementation", None) != "sdpa"
        or _attention_dropout(config) <= 0
        or model.device.type != "cpu"
    ):
        return False
    AttentionInterface.register(NAME, _attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return config._attn_implementation == NAME
