from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output
from sftpipe.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def clean(
    data_uri: str,
    max_bad_fraction: float,
    dedupe: bool,
    mlflow_experiment: str,
    pipeline_run_id: str,
    cleaned: Output[Dataset],
    quarantine: Output[Dataset],
    metrics: Output[Metrics],
):
    """Normalize and validate raw chat JSONL; quarantine bad rows with a reason."""
    inputs = dict(locals())  # first: exactly the component's inputs
    from sftpipe.steps import run_step

    run_step("clean", **inputs)
