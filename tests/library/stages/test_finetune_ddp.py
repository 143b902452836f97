"""torchrun with 2 CPU processes (gloo) ends with the weights of one process that accumulates
the same global batch."""

import json
import os
import subprocess
import sys

import pytest
from finetune_numerics import assert_same_training

from sftpipe.config import TrainConfig
from sftpipe.modeling.training_report import TRAINING_LOG
from sftpipe.stages import finetune

COMMON = dict(
    max_steps=6,
    learning_rate=2e-3,
    precision="fp32",
    eval_every=3,
    micro_batch_size=4,
    early_stopping_patience=0,
)


def test_two_processes_match_one_with_the_same_global_batch(tiny_model_dir, tokenized, tmp_path):
    single = TrainConfig(gradient_accumulation_steps=2, **COMMON)
    report = finetune.run(single, str(tiny_model_dir), *tokenized, tmp_path / "single")

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "sftpipe.kfp_glue.finetune_launch",
        "--base-model",
        str(tiny_model_dir),
        "--train",
        str(tokenized[0]),
        "--validation",
        str(tokenized[1]),
        "--output",
        str(tmp_path / "ddp"),
        "--config",
        json.dumps(COMMON),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # The timeout only guards against a hang: a busy machine may take long.
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2xcpu" in done.stdout
    assert done.stdout.count("[finetune] done:") == 1  # only the main process reports

    # Same training up to the reduction order (tolerance derived in finetune_numerics): the
    # workers run 1 thread each, this process more, so their kernels sum in other orders.
    window_tokens = COMMON["micro_batch_size"] * 2 * 64  # 2 micro-batches of rows <= 64 tokens
    assert_same_training(
        tmp_path / "single", tmp_path / "ddp", tiny_model_dir, COMMON["max_steps"], window_tokens
    )
    log = json.loads((tmp_path / "ddp" / TRAINING_LOG).read_text())
    assert log["best_validation_loss"] == pytest.approx(report.best_validation_loss, abs=1e-4)
