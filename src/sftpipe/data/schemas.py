"""Record shapes that travel between stages, and the quarantine reason codes."""

from __future__ import annotations

from enum import StrEnum
from typing import TypedDict

ROLES = ("system", "user", "assistant")


class Message(TypedDict):
    role: str
    content: str


class Conversation(TypedDict, total=False):
    """A cleaned chat row: a content id, the id of its duplicate group (the earliest row it
    duplicates, or its own id: train/validation split by group, so duplicates never straddle
    it), the detected language, the normalized messages and where it came from."""

    id: str
    group: str
    lang: str
    messages: list[Message]
    source: str


class Classified(TypedDict, total=False):
    """A cleaned classification row: the text and its label name (ids are assigned by
    tokenize, from `label_map` or the sorted names)."""

    id: str
    group: str
    label: str
    lang: str
    text: str
    source: str


class QuarantineRow(TypedDict):
    """A rejected row, kept with a machine-readable reason and its source location."""

    source: str
    reason: str
    detail: str
    raw: str


class Reason(StrEnum):
    """Why a row was quarantined. Stable strings: dashboards and alerts key on them."""

    # reading
    BAD_ENCODING = "bad_encoding"
    MALFORMED_JSON = "malformed_json"
    TRUNCATED_JSON = "truncated_json"
    MALFORMED_ROW = "malformed_row"
    RECORD_TOO_LARGE = "record_too_large"
    NESTED_TOO_DEEP = "nested_too_deep"
    TRAILING_DATA = "trailing_data"  # text after the closing ] of a JSON-array file
    TRUNCATED_FILE = "truncated_file"  # a compressed stream that ends early
    CORRUPT_FILE = "corrupt_file"  # a compressed stream that cannot be decoded
    TOO_COMPRESSED = "too_compressed"  # a compressed stream that expands like a bomb
    # record shape
    NOT_AN_OBJECT = "not_an_object"
    MISSING_COLUMNS = "missing_columns"
    MISSING_MESSAGES = "missing_messages"
    BAD_MESSAGE = "bad_message"
    WRONG_TYPE = "wrong_type"
    UNKNOWN_ROLE = "unknown_role"
    UNKNOWN_LABEL = "unknown_label"
    MIXED_TASK = "mixed_task"
    # conversation structure
    EMPTY_CONVERSATION = "empty_conversation"
    BAD_TURN_ORDER = "bad_turn_order"
    NO_ASSISTANT_TURN = "no_assistant_turn"
    # filters (policy, not broken data: not counted against max_bad_fraction)
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    TURN_TOO_LONG = "turn_too_long"
    TOO_MANY_TURNS = "too_many_turns"
    LANGUAGE = "language"
    DUPLICATE = "duplicate"
    NEAR_DUPLICATE = "near_duplicate"
    # tokenize
    TEMPLATE_ERROR = "template_error"
    TOO_MANY_TOKENS = "too_many_tokens"
    NO_LOSS_TOKENS = "no_loss_tokens"


# Reasons that are a policy decision about good data rather than broken data.
FILTER_REASONS = frozenset(
    {
        Reason.TOO_SHORT,
        Reason.TOO_LONG,
        Reason.TURN_TOO_LONG,
        Reason.TOO_MANY_TURNS,
        Reason.LANGUAGE,
        Reason.DUPLICATE,
        Reason.NEAR_DUPLICATE,
    }
)
TOKENIZE_REASONS = frozenset({Reason.TEMPLATE_ERROR, Reason.TOO_MANY_TOKENS, Reason.NO_LOSS_TOKENS})

# Columns of the tokenized Parquet files (train and validation) of chat data; packed train files
# add position_ids and num_samples (and hold "" in messages).
TOKENIZED_COLUMNS = ("id", "input_ids", "labels", "num_tokens", "num_loss_tokens", "messages")
PACKED_COLUMNS = (*TOKENIZED_COLUMNS, "position_ids", "num_samples")
# Columns of tokenized classification data; the label map is in the schema metadata.
CLASSIFICATION_COLUMNS = ("id", "input_ids", "label", "num_tokens", "text")
LABEL_MAP_KEY = "sftpipe.label_map"
CHAT_TEMPLATE_KEY = "sftpipe.chat_template"
ADDED_TOKENS_KEY = "sftpipe.added_tokens"  # vocabulary extension (sftpipe.data.vocabulary)


class Rejected(Exception):
    """A record that cannot become an example: a reason code and a one-line detail."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail
