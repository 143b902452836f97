"""Record formats: every way a record becomes the internal example, every way it can be bad."""

import json

import pytest

from sftpipe.data.records import RecordOptions, parse_label_map, to_example
from sftpipe.data.schemas import Rejected

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}

OPTIONS = RecordOptions(translation_instruction="Translate from {source_lang} to {target_lang}.")


@pytest.mark.parametrize(
    ("record", "messages"),
    [
        (
            {"messages": [{"role": "developer", "content": "Be brief."}, *CHAT["messages"]]},
            [("system", "Be brief."), ("user", "Hi"), ("assistant", "Yo")],
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "a"}]},
                    {"role": "assistant", "content": "b"},
                ]
            },
            [("user", "a"), ("assistant", "b")],
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "S"},
                    {"from": "human", "value": "Q"},
                    {"from": "gpt", "value": "A"},
                ]
            },
            [("system", "S"), ("user", "Q"), ("assistant", "A")],
        ),
        (
            {"instruction": "Translate", "input": "bonjour", "output": "hello"},
            [("user", "Translate\n\nbonjour"), ("assistant", "hello")],
        ),
        ({"instruction": "Hi", "input": "", "output": "Yo"}, [("user", "Hi"), ("assistant", "Yo")]),
        ({"prompt": "2+2?", "completion": "4"}, [("user", "2+2?"), ("assistant", "4")]),
        (
            {
                "prompt": json.dumps([{"role": "user", "content": "q"}]),
                "completion": [{"role": "assistant", "content": "a"}],
            },
            [("user", "q"), ("assistant", "a")],
        ),
        (
            {"source": "Hello", "target": "你好", "source_lang": "en", "target_lang": "zh"},
            [("user", "Translate from English to Chinese.\n\nHello"), ("assistant", "你好")],
        ),
    ],
)
def test_record_formats_become_conversations(record, messages):
    example = to_example(record, OPTIONS)
    assert [(m["role"], m["content"]) for m in example["messages"]] == messages


def test_classification_and_label_maps():
    assert to_example({"text": "好看", "label": "pos"}, OPTIONS) == {"text": "好看", "label": "pos"}
    mapped = RecordOptions(label_map=tuple(parse_label_map("neg,pos").items()))
    assert to_example({"text": "t", "label": 1}, mapped)["label"] == "pos"
    with pytest.raises(Rejected) as caught:
        to_example({"text": "t", "label": "meh"}, mapped)
    assert caught.value.reason.value == "unknown_label" and "(neg, pos)" in caught.value.detail
    assert parse_label_map('{"b": 1, "a": 0}') == {"b": 1, "a": 0}
    with pytest.raises(ValueError):
        parse_label_map('{"a": 0, "b": 2}')


@pytest.mark.parametrize(
    ("record", "reason", "words"),
    [
        ([1, 2], "not_an_object", "not list"),
        ({"question": "q"}, "missing_columns", "no known record format"),
        ({"messages": "hi"}, "missing_messages", "not a list"),
        ({"messages": [{"role": "user"}]}, "bad_message", "'role' and 'content'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "unknown_role", "'robot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "wrong_type", "content is int"),
        ({"instruction": "q", "output": 4.5}, "wrong_type", "output is float"),
        ({"text": "t", "label": True}, "wrong_type", "label is bool"),
        ({"source": "a", "target": "b"}, "missing_columns", "source_lang"),
    ],
)
def test_bad_records(record, reason, words):
    with pytest.raises(Rejected) as caught:
        to_example(record, OPTIONS)
    assert caught.value.reason.value == reason and words in caught.value.detail


def test_forced_record_format_names_missing_columns():
    with pytest.raises(Rejected, match="alpaca records need instruction, output; missing output"):
        to_example({"instruction": "x"}, RecordOptions(record_format="alpaca"))
