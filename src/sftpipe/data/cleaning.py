"""The per-record half of clean: the options a worker needs (`CleanOptions`), the counts that
shards add up (`Stats`), the report (`CleanReport`), the row ids, and the cleaning and checking
of one example and of a batch of raw records (`process_batch`, run in worker processes: it
stays module-level so that it pickles by its module path). `sftpipe.stages.clean` drives it."""

from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sftpipe.config import DataConfig
from sftpipe.data import dedupe, langid, pii
from sftpipe.data.raw_records import PREVIEW_MARGIN, RAW_PREVIEW, RawRecord
from sftpipe.data.readers import parse_json
from sftpipe.data.records import (
    RecordOptions,
    parse_columns,
    parse_label_map,
    parse_languages,
    to_example,
)
from sftpipe.data.schemas import FILTER_REASONS, Message, QuarantineRow, Reason, Rejected
from sftpipe.data.text import normalize


@dataclass(frozen=True)
class CleanOptions:
    """What a worker needs from the config (picklable)."""

    records: RecordOptions
    strip_html: bool
    pii_kinds: tuple[str, ...]
    min_chars: int
    max_chars: int
    max_turn_chars: int
    max_turns: int
    languages: frozenset[str]

    @classmethod
    def from_config(cls, config: DataConfig) -> CleanOptions:
        return cls(
            records=RecordOptions(
                record_format=config.record_format,
                columns=parse_columns(config.columns),
                label_map=tuple(parse_label_map(config.label_map).items()),
                translation_instruction=config.translation_instruction,
                translation_languages=parse_languages(config.translation_languages),
            ),
            strip_html=config.strip_html,
            pii_kinds=pii.parse_kinds(config.scrub_pii),
            min_chars=config.min_chars,
            max_chars=config.max_chars,
            max_turn_chars=config.max_turn_chars,
            max_turns=config.max_turns,
            languages=frozenset(c.strip() for c in config.languages.split(",") if c.strip()),
        )


@dataclass
class Stats:
    """Counts that shards add up: rows, reasons with a first example each, PII, languages,
    labels, and histograms of characters (log2 bins) and turns."""

    rows_in: int = 0
    kept: int = 0
    empty_turns_dropped: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, dict[str, str]] = field(default_factory=dict)
    pii: collections.Counter[str] = field(default_factory=collections.Counter)
    languages: collections.Counter[str] = field(default_factory=collections.Counter)
    labels: collections.Counter[str] = field(default_factory=collections.Counter)
    chars: collections.Counter[int] = field(default_factory=collections.Counter)
    turns: collections.Counter[int] = field(default_factory=collections.Counter)
    tasks: collections.Counter[str] = field(default_factory=collections.Counter)

    def reject(self, reason: str, source: str, detail: str, raw: str) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, {"source": source, "detail": detail, "raw": raw[:500]})

    def add(self, other: Stats) -> None:
        self.rows_in += other.rows_in
        self.kept += other.kept
        self.empty_turns_dropped += other.empty_turns_dropped
        for name in ("dropped", "pii", "languages", "labels", "chars", "turns", "tasks"):
            getattr(self, name).update(getattr(other, name))
        for reason, example in other.examples.items():
            self.examples.setdefault(reason, example)

    def to_json(self) -> dict[str, Any]:
        return {k: dict(v) if isinstance(v, dict) else v for k, v in vars(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stats:
        stats = cls(rows_in=data["rows_in"], kept=data["kept"])
        stats.empty_turns_dropped = data["empty_turns_dropped"]
        stats.examples = data["examples"]
        for name in ("dropped", "pii", "languages", "labels", "tasks"):
            getattr(stats, name).update(data[name])
        for name in ("chars", "turns"):
            getattr(stats, name).update({int(k): v for k, v in data[name].items()})
        return stats


@dataclass
class CleanReport:
    rows_in: int = 0
    rows_out: int = 0
    empty_turns_dropped: int = 0
    task: str = "chat"
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)
    input_digest: str = ""
    output_digest: str = ""
    sources: int = 0
    seconds: float = 0.0

    @property
    def bad_rows(self) -> int:
        return sum(n for r, n in self.dropped.items() if r not in FILTER_REASONS)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_quarantined": sum(self.dropped.values()),
            "rows_bad": self.bad_rows,
            "empty_turns_dropped": self.empty_turns_dropped,
            "input_files": self.sources,
            "seconds": round(self.seconds, 3),
        }
        from sftpipe.data.schemas import TOKENIZE_REASONS

        out.update(
            {
                f"dropped_{reason.value}": self.dropped[reason.value]
                for reason in Reason
                if reason not in TOKENIZE_REASONS
            }
        )
        out.update({f"pii_{kind}": self.stats.pii[kind] for kind in pii.KINDS})
        out.update({f"language_{code}": n for code, n in sorted(self.stats.languages.items())})
        return {k: float(v) for k, v in out.items()}


