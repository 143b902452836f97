"""Preemption: a training process killed with SIGKILL at a random step and started again must
end with exactly the weights of a run that was never interrupted, on one process and on two;
SIGTERM checkpoints first."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from sftpipe.config import TrainConfig
from sftpipe.kfp_glue import finetune_launch
from sftpipe.modeling.checkpoint import CheckpointStore
from sftpipe.modeling.training_report import TRAINING_LOG
from sftpipe.stages import finetune

CONFIG = dict(
    max_steps=60,
    checkpoint_every=5,
    keep_checkpoints=2,
    learning_rate=1e-3,
    precision="fp32",
    eval_every=10,
    micro_batch_size=8,
    gradient_accumulation_steps=2,
)


def command(model, tokenized, output, uri):
    return [
        sys.executable,
        "-m",
        "sftpipe.kfp_glue.finetune_launch",
        "--base-model",
        str(model),
        "--train",
        str(tokenized[0]),
        "--validation",
        str(tokenized[1]),
        "--output",
        str(output),
        "--checkpoint-uri",
        uri,
        "--config",
        json.dumps(CONFIG),
    ]


def start_until_checkpoint(cmd, step):
    """Start training and read its output until it reports a published checkpoint at `step` or
    later (the line comes after the manifest is written); returns the process and that step.
    Synchronized on the process's own output, so a slow machine only makes it wait longer."""
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        reached = re.match(r"\[finetune\] checkpoint at step (\d+)", line)
        if reached and int(reached.group(1)) >= step:
            return process, int(reached.group(1))
    process.wait()
    raise AssertionError(f"training ended (code {process.returncode}) before step {step}")


def test_sigkill_then_resume_gives_identical_weights(
    tiny_model_dir, tokenized, seaweedfs, s3_env, tmp_path
):
    finetune.run(TrainConfig(**CONFIG), str(tiny_model_dir), *tokenized, tmp_path / "straight")

    uri = f"s3://{s3_env}/checkpoints/run-1"
    store = CheckpointStore(uri)
    cmd = command(tiny_model_dir, tokenized, tmp_path / "resumed", uri)
    process, reached = start_until_checkpoint(cmd, 5 * random.randint(1, 8))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close()
    assert not (tmp_path / "resumed").exists(), "a killed run must not publish a model"

    done = subprocess.run(cmd, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout, f"killed after checkpoint {reached}: {done.stdout[-500:]}"
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6)
    log = json.loads((tmp_path / "resumed" / TRAINING_LOG).read_text())
    assert log["steps"] == 60
    assert len(store.complete_steps()) <= 2


def test_sigterm_checkpoints_and_stops(tiny_model_dir, tokenized, tmp_path):
    uri = str(tmp_path / "ckpt")
    config = dict(CONFIG, max_steps=100000, checkpoint_every=100000)
    cmd = command(tiny_model_dir, tokenized, tmp_path / "out", uri)
    cmd[-1] = json.dumps(config)
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if "steps |" in line:  # training is under way
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "stopped by SIGTERM at step" in stderr and "checkpoint saved" in stderr
    steps = CheckpointStore(uri).complete_steps()
    assert len(steps) == 1 and steps[0] > 0
    assert not (tmp_path / "out").exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_model_dir, tokenized, tmp_path, monkeypatch
):
    """A NaN loss at step 5 (injected into the loss module) is one clear line; the checkpoint
    of step 4 stays complete, nothing is exported, no scratch weights are left in /tmp."""
    import gc
    import tempfile
    from pathlib import Path

    import pytest

    from sftpipe.errors import SftpipeError
    from sftpipe.modeling import lm

    forward, calls = lm.TokenLoss.forward, []

    def poisoned(self, batch):
        calls.append(1)
        loss = forward(self, batch)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(lm.TokenLoss, "forward", poisoned)
    scratch = set(Path(tempfile.gettempdir()).glob("sftpipe-finetune-*"))
    uri = str(tmp_path / "ckpt")
    changes = dict(max_steps=10, checkpoint_every=2, micro_batch_size=4)
    config = TrainConfig(**CONFIG | changes | dict(gradient_accumulation_steps=1))
    with pytest.raises(SftpipeError, match="loss is nan at step 5") as failure:
        finetune.run(config, str(tiny_model_dir), *tokenized, tmp_path / "out", None, uri)
    assert "\n" not in str(failure.value)
    del failure
    gc.collect()
    assert CheckpointStore(uri).complete_steps() == [2, 4]
    assert not (tmp_path / "out").exists()
    assert set(Path(tempfile.gettempdir()).glob("sftpipe-finetune-*")) == scratch


