"""The whole pipeline with KFP's local runner: input on a real SeaweedFS S3 server, the base
model read from S3, tracking and registry on a real MLflow server whose artifacts live in a
SeaweedFS bucket."""

import json
import subprocess
import sys
import uuid

import pytest
from fixtures.pipeline_input import conversations, upload

from sftpipe.apps.local import run_local
from sftpipe.config import PipelineConfig

pytestmark = pytest.mark.slow

FAST = dict(
    max_steps=30,
    learning_rate=3e-3,
    eval_every=10,
    max_length=64,
    micro_batch_size=8,
    num_samples=2,
    max_new_tokens=8,
    mlflow_experiment="e2e",
)


def test_pipeline_registers_a_better_model(
    seaweedfs, s3_env, mlflow_env, tiny_model_s3_uri, tmp_path, capsys
):
    import mlflow
    from mlflow.tracking import MlflowClient

    lines = [json.dumps(row) for row in conversations()] + ['{"broken', '{"messages": []}']
    data_uri, data_digest = upload(seaweedfs, s3_env, "data/chat.jsonl", lines)
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    config = PipelineConfig.from_flat(
        FAST | dict(data_uri=data_uri, base_model=tiny_model_s3_uri, model_name=name)
    )

    result = run_local(config, tmp_path / "work")

    assert result.model_uri == f"models:/{name}/1"
    # The console: one line per task start and end and the stages' own lines; the log file
    # has the rest (KFP's executor input among it).
    console = capsys.readouterr().out.splitlines()
    assert len(console) <= 40, "\n".join(console)
    for task in ("clean", "tokenize", "finetune", "evaluate", "register"):
        assert f"[sftpipe] {task}: started" in console
        assert any(line.startswith(f"[sftpipe] {task}: done in ") for line in console)
    (log,) = (tmp_path / "work" / "logs").glob("run-*.log")
    assert console[0] == f"[sftpipe] full log: {log}"
    assert "Got executor_input" in log.read_text()
    client = MlflowClient()
    version = client.get_model_version_by_alias(name, "champion")  # the first one: both aliases
    assert version.version == "1" and set(version.aliases) == {"champion", "challenger"}
    tags = version.tags
    assert tags["sftpipe.data.input_digest"] == data_digest
    assert tags["sftpipe.data.source"] == data_uri
    assert tags["sftpipe.base_model"] == tiny_model_s3_uri
    assert len(tags["sftpipe.config_digest"]) == 16 and tags["sftpipe.pipeline_run_id"]
    assert float(tags["tuned_validation_loss"]) < float(tags["base_validation_loss"])
    assert tags["sftpipe.data.validation_digest"] and len(tags["sftpipe.base_model_digest"]) == 64
    assert tags["sftpipe.code_version"].startswith("0.1.0")
    assert tags["sftpipe.gate"].startswith("passed (tuned vs base): ")

    run = client.get_run(version.run_id)
    assert run.data.tags["sftpipe.pipeline_run_id"] == tags["sftpipe.pipeline_run_id"]
    assert run.data.tags["sftpipe.gate"].startswith("passed")
    assert run.data.params["config.learning_rate"] == "0.003"
    assert run.data.params["config.data_uri"] == data_uri
    assert run.data.metrics["clean.rows_quarantined"] == 2
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == list(range(5, 31, 5))
    artifacts = {
        a.path
        for folder in ("reports", "plots")
        for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {"reports/samples.json", "plots/loss_curve.png", "plots/generation_metrics.png"} <= (
        artifacts
    )
    assert run.data.metrics["evaluate.gate_passed"] == 1.0
    assert any(path.endswith(".html") for path in artifacts)

    # KFP outputs on disk: the quarantine says why each bad row was dropped.
    (quarantine,) = (tmp_path / "work" / "pipeline_root").glob("*/clean/quarantine")
    reasons = sorted(json.loads(line)["reason"] for line in quarantine.read_text().splitlines())
    assert reasons == ["empty_conversation", "malformed_json"]

    model = mlflow.pyfunc.load_model(result.model_uri)
    (answer,) = model.predict({"messages": [{"role": "user", "content": "What is 3 plus 3?"}]})
    assert isinstance(answer["choices"][0]["message"]["content"], str)


def test_failed_step_is_one_line_and_publishes_nothing(
    seaweedfs, s3_env, mlflow_env, tiny_model_dir, tmp_path
):
    data_uri, _ = upload(seaweedfs, s3_env, "data/bad.jsonl", ["{nope"] * 5 + ["[1]"])
    cli = [
        sys.executable,
        "-m",
        "sftpipe.apps.cli",
        "run",
        "--workdir",
        str(tmp_path / "work"),
        "--data-uri",
        data_uri,
        "--base-model",
        str(tiny_model_dir),
    ]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    # The step's log (in the run's log file) has the error once; the console says which step
    # failed, and the command ends with the step's single line.
    (log,) = (tmp_path / "work" / "logs").glob("run-*.log")
    logged = [line for line in log.read_text().splitlines() if "ERROR [clean]" in line]
    assert len(logged) == 1
    assert "ERROR [clean]" not in done.stdout
    assert any(line.startswith("[sftpipe] clean: FAILURE") for line in done.stdout.splitlines())
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sftpipe: error: [clean] {data_uri}: 6 of 6 rows are bad")
    assert "malformed_json=5" in last and "bad.jsonl:1" in last
    assert "Traceback" not in done.stdout + done.stderr
    assert not list((tmp_path / "work" / "pipeline_root").glob("*/clean/cleaned"))
    assert not list((tmp_path / "work" / "pipeline_root").glob("*/tokenize"))
