"""Chat templates: named ones for tokenizers that have none, and fast, exact rendering with the
character span of every assistant reply.

Assistant spans are defined by the template itself, whatever it looks like: for assistant
message i, the span starts where the conversation rendered up to message i *with the
generation prompt* ends (what the model sees when it must answer) and ends where the
conversation rendered through message i ends (trailing whitespace excluded): the reply and
its end-of-turn marker. This needs a template whose rendering of the first messages is a
prefix of the rendering of all of them; others are refused with a clear message.

Rendering every prefix with Jinja costs 2 x turns + 1 renders per conversation. `Renderer`
does it once per *shape* (the sequence of roles) with placeholder contents, learns the
literal text between the contents and where each span starts and ends relative to them, and
then assembles conversations of that shape by string concatenation. The plan is used only when
two different placeholder sets give the same literals (the template treats content as opaque
text), for contents without leading/trailing whitespace or `<` (which templates sometimes
inspect, e.g. for reasoning tags), and the first conversation of every shape in every batch
is rendered with Jinja too (one render, not one per prefix) and compared; any difference
switches the fast path off for the rest of the batch.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftpipe.data.schemas import Message
from sftpipe.errors import SftpipeError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
# For base models without chat tokens: plain-text role headers, the tokenizer's own EOS ends
# every turn (so the model learns to stop with the token generation stops on).
PLAIN = (
    "{{ bos_token if bos_token else '' }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
NAMED = {"chatml": CHATML, "llama3": LLAMA3, "plain": PLAIN}

_VERIFY_PER_SHAPE = 1  # per shape and batch


def resolve(value: str) -> str:
    """A template name (chatml, llama3, plain) -> its Jinja text; Jinja text as is."""
    value = value.strip()
    if not value or "{" in value:
        return value
    if value.lower() in NAMED:
        return NAMED[value.lower()]
    raise SftpipeError(
        "chat_template",
        f"{value!r} is neither a Jinja template nor a known name",
        f"use one of {', '.join(NAMED)} or a Jinja template",
    )


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer: Any, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant reply,
    from the start of its content through its end-of-turn marker (Jinja, every prefix)."""
    text = render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True)
        through = render(tokenizer, messages[: index + 1]).rstrip()
        if not (through.startswith(prompt) and text.startswith(through)):
            raise SftpipeError(
                "chat_template",
                "the template renders a conversation prefix differently from the whole "
                "conversation, so assistant turns cannot be located",
                "use a template whose rendering of the first N messages is a prefix of the rest",
            )
        spans.append((len(prompt), len(through)))
    return text, spans


@dataclass(frozen=True)
class _Plan:
    """A shape's rendering: literals[0] content[0] literals[1] ... content[n-1] literals[n],
    and each span boundary as (literal index, offset in it)."""

    literals: tuple[str, ...]
    boundaries: tuple[tuple[tuple[int, int], tuple[int, int]], ...]

    def apply(self, contents: list[str]) -> tuple[str, list[tuple[int, int]]]:
        starts, position = [], 0
        pieces: list[str] = []
        for index, literal in enumerate(self.literals):
            starts.append(position)
            pieces.append(literal)
            position += len(literal)
            if index < len(contents):
                pieces.append(contents[index])
                position += len(contents[index])
        spans = [(starts[a[0]] + a[1], starts[b[0]] + b[1]) for a, b in self.boundaries]
        return "".join(pieces), spans


def _placeholders(roles: tuple[str, ...], variant: int) -> list[Message]:
    filler = "x" * variant
    return [
        {"role": role, "content": f"\ue000{index}{filler}\ue001"}
        for index, role in enumerate(roles)
    ]


def _split(text: str, messages: list[Message]) -> list[tuple[int, int]] | None:
    """[start, end) of each placeholder in `text`, or None unless each occurs once, in order."""
    found, position = [], 0
    for message in messages:
        marker = message["content"]
        at = text.find(marker, position)
        if at < 0 or text.count(marker) != 1:
            return None
        found.append((at, at + len(marker)))
        position = at + len(marker)
    return found


def plan_shape(tokenizer: Any, roles: tuple[str, ...]) -> _Plan | None:
    """The rendering plan of a shape, or None when the template does not treat contents as
    opaque text (then conversations of this shape are rendered with Jinja)."""
    try:
        first = _placeholders(roles, 0)
        text, spans = assistant_spans(tokenizer, first)
        second = _placeholders(roles, 7)
        other = render(tokenizer, second)
    except SftpipeError:
        raise
    except Exception:  # the template rejects this shape: rows of it fail one by one
        return None
    places, other_places = _split(text, first), _split(other, second)
    if places is None or other_places is None:
        return None
    literals = _literals(text, places)
    if literals != _literals(other, other_places):
        return None
    # Literal k covers [lit_start[k], lit_end[k]] in `text` (end inclusive: a boundary there is
    # the start of content k).
    lit_start = [0] + [end for _, end in places]
    lit_end = [start for start, _ in places] + [len(text)]

    def where(position: int) -> tuple[int, int] | None:
        for k, (a, b) in enumerate(zip(lit_start, lit_end, strict=True)):
            if a <= position <= b:
                return k, position - a
        return None  # inside a content: the span does not start/end on a literal

    boundaries = []
    for start, end in spans:
        a, b = where(start), where(end)
        if a is None or b is None:
            return None
        boundaries.append((a, b))
    return _Plan(tuple(literals), tuple(boundaries))


