import json

import pytest
import torch
from safetensors.torch import load_file

from sftpipe.config import TrainConfig
from sftpipe.errors import SftpipeError
from sftpipe.modeling import training_model
from sftpipe.modeling.lora import ADAPTER_DIR
from sftpipe.stages import finetune
from sftpipe.tasks import chat

FAST = dict(max_steps=12, learning_rate=5e-3, eval_every=6, micro_batch_size=8, precision="fp32")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapters_train_and_export_merged_plus_adapter(tiny_model_dir, tokenized, tmp_path, dora):
    config = TrainConfig(
        method="lora", lora_rank=4, lora_target_modules="q_proj,v_proj", use_dora=dora, **FAST
    )
    report = finetune.run(config, str(tiny_model_dir), *tokenized, tmp_path / "out")
    first = next(h for h in report.history if "validation_loss" in h)["validation_loss"]
    assert report.best_validation_loss < first

    out = tmp_path / "out"
    adapter = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert adapter["use_dora"] is dora
    merged, base = (
        load_file(out / "model.safetensors"),
        load_file(tiny_model_dir / "model.safetensors"),
    )
    assert not any("lora" in name for name in merged)  # a plain model, adapters merged in
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)


def test_bad_adapter_settings_fail_before_training(tiny_model_dir, tokenized, tmp_path):
    config = TrainConfig(method="lora", lora_target_modules="q_proj,attn_c", **FAST)
    with pytest.raises(SftpipeError, match=r"\['attn_c'\] not among the model's linear layers"):
        finetune.run(config, str(tiny_model_dir), *tokenized, tmp_path / "o")
    with pytest.raises(SftpipeError, match="qlora needs a CUDA GPU with bitsandbytes"):
        finetune.run(
            TrainConfig(method="qlora", **FAST), str(tiny_model_dir), *tokenized, tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()


def test_gradient_checkpointing_changes_memory_not_results(tiny_model_dir, tokenized, tmp_path):
    plain = finetune.run(TrainConfig(**FAST), str(tiny_model_dir), *tokenized, tmp_path / "a")
    ckpt = finetune.run(
        TrainConfig(gradient_checkpointing=True, **FAST),
        str(tiny_model_dir),
        *tokenized,
        tmp_path / "b",
    )
    assert ckpt.train_loss == pytest.approx(plain.train_loss, rel=1e-5)
    assert ckpt.best_validation_loss == pytest.approx(plain.best_validation_loss, rel=1e-5)
    some = finetune.run(
        TrainConfig(gradient_checkpointing=True, gradient_checkpointing_every=2, **FAST),
        str(tiny_model_dir),
        *tokenized,
        tmp_path / "c",
    )
    assert some.train_loss == pytest.approx(plain.train_loss, rel=1e-5)


def test_checkpointing_every_nth_block(tiny_model_dir):
    from transformers.modeling_layers import GradientCheckpointingLayer

    config = TrainConfig(gradient_checkpointing=True, gradient_checkpointing_every=2)
    cpu = torch.device("cpu")
    model = training_model.load_model(
        config, tiny_model_dir, str(tiny_model_dir), None, cpu, chat.TASK
    )
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(blocks) >= 2
    assert [b.gradient_checkpointing for b in blocks] == [i % 2 == 0 for i in range(len(blocks))]


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tiny_model_dir, tokenized, tmp_path):
    config = dict(FAST, max_steps=3, eval_every=3)
    eager = finetune.run(TrainConfig(**config), str(tiny_model_dir), *tokenized, tmp_path / "a")
    compiled = finetune.run(
        TrainConfig(compile=True, **config), str(tiny_model_dir), *tokenized, tmp_path / "b"
    )
    assert compiled.train_loss == pytest.approx(eager.train_loss, rel=1e-4)
    merged = load_file(tmp_path / "b" / "model.safetensors")
    assert set(merged) == set(load_file(tmp_path / "a" / "model.safetensors"))


def test_weights_that_alone_do_not_fit_the_device_are_one_line():
    """No GPU here: a module whose `.to` raises the error CUDA's allocator raises."""

    class TooBig(torch.nn.Linear):
        def to(self, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    with pytest.raises(SftpipeError, match=r"weights alone \(0.0 GiB\) do not fit") as caught:
        training_model.place(TooBig(4, 4), torch.device("cpu"))
    assert "\n" not in str(caught.value) and "--method lora or qlora" in str(caught.value)
