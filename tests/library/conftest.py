"""Fixtures shared by the library tests."""

import json

import pytest

from sftpipe.config import TokenizeConfig
from sftpipe.stages import tokenize
from sftpipe.stages.clean import conversation_id


@pytest.fixture(scope="session")
def tokenized(tiny_model_dir, tmp_path_factory):
    """Train/validation Parquet of 40 short arithmetic chats of varied length."""
    tmp = tmp_path_factory.mktemp("tokenized")
    with (tmp / "cleaned.jsonl").open("w") as handle:
        for i in range(40):
            messages = [
                {"role": "user", "content": f"What is {i} plus {i}?" + " Please." * (i % 4)},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
            row = {"id": conversation_id(messages), "messages": messages, "source": f"x:{i}"}
            handle.write(json.dumps(row) + "\n")
    tokenize.run(
        TokenizeConfig(max_length=64, validation_fraction=0.2),
        str(tiny_model_dir),
        tmp / "cleaned.jsonl",
        tmp / "train.parquet",
        tmp / "val.parquet",
        tmp / "q.jsonl",
    )
    return tmp / "train.parquet", tmp / "val.parquet"
