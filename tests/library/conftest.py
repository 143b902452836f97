"""Fixtures shared by the library tests."""

import pytest
from fixtures.classification import build_encoder, write_split
from fixtures.data import tokenize_chats
from transformers import AutoTokenizer


@pytest.fixture(scope="session")
def tokenized(tiny_model_dir, tmp_path_factory):
    """Train/validation Parquet of 40 short arithmetic chats of varied length."""
    exchanges = [
        (f"What is {i} plus {i}?" + " Please." * (i % 4), f"{i} plus {i} is {2 * i}.")
        for i in range(40)
    ]
    folder = tmp_path_factory.mktemp("tokenized")
    return tokenize_chats(tiny_model_dir, folder, exchanges, max_length=64, validation_fraction=0.2)


@pytest.fixture(scope="session")
def encoder(tiny_model_dir, tmp_path_factory):
    """A tiny random-init BERT encoder (no classification head) with the tiny tokenizer."""
    return build_encoder(tiny_model_dir, tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="session")
def splits(encoder, tmp_path_factory):
    """Classification train (96 rows) and validation (32 rows) Parquet, 30% positive."""
    tmp = tmp_path_factory.mktemp("cls")
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    return write_split(tmp / "train.parquet", tokenizer, 96, 1), write_split(
        tmp / "val.parquet", tokenizer, 32, 2
    )


@pytest.fixture(scope="session")
def tuned_classifier(encoder, splits, tmp_path_factory):
    """The tiny encoder fine-tuned on `splits` (full, 40 steps): accurate on the validation."""
    from sftpipe.config import TrainConfig
    from sftpipe.stages import finetune

    out = tmp_path_factory.mktemp("tuned-classifier") / "model"
    config = TrainConfig(
        max_steps=40, learning_rate=1e-2, micro_batch_size=16, eval_every=10, precision="fp32"
    )
    finetune.run(config, str(encoder), *splits, out)
    return out
