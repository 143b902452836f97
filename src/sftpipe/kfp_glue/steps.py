"""What each KFP component runs: rebuild the stage's config from the component's inputs, run
the stage, and write its results into the KFP output artifacts (files, metrics, metadata) and
into the pipeline run's MLflow run.

KFP artifacts are duck-typed here (`.path`, `.metadata`, `.log_metric`), so this module does
not import kfp and the steps can be called with plain objects in tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from sftpipe import storage, tasks
from sftpipe.config import (
    FIELDS,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RegisterConfig,
    TokenizeConfig,
    TrackingConfig,
    TrainConfig,
)
from sftpipe.errors import ERROR_FILE_ENV, SftpipeError, describe
from sftpipe.kfp_glue import container, finetune_launch
from sftpipe.modeling import training_report
from sftpipe.stages import clean as clean_stage
from sftpipe.stages import evaluate as evaluate_stage
from sftpipe.stages import finetune as finetune_stage
from sftpipe.stages import register as register_stage
from sftpipe.stages import tokenize as tokenize_stage
from sftpipe.tracking import runs as tracking
from sftpipe.tracking.runs import RUN_ID_ENV

# Component inputs that are not config fields: the run id, and what the fan-out of clean over
# input shards passes between its steps.
RUNTIME_INPUTS = (
    "pipeline_run_id",
    "num_shards",
    "shard",
    "data_config",
    "data_digest",
    "model_digest",
)
BASE_MODEL_DIGEST_TAG = "sftpipe.base_model_digest"
CODE_VERSION_ENV = "SFTPIPE_CODE_VERSION"


def run_step(step: str, **inputs: Any) -> Any:
    """Entry point of every component: `return run_step("clean", **locals())`."""
    artifacts = {k: v for k, v in inputs.items() if _is_artifact(v)}
    params = {k: v for k, v in inputs.items() if k not in artifacts}
    unknown = set(params) - set(FIELDS) - set(RUNTIME_INPUTS)
    if unknown:
        raise TypeError(f"component {step!r} has inputs that are not config fields: {unknown}")
    try:
        result = STEPS[step](params, **artifacts)
        _record_container(step, params)
        return result
    except SftpipeError as exc:
        _fail(step, exc)
    except Exception as exc:  # disk full, permission denied, a bug: one line all the same
        # The traceback stays in the step's log (the pod's log; `sftpipe run`'s log file).
        traceback.print_exc(file=sys.stderr)
        _fail(step, exc)


def _record_container(step: str, params: dict[str, Any]) -> None:
    """Which container the step ran in, if any (sftpipe.kfp_glue.container): printed, and
    tagged on the pipeline run's MLflow run when the step knows that run."""
    found = container.identity()
    if found is None:
        return
    print(container.describe(step, found), flush=True)
    key = run_key(params)
    if key:
        experiment = TrackingConfig.from_values(params).mlflow_experiment
        tracker = tracking.open_run(experiment, key, run_name=f"sftpipe-{key}")
        tracker.set_tags(dict([container.as_tag(step, found)]))


def _fail(step: str, exc: Exception) -> NoReturn:
    """End the step with its one-line error, last in its log (and in `sftpipe run`'s error
    file, which the command ends with)."""
    message = f"[{step}] {describe(exc)}"
    print(f"ERROR {message}", file=sys.stderr, flush=True)
    if os.environ.get(ERROR_FILE_ENV):
        try:
            Path(os.environ[ERROR_FILE_ENV]).write_text(message + "\n", encoding="utf-8")
        except OSError as unwritable:  # the step's own line above still says it
            print(f"[{step}] could not write the error file: {describe(unwritable)}", flush=True)
    raise SystemExit(1) from None


def _is_artifact(value: Any) -> bool:
    """A KFP artifact, or a list of them (dsl.Collected)."""
    if isinstance(value, list):
        return bool(value) and all(hasattr(item, "path") for item in value)
    return hasattr(value, "path")


def run_key(params: dict[str, Any]) -> str:
    """Which pipeline run this step belongs to ("" when neither the environment nor an input
    says)."""
    return os.environ.get(RUN_ID_ENV) or params.get("pipeline_run_id", "")


