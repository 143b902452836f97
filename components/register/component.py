from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model
from sftpipe.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(
    model: Input[Model],
    cleaned: Input[Dataset],
    train: Input[Dataset],
    evaluation: Input[Metrics],
    model_name: str,
    min_improvement: float,
    max_new_tokens: int,
    mlflow_experiment: str,
    pipeline_run_id: str,
) -> str:
    """Log the model to MLflow and register it (alias `challenger`) when it beats the base.
    Returns the model URI, or "" when the gate refused it."""
    inputs = dict(locals())  # first: exactly the component's inputs
    from sftpipe.steps import run_step

    return run_step("register", **inputs)
