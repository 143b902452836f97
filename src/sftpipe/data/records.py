"""Records -> sftpipe's one internal example shape. The record format is auto-detected per
record from its columns or forced with `record_format`:

| format | columns | becomes |
|---|---|---|
| messages | `messages`: [{role, content}] (system/developer, user, assistant) | the messages |
| sharegpt | `conversations`: [{from, value}] (human/gpt/system) | the messages |
| alpaca | `instruction`, optional `input`, `output`, optional `system` | user, assistant |
| prompt_completion | `prompt`, `completion` (text or message lists) | user, assistant |
| classification | `text`, `label` | text + label name |
| translation | `source`, `target`, `source_lang`, `target_lang` (or a pair) | user, assistant |

A record that does not fit raises `Rejected` with a reason code and a one-line detail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sftpipe.data.schemas import Message, Reason, Rejected

_OPENAI_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
LANGUAGE_NAMES = {
    "ar": "Arabic",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fr": "French",
    "hi": "Hindi",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "nl": "Dutch",
    "pt": "Portuguese",
    "ru": "Russian",
    "vi": "Vietnamese",
    "zh": "Chinese",
    "zh-cn": "Simplified Chinese",
    "zh-tw": "Traditional Chinese",
}


@dataclass(frozen=True)
class RecordOptions:
    """What `to_example` needs from the config (picklable, for worker processes)."""

    record_format: str = "auto"
    columns: tuple[tuple[str, str], ...] = ()  # (record column, the data's column)
    label_map: tuple[tuple[str, int], ...] = ()
    translation_instruction: str = ""
    translation_languages: tuple[str, str] | None = None


def parse_label_map(value: str) -> dict[str, int]:
    """`neg,pos` -> {"neg": 0, "pos": 1}; a JSON object {"neg": 0, ...} as given; "" -> {}."""
    value = value.strip()
    if not value:
        return {}
    if value.startswith("{"):
        mapping = json.loads(value)
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in mapping.items()
        ):
            raise ValueError("a JSON label map must map label names to integer ids")
        if sorted(mapping.values()) != list(range(len(mapping))):
            raise ValueError("label ids must be 0..N-1, each used once")
        return mapping
    names = [name.strip() for name in value.split(",")]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise ValueError("label names must be non-empty and distinct")
    return {name: index for index, name in enumerate(names)}


# Every column a record format reads (what `columns` may map a data column to).
RECORD_COLUMNS = (
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "system",
    "prompt",
    "completion",
    "text",
    "label",
    "source",
    "target",
    "source_lang",
    "target_lang",
    "translation",
)


def parse_columns(value: str) -> tuple[tuple[str, str], ...]:
    """`messages=dialog,label=sentiment` -> (("messages", "dialog"), ("label", "sentiment")):
    each record column (left) is read from the data's column (right)."""
    pairs: list[tuple[str, str]] = []
    for item in value.split(","):
        if not item.strip():
            continue
        target, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not target or not column:
            raise ValueError(f"write each mapping as RECORD_COLUMN=DATA_COLUMN, not {item!r}")
        if target not in RECORD_COLUMNS:
            raise ValueError(
                f"{target!r} is not a record column; known: {', '.join(RECORD_COLUMNS)}"
            )
        pairs.append((target, column))
    if len({target for target, _ in pairs}) != len(pairs):
        raise ValueError("each record column may be mapped once")
    return tuple(pairs)


