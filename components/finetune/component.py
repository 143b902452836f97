from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output
from sftpipe.components.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def finetune(
    train: Input[Dataset],
    validation: Input[Dataset],
    base_model: str,
    learning_rate: float,
    embedding_learning_rate: float,
    num_epochs: float,
    max_steps: int,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    warmup_ratio: float,
    lr_schedule: str,
    weight_decay: float,
    max_grad_norm: float,
    seed: int,
    eval_every: int,
    early_stopping_patience: int,
    export_best: bool,
    precision: str,
    log_every: int,
    method: str,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    lora_target_modules: str,
    use_dora: bool,
    class_weights: bool,
    gradient_checkpointing: bool,
    gradient_checkpointing_every: int,
    lean_layers: bool,
    compile: bool,
    checkpoint_uri: str,
    checkpoint_every: int,
    keep_checkpoints: int,
    distributed_strategy: str,
    nproc_per_node: int,
    num_nodes: int,
    mlflow_experiment: str,
    pipeline_run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Full fine-tune on the assistant tokens; exports the best checkpoint with its tokenizer."""
    inputs = dict(locals())  # first: exactly the component's inputs
    from sftpipe.kfp_glue.steps import run_step

    run_step("finetune", **inputs)