def _tracker(params: dict[str, Any], *sections: Any) -> tracking.Tracker:
    experiment = TrackingConfig.from_values(params).mlflow_experiment
    key = run_key(params)
    if not key:
        raise SftpipeError(RUN_ID_ENV, "no pipeline run id", "run the step inside the pipeline")
    tracker = tracking.open_run(experiment, key, run_name=f"sftpipe-{key}")
    tracker.log_params({f"config.{k}": v for s in sections for k, v in s.model_dump().items()})
    return tracker


def _data_tracker(params: dict[str, Any], *sections: Any) -> tracking.Tracker | None:
    """The MLflow run for clean and tokenize, when the run id is known. Without it (a pod
    without the label) they still work; finetune logs their results from the artifacts."""
    if run_key(params):
        return _tracker(params, *sections)
    print(f"[mlflow] {RUN_ID_ENV} is not set: results go to MLflow with finetune", flush=True)
    return None


def _summary(config: Any, metrics: dict[str, float]) -> dict[str, Any]:
    """What a step leaves in its output's metadata for a later step to log into MLflow (a
    cached clean or tokenize does not run, so it cannot log into a new run itself)."""
    return {"config": config.model_dump(), "metrics": metrics}


def _record(
    metrics_artifact: Any,
    tracker: tracking.Tracker | None,
    prefix: str,
    metrics: dict[str, float],
) -> None:
    for key, value in metrics.items():
        metrics_artifact.log_metric(key, value)
    if tracker:
        tracker.log_metrics({f"{prefix}.{key}": value for key, value in metrics.items()})


def _log_upstream(tracker: tracking.Tracker, train: Any) -> None:
    """Log clean's and tokenize's config, metrics and digests from the train artifact, unless
    they logged themselves into this run (they did not when they came from the cache)."""
    if "clean.rows_in" in tracker.client.get_run(tracker.run_id).data.metrics:
        return
    for prefix in ("clean", "tokenize"):
        summary = train.metadata.get(prefix) or {}
        tracker.log_params({f"config.{k}": v for k, v in summary.get("config", {}).items()})
        tracker.log_metrics({f"{prefix}.{k}": v for k, v in summary.get("metrics", {}).items()})
    tracker.set_tags(
        {
            k: str(v)
            for k, v in (train.metadata.get("clean") or {}).items()
            if k.startswith("sftpipe.")
        }
    )


def clean(
    params: dict[str, Any], cleaned: Any, quarantine: Any, metrics: Any, report: Any = None
) -> None:
    config = DataConfig.from_values(params)
    _publish_clean(params, config, cleaned, quarantine, metrics, report, clean_stage.run)


def data_digest(params: dict[str, Any]) -> Any:
    """What the KFP cache keys clean and tokenize on, computed at run time by an uncached task:
    a digest of the input files' metadata (`data_digest`, storage.fingerprint) and one of the
    base model's files but its weights (`model_digest`: the tokenizer and chat template), so
    that new data at the same `data_uri`, or a new tokenizer at the same `base_model`, is not
    answered with stale output from the cache."""
    from collections import namedtuple

    from sftpipe.data.sources import fingerprint, list_sources
    from sftpipe.modeling.models import WEIGHT_SUFFIXES

    config = DataConfig.from_values(params)
    sources = list_sources(config.data_uri, config.file_format)
    digest = fingerprint(sources)
    base_model = ModelConfig.from_values(params).base_model
    model = ""
    if base_model:  # else tokenize says what is missing
        files = [f for f in storage.list_files(base_model) if not f.endswith(WEIGHT_SUFFIXES)]
        model = storage.fingerprint(files)
    print(f"[clean] input digest {digest[:12]} ({len(sources)} files)", flush=True)
    return namedtuple("Digests", ["data_digest", "model_digest"])(digest, model)


def clean_plan(params: dict[str, Any]) -> Any:
    """Fan-out, step 1: the input files in `num_shards` groups, and the validated config."""
    from collections import namedtuple

    config = DataConfig.from_values(params)
    shards = clean_stage.plan_shards(config, params["num_shards"])
    print(f"[clean] {len(shards)} shards of {config.data_uri}", flush=True)
    return namedtuple("Plan", ["shards", "data_config"])(shards, config.model_dump_json())


