"""modeling/device.py on the CPU: what can be checked without a GPU (the CUDA paths, pinned
copies and compiled blocks on CUDA, run in tests/bench/bench_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from fixtures.packed_rows import packed, samples, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

from sftpipe.errors import SftpipeError
from sftpipe.modeling import device as dev
from sftpipe.modeling import lm

CPU = torch.device("cpu")


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def test_to_device_keeps_every_tensor_of_the_batch():
    batch = lm.collate([packed(samples([3, 5]))], pad_id=0)
    moved = dev.to_device(batch, CPU)
    assert set(moved) == set(batch)
    for key, value in batch.items():
        assert torch.equal(moved[key], value) and moved[key].dtype == value.dtype


def test_device_sum_adds_without_reading_back_and_reads_once():
    total = dev.DeviceSum()
    with Ops() as recorder:
        for value in (1.5, 2.25, -0.75):
            total.add(torch.tensor(value, requires_grad=True) * 1)
    assert "aten._local_scalar_dense.default" not in recorder.ops
    assert total.value() == 3.0
    assert total.value() == 0.0  # read once, then it starts over


def test_compile_blocks_compiles_each_block_and_keeps_outputs_and_state_dict_keys():
    model, stock = tiny_llama(), tiny_llama()
    keys = list(model.state_dict())
    assert dev.compile_blocks(model, backend="eager") == model.config.num_hidden_layers
    assert list(model.state_dict()) == keys
    ids = torch.tensor([[5, 8, 13, 21, 34]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock(ids).logits, atol=0, rtol=0)
    assert dev.compile_blocks(torch.nn.Linear(2, 2)) == 0


def test_training_bytes_count_weights_gradients_and_adamw_moments():
    model = tiny_llama()
    params = sum(p.numel() for p in model.parameters())
    assert dev.training_bytes(model) == 16 * params  # fp32: 4 + 4 + 2 x 4
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name)  # as with frozen base weights
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert dev.training_bytes(model) == 4 * params + 12 * trainable


def test_a_model_that_cannot_fit_is_one_line_before_the_first_step():
    model = tiny_llama()
    needed = dev.training_bytes(model)
    dev.check_memory(model, CPU, free_bytes=needed)  # fits exactly: no error
    with pytest.raises(SftpipeError) as caught:
        dev.check_memory(model, torch.device("cuda", 0), free_bytes=needed - 1)
    message = str(caught.value)
    assert "\n" not in message and "GiB" in message and "--method lora or qlora" in message
    assert "--gradient-checkpointing" in message and "fsdp" in message


def test_out_of_memory_is_one_line_with_the_step_and_what_was_kept():
    error = dev.out_of_memory(RuntimeError("CUDA out of memory"), 17, CPU, "last checkpoint kept")
    message = str(error)
    assert "step 17" in message and "last checkpoint kept" in message and "\n" not in message
