import itertools
import json
import shutil

import pytest
import torch
from finetune_numerics import assert_same_training, update_differences, update_tolerance
from fixtures.data import tokenize_chats
from safetensors.torch import load_file

from sftpipe.config import TrainConfig
from sftpipe.data.tokenized import read_label_map, read_parquet
from sftpipe.errors import SftpipeError
from sftpipe.modeling import lm
from sftpipe.modeling.models import load_causal_lm, load_tokenizer
from sftpipe.modeling.optim import lr_factor
from sftpipe.modeling.training_report import TRAINING_LOG, EarlyStopping
from sftpipe.stages import finetune, tokenize


def weights(path):
    return load_file(path / "model.safetensors")


def test_accumulation_matches_one_big_batch(tiny_model_dir, tokenized, tmp_path):
    """4 micro-batches of 1 must give the same update as 1 batch of 4: the loss is normalized
    by the loss-bearing tokens of the whole window, not averaged per micro-batch."""
    common = dict(
        max_steps=3,
        learning_rate=1e-3,
        precision="fp32",
        eval_every=100,
        early_stopping_patience=0,
        warmup_ratio=0.0,
    )
    big = TrainConfig(micro_batch_size=4, gradient_accumulation_steps=1, **common)
    small = TrainConfig(micro_batch_size=1, gradient_accumulation_steps=4, **common)
    finetune.run(big, str(tiny_model_dir), *tokenized, tmp_path / "big")
    finetune.run(small, str(tiny_model_dir), *tokenized, tmp_path / "small")
    a, base = weights(tmp_path / "big"), weights(tiny_model_dir)
    for name in a:
        assert not torch.equal(a[name], base[name]) or "norm" in name
    # Same training up to the reduction order (tolerance derived in finetune_numerics): 4 rows
    # of <= 64 tokens per step, 3 steps.
    assert_same_training(tmp_path / "big", tmp_path / "small", tiny_model_dir, 3, 4 * 64)
    # ... and the tolerance can fail: another data order (seed) is a real difference.
    finetune.run(
        big.model_copy(update={"seed": 43}), str(tiny_model_dir), *tokenized, tmp_path / "other"
    )
    differences = update_differences(tmp_path / "big", tmp_path / "other", tiny_model_dir)
    assert max(differences.values()) > 100 * update_tolerance(3, 4 * 64)


