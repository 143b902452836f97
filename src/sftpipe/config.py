"""The one typed configuration of sftpipe.

Every knob lives here once, with its default, its bounds and its help text. Everything else
derives from it:

- the CLI flags (`sftpipe run --learning-rate 1e-4`, help text = the field description),
- the pipeline parameters (`sftpipe.pipelines.sft_pipeline` builds its signature from the flat
  field list, defaults included),
- the KFP components, which declare the fields their stage needs (no defaults of their own) and
  rebuild the stage's section model from them, so validation happens in the stage, not in YAML.

Field names are unique across sections, so the pipeline's parameters form one flat namespace.
"""

from __future__ import annotations

import hashlib
import json
import typing
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sftpipe.errors import SftpipeError
from sftpipe.evaluation import gate, metrics

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Method = Literal["full", "lora", "qlora"]
Schedule = Literal["cosine", "linear"]
FileFormat = Literal["auto", "jsonl", "json", "csv", "tsv", "parquet"]
RecordFormat = Literal[
    "auto", "messages", "sharegpt", "alpaca", "prompt_completion", "classification", "translation"
]
Truncation = Literal["truncate", "drop"]
Strategy = Literal["ddp", "fsdp"]


class Section(BaseModel):
    """A group of fields that one stage (or several) consumes."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], where: str = "config") -> typing.Self:
        """Validate `values` (extra keys ignored) into this section, with a one-line error."""
        picked = {name: values[name] for name in cls.model_fields if name in values}
        try:
            return cls.model_validate(picked)
        except ValidationError as exc:
            raise SftpipeError(where, _one_line(exc), "see `sftpipe run --help`") from None


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"{field}={err.get('input')!r}: {err['msg']}")
    return "; ".join(parts)


class DataConfig(Section):
    """clean: read raw records, normalize, scrub PII, validate, filter, de-duplicate,
    quarantine."""

    data_uri: str = Field(
        "",
        description="Training data: a file, a directory or glob of shards, or an s3:// object "
        "or prefix; JSONL, JSON array, CSV/TSV or Parquet, optionally .gz (see Data format); "
        "or a Hugging Face dataset: a save_to_disk folder, or hf://NAME[/CONFIG][:SPLIT] "
        "(streamed). "
        "Empty in `sftpipe run` means the bundled chatterbot-corpus demo.",
    )
    file_format: FileFormat = Field(
        "auto", description="File format; auto: from the file name, else from the content."
    )
    record_format: RecordFormat = Field(
        "auto",
        description="Record format; auto: detected per record from its columns (messages, "
        "conversations, instruction/output, prompt/completion, text/label, source/target).",
    )
    columns: str = Field(
        "",
        description="Column mapping for data whose columns have other names: RECORD_COLUMN="
        "DATA_COLUMN pairs, comma-separated (e.g. messages=dialog,label=sentiment); files and "
        "datasets alike.",
    )
    max_bad_fraction: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Fail the clean step when more than this fraction of rows is broken "
        "(filters and duplicates not counted).",
    )
    dedupe: bool = Field(
        True,
        description="Drop exact and near duplicates (kept with dedupe off, but always on the "
        "same side of the train/validation split).",
    )
    near_duplicate_threshold: float = Field(
        0.85,
        ge=0.0,
        le=1.0,
        description="Estimated Jaccard similarity (character 5-grams, MinHash LSH) from which "
        "two rows are near duplicates (0: exact duplicates only).",
    )
    scrub_pii: str = Field(
        "all",
        description="PII replaced by typed placeholders: all, none, or a comma-separated subset "
        "of email, id_number, credit_card, phone, ip.",
    )
    strip_html: bool = Field(
        True, description="Remove HTML tags and unescape entities (outside Markdown code)."
    )
    min_chars: int = Field(
        1, ge=0, description="Quarantine conversations with fewer characters in all turns."
    )
    max_chars: int = Field(
        200_000, ge=1, description="Quarantine conversations with more characters in all turns."
    )
    max_turn_chars: int = Field(
        50_000, ge=1, description="Quarantine conversations with a longer single turn."
    )
    max_turns: int = Field(
        128,
        ge=2,
        description="Quarantine conversations with more turns (system prompt not counted).",
    )
    languages: str = Field(
        "",
        description="Keep only these detected languages, comma-separated (zh, ja, ko, en, "
        "latin, cyrillic, arabic, other); empty: keep all.",
    )
    label_map: str = Field(
        "",
        description="Classification labels: names in id order (neg,pos) or a JSON object "
        "name->id; rows with other labels are quarantined. Empty: the sorted names found.",
    )
    translation_instruction: str = Field(
        "Translate the following text from {source_lang} to {target_lang}.",
        description="User instruction of translation rows, before the source text; "
        "{source_lang} and {target_lang} are replaced by the language names.",
    )
    translation_languages: str = Field(
        "",
        description="Default language pair as source,target codes (e.g. en,zh) for "
        "translation rows without source_lang/target_lang.",
    )
    num_workers: int = Field(
        0,
        ge=0,
        le=256,
        description="Worker processes of clean (and tokenizer threads of tokenize); 0: one per "
        "CPU core.",
    )

    @field_validator("scrub_pii")
    @classmethod
    def _known_pii(cls, value: str) -> str:
        from sftpipe.data.pii import parse_kinds

        parse_kinds(value)
        return value

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, value: str) -> str:
        from sftpipe.data.langid import LANGUAGES

        unknown = [c.strip() for c in value.split(",") if c.strip() and c.strip() not in LANGUAGES]
        if unknown:
            raise ValueError(f"unknown language code(s) {unknown}; known: {', '.join(LANGUAGES)}")
        return value

    @field_validator("label_map")
    @classmethod
    def _parsable_label_map(cls, value: str) -> str:
        from sftpipe.data.records import parse_label_map

        parse_label_map(value)
        return value

    @field_validator("columns")
    @classmethod
    def _parsable_columns(cls, value: str) -> str:
        from sftpipe.data.records import parse_columns

        parse_columns(value)
        return value

    @field_validator("translation_languages")
    @classmethod
    def _language_pair(cls, value: str) -> str:
        from sftpipe.data.records import parse_languages

        parse_languages(value)
        return value

    @field_validator("translation_instruction")
    @classmethod
    def _instruction_placeholders(cls, value: str) -> str:
        try:
            value.format(source_lang="x", target_lang="y")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"only {{source_lang}} and {{target_lang}} may appear in braces ({exc})"
            ) from None
        return value


class ModelConfig(Section):
    """The base model every model-using stage starts from."""

    base_model: str = Field(
        "",
        description="Base model in Hugging Face format (config, safetensors weights, tokenizer): "
        "a local directory or an s3://bucket/prefix. Empty in `sftpipe run` means the bundled "
        "SmolLM2-135M-Instruct.",
    )


class TokenizeConfig(Section):
    """tokenize: chat template, assistant-only labels, truncation, packing, train/validation
    split."""

    max_length: int = Field(
        256,
        ge=8,
        le=131072,
        description="Longest tokenized conversation (and packed row); see truncation.",
    )
    truncation: Truncation = Field(
        "truncate",
        description="Conversations longer than max_length: truncate (keep the start) or drop "
        "(quarantine them).",
    )
    validation_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="Fraction of conversations held out for validation, chosen by a hash of "
        "their duplicate group (deterministic, stable when rows are added; stratified by "
        "label for classification).",
    )
    chat_template: str = Field(
        "",
        description="Chat template instead of the tokenizer's own (needed when it has none): "
        "a Jinja template or a name (chatml, llama3, plain).",
    )
    packing: bool = Field(
        True,
        description="Pack training conversations into max_length rows (best-fit decreasing, "
        "position_ids restart per conversation); validation stays one conversation per row.",
    )
    extend_vocabulary: int = Field(
        0,
        ge=0,
        description="Classification: add each character that the tokenizer can only encode as "
        "its unknown token and that occurs at least this many times in the training texts as a "
        "new token (0: off). For a tokenizer that does not cover the data's script (an English "
        "encoder on Chinese); finetune learns the new embeddings (see embedding_learning_rate).",
    )


class TrainConfig(Section):
    """finetune: full or adapter fine-tuning (chat SFT or classification), checkpoints."""

    learning_rate: float = Field(1e-4, gt=0.0, le=1.0, description="Peak AdamW learning rate.")
    embedding_learning_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Peak learning rate of the input embeddings (0: learning_rate); tokens added "
        "by extend_vocabulary start untrained and need a higher one than the pretrained weights.",
    )
    num_epochs: float = Field(1.0, gt=0.0, description="Passes over the training set.")
    max_steps: int = Field(
        0, ge=0, description="Stop after this many optimizer steps (0: run num_epochs)."
    )
    micro_batch_size: int = Field(8, ge=1, description="Conversations per forward/backward pass.")
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step; the loss is normalized by the "
        "loss-bearing tokens of all of them together.",
    )
    warmup_ratio: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Fraction of steps with linear learning-rate warmup before the decay.",
    )
    lr_schedule: Schedule = Field(
        "cosine", description="Decay after warmup, down to 10% of the peak learning rate."
    )
    weight_decay: float = Field(
        0.0, ge=0.0, description="AdamW weight decay (never applied to biases and norms)."
    )
    max_grad_norm: float = Field(
        1.0, ge=0.0, description="Clip the global gradient norm to this (0: no clipping)."
    )
    seed: int = Field(
        42, description="Seed for initialization-free randomness: data order, dropout."
    )
    eval_every: int = Field(
        25, ge=1, description="Compute validation loss every this many optimizer steps."
    )
    early_stopping_patience: int = Field(
        3,
        ge=0,
        description="Stop after this many validations without improvement (0: never); "
        "the best model is the one exported.",
    )
    export_best: bool = Field(
        True,
        description="Export the weights of the validation with the lowest loss; off: those of "
        "the last step (a fixed training budget, nothing selected on the validation set that "
        "evaluate scores; needs early_stopping_patience 0).",
    )
    precision: Precision = Field(
        "auto",
        description="Compute precision: auto picks bf16 autocast on CUDA with bf16 or on CPUs "
        "with AVX512_BF16/AMX, else fp32.",
    )
    log_every: int = Field(5, ge=1, description="Log training metrics every this many steps.")
    method: Method = Field(
        "full",
        description="full: update every weight; lora: train low-rank adapters (peft) and export "
        "the merged model plus the adapter; qlora: lora on a 4-bit base (CUDA with "
        "bitsandbytes only).",
    )
    lora_rank: int = Field(16, ge=1, le=1024, description="LoRA rank r.")
    lora_alpha: float = Field(32.0, gt=0.0, description="LoRA scaling alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: str = Field(
        "all-linear",
        description="Layers that get adapters: comma-separated names such as q_proj,v_proj, or "
        "all-linear.",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA) instead of LoRA.")
    class_weights: bool = Field(
        False, description="Classification: weight the loss by inverse class frequency."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% more compute."
    )
    gradient_checkpointing_every: int = Field(
        1,
        ge=1,
        le=64,
        description="With gradient_checkpointing: recompute only every Nth transformer block "
        "(2: half of them), a dial between memory and speed.",
    )
    lean_layers: bool = Field(
        True,
        description="Layers that keep fewer activations for backward, same math: RMSNorm and "
        "SwiGLU in Llama-style models (Llama, Mistral, Qwen2/3, SmolLM), a fused GELU in "
        "GPT-2-style ones (~0.7 GB less peak memory on SmolLM2-135M at 8 x 256 tokens); on CPU, "
        "attention with dropout ~3x faster than PyTorch's SDPA (GPT-2, BERT).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the transformer: faster steps after a one-time compilation "
        "of tens of seconds.",
    )
    checkpoint_uri: str = Field(
        "",
        description="Where to keep resumable checkpoints (local dir or s3://bucket/prefix; the "
        "pipeline run id is appended). A restarted or retried step resumes from the newest "
        "complete one. Empty: no checkpoints.",
    )
    checkpoint_every: int = Field(
        50, ge=1, description="Checkpoint every this many optimizer steps (and on SIGTERM)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints to keep.")
    distributed_strategy: Strategy = Field(
        "ddp",
        description="With several processes: ddp replicates the model in each; fsdp shards "
        "parameters, gradients and optimizer state across them (FSDP2, one unit per "
        "transformer block), for models that do not fit one GPU.",
    )
    nproc_per_node: int = Field(
        0,
        ge=0,
        le=64,
        description="Training processes per machine, launched with torchrun: one per GPU "
        "(gloo processes on CPU); 0: one per visible GPU, one on CPU.",
    )
    num_nodes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Machines to train on. Above 1, finetune submits a Kubeflow Trainer "
        "TrainJob with that many nodes and waits for it (needs s3:// pipeline root and "
        "checkpoint_uri).",
    )

    @model_validator(mode="after")
    def _last_weights_without_early_stop(self) -> typing.Self:
        # Early stopping ends training after validations that got worse: the last weights
        # would then be the worse ones.
        if not self.export_best and self.early_stopping_patience:
            raise ValueError(
                "export_best off exports the last step's weights: set early_stopping_patience 0"
            )
        return self


class EvalConfig(Section):
    """evaluate: base vs tuned on the validation set."""

    eval_batch_size: int = Field(
        8, ge=1, description="Conversations per evaluation batch (loss and generation)."
    )
    eval_prompts: int = Field(
        64,
        ge=0,
        description="Validation prompts both models answer (greedy) for ROUGE-L, chrF, BLEU, the "
        "EOS rate and the response length (0: no generation metrics).",
    )
    num_samples: int = Field(
        6, ge=0, description="Of those answers, how many the report shows side by side."
    )
    max_new_tokens: int = Field(
        48,
        ge=1,
        le=4096,
        description="Generation budget per answer (greedy); also the registered model's default.",
    )


class RegisterConfig(Section):
    """register: the quality gate, then MLflow registration with champion/challenger aliases."""

    model_name: str = Field(
        "sftpipe-chat", min_length=1, description="Registered model name in the MLflow registry."
    )
    gate_metric: str = Field(
        "",
        description="Primary metric of the quality gate: "
        f"{metrics.spoken_list(metrics.GATE_METRICS)} (empty: the task's own, validation_loss "
        "for chat, macro_f1 for classification).",
    )
    min_improvement: float = Field(
        0.0,
        description="The tuned model must beat the base (and a new champion the old one) on the "
        "gate metric by more than this, in the metric's units.",
    )
    gate_guards: str = Field(
        "",
        description="Guard metrics that must not regress, as metric:allowed_regression pairs "
        "separated by commas, e.g. eos_rate:0.05,chrf:1 (empty: the task's own, eos_rate:0.05 "
        "for chat, min_class_recall:0.05 for classification; none: no guards).",
    )

    @field_validator("gate_metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        return gate.check_metric(value) if value else value

    @field_validator("gate_guards")
    @classmethod
    def _parsable_guards(cls, value: str) -> str:
        if value:
            gate.parse_guards(value)
        return value

    def gate_spec(self, task_gate: gate.TaskGate) -> gate.GateSpec:
        """The gate of these settings; empty ones are the task's (`Task.default_gate`)."""
        return gate.GateSpec.from_fields(
            self.gate_metric, self.min_improvement, self.gate_guards, task_gate
        )


