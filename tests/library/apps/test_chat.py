"""`sftpipe chat` with the tiny model: streaming, history, /reset, the context limit, stdin."""

import io
import shutil

import pytest

from sftpipe.apps import chat, cli
from sftpipe.errors import SftpipeError
from sftpipe.modeling import models


@pytest.fixture(scope="module")
def session(tiny_model_dir):
    model = models.load_causal_lm(tiny_model_dir)
    tokenizer = models.load_tokenizer(tiny_model_dir)
    return chat.ChatSession(model, tokenizer, system="Be brief.", max_new_tokens=8)


def test_streams_the_answer_and_keeps_history(session):
    session.reset()
    streamed = []
    answer = session.reply("Hello, how are you?", streamed.append)
    assert "".join(streamed) == answer == answer.strip()
    session.reply("What is your name?")
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    # The system prompt leads every prompt; it is not part of the history.
    prompt = session.tokenizer.decode(session._encode(session.history))
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    session.reset()
    assert session.history == []


def test_context_limit_drops_old_turns_then_refuses(session):
    session.reset()
    long_turn = " ".join(["weather"] * 150)  # ~150 tokens of a 512-token context
    for _ in range(3):
        session.history += [
            {"role": "user", "content": long_turn},
            {"role": "assistant", "content": "ok"},
        ]
    dropped = session.dropped_turns
    session.reply("And now?")
    assert session.dropped_turns > dropped and len(session.history) < 8
    with pytest.raises(SftpipeError, match="does not fit the model's context of 512 tokens"):
        session.reply(" ".join(["weather"] * 600))


def test_scripted_through_stdin(tiny_model_dir, monkeypatch, capsys):
    script = "Hello\n\n/reset\n/unknown\n" + "word " * 600 + "\nBye\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    code = cli.main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "4"])
    out = capsys.readouterr()
    assert code == 1  # one message could not be answered
    errors = [line for line in out.err.splitlines() if line.startswith("sftpipe: error:")]
    assert len(errors) == 1 and "chat: the prompt is" in errors[0]
    assert "unknown command /unknown" in out.err
    assert "you>" not in out.out  # no prompts when scripted


def test_model_folder_without_tokenizer_is_one_line(tiny_model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    for file in bare.glob("tokenizer*"):
        file.unlink()
    assert cli.main(["chat", "--model", str(bare)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sftpipe: error: {bare}: no tokenizer files") and "\n" not in err