# LoRA dropout draws from each process's own torch generator, on micro-batches of different
# shapes, so the two ranks' streams differ by the first checkpoint.
TWO_PROCESSES = dict(
    max_steps=8,
    checkpoint_every=3,
    keep_checkpoints=5,
    learning_rate=2e-3,
    precision="fp32",
    eval_every=4,
    micro_batch_size=2,
    gradient_accumulation_steps=2,
    method="lora",
    lora_rank=4,
    lora_dropout=0.2,
)


def _train_on_two_processes(model, tokenized, output, checkpoints, capfd):
    config = TrainConfig(**TWO_PROCESSES)
    args = finetune_launch.entry_args(config, str(model), *tokenized, output, str(checkpoints))
    capfd.readouterr()
    finetune_launch.launch(2, args)
    return capfd.readouterr().out


def test_two_processes_resume_with_every_ranks_random_state(
    tiny_model_dir, tokenized, tmp_path, capfd
):
    """2 gloo processes: an uninterrupted run checkpoints at steps 3 and 6; a second run that
    finds only step 3 (as if killed before step 6) resumes from it and must end with the same
    weights, which needs rank 1's own generator state, not rank 0's."""
    straight = tmp_path / "ckpt-straight"
    _train_on_two_processes(tiny_model_dir, tokenized, tmp_path / "straight", straight, capfd)
    assert CheckpointStore(str(straight)).complete_steps() == [3, 6]

    interrupted = tmp_path / "ckpt-interrupted"
    shutil.copytree(straight / "step-00000003", interrupted / "step-00000003")
    resumed = tmp_path / "resumed"
    out = _train_on_two_processes(tiny_model_dir, tokenized, resumed, interrupted, capfd)
    assert "at step 3" in out and "another number of processes" not in out

    one = load_file(tmp_path / "straight" / "model.safetensors")
    two = load_file(resumed / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:  # the same operations in the same order: bit for bit
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=0)


def test_out_of_memory_during_training_is_one_line_and_keeps_the_last_checkpoint(
    tiny_model_dir, tokenized, tmp_path, monkeypatch
):
    """No GPU here: the CUDA out-of-memory error is raised by the loss module's forward at
    step 5 (torch.OutOfMemoryError, what the CUDA caching allocator raises). The run ends with
    one line naming the step, the options and the checkpoint that survives (step 4)."""
    from pathlib import Path

    import pytest

    from sftpipe.errors import SftpipeError
    from sftpipe.modeling import lm

    forward, calls = lm.TokenLoss.forward, []

    def out_of_memory_at_step_5(self, batch):
        calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, batch)

    monkeypatch.setattr(lm.TokenLoss, "forward", out_of_memory_at_step_5)
    uri = str(tmp_path / "ckpt")
    changes = dict(max_steps=10, checkpoint_every=2, micro_batch_size=4)
    config = TrainConfig(**CONFIG | changes | dict(gradient_accumulation_steps=1))
    with pytest.raises(SftpipeError) as failure:
        finetune.run(config, str(tiny_model_dir), *tokenized, tmp_path / "out", None, uri)
    message = str(failure.value)
    assert "\n" not in message and "memory at step 5" in message
    assert "checkpoint of step 4 is kept" in message
    for option in ("--method lora or qlora", "--gradient-checkpointing", "fsdp", "batch"):
        assert option in message
    assert CheckpointStore(uri).complete_steps() == [2, 4]
    assert not Path(tmp_path / "out").exists()


def test_a_model_too_big_for_the_gpu_fails_before_the_first_step(
    tiny_model_dir, tokenized, tmp_path, monkeypatch, capfd
):
    """No GPU here: the free device memory that `check_memory` compares against is set to
    1 MiB (the tiny model needs ~2.2 MiB for weights, gradients and AdamW moments)."""
    import functools

    import pytest

    from sftpipe.errors import SftpipeError
    from sftpipe.modeling import device

    check = functools.partial(device.check_memory, free_bytes=1 << 20)
    monkeypatch.setattr(device, "check_memory", check)
    with pytest.raises(SftpipeError, match="needs at least .* GiB .* free") as failure:
        finetune.run(TrainConfig(max_steps=2), str(tiny_model_dir), *tokenized, tmp_path / "o")
    assert "--method lora or qlora" in str(failure.value)
    assert "[finetune] 2 steps" not in capfd.readouterr().out  # refused before training began
