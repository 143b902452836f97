"""The glue between KFP artifacts and stages (artifacts are duck-typed: plain objects here)."""

import json
import uuid

from sftpipe import steps
from sftpipe.config import PipelineConfig
from sftpipe.tracking import RUN_ID_ENV, open_run


class Artifact:
    def __init__(self, path):
        self.path, self.uri, self.metadata = str(path), str(path), {}

    def log_metric(self, key, value):
        self.metadata[key] = value


def test_cached_data_steps_still_reach_mlflow_through_finetune(
    tiny_model_dir, tmp_path, mlflow_env, monkeypatch
):
    """clean and tokenize take no run id (it would break their cache keys); when they did not
    log into this run (a cache hit, or no run id in the environment), finetune logs their
    config, metrics and digests from the artifacts' metadata."""
    monkeypatch.delenv(RUN_ID_ENV, raising=False)
    data = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(12)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = PipelineConfig.from_flat(
        {"data_uri": str(data), "base_model": str(tiny_model_dir), "mlflow_experiment": "steps"}
    ).flat()
    cleaned, train = Artifact(tmp_path / "cleaned"), Artifact(tmp_path / "train")
    artifacts = {
        name: Artifact(tmp_path / name)
        for name in ("quarantine", "metrics", "report", "validation", "tq", "tm", "tr")
    }
    steps.clean(params, cleaned, artifacts["quarantine"], artifacts["metrics"], artifacts["report"])
    steps.tokenize(
        params,
        cleaned,
        train,
        artifacts["validation"],
        artifacts["tq"],
        artifacts["tm"],
        artifacts["tr"],
    )
    assert train.metadata["clean"]["metrics"]["rows_in"] == 12

    tracker = open_run("steps", f"run-{uuid.uuid4().hex}")
    steps._log_upstream(tracker, train)
    run = tracker.client.get_run(tracker.run_id).data
    assert run.metrics["clean.rows_in"] == 12 and run.metrics["tokenize.train_rows"] > 0
    assert run.params["config.data_uri"] == str(data)
    assert run.tags["sftpipe.data.input_digest"] == cleaned.metadata["sftpipe.data.input_digest"]
