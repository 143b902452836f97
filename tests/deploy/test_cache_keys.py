"""KFP caches clean and tokenize; their cache key must follow the input DATA, not the data_uri
string (new data at the same URI would otherwise come stale from the cache).

The compiled YAML: an uncached "clean: data digest" task computes the input files' digest at
run time (storage.fingerprint) and hands it to clean (or, fanned out, to clean's plan) as an
input parameter, which KFP's cache key includes; tokenize's input is clean's output, so it
follows. The digest itself is tested in tests/library/test_storage.py.
"""

import pytest
import yaml
from kfp import compiler
from sftpipe.pipelines.cluster import ClusterOptions
from sftpipe.pipelines.sft_pipeline import build_pipeline

VARIANTS = {
    "local": None,
    "cluster": ClusterOptions(),
    "cluster-sharded": ClusterOptions(clean_shards=4),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def spec(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("yaml") / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(VARIANTS[request.param]), str(path))
    return next(yaml.safe_load_all(path.read_text()))


def test_the_digest_task_is_never_cached_and_keys_clean(spec):
    tasks = spec["root"]["dag"]["tasks"]
    digest = tasks["data-digest"]
    assert digest["cachingOptions"] == {}, "a cached digest would be as stale as the data_uri"
    assert set(digest["inputs"]["parameters"]) == {"data_uri", "file_format", "base_model"}
    consumer = "clean-plan" if "clean-plan" in tasks else "clean"
    source = tasks[consumer]["inputs"]["parameters"]["data_digest"]["taskOutputParameter"]
    assert source == {"producerTask": "data-digest", "outputParameterKey": "data_digest"}
    assert tasks[consumer]["cachingOptions"] == {"enableCache": True}
    if consumer == "clean-plan":  # the shards run in a ParallelFor sub-DAG: keyed on it too
        dags = [c["dag"] for c in spec["components"].values() if "dag" in c]
        (shard,) = [d["tasks"]["clean-shard"] for d in dags if "clean-shard" in d["tasks"]]
        assert shard["cachingOptions"] == {"enableCache": True}
        channel = shard["inputs"]["parameters"]["data_digest"]["componentInputParameter"]
        outer = [t for t in tasks.values() if "parameters" in t.get("inputs", {})]
        fed = [
            t["inputs"]["parameters"][channel]
            for t in outer
            if channel in t["inputs"]["parameters"]
        ]
        assert fed == [{"taskOutputParameter": source}]
    tokenize = tasks["tokenize"]
    assert tokenize["cachingOptions"] == {"enableCache": True}
    model = tokenize["inputs"]["parameters"]["model_digest"]["taskOutputParameter"]
    assert model == {"producerTask": "data-digest", "outputParameterKey": "model_digest"}
    produced_by = tokenize["inputs"]["artifacts"]["cleaned"]["taskOutputArtifact"]["producerTask"]
    assert produced_by in ("clean", "clean-merge")  # re-run when the digest changes


def test_new_data_at_the_same_uri_changes_the_digest_and_cleans_cache_key(tmp_path):
    """The digest component run by KFP's local runner, before and after the file at the same
    data_uri changes (and the base model's weights, which tokenize does not read), then after
    its tokenizer changes; then KFP's own cache-key function (kfp.local.cache, which keys like
    the backend: component, image, command, inputs) over clean's inputs with each data digest.
    Keyed on the URI alone, the two keys would be equal: stale data from the cache.

    (An end-to-end run of clean through the local runner's cache cannot show it: that cache
    never answers for a task with a Metrics output, whose file it expects on disk.)"""
    from kfp import local
    from kfp.local.cache import LocalCache
    from sftpipe.components.clean import clean, data_digest

    from sftpipe.config import PipelineConfig

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    data, model = tmp_path / "chats.jsonl", tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text('{"version": 1}')
    (model / "model.safetensors").write_bytes(b"weights")
    data.write_text('{"messages": []}\n')

    def digests() -> tuple[str, str]:
        task = data_digest(data_uri=str(data), file_format="auto", base_model=str(model))
        return task.outputs["data_digest"], task.outputs["model_digest"]

    first, model_first = digests()
    data.write_text('{"messages": []}\n{"messages": []}\n')  # new data, same URI
    (model / "model.safetensors").write_bytes(b"new weights")  # tokenize does not read them
    second, model_second = digests()
    assert len(first) == len(second) == 64 and first != second
    assert model_second == model_first
    (model / "tokenizer.json").write_text('{"version": 2}')  # a new tokenizer, same URI
    assert digests()[1] != model_first

    defaults = PipelineConfig().flat() | {"data_uri": str(data)}
    inputs = {k: defaults[k] for k in clean.component_spec.inputs if k in defaults}
    container = clean.pipeline_spec.deployment_spec["executors"]["exec-clean"]["container"]

    def key(digest: str) -> str:
        return LocalCache(str(tmp_path / "cache")).compute_key(
            component_name="clean",
            image=container["image"],
            full_command=[*container["command"], *container["args"]],
            arguments=inputs | {"data_digest": digest},
            env_vars={},
        )

    assert key(first) != key(second)
    assert key(first) == key(first)
