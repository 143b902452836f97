"""tokenize: cleaned examples in, token ids with labels out, split into train and validation.

Chat data:
- Rendering uses the tokenizer's chat template, or `chat_template` (Jinja or a name, see
  `sftpipe.data.chat_templates`). Labels are found by position, not by token id: each assistant
  turn's character span (its reply through its end-of-turn marker, defined by the template
  itself) marks the tokens whose offsets start inside it. Every assistant turn is trained, its
  end-of-turn token included; pad == EOS tokenizers (SmolLM2) lose nothing. The first label of
  every sample is -100 (a first token is never a prediction target).
- Before any row, the template is checked on a probe conversation: an assistant turn must end
  with a token that stops generation (the tokenizer's EOS or the model's generation EOS ids),
  or the model would learn to end turns with something generation never stops on.
- Longer than `max_length`: truncated (the start kept) or dropped (`truncation`); a sample with
  no loss-bearing token left is quarantined, never trained on silently.
- Train conversations are packed (`packing`, `sftpipe.data.packing`) into rows with position_ids;
  validation stays one conversation per row, with its messages (evaluate needs them).

Classification data (`text` + `label`): the text is tokenized with the tokenizer's special
tokens, the label becomes an id (`label_map`, else the sorted label names), the label map is
stored in the Parquet schema metadata (`sftpipe.label_map`), and the split is stratified.

The split goes by a hash of each row's duplicate group (see clean), so it is deterministic,
stable as data grows, and duplicates never straddle it. Everything streams: rows are read,
tokenized in batches by worker processes (one per core) and written in row groups; the same
input and config give byte-identical files. GPT-2-style byte-level BPE tokenizers (SmolLM2,
GPT-2) encode English and Chinese text through `sftpipe.data.byte_level`, exact and about twice as
fast as the Rust tokenizer on chat data.
"""

from __future__ import annotations

import collections
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftpipe import storage, tasks
from sftpipe.config import TokenizeConfig
from sftpipe.data import chat_templates, packing, parallel, readers, records
from sftpipe.data.byte_level import ByteLevelEncoder
from sftpipe.data.chat_templates import assistant_spans, token_ranges
from sftpipe.data.schemas import (
    CHAT_TEMPLATE_KEY,
    LABEL_MAP_KEY,
    Message,
    QuarantineRow,
    Reason,
)
from sftpipe.data.tokenized import (
    IGNORE_INDEX,
    chat_schema,
    classification_schema,
    labels_for,
)
from sftpipe.errors import SftpipeError
from sftpipe.modeling import models
from sftpipe.progress import Progress

_BATCH = 1024  # rows per worker task (fewer tasks to send, and fewer template checks)
# A row group is written when it has this many rows or tokens, whichever comes first: the
# token bound keeps the buffer (12 bytes a token in packed rows, copied once more when written)
# near 25 MB whatever max_length is.
_ROW_GROUP_ROWS, _ROW_GROUP_TOKENS = 4096, 1 << 20
_PROGRESS_SECONDS = 10.0  # between progress lines


def is_validation(row_id: str, fraction: float) -> bool:
    return _hash_fraction(row_id) < fraction


def _hash_fraction(row_id: str) -> float:
    return int(row_id[:12], 16) / 16**12


UNKNOWN_TOKEN_WARNING = 0.01  # warn above this fraction of unknown tokens


def unknown_token_id(tokenizer: Any) -> int | None:
    """The id of a real unknown token; None when the tokenizer has none, or when its "unknown"
    token doubles as a special token (GPT-2 style byte-level BPE: <|endoftext|>), which then
    appears in templates without meaning unrepresentable text."""
    unknown = tokenizer.unk_token_id
    specials = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id}
    return None if unknown is None or unknown in specials else unknown


