"""Shared fixtures.

Server fixtures (from tests/fixtures/servers.py; each starts only when a test asks for it):
  seaweedfs (session) -> S3Server, s3_env (function) -> bucket name,
  mlflow_server (session) -> MlflowServer, mlflow_env (function) -> MlflowServer.
Model fixtures (below):
  tiny_model_dir (session) -> Path, tiny_model_s3_uri (function) -> "s3://bucket/tiny-model".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fixtures.tiny_model import build_tiny_chat_model, upload_dir_to_s3

if TYPE_CHECKING:
    from fixtures.servers import S3Server

pytest_plugins = ["fixtures.servers"]

# Tests never reach the network: no model hub look-ups, no usage telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ChatML Llama + byte-level BPE tokenizer (pad == <|im_end|>), built once.

    Treat it as read-only: it is shared by every test of the session.
    """
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def tiny_model_s3_uri(tiny_model_dir: Path, seaweedfs: S3Server, s3_env: str) -> str:
    """The tiny model uploaded to the fresh `s3_env` bucket; returns its s3:// URI."""
    return upload_dir_to_s3(seaweedfs.client(), tiny_model_dir, s3_env, "tiny-model")


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri():
    """`sftpipe run` sets MLflow's process-wide tracking URI (mlflow.set_tracking_uri); put it
    back after each test, so one test's store (even a refused one) never reaches the next."""
    import sys

    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    before = utils._tracking_uri if utils else None
    yield
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None:
        utils._tracking_uri = before
