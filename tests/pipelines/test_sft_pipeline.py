"""The compiled pipeline YAML: five tasks wired by artifacts, parameters that are the config
fields with their defaults, and the cluster settings of each variant:

- gpu (`sftpipe compile`): finetune requests an NVIDIA GPU in the CUDA image, tolerates the
  GPU taint; every step gets its S3 and MLflow settings from a Secret and a ConfigMap by name
  (kfp-kubernetes), retries with back-off; caching on for clean/tokenize only. finetune branches
  on num_nodes: above 1 a "finetune: TrainJob" task, with no GPU and small requests, submits the
  Kubeflow Trainer job instead, and evaluate/register take the model of whichever branch ran;
- no-gpu (`sftpipe compile --no-gpu`, kind): the same without accelerator, finetune in the
  CPU image;
- local (`sftpipe run`): no platform settings and no retries (KFP's local runner would sleep
  through the back-off of a step that failed on bad data).
"""

import json
import re

import pytest
import yaml
from kfp import compiler
from sftpipe.pipelines.cluster import ClusterOptions, Toleration
from sftpipe.pipelines.sft_pipeline import build_pipeline

from sftpipe.config import FIELDS, PipelineConfig
from sftpipe.kfp_glue.trainjob import SETTINGS_ENV, NodeSettings
from sftpipe.tracking.runs import RUN_ID_ENV

STEPS = ("clean", "tokenize", "finetune", "evaluate", "register")
TRAINJOB = "finetune: TrainJob"  # finetune with num_nodes > 1 on a cluster (display name)
DIGEST = "clean: data digest"  # uncached; its output, the input data's digest, keys clean's cache
VARIANTS = {
    "gpu": ClusterOptions(),
    "no-gpu": ClusterOptions(gpu=False),
    "local": None,
}
# Leaked into the compiling process on purpose: none may end up in the YAML.
LEAKS = {
    "AWS_SECRET_ACCESS_KEY": "leaked-secret-key-0123",
    "AWS_ACCESS_KEY_ID": "leaked-access-key-0123",
    "MLFLOW_TRACKING_PASSWORD": "leaked-password-0123",
    "KFP_TOKEN": "leaked-token-0123",
}


