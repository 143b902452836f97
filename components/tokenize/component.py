from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output
from sftpipe.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def tokenize(
    cleaned: Input[Dataset],
    base_model: str,
    model_digest: str,
    max_length: int,
    truncation: str,
    validation_fraction: float,
    chat_template: str,
    packing: bool,
    extend_vocabulary: int,
    label_map: str,
    num_workers: int,
    mlflow_experiment: str,
    train: Output[Dataset],
    validation: Output[Dataset],
    quarantine: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Apply the chat template, label assistant tokens only, pack, split train/validation by
    hash (classification: label ids, stratified split); an HTML report."""
    inputs = dict(locals())  # first: exactly the component's inputs
    from sftpipe.kfp_glue.steps import run_step

    run_step("tokenize", **inputs)