def clean_shard(params: dict[str, Any], part: Any) -> None:
    """Fan-out, step 2: clean one group of files into a folder (rows, keys, signatures)."""
    config = DataConfig.model_validate_json(params["data_config"])
    summary = clean_stage.run_shard_json(config, params["shard"], part.path)
    print(f"[clean] shard done: {summary}", flush=True)


def clean_merge(
    params: dict[str, Any],
    parts: list[Any],
    cleaned: Any,
    quarantine: Any,
    metrics: Any,
    report: Any = None,
) -> None:
    """Fan-out, step 3: de-duplicate across shards and publish what `clean` publishes."""
    config = DataConfig.model_validate_json(params["data_config"])

    def merge(config: DataConfig, cleaned_path: str, quarantine_path: str, report_path: Any) -> Any:
        folders = [part.path for part in parts]
        return clean_stage.merge(config, folders, cleaned_path, quarantine_path, report_path)

    _publish_clean(params, config, cleaned, quarantine, metrics, report, merge)


def _publish_clean(
    params: dict[str, Any],
    config: DataConfig,
    cleaned: Any,
    quarantine: Any,
    metrics: Any,
    report: Any,
    produce: Callable[..., Any],
) -> None:
    tracker = _data_tracker(params, config)
    report_path = getattr(report, "path", None)
    try:
        result = produce(config, cleaned.path, quarantine.path, report_path)
    except SftpipeError:
        # The report says why the step failed (counts, examples): keep it with the run.
        if tracker and report_path and Path(report_path).exists():
            _log_bytes(tracker, "reports/clean.html", Path(report_path).read_bytes())
        raise
    tags = {
        "sftpipe.data.input_digest": result.input_digest,
        "sftpipe.data.cleaned_digest": result.output_digest,
        "sftpipe.data.task": result.task,
    }
    cleaned.metadata.update(
        rows=result.rows_out,
        digest=result.output_digest,
        input_digest=result.input_digest,
        source=config.data_uri,
        task=result.task,
        **_summary(config, result.metrics()),
        **tags,
    )
    quarantine.metadata.update(rows=sum(result.dropped.values()))
    _record(metrics, tracker, "clean", result.metrics())
    if tracker:
        tracker.set_tags(tags)
        if report_path:
            _log_bytes(tracker, "reports/clean.html", Path(report_path).read_bytes())
    print(
        f"[clean] {result.rows_out} of {result.rows_in} rows kept ({result.task}); quarantined: "
        f"{dict(result.dropped) or 'none'}",
        flush=True,
    )


def tokenize(
    params: dict[str, Any],
    cleaned: Any,
    train: Any,
    validation: Any,
    quarantine: Any,
    metrics: Any,
    report: Any = None,
) -> None:
    config, model = TokenizeConfig.from_values(params), ModelConfig.from_values(params)
    data = DataConfig.from_values(params)
    tracker = _data_tracker(params, config, model)
    report_path = getattr(report, "path", None)
    result = tokenize_stage.run(
        config,
        model.base_model,
        cleaned.path,
        train.path,
        validation.path,
        quarantine.path,
        report_path=report_path,
        label_map=data.label_map,
        num_workers=data.num_workers,
    )
    task = tasks.by_name(result.task)
    shared: dict[str, Any] = {"task": result.task}
    if result.label_map:
        shared["label_map"] = json.dumps(result.label_map, ensure_ascii=False)
    else:
        shared["chat_template"] = result.chat_template
    train.metadata.update(
        rows=result.train_rows,
        file_rows=result.train_file_rows,
        packed=bool(config.packing and task.token_labels),
        digest=storage.sha256_file(train.path),
        clean={k: v for k, v in cleaned.metadata.items() if k in ("config", "metrics")}
        | {k: v for k, v in cleaned.metadata.items() if k.startswith("sftpipe.")},
        tokenize=_summary(config, result.metrics()),
        **shared,
    )
    validation.metadata.update(
        rows=result.validation_rows, digest=storage.sha256_file(validation.path), **shared
    )
    quarantine.metadata.update(
        rows=result.dropped_too_long
        + result.quarantined_no_loss_tokens
        + result.template_errors
        + result.unknown_labels
    )
    _record(metrics, tracker, "tokenize", result.metrics())
    if tracker and report_path:
        _log_bytes(tracker, "reports/tokenize.html", Path(report_path).read_bytes())
    packed = (
        f", packed into {result.train_file_rows} rows ({result.packing_efficiency:.1%} full)"
        if config.packing and task.token_labels
        else ""
    )
    trained = f" ({result.loss_tokens} trained)" if task.token_labels else ""
    print(
        f"[tokenize] {result.train_rows} train / {result.validation_rows} validation rows "
        f"({result.task}){packed}, {result.tokens} tokens{trained}, "
        f"{result.truncated_rows} truncated",
        flush=True,
    )


