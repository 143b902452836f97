"""FSDP2 with 2 CPU processes (gloo) under torchrun, launched the way the finetune step
launches one process per GPU (`finetune_launch.launch`), ends with the weights of one process
that accumulates the same global batch; its checkpoints resume in a plain single process."""

import pytest
from finetune_numerics import assert_same_training

from sftpipe.config import TrainConfig
from sftpipe.kfp_glue import finetune_launch
from sftpipe.modeling import training_report
from sftpipe.modeling.checkpoint import CheckpointStore
from sftpipe.stages import finetune

MAX_LENGTH = 64  # of the `tokenized` fixture's rows
COMMON = dict(
    max_steps=6,
    learning_rate=2e-3,
    precision="fp32",
    eval_every=3,
    micro_batch_size=4,
    early_stopping_patience=0,
)


def _launch_fsdp(config, tiny_model_dir, tokenized, output, capfd, checkpoint_uri=""):
    args = finetune_launch.entry_args(
        config, str(tiny_model_dir), *tokenized, output, checkpoint_uri
    )
    capfd.readouterr()  # drop what came before
    finetune_launch.launch(2, args)
    out = capfd.readouterr().out
    assert "on 2xcpu" in out
    assert out.count("[finetune] done:") == 1  # only the main process reports
    return training_report.read_report(output)


def _assert_same_weights(one_dir, two_dir, base_dir):
    """Same training up to the reduction order: FSDP reduce-scatters gradients and takes the
    clipping norm over shards (tolerance derived in finetune_numerics)."""
    window_tokens = COMMON["micro_batch_size"] * 2 * MAX_LENGTH  # 2 processes or 2 micro-batches
    assert_same_training(one_dir, two_dir, base_dir, COMMON["max_steps"], window_tokens)


def test_fsdp_on_two_processes_matches_one(tiny_model_dir, tokenized, tmp_path, capfd):
    single = TrainConfig(gradient_accumulation_steps=2, **COMMON)
    report = finetune.run(single, str(tiny_model_dir), *tokenized, tmp_path / "single")

    fsdp = TrainConfig(distributed_strategy="fsdp", **COMMON)
    sharded = _launch_fsdp(fsdp, tiny_model_dir, tokenized, tmp_path / "fsdp", capfd)

    _assert_same_weights(tmp_path / "single", tmp_path / "fsdp", tiny_model_dir)
    assert sharded.best_validation_loss == pytest.approx(report.best_validation_loss, abs=1e-4)
    assert sharded.train_loss == pytest.approx(report.train_loss, abs=1e-4)


def test_fsdp_lora_checkpoints_resume_in_one_process(tiny_model_dir, tokenized, tmp_path, capfd):
    lora = dict(COMMON, method="lora", lora_rank=4, lora_dropout=0.0, checkpoint_every=3)
    single = TrainConfig(gradient_accumulation_steps=2, **lora)
    finetune.run(single, str(tiny_model_dir), *tokenized, tmp_path / "single")

    checkpoints = tmp_path / "checkpoints"
    fsdp = TrainConfig(distributed_strategy="fsdp", **lora)
    _launch_fsdp(fsdp, tiny_model_dir, tokenized, tmp_path / "fsdp", capfd, str(checkpoints))
    _assert_same_weights(tmp_path / "single", tmp_path / "fsdp", tiny_model_dir)
    assert (tmp_path / "fsdp" / "adapter").is_dir()
    assert CheckpointStore(str(checkpoints)).complete_steps() == [3]

    # The full state dicts FSDP gathered on rank 0 (weights and optimizer) resume without FSDP.
    resumed = finetune.run(
        single,
        str(tiny_model_dir),
        *tokenized,
        tmp_path / "resumed",
        checkpoint_uri=str(checkpoints),
    )
    assert "resumed from" in capfd.readouterr().out
    assert resumed.steps == 6
    _assert_same_weights(tmp_path / "single", tmp_path / "resumed", tiny_model_dir)
