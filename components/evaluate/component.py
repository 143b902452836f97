from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output
from sftpipe.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    train: Input[Dataset],
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
    classification: Output[ClassificationMetrics],
    report: Output[HTML],
):
    """Base vs tuned on the validation set, then the quality gate's decision and an HTML report.
    Chat: loss/perplexity, greedy answers scored with ROUGE-L/chrF/BLEU, EOS rate and length.
    Classification: accuracy, macro and per-class P/R/F1, confusion matrices (the tuned one in
    `classification`), next to a TF-IDF + logistic-regression baseline trained on `train`."""
    inputs = dict(locals())  # first: exactly the component's inputs
    from sftpipe.kfp_glue.steps import run_step

    run_step("evaluate", **inputs)
