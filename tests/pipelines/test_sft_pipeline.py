"""The compiled pipeline YAML: five tasks, artifacts wired stage to stage, the GPU request on
finetune, and parameters that are the config fields with their defaults."""

import pytest
import yaml
from kfp import compiler
from sftpipe.pipelines.sft_pipeline import build_pipeline

from sftpipe.config import FIELDS, PipelineConfig


@pytest.fixture(scope="module", params=[True, False], ids=["gpu", "no-gpu"])
def compiled(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("yaml") / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(gpu=request.param), str(path))
    documents = list(yaml.safe_load_all(path.read_text()))
    return request.param, documents[0], documents[1] if len(documents) > 1 else {}


def artifact_source(task, name):
    ref = task["inputs"]["artifacts"][name]["taskOutputArtifact"]
    return ref["producerTask"], ref["outputArtifactKey"]


def test_five_tasks_wired_by_artifacts(compiled):
    _, spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"clean", "tokenize", "finetune", "evaluate", "register"}
    assert artifact_source(tasks["tokenize"], "cleaned") == ("clean", "cleaned")
    assert artifact_source(tasks["finetune"], "train") == ("tokenize", "train")
    assert artifact_source(tasks["finetune"], "validation") == ("tokenize", "validation")
    assert artifact_source(tasks["evaluate"], "model") == ("finetune", "model")
    assert artifact_source(tasks["evaluate"], "validation") == ("tokenize", "validation")
    assert artifact_source(tasks["register"], "model") == ("finetune", "model")
    assert artifact_source(tasks["register"], "evaluation") == ("evaluate", "metrics")
    assert tasks["register"]["cachingOptions"] == {}  # caching off: registering is a side effect
    assert tasks["register"]["retryPolicy"]["maxRetryCount"] == 2
    outputs = spec["components"]
    assert (
        outputs["comp-clean"]["outputDefinitions"]["artifacts"]["quarantine"]["artifactType"][
            "schemaTitle"
        ]
        == "system.Dataset"
    )
    assert (
        outputs["comp-evaluate"]["outputDefinitions"]["artifacts"]["report"]["artifactType"][
            "schemaTitle"
        ]
        == "system.HTML"
    )
    assert (
        outputs["comp-finetune"]["outputDefinitions"]["artifacts"]["model"]["artifactType"][
            "schemaTitle"
        ]
        == "system.Model"
    )


def test_every_task_gets_the_pipeline_run_id(compiled):
    _, spec, _ = compiled
    for name, task in spec["root"]["dag"]["tasks"].items():
        value = task["inputs"]["parameters"]["pipeline_run_id"]["runtimeValue"]["constant"]
        assert value == "{{$.pipeline_job_uuid}}", name


def test_gpu_request_only_on_finetune(compiled):
    gpu, spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    resources = executors["exec-finetune"]["container"]["resources"]
    assert resources["cpuRequest"] == 4 and resources["memoryRequest"] == 16
    if gpu:
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["accelerator"]["resourceCount"] == "1"
    else:
        assert "accelerator" not in resources
    for name, executor in executors.items():
        if name != "exec-finetune":
            assert "accelerator" not in executor["container"].get("resources", {})
        image = executor["container"]["image"]
        assert image.startswith("ghcr.io/sftpipe/sftpipe:")
        assert image.endswith("-cuda") == (name == "exec-finetune")


def test_parameters_are_the_config_fields_with_defaults(compiled):
    _, spec, _ = compiled
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == set(FIELDS)
    defaults = PipelineConfig().flat()
    for name, parameter in parameters.items():
        assert parameter["defaultValue"] == defaults[name], name
        assert parameter["description"], name