def conversation_id(messages: list[Message]) -> str:
    blob = json.dumps(messages, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def example_id(example: dict[str, Any]) -> str:
    if "messages" in example:
        return conversation_id(example["messages"])
    blob = json.dumps([example["text"], example["label"]], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# One record
# ----------------------------------------------------------------------------------------------


def _check_turn_order(messages: list[Message]) -> None:
    if not messages:
        raise Rejected(Reason.EMPTY_CONVERSATION, "no non-empty turns")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            order = " -> ".join(m["role"] for m in messages)
            raise Rejected(
                Reason.BAD_TURN_ORDER,
                f"turn {index} is {message['role']}, expected {expected} ({order})",
            )
    if not turns or turns[-1]["role"] != "assistant":
        raise Rejected(
            Reason.NO_ASSISTANT_TURN, "the conversation does not end with an assistant turn"
        )


def clean_example(
    example: dict[str, Any], options: CleanOptions, pii_counts: collections.Counter[str]
) -> tuple[dict[str, Any], int, str]:
    """Normalize, scrub and check one example; returns it, the empty turns dropped and the
    text that near-duplicate detection and the language guess look at. Raises `Rejected`."""
    empty = 0
    if "messages" in example:
        messages: list[Message] = []
        for message in example["messages"]:
            content = normalize(message["content"], options.strip_html)
            if options.pii_kinds:
                content, counts = pii.scrub(content, options.pii_kinds)
                pii_counts.update(counts)
            if not content:
                empty += 1
                continue
            messages.append({"role": message["role"], "content": content})
        _check_turn_order(messages)
        lengths = [len(m["content"]) for m in messages]
        turns = sum(m["role"] != "system" for m in messages)
        cleaned: dict[str, Any] = {"messages": messages}
        text = "\n".join(m["content"] for m in messages)
    else:
        content = normalize(example["text"], options.strip_html)
        if options.pii_kinds:
            content, counts = pii.scrub(content, options.pii_kinds)
            pii_counts.update(counts)
        if not content:
            raise Rejected(Reason.EMPTY_CONVERSATION, "the text is empty after normalization")
        lengths, turns = [len(content)], 1
        cleaned = {"text": content, "label": example["label"]}
        text = content
    total = sum(lengths)
    if total < options.min_chars:
        raise Rejected(Reason.TOO_SHORT, f"{total} characters < min_chars={options.min_chars}")
    if total > options.max_chars:
        raise Rejected(Reason.TOO_LONG, f"{total:,} characters > max_chars={options.max_chars:,}")
    if max(lengths) > options.max_turn_chars:
        raise Rejected(
            Reason.TURN_TOO_LONG,
            f"a turn has {max(lengths):,} characters > max_turn_chars={options.max_turn_chars:,}",
        )
    if turns > options.max_turns:
        raise Rejected(Reason.TOO_MANY_TURNS, f"{turns} turns > max_turns={options.max_turns}")
    return cleaned, empty, text


@dataclass
class BatchResult:
    lines: list[str]
    keys: list[int]
    classification: list[bool]
    signatures: np.ndarray
    quarantine: list[str]
    stats: Stats


def process_batch(options: CleanOptions, records: list[RawRecord]) -> BatchResult:
    """Clean a batch of raw records (runs in a worker process)."""
    stats = Stats()
    lines: list[str] = []
    keys: list[int] = []
    classification: list[bool] = []
    texts: list[str] = []
    quarantine: list[str] = []
    for record in records:
        stats.rows_in += 1
        try:
            if record.error is not None:
                raise Rejected(record.error, record.detail)
            example = to_example(parse_json(record), options.records)
            cleaned, empty, text = clean_example(example, options, stats.pii)
            lang = langid.detect(text)
            if options.languages and lang not in options.languages:
                raise Rejected(
                    Reason.LANGUAGE,
                    f"language {lang} is not in languages={','.join(sorted(options.languages))}",
                )
        except Rejected as rejected:
            # Rejected rows are shown (quarantine, report, MLflow): scrubbed like kept ones.
            kinds = options.pii_kinds
            raw = pii.scrub_shown(record.preview or _raw_text(record), kinds, RAW_PREVIEW)
            detail = pii.scrub_shown(rejected.detail, kinds, len(rejected.detail))
            stats.reject(rejected.reason.value, record.location, detail, raw)
            quarantine.append(
                dump_row(
                    QuarantineRow(
                        source=record.location, reason=rejected.reason.value, detail=detail, raw=raw
                    )
                )
            )
            continue
        row_id = example_id(cleaned)
        row: dict[str, Any] = {"id": row_id, "group": row_id}
        if "label" in cleaned:
            row["label"] = cleaned["label"]
            stats.labels[cleaned["label"]] += 1
        row["lang"] = lang
        row.update((k, v) for k, v in cleaned.items() if k != "label")
        row["source"] = record.location
        lines.append(dump_row(row))
        keys.append(int(row_id[:16], 16))
        classification.append("label" in cleaned)
        texts.append(text)
        stats.kept += 1
        stats.empty_turns_dropped += empty
        stats.tasks["classification" if "label" in cleaned else "chat"] += 1
        stats.languages[lang] += 1
        stats.chars[len(text).bit_length()] += 1
        stats.turns[len(cleaned.get("messages", [1]))] += 1
    return BatchResult(lines, keys, classification, dedupe.signatures(texts), quarantine, stats)


def _raw_text(record: RawRecord) -> str:
    """The record's start as text, a margin longer than shown (scrubbed before the cut)."""
    payload = record.payload
    size = RAW_PREVIEW + PREVIEW_MARGIN
    if isinstance(payload, bytes):
        return payload[: size * 4].decode("utf-8", "replace")[:size]
    try:
        return json.dumps(payload, ensure_ascii=False, default=str)[:size]
    except (TypeError, ValueError, RecursionError):
        try:
            return repr(payload)[:size]
        except RecursionError:
            return f"<a {type(payload).__name__} nested too deep to show>"


def dump_row(row: Any) -> str:
    return json.dumps(row, ensure_ascii=False)
