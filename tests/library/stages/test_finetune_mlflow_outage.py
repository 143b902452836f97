"""MLflow is not on the critical path of training: the tracking server is stopped in the middle
of a fine-tune and started again later; training finishes, and every metric it logged (those of
the outage included) arrives in the run. Only register may require MLflow."""

import os
import re

import pytest
from fixtures.servers import (
    _FOREIGN_ENV,
    MLFLOW_STARTUP_TIMEOUT_S,
    ServerProcess,
    _http_ok,
    start_mlflow,
)

from sftpipe.config import TrainConfig
from sftpipe.modeling import lm
from sftpipe.stages import finetune
from sftpipe.tracking.runs import BufferedTracker, Tracker

STEPS = 12
STOP_AT_STEP, START_AT_STEP = 3, 9  # steps 3..8 log while the server is down


def restart(proc, server, workdir):
    """The same `mlflow server` command again: same port, same SQLite store."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    env |= server.s3.env() | {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    again = ServerProcess(proc.name, proc.argv, workdir / "restarted.log", env=env, cwd=workdir)
    again.wait_until(
        _http_ok(f"{server.tracking_uri}/health"), MLFLOW_STARTUP_TIMEOUT_S, "GET /health"
    )
    return again


@pytest.fixture
def own_mlflow(seaweedfs, tmp_path, monkeypatch):
    """A tracking server of this test's own (the session's shared one must stay up)."""
    workdir = tmp_path / "mlflow"
    server, proc = start_mlflow(workdir, seaweedfs, seaweedfs.create_bucket("outage"))
    for name in _FOREIGN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.tracking_uri)
    # An outage longer than MLflow's own HTTP retries is what killed training: make the client
    # give up at once instead of retrying for minutes, so the outage outlasts its retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    processes = [proc]
    yield server, processes, workdir
    for process in processes:
        process.stop()


def test_training_outlives_an_mlflow_outage_and_every_metric_arrives(
    own_mlflow, tiny_model_dir, tokenized, tmp_path, monkeypatch, capfd
):
    from mlflow.tracking import MlflowClient

    server, processes, workdir = own_mlflow
    client = MlflowClient()
    experiment = client.create_experiment("outage")
    run_id = client.create_run(experiment).info.run_id

    # The server is stopped and started by the training itself, at step boundaries: the loss
    # module's forward counts micro-batches (one per step here), no clock involved.
    forward, calls = lm.TokenLoss.forward, []

    def outage_between_steps(self, batch):
        calls.append(1)
        if len(calls) == STOP_AT_STEP:
            processes[0].stop()
        if len(calls) == START_AT_STEP:
            processes.append(restart(processes[0], server, workdir))
        return forward(self, batch)

    monkeypatch.setattr(lm.TokenLoss, "forward", outage_between_steps)
    config = TrainConfig(
        max_steps=STEPS, log_every=1, eval_every=4, micro_batch_size=8, learning_rate=1e-3
    )
    tracker = Tracker(client, run_id, experiment)
    report = finetune.run(config, str(tiny_model_dir), *tokenized, tmp_path / "out", tracker)

    assert report.steps == STEPS and (tmp_path / "out" / "model.safetensors").exists()
    out = capfd.readouterr().out
    assert len(re.findall(r"\[mlflow\] WARNING: logging to run .* failed", out)) == 1, out
    assert "[mlflow] reachable again" in out
    history = {
        key: [m.step for m in client.get_metric_history(run_id, key)]
        for key in ("train_loss", "mfu", "validation_loss")
    }
    assert sorted(history["train_loss"]) == list(range(1, STEPS + 1))
    assert sorted(history["mfu"]) == list(range(1, STEPS + 1))
    assert sorted(history["validation_loss"]) == [0, 4, 8, 12]
    data = client.get_run(run_id).data
    assert data.params["train.max_steps"] == str(STEPS)
    assert "best_validation_loss" in data.metrics
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}
    trained = {h["step"]: h["train_loss"] for h in report.history if "train_loss" in h}
    assert logged == pytest.approx(trained, rel=1e-6)  # the outage's values, not others'


def test_a_refused_call_is_skipped_not_retried_forever(capfd):
    """A 4xx from MLflow (e.g. a param logged twice with another value) cannot succeed later:
    the sender says so in one line and goes on with the next call."""
    from mlflow.exceptions import RestException

    sent = []

    class Refusing:
        run_id = "r1"

        def log_params(self, params):
            # What the REST client raises for the server's 400 answer.
            raise RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "changed"})

        def log_metrics(self, metrics, step=None, timestamp_ms=None):
            sent.append((metrics, step))

    buffered = BufferedTracker(Refusing())
    buffered.log_params({"a": 1})
    buffered.log_metrics({"loss": 1.0}, 1)
    assert buffered.close(timeout_s=30) == 0
    assert sent == [({"loss": 1.0}, 1)]
    assert "MLflow refused a call" in capfd.readouterr().out
