from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model
from sftpipe.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(
    model: Input[Model],
    cleaned: Input[Dataset],
    train: Input[Dataset],
    validation: Input[Dataset],
    evaluation: Input[Metrics],
    model_name: str,
    gate_metric: str,
    min_improvement: float,
    gate_guards: str,
    eval_batch_size: int,
    eval_prompts: int,
    max_new_tokens: int,
    mlflow_experiment: str,
    pipeline_run_id: str,
) -> str:
    """Enforce the quality gate, log the model to MLflow as a chat model and register it
    (alias `challenger`; `champion` when it beats the champion re-scored on `validation`).
    Returns models:/NAME/VERSION, or "" when the gate refused it."""
    inputs = dict(locals())  # first: exactly the component's inputs
    from sftpipe.kfp_glue.steps import run_step

    return run_step("register", **inputs)
