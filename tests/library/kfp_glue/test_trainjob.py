"""num_nodes > 1: finetune as a Kubeflow Trainer TrainJob, through the kubeflow SDK.

Only the Kubernetes API is mocked: a fake API server on loopback (fixtures/kubernetes_api.py)
that the SDK and the kubernetes client talk to over HTTP. In the end-to-end test its
"controller" runs the TrainJob's own command and arguments on 2 "nodes" (local processes with
the PET_* variables the Trainer's torch plugin sets), reading and writing S3 (SeaweedFS).

The SDK's local process backend is not used: it runs only CustomTrainer functions (our job is a
container command, and TrainerCommand/TrainerArgs refuse that backend), in a fresh virtualenv
per job into which it pip-installs torch before anything runs.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fixtures.kubernetes_api import FakeKubernetes
from fixtures.servers import free_port
from kubeflow.common.types import KubernetesBackendConfig
from kubeflow_trainer_api import models
from kubernetes import client
from safetensors.torch import load_file

from sftpipe import storage
from sftpipe.config import TrainConfig
from sftpipe.errors import SftpipeError
from sftpipe.kfp_glue import trainjob
from sftpipe.stages import finetune

SETTINGS = trainjob.NodeSettings(
    image="ghcr.io/sftpipe/sftpipe:0.1.0-cuda",
    resources={"nvidia.com/gpu": 2, "cpu": "8", "memory": "64G"},
    env=[
        {
            "name": "AWS_ACCESS_KEY_ID",
            "valueFrom": {"secretKeyRef": {"name": "sftpipe-s3", "key": "AWS_ACCESS_KEY_ID"}},
        }
    ],
    node_selector={"pool": "gpu"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    namespace="team",
    poll_s=1,
    timeout_s=300,
)


def _backend(fake: FakeKubernetes) -> KubernetesBackendConfig:
    configuration = client.Configuration()
    configuration.host = fake.url
    return KubernetesBackendConfig(namespace="team", client_configuration=configuration)


def test_spec_failure_and_resubmission():
    """The TrainJob as POSTed, checked against the Trainer API's model; a failed job is one
    line with the node's own error (deterministic: not a TransientError) and is deleted; a
    retried step submits it again."""
    fake = FakeKubernetes(lambda job: (False, "loading\nERROR [finetune] train: it broke (fix)\n"))
    config = TrainConfig(num_nodes=2, distributed_strategy="fsdp", max_steps=3)
    call = dict(
        config=config,
        base_model="s3://models/base",
        train_uri="minio://mlpipeline/v2/artifacts/run/tokenize/train",
        validation_uri="s3://mlpipeline/v2/artifacts/run/tokenize/validation",
        output_dir="/tmp/unused",
        checkpoint_uri="s3://ckpt/run-1",
        run_key="run-1",
        mlflow_run_id="abc",
        settings=SETTINGS,
        backend_config=_backend(fake),
    )
    try:
        with pytest.raises(SftpipeError) as failure:
            trainjob.train(**call)
        with pytest.raises(SftpipeError):
            trainjob.train(**call)  # the retry: delete the failed job, submit it again
    finally:
        fake.close()
    message = str(failure.value)
    assert "\n" not in message
    assert "train: it broke (fix)" in message and trainjob.job_name("run-1") in message
    assert not isinstance(failure.value, storage.TransientError)
    name = trainjob.job_name("run-1")
    assert fake.deleted == [name, name] and len(fake.created) == 2

    body = fake.created[0]
    job = models.TrainerV1alpha1TrainJob.from_dict(body)  # the Trainer API's own schema
    assert (body["apiVersion"], body["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert body["metadata"]["name"] == name
    assert job.spec.runtime_ref.name == "torch-distributed"
    assert job.spec.runtime_ref.kind == "ClusterTrainingRuntime"
    trainer = body["spec"]["trainer"]
    assert trainer["image"] == SETTINGS.image and trainer["numNodes"] == 2
    assert trainer["resourcesPerNode"]["limits"] == {
        "nvidia.com/gpu": "2",
        "cpu": "8",
        "memory": "64G",
    }
    assert trainer["command"] == ["torchrun"]
    args = trainer["args"]
    assert args[:2] == ["-m", "sftpipe.kfp_glue.finetune_launch"]
    assert "--train=s3://mlpipeline/v2/artifacts/run/tokenize/train" in args
    assert "--output=s3://ckpt/run-1/model" in args
    assert "--checkpoint-uri=s3://ckpt/run-1" in args and "--mlflow-run-id=abc" in args
    sent = TrainConfig.model_validate_json(
        next(a for a in args if a.startswith("--config=")).removeprefix("--config=")
    )
    assert sent == config
    (patch,) = body["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node" and pod["nodeSelector"] == {"pool": "gpu"}
    labels = node["template"]["spec"]["template"]["metadata"]["labels"]
    assert labels == {"sftpipe.io/mlflow-client": "true"}  # what MLflow's NetworkPolicy admits
    assert pod["tolerations"] == SETTINGS.tolerations
    assert pod["containers"] == [
        {
            "name": "node",
            "env": SETTINGS.env,
            "volumeMounts": [
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "home", "mountPath": "/home/sftpipe"},
            ],
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            },
        }
    ]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}, {"name": "home", "emptyDir": {}}]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # The SDK's own models accept the patch (camelCase Kubernetes JSON, as kubectl would).
    client.ApiClient()._ApiClient__deserialize(pod, "V1PodSpec")
    assert_rbac_allows(fake.requests)


RBAC = Path(__file__).parents[3] / "docker" / "k8s" / "kfp-env" / "trainjob-rbac.yaml"
VERBS = {"GET": "get", "POST": "create", "DELETE": "delete"}


def assert_rbac_allows(requests):
    """Every Kubernetes API call the step made is granted by docker/k8s's RBAC manifest."""
    rules = [
        (group, resource, verb)
        for doc in yaml.safe_load_all(RBAC.read_text())
        if doc["kind"] in ("Role", "ClusterRole")
        for rule in doc["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    ]
    for method, path in requests:
        parts = path.strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        names = parts[2:] if parts[0] == "api" else parts[3:]
        if names[0] == "namespaces":
            names = names[2:]
        resource = names[0] + (f"/{names[2]}" if len(names) > 2 else "")
        verb = "list" if method == "GET" and len(names) == 1 else VERBS[method]
        if resource == "configmaps":
            continue  # the SDK's optional Trainer version check, which tolerates a refusal
        assert (group, resource, verb) in rules, f"RBAC does not allow {method} {path}"


@pytest.mark.parametrize(
    "where", [dict(checkpoint_uri="/local/ckpt"), dict(train_uri="/gcs/bucket/train")]
)
def test_refuses_storage_the_nodes_cannot_reach(where):
    call = dict(train_uri="s3://b/train", validation_uri="s3://b/val", checkpoint_uri="s3://b/c")
    with pytest.raises(SftpipeError, match="share no disk"):
        trainjob.train(
            TrainConfig(num_nodes=2),
            "base",
            output_dir="/tmp/unused",
            run_key="r",
            settings=SETTINGS,
            **(call | where),
        )


def test_two_nodes_train_like_one_process(
    tiny_model_dir, tokenized, tmp_path, seaweedfs, s3_env, capsys
):
    """The job's command on 2 "nodes" (1 gloo process each) gives the weights of one process
    with the same global batch, and the step gets the model the job wrote to S3."""
    common = dict(max_steps=4, learning_rate=2e-3, precision="fp32", eval_every=2)
    common |= dict(micro_batch_size=4, early_stopping_patience=0)
    finetune.run(
        TrainConfig(gradient_accumulation_steps=2, **common),
        str(tiny_model_dir),
        *tokenized,
        tmp_path / "single",
    )
    s3 = seaweedfs.client()
    for path in tokenized:
        s3.upload_file(str(path), s3_env, f"data/{path.name}")

    def run_nodes(job):
        """What the Trainer's torch plugin does: PET_* variables for torchrun on each node."""
        import subprocess

        spec = job["spec"]["trainer"]
        command = [os.path.join(os.path.dirname(sys.executable), spec["command"][0])]
        nodes, port = spec["numNodes"], str(free_port())
        processes = [
            subprocess.Popen(
                command + spec["args"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=dict(
                    os.environ,
                    OMP_NUM_THREADS="1",
                    PET_NNODES=str(nodes),
                    PET_NODE_RANK=str(rank),
                    PET_NPROC_PER_NODE="1",
                    PET_MASTER_ADDR="127.0.0.1",
                    PET_MASTER_PORT=port,
                ),
            )
            for rank in range(nodes)
        ]
        logs = [process.communicate(timeout=240)[0] for process in processes]
        return all(p.returncode == 0 for p in processes), logs[0]

    fake = FakeKubernetes(run_nodes)
    try:
        report = trainjob.train(
            TrainConfig(num_nodes=2, **common),
            str(tiny_model_dir),
            f"s3://{s3_env}/data/{tokenized[0].name}",
            f"s3://{s3_env}/data/{tokenized[1].name}",
            tmp_path / "model",
            f"s3://{s3_env}/checkpoints/run-2",
            run_key="run-2",
            settings=SETTINGS,
            backend_config=_backend(fake),
        )
    finally:
        fake.close()
    out = capsys.readouterr().out
    assert "on 2xcpu" in out
    # node 0's log was followed while the job ran, and no line is printed twice
    assert fake.streams == 1 and out.count("[node-0] [finetune] 4 steps") == 1
    assert report.steps == 4
    one, two = (
        load_file(d / "model.safetensors") for d in (tmp_path / "single", tmp_path / "model")
    )
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)


def test_cluster_options_become_node_settings():
    """What `sftpipe compile` hands the finetune step for its TrainJob's nodes."""
    from sftpipe.pipelines.cluster import ClusterOptions, Toleration, trainjob_settings

    options = ClusterOptions(
        accelerator_count=4,
        node_selector={"pool": "a100"},
        tolerations=(Toleration("dedicated", "ml", "NoSchedule"),),
    )
    settings = trainjob.NodeSettings(**json.loads(trainjob_settings(options).to_json()))
    assert settings.image.endswith("-cuda")
    assert settings.resources == {"nvidia.com/gpu": 4, "cpu": "4", "memory": "16G"}
    assert settings.tolerations == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    ]
    by_name = {env["name"]: env["valueFrom"] for env in settings.env}
    assert by_name["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "sftpipe-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert by_name["MLFLOW_TRACKING_URI"]["configMapKeyRef"]["name"] == "sftpipe-env"
    assert by_name["AWS_ENDPOINT_URL"]["configMapKeyRef"]["optional"] is True
    assert all("value" not in env for env in settings.env)  # references only, no secrets


def _call(fake: FakeKubernetes, run_key: str) -> dict:
    return dict(
        config=TrainConfig(num_nodes=2, max_steps=3),
        base_model="s3://models/base",
        train_uri="s3://data/train",
        validation_uri="s3://data/validation",
        output_dir="/tmp/unused",
        checkpoint_uri=f"s3://ckpt/{run_key}",
        run_key=run_key,
        settings=SETTINGS,
        backend_config=_backend(fake),
    )


@pytest.mark.parametrize(
    ("log", "message"),
    [
        ("step 10\nKilled\n", "failed: see the log above"),
        (
            "ERROR [finetune] (transient) s3://b/x: cannot reach the object store\n",
            "failed: s3://b/x: cannot reach the object store",
        ),
    ],
    ids=["no-error-line", "transient-line"],
)
def test_a_lost_node_is_transient_and_its_job_deleted(log, message):
    """No error line from the node (killed, lost), or one the node marked transient: a
    TransientError, which KFP's retry of finetune may get past (sftpipe.kfp_glue.retries); the
    failed job is deleted either way."""
    fake = FakeKubernetes(lambda job: (False, log))
    try:
        with pytest.raises(storage.TransientError) as failed:
            trainjob.train(**_call(fake, "run-lost"))
    finally:
        fake.close()
    assert str(failed.value).startswith(f"TrainJob {trainjob.job_name('run-lost')}: {message} (")
    assert fake.deleted == [trainjob.job_name("run-lost")]


def test_a_cancelled_run_deletes_its_trainjob():
    """KFP cancels a run by sending SIGTERM to its pods: the step deletes the TrainJob it
    created (no node keeps training, holding GPUs) and ends with 143 (128 + SIGTERM)."""
    import signal
    import threading

    release = threading.Event()

    def cancelled_while_training(job):
        os.kill(os.getpid(), signal.SIGTERM)  # what the kubelet does to the step's pod
        release.wait(timeout=120)  # the job "trains" until the test ends
        return False, ""

    fake = FakeKubernetes(cancelled_while_training)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as ended:
            trainjob.train(**_call(fake, "run-cancel"))
    finally:
        release.set()
        fake.close()
    assert ended.value.code == 143
    assert fake.deleted == [trainjob.job_name("run-cancel")]
    assert ("DELETE", f"{trainjob_path('team', 'run-cancel')}") in fake.requests
    assert signal.getsignal(signal.SIGTERM) == before, "the handler is put back"


def trainjob_path(namespace: str, run_key: str) -> str:
    group = "/apis/trainer.kubeflow.org/v1alpha1"
    return f"{group}/namespaces/{namespace}/trainjobs/{trainjob.job_name(run_key)}"


def test_the_model_copy_refuses_keys_outside_its_folder(seaweedfs, s3_env, tmp_path, monkeypatch):
    """The job's exported model is copied from S3 into the step's output; a key that maps
    outside the download folder (path traversal) stops the copy in one line."""
    s3 = storage.s3_client()
    s3.put_object(Bucket=s3_env, Key="ckpt/run-3/model/config.json", Body=b"{}")
    real = storage.list_objects
    hostile = "ckpt/run-3/model/../../../../../escaped.txt"
    monkeypatch.setattr(storage, "list_objects", lambda uri: [*real(uri), hostile])
    output = tmp_path / "out" / "model"
    with pytest.raises(SftpipeError, match="maps outside the download folder") as refused:
        trainjob._fetch(f"s3://{s3_env}/ckpt/run-3/model", output)
    assert str(refused.value).startswith(f"s3://{s3_env}/{hostile}: ")
    assert not list(tmp_path.rglob("escaped.txt")) and not output.exists()