@dataclass
class TokenizeReport:
    task: str = "chat"
    rows_in: int = 0
    train_rows: int = 0
    validation_rows: int = 0
    train_file_rows: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated_rows: int = 0
    dropped_too_long: int = 0
    quarantined_no_loss_tokens: int = 0
    template_errors: int = 0
    unknown_labels: int = 0
    unknown_tokens: int = 0  # the tokenizer's unknown token ([UNK]): text it cannot represent
    packing_efficiency: float = 0.0
    unpacked_efficiency: float = 0.0
    seconds: float = 0.0
    label_map: dict[str, int] = field(default_factory=dict)
    token_hist: collections.Counter[int] = field(default_factory=collections.Counter)
    chat_template: str = ""

    @property
    def unknown_token_fraction(self) -> float:
        return self.unknown_tokens / max(self.tokens, 1)

    def unknown_token_warning(self) -> str:
        """A warning when the tokenizer cannot represent much of the text, else ""."""
        if self.unknown_token_fraction <= UNKNOWN_TOKEN_WARNING:
            return ""
        return (
            f"{self.unknown_token_fraction:.1%} of the tokens are the tokenizer's unknown token: "
            "its vocabulary does not cover this text (another script or language?); the model "
            "sees those characters as one and the same token. Pick a base model whose "
            "tokenizer covers the data"
        )

    def metrics(self) -> dict[str, float]:
        skip = {"task", "label_map", "token_hist", "chat_template"}
        out = {k: float(v) for k, v in vars(self).items() if k not in skip}
        out["unknown_token_fraction"] = self.unknown_token_fraction
        if not tasks.by_name(self.task).token_labels:
            for key in ("loss_tokens", "quarantined_no_loss_tokens", "template_errors"):
                out.pop(key)
            out.pop("packing_efficiency")
            out.pop("unpacked_efficiency")
        return out


# ----------------------------------------------------------------------------------------------
# Reading the cleaned file
# ----------------------------------------------------------------------------------------------

_HEAD = re.compile(
    r'^\{"id": "([0-9a-f]{12,})", "group": "([0-9a-f]{12,})"(?:, "label": ("(?:[^"\\]|\\.)*"))?'
)


