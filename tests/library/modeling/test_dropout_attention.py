"""CPU attention with dropout: the same function as SDPA, its gradients, its drop rate, and its
use inside real transformers models (GPT-2 with packed rows, BERT with padding)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from sftpipe.modeling import dropout_attention
from sftpipe.modeling.dropout_attention import _keep_mask
from sftpipe.modeling.dropout_attention import dropout_attention as attend


def _packed_mask(batch: int, length: int) -> torch.Tensor:
    """Causal, block-diagonal: each row holds three samples."""
    segment = torch.arange(length).div(max(1, length // 3), rounding_mode="floor")
    same = segment[:, None] == segment[None, :]
    return (same & torch.ones(length, length, dtype=torch.bool).tril()).expand(batch, 1, -1, -1)


def _qkv(dtype: torch.dtype, shape=(2, 3, 12, 8)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for _ in "qkv"]


def test_without_dropout_it_is_sdpa():
    q, k, v = _qkv(torch.float32)
    mask = _packed_mask(2, 12)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = attend(q, k, v, mask, p=0.0)
    grad = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, (q, k, v), grad),
        torch.autograd.grad(expected, (q, k, v), grad),
        strict=True,
    ):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out, expected)


def test_gradients_with_dropout():
    q, k, v = _qkv(torch.float64, (1, 2, 6, 4))
    mask = _packed_mask(1, 6)

    def seeded(q, k, v):
        torch.manual_seed(3)  # the same keep mask on every call
        return attend(q, k, v, mask, p=0.3)

    assert torch.autograd.gradcheck(seeded, (q, k, v))


def test_drop_rate_and_seeded_repeat():
    shape = torch.Size((4, 1000, 1000))
    torch.manual_seed(0)
    keep, rescale = _keep_mask(shape, 0.1, torch.device("cpu"))
    torch.manual_seed(0)
    again, _ = _keep_mask(shape, 0.1, torch.device("cpu"))
    assert torch.equal(keep, again)
    kept = keep.double().mean().item()
    assert abs(kept - (1 - 6554 / 65536)) < 1e-3  # 4M draws: ~6 standard deviations
    assert rescale == pytest.approx(1 / (1 - 6554 / 65536))
    # every 16-bit lane of the 64-bit draws is uniform (the top one too)
    lanes = keep.flatten()[: 4 * (keep.numel() // 4)].view(-1, 4).double().mean(0)
    assert torch.all((lanes - kept).abs() < 3e-3)


def test_bf16_within_rounding_of_fp64():
    reference = _qkv(torch.float64, (4, 4, 64, 32))
    mask = _packed_mask(4, 64)
    grad = torch.randn(4, 4, 64, 32, dtype=torch.float64)
    results = []
    for dtype in (torch.float64, torch.bfloat16):
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in reference)
        torch.manual_seed(1)
        out = attend(q, k, v, mask, p=0.1)
        grads = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
        results.append([t.double() for t in (out, *grads)])
    for got, want in zip(*results[::-1], strict=True):
        assert ((got - want).norm() / want.norm()).item() < 1e-2  # bf16 eps: 7.8e-3


def _set_dropout(model: torch.nn.Module, attention_p: float) -> None:
    """Attention dropout `attention_p` (>0 keeps the fast path on), all other dropout off."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            attention = name.endswith(("attn_dropout", "self.dropout"))
            module.p = attention_p if attention else 0.0


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """How often the fast attention ran."""
    seen: list[int] = []
    forward = dropout_attention._DropoutAttention.forward

    def counted(*args):
        seen.append(1)
        return forward(*args)

    monkeypatch.setattr(dropout_attention._DropoutAttention, "forward", staticmethod(counted))
    return seen


def _with_stock_twin(model_class, config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A model in training mode on the fast attention with nothing dropped (a drop probability
    that rounds to no dropped level), and the same weights on stock SDPA in eval mode."""
    torch.manual_seed(0)
    model = model_class(config)
    stock = model_class(config).eval()
    stock.load_state_dict(model.state_dict())
    assert dropout_attention.use(model)
    model.train()
    _set_dropout(model, 1e-9)
    return model, stock


def test_gpt2_packed_samples_stay_apart(calls, tmp_path):
    config = GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    model, stock = _with_stock_twin(GPT2LMHeadModel, config)
    ids = torch.randint(0, 100, (1, 9))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    assert len(calls) == 2  # one per layer
    alone = stock(input_ids=ids[:, 5:], use_cache=False).logits
    torch.testing.assert_close(packed[:, 5:], alone)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert dropout_attention.NAME not in json.dumps(saved)


def test_bert_padding_mask(calls):
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    model, stock = _with_stock_twin(BertForSequenceClassification, config)
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    got = model(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == 2
    torch.testing.assert_close(got, stock(input_ids=ids, attention_mask=mask).logits)


def test_left_alone_without_dropout_or_in_eval(calls):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, attn_pdrop=0))
    assert not dropout_attention.use(model)
    assert model.config._attn_implementation == "sdpa"
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    assert dropout_attention.use(model)
    model.eval()  # no dropout: transformers' SDPA attention
    model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)
    assert not calls


def test_gradient_checkpointing_replays_the_same_dropout():
    """Recomputing a block in backward must draw the same keep mask as its forward did."""

    def gradients(checkpointing: bool) -> torch.Tensor:
        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4,
            resid_pdrop=0, embd_pdrop=0,
        )  # fmt: skip
        model = GPT2LMHeadModel(config)
        assert dropout_attention.use(model)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        ids = torch.randint(0, 100, (2, 16))
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    plain = gradients(False)
    assert plain.abs().max() > 0
    torch.testing.assert_close(gradients(True), plain, rtol=0, atol=1e-6)
