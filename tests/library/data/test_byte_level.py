"""`sftpipe.data.byte_level` against the Rust tokenizer it stands in for.

`ByteLevelEncoder` must give exactly the ids and character offsets of
`backend_tokenizer.encode_batch(texts, add_special_tokens=False)` (labels come from the
offsets), or refuse the tokenizer (`for_tokenizer` -> None). The tests compare the two on
random text over every ASCII character, added tokens and non-ASCII pieces, on random
Chinese text (split per character in Python, see `_cjk_chunker`), on the label ranges of
real chat templates, with trimmed offsets, and through the tokenize stage, whose
output must not depend on the encoder at all. Nothing is mocked: the tokenizers are the
tiny trained one of the fixtures and SmolLM2's real one (from the GGUF of the demo package).
"""

from __future__ import annotations

import copy
import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
from bench.bench_data import tokenizer_dir
from fixtures.tiny_model import default_corpus
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import processors as post_processors
from transformers import PreTrainedTokenizerFast

from sftpipe.config import TokenizeConfig
from sftpipe.data import chat_encoding
from sftpipe.data.byte_level import (
    _CJK_PUNCTUATION,
    _CJK_WORD,
    ByteLevelEncoder,
    _byte_level,
    _cjk_chunker,
)
from sftpipe.data.chat_templates import CHATML, Renderer, token_ranges
from sftpipe.modeling.models import load_tokenizer
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


def rust_and_fast(
    tokenizer: Any, texts: list[str], encoder: ByteLevelEncoder | None = None
) -> tuple[list[Any], list[Any]]:
    """Both encodings of every text (the encoder must accept the tokenizer; or `encoder`, the
    tokenizer's, is given)."""
    encoder = encoder or ByteLevelEncoder.for_tokenizer(tokenizer)
    assert encoder is not None
    rust = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    fast = encoder.encode_batch(texts)
    assert len(fast) == len(texts)
    return rust, fast


def assert_encodes_like_rust(
    tokenizer: Any, texts: list[str], encoder: ByteLevelEncoder | None = None
) -> None:
    rust, fast = rust_and_fast(tokenizer, texts, encoder)
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


# Chinese text: pieces of ASCII, the CJK ideographs U+4E00-U+9FEF and `_CJK_PUNCTUATION` are
# split in Python, and CJK words encoded per character (`_cjk_chunker`) except where a token
# of the vocabulary crosses from one character into the next.
IDEOGRAPHS = range(0x4E00, 0x9FF0)
# SmolLM2's tokens that cross characters: "一个", "文件", "数据" (bytes ...0x80|0xE4...,
# ...0x87|0xE4..., ...0xB0|0xE6...), and a space before a lead byte 0xE5-0xE9 (" 数", not " 一").
CJK_WORDS = ["一个", "一一", "一一一", "文件", "数据", "数据文件", "一个人", " 一个", " 数据"]
CJK_WORDS += [" 中", " 一", "中文", "你好", "世界", "鿯", "今天天气很好", "不客气", "机器学习"]
# The tiny tokenizer learned these (so many of its tokens cross characters).
CJK_WORDS += [line for line in default_corpus() if not line.isascii()][::7]
MIXED = ["abc中文", "中文abc", " 中", "中 文", "中  文", "中\n文", "中\n\n 文", "2024年", "第3章"]
MIXED += ["中's", "中'S", "你好, world!", "x中", "中1", " 中。", "。中", "“hi”", "(中)", "中\t"]
# Just outside the known characters (assigned after Unicode 11, extension A, the ideographic
# space, a full-width digit and letter): their pieces go to the Rust tokenizer.
OUTSIDE = ["\u9ff0", "\u9ffc", "\u9fff", "\u3400", "\u3000", "\uff10", "\uff21"]

JOINING_FIRSTS = [chr(c) for c in IDEOGRAPHS if c & 0x3F in (0x00, 0x07, 0x30)]
JOINING_SECONDS = [chr(c) for c in (*range(0x4E00, 0x5000), *range(0x6000, 0x7000))]


def joining_pair(rng: random.Random) -> str:
    """Two ideographs that SmolLM2's chunker keeps together: the first ends in byte 0x80,
    0x87 or 0xB0, the second starts with byte 0xE4 (U+4E00-U+4FFF) or 0xE6 (U+6000-U+6FFF)."""
    return rng.choice(JOINING_FIRSTS) + rng.choice(JOINING_SECONDS)


