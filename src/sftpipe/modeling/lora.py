"""LoRA / DoRA adapters (peft) for the finetune stage, and exporting them.

A LoRA run exports what every later stage can load as a plain model: the adapter merged into
the base weights, plus the adapter alone under `adapter/` for users who serve adapters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sftpipe.config import TrainConfig
from sftpipe.errors import SftpipeError

ADAPTER_DIR = "adapter"


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """Short names of the linear layers (q_proj, down_proj, ...), the output head excluded."""
    head = model.get_output_embeddings()
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }


def target_modules(config: TrainConfig, model: torch.nn.Module) -> list[str] | str:
    available = linear_module_names(model)
    if config.lora_target_modules.strip() == "all-linear":
        return "all-linear"
    wanted = [name.strip() for name in config.lora_target_modules.split(",") if name.strip()]
    missing = [name for name in wanted if name not in available]
    if not wanted or missing:
        raise SftpipeError(
            "lora_target_modules",
            f"{missing or wanted} not among the model's linear layers {sorted(available)}",
            "name existing modules, comma-separated, or use all-linear",
        )
    return wanted


def check_method(config: TrainConfig, device: torch.device) -> None:
    if config.method != "qlora":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        available = False
    else:
        available = device.type == "cuda"
    if not available:
        raise SftpipeError(
            "method",
            "qlora needs a CUDA GPU with bitsandbytes installed",
            "use --method lora here, or run finetune on a GPU node with bitsandbytes",
        )


def apply(
    model: Any, config: TrainConfig, task_type: str = "CAUSAL_LM", train_embeddings: bool = False
) -> Any:
    """Wrap `model` with trainable adapters; only adapter weights (and, for SEQ_CLS, the new
    classification head; with `train_embeddings`, the input embeddings) keep requires_grad."""
    from peft import LoraConfig, get_peft_model

    saved = None
    if train_embeddings:  # peft finds modules_to_save by the last part of their names
        embeddings = model.get_input_embeddings()
        saved = [next(n for n, m in model.named_modules() if m is embeddings).rsplit(".", 1)[-1]]
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules(config, model),
        use_dora=config.use_dora,
        task_type=task_type,
        modules_to_save=saved,
    )
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"[finetune] {'DoRA' if config.use_dora else 'LoRA'} r={config.lora_rank}: "
        f"{trainable:,} of {total:,} parameters trainable",
        flush=True,
    )
    return model


def is_adapted(model: Any) -> bool:
    return hasattr(model, "merge_and_unload")


def save(model: Any, tokenizer: Any, folder: Path) -> None:
    """save_pretrained `model` into `folder`; an adapted model goes merged, with its adapter in
    `folder/adapter`."""
    if is_adapted(model):
        model.save_pretrained(folder / ADAPTER_DIR)
        tokenizer.save_pretrained(folder / ADAPTER_DIR)
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
