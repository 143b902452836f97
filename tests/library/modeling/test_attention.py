"""Variable-length attention for packed rows (modeling/attention.py) and the lean loss it feeds
(lm.loss_sum): per-sample attention without a mask, outputs and gradients.

Tolerances come from the dtype: fp32 results are compared with an fp64 reference at a few
hundred units of fp32 rounding (sums over a few hundred terms); bf16 at a few bf16 units.
The CUDA kernel (flash varlen) is checked by tests/bench/bench_gpu.py on a GPU."""

from __future__ import annotations

import pytest
import torch
from fixtures.packed_rows import packed, samples, tiny_llama

from sftpipe.modeling import attention, lm

FP32 = torch.finfo(torch.float32).eps  # 1.2e-7
BF16 = torch.finfo(torch.bfloat16).eps  # 7.8e-3


def reference(q, k, v, lengths, scale):
    """fp64 causal attention, one sample at a time, written out (softmax of masked scores).
    q (tokens, heads, dim), k/v (tokens, kv_heads, dim)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].double().transpose(0, 1) for t in (q, k, v))
        scores = qs @ ks.transpose(-1, -2) * scale
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        outs.append((weights @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs)


def qkv(tokens, heads, kv_heads, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(tokens, h, dim, generator=generator).to(dtype).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    ]


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 300 * FP32), (torch.bfloat16, 4 * BF16)]
)
@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query heads
def test_varlen_attention_equals_per_sample_attention_outputs_and_gradients(dtype, atol, kv_heads):
    lengths = [7, 1, 12, 5, 3]  # a one-token sample, and samples of both rows' padding
    q, k, v = qkv(sum(lengths), 4, kv_heads, 16, dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    scale = 16**-0.5
    out = attention.varlen_attention(q, k, v, cu, max(lengths), scale)
    expected = reference(q, k, v, lengths, scale)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=atol)

    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad((out.double() * upstream).sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected_grads = torch.autograd.grad(
        (reference(*leaves, lengths, scale) * upstream).sum(), leaves
    )
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=4 * atol, rtol=4 * atol)


def test_cu_seq_lens_restart_at_position_zero_and_never_span_rows():
    positions = torch.tensor(
        [
            [0, 1, 2, 0, 1, 0, 1, 2],  # samples of 3, 2 and 3 tokens
            [0, 1, 2, 3, 4, 5, 0, 1],  # 6 tokens, then padding (positions 0, 1)
            [0, 1, 2, 3, 4, 5, 6, 7],  # continues the previous row's count: a new sample
        ]
    )
    assert attention.cu_seq_lens(positions).tolist() == [0, 3, 5, 8, 14, 16, 24]


def test_packed_rows_through_varlen_attention_equal_samples_alone(monkeypatch):
    """The model with varlen attention on packed rows gives each sample the logits it gets
    alone (stock SDPA), and the loss and gradients of the plain rows; transformers never scans
    the positions for packing nor builds a mask."""
    import transformers.masking_utils as masking

    model, stock = tiny_llama(), tiny_llama()
    assert attention.use(model)
    rows = samples([3, 7, 11, 4, 8])
    batch = lm.collate([packed(rows[:3]), packed(rows[3:])], pad_id=0)  # second row padded
    assert attention.batch_kwargs(batch, model)  # the precomputed boundaries reach the model
    scans = []
    monkeypatch.setattr(
        masking,
        "find_packed_sequence_indices",
        lambda p: scans.append(p) or pytest.fail("positions scanned for packing"),
    )

    hidden = {}
    model.model.register_forward_hook(lambda m, a, out: hidden.update(h=out[0]))
    loss, count = lm.loss_sum(model, batch)
    loss.backward()
    assert not scans

    for i, row in enumerate(rows):
        r = 0 if i < 3 else 1
        offset = sum(len(x["input_ids"]) for x in rows[3 * r : i])
        alone = stock.model(input_ids=torch.tensor([row["input_ids"]])).last_hidden_state[0]
        n = len(row["input_ids"])
        got = hidden["h"][r, offset : offset + n]
        torch.testing.assert_close(got, alone, atol=300 * FP32, rtol=300 * FP32)

    stock.zero_grad()
    plain_loss, plain_count = lm.loss_sum(stock, lm.collate(rows, pad_id=0))
    plain_loss.backward()
    assert count == plain_count == sum(len(r["input_ids"]) - 1 for r in rows)
    torch.testing.assert_close(loss, plain_loss, atol=300 * FP32 * count, rtol=300 * FP32)
    for (name, p), q in zip(model.named_parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=300 * FP32, msg=name)


def test_without_precomputed_boundaries_the_positions_give_them():
    model = tiny_llama()
    assert attention.use(model)
    rows = samples([3, 7, 11])
    batch = lm.collate([packed(rows)], pad_id=0)
    with torch.no_grad():
        fast = model(**{k: batch[k] for k in ("input_ids", "position_ids")}, use_cache=False)
        given = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            use_cache=False,
            **attention.batch_kwargs(batch, model),
        )
    torch.testing.assert_close(fast.logits, given.logits, atol=0, rtol=0)
    assert lm.isolates_packed_samples(model, torch.device("cpu"))


def test_generation_steps_with_a_cache_fall_back_to_sdpa():
    """A KV-cache step (query shorter than the keys) is not varlen's: stock SDPA serves it, so
    greedy decoding from an unpadded prompt matches the stock model."""
    model, stock = tiny_llama(), tiny_llama()
    assert attention.use(model)
    prompt = torch.tensor([[5, 9, 11, 40]])
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert (
        model.generate(prompt, **settings).tolist() == stock.generate(prompt, **settings).tolist()
    )