def random_cjk_text(rng: random.Random, specials: list[str]) -> str:
    """Runs of random ideographs (with or without a space before), joining pairs, words,
    full-width punctuation, ASCII, added tokens and now and then a character just outside
    the known ones, in random order."""
    pieces = []
    for _ in range(rng.randint(1, 16)):
        kind = rng.random()
        if kind < 0.3:
            run = "".join(chr(rng.choice(IDEOGRAPHS)) for _ in range(rng.randint(1, 6)))
            pieces.append(rng.choice(["", " "]) + run)
        elif kind < 0.4:
            pieces.append(rng.choice(["", " "]) + joining_pair(rng))
        elif kind < 0.55:
            pieces.append(rng.choice(CJK_WORDS))
        elif kind < 0.7:
            punctuation = "".join(rng.choices(_CJK_PUNCTUATION, k=rng.randint(1, 3)))
            pieces.append(rng.choice(["", " ", "\n"]) + punctuation)
        elif kind < 0.8:
            pieces.append(rng.choice(MIXED))
        elif kind < 0.88:
            pieces.append(rng.choice(ASCII_PIECES))
        elif kind < 0.96:
            pieces.append("".join(rng.choices(specials, k=rng.randint(1, 2))))
        else:
            pieces.append(rng.choice(OUTSIDE))
    return "".join(pieces)


def random_cjk_texts(tokenizer: Any, count: int, seed: int) -> list[str]:
    """`count` random Chinese texts after the edge cases: each punctuation mark alone, after
    a space and between ideographs, each outside character alone and between ideographs,
    every word and mixed piece alone."""
    specials = added_contents(tokenizer)
    edge = [*_CJK_PUNCTUATION, _CJK_PUNCTUATION, " " + _CJK_PUNCTUATION, *CJK_WORDS, *MIXED]
    edge += [f"{s}中{p}文" for s, p in zip(itertools.cycle(["", " "]), _CJK_PUNCTUATION)]
    edge += [*OUTSIDE, *(f"中{c}文" for c in OUTSIDE), *(f" {c} 一个" for c in OUTSIDE)]
    edge += [f"{specials[0]}你好{specials[-1]}。{specials[0]}", "".join(OUTSIDE)]
    rng = random.Random(seed)
    return edge + [random_cjk_text(rng, specials) for _ in range(count)]


