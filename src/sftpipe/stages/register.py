"""register: enforce the quality gate, register the tuned model, and run champion/challenger.

1. The gate (`sftpipe.evaluation.gate`) is applied again to the evaluation metrics: tuned vs base
   on the primary metric with a margin, no guard metric regressing beyond its allowance. A refused
   model is not registered; the MLflow run's `sftpipe.gate` tag says why.
2. A passing model is logged with `mlflow.transformers.log_model`: a chat model as
   `llm/v1/chat` (OpenAI-style chat signature, an input example, explicit pip requirements, a
   greedy generation budget), a classifier as `text-classification` (pyfunc `predict` on a
   DataFrame or list of texts returns each text's `label` and `score`); then registered as a
   new version of `model_name`, created with its tags:
   lineage (pipeline run, data and base-model digests, config digest, code version), the gate
   decision and the metrics; its description carries the metrics table.
3. The new version gets the alias `challenger`. It takes `champion` only if it beats the
   current champion, re-scored here on this run's validation set with the same gate (old tags
   are never trusted: they were measured on other data); the first passing model becomes the
   first champion.

Retrying the step is safe: a version already registered by the same pipeline run is found by
its `sftpipe.pipeline_run_id` tag and reused, never duplicated. MLflow calls are retried with
backoff (`sftpipe.tracking.registry.retrying`) and end in one clear line.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from sftpipe.config import EvalConfig, RegisterConfig
from sftpipe.data.tokenized import read_parquet
from sftpipe.evaluation import gate
from sftpipe.modeling import classify, lm, models
from sftpipe.stages import evaluate, evaluate_classifier
from sftpipe.tracking import registry
from sftpipe.tracking.runs import PIPELINE_RUN_TAG, Tracker

GATE_TAG = "sftpipe.gate"
CHAMPION_TAG = "sftpipe.champion"
INPUT_EXAMPLE_PROMPT = "Hello! What can you do?"
INPUT_EXAMPLE_TEXTS = ["This was great, I would buy it again.", "质量很差，不推荐。"]


@dataclass(frozen=True)
class RegisterResult:
    registered: bool
    reason: str
    model_name: str = ""
    version: str = ""
    model_uri: str = ""
    champion: bool = False
    champion_reason: str = ""


def pip_requirements() -> list[str]:
    """Pins of what the logged model needs to load (mlflow's inference otherwise imports
    torchvision and fails)."""
    packages = ("torch", "transformers", "tokenizers", "accelerate", "safetensors")
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in packages]


def metrics_table(metrics: dict[str, float]) -> str:
    """The base vs tuned metrics as a Markdown table (the model version's description)."""
    lines = ["| metric | base | tuned |", "|---|---|---|"]
    for name in gate.prefixed(metrics, "tuned"):
        if f"base_{name}" in metrics:
            lines.append(
                f"| {name} | {metrics[f'base_{name}']:.4g} | {metrics[f'tuned_{name}']:.4g} |"
            )
    return "\n".join(lines)


def _log_model(model_dir: Path, tracker: Tracker, max_new_tokens: int, task: str) -> Any:
    import mlflow
    import transformers

    extra: dict[str, Any]
    if task == "classification":
        pipeline_task = "text-classification"
        extra = {"task": "text-classification", "input_example": INPUT_EXAMPLE_TEXTS}
    else:
        pipeline_task = "text-generation"
        extra = {
            "task": "llm/v1/chat",
            "model_config": {"max_new_tokens": max_new_tokens, "do_sample": False},
            "input_example": {
                "messages": [{"role": "user", "content": INPUT_EXAMPLE_PROMPT}],
                "max_tokens": max_new_tokens,
            },
        }
    model = transformers.pipeline(
        pipeline_task, model=str(model_dir), tokenizer=str(model_dir), device="cpu"
    )
    with mlflow.start_run(run_id=tracker.run_id):
        return mlflow.transformers.log_model(
            transformers_model=model, name="model", pip_requirements=pip_requirements(), **extra
        )


def rescore_version(
    name: str,
    version: str,
    eval_config: EvalConfig,
    validation_path: str | Path,
    with_generation: bool,
) -> dict[str, float] | None:
    """A registered version's metrics on this evaluation set (its own tokenizer; the rows are
    re-tokenized when it tokenizes them differently); None for a classifier of other labels,
    which cannot be scored on this set."""
    device = lm.default_device()
    dtype = lm.autocast_dtype("auto", device)
    uri = f"models:/{name}/{version}"
    labels = classify.label_map(validation_path)
    with tempfile.TemporaryDirectory(prefix="sftpipe-champion-") as tmp:
        folder = registry.download(uri, Path(tmp))
        tokenizer = models.load_tokenizer(folder, uri, chat=labels is None)
        label = f"champion v{version}"
        if labels is not None:
            theirs = json.loads((folder / "config.json").read_text()).get("label2id")
            if theirs != labels:
                return None
            rows = evaluate_classifier.for_tokenizer(read_parquet(validation_path), tokenizer)
            model = classify.load_model(folder, labels, uri)
            names = evaluate_classifier.names_of(labels)
            return evaluate_classifier.score_classifier(
                model, tokenizer, rows, names, eval_config, device, dtype, label
            ).metrics
        model = models.load_causal_lm(folder, uri)
        eval_set = evaluate.load_eval_set(validation_path, eval_config.eval_prompts)
        eval_set = evaluate.for_tokenizer(eval_set, tokenizer)
        return evaluate.score(
            model, tokenizer, eval_set, eval_config, device, dtype, label, with_generation
        ).metrics


def run(
    config: RegisterConfig,
    eval_config: EvalConfig,
    model_dir: str | Path,
    validation_path: str | Path,
    metrics: dict[str, float],
    lineage: dict[str, str],
    tracker: Tracker,
) -> RegisterResult:
    task = classify.task_of(validation_path)
    spec = config.gate_spec(task)
    decision = gate.decide(spec, gate.prefixed(metrics, "base"), gate.prefixed(metrics, "tuned"))
    tracker.set_tags({GATE_TAG: decision.summary()})
    if not decision.passed:
        print(f"[register] not registered: gate {decision.summary()}", flush=True)
        return RegisterResult(False, decision.summary())

    model_dir = Path(model_dir)
    # A folder without a (chat) tokenizer fails here, in a line.
    models.load_tokenizer(model_dir, chat=task == "chat")
    name, client = config.model_name, tracker.client
    registry.ensure_registered_model(client, name)

    pipeline_run_id = lineage.get(PIPELINE_RUN_TAG, "")
    existing = registry.version_of_run(client, name, pipeline_run_id) if pipeline_run_id else None
    if existing is not None:
        version = str(existing.version)
        print(
            f"[register] {name} version {version} was already registered by this pipeline run "
            "(a retried step): reusing it",
            flush=True,
        )
    else:
        info = registry.retrying(
            "log the model",
            lambda: _log_model(model_dir, tracker, eval_config.max_new_tokens, task),
        )
        tags = {
            **lineage,
            **{k: f"{v:.6g}" for k, v in metrics.items()},
            GATE_TAG: decision.summary()[:4900],
        }
        created = registry.retrying(
            f"register a version of {name!r}",
            lambda: client.create_model_version(
                name,
                info.model_uri,
                run_id=tracker.run_id,
                tags=tags,
                description=f"{decision.summary()}\n\n{metrics_table(metrics)}",
                model_id=info.model_id,
            ),
            "use letters, digits, '-', '_' and '.' in --model-name",
        )
        version = str(created.version)
        print(f"[register] {name} version {version} registered", flush=True)
    registry.set_alias(client, name, registry.CHALLENGER, version)

    is_champion, champion_reason = _champion(
        client, name, version, spec, metrics, eval_config, validation_path
    )
    registry.retrying(
        "tag the model version",
        lambda: client.set_model_version_tag(name, version, CHAMPION_TAG, champion_reason[:4900]),
    )
    tracker.set_tags({CHAMPION_TAG: champion_reason[:4900]})
    model_uri = f"models:/{name}/{version}"
    print(
        f"[register] {model_uri}: alias {registry.CHALLENGER}"
        + (f" and {registry.CHAMPION}" if is_champion else "")
        + f" ({champion_reason})",
        flush=True,
    )
    return RegisterResult(
        True, decision.summary(), name, version, model_uri, is_champion, champion_reason
    )


def _champion(
    client: Any,
    name: str,
    version: str,
    spec: gate.GateSpec,
    metrics: dict[str, float],
    eval_config: EvalConfig,
    validation_path: str | Path,
) -> tuple[bool, str]:
    """Give `version` the champion alias if it beats the current champion; say why."""
    current = registry.version_by_alias(client, name, registry.CHAMPION)
    if current is None:
        registry.set_alias(client, name, registry.CHAMPION, version)
        return True, "first champion (there was none)"
    if str(current.version) == version:
        return True, "already the champion"
    print(
        f"[register] re-scoring champion {name} version {current.version} on this evaluation set",
        flush=True,
    )
    champion = rescore_version(
        name, str(current.version), eval_config, validation_path, spec.needs_generation
    )
    if champion is None:
        return False, (
            f"champion stays v{current.version}: it classifies other labels than this run's, so "
            "they cannot be compared; promote by hand or use another --model-name"
        )
    challenger = gate.prefixed(metrics, "tuned")
    duel = gate.decide(
        spec, champion, challenger, f"champion v{current.version}", f"challenger v{version}"
    )
    if duel.passed:
        registry.set_alias(client, name, registry.CHAMPION, version)
        return True, f"took champion: {duel.summary()}"
    return False, f"champion stays v{current.version}: {duel.summary()}"
