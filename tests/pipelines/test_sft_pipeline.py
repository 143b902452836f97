"""The compiled pipeline YAML: five tasks wired by artifacts, parameters that are the config
fields with their defaults, and the cluster settings of each variant:

- gpu (`sftpipe compile`): finetune requests an NVIDIA GPU in the CUDA image, tolerates the
  GPU taint; every step gets its S3 and MLflow settings from a Secret and a ConfigMap by name
  (kfp-kubernetes), retries with back-off; caching on for clean/tokenize only;
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
from sftpipe.tracking import RUN_ID_ENV

STEPS = ("clean", "tokenize", "finetune", "evaluate", "register")
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


def executor_platform(platform, step):
    return platform.get("deploymentSpec", {}).get("executors", {}).get(f"exec-{step}", {})


def test_five_tasks_wired_by_artifacts(compiled):
    _, spec, _, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == set(STEPS)
    assert artifact_source(tasks["tokenize"], "cleaned") == ("clean", "cleaned")
    assert artifact_source(tasks["finetune"], "train") == ("tokenize", "train")
    assert artifact_source(tasks["finetune"], "validation") == ("tokenize", "validation")
    assert artifact_source(tasks["evaluate"], "model") == ("finetune", "model")
    assert artifact_source(tasks["evaluate"], "validation") == ("tokenize", "validation")
    assert artifact_source(tasks["register"], "model") == ("finetune", "model")
    assert artifact_source(tasks["register"], "evaluation") == ("evaluate", "metrics")
    outputs = spec["components"]
    for component, output, kind in (
        ("comp-clean", "quarantine", "system.Dataset"),
        ("comp-evaluate", "report", "system.HTML"),
        ("comp-finetune", "model", "system.Model"),
    ):
        definition = outputs[component]["outputDefinitions"]["artifacts"][output]
        assert definition["artifactType"]["schemaTitle"] == kind


def test_run_id_reaches_every_task_without_breaking_the_cache(compiled):
    """finetune, evaluate and register take the run id as an input; clean and tokenize must not
    (it would change their cache key every run): on a cluster every step gets it from its pod's
    run-id label instead."""
    variant, spec, platform, _ = compiled
    for name, task in spec["root"]["dag"]["tasks"].items():
        parameters = task["inputs"]["parameters"]
        if name in ("clean", "tokenize"):
            assert "pipeline_run_id" not in parameters, name
        else:
            value = parameters["pipeline_run_id"]["runtimeValue"]["constant"]
            assert value == "{{$.pipeline_job_uuid}}", name
        if variant != "local":
            (env,) = executor_platform(platform, name)["fieldPathAsEnv"]
            assert env == {"name": RUN_ID_ENV, "fieldPath": "metadata.labels['pipeline/runid']"}


def test_caching_on_for_clean_and_tokenize_only(compiled):
    _, spec, _, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    for step in STEPS:
        expected = {"enableCache": True} if step in ("clean", "tokenize") else {}
        assert tasks[step]["cachingOptions"] == expected, step


def test_retries_with_backoff_on_the_cluster_only(compiled):
    variant, spec, _, _ = compiled
    for step, task in spec["root"]["dag"]["tasks"].items():
        if variant == "local":
            assert "retryPolicy" not in task, step
        else:
            assert task["retryPolicy"] == {
                "maxRetryCount": 2,
                "backoffDuration": "30s",
                "backoffFactor": 2.0,
                "backoffMaxDuration": "300s",
            }, step


def test_images_and_gpu_request(compiled):
    variant, spec, platform, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        container = executor["container"]
        image = container["image"]
        assert image.startswith("ghcr.io/sftpipe/sftpipe:")
        on_gpu = variant == "gpu" and name == "exec-finetune"
        assert image.endswith("-cuda") == (name == "exec-finetune" and variant != "no-gpu")
        assert ("accelerator" in container.get("resources", {})) == on_gpu, name
    finetune = executors["exec-finetune"]["container"]
    tolerations = executor_platform(platform, "finetune").get("tolerations")
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
    for step in STEPS:
        if step != "finetune":
            assert "tolerations" not in executor_platform(platform, step)
            assert "nodeSelector" not in executor_platform(platform, step)


def test_resource_requests_on_the_cluster(compiled):
    variant, spec, _, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    finetune = executors["exec-finetune"]["container"].get("resources", {})
    evaluate = executors["exec-evaluate"]["container"].get("resources", {})
    if variant == "local":
        assert "resourceCpuRequest" not in finetune and "resourceMemoryRequest" not in evaluate
    else:
        assert (finetune["resourceCpuRequest"], finetune["resourceMemoryRequest"]) == ("4", "16G")
        assert evaluate["resourceMemoryRequest"] == "8G"


def test_settings_come_from_secret_and_config_map_references(compiled):
    variant, _, platform, _ = compiled
    if variant == "local":
        assert platform == {}
        return
    for step in STEPS:
        executor = executor_platform(platform, step)
        secrets = {s["secretName"]: s for s in executor["secretAsEnv"]}
        s3 = secrets["sftpipe-s3"]
        assert s3["optional"] is False
        assert {k["envVar"]: k["secretKey"] for k in s3["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        }
        mlflow = secrets["sftpipe-mlflow"]
        assert mlflow["optional"] is True
        assert {k["envVar"] for k in mlflow["keyToEnv"]} >= {"MLFLOW_TRACKING_PASSWORD"}
        maps = executor["configMapAsEnv"]
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
        cpu_requests={"finetune": "8", "clean": "500m"},
    )
    documents = list(yaml.safe_load_all(compile_yaml(tmp_path_factory, options)))
    spec, platform = documents[0], documents[1]["platforms"]["kubernetes"]
    finetune = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"]["resources"]
    assert finetune["accelerator"]["resourceType"] == "nvidia.com/mig-1g.10gb"
    assert finetune["accelerator"]["resourceCount"] == "2"
    assert finetune["resourceCpuRequest"] == "8"
    clean = spec["deploymentSpec"]["executors"]["exec-clean"]["container"]["resources"]
    assert clean["resourceCpuRequest"] == "500m"
    executor = executor_platform(platform, "finetune")
    assert executor["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}
    assert executor["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"},
        {"key": "gpu", "operator": "Exists"},
    ]
    for step in STEPS:
        assert executor_platform(platform, step)["imagePullPolicy"] == "IfNotPresent"
        names = {s["secretName"] for s in executor_platform(platform, step)["secretAsEnv"]}
        assert names == {"sftpipe-mlflow"}  # no S3 secret asked for
        assert "retryPolicy" not in spec["root"]["dag"]["tasks"][step]
    assert "leaked" not in json.dumps(documents)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accelerator_count": 0}, "accelerator_count"),
        ({"retries": -1}, "retries"),
        ({"image_pull_policy": "Sometimes"}, "image_pull_policy"),
        ({"memory_requests": {"train": "1G"}}, "unknown step"),
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
