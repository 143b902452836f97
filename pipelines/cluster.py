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

from sftpipe.kfp_glue.trainjob import NODE_UID, SETTINGS_ENV, WRITABLE_DIRS, NodeSettings
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


@dataclass(frozen=True)
class ClusterOptions:
    """How the pipeline runs on a cluster. Defaults: one NVIDIA GPU for finetune."""

    gpu: bool = True
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_count: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)  # finetune only
    tolerations: tuple[Toleration, ...] | None = None  # finetune; None: GPU_TOLERATION on GPU
    s3_secret: str = "sftpipe-s3"  # "" for none (e.g. workload identity)
    env_config_map: str = "sftpipe-env"
    mlflow_secret: str = "sftpipe-mlflow"  # optional: mounted only if it exists
    retries: int = 2  # finetune's KFP retries (RETRIED_TASKS)
    backoff: str = "30s"
    backoff_factor: float = 2.0
    backoff_max: str = "5m"
    image_pull_policy: str = ""  # "" keeps the cluster default
    # The driver waits on a TrainJob: a fraction of a core (it polls, streams node 0's log and
    # copies the model at the end) and 1G, as its imports (torch, transformers, mlflow, the
    # kubeflow SDK) take ~0.5 GB. Requests only, no limits: it may use more where there is room.
    cpu_requests: dict[str, str] = field(
        default_factory=lambda: {"finetune": "4", FINETUNE_DRIVER: "500m"}
    )
    memory_requests: dict[str, str] = field(
        default_factory=lambda: {"finetune": "16G", "evaluate": "8G", FINETUNE_DRIVER: "1G"}
    )
    clean_shards: int = 1  # >1: clean fans out over groups of input files (dsl.ParallelFor)

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
