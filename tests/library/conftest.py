"""Fixtures shared by the library tests."""

import json

import pytest
from fixtures.classification import build_encoder, unknown_script_reviews, write_split
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


@pytest.fixture(scope="session")
def minilm_encoder(tmp_path_factory):
    """A tiny random-init BERT with the real all-MiniLM-L6-v2 tokenizer (English WordPiece:
    most Chinese characters are its [UNK])."""
    from sftpipe.apps.demo_sentiment import encoder_dir

    return build_encoder(encoder_dir(), tmp_path_factory.mktemp("minilm-encoder"))


@pytest.fixture(scope="session")
def unknown_script_splits(minilm_encoder, tmp_path_factory):
    """160 Chinese reviews (`unknown_script_reviews`) tokenized by tokenize with MiniLM's
    tokenizer, as they are ("plain") and with extend_vocabulary=2 ("extended"):
    {kind: (train, validation, report)}."""
    from sftpipe.config import TokenizeConfig
    from sftpipe.stages import tokenize

    folder = tmp_path_factory.mktemp("unknown-script")
    cleaned = folder / "cleaned.jsonl"
    rows = unknown_script_reviews(160, seed=3)
    cleaned.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    out = {}
    for kind, extend in (("plain", 0), ("extended", 2)):
        train, validation = folder / f"{kind}-train.parquet", folder / f"{kind}-val.parquet"
        config = TokenizeConfig(max_length=16, validation_fraction=0.25, extend_vocabulary=extend)
        report = tokenize.run(
            config,
            str(minilm_encoder),
            cleaned,
            train,
            validation,
            folder / f"{kind}-quarantine.jsonl",
            label_map="negative,positive",
        )
        out[kind] = (train, validation, report)
    return out
