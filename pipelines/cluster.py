"""Compile-time platform settings of the pipeline on a Kubernetes cluster.

`ClusterOptions` holds everything that depends on the cluster rather than on the data: the GPU
request of finetune and where it may be scheduled, the Secret and ConfigMap that give every
step its S3 and MLflow settings, retries, image pull policy and resource requests. The wiring in
`sft_pipeline.py` calls `apply()` on each task; `sftpipe compile` builds the options from its
flags. With num_nodes > 1 finetune runs as FINETUNE_DRIVER: it only submits a Kubeflow Trainer
TrainJob, whose nodes get the GPUs (`trainjob_settings`), and waits for it.

None of this is used by `sftpipe run`: KFP's local runner ignores the kfp-kubernetes settings
anyway, but it does honour retry policies (with real back-off sleeps), and a local step that
fails on bad data should fail at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kfp import kubernetes

from sftpipe.kfp_glue.trainjob import (
    MLFLOW_CLIENT_LABEL,
    NODE_UID,
    SETTINGS_ENV,
    WRITABLE_DIRS,
    NodeSettings,
)
from sftpipe.tracking.runs import RUN_ID_ENV

# What each step needs from the cluster; finetune also gets the accelerator (`gpu=True`).
STEPS = ("clean", "tokenize", "finetune", "evaluate", "register")
# finetune with num_nodes > 1: the same component, whose pod trains nothing itself; it gets the
# TrainJob settings, not the accelerator, node selector and tolerations of finetune.
FINETUNE_DRIVER = "finetune-driver"
TASKS = (*STEPS, FINETUNE_DRIVER)  # what the CPU and memory requests are keyed by
# The tasks KFP retries (retryPolicy): finetune only. KFP 2.17 retries any failed attempt,
# whatever its exit code, so a retry policy on clean/tokenize/evaluate/register would only
# repeat their deterministic failures (bad data, a wrong setting): their transient I/O is
# retried inside the step. finetune's retries are for lost or preempted nodes; they resume from
# the checkpoints, and a deterministic failure ends them at once (sftpipe.kfp_glue.retries).
RETRIED_TASKS = ("finetune", FINETUNE_DRIVER)

# Env var -> key, for the Secret with the S3 credentials the steps read (data_uri, base_model).
S3_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}
# The ConfigMap of non-secret settings. MLFLOW_TRACKING_URI must be there; the endpoint and the
# region are optional (absent on AWS S3 itself).
ENV_REQUIRED_KEYS = ("MLFLOW_TRACKING_URI",)
ENV_OPTIONAL_KEYS = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")
# An optional Secret for an MLflow server behind authentication (MLflow reads these names).
MLFLOW_SECRET_KEYS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)

Effect = Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]
EFFECTS: tuple[Effect, ...] = ("NoSchedule", "PreferNoSchedule", "NoExecute")
PULL_POLICIES = ("", "Always", "IfNotPresent", "Never")


@dataclass(frozen=True)
class Toleration:
    """A pod toleration: `key` with `value` (operator Equal) or any value (operator Exists)."""

    key: str
    value: str = ""
    effect: Effect | None = "NoSchedule"

    @classmethod
    def parse(cls, text: str) -> Toleration:
        """`KEY[=VALUE][:EFFECT]`, e.g. `nvidia.com/gpu:NoSchedule` or `pool=gpu`."""
        body, _, effect = text.partition(":")
        key, _, value = body.partition("=")
        if not key or (effect and effect not in EFFECTS):
            raise ValueError(
                f"toleration {text!r}: expected KEY[=VALUE][:EFFECT], EFFECT one of {EFFECTS}"
            )
        return cls(key, value, effect or None)  # type: ignore[arg-type]

    def __str__(self) -> str:
        text = self.key + (f"={self.value}" if self.value else "")
        return text + (f":{self.effect}" if self.effect else "")


GPU_TOLERATION = Toleration("nvidia.com/gpu", "", "NoSchedule")


def _flag(help: str, **how: Any) -> dict[str, Any]:
    """A field's command-line flag (`sftpipe compile` and `submit` generate one per field):
    its help, and optionally its name (`flag`), `metavar` and `choices`."""
    return {"help": help, **how}


@dataclass(frozen=True)
class ClusterOptions:
    """How the pipeline runs on a cluster. Defaults: one NVIDIA GPU for finetune."""

    gpu: bool = field(
        default=True,
        metadata=_flag(
            "finetune with a GPU request, in the CUDA image; --no-gpu: without one, in the CPU "
            "image (kind clusters without GPUs)"
        ),
    )
    accelerator_type: str = field(
        default="nvidia.com/gpu", metadata=_flag("resource name of the finetune accelerator")
    )
    accelerator_count: int = field(
        default=1, metadata=_flag("accelerators for finetune", flag="gpu_count")
    )
    node_selector: dict[str, str] = field(
        default_factory=dict,
        metadata=_flag(
            "node label finetune must run on, e.g. nvidia.com/gpu.present=true (repeatable)",
            metavar="KEY=VALUE",
        ),
    )
    # None: GPU_TOLERATION on GPU
    tolerations: tuple[Toleration, ...] | None = field(
        default=None,
        metadata=_flag(
            "taint finetune tolerates (repeatable; default with a GPU: nvidia.com/gpu:NoSchedule)",
            flag="toleration",
            metavar="KEY[=VALUE][:EFFECT]",
        ),
    )
    s3_secret: str = field(
        default="sftpipe-s3",
        metadata=_flag(
            "Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for every step, '' for none "
            "(e.g. workload identity)"
        ),
    )
    env_config_map: str = field(
        default="sftpipe-env",
        metadata=_flag("ConfigMap with MLFLOW_TRACKING_URI and AWS_ENDPOINT_URL for every step"),
    )
    mlflow_secret: str = field(
        default="sftpipe-mlflow",
        metadata=_flag(
            "optional Secret with MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN (mounted only if it "
            "exists)"
        ),
    )
    retries: int = field(
        default=2, metadata=_flag("KFP retries of a failed finetune step (RETRIED_TASKS)")
    )
    backoff: str = field(default="30s", metadata=_flag("back-off before the first retry"))
    backoff_factor: float = field(
        default=2.0, metadata=_flag("back-off multiplier between retries")
    )
    backoff_max: str = field(default="5m", metadata=_flag("longest back-off between retries"))
    image_pull_policy: str = field(
        default="",
        metadata=_flag(
            "image pull policy of every step ('': the cluster's)", choices=PULL_POLICIES[1:]
        ),
    )
    # The driver waits on a TrainJob: a fraction of a core (it polls, streams node 0's log and
    # copies the model at the end) and 1G, as its imports (torch, transformers, mlflow, the
    # kubeflow SDK) take ~0.5 GB. Requests only, no limits: it may use more where there is room.
    cpu_requests: dict[str, str] = field(
        default_factory=lambda: {"finetune": "4", FINETUNE_DRIVER: "500m"},
        metadata=_flag(
            "CPU request of a step, e.g. finetune=2 (repeatable)",
            flag="cpu_request",
            metavar="STEP=CPU",
        ),
    )
    memory_requests: dict[str, str] = field(
        default_factory=lambda: {"finetune": "16G", "evaluate": "8G", FINETUNE_DRIVER: "1G"},
        metadata=_flag(
            "memory request of a step, e.g. finetune=6G (repeatable)",
            flag="memory_request",
            metavar="STEP=SIZE",
        ),
    )
    clean_shards: int = field(
        default=1,
        metadata=_flag(
            "clean in N parallel shards of the input files, then merge (large inputs; "
            "dsl.ParallelFor)",
            metavar="N",
        ),
    )

    def __post_init__(self) -> None:
        if self.accelerator_count < 1:
            raise ValueError("accelerator_count must be at least 1")
        if self.retries < 0:
            raise ValueError("retries must be 0 or more")
        if self.clean_shards < 1:
            raise ValueError("clean_shards must be at least 1")
        if self.image_pull_policy not in PULL_POLICIES:
            raise ValueError(f"image_pull_policy must be one of {PULL_POLICIES[1:]}")
        for what, requests in (("cpu", self.cpu_requests), ("memory", self.memory_requests)):
            unknown = set(requests) - set(TASKS)
            if unknown:
                raise ValueError(f"{what} request for unknown step(s) {sorted(unknown)}")

    @property
    def finetune_tolerations(self) -> tuple[Toleration, ...]:
        if self.tolerations is not None:
            return self.tolerations
        return (GPU_TOLERATION,) if self.gpu else ()


def trainjob_settings(options: ClusterOptions) -> NodeSettings:
    """What each node of a Kubeflow Trainer job (finetune with num_nodes > 1) gets: the finetune
    step's image, accelerator, CPU and memory, its Secret/ConfigMap env (by reference, so no
    value is copied into the TrainJob), node selector and tolerations."""
    from sftpipe.components.images import CPU_IMAGE, CUDA_IMAGE

    resources: dict[str, Any] = {}
    if options.gpu:
        resources[options.accelerator_type] = options.accelerator_count
    if "finetune" in options.cpu_requests:
        resources["cpu"] = options.cpu_requests["finetune"]
    if "finetune" in options.memory_requests:
        resources["memory"] = options.memory_requests["finetune"]

    def ref(kind: str, name: str, keys: Any, optional: bool = False) -> list[dict[str, Any]]:
        source = {"name": name, "optional": True} if optional else {"name": name}
        return [{"name": env, "valueFrom": {kind: source | {"key": key}}} for env, key in keys]

    env: list[dict[str, Any]] = []
    if options.s3_secret:
        env += ref("secretKeyRef", options.s3_secret, S3_SECRET_KEYS.items())
    if options.env_config_map:
        cm = options.env_config_map
        env += ref("configMapKeyRef", cm, [(k, k) for k in ENV_REQUIRED_KEYS])
        env += ref("configMapKeyRef", cm, [(k, k) for k in ENV_OPTIONAL_KEYS], optional=True)
    if options.mlflow_secret:
        keys = [(k, k) for k in MLFLOW_SECRET_KEYS]
        env += ref("secretKeyRef", options.mlflow_secret, keys, optional=True)
    tolerations = [
        {"key": t.key, "operator": "Equal" if t.value else "Exists"}
        | ({"value": t.value} if t.value else {})
        | ({"effect": t.effect} if t.effect else {})
        for t in options.finetune_tolerations
    ]
    return NodeSettings(
        image=CUDA_IMAGE if options.gpu else CPU_IMAGE,
        resources=resources,
        env=env,
        node_selector=dict(options.node_selector),
        tolerations=tolerations,
    )


def apply(task: Any, step: str, options: ClusterOptions) -> None:
    """Give one pipeline task its cluster settings; `step` is one of TASKS."""
    # The MLflow run key of every step (sftpipe.kfp_glue.steps.RUN_ID_ENV): the run id label
    # KFP puts on its pods, so clean and tokenize need no run-id input and stay cacheable across
    # runs.
    kubernetes.use_field_path_as_env(task, RUN_ID_ENV, "metadata.labels['pipeline/runid']")
    # Restricted pods: the images' non-root user (KFP's compiler adds allowPrivilegeEscalation
    # false, drop ALL and the RuntimeDefault seccomp profile itself). KFP 2.17's platform spec
    # cannot make the root file system read-only; the emptyDirs where the steps write (/tmp,
    # $HOME's caches) let an admission policy that does so (e.g. Kyverno) leave them working.
    kubernetes.set_security_context(
        task, run_as_user=NODE_UID, run_as_group=NODE_UID, run_as_non_root=True
    )
    for volume, path in WRITABLE_DIRS.items():
        kubernetes.empty_dir_mount(task, volume_name=volume, mount_path=path)
    # What the MLflow server's NetworkPolicy admits (docker/k8s/mlflow/networkpolicy.yaml).
    kubernetes.add_pod_label(task, *MLFLOW_CLIENT_LABEL)
    if options.s3_secret:
        kubernetes.use_secret_as_env(task, options.s3_secret, S3_SECRET_KEYS)
    if options.env_config_map:
        kubernetes.use_config_map_as_env(
            task, options.env_config_map, {key: key for key in ENV_REQUIRED_KEYS}
        )
        kubernetes.use_config_map_as_env(
            task, options.env_config_map, {key: key for key in ENV_OPTIONAL_KEYS}, optional=True
        )
    if options.mlflow_secret:
        kubernetes.use_secret_as_env(
            task, options.mlflow_secret, {key: key for key in MLFLOW_SECRET_KEYS}, optional=True
        )
    if options.retries and step in RETRIED_TASKS:
        task.set_retry(
            num_retries=options.retries,
            backoff_duration=options.backoff,
            backoff_factor=options.backoff_factor,
            backoff_max_duration=options.backoff_max,
        )
    if options.image_pull_policy:
        kubernetes.set_image_pull_policy(task, options.image_pull_policy)
    if step in options.cpu_requests:
        task.set_cpu_request(options.cpu_requests[step])
    if step in options.memory_requests:
        task.set_memory_request(options.memory_requests[step])
    if step == FINETUNE_DRIVER:
        # Read only with num_nodes > 1, when finetune submits a Kubeflow Trainer job: the single
        # node finetune task never sees that (sft_pipeline.py branches on num_nodes).
        task.set_env_variable(SETTINGS_ENV, trainjob_settings(options).to_json())
    if step != "finetune":
        return
    if options.gpu:
        task.set_accelerator_type(options.accelerator_type)
        task.set_accelerator_limit(options.accelerator_count)
    for key, value in options.node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    for toleration in options.finetune_tolerations:
        kubernetes.add_toleration(
            task,
            key=toleration.key,
            operator="Equal" if toleration.value else "Exists",
            value=toleration.value or None,
            effect=toleration.effect,
        )