def finetune(params: dict[str, Any], train: Any, validation: Any, model: Any, metrics: Any) -> None:
    config, base = TrainConfig.from_values(params), ModelConfig.from_values(params)
    tracker = _tracker(params, config, base)
    _log_upstream(tracker, train)
    tracker.log_dataset("train", train.uri, train.metadata.get("digest", ""), "training")
    tracker.log_dataset(
        "validation", validation.uri, validation.metadata.get("digest", ""), "validation"
    )
    from sftpipe.kfp_glue import retries

    # A retry after a deterministic failure ends at once (sftpipe.kfp_glue.retries).
    with tracker.system_metrics(), retries.fail_fast(_run_folder(config, params), "finetune"):
        report = _train(params, config, base.base_model, train, validation, model, tracker)
    model.metadata.update(
        base_model=base.base_model,
        best_step=report.best_step,
        exported_step=report.exported_step,
        framework="transformers",
    )
    _record(metrics, tracker, "finetune", report.metrics())
    from sftpipe.evaluation.report import loss_curve_png

    _log_bytes(tracker, "plots/loss_curve.png", loss_curve_png(report.history))


def _run_folder(config: TrainConfig, params: dict[str, Any]) -> str:
    """This pipeline run's checkpoint folder ("" without checkpoint_uri): a retried step resumes
    its own run, never another's."""
    return f"{config.checkpoint_uri.rstrip('/')}/{run_key(params)}" if config.checkpoint_uri else ""


def _train(
    params: dict[str, Any],
    config: TrainConfig,
    base_model: str,
    train: Any,
    validation: Any,
    model: Any,
    tracker: tracking.Tracker,
) -> Any:
    """Fine-tune into `model.path`: in this process; under torchrun with one process per GPU
    of this pod; or, with num_nodes > 1, as a Kubeflow Trainer job across machines."""
    checkpoints = _run_folder(config, params)
    if config.num_nodes > 1:
        from sftpipe.kfp_glue import trainjob

        return trainjob.train(
            config,
            base_model,
            train.uri,
            validation.uri,
            model.path,
            checkpoints,
            run_key(params),
            tracker.run_id,
        )
    processes = finetune_launch.processes_per_node(config)
    if processes > 1:
        args = finetune_launch.entry_args(
            config, base_model, train.path, validation.path, model.path, checkpoints, tracker.run_id
        )
        finetune_launch.launch(processes, args)
        return training_report.read_report(model.path)
    return finetune_stage.run(
        config, base_model, train.path, validation.path, model.path, tracker, checkpoints
    )


def _log_bytes(tracker: tracking.Tracker, artifact_file: str, data: bytes) -> None:
    """Log `data` to the MLflow run as `artifact_file` (folder/name)."""
    folder, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        tracker.log_artifact(path, folder or None)


