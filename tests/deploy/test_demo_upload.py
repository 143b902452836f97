"""docker/k8s/demo/upload_demo.py, the script of the kind demo's data Job, against a real
SeaweedFS (the object store KFP bundles). The demo model and data are replaced by tiny
stand-ins: converting the real ones is `sftpipe run`'s business and is tested there."""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import K8S

from sftpipe import storage
from sftpipe.apps import demo


def load_script() -> Any:
    spec = importlib.util.spec_from_file_location("upload_demo", K8S / "demo" / "upload_demo.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def stand_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"data": 0, "model": 0}
    data = tmp_path / "conversations.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    model = tmp_path / demo.DEMO_MODEL_DIRNAME
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 1024)
    (model / demo.MANIFEST).write_text("{}")

    def prepare_data(cache: Path) -> Path:
        calls["data"] += 1
        return data

    def prepare_model(cache: Path) -> Path:
        calls["model"] += 1
        return model

    monkeypatch.setattr(demo, "prepare_demo_data", prepare_data)
    monkeypatch.setattr(demo, "prepare_demo_model", prepare_model)
    return calls


def test_uploads_once_manifest_last_into_a_new_bucket(
    s3_env: str, seaweedfs: Any, stand_ins: dict[str, int], tmp_path: Path, monkeypatch
):
    script = load_script()
    bucket = f"demo-{uuid.uuid4().hex[:10]}"  # does not exist yet: the script creates it
    order: list[str] = []
    upload = storage.upload_file
    monkeypatch.setattr(
        storage, "upload_file", lambda path, uri: (order.append(uri), upload(path, uri))
    )

    data_uri, model_uri = script.upload_demo(f"s3://{bucket}/demo/", tmp_path / "cache")
    assert data_uri == f"s3://{bucket}/demo/chat.jsonl"
    assert model_uri == f"s3://{bucket}/demo/{demo.DEMO_MODEL_DIRNAME}"
    keys = set(storage.list_objects(f"s3://{bucket}/demo"))
    model_keys = {
        f"demo/{demo.DEMO_MODEL_DIRNAME}/{n}"
        for n in ("config.json", "model.safetensors", demo.MANIFEST)
    }
    assert keys == {"demo/chat.jsonl"} | model_keys
    assert order[-1].endswith(f"/{demo.MANIFEST}"), "the manifest must be uploaded last"

    again = script.upload_demo(f"s3://{bucket}/demo", tmp_path / "cache")
    assert again == (data_uri, model_uri)
    assert stand_ins == {"data": 1, "model": 1}, "a complete upload is not redone"


def test_an_incomplete_upload_is_redone(s3_env: str, stand_ins: dict[str, int], tmp_path: Path):
    script = load_script()
    storage.s3_client().put_object(Bucket=s3_env, Key="demo/chat.jsonl", Body=b"{}\n")
    script.upload_demo(f"s3://{s3_env}/demo", tmp_path / "cache")  # no model manifest yet
    assert stand_ins == {"data": 1, "model": 1}
