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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftpipe import storage, tasks
from sftpipe.config import TokenizeConfig
from sftpipe.data import (
    chat_encoding,
    chat_templates,
    packing,
    parallel,
    records,
    split,
    vocabulary,
)
from sftpipe.data.byte_level import ByteLevelEncoder
from sftpipe.data.schemas import CHAT_TEMPLATE_KEY, LABEL_MAP_KEY, Reason
from sftpipe.data.tokenized import (
    IGNORE_INDEX,
    ParquetOut,
    chat_schema,
    classification_schema,
)
from sftpipe.errors import SftpipeError
from sftpipe.modeling import models
from sftpipe.progress import Progress

_PROGRESS_SECONDS = 10.0  # between progress lines

UNKNOWN_TOKEN_WARNING = 0.01  # warn above this fraction of unknown tokens


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
    added_tokens: int = 0  # extend_vocabulary's new tokens (sftpipe.data.vocabulary)
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
            "tokenizer covers the data, or add them with --extend-vocabulary 2 (classification)"
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


def _batches(path: str | Path) -> Iterator[list[dict[str, Any]]]:
    for lines in chat_encoding.LineBatches(path):
        yield [json.loads(line) for line in lines]


def _quarantine(handle: Any, row: dict[str, Any], reason: Reason, detail: str) -> None:
    handle.write(chat_encoding.quarantine_line(row, reason, detail))


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
    first = next(split.heads(cleaned_path), None)
    if first is None:
        raise SftpipeError(where, "no rows to tokenize", "check the clean step's output")
    task = tasks.of_cleaned(first[1])
    if config.extend_vocabulary and task.chat_template:
        raise SftpipeError(
            "extend_vocabulary",
            "adds tokens for classification texts only",
            "leave it 0 for conversations (a chat model's byte-level tokenizer spells any text)",
        )
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

    chat_templates.check_end_of_turn(
        tokenizer, chat_templates.stop_token_ids(tokenizer, model_dir), base_model
    )
    force_validation, force_train = split.split_chat(
        cleaned_path, config.validation_fraction, str(cleaned_path)
    )
    metadata = {CHAT_TEMPLATE_KEY: report.chat_template}
    train = ParquetOut(train_handle, chat_schema(config.packing, metadata))
    validation = ParquetOut(validation_handle, chat_schema(False, metadata))
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

    chat_encoding.WORKER.update(
        tokenizer=tokenizer,
        byte_level=ByteLevelEncoder.for_tokenizer(tokenizer),
        renderer=chat_templates.Renderer(tokenizer),
        max_length=config.max_length,
        drop=config.truncation == "drop",
        packing=config.packing,
        fraction=config.validation_fraction,
        force_validation=force_validation,
        force_train=force_train,
        unknown=chat_templates.unknown_token_id(tokenizer),
    )
    batches = chat_encoding.LineBatches(cleaned_path)
    progress = Progress("tokenize", max(1, round(batches.size / 1e6)), "MB")
    shown = time.perf_counter()
    for results in parallel.ordered_map(chat_encoding.encode_chat_batch, batches, num_workers):
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
    validation_groups, label_map = split.split_stratified(
        cleaned_path, config.validation_fraction, label_map
    )
    report.label_map = label_map
    metadata = {LABEL_MAP_KEY: json.dumps(label_map, ensure_ascii=False)}

    def in_validation(row: dict[str, Any]) -> bool:
        return (row.get("group") or row["id"])[: split.GROUP_WIDTH] in validation_groups

    if config.extend_vocabulary:
        training_texts = (
            str(row["text"])
            for batch in _batches(cleaned_path)
            for row in batch
            if str(row["label"]) in label_map and not in_validation(row)
        )
        metadata |= _extend_vocabulary(tokenizer, training_texts, config.extend_vocabulary, report)
    train = ParquetOut(train_handle, classification_schema(metadata))
    validation = ParquetOut(validation_handle, classification_schema(metadata))
    unknown = chat_templates.unknown_token_id(tokenizer)
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
            if in_validation(row):
                report.validation_rows += 1
                validation.add(out)
            else:
                report.train_rows += 1
                train.add(out)
    train.close()
    validation.close()
    report.train_file_rows = train.rows


def _extend_vocabulary(
    tokenizer: Any, training_texts: Iterator[str], min_count: int, report: TokenizeReport
) -> dict[str, str]:
    """Add the training texts' characters the tokenizer cannot encode (sftpipe.data.vocabulary)
    to `tokenizer`; returns the Parquet metadata that carries them to finetune."""
    added = vocabulary.unknown_characters(tokenizer, training_texts, min_count)
    tokenizer.add_tokens(added)
    report.added_tokens = len(added)
    print(
        f"[tokenize] extend_vocabulary: {len(added)} characters the tokenizer could only encode "
        f"as its unknown token (seen >= {min_count} times in the training texts) added as new "
        "tokens",
        flush=True,
    )
    return vocabulary.metadata_of(added)


def _write_parquet(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write tokenized chat rows (packed when they have position_ids) in one go."""
    packed = bool(rows) and "position_ids" in rows[0]
    with storage.atomic_file(path, "wb") as handle:
        out = ParquetOut(handle, chat_schema(packed, {}))
        for row in rows:
            out.add(row)
        out.close()
