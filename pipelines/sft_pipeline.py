"""The SFT pipeline: clean -> tokenize -> finetune -> evaluate -> register.

Wiring only. The pipeline's parameters are the config fields (`sftpipe.config.FIELDS`) with
their defaults and help text, so the KFP UI, `sftpipe run` flags and the components agree.
"""

from __future__ import annotations

import inspect
from typing import Any

from kfp import dsl
from sftpipe.components.clean import clean
from sftpipe.components.evaluate import evaluate
from sftpipe.components.finetune import finetune
from sftpipe.components.register import register
from sftpipe.components.tokenize import tokenize

from sftpipe.config import FIELDS, PipelineConfig, kfp_type

PIPELINE_NAME = "sftpipe-sft"


def parameters() -> inspect.Signature:
    """The pipeline signature: one typed parameter per config field, default included."""
    defaults = PipelineConfig().flat()
    return inspect.Signature(
        return_annotation=str,
        parameters=[
            inspect.Parameter(
                name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=defaults[name],
                annotation=kfp_type(info.annotation),
            )
            for name, (_section, info) in FIELDS.items()
        ],
    )


def _docstring() -> str:
    args = "\n".join(
        f"    {name}: {' '.join(info.description.split())}"
        for name, (_section, info) in FIELDS.items()
    )
    return (
        "Supervised fine-tuning: clean, tokenize, fine-tune, evaluate against the base "
        f"model, register the winner in MLflow.\n\nArgs:\n{args}\n"
    )


def _inputs(component: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The pipeline parameters this component declares as inputs."""
    wanted = component.component_spec.inputs or {}
    return {name: value for name, value in values.items() if name in wanted}


def build_pipeline(gpu: bool = True) -> Any:
    """The compiled-ready pipeline; `gpu=False` leaves out the accelerator request (kind)."""
    signature = parameters()

    def sft_pipeline(*args: Any, **kwargs: Any) -> str:
        values = signature.bind(*args, **kwargs).arguments
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

        clean_task = clean(**_inputs(clean, values), pipeline_run_id=run_id)
        clean_task.set_display_name("clean")

        tokenize_task = tokenize(
            cleaned=clean_task.outputs["cleaned"],
            **_inputs(tokenize, values),
            pipeline_run_id=run_id,
        )
        tokenize_task.set_display_name("tokenize")

        finetune_task = finetune(
            train=tokenize_task.outputs["train"],
            validation=tokenize_task.outputs["validation"],
            **_inputs(finetune, values),
            pipeline_run_id=run_id,
        )
        finetune_task.set_display_name("finetune").set_cpu_request("4").set_memory_request("16G")
        if gpu:
            finetune_task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)

        evaluate_task = evaluate(
            model=finetune_task.outputs["model"],
            validation=tokenize_task.outputs["validation"],
            **_inputs(evaluate, values),
            pipeline_run_id=run_id,
        )
        evaluate_task.set_display_name("evaluate").set_memory_request("8G")

        register_task = register(
            model=finetune_task.outputs["model"],
            cleaned=clean_task.outputs["cleaned"],
            train=tokenize_task.outputs["train"],
            validation=tokenize_task.outputs["validation"],
            evaluation=evaluate_task.outputs["metrics"],
            **_inputs(register, values),
            pipeline_run_id=run_id,
        )
        register_task.set_display_name("register").set_caching_options(False)
        register_task.set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2)
        return register_task.output

    sft_pipeline.__signature__ = signature  # type: ignore[attr-defined]
    sft_pipeline.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    sft_pipeline.__annotations__["return"] = signature.return_annotation
    sft_pipeline.__doc__ = _docstring()
    return dsl.pipeline(name=PIPELINE_NAME, description=_docstring().split("\n")[0])(sft_pipeline)


sft_pipeline = build_pipeline()
