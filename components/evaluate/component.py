from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output
from sftpipe.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    validation: Input[Dataset],
    base_model: str,
    eval_batch_size: int,
    eval_prompts: int,
    num_samples: int,
    max_new_tokens: int,
    gate_metric: str,
    min_improvement: float,
    gate_guards: str,
    mlflow_experiment: str,
    pipeline_run_id: str,
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Base vs tuned on the validation set: loss/perplexity, greedy answers scored with
    ROUGE-L/chrF/BLEU, EOS rate and length; the quality gate's decision; an HTML report."""
    inputs = dict(locals())  # first: exactly the component's inputs
    from sftpipe.steps import run_step

    run_step("evaluate", **inputs)
