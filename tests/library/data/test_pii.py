import pytest

from sftpipe.data.pii import KINDS, luhn, parse_kinds, scrub, valid_id_number


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("mail john.doe+x@example.co.uk now", "mail <EMAIL> now", "email"),
        ("身份证 11010519491231002X。", "身份证 <ID_NUMBER>。", "id_number"),
        ("card 4111 1111 1111 1111!", "card <CREDIT_CARD>!", "credit_card"),
        ("card 5500-0000-0000-0004", "card <CREDIT_CARD>", "credit_card"),
        ("手机13812345678，请回电", "手机<PHONE>，请回电", "phone"),
        ("call +86 138 1234 5678", "call <PHONE>", "phone"),
        ("办公室 010-12345678", "办公室 <PHONE>", "phone"),
        ("call +44 20 7946 0958 today", "call <PHONE> today", "phone"),
        ("call (555) 123-4567", "call <PHONE>", "phone"),
        ("host 192.168.1.10:80", "host <IP_ADDRESS>:80", "ip"),
        ("v6 2001:db8::8a2e:370:7334 ok", "v6 <IP_ADDRESS> ok", "ip"),
    ],
)
def test_each_kind_is_replaced_and_counted(text, expected, kind):
    assert scrub(text, KINDS) == (expected, {kind: 1})


@pytest.mark.parametrize(
    "text",
    [
        "order 20240115, amount 1234567890123, 2024-01-15, year 2023",
        "card 4111 1111 1111 1112 fails Luhn",
        "id 110105194912310021 has a bad check digit",
        "std::vector<int> at 10:30:00, version 1.2.3",
        "an @ sign alone",
    ],
)
def test_ordinary_numbers_are_left_alone(text):
    assert scrub(text, KINDS) == (text, {})


def test_checksums_and_kinds():
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    assert valid_id_number("11010519491231002X") and not valid_id_number("110105194912310021")
    assert parse_kinds("all") == KINDS and parse_kinds("none") == () == parse_kinds("")
    assert parse_kinds("phone,email") == ("email", "phone")
    with pytest.raises(ValueError, match="unknown PII kind"):
        parse_kinds("ssn")
    assert scrub("a@b.co 13812345678", ("email",)) == ("<EMAIL> 13812345678", {"email": 1})
