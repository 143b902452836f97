"""Loading base and tuned models and their tokenizers, with checks that fail in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftpipe import storage
from sftpipe.errors import SftpipeError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# What finetune saves beside the weights of a tuned model: its loss history and summary.
TRAINING_LOG = "sftpipe_training.json"


def fetch(uri: str, weights: bool = True) -> Path:
    """The model folder at `uri` (local or s3://) as a local path; weights skipped on request."""
    if not uri:
        raise SftpipeError(
            "base_model", "no base model given", "pass --base-model DIR or s3://bucket/prefix"
        )
    return storage.local_dir(uri, skip_suffixes=() if weights else WEIGHT_SUFFIXES)


def load_tokenizer(
    model_dir: Path, uri: str = "", chat_template: str = "", chat: bool = True
) -> Any:
    """The model's fast tokenizer with a pad token, and with a chat template unless `chat` is
    False (classification)."""
    from transformers import AutoTokenizer

    where = uri or str(model_dir)
    if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
        raise SftpipeError(
            where,
            "no tokenizer files (tokenizer.json or vocab) in the model folder",
            "save the tokenizer next to the weights with save_pretrained",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        raise SftpipeError(
            where,
            f"cannot load the tokenizer ({type(exc).__name__}: {exc})",
            "check the tokenizer files",
        ) from None
    if not tokenizer.is_fast:
        raise SftpipeError(
            where,
            "the tokenizer has no fast (Rust) version",
            "provide tokenizer.json; offsets are needed for label masks",
        )
    if chat_template:
        tokenizer.chat_template = chat_template
    if chat and not tokenizer.chat_template:
        raise SftpipeError(
            where,
            "the tokenizer has no chat template",
            "pass --chat-template with a Jinja template",
        )
    if tokenizer.pad_token is None:
        # Padding positions are masked by the attention mask and labels, never by token id, so
        # any token works as pad; EOS is the conventional choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_classifier(model_dir: Path) -> bool:
    """Whether a model folder holds a sequence classifier (its config names such a head)."""
    import json

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def load_causal_lm(model_dir: Path, uri: str = "", quantize_4bit: bool = False) -> Any:
    """The model in fp32 (autocast handles lower precision), with its weights checked; or, for
    QLoRA, NF4-quantized on the GPU and prepared for adapter training."""
    from transformers import AutoModelForCausalLM

    where = uri or str(model_dir)
    if not (model_dir / "config.json").exists():
        raise SftpipeError(
            where, "no config.json in the model folder", "point at a save_pretrained directory"
        )
    if not any(p.suffix in (".safetensors", ".bin") for p in model_dir.iterdir()):
        raise SftpipeError(
            where,
            "no weights (*.safetensors or *.bin) in the model folder",
            "save the model with save_pretrained",
        )
    try:
        if quantize_4bit:
            from peft import prepare_model_for_kbit_training
            from transformers import BitsAndBytesConfig

            quantization = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype="bfloat16",
            )
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, quantization_config=quantization, device_map={"": 0}
            )
            return prepare_model_for_kbit_training(model)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    except Exception as exc:  # corrupt or mismatched weights surface as many exception types
        raise SftpipeError(
            where,
            f"cannot load the model ({type(exc).__name__}: {exc})",
            "check that the weights match config.json",
        ) from None
    return model
