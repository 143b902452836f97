"""Fine-tuning across machines: a Kubeflow Trainer TrainJob (trainer.kubeflow.org/v1alpha1).

With `num_nodes > 1` the finetune step does not train itself. Through the `kubeflow` SDK
(TrainerClient, Kubernetes backend) it submits a TrainJob that runs the same entry point,
`torchrun -m sftpipe.kfp_glue.finetune_launch ...`, on `num_nodes` pods of the
`torch-distributed` ClusterTrainingRuntime (the Trainer's torch plugin hands torchrun the node
count, node rank, processes per node and master address in PET_* variables), waits for
Complete or Failed while streaming node 0's log, and copies the model the job exported into the
step's output.

Supported: the finetune component's image, resources per node (the finetune step's accelerator,
CPU and memory requests), the S3 and MLflow settings of the pipeline's pods (the same Secret and
ConfigMap, by reference), node selector and tolerations; a retried step re-attaches to its
running job, or resubmits a failed one, which resumes from the checkpoints.
The nodes share no disk with the pipeline, so the data, the checkpoints and the model travel
through the object store: the pipeline root and `checkpoint_uri` must be s3:// (minio://, KFP's
name for its own store, is read as s3://). The step's service account needs RBAC to create,
get and delete trainjobs and to read pods and their logs.
The job does not outlive its run: a cancelled run (SIGTERM to the step's pod), a failed job or
a wait past the timeout deletes it (docs/kubernetes.md). Its nodes run as the images' non-root
user on a read-only root file system.
Not supported: other runtimes, initializers, elastic training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftpipe import storage
from sftpipe.config import TrainConfig
from sftpipe.errors import SftpipeError

if TYPE_CHECKING:  # torch: not needed to compile a pipeline with NodeSettings
    from sftpipe.modeling.training_report import TrainReport

SETTINGS_ENV = "SFTPIPE_TRAINJOB"  # NodeSettings as JSON, set on the finetune task at compile
RUNTIME = "torch-distributed"
CONTAINER = "node"  # the trainer container of the torch runtime's "node" replicated job
COMPLETE, FAILED = "Complete", "Failed"
# The nodes run as the pipeline's pods do (pipelines/cluster.py): as the images' non-root user
# (docker/Dockerfile: uid 10001), without privilege escalation or capabilities, on a read-only
# root file system with emptyDirs where Python, torch and Hugging Face write (/tmp and $HOME).
NODE_UID = 10001
POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": NODE_UID,
    "runAsGroup": NODE_UID,
    "fsGroup": NODE_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
WRITABLE_DIRS = {"tmp": "/tmp", "home": "/home/sftpipe"}
# The pod label the MLflow server's NetworkPolicy admits (docker/k8s/mlflow/networkpolicy.yaml):
# on the pipeline's pods (pipelines/cluster.py) and on the TrainJob's nodes, which log to MLflow.
MLFLOW_CLIENT_LABEL = ("sftpipe.io/mlflow-client", "true")


@dataclass(frozen=True)
class NodeSettings:
    """What each node of the job gets; fixed when the pipeline is compiled
    (`pipelines/cluster.py`) and handed to the finetune step in SFTPIPE_TRAINJOB."""

    image: str
    resources: dict[str, Any] = field(default_factory=dict)  # e.g. {"nvidia.com/gpu": 8}
    env: list[dict[str, Any]] = field(default_factory=list)  # Kubernetes EnvVars (valueFrom)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    namespace: str = ""  # "": the step's own namespace
    timeout_s: int = 7 * 24 * 3600
    poll_s: int = 30

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls) -> NodeSettings:
        text = os.environ.get(SETTINGS_ENV, "")
        if not text:
            raise SftpipeError(
                "num_nodes",
                f"{SETTINGS_ENV} is not set, so the nodes' image and resources are unknown",
                "compile the pipeline with `sftpipe compile` (num_nodes > 1 needs a cluster)",
            )
        return cls(**json.loads(text))


def s3_uri(uri: str, what: str) -> str:
    """`uri` as an s3:// URI the job's nodes can read; anything else is refused."""
    if uri.startswith("minio://"):
        return "s3://" + uri.removeprefix("minio://")
    if not storage.is_s3(uri):
        raise SftpipeError(
            what,
            f"{uri or 'empty'}: a TrainJob's nodes share no disk with the pipeline, so this "
            "must be on S3-compatible object storage",
            "use an s3:// pipeline root and an s3:// --checkpoint-uri with num_nodes > 1",
        )
    return uri


def job_name(run_key: str) -> str:
    """A name fixed by the pipeline run, so a retried step finds its own job."""
    return "sftpipe-" + hashlib.sha256(run_key.encode()).hexdigest()[:12]