def map_columns(record: dict[str, Any], columns: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The record with each mapped column read from the data's column (when the row has it;
    the mapping wins over a column of the record's own name)."""
    if not columns:
        return record
    mapped = dict(record)
    for target, column in columns:
        if column in record:
            mapped[target] = record[column]
    return mapped


def parse_languages(value: str) -> tuple[str, str] | None:
    value = value.strip()
    if not value:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError("write the default translation pair as source,target, e.g. en,zh")
    return parts[0], parts[1]


def detect_record_format(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record and "label" in record:
        return "classification"
    if ("source" in record and "target" in record) or "translation" in record:
        return "translation"
    raise Rejected(
        Reason.MISSING_COLUMNS,
        f"no known record format in columns {sorted(record)[:12]}: expected messages, "
        "conversations, instruction+output, prompt+completion, text+label or source+target",
    )


_REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "translation": ("source", "target"),
}


def _text(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    kind = "null" if value is None else type(value).__name__
    raise Rejected(Reason.WRONG_TYPE, f"{field} is {kind}, expected text")


def _maybe_json_list(value: Any) -> Any:
    """CSV cells and Parquet strings hold message lists as JSON text."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise Rejected(
                Reason.MALFORMED_JSON, f"message list is not valid JSON: {exc}"
            ) from None
        except RecursionError:
            raise Rejected(
                Reason.NESTED_TOO_DEEP, "the message list nests too deep to parse"
            ) from None
    return value


def _content(value: Any, field: str) -> str:
    """OpenAI content: text, or a list of parts of which only text parts are supported."""
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise Rejected(
                    Reason.WRONG_TYPE,
                    f"{field}[{index}] is a {kind!r} part; only text is supported",
                )
            texts.append(_text(part.get("text"), f"{field}[{index}].text"))
        return "\n".join(texts)
    return _text(value, field)


def _messages(value: Any, field: str, key_role: str, key_text: str, roles: dict[str, str]) -> list:
    value = _maybe_json_list(value)
    if not isinstance(value, list):
        raise Rejected(Reason.MISSING_MESSAGES, f"{field} is not a list of messages")
    messages: list[Message] = []
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict) or key_role not in message or key_text not in message:
            raise Rejected(
                Reason.BAD_MESSAGE, f"{where} must be an object with {key_role!r} and {key_text!r}"
            )
        role = message[key_role]
        if not isinstance(role, str) or role.lower() not in roles:
            raise Rejected(
                Reason.UNKNOWN_ROLE,
                f"{where} has {key_role} {role!r}; expected one of {sorted(set(roles))}",
            )
        messages.append(
            {
                "role": roles[role.lower()],
                "content": _content(message[key_text], f"{where}.{key_text}"),
            }
        )
    return messages


def _translation(record: dict[str, Any], options: RecordOptions) -> list[Message]:
    pair = options.translation_languages
    if "translation" in record and isinstance(record["translation"], dict):
        if pair is None:
            raise Rejected(
                Reason.MISSING_COLUMNS,
                "a translation object needs --translation-languages source,target to pick the pair",
            )
        source_lang, target_lang = pair
        texts = record["translation"]
        if source_lang not in texts or target_lang not in texts:
            raise Rejected(
                Reason.MISSING_COLUMNS,
                f"the translation object has {sorted(texts)}, not {source_lang} and {target_lang}",
            )
        source, target = texts[source_lang], texts[target_lang]
    else:
        source, target = record.get("source"), record.get("target")
        source_lang = record.get("source_lang") or record.get("src_lang") or (pair or ("", ""))[0]
        target_lang = record.get("target_lang") or record.get("tgt_lang") or (pair or ("", ""))[1]
        if not source_lang or not target_lang:
            raise Rejected(
                Reason.MISSING_COLUMNS,
                "translation rows need source_lang and target_lang columns "
                "(or --translation-languages source,target)",
            )
    source, target = _text(source, "source"), _text(target, "target")
    names = [
        LANGUAGE_NAMES.get(str(code).lower(), str(code)) for code in (source_lang, target_lang)
    ]
    instruction = options.translation_instruction.format(source_lang=names[0], target_lang=names[1])
    return [
        {"role": "user", "content": f"{instruction}\n\n{source}" if instruction else source},
        {"role": "assistant", "content": target},
    ]


def _label(value: Any, label_map: dict[str, int]) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        kind = "null" if value is None else type(value).__name__
        raise Rejected(Reason.WRONG_TYPE, f"label is {kind}, expected a name or an integer id")
    if not label_map:
        return str(value)
    if isinstance(value, str) and value in label_map:
        return value
    if isinstance(value, int):
        for name, index in label_map.items():
            if index == value:
                return name
    if str(value) in label_map:
        return str(value)
    names = ", ".join(label_map)
    raise Rejected(Reason.UNKNOWN_LABEL, f"label {value!r} is not in the label map ({names})")


def to_example(record: Any, options: RecordOptions) -> dict[str, Any]:
    """One record as `{"messages": [...]}` (chat) or `{"text": ..., "label": name}`
    (classification), not yet normalized. Raises `Rejected`."""
    if not isinstance(record, dict):
        raise Rejected(
            Reason.NOT_AN_OBJECT, f"a record must be an object, not {type(record).__name__}"
        )
    record = map_columns(record, options.columns)
    kind = options.record_format
    if kind == "auto":
        kind = detect_record_format(record)
    else:
        missing = [c for c in _REQUIRED[kind] if c not in record]
        if kind == "translation" and "translation" in record:
            missing = []
        if missing:
            raise Rejected(
                Reason.MISSING_COLUMNS,
                f"{kind} records need {', '.join(_REQUIRED[kind])}; missing {', '.join(missing)} "
                f"(columns: {', '.join(sorted(record)[:12])})",
            )
    if kind == "messages":
        return {
            "messages": _messages(record["messages"], "messages", "role", "content", _OPENAI_ROLES)
        }
    if kind == "sharegpt":
        return {
            "messages": _messages(
                record["conversations"], "conversations", "from", "value", _SHAREGPT_ROLES
            )
        }
    if kind == "alpaca":
        instruction = _text(record["instruction"], "instruction")
        extra = record.get("input")
        prompt = instruction
        if extra not in (None, ""):
            prompt = f"{instruction}\n\n{_text(extra, 'input')}"
        messages: list[Message] = []
        if record.get("system") not in (None, ""):
            messages.append({"role": "system", "content": _text(record["system"], "system")})
        messages += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(record["output"], "output")},
        ]
        return {"messages": messages}
    if kind == "prompt_completion":
        prompt, completion = (_maybe_json_list(record[k]) for k in ("prompt", "completion"))
        if isinstance(prompt, list) or isinstance(completion, list):
            return {
                "messages": _messages(prompt, "prompt", "role", "content", _OPENAI_ROLES)
                + _messages(completion, "completion", "role", "content", _OPENAI_ROLES)
            }
        return {
            "messages": [
                {"role": "user", "content": _text(prompt, "prompt")},
                {"role": "assistant", "content": _text(completion, "completion")},
            ]
        }
    if kind == "classification":
        return {
            "text": _text(record["text"], "text"),
            "label": _label(record["label"], dict(options.label_map)),
        }
    return {"messages": _translation(record, options)}
