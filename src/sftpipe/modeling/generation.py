"""Greedy generation for evaluation and chat: batched (prompts of similar length together, left
padding), with the KV cache, stopping at any end-of-turn token, within a token budget."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sftpipe.data.chat_templates import render
from sftpipe.modeling import lm
from sftpipe.progress import Progress

PROGRESS_EVERY_S = 5.0  # generation progress lines at most this often (and at the end)


@dataclass(frozen=True)
class Generation:
    """One greedy answer: its text, its length in tokens (EOS excluded) and whether it ended
    with an end-of-turn/EOS token within the budget."""

    text: str
    tokens: int
    ended: bool


@dataclass(frozen=True)
class GenerationRun:
    generations: list[Generation]
    seconds: float

    @property
    def tokens(self) -> int:
        """Generated tokens, EOS included (what the model computed)."""
        return sum(g.tokens + g.ended for g in self.generations)


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a turn: the tokenizer's EOS and the model's generation EOS ids."""
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def context_length(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def generation_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype | None:
    """Autocast for generation on GPUs only. On CPUs fp32 decodes as fast as bf16 autocast in
    batches (SmolLM2-135M, batch 8: 95 vs 106 tokens/s), 2.3x faster one prompt at a time
    (autocast re-casts every weight at every step), and gives the same greedy answers batched
    or not (bf16: half of them differ)."""
    return dtype if device.type == "cuda" else None


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    label: str = "generate",
) -> GenerationRun:
    """Greedy answers to chat prompts: deterministic, batched (prompts of similar length
    together, left padding) with the KV cache, at most `max_new_tokens` each."""
    model.eval()
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # an over-long prompt keeps its latest turns
    stop_ids = eos_token_ids(model, tokenizer)
    context = context_length(model)
    texts = [render(tokenizer, p, add_generation_prompt=True) for p in prompts]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    results: dict[int, Generation] = {}
    progress = Progress(label, len(texts), "prompts")
    start, generated, shown = time.perf_counter(), 0, 0.0
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        encode: dict[str, Any] = {"add_special_tokens": False, "padding": True}
        if context:
            encode |= {"truncation": True, "max_length": max(1, context - max_new_tokens)}
        batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", **encode).to(device)
        with lm.autocast(device, dtype):
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        for index, row in zip(chunk, out[:, batch["input_ids"].shape[1] :].tolist(), strict=True):
            end = next((pos for pos, token in enumerate(row) if token in stop_ids), None)
            kept = row if end is None else row[:end]
            text = tokenizer.decode(kept, skip_special_tokens=True).strip()
            results[index] = Generation(text, len(kept), end is not None)
            generated += len(kept) + (end is not None)
        elapsed = time.perf_counter() - start
        if elapsed - shown >= PROGRESS_EVERY_S or len(results) == len(texts):
            progress.update(len(results), f"{generated / max(elapsed, 1e-9):.1f} tokens/s")
            shown = elapsed
    return GenerationRun([results[i] for i in range(len(texts))], time.perf_counter() - start)
