"""register: enforce the quality gate, register the tuned model, and run champion/challenger.

1. The gate (`sftpipe.evaluation.gate`) is applied again to the evaluation metrics: tuned vs base
   on the primary metric with a margin, no guard metric regressing beyond its allowance. A refused
   model is not registered; the MLflow run's `sftpipe.gate` tag says why.
2. A passing model is logged with `mlflow.transformers.log_model`: a chat model as
   `llm/v1/chat` (OpenAI-style chat signature, an input example, explicit pip requirements, a
   greedy generation budget), a classifier as `text-classification` (pyfunc `predict` on a
   DataFrame or list of texts returns each text's `label` and `score`): the task's
   `mlflow_flavor`; then registered as a
   new version of `model_name`, created with its tags:
   lineage (pipeline run, data and base-model digests, config digest, code version), the gate
   decision and the metrics; its description carries the metrics table.
3. The new version gets the alias `challenger`. It takes `champion` only if it beats the
   current champion, re-scored here on this run's validation set with the same gate (old tags
   are never trusted: they were measured on other data); the first passing model becomes the
   first champion. The decision is serialized per model name (`registry.ChampionLock`, held
   across read, re-score and set): two runs registering at once cannot both take champion, and
   the champion is read again after re-scoring, before it is replaced. Every version's
   `sftpipe.champion` tag agrees with the alias: a dethroned champion's tag says who took it.

Retrying the step is safe: a version already registered by the same pipeline run is found by
its `sftpipe.pipeline_run_id` tag and reused, never duplicated. MLflow calls are retried with
backoff (`sftpipe.tracking.registry.retrying`) and end in one clear line.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from sftpipe import tasks
from sftpipe.config import EvalConfig, RegisterConfig
from sftpipe.errors import SftpipeError
from sftpipe.evaluation import gate
from sftpipe.modeling import models
from sftpipe.tasks.base import Task
from sftpipe.tracking import registry
from sftpipe.tracking.runs import PIPELINE_RUN_TAG, Tracker

GATE_TAG = "sftpipe.gate"
CHAMPION_TAG = "sftpipe.champion"
# How a version's champion tag starts while it holds the alias (the other reasons start with
# "champion stays" or "lost champion").
HOLDS_CHAMPION = ("first champion", "took champion", "already the champion")
RESCORE_ATTEMPTS = 3  # the champion moved while we re-scored it (by hand): re-score the new one


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


def metrics_table(scores: dict[str, float]) -> str:
    """The base vs tuned metrics as a Markdown table (the model version's description)."""
    lines = ["| metric | base | tuned |", "|---|---|---|"]
    for name in gate.prefixed(scores, "tuned"):
        if f"base_{name}" in scores:
            lines.append(
                f"| {name} | {scores[f'base_{name}']:.4g} | {scores[f'tuned_{name}']:.4g} |"
            )
    return "\n".join(lines)


def _log_model(model_dir: Path, tracker: Tracker, max_new_tokens: int, task: Task) -> Any:
    import mlflow
    import transformers

    flavor = task.mlflow_flavor(max_new_tokens)
    model = transformers.pipeline(
        flavor.pipeline_task, model=str(model_dir), tokenizer=str(model_dir), device="cpu"
    )
    with mlflow.start_run(run_id=tracker.run_id):
        return mlflow.transformers.log_model(
            transformers_model=model,
            name="model",
            pip_requirements=pip_requirements(),
            **flavor.log_model_args,
        )


def rescore_version(
    name: str,
    version: str,
    eval_config: EvalConfig,
    validation_path: str | Path,
    with_generation: bool,
    task: Task | None = None,
) -> dict[str, float] | None:
    """A registered version's metrics on this evaluation set (its own tokenizer; the rows are
    re-tokenized when it tokenizes them differently); None when the task cannot score it on
    this set (a classifier of other labels)."""
    task = task or tasks.of_tokenized(validation_path)
    uri = f"models:/{name}/{version}"
    with tempfile.TemporaryDirectory(prefix="sftpipe-champion-") as tmp:
        folder = registry.download(uri, Path(tmp))
        return task.rescore(
            folder, uri, f"champion v{version}", eval_config, Path(validation_path), with_generation
        )


def run(
    config: RegisterConfig,
    eval_config: EvalConfig,
    model_dir: str | Path,
    validation_path: str | Path,
    metrics: dict[str, float],
    lineage: dict[str, str],
    tracker: Tracker,
) -> RegisterResult:
    task = tasks.of_tokenized(validation_path)
    spec = config.gate_spec(task.default_gate)
    decision = gate.decide(spec, gate.prefixed(metrics, "base"), gate.prefixed(metrics, "tuned"))
    tracker.set_tags({GATE_TAG: decision.summary()})
    if not decision.passed:
        print(f"[register] not registered: gate {decision.summary()}", flush=True)
        return RegisterResult(False, decision.summary())

    model_dir = Path(model_dir)
    # A folder without a (chat) tokenizer fails here, in a line.
    models.load_tokenizer(model_dir, chat=task.chat_template)
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
            tasks.TASK_TAG: task.name,
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

    owner = f"{pipeline_run_id or tracker.run_id} v{version}"
    with registry.ChampionLock(client, name, owner) as lock:
        is_champion, champion_reason = _champion(
            client, name, version, spec, metrics, eval_config, validation_path, task, lock
        )
        _tag_version(client, name, version, champion_reason)
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


def _tag_version(client: Any, name: str, version: str, reason: str) -> None:
    registry.retrying(
        "tag the model version",
        lambda: client.set_model_version_tag(name, version, CHAMPION_TAG, reason[:4900]),
    )


def _champion(
    client: Any,
    name: str,
    version: str,
    spec: gate.GateSpec,
    scores: dict[str, float],
    eval_config: EvalConfig,
    validation_path: str | Path,
    task: Task,
    lock: registry.ChampionLock,
) -> tuple[bool, str]:
    """Give `version` the champion alias if it beats the current champion; say why. Runs
    under `lock`, so no other register step of this model reads or moves the champion
    meanwhile."""
    for _ in range(RESCORE_ATTEMPTS):
        current = registry.version_by_alias(client, name, registry.CHAMPION)
        if current is None:
            lock.check()
            registry.set_alias(client, name, registry.CHAMPION, version)
            return True, "first champion (there was none)"
        held = str(current.version)
        if held == version:
            return True, "already the champion"
        print(
            f"[register] re-scoring champion {name} version {held} on this evaluation set",
            flush=True,
        )
        champion = rescore_version(
            name, held, eval_config, validation_path, spec.needs_generation, task
        )
        # Read it again: re-scoring takes minutes, and the lock binds sftpipe's register steps
        # only (a person may move the alias by hand meanwhile).
        again = registry.version_by_alias(client, name, registry.CHAMPION)
        if again is None or str(again.version) != held:
            print(
                f"[register] the champion of {name} moved while it was re-scored: again",
                flush=True,
            )
            continue
        if champion is None:
            return False, (
                f"champion stays v{held}: it classifies other labels than this run's, so they "
                "cannot be compared; promote by hand or use another --model-name"
            )
        challenger = gate.prefixed(scores, "tuned")
        duel = gate.decide(
            spec, champion, challenger, f"champion v{held}", f"challenger v{version}"
        )
        if not duel.passed:
            return False, f"champion stays v{held}: {duel.summary()}"
        lock.check()
        registry.set_alias(client, name, registry.CHAMPION, version)
        _tag_version(client, name, held, f"lost champion to v{version}: {duel.summary()}")
        return True, f"took champion: {duel.summary()}"
    raise SftpipeError(
        f"models:/{name}@{registry.CHAMPION}",
        f"the champion moved {RESCORE_ATTEMPTS} times while version {version} re-scored it",
        "retry the register step once the champion stays put",
    )
