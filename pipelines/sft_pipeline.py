"""The SFT pipeline: clean -> tokenize -> finetune -> evaluate -> register.

Wiring only. The pipeline's parameters are the config fields (`sftpipe.config.FIELDS`) with
their defaults and help text, so the KFP UI, `sftpipe run` flags and the components agree.
Cluster settings (GPU, secrets, retries, requests) come from `cluster.ClusterOptions`.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

from kfp import dsl
from sftpipe.components.clean import clean, data_digest
from sftpipe.components.clean.fan_out import clean_merge, clean_plan, clean_shard
from sftpipe.components.evaluate import evaluate
from sftpipe.components.finetune import finetune
from sftpipe.components.images import CPU_IMAGE
from sftpipe.components.register import register
from sftpipe.components.tokenize import tokenize
from sftpipe.pipelines.cluster import FINETUNE_DRIVER, ClusterOptions, apply

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


def _clean_in_shards(
    values: dict[str, Any], digest: Any, cluster: ClusterOptions, on_cluster: Any
) -> Any:
    """clean fanned out over groups of input files, merged by a last task whose outputs are
    those of `clean` (cleaned, quarantine, metrics, report)."""
    plan = clean_plan(
        **_inputs(clean_plan, values), data_digest=digest, num_shards=cluster.clean_shards
    )
    plan.set_display_name("clean: plan shards").set_caching_options(True)
    on_cluster(plan, "clean")
    with dsl.ParallelFor(plan.outputs["shards"], parallelism=cluster.clean_shards) as shard:
        part = clean_shard(shard=shard, data_config=plan.outputs["data_config"], data_digest=digest)
        part.set_display_name("clean: shard").set_caching_options(True)
        on_cluster(part, "clean")
    return clean_merge(
        data_config=plan.outputs["data_config"],
        mlflow_experiment=values["mlflow_experiment"],
        parts=dsl.Collected(part.outputs["part"]),
    )


def _finetune_on_cluster(
    num_nodes: Any,
    component: Any,
    driver: Any,
    finetune_task: Callable[[Any, str, str], Any],
) -> Any:
    """The fine-tuned model from one of two finetune tasks, by the `num_nodes` parameter:
    `component` trains, `driver` (finetune in the CPU image) submits a TrainJob;
    `finetune_task(component, display name, ClusterOptions step)` makes one and returns its model.

    With num_nodes > 1 the step trains nothing itself: it submits a Kubeflow Trainer TrainJob,
    whose nodes get their own GPUs, and waits for it
    (sftpipe.kfp_glue.trainjob). A GPU on that pod would
    sit idle for the whole training, so that task (FINETUNE_DRIVER) has no accelerator, node
    selector or tolerations and small requests. It runs in the CPU image, which has all it needs
    (sftpipe with the kubeflow SDK) and is far smaller than the CUDA one. Kind clusters
    (gpu=False) branch too: a driver holding finetune's CPU and memory there could leave the
    TrainJob's own pods unschedulable on a small node.
    """
    # <= 1 is the exact complement of the step's own test (num_nodes > 1: TrainJob).
    with dsl.If(num_nodes <= 1, name="num_nodes <= 1"):
        single = finetune_task(component, "finetune", "finetune")
    # Not "driver" in the display name: `sftpipe submit --wait` hides tasks named so (KFP's own
    # driver pods, see sftpipe.kfp_glue.kfp_submit.task_states).
    with dsl.Else(name="num_nodes > 1"):
        several = finetune_task(driver, "finetune: TrainJob", FINETUNE_DRIVER)
    # Needs a KFP backend that resolves an artifact OneOf by the branch that ran
    # (kubeflow/pipelines#13436, fixed after 2.16.0; docker/k8s pins 2.17.3).
    return dsl.OneOf(single, several)


def build_pipeline(cluster: ClusterOptions | None = None) -> Any:
    """The pipeline; `cluster` adds the Kubernetes settings (None: for KFP's local runner).

    Without a GPU (`ClusterOptions(gpu=False)`, kind) finetune runs in the CPU image. On a
    cluster finetune branches on num_nodes: one node trains in the finetune task itself; more
    submit a TrainJob from a "driver" task that holds no GPU (see `_finetune_on_cluster`).
    """
    signature = parameters()
    cpu_finetune = _in_image(finetune, CPU_IMAGE)
    finetune_component = cpu_finetune if cluster is not None and not cluster.gpu else finetune

    def on_cluster(task: Any, step: str) -> Any:
        if cluster is not None:
            apply(task, step, cluster)
        return task

    def sft_pipeline(*args: Any, **kwargs: Any) -> str:
        values = signature.bind(*args, **kwargs).arguments
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

        # clean's and tokenize's cache keys: digests of the input files and of the base model's
        # tokenizer files, computed at run time by a task that is never cached, so new data at
        # the same data_uri is cleaned again (tokenize follows: its input is clean's new output)
        # and a new tokenizer at the same base_model tokenizes again. Runs started from the KFP
        # UI get them too.
        digest_task = data_digest(**_inputs(data_digest, values))
        digest_task.set_display_name("clean: data digest").set_caching_options(False)
        on_cluster(digest_task, "clean")
        digest = digest_task.outputs["data_digest"]

        # No run id for clean and tokenize: an input would change their cache keys every run
        # (they read it from the environment, see sftpipe.kfp_glue.steps.RUN_ID_ENV).
        if cluster is not None and cluster.clean_shards > 1:
            clean_task = _clean_in_shards(values, digest, cluster, on_cluster)
        else:
            clean_task = clean(**_inputs(clean, values), data_digest=digest)
        clean_task.set_display_name("clean").set_caching_options(True)
        on_cluster(clean_task, "clean")

        tokenize_task = tokenize(
            cleaned=clean_task.outputs["cleaned"],
            model_digest=digest_task.outputs["model_digest"],
            **_inputs(tokenize, values),
        )
        tokenize_task.set_display_name("tokenize").set_caching_options(True)
        on_cluster(tokenize_task, "tokenize")

        # finetune, evaluate and register record this run in MLflow: a cache hit would leave
        # the pipeline run's MLflow run without its curves, its evaluation or its model.
        def finetune_task(component: Any, name: str, step: str) -> Any:
            task = component(
                train=tokenize_task.outputs["train"],
                validation=tokenize_task.outputs["validation"],
                **_inputs(component, values),
                pipeline_run_id=run_id,
            )
            task.set_display_name(name).set_caching_options(False)
            return on_cluster(task, step).outputs["model"]

        if cluster is None:  # the local runner refuses num_nodes > 1 (sftpipe.kfp_glue.trainjob)
            model = finetune_task(finetune_component, "finetune", "finetune")
        else:
            model = _finetune_on_cluster(
                values["num_nodes"], finetune_component, cpu_finetune, finetune_task
            )

        evaluate_task = evaluate(
            model=model,
            train=tokenize_task.outputs["train"],
            validation=tokenize_task.outputs["validation"],
            **_inputs(evaluate, values),
            pipeline_run_id=run_id,
        )
        evaluate_task.set_display_name("evaluate").set_caching_options(False)
        on_cluster(evaluate_task, "evaluate")

        register_task = register(
            model=model,
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
