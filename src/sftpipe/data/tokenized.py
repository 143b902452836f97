"""The tokenized Parquet format: what tokenize writes and finetune, evaluate and register read.

Chat rows: `id`, `input_ids`, `labels` (-100 where no loss is taken), `num_tokens`,
`num_loss_tokens`, `messages` (JSON, for evaluation prompts); packed train rows add
`position_ids` and `num_samples`. Classification rows: `id`, `input_ids`, `label` (an id),
`num_tokens`, `text`. The schema metadata carries the label map (`sftpipe.label_map`,
classification only) and the chat template the rows were rendered with
(`sftpipe.chat_template`).

Also here: one conversation tokenized the slow, exact way (Jinja rendering), which evaluate
uses to re-tokenize rows for a model with another tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftpipe.data.chat_templates import assistant_spans, token_ranges
from sftpipe.data.schemas import LABEL_MAP_KEY, Message

IGNORE_INDEX = -100  # a label position that carries no loss (PyTorch's cross-entropy default)


def _schema(columns: list[tuple[str, Any]], metadata: dict[str, str]) -> Any:
    import pyarrow as pa

    return pa.schema(columns, metadata={k.encode(): v.encode() for k, v in metadata.items()})


def chat_schema(packed: bool, metadata: dict[str, str]) -> Any:
    import pyarrow as pa

    columns = [
        ("id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("num_tokens", pa.int32()),
        ("num_loss_tokens", pa.int32()),
        ("messages", pa.string()),
    ]
    if packed:
        columns += [("position_ids", pa.list_(pa.int32())), ("num_samples", pa.int32())]
    return _schema(columns, metadata)


def classification_schema(metadata: dict[str, str]) -> Any:
    import pyarrow as pa

    return _schema(
        [
            ("id", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("label", pa.int32()),
            ("num_tokens", pa.int32()),
            ("text", pa.string()),
        ],
        metadata,
    )


def read_parquet(path: str | Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def schema_metadata(path: str | Path) -> dict[str, str]:
    """What tokenize stored in a Parquet file's schema metadata (label map, chat template)."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    return {key.decode(): value.decode() for key, value in metadata.items()}


def label_map(path: str | Path) -> dict[str, int] | None:
    """The label -> id map of a tokenized classification file; None for chat data."""
    metadata = schema_metadata(path)
    return json.loads(metadata[LABEL_MAP_KEY]) if LABEL_MAP_KEY in metadata else None


def read_label_map(path: str | Path) -> dict[str, int]:
    """The label map stored in a tokenized classification file's schema metadata."""
    return json.loads(schema_metadata(path)[LABEL_MAP_KEY])


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def labels_for(input_ids: list[int], ranges: list[tuple[int, int]]) -> list[int]:
    """Labels that train the tokens of `ranges` only; the first token is never a target."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for first, last in ranges:
        labels[first:last] = input_ids[first:last]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def tokenize_conversation(tokenizer: Any, messages: list[Message], max_length: int) -> Tokenized:
    """One conversation (Jinja rendering, no fast path): ids and assistant-only labels."""
    text, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    input_ids = list(encoding.ids)
    labels = labels_for(input_ids, token_ranges(encoding, spans))
    truncated = len(input_ids) > max_length
    return Tokenized(input_ids[:max_length], labels[:max_length], truncated)


# A row group is written when it has this many rows or tokens, whichever comes first: the
# token bound keeps the buffer (12 bytes a token in packed rows, copied once more when written)
# near 25 MB whatever max_length is.
ROW_GROUP_ROWS, ROW_GROUP_TOKENS = 4096, 1 << 20


class ParquetOut:
    """Rows appended as dicts of column values, written in row groups of at most
    `ROW_GROUP_ROWS` rows and about `ROW_GROUP_TOKENS` tokens."""

    def __init__(self, handle: Any, schema: Any) -> None:
        import pyarrow.parquet as pq

        self.schema = schema
        self.writer = pq.ParquetWriter(handle, schema)
        self.columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.rows = 0
        self.buffered_tokens = 0

    def add(self, row: dict[str, Any]) -> None:
        for name, values in self.columns.items():
            values.append(row[name])
        self.rows += 1
        self.buffered_tokens += row["num_tokens"]
        if len(self.columns["id"]) >= ROW_GROUP_ROWS or self.buffered_tokens >= ROW_GROUP_TOKENS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if not self.columns["id"]:
            return
        arrays = []
        for name, values in self.columns.items():
            kind = self.schema.field(name).type
            if pa.types.is_list(kind):
                lengths = np.fromiter((len(v) for v in values), dtype=np.int32, count=len(values))
                offsets = np.zeros(len(values) + 1, dtype=np.int32)
                np.cumsum(lengths, out=offsets[1:])
                flat = np.concatenate([np.asarray(v, dtype=np.int32) for v in values])
                arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)))
            else:
                arrays.append(pa.array(values, type=kind))
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.columns = {name: [] for name in self.schema.names}
        self.buffered_tokens = 0

    def close(self) -> None:
        self.flush()
        self.writer.close()
