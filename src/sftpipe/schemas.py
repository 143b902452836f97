"""Record shapes that travel between stages, and the quarantine reason codes."""

from __future__ import annotations

from enum import StrEnum
from typing import TypedDict

ROLES = ("system", "user", "assistant")


class Message(TypedDict):
    role: str
    content: str


class Conversation(TypedDict):
    """A cleaned row: the normalized messages, a content id and where it came from."""

    id: str
    messages: list[Message]
    source: str


class QuarantineRow(TypedDict):
    """A rejected row, kept with a machine-readable reason and its source location."""

    source: str
    reason: str
    detail: str
    raw: str


class Reason(StrEnum):
    """Why a row was quarantined. Stable strings: dashboards and alerts key on them."""

    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_MESSAGES = "missing_messages"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_ROLE = "unknown_role"
    EMPTY_CONVERSATION = "empty_conversation"
    BAD_TURN_ORDER = "bad_turn_order"
    NO_ASSISTANT_TURN = "no_assistant_turn"
    DUPLICATE = "duplicate"
    NO_LOSS_TOKENS = "no_loss_tokens"


# Columns of the tokenized Parquet files (train and validation).
TOKENIZED_COLUMNS = ("id", "input_ids", "labels", "num_tokens", "num_loss_tokens", "messages")
