"""Fixtures shared by the library tests."""

import pytest
from fixtures.data import tokenize_chats


@pytest.fixture(scope="session")
def tokenized(tiny_model_dir, tmp_path_factory):
    """Train/validation Parquet of 40 short arithmetic chats of varied length."""
    exchanges = [
        (f"What is {i} plus {i}?" + " Please." * (i % 4), f"{i} plus {i} is {2 * i}.")
        for i in range(40)
    ]
    folder = tmp_path_factory.mktemp("tokenized")
    return tokenize_chats(tiny_model_dir, folder, exchanges, max_length=64, validation_fraction=0.2)
