"""The glue between KFP artifacts and stages (artifacts are duck-typed: plain objects here)."""

import json
import uuid
from pathlib import Path

from sftpipe.config import PipelineConfig
from sftpipe.kfp_glue import steps
from sftpipe.tracking.runs import RUN_ID_ENV, open_run


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


def test_clean_fanned_out_over_shards_equals_one_clean(tmp_path, monkeypatch):
    """plan -> one clean_shard per group of files -> clean_merge writes the bytes that a single
    clean writes, duplicates across shards included."""
    monkeypatch.delenv(RUN_ID_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "raw"
    folder.mkdir()
    for shard in range(3):
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"q{i}"},
                    {"role": "assistant", "content": f"a{i}"},
                ]
            }
            for i in range(shard * 4, shard * 4 + 6)
        ]  # overlaps the next shard: duplicates
        (folder / f"part-{shard}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = PipelineConfig.from_flat({"data_uri": str(folder)}).flat()

    single = {
        name: Artifact(tmp_path / "single" / name)
        for name in ("cleaned", "quarantine", "metrics", "report")
    }
    steps.clean(params, **single)

    plan = steps.clean_plan(params | {"num_shards": 3})
    assert len(plan.shards) == 3
    parts = []
    for index, shard in enumerate(plan.shards):
        part = Artifact(tmp_path / "parts" / str(index))
        steps.clean_shard({"shard": shard, "data_config": plan.data_config}, part)
        parts.append(part)
    merged = {
        name: Artifact(tmp_path / "merged" / name)
        for name in ("cleaned", "quarantine", "metrics", "report")
    }
    steps.clean_merge({"data_config": plan.data_config, "mlflow_experiment": "x"}, parts, **merged)

    for name in ("cleaned", "quarantine"):
        merged_bytes = Path(merged[name].path).read_bytes()
        assert merged_bytes == Path(single[name].path).read_bytes()
    assert merged["cleaned"].metadata["digest"] == single["cleaned"].metadata["digest"]
    assert merged["metrics"].metadata["dropped_duplicate"] == 4
