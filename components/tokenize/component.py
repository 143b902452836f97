from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output
from sftpipe.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def tokenize(
    cleaned: Input[Dataset],
    base_model: str,
    max_length: int,
    validation_fraction: float,
    chat_template: str,
    mlflow_experiment: str,
    pipeline_run_id: str,
    train: Output[Dataset],
    validation: Output[Dataset],
    quarantine: Output[Dataset],
    metrics: Output[Metrics],
):
    """Apply the chat template, label assistant tokens only, split train/validation by hash."""
    inputs = dict(locals())  # first: exactly the component's inputs
    from sftpipe.steps import run_step

    run_step("tokenize", **inputs)
