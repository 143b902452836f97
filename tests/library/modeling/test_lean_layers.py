import copy

import pytest
import torch
import torch.nn.functional as F
from fixtures.tiny_model import TINY_LLAMA
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from sftpipe.modeling import lean_layers

BF16 = torch.bfloat16


@pytest.fixture
def models():
    torch.manual_seed(0)
    stock = LlamaForCausalLM(LlamaConfig(vocab_size=300, **TINY_LLAMA))
    lean = copy.deepcopy(stock)
    # 2 layers x (2 norms + MLP) + the final norm
    assert lean_layers.apply(lean) == 2 * 3 + 1
    return stock, lean


def loss_and_grads(model, ids, autocast):
    model.zero_grad()
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_same_loss_and_gradients_in_fp32(models):
    stock, lean = models
    ids = torch.randint(0, 300, (2, 17))
    stock_loss, stock_grads = loss_and_grads(stock, ids, autocast=False)
    lean_loss, lean_grads = loss_and_grads(lean, ids, autocast=False)
    assert lean_loss == pytest.approx(stock_loss, rel=1e-6)
    assert relative_error(lean_grads, stock_grads) < 1e-5


def test_under_bf16_autocast_the_difference_is_within_bf16_rounding(models):
    stock, lean = models
    ids = torch.randint(0, 300, (2, 17))
    _, exact = loss_and_grads(stock, ids, autocast=False)
    stock_loss, stock_grads = loss_and_grads(stock, ids, autocast=True)
    lean_loss, lean_grads = loss_and_grads(lean, ids, autocast=True)
    assert lean_loss == pytest.approx(stock_loss, rel=1e-3)
    # lean vs stock differ by less than stock bf16 differs from fp32
    assert relative_error(lean_grads, stock_grads) < relative_error(stock_grads, exact)


def saved_bytes(model, ids):
    """Bytes of the tensors autograd keeps for backward during one forward under autocast
    (a storage kept by several nodes is counted once)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    keep = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    with keep, torch.autocast("cpu", dtype=BF16):
        model(input_ids=ids, labels=ids)
    return sum(storages.values())


def test_keeps_less_for_backward(models):
    stock, lean = models
    ids = torch.randint(0, 300, (4, 128))
    assert saved_bytes(lean, ids) < 0.8 * saved_bytes(stock, ids)


def test_swiglu_backward_is_autograd_own():
    torch.manual_seed(0)
    gate = torch.randn(5, 8, dtype=BF16, requires_grad=True)
    up = torch.randn(5, 8, dtype=BF16, requires_grad=True)
    grad = torch.randn(5, 8, dtype=BF16)
    expected = torch.autograd.grad(F.silu(gate) * up, (gate, up), grad)
    lean = lean_layers._SwiGLU.apply(gate, up)
    assert torch.equal(lean, F.silu(gate) * up)
    for got, want in zip(torch.autograd.grad(lean, (gate, up), grad), expected, strict=True):
        assert torch.equal(got, want)
    doubles = (gate.detach().double().requires_grad_(), up.detach().double().requires_grad_())
    assert torch.autograd.gradcheck(lean_layers._SwiGLU.apply, doubles)


def test_rms_norm_gradients_match_the_stock_norm():
    torch.manual_seed(0)
    stock = LlamaRMSNorm(6)
    torch.nn.init.normal_(stock.weight)
    x = torch.randn(2, 3, 6, requires_grad=True)
    grad = torch.randn(2, 3, 6)
    want = torch.autograd.grad(stock(x), (x, stock.weight), grad)
    lean = lean_layers._RMSNorm.apply(x, stock.weight, stock.variance_epsilon, torch.float32)
    got = torch.autograd.grad(lean, (x, stock.weight), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


class OnePlusWeightNorm(LlamaRMSNorm):
    """Gemma's norm: scales by (1 + weight)."""

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return hidden_states * torch.rsqrt(variance + self.variance_epsilon) * (1 + self.weight)


def test_a_norm_with_other_math_keeps_its_own_forward():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, **TINY_LLAMA))
    odd = OnePlusWeightNorm(TINY_LLAMA["hidden_size"])
    torch.nn.init.normal_(odd.weight)
    model.model.layers[0].input_layernorm = odd
    assert lean_layers.apply(model) == 2 * 3 + 1 - 1
    assert "forward" not in vars(odd)


def test_gpt2_gets_the_fused_gelu_and_the_same_gradients():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    stock = GPT2LMHeadModel(config)
    lean = copy.deepcopy(stock)
    assert lean_layers.apply(lean) == 2  # one GELU per block; nothing else is Llama-style
    ids = torch.randint(0, 300, (2, 17))
    stock_loss, stock_grads = loss_and_grads(stock, ids, autocast=False)
    lean_loss, lean_grads = loss_and_grads(lean, ids, autocast=False)
    assert lean_loss == pytest.approx(stock_loss, rel=1e-6)
    assert relative_error(lean_grads, stock_grads) < 1e-5
    assert saved_bytes(lean, ids) < saved_bytes(stock, ids)