def compile_yaml(tmp_path_factory, options):
    path = tmp_path_factory.mktemp("yaml") / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(options), str(path))
    return path.read_text()


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def compiled(request, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for name, value in LEAKS.items():
            mp.setenv(name, value)
        text = compile_yaml(tmp_path_factory, VARIANTS[request.param])
    documents = list(yaml.safe_load_all(text))
    platform = documents[1]["platforms"]["kubernetes"] if len(documents) > 1 else {}
    return request.param, documents[0], platform, text


def artifact_source(task, name):
    ref = task["inputs"]["artifacts"][name]["taskOutputArtifact"]
    return ref["producerTask"], ref["outputArtifactKey"]


def container_tasks(spec):
    """Display name -> (task name, task) of every task that runs a container, those inside
    condition branches included."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    found = {}
    for dag in dags:
        for name, task in dag["tasks"].items():
            if "executorLabel" in spec["components"][task["componentRef"]["name"]]:
                assert task["taskInfo"]["name"] not in found
                found[task["taskInfo"]["name"]] = (name, task)
    return found


def task_names(variant):
    """The display names of the tasks: the cluster variants add finetune's TrainJob branch."""
    names = (DIGEST, *STEPS)
    return names if variant == "local" else (*names, TRAINJOB)


def executor(spec, platform, display_name):
    """The container spec and the kfp-kubernetes settings of the task shown as `display_name`."""
    _, task = container_tasks(spec)[display_name]
    label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    container = spec["deploymentSpec"]["executors"][label]["container"]
    return container, platform.get("deploymentSpec", {}).get("executors", {}).get(label, {})


def test_five_tasks_wired_by_artifacts(compiled):
    variant, spec, _, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    steps = {name: task for name, (_, task) in container_tasks(spec).items()}
    assert set(steps) == set(task_names(variant))
    assert artifact_source(tasks["tokenize"], "cleaned") == ("clean", "cleaned")
    if variant == "local":
        assert set(tasks) == {*STEPS, "data-digest"}
        assert artifact_source(tasks["finetune"], "train") == ("tokenize", "train")
        assert artifact_source(tasks["finetune"], "validation") == ("tokenize", "validation")
        model = ("finetune", "model")
    else:  # finetune's tasks sit in condition branches, see test_finetune_branches_on_num_nodes
        (branches,) = set(tasks) - {*STEPS, "data-digest"}
        assert artifact_source(tasks[branches], "pipelinechannel--tokenize-train") == (
            "tokenize",
            "train",
        )
        model = (branches, f"pipelinechannel--{branches}-oneof-1")
    assert artifact_source(tasks["evaluate"], "model") == model
    assert artifact_source(tasks["evaluate"], "validation") == ("tokenize", "validation")
    assert artifact_source(tasks["register"], "model") == model
    assert artifact_source(tasks["register"], "evaluation") == ("evaluate", "metrics")
    outputs = spec["components"]
    for component, output, kind in (
        ("comp-clean", "quarantine", "system.Dataset"),
        ("comp-evaluate", "report", "system.HTML"),
        ("comp-finetune", "model", "system.Model"),
    ):
        definition = outputs[component]["outputDefinitions"]["artifacts"][output]
        assert definition["artifactType"]["schemaTitle"] == kind


def test_finetune_branches_on_num_nodes_on_a_cluster(compiled):
    """On a cluster finetune is a dsl.If/Else on the num_nodes parameter: one node trains in
    the finetune task, more in a TrainJob that the other task submits; evaluate and register
    take the model of whichever ran (dsl.OneOf). Locally there is one finetune task."""
    variant, spec, _, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    groups = [n for n, t in tasks.items() if "dag" in spec["components"][t["componentRef"]["name"]]]
    if variant == "local":
        assert groups == [] and tasks["finetune"]["taskInfo"]["name"] == "finetune"
        return
    (group,) = groups
    parameters = tasks[group]["inputs"]["parameters"]
    assert parameters["pipelinechannel--num_nodes"] == {"componentInputParameter": "num_nodes"}
    branches = spec["components"][tasks[group]["componentRef"]["name"]]["dag"]
    branch_of = {}  # condition -> (display name of its task, branch task, its model output)
    for name, branch in branches["tasks"].items():
        inner = spec["components"][branch["componentRef"]["name"]]["dag"]
        ((task_name, task),) = inner["tasks"].items()
        ((output, selector),) = inner["outputs"]["artifacts"].items()
        assert selector["artifactSelectors"] == [
            {"producerSubtask": task_name, "outputArtifactKey": "model"}
        ]
        branch_of[branch["triggerPolicy"]["condition"]] = (task["taskInfo"]["name"], name, output)
    one_node = "int(inputs.parameter_values['pipelinechannel--num_nodes']) <= 1"
    assert set(branch_of) == {one_node, f"!({one_node})"}
    single, several = branch_of[one_node], branch_of[f"!({one_node})"]
    assert (single[0], several[0]) == ("finetune", TRAINJOB)
    ((oneof, selectors),) = branches["outputs"]["artifacts"].items()
    assert selectors["artifactSelectors"] == [
        {"producerSubtask": single[1], "outputArtifactKey": single[2]},
        {"producerSubtask": several[1], "outputArtifactKey": several[2]},
    ]
    for step in ("evaluate", "register"):
        assert artifact_source(tasks[step], "model") == (group, oneof), step


def test_only_the_trainjob_task_gets_the_trainjob_settings(compiled):
    """The TrainJob task hands its nodes the GPU, image and tolerations it does not hold itself
    (SETTINGS_ENV); the single-node finetune never submits a TrainJob, so has none."""
    variant, spec, platform, _ = compiled
    settings = {}
    for name in task_names(variant):
        env = {e["name"]: e["value"] for e in executor(spec, platform, name)[0].get("env", [])}
        assert (SETTINGS_ENV in env) == (name == TRAINJOB), name
        settings |= env
    if variant == "local":
        return
    nodes = NodeSettings(**json.loads(settings[SETTINGS_ENV]))
    assert nodes.image.endswith("-cuda") == (variant == "gpu")
    assert nodes.resources == {"cpu": "4", "memory": "16G"} | (
        {"nvidia.com/gpu": 1} if variant == "gpu" else {}
    )
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert nodes.tolerations == ([gpu_toleration] if variant == "gpu" else [])
    assert {e["name"] for e in nodes.env} >= {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"}


def test_run_id_reaches_every_task_without_breaking_the_cache(compiled):
    """finetune, evaluate and register take the run id as an input; clean and tokenize must not
    (it would change their cache key every run): on a cluster every step gets it from its pod's
    run-id label instead."""
    variant, spec, platform, _ = compiled
    for name, (_, task) in container_tasks(spec).items():
        parameters = task["inputs"]["parameters"]
        if name in ("clean", "tokenize", DIGEST):
            assert "pipeline_run_id" not in parameters, name
        else:
            value = parameters["pipeline_run_id"]["runtimeValue"]["constant"]
            assert value == "{{$.pipeline_job_uuid}}", name
        if variant != "local":
            (env,) = executor(spec, platform, name)[1]["fieldPathAsEnv"]
            assert env == {"name": RUN_ID_ENV, "fieldPath": "metadata.labels['pipeline/runid']"}


def test_caching_on_for_clean_and_tokenize_only(compiled):
    variant, spec, _, _ = compiled
    tasks = container_tasks(spec)
    for step in task_names(variant):
        expected = {"enableCache": True} if step in ("clean", "tokenize") else {}
        assert tasks[step][1]["cachingOptions"] == expected, step


def test_retries_with_backoff_on_the_cluster_only(compiled):
    """finetune only (its single-node and TrainJob tasks): KFP retries any failed attempt, so
    the other steps, whose failures after their in-process I/O retries are deterministic, get
    none (sftpipe.kfp_glue.retries)."""
    variant, spec, _, _ = compiled
    tasks = container_tasks(spec)
    assert set(tasks) == set(task_names(variant))
    for step, (_, task) in tasks.items():
        if variant == "local" or step not in ("finetune", TRAINJOB):
            assert "retryPolicy" not in task, step
        else:
            assert task["retryPolicy"] == {
                "maxRetryCount": 2,
                "backoffDuration": "30s",
                "backoffFactor": 2.0,
                "backoffMaxDuration": "300s",
            }, step


def test_images_and_gpu_request(compiled):
    """Only the finetune task that trains in its own pod gets the CUDA image and the GPU; the
    TrainJob task of the cluster variants runs in the CPU image without one."""
    variant, spec, platform, _ = compiled
    assert len(spec["deploymentSpec"]["executors"]) == len(task_names(variant))
    for name in task_names(variant):
        container, kubernetes = executor(spec, platform, name)
        image = container["image"]
        assert image.startswith("ghcr.io/sftpipe/sftpipe:")
        assert image.endswith("-cuda") == (name == "finetune" and variant != "no-gpu"), name
        on_gpu = variant == "gpu" and name == "finetune"
        assert ("accelerator" in container.get("resources", {})) == on_gpu, name
        if name != "finetune":
            assert "tolerations" not in kubernetes, name
            assert "nodeSelector" not in kubernetes, name
    finetune = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"]
    tolerations = executor(spec, platform, "finetune")[1].get("tolerations")
    if variant == "gpu":
        accelerator = finetune["resources"]["accelerator"]
        assert (accelerator["resourceType"], accelerator["resourceCount"]) == (
            "nvidia.com/gpu",
            "1",
        )
        assert tolerations == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    else:
        assert tolerations is None


def test_resource_requests_on_the_cluster(compiled):
    variant, spec, platform, _ = compiled
    finetune = executor(spec, platform, "finetune")[0].get("resources", {})
    evaluate = executor(spec, platform, "evaluate")[0].get("resources", {})
    if variant == "local":
        assert "resourceCpuRequest" not in finetune and "resourceMemoryRequest" not in evaluate
    else:
        assert (finetune["resourceCpuRequest"], finetune["resourceMemoryRequest"]) == ("4", "16G")
        assert evaluate["resourceMemoryRequest"] == "8G"
        trainjob = executor(spec, platform, TRAINJOB)[0]["resources"]
        assert (trainjob["resourceCpuRequest"], trainjob["resourceMemoryRequest"]) == ("500m", "1G")


def test_settings_come_from_secret_and_config_map_references(compiled):
    variant, spec, platform, _ = compiled
    if variant == "local":
        assert platform == {}
        return
    for step in task_names(variant):
        kubernetes = executor(spec, platform, step)[1]
        secrets = {s["secretName"]: s for s in kubernetes["secretAsEnv"]}
        s3 = secrets["sftpipe-s3"]
        assert s3["optional"] is False
        assert {k["envVar"]: k["secretKey"] for k in s3["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        }
        mlflow = secrets["sftpipe-mlflow"]
        assert mlflow["optional"] is True
        assert {k["envVar"] for k in mlflow["keyToEnv"]} >= {"MLFLOW_TRACKING_PASSWORD"}
        maps = kubernetes["configMapAsEnv"]
        required = [m for m in maps if not m["optional"]]
        optional = [m for m in maps if m["optional"]]
        assert {m["configMapName"] for m in maps} == {"sftpipe-env"}
        assert [k["envVar"] for m in required for k in m["keyToEnv"]] == ["MLFLOW_TRACKING_URI"]
        assert {k["envVar"] for m in optional for k in m["keyToEnv"]} == {
            "AWS_ENDPOINT_URL",
            "MLFLOW_S3_ENDPOINT_URL",
            "AWS_DEFAULT_REGION",
        }


def test_no_secret_values_anywhere(compiled):
    _, spec, _, text = compiled
    for value in LEAKS.values():
        assert value not in text
    for name, executor in spec["deploymentSpec"]["executors"].items():
        for env in executor["container"].get("env", []):
            assert not re.search(r"SECRET|PASSWORD|TOKEN|KEY", env["name"]), (name, env)


def test_parameters_are_the_config_fields_with_defaults(compiled):
    _, spec, _, _ = compiled
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == set(FIELDS)
    defaults = PipelineConfig().flat()
    for name, parameter in parameters.items():
        assert parameter["defaultValue"] == defaults[name], name
        assert parameter["description"], name


def test_scheduling_options_reach_finetune(tmp_path_factory):
    options = ClusterOptions(
        accelerator_type="nvidia.com/mig-1g.10gb",
        accelerator_count=2,
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        tolerations=(Toleration("dedicated", "ml", "NoExecute"), Toleration.parse("gpu")),
        s3_secret="",
        image_pull_policy="IfNotPresent",
        retries=0,
        cpu_requests={"finetune": "8", "clean": "500m", "finetune-driver": "1"},
    )
    documents = list(yaml.safe_load_all(compile_yaml(tmp_path_factory, options)))
    spec, platform = documents[0], documents[1]["platforms"]["kubernetes"]
    finetune = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"]["resources"]
    assert finetune["accelerator"]["resourceType"] == "nvidia.com/mig-1g.10gb"
    assert finetune["accelerator"]["resourceCount"] == "2"
    assert finetune["resourceCpuRequest"] == "8"
    clean = spec["deploymentSpec"]["executors"]["exec-clean"]["container"]["resources"]
    assert clean["resourceCpuRequest"] == "500m"
    executor_settings = executor(spec, platform, "finetune")[1]
    assert executor_settings["nodeSelector"] == {
        "labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    }
    tolerations = [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"},
        {"key": "gpu", "operator": "Exists"},
    ]
    assert executor_settings["tolerations"] == tolerations
    # The TrainJob task is scheduled anywhere, without a GPU; its nodes get what finetune gets.
    container, kubernetes = executor(spec, platform, TRAINJOB)
    assert "accelerator" not in container["resources"]
    assert container["resources"]["resourceCpuRequest"] == "1"
    assert "nodeSelector" not in kubernetes and "tolerations" not in kubernetes
    (settings,) = [e["value"] for e in container["env"] if e["name"] == SETTINGS_ENV]
    nodes = NodeSettings(**json.loads(settings))
    assert nodes.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert nodes.tolerations == tolerations
    assert nodes.resources == {"nvidia.com/mig-1g.10gb": 2, "cpu": "8", "memory": "16G"}
    tasks = container_tasks(spec)
    for step in task_names("gpu"):
        kubernetes = executor(spec, platform, step)[1]
        assert kubernetes["imagePullPolicy"] == "IfNotPresent", step
        names = {s["secretName"] for s in kubernetes["secretAsEnv"]}
        assert names == {"sftpipe-mlflow"}, step  # no S3 secret asked for
        assert "retryPolicy" not in tasks[step][1], step
    assert "leaked" not in json.dumps(documents)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accelerator_count": 0}, "accelerator_count"),
        ({"retries": -1}, "retries"),
        ({"image_pull_policy": "Sometimes"}, "image_pull_policy"),
        ({"memory_requests": {"train": "1G"}}, "unknown step"),
        ({"cpu_requests": {"driver": "1"}}, "unknown step"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClusterOptions(**kwargs)
    with pytest.raises(ValueError, match="KEY"):
        Toleration.parse("key:Sometimes")


def test_clean_fans_out_over_shards_on_request(tmp_path_factory):
    """--clean-shards N: a plan task, a ParallelFor of clean_shard tasks (at most N at once),
    and a merge task whose outputs feed tokenize and register as clean's would."""
    text = compile_yaml(tmp_path_factory, ClusterOptions(gpu=False, clean_shards=3))
    spec, platform = list(yaml.safe_load_all(text))
    tasks = spec["root"]["dag"]["tasks"]
    assert {"clean-plan", "for-loop-1", "clean-merge"} <= set(tasks) and "clean" not in tasks
    loop = tasks["for-loop-1"]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("shards")
    inner = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert set(inner) == {"clean-shard"}
    merge = tasks["clean-merge"]
    assert merge["taskInfo"]["name"] == "clean" and merge["cachingOptions"] == {"enableCache": True}
    assert (
        merge["inputs"]["artifacts"]["parts"]["taskOutputArtifact"]["producerTask"] == "for-loop-1"
    )
    assert artifact_source(tasks["tokenize"], "cleaned") == ("clean-merge", "cleaned")
    assert artifact_source(tasks["register"], "cleaned") == ("clean-merge", "cleaned")
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in ("exec-clean-plan", "exec-clean-shard", "exec-clean-merge"):
        assert executors[step]["secretAsEnv"], step