def _heads(path: str | Path) -> Iterator[tuple[str, str | None]]:
    """(group, label or None) of every cleaned row, cheaply (a regex on the line start)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            match = _HEAD.match(line)
            if match:
                label = json.loads(match.group(3)) if match.group(3) else None
                yield match.group(2), label
            else:
                row = json.loads(line)
                label = row.get("label")
                yield row.get("group") or row["id"], None if label is None else str(label)


def _batches(path: str | Path) -> Iterator[list[dict[str, Any]]]:
    for lines in _LineBatches(path):
        yield [json.loads(line) for line in lines]


def _split_chat(path: str | Path, fraction: float, where: str) -> tuple[set[str], set[str]]:
    """Groups forced to validation / to train, so that both sides get rows even when the
    hash puts everything on one side (tiny data). Reads only until both sides have a row
    (a few rows on real data): then nothing is forced."""
    low: tuple[float, str] | None = None
    high: tuple[float, str] | None = None
    sides = collections.Counter()
    groups = 0
    for group, _ in _heads(path):
        groups += 1
        value = _hash_fraction(group)
        sides[value < fraction] += 1
        if sides[True] and sides[False]:
            return set(), set()
        low = min(low, (value, group)) if low else (value, group)
        high = max(high, (value, group)) if high else (value, group)
    if groups == 0:
        raise SftpipeError(where, "no rows to tokenize", "check the clean step's output")
    if low is not None and low[1] == high[1]:  # type: ignore[index]
        raise SftpipeError(
            where,
            "fewer than 2 distinct conversations: no validation set is possible",
            "provide more data",
        )
    force_validation = {low[1]} if not sides[True] else set()  # type: ignore[index]
    force_train = {high[1]} if not sides[False] else set()  # type: ignore[index]
    return force_validation, force_train


_GROUP_WIDTH = 32  # clean's ids (and so groups) are 32 hex digits


def _split_stratified(
    path: str | Path, fraction: float, label_map: dict[str, int]
) -> tuple[set[str], dict[str, int]]:
    """Validation groups chosen per label (the lowest hashes, round(fraction x groups), at
    least one when a label has two groups or more), and the label map (given, or the sorted
    label names: numerically when they are all integers). Memory: each row's group as 32
    bytes in an array while reading (sorted as bytes: hex ids sort as their hash fraction
    does), then the validation groups only."""
    per_label: dict[str, bytearray] = collections.defaultdict(bytearray)
    for group, label in _heads(path):
        per_label[str(label)] += group.encode()[:_GROUP_WIDTH].ljust(_GROUP_WIDTH, b"\0")
    if not label_map:
        names = sorted(per_label)
        if all(re.fullmatch(r"-?\d+", n) for n in names):
            names.sort(key=int)
        label_map = {name: index for index, name in enumerate(names)}
    validation: set[str] = set()
    for groups in per_label.values():
        ordered = np.unique(np.frombuffer(groups, dtype=f"S{_GROUP_WIDTH}"))  # distinct, sorted
        take = round(fraction * len(ordered))
        if len(ordered) >= 2:
            take = min(max(take, 1), len(ordered) - 1)
        validation.update(group.decode() for group in ordered[:take].tolist())
    return validation, label_map


# ----------------------------------------------------------------------------------------------
# Writing Parquet in row groups
# ----------------------------------------------------------------------------------------------


class _ParquetOut:
    """Rows appended as dicts of column values, written in row groups of at most
    `_ROW_GROUP_ROWS` rows and about `_ROW_GROUP_TOKENS` tokens."""

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
        if len(self.columns["id"]) >= _ROW_GROUP_ROWS or self.buffered_tokens >= _ROW_GROUP_TOKENS:
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


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def stop_token_ids(tokenizer: Any, model_dir: Path) -> set[int]:
    """Tokens that end generation: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("generation_config.json", "config.json"):
        try:
            configured = json.loads((model_dir / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if isinstance(configured, int):
            ids.add(configured)
        elif isinstance(configured, list):
            ids.update(i for i in configured if isinstance(i, int))
    return ids


def check_end_of_turn(tokenizer: Any, stop_ids: set[int], where: str) -> str:
    """Every assistant turn of a probe conversation must end with a stop token; returns it."""
    probe: list[Message] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    try:
        text, spans = assistant_spans(tokenizer, probe)
    except SftpipeError:
        raise
    except Exception as exc:  # the template itself fails
        raise SftpipeError(
            where, f"the chat template fails on a plain conversation ({exc})", "fix the template"
        ) from None
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    names = sorted(tokenizer.convert_ids_to_tokens(sorted(stop_ids))) if stop_ids else []
    replies = [m["content"] for m in probe if m["role"] == "assistant"]
    ranges = token_ranges(encoding, spans)
    for (_first, last), (start, end), reply in zip(ranges, spans, replies, strict=True):
        if encoding.ids[last - 1] not in stop_ids:
            turn = text[start:end]
            marker = turn[len(reply) :] if turn.startswith(reply) else turn
            raise SftpipeError(
                where,
                f"the chat template ends assistant turns with {marker!r}, which does not stop "
                f"generation (stop tokens: {names or 'none'}): the model would never stop",
                "use a template that ends assistant turns with the EOS token, or make that "
                "token the EOS (tokenizer eos_token / generation_config eos_token_id)",
            )
    return tokenizer.convert_ids_to_tokens(encoding.ids[token_ranges(encoding, spans)[0][1] - 1])


def _quarantine_line(row: dict[str, Any], reason: Reason, detail: str) -> str:
    raw = json.dumps(row.get("messages", row.get("text")), ensure_ascii=False)[
        : readers.RAW_PREVIEW
    ]
    entry = QuarantineRow(source=row.get("source", ""), reason=reason.value, detail=detail, raw=raw)
    return json.dumps(entry, ensure_ascii=False) + "\n"


def _quarantine(handle: Any, row: dict[str, Any], reason: Reason, detail: str) -> None:
    handle.write(_quarantine_line(row, reason, detail))


def run(
    config: TokenizeConfig,
    base_model: str,
    cleaned_path: str | Path,
    train_path: str | Path,
    validation_path: str | Path,
    quarantine_path: str | Path,
    report_path: str | Path | None = None,
    label_map: str = "",
    num_workers: int = 0,
) -> TokenizeReport:
    """Tokenize the cleaned JSONL into train/validation Parquet files, the quarantine JSONL
    and (with `report_path`) an HTML report, all published atomically."""
    start = time.perf_counter()
    template = chat_templates.resolve(config.chat_template)
    where = str(cleaned_path)
    first = next(_heads(cleaned_path), None)
    if first is None:
        raise SftpipeError(where, "no rows to tokenize", "check the clean step's output")
    task = tasks.of_cleaned(first[1])
    model_dir = models.fetch(base_model, weights=False)
    # An encoder for classification has no chat template, and needs none.
    tokenizer = models.load_tokenizer(model_dir, base_model, template, chat=task.chat_template)
    report = TokenizeReport(chat_template=tokenizer.chat_template or "", task=task.name)
    sample_html = ""
    with (
        storage.atomic_file(train_path, "wb") as train_handle,
        storage.atomic_file(validation_path, "wb") as validation_handle,
        storage.atomic_file(quarantine_path) as bad,
    ):
        if task.chat_template:  # conversations, rendered with the template (else texts)
            sample_html = _run_chat(
                config,
                tokenizer,
                model_dir,
                cleaned_path,
                train_handle,
                validation_handle,
                bad,
                report,
                base_model,
                num_workers,
            )
        else:
            _run_classification(
                config,
                tokenizer,
                cleaned_path,
                train_handle,
                validation_handle,
                bad,
                report,
                records.parse_label_map(label_map),
            )
        if report.train_rows == 0 or report.validation_rows == 0:
            raise SftpipeError(
                where,
                f"{report.train_rows} train and {report.validation_rows} validation rows left "
                "after tokenization (the rest quarantined)",
                "provide more data, raise --max-length or use --truncation truncate",
            )
        report.seconds = time.perf_counter() - start
        if warning := report.unknown_token_warning():
            print(f"[tokenize] WARNING: {warning}", flush=True)
        if report_path is not None:
            from sftpipe.data.report import write_tokenize_report

            write_tokenize_report(report_path, report, config, sample_html)
    return report


@dataclass(frozen=True)
class _Encoded:
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


_WORKER: dict[str, Any] = {}  # the tokenizer and settings, inherited by forked workers


def _rejected(row: dict[str, Any], reason: Reason, detail: str, full: int = 0) -> _Encoded:
    return _Encoded(row["id"], reason, _quarantine_line(row, reason, detail), full_length=full)


def _to_validation(group: str) -> bool:
    """The split of a duplicate group (`_split_chat` forces a side when one would be empty)."""
    if group in _WORKER["force_validation"]:
        return True
    return group not in _WORKER["force_train"] and is_validation(group, _WORKER["fraction"])


def _encode_chat_batch(lines: list[str]) -> list[_Encoded]:
    """Render, tokenize, label and split a batch of cleaned rows (in a worker or here)."""
    renderer = _WORKER["renderer"]
    max_length, drop, unknown = _WORKER["max_length"], _WORKER["drop"], _WORKER["unknown"]
    renderer.new_batch()
    rows = [json.loads(line) for line in lines]
    out: list[_Encoded | None] = [None] * len(rows)
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
        keep_messages = validation or not _WORKER["packing"]
        out[index] = _Encoded(
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
    backend, fast = _WORKER["tokenizer"].backend_tokenizer, _WORKER["byte_level"]
    if fast is None or not texts:
        return backend.encode_batch(texts, add_special_tokens=False)
    encodings = fast.encode_batch(texts)
    probes = {0, next((i for i, text in enumerate(texts) if not text.isascii()), 0)}
    if all(_agrees(backend, encodings[i], texts[i], spans[i]) for i in sorted(probes)):
        return encodings
    if not _WORKER.get("warned"):
        _WORKER["warned"] = True
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


class _LineBatches:
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
                    if len(batch) >= _BATCH:  # read here, so that tests can make batches small
                        yield batch
                        batch = []
        if batch:
            yield batch


def _run_chat(
    config: TokenizeConfig,
    tokenizer: Any,
    model_dir: Path,
    cleaned_path: str | Path,
    train_handle: Any,
    validation_handle: Any,
    bad: Any,
    report: TokenizeReport,
    base_model: str,
    num_workers: int,
) -> str:
    from sftpipe.data.report import highlight_tokens

    check_end_of_turn(tokenizer, stop_token_ids(tokenizer, model_dir), base_model)
    force_validation, force_train = _split_chat(
        cleaned_path, config.validation_fraction, str(cleaned_path)
    )
    metadata = {CHAT_TEMPLATE_KEY: report.chat_template}
    train = _ParquetOut(train_handle, chat_schema(config.packing, metadata))
    validation = _ParquetOut(validation_handle, chat_schema(False, metadata))
    packer = packing.Packer(config.max_length) if config.packing else None
    sample_html = ""
    train_tokens = 0

    def write_packed(rows: Iterator[packing.PackedRow]) -> None:
        for row in rows:
            train.add(
                {
                    "id": row.id,
                    "input_ids": row.input_ids,
                    "labels": row.labels,
                    "num_tokens": len(row.input_ids),
                    "num_loss_tokens": int((row.labels != IGNORE_INDEX).sum()),
                    "messages": "",
                    "position_ids": row.position_ids,
                    "num_samples": row.num_samples,
                }
            )

    _WORKER.update(
        tokenizer=tokenizer,
        byte_level=ByteLevelEncoder.for_tokenizer(tokenizer),
        renderer=chat_templates.Renderer(tokenizer),
        max_length=config.max_length,
        drop=config.truncation == "drop",
        packing=config.packing,
        fraction=config.validation_fraction,
        force_validation=force_validation,
        force_train=force_train,
        unknown=unknown_token_id(tokenizer),
    )
    batches = _LineBatches(cleaned_path)
    progress = Progress("tokenize", max(1, round(batches.size / 1e6)), "MB")
    shown = time.perf_counter()
    for results in parallel.ordered_map(_encode_chat_batch, batches, num_workers):
        if time.perf_counter() - shown >= _PROGRESS_SECONDS:
            shown = time.perf_counter()
            rate = report.tokens / progress.elapsed()
            extra = f"{report.rows_in:,} conversations, {rate:,.0f} tokens/s"
            progress.update(round(batches.bytes_read / 1e6), extra)
        for item in results:
            report.rows_in += 1
            if item.full_length:
                report.token_hist[item.full_length.bit_length()] += 1
            if item.reason is not None:
                if item.reason is Reason.TEMPLATE_ERROR:
                    report.template_errors += 1
                elif item.reason is Reason.TOO_MANY_TOKENS:
                    report.dropped_too_long += 1
                else:
                    report.quarantined_no_loss_tokens += 1
                bad.write(item.quarantine)
                continue
            input_ids, labels = item.input_ids, item.labels
            assert input_ids is not None and labels is not None
            loss_tokens = item.loss_tokens
            report.truncated_rows += item.truncated
            report.tokens += len(input_ids)
            report.loss_tokens += loss_tokens
            report.unknown_tokens += item.unknown_tokens
            if not sample_html:
                sample_html = highlight_tokens(tokenizer, input_ids.tolist(), labels.tolist())
            plain = {
                "id": item.id,
                "input_ids": input_ids,
                "labels": labels,
                "num_tokens": len(input_ids),
                "num_loss_tokens": loss_tokens,
            }
            if item.validation:
                report.validation_rows += 1
                plain["messages"] = item.messages
                validation.add(plain)
                continue
            report.train_rows += 1
            train_tokens += len(input_ids)
            if packer is None:
                plain["messages"] = item.messages
                train.add(plain)
            else:
                write_packed(packer.add(packing.Sample(item.id, input_ids, labels)))
    if packer is not None:
        write_packed(packer.flush())
    train.close()
    validation.close()
    report.train_file_rows = train.rows
    if report.train_rows:
        report.unpacked_efficiency = train_tokens / (report.train_rows * config.max_length)
        report.packing_efficiency = train_tokens / (train.rows * config.max_length)
    return sample_html


def _run_classification(
    config: TokenizeConfig,
    tokenizer: Any,
    cleaned_path: str | Path,
    train_handle: Any,
    validation_handle: Any,
    bad: Any,
    report: TokenizeReport,
    label_map: dict[str, int],
) -> None:
    validation_groups, label_map = _split_stratified(
        cleaned_path, config.validation_fraction, label_map
    )
    report.label_map = label_map
    metadata = {LABEL_MAP_KEY: json.dumps(label_map, ensure_ascii=False)}
    train = _ParquetOut(train_handle, classification_schema(metadata))
    validation = _ParquetOut(validation_handle, classification_schema(metadata))
    unknown = unknown_token_id(tokenizer)
    for batch in _batches(cleaned_path):
        rows = []
        for row in batch:
            report.rows_in += 1
            if str(row["label"]) not in label_map:
                report.unknown_labels += 1
                _quarantine(
                    bad,
                    row,
                    Reason.UNKNOWN_LABEL,
                    f"label {row['label']!r} is not in the label map ({', '.join(label_map)})",
                )
                continue
            rows.append(row)
        if not rows:
            continue
        encoded = tokenizer([r["text"] for r in rows], add_special_tokens=True)["input_ids"]
        for ids in encoded:
            report.token_hist[len(ids).bit_length()] += 1
        long = [i for i, ids in enumerate(encoded) if len(ids) > config.max_length]
        if long and config.truncation == "truncate":
            cut = tokenizer(
                [rows[i]["text"] for i in long],
                add_special_tokens=True,
                truncation=True,
                max_length=config.max_length,
            )["input_ids"]
            for i, ids in zip(long, cut, strict=True):
                encoded[i] = ids
            report.truncated_rows += len(long)
        for row, ids in zip(rows, encoded, strict=True):
            if len(ids) > config.max_length:
                report.dropped_too_long += 1
                _quarantine(
                    bad,
                    row,
                    Reason.TOO_MANY_TOKENS,
                    f"{len(ids)} tokens > max_length={config.max_length} (truncation=drop)",
                )
                continue
            report.tokens += len(ids)
            report.unknown_tokens += ids.count(unknown)
            out = {
                "id": row["id"],
                "input_ids": ids,
                "label": label_map[str(row["label"])],
                "num_tokens": len(ids),
                "text": row["text"],
            }
            if (row.get("group") or row["id"])[:_GROUP_WIDTH] in validation_groups:
                report.validation_rows += 1
                validation.add(out)
            else:
                report.train_rows += 1
                train.add(out)
    train.close()
    validation.close()
    report.train_file_rows = train.rows


def _write_parquet(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write tokenized chat rows (packed when they have position_ids) in one go."""
    packed = bool(rows) and "position_ids" in rows[0]
    with storage.atomic_file(path, "wb") as handle:
        out = _ParquetOut(handle, chat_schema(packed, {}))
        for row in rows:
            out.add(row)
        out.close()
