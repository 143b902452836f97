"""The SFT pipeline: clean -> tokenize -> finetune -> evaluate -> register.

Wiring only. The pipeline's parameters are the config fields (`sftpipe.config.FIELDS`) with
their defaults and help text, so the KFP UI, `sftpipe run` flags and the components agree.
Cluster settings (GPU, secrets, retries, requests) come from `cluster.ClusterOptions`.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from kfp import dsl
from sftpipe.components.clean import clean
from sftpipe.components.clean.fan_out import clean_merge, clean_plan, clean_shard
from sftpipe.components.evaluate import evaluate
from sftpipe.components.finetune import finetune
from sftpipe.components.images import CPU_IMAGE
from sftpipe.components.register import register
from sftpipe.components.tokenize import tokenize
from sftpipe.pipelines.cluster import ClusterOptions, apply

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


def _in_image(component: Any, image: str) -> Any:
    """The same component running in another image (finetune on CPU nodes)."""
    variant = copy.deepcopy(component)
    variant.component_spec.implementation.container.image = image
    return variant


def _clean_in_shards(values: dict[str, Any], cluster: ClusterOptions, on_cluster: Any) -> Any:
    """clean fanned out over groups of input files, merged by a last task whose outputs are
    those of `clean` (cleaned, quarantine, metrics, report)."""
    plan = clean_plan(**_inputs(clean_plan, values), num_shards=cluster.clean_shards)
    plan.set_display_name("clean: plan shards").set_caching_options(True)
    on_cluster(plan, "clean")
    with dsl.ParallelFor(plan.outputs["shards"], parallelism=cluster.clean_shards) as shard:
        part = clean_shard(shard=shard, data_config=plan.outputs["data_config"])
        part.set_display_name("clean: shard").set_caching_options(True)
        on_cluster(part, "clean")
    return clean_merge(
        data_config=plan.outputs["data_config"],
        mlflow_experiment=values["mlflow_experiment"],
        parts=dsl.Collected(part.outputs["part"]),
    )


def build_pipeline(cluster: ClusterOptions | None = None) -> Any:
    """The pipeline; `cluster` adds the Kubernetes settings (None: for KFP's local runner).

    Without a GPU (`ClusterOptions(gpu=False)`, kind) finetune runs in the CPU image.
    """
    signature = parameters()
    finetune_component = finetune
    if cluster is not None and not cluster.gpu:
        finetune_component = _in_image(finetune, CPU_IMAGE)

    def on_cluster(task: Any, step: str) -> Any:
        if cluster is not None:
            apply(task, step, cluster)
        return task

    def sft_pipeline(*args: Any, **kwargs: Any) -> str:
        values = signature.bind(*args, **kwargs).arguments
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

        # No run id for clean and tokenize: an input would change their cache keys every run
        # (they read it from the environment, see sftpipe.steps.RUN_ID_ENV).
        if cluster is not None and cluster.clean_shards > 1:
            clean_task = _clean_in_shards(values, cluster, on_cluster)
        else:
            clean_task = clean(**_inputs(clean, values))
        clean_task.set_display_name("clean").set_caching_options(True)
        on_cluster(clean_task, "clean")

        tokenize_task = tokenize(cleaned=clean_task.outputs["cleaned"], **_inputs(tokenize, values))
        tokenize_task.set_display_name("tokenize").set_caching_options(True)
        on_cluster(tokenize_task, "tokenize")

        # finetune, evaluate and register record this run in MLflow: a cache hit would leave
        # the pipeline run's MLflow run without its curves, its evaluation or its model.
        finetune_task = finetune_component(
            train=tokenize_task.outputs["train"],
            validation=tokenize_task.outputs["validation"],
            **_inputs(finetune_component, values),
            pipeline_run_id=run_id,
        )
        finetune_task.set_display_name("finetune").set_caching_options(False)
        on_cluster(finetune_task, "finetune")

        evaluate_task = evaluate(
            model=finetune_task.outputs["model"],
            train=tokenize_task.outputs["train"],
            validation=tokenize_task.outputs["validation"],
            **_inputs(evaluate, values),
            pipeline_run_id=run_id,
        )
        evaluate_task.set_display_name("evaluate").set_caching_options(False)
        on_cluster(evaluate_task, "evaluate")

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
        on_cluster(register_task, "register")
        return register_task.output

    sft_pipeline.__signature__ = signature  # type: ignore[attr-defined]
    sft_pipeline.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    sft_pipeline.__annotations__["return"] = signature.return_annotation
    sft_pipeline.__doc__ = _docstring()
    return dsl.pipeline(name=PIPELINE_NAME, description=_docstring().split("\n")[0])(sft_pipeline)


sft_pipeline = build_pipeline()
"""The local-runner variant (`sftpipe run`); `sftpipe compile` builds the cluster ones."""
