import uuid

import pytest

from sftpipe.config import RegisterConfig
from sftpipe.errors import SftpipeError
from sftpipe.stages import register
from sftpipe.tracking import open_run

METRICS = {
    "base_validation_loss": 3.0,
    "tuned_validation_loss": 2.5,
    "validation_loss_improvement": 0.5,
    "base_perplexity": 20.1,
    "tuned_perplexity": 12.2,
}


def test_gate_refuses_a_model_that_is_not_better(tiny_model_dir, mlflow_env):
    name = f"refused-{uuid.uuid4().hex[:8]}"
    tracker = open_run("register-tests", f"run-{uuid.uuid4().hex}")
    config = RegisterConfig(model_name=name, min_improvement=0.6)
    result = register.run(config, tiny_model_dir, METRICS, {}, tracker, max_new_tokens=4)
    assert not result.registered and "0.5000 <= min_improvement 0.6" in result.reason
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.tags[register.GATE_TAG].startswith("rejected: ")
    assert tracker.client.search_model_versions(f"name='{name}'") == []


def test_registers_with_alias_lineage_and_a_loadable_model(tiny_model_dir, mlflow_env):
    import mlflow

    name = f"chat-{uuid.uuid4().hex[:8]}"
    tracker = open_run("register-tests", f"run-{uuid.uuid4().hex}")
    lineage = {"sftpipe.pipeline_run_id": "abc", "sftpipe.data.cleaned_digest": "d1g3st"}
    result = register.run(
        RegisterConfig(model_name=name), tiny_model_dir, METRICS, lineage, tracker, max_new_tokens=4
    )
    assert result.registered and result.model_uri == f"models:/{name}@challenger"

    version = tracker.client.get_model_version_by_alias(name, "challenger")
    assert version.version == result.version == "1"
    assert version.run_id == tracker.run_id
    assert version.tags["sftpipe.pipeline_run_id"] == "abc"
    assert version.tags["sftpipe.data.cleaned_digest"] == "d1g3st"
    assert float(version.tags["tuned_validation_loss"]) == 2.5

    # The artifacts went to the S3 bucket behind the server, and the model loads and answers.
    keys = [
        o["Key"]
        for o in mlflow_env.s3.client()
        .list_objects_v2(Bucket=mlflow_env.bucket)
        .get("Contents", [])
    ]
    assert any(k.endswith("model.safetensors") for k in keys)
    model = mlflow.pyfunc.load_model(result.model_uri)
    (answer,) = model.predict(["Hello"])
    assert isinstance(answer, str)


def test_unreachable_mlflow_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(SftpipeError, match="MLflow is unreachable"):
        open_run("x", "y")
