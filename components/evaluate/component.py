from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output
from sftpipe.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    validation: Input[Dataset],
    base_model: str,
    eval_batch_size: int,
    num_samples: int,
    max_new_tokens: int,
    mlflow_experiment: str,
    pipeline_run_id: str,
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Validation loss/perplexity and greedy sample answers, base vs tuned; an HTML report."""
    inputs = dict(locals())  # first: exactly the component's inputs
    from sftpipe.steps import run_step

    run_step("evaluate", **inputs)
