"""clean: raw conversations in, normalized and validated conversations out.

Reads JSONL (a local path or s3://bucket/key) with OpenAI-style `messages`, one conversation a
line, streaming. Each row is normalized (`sftpipe.text.normalize`), empty turns are dropped,
and the conversation must read: optional system prompt first, then user and assistant turns
alternating, ending with the assistant. Rows that fail go to the quarantine file with a reason
code and their source line; exact duplicates (after normalization) are dropped. The step fails
only when more than `max_bad_fraction` of the rows are bad, naming the top reasons.
"""

from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftpipe import storage
from sftpipe.config import DataConfig
from sftpipe.errors import SftpipeError
from sftpipe.schemas import ROLES, Conversation, Message, QuarantineRow, Reason
from sftpipe.text import normalize

_RAW_PREVIEW = 2000  # characters of a rejected line kept in quarantine


class Rejected(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class CleanReport:
    rows_in: int = 0
    rows_out: int = 0
    empty_turns_dropped: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)
    input_digest: str = ""
    output_digest: str = ""

    def metrics(self) -> dict[str, float]:
        out = {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_quarantined": sum(self.dropped.values()),
            "empty_turns_dropped": self.empty_turns_dropped,
        }
        out.update(
            {
                f"dropped_{reason.value}": self.dropped[reason.value]
                for reason in Reason
                if reason is not Reason.NO_LOSS_TOKENS
            }
        )
        return {k: float(v) for k, v in out.items()}


def parse_conversation(line: bytes) -> tuple[list[Message], int]:
    """Validate and normalize one JSONL line; returns the messages and how many empty turns
    were dropped. Raises `Rejected` with the reason otherwise."""
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Rejected(Reason.MALFORMED_JSON, f"not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise Rejected(Reason.NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}")
    raw_messages = record.get("messages")
    if not isinstance(raw_messages, list):
        raise Rejected(Reason.MISSING_MESSAGES, "no `messages` list in the row")

    messages: list[Message] = []
    empty = 0
    for index, message in enumerate(raw_messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise Rejected(Reason.BAD_MESSAGE, f"messages[{index}] needs a string `content`")
        role = message.get("role")
        if role not in ROLES:
            raise Rejected(
                Reason.UNKNOWN_ROLE, f"messages[{index}] has role {role!r}; expected one of {ROLES}"
            )
        content = normalize(message["content"])
        if not content:
            empty += 1
            continue
        messages.append({"role": role, "content": content})
    _check_turn_order(messages)
    return messages, empty


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


def conversation_id(messages: list[Message]) -> str:
    blob = json.dumps(messages, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def run(config: DataConfig, cleaned_path: str | Path, quarantine_path: str | Path) -> CleanReport:
    """Clean `config.data_uri` into `cleaned_path` (JSONL of `Conversation`) and
    `quarantine_path` (JSONL of `QuarantineRow`). Both are published atomically."""
    if not config.data_uri:
        raise SftpipeError(
            "data_uri", "no input data given", "pass --data-uri PATH or s3://bucket/key"
        )
    report = CleanReport()
    seen: set[str] = set()
    raw_digest = hashlib.sha256()
    name = config.data_uri.rsplit("/", 1)[-1]

    with storage.atomic_file(cleaned_path) as cleaned, storage.atomic_file(quarantine_path) as bad:
        for number, line in storage.iter_lines(config.data_uri):
            raw_digest.update(line + b"\n")
            if not line.strip():
                continue
            report.rows_in += 1
            source = f"{name}:{number}"
            try:
                messages, empty = parse_conversation(line)
                row_id = conversation_id(messages)
                if config.dedupe and row_id in seen:
                    raise Rejected(Reason.DUPLICATE, f"same content as an earlier row ({row_id})")
            except Rejected as rejected:
                report.dropped[rejected.reason.value] += 1
                report.examples.setdefault(rejected.reason.value, f"{source}: {rejected.detail}")
                _write_jsonl(
                    bad,
                    QuarantineRow(
                        source=source,
                        reason=rejected.reason.value,
                        detail=rejected.detail,
                        raw=line[:_RAW_PREVIEW].decode("utf-8", "replace"),
                    ),
                )
                continue
            seen.add(row_id)
            report.empty_turns_dropped += empty
            report.rows_out += 1
            _write_jsonl(cleaned, Conversation(id=row_id, messages=messages, source=source))

        _check_bad_fraction(config, report)

    report.input_digest = raw_digest.hexdigest()
    report.output_digest = storage.sha256_file(cleaned_path)
    return report


def _check_bad_fraction(config: DataConfig, report: CleanReport) -> None:
    if report.rows_in == 0:
        raise SftpipeError(
            config.data_uri, "no rows in the input", "check that the file is not empty"
        )
    bad = sum(n for reason, n in report.dropped.items() if reason != Reason.DUPLICATE)
    if report.rows_out == 0 or bad / report.rows_in > config.max_bad_fraction:
        top = ", ".join(f"{reason}={n}" for reason, n in report.dropped.most_common(3))
        example = report.examples[report.dropped.most_common(1)[0][0]] if report.dropped else ""
        raise SftpipeError(
            config.data_uri,
            f"{bad} of {report.rows_in} rows are bad "
            f"(> max_bad_fraction={config.max_bad_fraction}): {top}; e.g. {example}",
            "fix the data or raise --max-bad-fraction",
        )


def _write_jsonl(handle: Any, row: Any) -> None:
    handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[Any]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