def evaluate(
    params: dict[str, Any],
    model: Any,
    train: Any,
    validation: Any,
    metrics: Any,
    classification: Any,
    report: Any,
) -> None:
    config, base = EvalConfig.from_values(params), ModelConfig.from_values(params)
    # Only the gate fields of the registry section are inputs here (register logs them all).
    registry_config = RegisterConfig.from_values(params)
    tracker = _tracker(params, config)
    task = tasks.of_tokenized(validation.path)
    result = evaluate_stage.run(
        config,
        registry_config.gate_spec(task.default_gate),
        base.base_model,
        model.path,
        validation.path,
        report.path,
        train_path=train.path,
        task=task,
    )
    _record(metrics, tracker, "evaluate", result.metrics)
    if result.confusion is not None:
        # The KFP UI draws this artifact as a confusion matrix: the tuned model's.
        matrix = result.confusion.matrices["tuned"]
        classification.log_confusion_matrix(result.confusion.names, matrix.tolist())
    # The decision in words next to the numbers (gate_passed is 1.0 or 0.0).
    metrics.metadata["gate_decision"] = result.decision.summary()
    report.metadata.update(base_model_digest=result.base_model_digest)
    tracker.set_tags(
        {
            register_stage.GATE_TAG: result.decision.summary()[:4900],
            BASE_MODEL_DIGEST_TAG: result.base_model_digest,
        }
    )
    _log_bytes(tracker, "reports/evaluation.html", Path(report.path).read_bytes())
    for name, png in result.plots.items():
        _log_bytes(tracker, f"plots/{name}", png)
    samples = [vars(s) for s in result.samples]
    _log_bytes(
        tracker, "reports/samples.json", json.dumps(samples, indent=1, ensure_ascii=False).encode()
    )


def code_version() -> str:
    """sftpipe's version and, from a git checkout, its commit (`-dirty` with local changes).
    Images set SFTPIPE_CODE_VERSION instead."""
    import subprocess

    import sftpipe

    if os.environ.get(CODE_VERSION_ENV):
        return os.environ[CODE_VERSION_ENV]
    root = Path(sftpipe.__file__).resolve().parents[2]
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return sftpipe.__version__
    commit = done.stdout.strip() if done.returncode == 0 else ""
    return f"{sftpipe.__version__}+{commit}" if commit else sftpipe.__version__


def register(
    params: dict[str, Any],
    model: Any,
    cleaned: Any,
    train: Any,
    validation: Any,
    evaluation: Any,
) -> str:
    """Returns the registered version's URI (models:/NAME/VERSION), or "" when the gate
    refused the model."""
    config, evaluation_config = RegisterConfig.from_values(params), EvalConfig.from_values(params)
    tracker = _tracker(params, config)
    run = tracker.client.get_run(tracker.run_id).data
    config_blob = json.dumps(
        {k: v for k, v in sorted(run.params.items()) if k.startswith("config.")}
    ).encode()
    lineage = {
        "sftpipe.pipeline_run_id": run_key(params),
        "sftpipe.kfp_run_id": params["pipeline_run_id"],
        "sftpipe.base_model": str(model.metadata.get("base_model", "")),
        "sftpipe.base_model_digest": run.tags.get(BASE_MODEL_DIGEST_TAG, ""),
        "sftpipe.data.source": str(cleaned.metadata.get("source", "")),
        "sftpipe.data.input_digest": str(cleaned.metadata.get("input_digest", "")),
        "sftpipe.data.cleaned_digest": str(cleaned.metadata.get("digest", "")),
        "sftpipe.data.train_digest": str(train.metadata.get("digest", "")),
        "sftpipe.data.validation_digest": str(validation.metadata.get("digest", "")),
        "sftpipe.config_digest": hashlib.sha256(config_blob).hexdigest()[:16],
        "sftpipe.code_version": code_version(),
        "sftpipe.mlflow_run_id": tracker.run_id,
    }
    scores = {
        k: float(v)
        for k, v in evaluation.metadata.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    result = register_stage.run(
        config,
        evaluation_config,
        model.path,
        validation.path,
        scores,
        lineage,
        tracker,
    )
    if result.registered:
        tracker.log_metrics({"register.champion": float(result.champion)})
        url = tracking.model_version_url(config.model_name, result.version)
        print(f"[register] browse it: {url}", flush=True)
    return result.model_uri


STEPS: dict[str, Callable[..., Any]] = {
    "data_digest": data_digest,
    "clean": clean,
    "clean_plan": clean_plan,
    "clean_shard": clean_shard,
    "clean_merge": clean_merge,
    "tokenize": tokenize,
    "finetune": finetune,
    "evaluate": evaluate,
    "register": register,
}
