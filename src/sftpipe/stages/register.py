"""register: log the tuned model to MLflow and register it when it beats the base model.

The gate: the tuned model's validation loss must be lower than the base model's by more than
`min_improvement`. A passing model is logged with `mlflow.transformers.log_model` (explicit pip
requirements, a generation budget), registered as a new version of `model_name`, tagged with
its lineage and metrics, and given the alias `challenger`. A failing one is not registered; the
MLflow run records why.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from sftpipe.config import RegisterConfig
from sftpipe.errors import SftpipeError
from sftpipe.tracking import Tracker

ALIAS = "challenger"
GATE_TAG = "sftpipe.gate"


@dataclass(frozen=True)
class RegisterResult:
    registered: bool
    reason: str
    model_name: str = ""
    version: str = ""
    model_uri: str = ""


def gate(config: RegisterConfig, metrics: dict[str, float]) -> tuple[bool, str]:
    improvement = metrics["validation_loss_improvement"]
    base, tuned = metrics["base_validation_loss"], metrics["tuned_validation_loss"]
    verdict = improvement > config.min_improvement
    relation = ">" if verdict else "<="
    return verdict, (
        f"validation loss {base:.4f} -> {tuned:.4f}: improvement {improvement:.4f} "
        f"{relation} min_improvement {config.min_improvement}"
    )


def pip_requirements() -> list[str]:
    """Pins of what the logged model needs to load (mlflow's inference otherwise imports
    torchvision and fails)."""
    packages = ("torch", "transformers", "tokenizers", "accelerate", "safetensors")
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in packages]


def run(
    config: RegisterConfig,
    model_dir: str | Path,
    metrics: dict[str, float],
    lineage: dict[str, str],
    tracker: Tracker,
    max_new_tokens: int,
) -> RegisterResult:
    import mlflow
    import transformers

    passed, reason = gate(config, metrics)
    tracker.set_tags({GATE_TAG: ("passed: " if passed else "rejected: ") + reason})
    if not passed:
        print(f"[register] not registered: {reason}", flush=True)
        return RegisterResult(False, reason)

    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer_config.json").exists():
        raise SftpipeError(
            str(model_dir),
            "the model folder has no tokenizer",
            "the finetune output must be a save_pretrained dir with its tokenizer",
        )
    generator = transformers.pipeline(
        "text-generation", model=str(model_dir), tokenizer=str(model_dir), device="cpu"
    )
    try:
        with mlflow.start_run(run_id=tracker.run_id):
            info = mlflow.transformers.log_model(
                transformers_model=generator,
                name="model",
                task="text-generation",
                pip_requirements=pip_requirements(),
                model_config={"max_new_tokens": max_new_tokens, "do_sample": False},
                registered_model_name=config.model_name,
            )
        version = str(info.registered_model_version)
        client: Any = tracker.client
        for key, value in (lineage | {k: f"{v:.6g}" for k, v in metrics.items()}).items():
            client.set_model_version_tag(config.model_name, version, key, str(value))
        client.set_registered_model_alias(config.model_name, ALIAS, version)
    except SftpipeError:
        raise
    except Exception as exc:  # mlflow surfaces REST, S3 and validation failures alike
        raise SftpipeError(
            mlflow.get_tracking_uri(),
            f"registering {config.model_name!r} failed ({type(exc).__name__}: {exc})",
            "check the MLflow server and the model name, then retry this step",
        ) from None
    model_uri = f"models:/{config.model_name}@{ALIAS}"
    print(f"[register] {config.model_name} version {version} registered as {model_uri}", flush=True)
    return RegisterResult(True, reason, config.model_name, version, model_uri)