class CountingBackend:
    """The Rust backend of an encoder, noting what the encoder sends it: the texts of
    `encode_batch` (the pieces it leaves to Rust) and of `encode` (pre-tokens and chunks
    missing from its cache)."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.batched, self.encoded = backend, [], []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def encode_batch(self, texts: list[str], **kwargs: Any) -> Any:
        self.batched += texts
        return self.backend.encode_batch(texts, **kwargs)

    def encode(self, text: str, **kwargs: Any) -> Any:
        self.encoded.append(text)
        return self.backend.encode(text, **kwargs)


def counting_encoder(tokenizer: Any) -> tuple[ByteLevelEncoder, CountingBackend]:
    encoder = ByteLevelEncoder.for_tokenizer(tokenizer)
    assert encoder is not None
    encoder.backend = counting = CountingBackend(encoder.backend)
    return encoder, counting


@pytest.mark.parametrize("name", ["tiny", "tiny_trimmed", "smollm2"])
def test_chinese_text_encodes_as_in_rust(request, name):
    tokenizer = request.getfixturevalue(name)
    encoder, counting = counting_encoder(tokenizer)
    assert_encodes_like_rust(tokenizer, random_cjk_texts(tokenizer, 1000, seed=5), encoder)
    # Only the pieces with a character outside the known ones went to Rust whole...
    assert set(OUTSIDE) <= set("".join(counting.batched))
    assert all(any(c in piece for c in OUTSIDE) for piece in counting.batched)
    # ... the others were chunked: single ideographs, and characters kept together.
    chunks = [word.lstrip(" ") for word in encoder.cache if _CJK_WORD(word)]
    assert sum(len(chunk) == 1 for chunk in chunks) > 1000
    assert sum(len(chunk) > 1 for chunk in chunks) > 10


def test_smollm2_encodes_chinese_in_python(smollm2):
    """Chinese pieces do not go to Rust whole (where ids and offsets would be right whatever
    the chunker does): Rust sees each new chunk alone, once, and nothing on a second pass."""
    encoder, counting = counting_encoder(smollm2)
    texts = ["你好，世界！我们今天学习机器学习。", "<|im_start|> 数据文件一个“引用”（注意：）"]
    first = encoder.encode_batch(texts)
    assert not counting.batched
    chunks = ["你", "好", "，", "世", "界", "！", "我", "们", "今", "天", "学", "习", "机", "器"]
    chunks += ["。", " 数据", "文件", "一个", "“", "引", "用", "”（", "注", "意", "：）"]
    assert counting.encoded == chunks
    assert encoder.encode_batch(texts)[0].ids == first[0].ids and counting.encoded == chunks
    rust = smollm2.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    assert [difference(f, r, t) for f, r, t in zip(first, rust, texts, strict=True)] == [None] * 2


def byte_level(raw: bytes) -> str:
    """A vocabulary token (GPT-2's byte-level characters) for these bytes."""
    return "".join(map(_byte_level().__getitem__, raw))


def test_the_cjk_chunker_splits_between_characters_that_no_token_crosses():
    # 中 = E4 B8 AD, 文 = E6 96 87, 字 = E5 AD 97, 一 = E4 B8 80, 乭 = E4 B9 AD, 时 = E6 97 B6.
    single_bytes = [byte_level(bytes([b])) for b in range(256)]
    inside = [byte_level("中".encode()), byte_level("文".encode()[1:]), "中文", "<|im|>"]
    chunks = _cjk_chunker(single_bytes + inside)  # "中文" is not byte-level: an added token
    assert chunks(" 中文字") == [" ", "中", "文", "字"]
    assert chunks("中") == ["中"] and chunks(" 一一") == [" ", "一", "一"]
    assert chunks("鿯一") == ["鿯", "一"]

    # A token holding the last byte of 中 (0xAD) then a lead byte 0xE6: every character ending
    # in 0xAD stays with a next one starting with 0xE6 (U+6000-U+6FFF), and only those.
    crossing = _cjk_chunker([*single_bytes, byte_level(b"\xad\xe6\x96")])
    assert crossing("一中文字") == ["一", "中文", "字"]
    assert crossing(" 乭时中文中") == [" ", "乭时", "中文", "中"]
    assert crossing("文中字中") == ["文", "中", "字", "中"]
    # Chains: 文 ends in 0x87, 中 starts with 0xE4.
    chained = _cjk_chunker([byte_level(b"\xad\xe6"), byte_level(b"\x87\xe4")])
    assert chained("一中文中文字") == ["一", "中文中文", "字"]

    # A space then a lead byte: the space stays with a character that starts with it.
    spaced = _cjk_chunker([*single_bytes, byte_level(b" \xe4")])
    assert spaced(" 中文") == [" 中", "文"] and spaced(" 文中") == [" ", "文", "中"]


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
    """English and Chinese conversations, seeded: Chinese words with or without spaces between,
    with full-width punctuation, characters kept together ("一个", " 数据", "文件") and a
    full-width digit (outside the known characters: that message goes to Rust whole)."""
    rng = random.Random(4)
    english = ["hello", "world", "the", "cat's", "don't", "2+2", "is", "4.", "code:", "x = 1"]
    chinese = ["你好", "世界", "谢谢", "机器学习", "今天天气很好。", "，", "一个", "数据文件"]
    chinese += ["“引用”", "（注意）", "《书名》", "吗？", "好！", "如下：", "甲；乙", "一、"]
    chinese += ["‘单引号’", "2024年", "AI模型", "（见图１）"]
    out = []
    for _ in range(count):
        words = chinese if rng.random() < 0.3 else english
        join = "".join if words is chinese and rng.random() < 0.5 else " ".join
        out.append(
            [
                {"role": role, "content": join(rng.choices(words, k=rng.randint(1, 12)))}
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
    request, tmp_path, monkeypatch, capsys, model
):
    model_dir = request.getfixturevalue(model)
    monkeypatch.delitem(chat_encoding.WORKER, "warned", raising=False)  # warned once per process
    capsys.readouterr()
    fast = stage_output(tmp_path / "fast", model_dir)
    assert chat_encoding.WORKER["byte_level"] is not None  # the encoder did the work
    assert "disagrees" not in capsys.readouterr().out  # (and agreed with Rust on its probes)
    rust_only(monkeypatch)
    assert stage_output(tmp_path / "rust", model_dir) == fast
    assert chat_encoding.WORKER["byte_level"] is None


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
    monkeypatch.delitem(chat_encoding.WORKER, "warned", raising=False)  # warned once per process
    capsys.readouterr()
    assert stage_output(tmp_path / "patched", tiny_model_dir) == expected
    assert "[tokenize] WARNING: the fast byte-level encoder disagrees" in capsys.readouterr().out