class TrackingConfig(Section):
    """MLflow tracking shared by every stage (the server itself comes from MLFLOW_TRACKING_URI)."""

    mlflow_experiment: str = Field(
        "sftpipe", min_length=1, description="MLflow experiment that records every run."
    )


SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "tokenize": TokenizeConfig,
    "train": TrainConfig,
    "evaluate": EvalConfig,
    "registry": RegisterConfig,
    "tracking": TrackingConfig,
}


class PipelineConfig(BaseModel):
    """All sections together: what a pipeline run is parameterized by."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    registry: RegisterConfig = RegisterConfig()
    tracking: TrackingConfig = TrackingConfig()

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> PipelineConfig:
        """Build from flat `{field: value}` (pipeline parameters, CLI flags); unknown keys fail."""
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise SftpipeError(
                "config", f"unknown parameter(s) {sorted(unknown)}", "see `sftpipe run --help`"
            )
        return cls(**{name: section.from_values(values) for name, section in SECTIONS.items()})

    def flat(self) -> dict[str, Any]:
        """`{field: value}` over every section, in declaration order."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            out.update(getattr(self, name).model_dump())
        return out

    def digest(self) -> str:
        """A stable hash of every knob, recorded as lineage on the registered model."""
        blob = json.dumps(self.flat(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def kfp_type(annotation: Any) -> type:
    """The KFP parameter type (str/int/float/bool) for a field annotation."""
    if typing.get_origin(annotation) is Literal:
        return type(typing.get_args(annotation)[0])
    if annotation in (str, int, float, bool):
        return annotation
    raise TypeError(f"config fields must be str/int/float/bool or a Literal, not {annotation!r}")


def _collect_fields() -> dict[str, tuple[str, Any]]:
    fields: dict[str, tuple[str, Any]] = {}
    for section_name, section in SECTIONS.items():
        for name, info in section.model_fields.items():
            if name in fields:
                raise TypeError(f"config field {name!r} is defined twice; names must be unique")
            kfp_type(info.annotation)
            fields[name] = (section_name, info)
    return fields


FIELDS: dict[str, tuple[str, Any]] = _collect_fields()
"""Every field: name -> (section name, pydantic FieldInfo), in declaration order."""
