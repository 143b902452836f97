"""clean over input shards, for large inputs on a cluster: plan -> clean_shard (one per group
of files, in a dsl.ParallelFor) -> clean_merge (global de-duplication). The merged outputs are
the same files `clean` writes for the same input."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output
from sftpipe.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def clean_plan(
    data_uri: str,
    data_digest: str,
    file_format: str,
    record_format: str,
    columns: str,
    max_bad_fraction: float,
    dedupe: bool,
    near_duplicate_threshold: float,
    scrub_pii: str,
    strip_html: bool,
    min_chars: int,
    max_chars: int,
    max_turn_chars: int,
    max_turns: int,
    languages: str,
    label_map: str,
    translation_instruction: str,
    translation_languages: str,
    num_workers: int,
    num_shards: int,
) -> NamedTuple("Plan", [("shards", list[str]), ("data_config", str)]):
    """Group the input files into at most `num_shards` shards; pass on the validated config."""
    inputs = dict(locals())  # first: exactly the component's inputs
    from sftpipe.kfp_glue.steps import run_step

    return run_step("clean_plan", **inputs)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def clean_shard(shard: str, data_config: str, data_digest: str, part: Output[Dataset]):
    """Clean one shard: normalized rows, dedupe keys and signatures, its quarantine. The input
    data's digest keys its cache: new data in the same files is cleaned again."""
    inputs = dict(locals())  # first: exactly the component's inputs
    from sftpipe.kfp_glue.steps import run_step

    run_step("clean_shard", **inputs)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def clean_merge(
    data_config: str,
    mlflow_experiment: str,
    parts: Input[list[Dataset]],
    cleaned: Output[Dataset],
    quarantine: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """De-duplicate across shards and publish the cleaned data, quarantine and report."""
    inputs = dict(locals())  # first: exactly the component's inputs
    from sftpipe.kfp_glue.steps import run_step

    run_step("clean_merge", **inputs)