def test_naive_per_micro_batch_mean_would_differ(tiny_model_dir, tokenized):
    """The test above can fail: averaging per micro-batch gives another gradient."""
    rows = read_parquet(tokenized[0])[:4]
    assert len({r["num_loss_tokens"] for r in rows}) > 1
    model = load_causal_lm(tiny_model_dir)
    pad = load_tokenizer(tiny_model_dir).pad_token_id

    def grads(chunks, normalize):
        model.zero_grad()
        for chunk in chunks:
            loss, n = lm.loss_sum(model, lm.collate(chunk, pad))
            (loss / normalize(n)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    total = sum(r["num_loss_tokens"] for r in rows)
    batch = grads([rows], lambda n: total)
    window = grads([[r] for r in rows], lambda n: total)
    naive = grads([[r] for r in rows], lambda n: n * len(rows))
    torch.testing.assert_close(batch, window, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(batch, naive, atol=1e-6, rtol=1e-4)


def test_training_lowers_validation_loss_and_exports_best(tiny_model_dir, tokenized, tmp_path):
    config = TrainConfig(max_steps=24, learning_rate=3e-3, micro_batch_size=8, eval_every=8)
    report = finetune.run(config, str(tiny_model_dir), *tokenized, tmp_path / "out")
    history = [h for h in report.history if "validation_loss" in h]
    assert [h["step"] for h in history] == [0, 8, 16, 24]
    assert report.best_validation_loss < history[0]["validation_loss"] - 1.0
    assert report.tokens_per_second > 0 and report.loss_tokens > 0
    out = tmp_path / "out"
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    logged = json.loads((out / TRAINING_LOG).read_text())
    assert logged["best_step"] == report.best_step
    # What was exported is the best model: its validation loss is the best one.
    model, tokenizer = load_causal_lm(out), load_tokenizer(out)
    rows = read_parquet(tokenized[1])
    loss = lm.mean_loss(
        model,
        rows,
        tokenizer.pad_token_id,
        8,
        torch.device("cpu"),
        lm.autocast_dtype(config.precision, torch.device("cpu")),
    )
    assert loss == pytest.approx(report.best_validation_loss, rel=1e-3)
    assert not list(tmp_path.glob(".*partial*"))


def test_export_best_off_exports_the_last_step(minilm_encoder, unknown_script_splits, tmp_path):
    """A fixed budget: the last step's weights, even when an earlier validation was better.
    The "plain" reviews' labels are [UNK] to this encoder: what it fits is noise, and the last
    validation is worse than an earlier one."""
    from sftpipe.modeling import classify

    train, validation, _ = unknown_script_splits["plain"]
    config = TrainConfig(
        max_steps=24,
        learning_rate=1e-2,
        micro_batch_size=16,
        eval_every=8,
        precision="fp32",
        early_stopping_patience=0,
        export_best=False,
    )
    report = finetune.run(config, str(minilm_encoder), train, validation, tmp_path / "out")
    last = [h for h in report.history if "validation_loss" in h][-1]
    assert report.best_step < report.steps == report.exported_step == last["step"] == 24
    loss = classify.mean_loss(
        classify.load_model(tmp_path / "out", read_label_map(validation)),
        read_parquet(validation),
        load_tokenizer(tmp_path / "out", chat=False).pad_token_id,
        8,
        torch.device("cpu"),
        None,
    )
    assert loss == pytest.approx(last["validation_loss"], rel=1e-4)
    assert loss > report.best_validation_loss * (1 + 1e-3)
    logged = json.loads((tmp_path / "out" / TRAINING_LOG).read_text())
    assert logged["exported_step"] == 24


def test_export_best_off_refuses_early_stopping():
    with pytest.raises(ValueError, match="set early_stopping_patience 0"):
        TrainConfig(export_best=False)


def test_early_stopping_patience():
    stopper = EarlyStopping(patience=2)
    assert stopper.update(3.0, 0) and stopper.update(2.0, 1)
    assert not stopper.update(2.5, 2) and not stopper.stop
    assert not stopper.update(2.0, 3) and stopper.stop
    assert (stopper.best, stopper.best_step) == (2.0, 1)
    assert not EarlyStopping(patience=0).stop


def test_schedule_warms_up_then_decays():
    factors = [lr_factor(step, total=20, warmup=4) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))
    assert factors[-1] == pytest.approx(0.1)


def test_bad_inputs_fail_before_training(tiny_model_dir, tokenized, tmp_path):
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(SftpipeError, match="no weights"):
        finetune.run(TrainConfig(max_steps=1), str(no_weights), *tokenized, tmp_path / "o1")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SftpipeError, match="cannot load the model"):
        finetune.run(TrainConfig(max_steps=1), str(corrupt), *tokenized, tmp_path / "o2")

    import pyarrow.parquet as pq

    table = pq.read_table(tokenized[0]).to_pylist()
    table[0]["input_ids"] = [10**6] * len(table[0]["input_ids"])
    tokenize._write_parquet(table, tmp_path / "alien.parquet")
    with pytest.raises(SftpipeError, match="outside the model's vocabulary"):
        finetune.run(
            TrainConfig(max_steps=1),
            str(tiny_model_dir),
            tmp_path / "alien.parquet",
            tokenized[1],
            tmp_path / "o3",
        )
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_linear_schedule_decays_linearly():
    factors = [lr_factor(step, total=11, warmup=1, shape="linear") for step in range(11)]
    assert factors[1] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    steps = [a - b for a, b in itertools.pairwise(factors[1:])]
    assert max(steps) == pytest.approx(min(steps))


def test_fp16_uses_loss_scaling_and_reports_mfu(tiny_model_dir, tokenized, tmp_path):
    config = TrainConfig(max_steps=6, learning_rate=3e-3, precision="fp16", eval_every=3)
    report = finetune.run(config, str(tiny_model_dir), *tokenized, tmp_path / "out")
    assert report.precision == "float16"
    assert report.best_validation_loss < report.history[0]["validation_loss"]
    assert 0 < report.mfu < 1
    assert all(0 < h["mfu"] < 1 for h in report.history if "mfu" in h)


def test_the_template_used_for_training_goes_out_with_the_model(tiny_model_dir, tmp_path):
    custom = load_tokenizer(tiny_model_dir).chat_template + "{# sftpipe test template #}"
    exchanges = [(f"q{i}", f"a{i}") for i in range(10)]
    paths = tokenize_chats(tiny_model_dir, tmp_path, exchanges, max_length=32, chat_template=custom)
    finetune.run(
        TrainConfig(max_steps=1), str(tiny_model_dir), paths[0], paths[1], tmp_path / "out"
    )
    assert load_tokenizer(tmp_path / "out").chat_template == custom
