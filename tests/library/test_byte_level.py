"""`sftpipe.byte_level` against the Rust tokenizer it stands in for.

`ByteLevelEncoder` must give exactly the ids and character offsets of
`backend_tokenizer.encode_batch(texts, add_special_tokens=False)` (labels come from the
offsets), or refuse the tokenizer (`for_tokenizer` -> None). The tests compare the two on
random text over every ASCII character, added tokens and non-ASCII pieces, on the label
ranges of real chat templates, with trimmed offsets, and through the tokenize stage, whose
output must not depend on the encoder at all. Nothing is mocked: the tokenizers are the
tiny trained one of the fixtures and SmolLM2's real one (from the GGUF of the demo package).
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
from bench.bench_data import tokenizer_dir
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import processors as post_processors
from transformers import PreTrainedTokenizerFast

from sftpipe.byte_level import ByteLevelEncoder
from sftpipe.chat_templates import CHATML, Renderer, token_ranges
from sftpipe.config import TokenizeConfig
from sftpipe.models import load_tokenizer
from sftpipe.stages import tokenize
from sftpipe.stages.clean import conversation_id

ASCII = [chr(code) for code in range(128)]
# Pieces the regex treats specially, so that random text hits them often: contractions (and
# near misses), whitespace runs before words and at the end, digits, punctuation runs, and
# controls (\x0b and \x0c are whitespace to the regex; \x1c-\x1f are not, though Python's
# isspace says they are).
ASCII_PIECES = [
    *["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'x", "''", "n't", " 's", "'"],
    *[" hello", "hello", " world", "I'm", " don't", " they're", " we'll", " it's", " The"],
    *[" 2024", "3.14", "1,000,000", " 42", "x2", "...", "?!", " --", "()", "]]>", " ;)"],
    *["\r\n", "\n\n", "\n", "   ", "  ", " \t ", "\t", " \n ", "\x0b\x0c", "\x0b ", "\x0c\n"],
    *["\x1c\x1d\x1e\x1f", " \x1c", "\x1f ", "\x7f", " \x7f", "\x00", " \x00 "],
]
# Non-ASCII pieces go to the Rust tokenizer; what matters is where they meet ASCII pieces.
NON_ASCII = [
    *["你好", "世界。", "机器学习", "😀", "👍🏽", "\xa0", " \xa0 ", "\x85", "\u2028", "\u3000"],
    *["e\u0301", "café", "！", "，", "（）", "ｈｅｌｌｏ", "\ufb01", "\u200b"],
]
INST = (  # "[INST] " ends with a space before the content, and so does " [/INST] "
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST] ' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# Added to a copy of the tiny tokenizer: overlapping tokens (at one position the longest
# wins, and an earlier start beats a longer match), tokens with whitespace at their ends and
# one of whitespace only (trimmed by the ByteLevel post-processor: \x1c-\x1f are not
# whitespace to Rust, \u3000 and \x85 are), and a non-special one.
EXTRA_SPECIAL = ["[INST]", "[/INST]", "<|im", "|>\n<", " <sp> ", "\n\n\n"]
EXTRA_SPECIAL += ["\x1c<fs>\x1f", "\u3000<wide>\x85"]
EXTRA_PLAIN = ["<tool>"]


def changed(tokenizer: Any, change: Any = None, **backend_attributes: Any) -> Any:
    """A deep copy of a transformers tokenizer with its Rust backend changed (shared
    fixtures stay as they are)."""
    tokenizer = copy.deepcopy(tokenizer)
    backend = tokenizer.backend_tokenizer
    for name, value in backend_attributes.items():
        setattr(backend, name, value)
    if change is not None:
        change(backend)
    return tokenizer


def with_template(tokenizer: Any, template: str) -> Any:
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


def add_extra_tokens(backend: Any) -> None:
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in EXTRA_SPECIAL]
    )
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_PLAIN])


TRIMMING = post_processors.ByteLevel(trim_offsets=True, add_prefix_space=False)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_added(tiny):
    return changed(tiny, add_extra_tokens)


@pytest.fixture(scope="module")
def tiny_trimmed(tiny_added):
    """Offsets trimmed of spaces by the post-processor (GPT-2 and RoBERTa-style tokenizers)."""
    return changed(tiny_added, post_processor=TRIMMING)


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer (about 5 s to read from the GGUF)."""
    return tokenizer_dir(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def added_contents(tokenizer: Any) -> list[str]:
    return [t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()]


def random_text(rng: random.Random, specials: list[str]) -> str:
    """Random ASCII characters, regex-relevant pieces, runs of 1-3 added tokens with nothing
    between, and non-ASCII pieces, in random order."""
    pieces = []
    for _ in range(rng.randint(1, 16)):
        kind = rng.random()
        if kind < 0.35:
            pieces.append("".join(rng.choices(ASCII, k=rng.randint(1, 8))))
        elif kind < 0.75:
            pieces.append(rng.choice(ASCII_PIECES))
        elif kind < 0.9:
            pieces.append("".join(rng.choices(specials, k=rng.randint(1, 3))))
        else:
            pieces.append(rng.choice(NON_ASCII))
    return "".join(pieces)


# Bytes that SmolLM2's vocabulary lacks (\x04 \x06 \x13 \x14 \x16 \x1d): its BPE model drops
# them, a pre-token of them alone has no token, and Rust's offsets around them are its own.
MISSING_BYTES = ["a\x04 b", "\x04", "\x13+\x1b", "x\x04!?", "!\x06!", " \x14\x16\x1d "]


def random_texts(tokenizer: Any, count: int, seed: int = 0) -> list[str]:
    """`count` random texts that together contain every ASCII character, after the edge cases:
    empty, added tokens only, every ASCII character in one text, missing bytes."""
    specials = added_contents(tokenizer)
    edge = ["", specials[0], "".join(specials), "".join(ASCII), " " + "".join(reversed(ASCII))]
    rng = random.Random(seed)
    texts = [random_text(rng, specials) for _ in range(count)]
    assert set(ASCII) <= set("".join(texts))
    return edge + MISSING_BYTES + texts


def difference(fast: Any, rust: Any, text: str) -> str | None:
    """The first way the two encodings of `text` differ, in words; None when they agree on
    the ids, every token's character offsets and every character's token."""
    if fast.ids != rust.ids:
        return f"ids {fast.ids} != Rust {rust.ids}"
    checks = [("token_to_chars", token) for token in range(len(rust.ids))]
    checks += [("char_to_token", char) for char in range(len(text) + 1)]  # past the end: None
    for method, index in checks:
        mine, reference = getattr(fast, method)(index), getattr(rust, method)(index)
        if mine != reference:
            return f"{method}({index}) = {mine} != Rust {reference}"
    return None


def rust_and_fast(tokenizer: Any, texts: list[str]) -> tuple[list[Any], list[Any]]:
    """Both encodings of every text (the encoder must accept the tokenizer)."""
    encoder = ByteLevelEncoder.for_tokenizer(tokenizer)
    assert encoder is not None
    rust = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    fast = encoder.encode_batch(texts)
    assert len(fast) == len(texts)
    return rust, fast


def assert_encodes_like_rust(tokenizer: Any, texts: list[str]) -> None:
    rust, fast = rust_and_fast(tokenizer, texts)
    failures = [
        (text, problem)
        for text, f, r in zip(texts, fast, rust, strict=True)
        if (problem := difference(f, r, text)) is not None
    ]
    assert not failures, (
        f"{len(failures)} of {len(texts)} texts differ; first {failures[0][0]!r}: {failures[0][1]}"
    )


@pytest.mark.parametrize("name", ["tiny", "tiny_added", "smollm2"])
def test_every_ascii_character_encodes_as_in_rust(request, name):
    tokenizer = request.getfixturevalue(name)
    assert_encodes_like_rust(tokenizer, random_texts(tokenizer, 1500))


def test_trimmed_offsets_encode_as_in_rust(tiny_trimmed):
    encoder = ByteLevelEncoder.for_tokenizer(tiny_trimmed)
    assert encoder is not None and encoder.trim_offsets
    # The post-processor is in effect: the space before "hello" is in no token's offsets.
    rust = tiny_trimmed.backend_tokenizer.encode("a hello", add_special_tokens=False)
    assert rust.char_to_token(1) is None and rust.token_to_chars(rust.char_to_token(2))[0] == 2
    assert_encodes_like_rust(tiny_trimmed, random_texts(tiny_trimmed, 1500, seed=1))


def test_a_sequence_of_the_byte_level_pre_tokenizer_alone_encodes_as_in_rust(tiny):
    sequence = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer = changed(tiny, pre_tokenizer=sequence)
    assert_encodes_like_rust(tokenizer, random_texts(tokenizer, 200, seed=2))


def random_conversation(rng: random.Random) -> list[dict[str, str]]:
    """1-4 exchanges of random text without added tokens, some with spaces at their ends
    (where templates put a space before the content, the first token straddles the span)."""
    messages = []
    for _ in range(rng.randint(1, 4)):
        for role in ("user", "assistant"):
            content = random_text(rng, [""])
            if rng.random() < 0.3:
                content = rng.choice([" ", "\n", "  "]) + content + rng.choice(["", " "])
            messages.append({"role": role, "content": content})
    return messages


def starts_before(encoding: Any, char: int) -> bool:
    """Whether the token at `char` starts before it."""
    token = encoding.char_to_token(char)
    return token is not None and encoding.token_to_chars(token)[0] < char


@pytest.mark.parametrize(
    ("name", "template"),
    [
        ("tiny", CHATML),
        ("smollm2", None),  # SmolLM2's own template (ChatML with a default system prompt)
        ("smollm2", INST),  # "[INST]" is text here
        ("tiny_added", INST),  # and an added token here
        ("tiny_trimmed", INST),  # the space before the content is trimmed off the token
    ],
)
def test_label_ranges_of_real_templates_equal_rusts(request, name, template):
    tokenizer = request.getfixturevalue(name)
    if template is not None:
        tokenizer = with_template(tokenizer, template)
    renderer = Renderer(tokenizer)
    rng = random.Random(3)
    rendered = [renderer.render(random_conversation(rng)) for _ in range(150)]
    rust, fast = rust_and_fast(tokenizer, [text for text, _ in rendered])
    straddling = 0
    for (text, spans), r, f in zip(rendered, rust, fast, strict=True):
        assert token_ranges(f, spans) == token_ranges(r, spans), text
        straddling += sum(starts_before(r, start) for start, _ in spans)
    if template == INST and name != "tiny_trimmed":  # (trimming takes the space off)
        assert straddling  # the case where token_ranges skips the first token did occur


def test_the_encoder_refuses_a_prefix_space_on_the_trimming_post_processor(tiny):
    prefix_space = post_processors.ByteLevel(trim_offsets=True, add_prefix_space=True)
    assert ByteLevelEncoder.for_tokenizer(changed(tiny, post_processor=prefix_space)) is None


def bert_style() -> PreTrainedTokenizerFast:
    """A tiny WordPiece tokenizer set up as BERT's (normalizer, pre-tokenizer, ## prefix)."""
    vocab = {t: i for i, t in enumerate(["[UNK]", "[CLS]", "[SEP]", "hello", "world", "##s"])}
    backend = RustTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def word_piece_like_gpt2(tiny: Any) -> Any:
    """WordPiece with everything else as the tiny tokenizer's: only the model differs."""
    spec = json.loads(tiny.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    spec["model"] = {"type": "WordPiece", "unk_token": "<|endoftext|>", "vocab": vocab}
    spec["model"] |= {"continuing_subword_prefix": "##", "max_input_chars_per_word": 100}
    return PreTrainedTokenizerFast(tokenizer_object=RustTokenizer.from_str(json.dumps(spec)))


LLAMA3_SPLIT = Regex(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def added(token: AddedToken) -> Any:
    return lambda backend: backend.add_tokens([token])


REFUSED = {  # a change of the tiny tokenizer -> a tokenizer the encoder must refuse
    "nfkc": lambda t: changed(t, normalizer=normalizers.NFKC()),
    "metaspace": lambda t: changed(t, pre_tokenizer=pre_tokenizers.Metaspace()),
    "llama3-split": lambda t: changed(
        t,
        pre_tokenizer=pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(LLAMA3_SPLIT, behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
    ),
    "prefix-space": lambda t: changed(
        t, pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=True)
    ),
    "truncation": lambda t: changed(t, lambda backend: backend.enable_truncation(16)),
    "padding": lambda t: changed(t, lambda backend: backend.enable_padding(length=16)),
    "lstrip": lambda t: changed(t, added(AddedToken("<l>", lstrip=True))),
    "rstrip": lambda t: changed(t, added(AddedToken("<r>", rstrip=True))),
    # A normalized added token among the others (not normalized): Rust splits at those first,
    # wherever the normalized ones are (next test), unlike one longest-leftmost pass.
    "normalized-added-token": lambda t: changed(t, added(AddedToken("ab", normalized=True))),
    "word-piece": word_piece_like_gpt2,
    "bert": lambda t: bert_style(),
}


@pytest.mark.parametrize("variant", list(REFUSED.values()), ids=list(REFUSED))
def test_the_encoder_refuses_pipelines_it_does_not_reproduce(tiny, variant):
    assert ByteLevelEncoder.for_tokenizer(tiny) is not None  # only the change refuses it
    assert ByteLevelEncoder.for_tokenizer(variant(tiny)) is None


def test_rust_splits_non_normalized_added_tokens_first(tiny):
    """Why mixed normalized and non-normalized added tokens are refused (above): Rust takes
    "bc" (not normalized) in "abc" although the normalized "ab" starts first."""
    tokenizer = changed(tiny, added(AddedToken("ab", normalized=True)))
    tokenizer = changed(tokenizer, added(AddedToken("bc", normalized=False)))
    rust = tokenizer.backend_tokenizer.encode("abc", add_special_tokens=False)
    assert rust.tokens[-1] == "bc"


def conversations(count: int) -> list[list[dict[str, str]]]:
    """English and Chinese conversations, seeded."""
    rng = random.Random(4)
    english = ["hello", "world", "the", "cat's", "don't", "2+2", "is", "4.", "code:", "x = 1"]
    chinese = ["你好", "世界", "谢谢", "机器学习", "今天天气很好。", "，"]
    out = []
    for _ in range(count):
        words = chinese if rng.random() < 0.3 else english
        out.append(
            [
                {"role": role, "content": " ".join(rng.choices(words, k=rng.randint(1, 12)))}
                for _ in range(rng.randint(1, 3))
                for role in ("user", "assistant")
            ]
        )
    return out


def stage_output(folder: Path, model_dir: Path) -> tuple[bytes, bytes]:
    """The tokenize stage's train and validation Parquet bytes for `conversations(40)`, in
    this process (one worker: `parallel.ordered_map` then calls `_encode_batch` here, where
    the tests' patches apply)."""
    folder.mkdir()
    cleaned = folder / "cleaned.jsonl"
    with cleaned.open("w", encoding="utf-8") as handle:
        for i, messages in enumerate(conversations(40)):
            row = {"id": conversation_id(messages), "messages": messages, "source": f"x:{i}"}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    config = TokenizeConfig(max_length=128, validation_fraction=0.3)
    outputs = [folder / "train.parquet", folder / "val.parquet"]
    report = tokenize.run(
        config, str(model_dir), cleaned, *outputs, folder / "bad.jsonl", num_workers=1
    )
    assert report.train_rows and report.validation_rows
    return outputs[0].read_bytes(), outputs[1].read_bytes()


def rust_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ByteLevelEncoder, "for_tokenizer", classmethod(lambda cls, tok: None))


@pytest.mark.parametrize("model", ["tiny_model_dir", "smollm2_dir"])
def test_the_stage_writes_the_same_bytes_with_and_without_the_encoder(
    request, tmp_path, monkeypatch, model
):
    model_dir = request.getfixturevalue(model)
    fast = stage_output(tmp_path / "fast", model_dir)
    assert tokenize._WORKER["byte_level"] is not None  # the encoder did the work
    rust_only(monkeypatch)
    assert stage_output(tmp_path / "rust", model_dir) == fast
    assert tokenize._WORKER["byte_level"] is None


def test_a_disagreeing_encoder_falls_back_to_rust(tiny_model_dir, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        rust_only(patch)
        expected = stage_output(tmp_path / "rust", tiny_model_dir)
    encode_batch = ByteLevelEncoder.encode_batch

    def off_by_one(self: ByteLevelEncoder, texts: list[str]) -> list[Any]:
        encodings = encode_batch(self, texts)
        encodings[0].ids[0] += 1
        return encodings

    monkeypatch.setattr(ByteLevelEncoder, "encode_batch", off_by_one)
    monkeypatch.delitem(tokenize._WORKER, "warned", raising=False)  # warned once per process
    capsys.readouterr()
    assert stage_output(tmp_path / "patched", tiny_model_dir) == expected
    assert "[tokenize] WARNING: the fast byte-level encoder disagrees" in capsys.readouterr().out
