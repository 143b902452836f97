"""lm.loss_sum scores only loss-bearing positions, never holds [tokens x vocabulary] logits in
fp32, and reads nothing back from the device (no host synchronization per micro-batch).

What runs is recorded with a TorchDispatchMode (every aten op the forward and backward
dispatch, with its outputs): an observer, nothing is replaced."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fixtures.packed_rows import VOCAB, packed, samples, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

from sftpipe.modeling import attention, lm

FP32 = torch.finfo(torch.float32).eps
# ops that make the host wait for a GPU: reading a value, or a shape that depends on values
READS_BACK = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}


class Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.vocab_wide: list[tuple[int, torch.dtype]] = []  # (rows, dtype) of [*, VOCAB] outputs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == VOCAB:
                self.vocab_wide.append((t.numel() // VOCAB, t.dtype))
        return out


def long_samples():
    return samples([30 + 9 * i for i in range(6)], seed=1, prompt_fraction=0.5)


def plain_loss(model, batch):
    """The textbook loss: full logits of every position, fp32 cross-entropy, ignore_index."""
    inputs = {k: batch[k] for k in lm.MODEL_INPUTS if k in batch}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.float().reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )


def test_loss_scores_only_loss_bearing_positions_in_chunks_and_equals_the_plain_loss(
    monkeypatch,
):
    monkeypatch.setattr(lm, "LOGITS_CHUNK_BYTES", 1)  # the smallest chunk: SHAPE_ROWS rows
    model, stock = tiny_llama(), tiny_llama()
    rows = long_samples()
    batch = lm.collate([packed(rows[:3]), packed(rows[3:])], pad_id=0)
    loss_tokens = int((batch["labels"] != -100).sum())
    positions = batch["input_ids"].numel()
    assert loss_tokens > 2 * lm.SHAPE_ROWS  # so that chunking shows

    with Recorder() as recorder:
        loss, count = lm.loss_sum(model, batch)
        loss.backward()
    assert count == loss_tokens
    # Every vocabulary-wide tensor is one chunk: not all positions, not all loss tokens.
    assert recorder.vocab_wide
    assert max(rows for rows, _ in recorder.vocab_wide) == lm.SHAPE_ROWS < loss_tokens < positions

    expected = plain_loss(stock, batch)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=300 * FP32 * count, rtol=300 * FP32)
    for (name, p), q in zip(model.named_parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=300 * FP32, msg=name)


def test_bf16_autocast_loss_keeps_bf16_logits_and_matches_fp32_within_bf16_rounding():
    model = tiny_llama()
    rows = long_samples()
    batch = lm.collate(rows, pad_id=0)
    with Recorder() as recorder, torch.autocast("cpu", dtype=torch.bfloat16):
        loss, count = lm.loss_sum(model, batch)
    chunk = min(1024, max(lm.SHAPE_ROWS, lm.LOGITS_CHUNK_BYTES // (4 * VOCAB)))
    assert all(rows <= chunk for rows, _ in recorder.vocab_wide)
    expected = plain_loss(model, batch)
    bf16 = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(loss / count, expected / count, atol=4 * bf16, rtol=4 * bf16)


def test_loss_reads_nothing_back_from_the_device():
    """With varlen attention and a collated batch (packed or plain), no op in forward or
    backward needs a device value on the host: on a GPU the host keeps queueing work."""
    model = tiny_llama()
    assert attention.use(model)
    rows = long_samples()
    for batch in (lm.collate([packed(rows[:3]), packed(rows[3:])], 0), lm.collate(rows, 0)):
        with Recorder() as recorder:
            loss, _ = lm.loss_sum(model, batch)
            loss.backward()
        assert not recorder.ops & READS_BACK, recorder.ops & READS_BACK
