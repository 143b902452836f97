"""The raw record every reader yields, and the limits on one record."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sftpipe.data.schemas import Reason

MAX_RECORD_BYTES = 64 << 20  # one record (line, array element, CSV row); larger is quarantined
RAW_PREVIEW = 2000  # characters of a rejected record kept in the quarantine
# Previews are read this much longer, so that PII crossing the cut is scrubbed whole before
# the cut (`pii.scrub_shown`).
PREVIEW_MARGIN = 256

# Characters that stand for bytes that were not UTF-8 (decoded with "surrogateescape").
SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class RawRecord:
    """One record as read: where it is, and either its JSON bytes (JSONL, parsed later, in a
    worker), the parsed object (JSON array, CSV, Parquet) or why it could not be read."""

    location: str
    payload: Any = None
    raw_json: bool = False
    error: Reason | None = None
    detail: str = ""
    preview: str = ""


def preview(data: bytes | str) -> str:
    """The start of a record as text, `PREVIEW_MARGIN` longer than what is shown."""
    size = RAW_PREVIEW + PREVIEW_MARGIN
    if isinstance(data, bytes):
        data = data[: size * 4].decode("utf-8", "replace")
    return data[:size]


def not_utf8(location: str, text: str) -> RawRecord | None:
    """The BAD_ENCODING record of `text` (decoded with "surrogateescape") when it holds bytes
    that were not UTF-8, else None."""
    if not SURROGATE.search(text):
        return None
    return RawRecord(
        location,
        error=Reason.BAD_ENCODING,
        detail="bytes that are not UTF-8 (re-encode the file as UTF-8)",
        preview=preview(text.encode("utf-8", "surrogateescape")),
    )
