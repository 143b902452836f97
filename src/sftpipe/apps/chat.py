"""`sftpipe chat`: talk to a fine-tuned model in the terminal.

The model is a registered version (`models:/NAME@champion`, `models:/NAME/3`; downloaded from
MLflow) or a save_pretrained folder (local or s3://). Answers stream token by token; the
conversation keeps its history (the oldest turns make room when the context fills up), an
optional system prompt leads it, `/reset` starts over and `/exit` (or end of input) quits.
When stdin is not a terminal, every line is one user message and only the answers are written,
one per line, so a chat can be scripted: `printf 'Hi\\n/reset\\nHello\\n' | sftpipe chat ...`.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sftpipe.errors import SftpipeError

COMMANDS = "/reset clears the history, /exit quits"


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    label: str


@contextlib.contextmanager
def load(spec: str, workdir: Path = Path(".sftpipe")) -> Iterator[Loaded]:
    """The model and tokenizer behind `spec` (a models:/ URI, a folder or s3:// prefix); a
    downloaded registered model is deleted again on exit."""
    from sftpipe.modeling import models
    from sftpipe.tracking import registry

    with contextlib.ExitStack() as stack:
        if spec.startswith("models:/"):
            from mlflow.tracking import MlflowClient

            registry.use_local_store(workdir)
            version = registry.resolve(MlflowClient(), spec)
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sftpipe-chat-")))
            pinned = f"models:/{version.name}/{version.version}"
            print(f"[chat] downloading {spec} ({pinned})", file=sys.stderr, flush=True)
            folder, label = registry.download(pinned, tmp), f"{spec} (version {version.version})"
        else:
            folder, label = models.fetch(spec), spec
        if models.is_classifier(folder):
            raise SftpipeError(
                spec,
                "is a text classifier, not a chat model",
                "classify texts with mlflow.pyfunc.load_model(...).predict or mlflow models serve",
            )
        tokenizer = models.load_tokenizer(folder, spec)
        model = models.load_causal_lm(folder, spec)
        model.eval()
        yield Loaded(model, tokenizer, label)


class ChatSession:
    """A multi-turn conversation with one model."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        system: str = "",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
    ) -> None:
        from sftpipe.modeling import lm
        from sftpipe.modeling.generation import context_length, eos_token_ids, generation_dtype

        self.model, self.tokenizer = model, tokenizer
        self.system, self.max_new_tokens, self.temperature = system, max_new_tokens, temperature
        self.stop_ids = eos_token_ids(model, tokenizer)
        self.context = context_length(model) or tokenizer.model_max_length
        self.device = next(model.parameters()).device
        self.dtype = generation_dtype(self.device, lm.autocast_dtype("auto", self.device))
        self.history: list[dict[str, str]] = []
        self.dropped_turns = 0

    def reset(self) -> None:
        self.history = []

    def _messages(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def _encode(self, turns: list[dict[str, str]]) -> list[int]:
        from sftpipe.data.chat_templates import render

        text = render(self.tokenizer, self._messages(turns), add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _fit(self, message: dict[str, str]) -> list[int]:
        """Prompt ids for history + message, dropping the oldest turns to leave room for the
        answer; a message that does not fit on its own is an error."""
        budget = self.context - self.max_new_tokens
        turns = [*self.history, message]
        ids = self._encode(turns)
        while len(ids) > budget and len(turns) > 1:
            turns = turns[2:] if len(turns) > 2 else turns[1:]  # one user+assistant pair
            self.dropped_turns += 1
            ids = self._encode(turns)
        if len(ids) > budget:
            raise SftpipeError(
                "chat",
                f"the prompt is {len(ids)} tokens; with --max-new-tokens {self.max_new_tokens} "
                f"it does not fit the model's context of {self.context} tokens",
                "send a shorter message or lower --max-new-tokens",
            )
        self.history = turns[:-1]
        return ids

    def reply(self, text: str, on_text: Callable[[str], None] = lambda _: None) -> str:
        """Answer `text` given the history; stream the answer's text pieces to `on_text`."""
        import torch
        from transformers import TextIteratorStreamer

        from sftpipe.modeling import lm

        message = {"role": "user", "content": text}
        ids = self._fit(message)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = (
            {"do_sample": True, "temperature": self.temperature}
            if self.temperature > 0
            else {"do_sample": False}
        )
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.no_grad(), lm.autocast(self.device, self.dtype):
                    self.model.generate(
                        input_ids=torch.tensor([ids], device=self.device),
                        attention_mask=torch.ones((1, len(ids)), dtype=torch.long).to(self.device),
                        max_new_tokens=self.max_new_tokens,
                        eos_token_id=self.stop_ids,
                        pad_token_id=self.tokenizer.pad_token_id,
                        streamer=streamer,
                        **sampling,
                    )
            except BaseException as exc:  # re-raised in the caller's thread
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        pieces: list[str] = []
        started, held = False, ""
        for piece in streamer:
            pieces.append(piece)
            # Stream exactly the stripped answer: no leading whitespace, and trailing
            # whitespace only once more text follows it.
            text = held + piece
            if not started:
                text = text.lstrip()
                if not text:
                    continue
                started = True
            shown = text.rstrip()
            held = text[len(shown) :]
            if shown:
                on_text(shown)
        worker.join()
        if failure:
            raise failure[0]
        answer = "".join(pieces).strip()
        self.history += [message, {"role": "assistant", "content": answer}]
        return answer


def converse(
    session: ChatSession,
    stdin: IO[str],
    stdout: IO[str],
    stderr: IO[str],
    interactive: bool,
    label: str = "",
) -> int:
    """The chat loop: returns 0, or 1 when some message could not be answered."""
    failed = 0
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        print(f"Chatting with {label}. {COMMANDS}.", file=stderr, flush=True)

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    while True:
        try:
            line = input("you> ") if interactive else stdin.readline()
        except EOFError:
            break
        if not interactive and not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            if interactive:
                print("(history cleared)", file=stderr, flush=True)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}: {COMMANDS}", file=stderr, flush=True)
            continue
        dropped = session.dropped_turns
        try:
            if interactive:
                write("bot> ")
            session.reply(text, write)
            write("\n")
        except SftpipeError as exc:
            if interactive:
                write("\n")
            print(f"sftpipe: error: {exc}", file=stderr, flush=True)
            failed += 1
        if session.dropped_turns > dropped:
            print(
                "(the oldest turns were dropped to fit the model's context)",
                file=stderr,
                flush=True,
            )
    return 1 if failed else 0


def main(
    model: str,
    system: str = "",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    workdir: Path = Path(".sftpipe"),
) -> int:
    with load(model, workdir) as loaded:
        session = ChatSession(loaded.model, loaded.tokenizer, system, max_new_tokens, temperature)
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
        try:
            return converse(session, sys.stdin, sys.stdout, sys.stderr, interactive, loaded.label)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
