from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Metrics, Output
from sftpipe.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def data_digest(data_uri: str, file_format: str, base_model: str) -> NamedTuple(
    "Digests", [("data_digest", str), ("model_digest", str)]
):
    """Digests of the input files and of the base model's files but its weights (sizes and
    ETags / modification times): clean and tokenize take them as inputs, so KFP's cache keys
    them on the data and the tokenizer themselves, not on the `data_uri`/`base_model` strings."""
    inputs = dict(locals())  # first: exactly the component's inputs
    from sftpipe.kfp_glue.steps import run_step

    return run_step("data_digest", **inputs)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def clean(
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
    mlflow_experiment: str,
    cleaned: Output[Dataset],
    quarantine: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Read raw records (any supported format), normalize, scrub PII, filter, de-duplicate;
    quarantine bad rows with a reason; an HTML report."""
    inputs = dict(locals())  # first: exactly the component's inputs
    from sftpipe.kfp_glue.steps import run_step

    run_step("clean", **inputs)
