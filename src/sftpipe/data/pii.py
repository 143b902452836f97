"""PII scrubbing: personal data in training text is replaced by typed placeholders.

Kinds (the `scrub_pii` setting lists them; `none` turns scrubbing off):

- `email`: addresses -> `<EMAIL>`
- `id_number`: Chinese resident identity numbers (18 characters, valid birth date and ISO 7064
  MOD 11-2 check character) -> `<ID_NUMBER>`
- `credit_card`: 13-19 digits, optionally grouped by spaces or dashes, with a card-network
  first digit (2-6) and a valid Luhn checksum -> `<CREDIT_CARD>`
- `phone`: Chinese mobile (1[3-9]x xxxx xxxx, optional +86) and landline (0xx-xxxxxxxx) numbers,
  international numbers written with a leading + (8-15 digits), and grouped national numbers
  such as (555) 123-4567 -> `<PHONE>`
- `ip`: IPv4 and IPv6 addresses -> `<IP_ADDRESS>`

Checksums keep ordinary numbers (order ids, amounts, dates) from being scrubbed. Kinds are
applied in the order above, so an identity number is never also counted as a card.

Text that is shown rather than trained on (quarantined rows, reasons, the data report) goes
through `scrub_shown` with the same kinds: rejected rows are raw, not normalized, so it folds
full-width characters first, and it cuts the text to its limit only after scrubbing.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable

KINDS = ("email", "id_number", "credit_card", "phone", "ip")
PLACEHOLDERS = {
    "email": "<EMAIL>",
    "id_number": "<ID_NUMBER>",
    "credit_card": "<CREDIT_CARD>",
    "phone": "<PHONE>",
    "ip": "<IP_ADDRESS>",
}

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![\w-])"
)
_ID_NUMBER = re.compile(
    r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
    r"\d{3}[0-9Xx](?![0-9A-Za-z])"
)
_CARD = re.compile(r"(?<![\d+-])[2-6](?:[ -]?\d){12,18}(?![\d-])")
_PHONE = re.compile(
    "|".join(
        [
            # Chinese mobile, optionally +86 / 0086
            r"(?<![\d+])(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)",
            # Chinese landline with area code: 010-12345678, 0755-1234567
            r"(?<![\d-])0\d{2,3}-\d{7,8}(?![\d-])",
            # international: +44 20 7946 0958, +1 (555) 123-4567
            r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\d)",
            # grouped national numbers: (555) 123-4567, 555-123-4567, 555.123.4567
            r"(?<![\w(])(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\d-])",
        ]
    )
)
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    r"(?!\.?\d)"
)
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_DIGIT = re.compile(r"\d")

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def valid_id_number(text: str) -> bool:
    """ISO 7064 MOD 11-2 check character of an 18-character Chinese resident identity number."""
    total = sum(int(d) * w for d, w in zip(text[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == text[17].upper()


def luhn(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = int(char)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> bool:
    return luhn(re.sub(r"[ -]", "", match.group()))


def _phone(match: re.Match[str]) -> bool:
    return 7 <= sum(c.isdigit() for c in match.group()) <= 15


def _ipv6(match: re.Match[str]) -> bool:
    text = match.group()
    if sum(c not in ":" for c in text) < 3:  # "::", "a::b" in code, times like 10:30:00
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _replace(
    pattern: re.Pattern[str], text: str, placeholder: str, check: Callable[..., bool] | None
) -> tuple[str, int]:
    count = 0

    def sub(match: re.Match[str]) -> str:
        nonlocal count
        if check is not None and not check(match):
            return match.group()
        count += 1
        return placeholder

    return pattern.sub(sub, text), count


def parse_kinds(value: str) -> tuple[str, ...]:
    """`email,phone` -> ("email", "phone"); `all` -> every kind; `none` or "" -> ()."""
    value = value.strip().lower()
    if value in ("", "none"):
        return ()
    if value == "all":
        return KINDS
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown PII kind(s) {unknown}; known: {', '.join(KINDS)}, all, none")
    return tuple(k for k in KINDS if k in kinds)  # the fixed order


def scrub(text: str, kinds: tuple[str, ...]) -> tuple[str, dict[str, int]]:
    """`text` with every PII match of `kinds` replaced by its placeholder, and the counts."""
    counts: dict[str, int] = {}
    if not kinds:
        return text, counts
    has_digit = _DIGIT.search(text) is not None
    for kind in kinds:
        if kind == "email":
            if "@" not in text:
                continue
            text, n = _replace(_EMAIL, text, PLACEHOLDERS[kind], None)
        elif not has_digit:
            continue
        elif kind == "id_number":
            text, n = _replace(_ID_NUMBER, text, PLACEHOLDERS[kind], _valid_id)
        elif kind == "credit_card":
            text, n = _replace(_CARD, text, PLACEHOLDERS[kind], _card)
        elif kind == "phone":
            text, n = _replace(_PHONE, text, PLACEHOLDERS[kind], _phone)
        else:
            text, n = _replace(_IPV4, text, PLACEHOLDERS[kind], None)
            if text.count(":") >= 2:
                text, n6 = _replace(_IPV6_CANDIDATE, text, PLACEHOLDERS[kind], _ipv6)
                n += n6
        if n:
            counts[kind] = counts.get(kind, 0) + n
    return text, counts


def scrub_shown(text: str, kinds: tuple[str, ...], limit: int) -> str:
    """`text` as shown in the quarantine and the data report: NFKC-folded (full-width digits
    and `＠` become the ASCII the patterns match), scrubbed, then cut to `limit` characters (after
    scrubbing, so that a cut never leaves the start of an address unscrubbed)."""
    if kinds:
        text = scrub(unicodedata.normalize("NFKC", text), kinds)[0]
    return text[:limit]


def _valid_id(match: re.Match[str]) -> bool:
    return valid_id_number(match.group())
