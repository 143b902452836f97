"""The chat encoding workers of tokenize: render, tokenize, label and split a batch of cleaned
rows, in worker processes (one per core, forked: they inherit `WORKER`, the tokenizer and the
settings) or in the main process. Functions are module-level so that workers can pickle them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftpipe.data import readers
from sftpipe.data.chat_templates import token_ranges
from sftpipe.data.schemas import QuarantineRow, Reason
from sftpipe.data.split import is_validation
from sftpipe.data.tokenized import IGNORE_INDEX, labels_for
from sftpipe.errors import SftpipeError

BATCH = 1024  # rows per worker task (fewer tasks to send, and fewer template checks)


def quarantine_line(row: dict[str, Any], reason: Reason, detail: str) -> str:
    raw = json.dumps(row.get("messages", row.get("text")), ensure_ascii=False)[
        : readers.RAW_PREVIEW
    ]
    entry = QuarantineRow(source=row.get("source", ""), reason=reason.value, detail=detail, raw=raw)
    return json.dumps(entry, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class Encoded:
    """What the main process needs of a tokenized conversation (not the row itself: less to
    send back from the workers), or why it was rejected (`reason`, its quarantine line)."""

    id: str
    reason: Reason | None = None
    quarantine: str = ""
    input_ids: np.ndarray | None = None
    labels: np.ndarray | None = None
    full_length: int = 0
    truncated: bool = False
    validation: bool = False
    loss_tokens: int = 0
    unknown_tokens: int = 0
    messages: str = ""  # JSON, for the rows that keep their messages (validation, unpacked)


WORKER: dict[str, Any] = {}  # the tokenizer and settings, inherited by forked workers


def _rejected(row: dict[str, Any], reason: Reason, detail: str, full: int = 0) -> Encoded:
    return Encoded(row["id"], reason, quarantine_line(row, reason, detail), full_length=full)


def _to_validation(group: str) -> bool:
    """The split of a duplicate group (`split_chat` forces a side when one would be empty)."""
    if group in WORKER["force_validation"]:
        return True
    return group not in WORKER["force_train"] and is_validation(group, WORKER["fraction"])


def encode_chat_batch(lines: list[str]) -> list[Encoded]:
    """Render, tokenize, label and split a batch of cleaned rows (in a worker or here)."""
    renderer = WORKER["renderer"]
    max_length, drop, unknown = WORKER["max_length"], WORKER["drop"], WORKER["unknown"]
    renderer.new_batch()
    rows = [json.loads(line) for line in lines]
    out: list[Encoded | None] = [None] * len(rows)
    texts, spans, at = [], [], []
    for index, row in enumerate(rows):
        try:
            text, row_spans = renderer.render(row["messages"])
        except SftpipeError:
            raise
        except Exception as exc:  # the template rejects this conversation
            out[index] = _rejected(row, Reason.TEMPLATE_ERROR, f"chat template: {exc}")
            continue
        texts.append(text)
        spans.append(row_spans)
        at.append(index)
    encodings = _encode_batch(texts, spans)
    for index, encoding, row_spans in zip(at, encodings, spans, strict=True):
        row, ids = rows[index], encoding.ids
        labels = labels_for(ids, token_ranges(encoding, row_spans))
        full = len(ids)
        if full > max_length:
            if drop:
                out[index] = _rejected(
                    row,
                    Reason.TOO_MANY_TOKENS,
                    f"{full} tokens > max_length={max_length} (truncation=drop)",
                    full,
                )
                continue
            ids, labels = ids[:max_length], labels[:max_length]
        masked = labels.count(IGNORE_INDEX)
        if masked == len(labels):
            detail = f"no assistant token within max_length={max_length}"
            out[index] = _rejected(row, Reason.NO_LOSS_TOKENS, detail, full)
            continue
        validation = _to_validation(row.get("group") or row["id"])
        keep_messages = validation or not WORKER["packing"]
        out[index] = Encoded(
            row["id"],
            input_ids=np.asarray(ids, dtype=np.int32),
            labels=np.asarray(labels, dtype=np.int32),
            full_length=full,
            truncated=full > max_length,
            validation=validation,
            loss_tokens=len(labels) - masked,
            unknown_tokens=0 if unknown is None else ids.count(unknown),
            messages=json.dumps(row["messages"], ensure_ascii=False) if keep_messages else "",
        )
    return out  # type: ignore[return-value]


def _encode_batch(texts: list[str], spans: list[list[tuple[int, int]]]) -> list[Any]:
    """The Rust tokenizer's encodings, or the byte-level encoder's (`sftpipe.data.byte_level`) when
    the tokenizer has one and it agrees with the Rust tokenizer on the batch's first text and
    first text beyond ASCII (ids and label ranges): a disagreement, which the tests say cannot
    happen, costs speed only."""
    backend, fast = WORKER["tokenizer"].backend_tokenizer, WORKER["byte_level"]
    if fast is None or not texts:
        return backend.encode_batch(texts, add_special_tokens=False)
    encodings = fast.encode_batch(texts)
    probes = {0, next((i for i, text in enumerate(texts) if not text.isascii()), 0)}
    if all(_agrees(backend, encodings[i], texts[i], spans[i]) for i in sorted(probes)):
        return encodings
    if not WORKER.get("warned"):
        WORKER["warned"] = True
        print(
            "[tokenize] WARNING: the fast byte-level encoder disagrees with the tokenizer; "
            "using the tokenizer for this batch (please report it)",
            flush=True,
        )
    return backend.encode_batch(texts, add_special_tokens=False)


def _agrees(backend: Any, encoding: Any, text: str, spans: list[tuple[int, int]]) -> bool:
    reference = backend.encode(text, add_special_tokens=False)
    return reference.ids == encoding.ids and token_ranges(reference, spans) == token_ranges(
        encoding, spans
    )


class LineBatches:
    """The non-empty lines of the cleaned file, in batches, counting the bytes read (progress)."""

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.size = Path(path).stat().st_size
        self.bytes_read = 0

    def __iter__(self) -> Iterator[list[str]]:
        batch: list[str] = []
        with open(self.path, "rb") as handle:
            for raw in handle:
                self.bytes_read += len(raw)
                line = raw.decode("utf-8")
                if line.strip():
                    batch.append(line)
                    if len(batch) >= BATCH:  # read here, so that tests can make batches small
                        yield batch
                        batch = []
        if batch:
            yield batch