def _trainer_and_options(
    settings: NodeSettings, num_nodes: int, name: str, args: list[str]
) -> tuple[Any, list[Any]]:
    """The SDK objects that make up the TrainJob: a CustomTrainerContainer and options."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer import options as opt

    from sftpipe.kfp_glue import finetune_launch

    trainer = CustomTrainerContainer(
        image=settings.image,
        num_nodes=num_nodes,
        # Quantities as strings: the SDK would send the number 2 as 2.0.
        resources_per_node={k: str(v) for k, v in settings.resources.items()} or None,
    )
    container = opt.ContainerPatch(
        name=CONTAINER,
        env=settings.env or None,
        volume_mounts=[{"name": name, "mountPath": path} for name, path in WRITABLE_DIRS.items()],
        security_context=CONTAINER_SECURITY,
    )
    pod = opt.PodSpecPatch(
        containers=[container],
        volumes=[{"name": name, "emptyDir": {}} for name in WRITABLE_DIRS],
        security_context=POD_SECURITY,
        node_selector=settings.node_selector or None,
        tolerations=settings.tolerations or None,
    )
    node = opt.ReplicatedJobPatch(
        name=CONTAINER,
        template=opt.JobTemplatePatch(
            spec=opt.JobSpecPatch(
                template=opt.PodTemplatePatch(
                    metadata={"labels": dict([MLFLOW_CLIENT_LABEL])}, spec=pod
                )
            )
        ),
    )
    patch = opt.RuntimePatch(
        training_runtime_spec=opt.TrainingRuntimeSpecPatch(
            template=opt.JobSetTemplatePatch(spec=opt.JobSetSpecPatch(replicated_jobs=[node]))
        )
    )
    options = [
        opt.Name(name),
        opt.Labels({"app.kubernetes.io/part-of": "sftpipe"}),
        # torchrun reads --nnodes, --node-rank, --nproc-per-node and the master from PET_*.
        opt.TrainerCommand(["torchrun"]),
        opt.TrainerArgs(["-m", finetune_launch.MODULE, *args]),
        patch,
    ]
    return trainer, options


def train(
    config: TrainConfig,
    base_model: str,
    train_uri: str,
    validation_uri: str,
    output_dir: str | Path,
    checkpoint_uri: str,
    run_key: str,
    mlflow_run_id: str = "",
    settings: NodeSettings | None = None,
    backend_config: Any = None,
) -> TrainReport:
    """Run finetune as a TrainJob of `config.num_nodes` nodes and copy its model into
    `output_dir`; `checkpoint_uri` is this run's own checkpoint prefix. `backend_config` is the
    SDK's KubernetesBackendConfig (default: in-cluster or kube-config, the step's namespace)."""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    from sftpipe.kfp_glue import finetune_launch
    from sftpipe.modeling import training_report

    settings = settings or NodeSettings.from_env()
    checkpoints = s3_uri(checkpoint_uri, "checkpoint_uri")
    output_uri = f"{checkpoints.rstrip('/')}/model"
    args = finetune_launch.entry_args(
        config,
        base_model,
        s3_uri(train_uri, "train data (pipeline root)"),
        s3_uri(validation_uri, "validation data (pipeline root)"),
        output_uri,
        checkpoints,
        mlflow_run_id,
    )
    name = job_name(run_key)
    where = f"TrainJob {name}"
    try:
        client = TrainerClient(
            backend_config or KubernetesBackendConfig(namespace=settings.namespace or None)
        )
        trainer, options = _trainer_and_options(settings, config.num_nodes, name, args)
        job = _run_job(client, name, where, trainer, options, config.num_nodes, settings)
    except (RuntimeError, ValueError) as exc:  # the API server or the SDK, not the training
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise storage.TransientError(
            where, f"{exc}{cause}", "check that Kubeflow Trainer is installed and the RBAC"
        ) from None
    log = job.log
    if job.status != COMPLETE:
        # A failed job goes: the failure is in the node log above; a retry submits it again,
        # resuming from the checkpoints.
        _delete(client, name, "it failed")
        prefix = finetune_launch.ERROR_PREFIX
        error = next((ln for ln in log if ln.startswith(prefix)), "").removeprefix(prefix)
        # Deterministic only when the node said so; no error line: a lost node, an OOM kill.
        failed = finetune_launch.failure(
            where, error, "rerun the step to resume from the checkpoints"
        )
        raise type(failed)(where, f"failed: {failed.problem}", failed.fix)
    _fetch(output_uri, Path(output_dir))
    return training_report.read_report(output_dir)


@dataclass
class _Ended:
    status: str
    log: list[str]


def _run_job(
    client: Any,
    name: str,
    where: str,
    trainer: Any,
    options: list[Any],
    num_nodes: int,
    settings: NodeSettings,
) -> _Ended:
    """Submit (or re-attach to) the job and wait until it ends, streaming node 0's log. A
    cancelled run (SIGTERM to the step's pod) or a wait past `settings.timeout_s` deletes the
    job, so no node keeps its GPUs for a run that is over."""
    with _deleted_on_sigterm(client, name):
        _submit(client, name, trainer, options)
        print(f"[finetune] {where}: {num_nodes} nodes of {settings.image}", flush=True)
        seen: list[str] = []
        node_log = _NodeLog(client, name)

        def report_status(job: Any) -> None:
            if not seen or seen[-1] != job.status:
                seen.append(job.status)
                print(f"[finetune] {where}: {job.status}", flush=True)
            node_log.follow_once_running(job)

        try:
            job = client.wait_for_job_status(
                name,
                {COMPLETE, FAILED},
                timeout=settings.timeout_s,
                polling_interval=settings.poll_s,
                callbacks=[report_status],
            )
        except TimeoutError:
            _delete(client, name, f"still running after {settings.timeout_s} s")
            raise SftpipeError(
                where,
                f"did not end within {settings.timeout_s} s; deleted",
                "raise the step's timeout, or lower max_steps",
            ) from None
        return _Ended(job.status, node_log.finish())


class _Cancelled(BaseException):
    """SIGTERM arrived: the pipeline run was cancelled (or the step's pod is being stopped)."""


@contextlib.contextmanager
def _deleted_on_sigterm(client: Any, name: str) -> Iterator[None]:
    """While the block runs, SIGTERM deletes the job and ends the process (exit 143).

    KFP cancels a run by stopping its pods (SIGTERM, then SIGKILL after the grace period);
    Python's default handling would end the step at once and leave the TrainJob training. Only
    the main thread can take signals; elsewhere (a test's thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        raise _Cancelled()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except _Cancelled:
        _delete(client, name, "the pipeline run was cancelled")
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _delete(client: Any, name: str, why: str) -> None:
    """Delete the job (best effort: a failure to delete must not hide why the step ends)."""
    try:
        client.delete_job(name)
        print(f"[finetune] deleted TrainJob {name}: {why}", flush=True)
    except Exception as exc:  # the SDK raises RuntimeError, TimeoutError, ...
        print(
            f"[finetune] could not delete TrainJob {name} ({exc}): kubectl delete trainjob {name}",
            flush=True,
        )


class _NodeLog:
    """Node 0's log on this step's console: streamed from when its pod runs, and whatever the
    stream missed (it broke, or the pod finished between two polls) printed when the job ends,
    from the last line printed on (at most the last `tail` lines)."""

    def __init__(self, client: Any, name: str, tail: int = 200) -> None:
        self.client, self.name, self.tail = client, name, tail
        self.printed = 0
        self.thread: threading.Thread | None = None

    def follow_once_running(self, job: Any) -> None:
        running = any(s.name == f"{CONTAINER}-0" and s.status == "Running" for s in job.steps)
        if running and self.thread is None:
            self.thread = threading.Thread(target=self._follow, daemon=True)
            self.thread.start()

    def _follow(self) -> None:
        try:
            for line in self.client.get_job_logs(self.name, follow=True):
                print(f"[node-0] {line}", flush=True)
                self.printed += 1
        except RuntimeError:  # the API went away: finish() prints the rest
            pass

    def finish(self, wait_s: float = 60.0) -> list[str]:
        """The whole log, once its end has been printed."""
        if self.thread is not None:
            self.thread.join(wait_s)  # the stream ends with the pod
        log = list(self.client.get_job_logs(self.name))
        if self.thread is None or not self.thread.is_alive():
            for line in log[max(self.printed, len(log) - self.tail) :]:
                print(f"[node-0] {line}", flush=True)
        return log


def _submit(client: Any, name: str, trainer: Any, options: list[Any]) -> None:
    """Create the job; a job of that name from an earlier try of this step is followed if it
    is still going, or replaced if it failed (the new one resumes from its checkpoints)."""
    try:
        existing = client.get_job(name)
    except RuntimeError:  # not found (or unreadable: creating it will tell)
        existing = None
    if existing is not None and existing.status != FAILED:
        print(f"[finetune] following the existing TrainJob {name}", flush=True)
        return
    if existing is not None:
        client.delete_job(name)
    client.train(runtime=RUNTIME, trainer=trainer, options=options)


def _fetch(uri: str, dest: Path) -> None:
    """Copy the exported model folder at `uri` into `dest`."""
    with tempfile.TemporaryDirectory(prefix="sftpipe-model-") as tmp:
        folder = storage.local_dir(uri, cache_root=Path(tmp))
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder, dest, dirs_exist_ok=True)