def _literals(text: str, places: list[tuple[int, int]]) -> list[str]:
    literals, position = [], 0
    for start, end in places:
        literals.append(text[position:start])
        position = end
    literals.append(text[position:])
    return literals


class Renderer:
    """`render(messages) -> (text, assistant spans)`, fast and identical to Jinja."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.plans: dict[tuple[str, ...], _Plan | None] = {}
        self.checked: Counter[tuple[str, ...]] = Counter()
        self.fast = True
        self.fast_rows = 0
        self.jinja_rows = 0

    def new_batch(self) -> None:
        """Start checking afresh: the first conversation of each shape in every batch is
        compared with Jinja, so the result never depends on which worker got which batch."""
        self.checked.clear()
        self.fast = True

    def render(self, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
        if self.fast:
            shape = tuple(m["role"] for m in messages)
            if shape not in self.plans:
                self.plans[shape] = plan_shape(self.tokenizer, shape)
            plan = self.plans[shape]
            contents = [m["content"] for m in messages]
            if plan is not None and all(
                "<" not in c and c == c.strip() and "\ue000" not in c for c in contents
            ):
                result = plan.apply(contents)
                if self.checked[shape] < _VERIFY_PER_SHAPE:
                    self.checked[shape] += 1
                    # The spans come from the plan, which Jinja made on every prefix; the
                    # text is what real contents could change.
                    if render(self.tokenizer, messages) != result[0]:
                        self.fast = False
                        self.jinja_rows += 1
                        return assistant_spans(self.tokenizer, messages)
                self.fast_rows += 1
                return result
        self.jinja_rows += 1
        return assistant_spans(self.tokenizer, messages)


def token_ranges(encoding: Any, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """For each character span [s, e), the [first, last) token range of the tokens whose
    offsets start inside it (`encoding`: a `tokenizers.Encoding` with offsets)."""
    n = len(encoding.ids)
    ranges = []
    for start, end in spans:
        first = None
        for char in range(start, end):
            first = encoding.char_to_token(char)
            if first is not None:
                break
        if first is None:
            continue
        if encoding.token_to_chars(first)[0] < start:
            first += 1
        last = None
        for char in range(end - 1, start - 1, -1):
            last = encoding.char_to_token(char)
            if last is not None:
                break
        if last is None:
            continue
        while last + 1 < n and encoding.token_to_chars(last + 1)[0] < end:
            last += 1
        if first <= last:
            ranges.append((first, last + 1))
    return ranges


def unknown_token_id(tokenizer: Any) -> int | None:
    """The id of a real unknown token; None when the tokenizer has none, or when its "unknown"
    token doubles as a special token (GPT-2 style byte-level BPE: <|endoftext|>), which then
    appears in templates without meaning unrepresentable text."""
    unknown = tokenizer.unk_token_id
    specials = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id}
    return None if unknown is None or unknown in specials else unknown


def stop_token_ids(tokenizer: Any, model_dir: Path) -> set[int]:
    """Tokens that end generation: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("generation_config.json", "config.json"):
        try:
            configured = json.loads((model_dir / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if isinstance(configured, int):
            ids.add(configured)
        elif isinstance(configured, list):
            ids.update(i for i in configured if isinstance(i, int))
    return ids


def check_end_of_turn(tokenizer: Any, stop_ids: set[int], where: str) -> str:
    """Every assistant turn of a probe conversation must end with a stop token; returns it."""
    probe: list[Message] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    try:
        text, spans = assistant_spans(tokenizer, probe)
    except SftpipeError:
        raise
    except Exception as exc:  # the template itself fails
        raise SftpipeError(
            where, f"the chat template fails on a plain conversation ({exc})", "fix the template"
        ) from None
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    names = sorted(tokenizer.convert_ids_to_tokens(sorted(stop_ids))) if stop_ids else []
    replies = [m["content"] for m in probe if m["role"] == "assistant"]
    ranges = token_ranges(encoding, spans)
    for (_first, last), (start, end), reply in zip(ranges, spans, replies, strict=True):
        if encoding.ids[last - 1] not in stop_ids:
            turn = text[start:end]
            marker = turn[len(reply) :] if turn.startswith(reply) else turn
            raise SftpipeError(
                where,
                f"the chat template ends assistant turns with {marker!r}, which does not stop "
                f"generation (stop tokens: {names or 'none'}): the model would never stop",
                "use a template that ends assistant turns with the EOS token, or make that "
                "token the EOS (tokenizer eos_token / generation_config eos_token_id)",
            )
    return tokenizer.convert_ids_to_tokens(encoding.ids[token_ranges(encoding, spans)[0][1] - 1])
