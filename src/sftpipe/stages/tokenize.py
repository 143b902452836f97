"""tokenize: cleaned conversations in, token ids with assistant-only labels out.

Rendering uses the tokenizer's chat template (or `chat_template`). Labels are found by
position, not by token id: each assistant turn's character span is the difference between the
template rendered up to that turn and the same prefix rendered with the generation prompt, and
the tokens whose offsets start inside a span carry labels. Every assistant turn is trained,
its end-of-turn token included; pad == EOS tokenizers (SmolLM2) lose nothing.

Conversations go to train or validation by a hash of their content id, so the split is
deterministic and a row keeps its side when others are added.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftpipe import models, storage
from sftpipe.config import TokenizeConfig
from sftpipe.errors import SftpipeError
from sftpipe.schemas import Conversation, Message, QuarantineRow, Reason
from sftpipe.stages.clean import read_jsonl

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer: Any, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant reply,
    from the start of its content through its end-of-turn marker."""
    text = render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True)
        through = render(tokenizer, messages[: index + 1]).rstrip()
        if not (through.startswith(prompt) and text.startswith(through)):
            raise SftpipeError(
                "chat_template",
                "the template renders a conversation prefix differently from the whole "
                "conversation, so assistant turns cannot be located",
                "use a template whose rendering of the first N messages is a prefix of the rest",
            )
        spans.append((len(prompt), len(through)))
    return text, spans


def tokenize_conversation(tokenizer: Any, messages: list[Message], max_length: int) -> Tokenized:
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = encoded["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (start, _end) in enumerate(encoded["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start:
            labels[position] = input_ids[position]
    truncated = len(input_ids) > max_length
    return Tokenized(input_ids[:max_length], labels[:max_length], truncated)


def is_validation(row_id: str, fraction: float) -> bool:
    return int(row_id[:12], 16) / 16**12 < fraction


@dataclass
class TokenizeReport:
    rows_in: int = 0
    train_rows: int = 0
    validation_rows: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated_rows: int = 0
    quarantined_no_loss_tokens: int = 0

    def metrics(self) -> dict[str, float]:
        return {key: float(value) for key, value in vars(self).items()}


def run(
    config: TokenizeConfig,
    base_model: str,
    cleaned_path: str | Path,
    train_path: str | Path,
    validation_path: str | Path,
    quarantine_path: str | Path,
) -> TokenizeReport:
    """Tokenize the cleaned JSONL into train/validation Parquet files (atomically published)."""
    tokenizer = models.load_tokenizer(
        models.fetch(base_model, weights=False), base_model, config.chat_template
    )
    report = TokenizeReport()
    splits: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    rejected: list[QuarantineRow] = []
    conversation: Conversation
    for conversation in read_jsonl(cleaned_path):
        report.rows_in += 1
        row = tokenize_conversation(tokenizer, conversation["messages"], config.max_length)
        loss_tokens = sum(label != IGNORE_INDEX for label in row.labels)
        if loss_tokens == 0:
            report.quarantined_no_loss_tokens += 1
            rejected.append(
                QuarantineRow(
                    source=conversation["source"],
                    reason=Reason.NO_LOSS_TOKENS.value,
                    detail=f"no assistant token within max_length={config.max_length}",
                    raw=json.dumps(conversation["messages"], ensure_ascii=False)[:2000],
                )
            )
            continue
        report.truncated_rows += row.truncated
        report.tokens += len(row.input_ids)
        report.loss_tokens += loss_tokens
        splits[is_validation(conversation["id"], config.validation_fraction)].append(
            {
                "id": conversation["id"],
                "input_ids": row.input_ids,
                "labels": row.labels,
                "num_tokens": len(row.input_ids),
                "num_loss_tokens": loss_tokens,
                "messages": json.dumps(conversation["messages"], ensure_ascii=False),
            }
        )

    train, validation = _ensure_both_splits(splits[False], splits[True], str(cleaned_path))
    report.train_rows, report.validation_rows = len(train), len(validation)
    _write_parquet(train, train_path)
    _write_parquet(validation, validation_path)
    with storage.atomic_file(quarantine_path) as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rejected)
    return report


def _ensure_both_splits(
    train: list[dict[str, Any]], validation: list[dict[str, Any]], where: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Small data sets can hash entirely to one side; move the lowest-hash row across (still
    deterministic) so that validation loss always exists."""
    if len(train) + len(validation) < 2:
        raise SftpipeError(
            where,
            "fewer than 2 usable conversations after tokenization",
            "provide more data or raise --max-length",
        )
    if not validation:
        train.sort(key=lambda row: row["id"])
        validation.append(train.pop(0))
    if not train:
        validation.sort(key=lambda row: row["id"])
        train.append(validation.pop())
    return train, validation


def _write_parquet(rows: list[dict[str, Any]], path: str | Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int32())),
            ("num_tokens", pa.int32()),
            ("num_loss_tokens", pa.int32()),
            ("messages", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    with storage.atomic_file(path, "wb") as handle:
        pq.write_table(table, handle)


def read_parquet(path: str | Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
