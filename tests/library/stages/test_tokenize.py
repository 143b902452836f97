import json
import random

import pyarrow.parquet as pq
import pytest

from sftpipe.config import TokenizeConfig
from sftpipe.data import chat_encoding
from sftpipe.data.chat_templates import CHATML, Renderer, assistant_spans
from sftpipe.data.tokenized import (
    IGNORE_INDEX,
    read_label_map,
    read_parquet,
    tokenize_conversation,
)
from sftpipe.errors import SftpipeError
from sftpipe.modeling.models import load_tokenizer
from sftpipe.stages import tokenize
from sftpipe.stages.clean import conversation_id

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "你好吗？"},
    {"role": "assistant", "content": "我很好，谢谢。"},
]

# Real templates, as shipped (SmolLM2-135M-Instruct, Llama-3-8B-Instruct), and two other
# common styles. (template, end-of-turn marker after assistant content, handles system)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
INST = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == "
    "'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] "
    "| trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)
TEMPLATES = {
    "chatml": (CHATML, "<|im_end|>", True),
    "smollm2": (SMOLLM2, "<|im_end|>", True),
    "llama3": (LLAMA3, "<|eot_id|>", True),
    "inst": (INST, "</s>", False),
    "gemma": (GEMMA, "<end_of_turn>", False),
}
SPECIAL = [
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|begin_of_text|>",
    "[INST]",
    "[/INST]",
    "<s>",
    "</s>",
    "<start_of_turn>",
    "<end_of_turn>",
]


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir):
    out = {}
    for name, (template, _, _) in TEMPLATES.items():
        tok = load_tokenizer(tiny_model_dir, chat_template=template)
        tok.add_special_tokens({"additional_special_tokens": SPECIAL})
        tok.bos_token, tok.eos_token = "<s>", "</s>"
        out[name] = tok
    return out


def random_conversation(rng, system):
    words = ["hello", "world", "你好", "世界", "2+2", "is", "4.", "谢谢", "code:", "x = 1", "ok"]
    messages = [{"role": "system", "content": "Be brief."}] if system and rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 4)):
        for role in ("user", "assistant"):
            n = rng.randint(1, 8)
            messages.append(
                {"role": role, "content": " ".join(rng.choice(words) for _ in range(n))}
            )
    return messages


def expected_labels(tokenizer, messages, marker):
    """Independent oracle: the rendered text, each assistant content + marker found by string
    search, and the tokens whose offsets start inside those substrings."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, cursor = [], 0
    for message in messages:  # in order, every role: a user turn may repeat an answer
        target = message["content"] + (marker if message["role"] == "assistant" else "")
        at = text.index(target, cursor)
        if message["role"] == "assistant":
            spans.append((at, at + len(target)))
        cursor = at + len(target)
    labels = [
        token if any(a <= start < b for a, b in spans) else IGNORE_INDEX
        for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]
    labels[0] = IGNORE_INDEX
    return encoded["input_ids"], labels


@pytest.mark.parametrize("name", TEMPLATES)
def test_masks_token_by_token_for_real_template_styles(tokenizers, name):
    _, marker, system = TEMPLATES[name]
    tokenizer = tokenizers[name]
    rng = random.Random(name)
    for _ in range(40):
        messages = random_conversation(rng, system)
        row = tokenize_conversation(tokenizer, messages, max_length=4096)
        ids, labels = expected_labels(tokenizer, messages, marker)
        assert row.input_ids == ids
        assert row.labels == labels
        ends = [
            i
            for i, lab in enumerate(row.labels)
            if lab != IGNORE_INDEX
            and (i + 1 == len(row.labels) or row.labels[i + 1] == IGNORE_INDEX)
        ]
        assert [tokenizer.convert_ids_to_tokens(row.input_ids[i]) for i in ends] == [marker] * sum(
            m["role"] == "assistant" for m in messages
        )  # every assistant turn is trained through its end-of-turn token


@pytest.mark.parametrize("name", TEMPLATES)
def test_fast_rendering_equals_jinja(tokenizers, name):
    tokenizer = tokenizers[name]
    renderer = Renderer(tokenizer)
    rng = random.Random(1)
    for _ in range(200):
        messages = random_conversation(rng, TEMPLATES[name][2])
        assert renderer.render(messages) == assistant_spans(tokenizer, messages)
    assert renderer.fast and renderer.fast_rows > 150


def test_chatml_mask_trains_every_assistant_turn_and_its_end_of_turn(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"  # the dangerous case
    row = tokenize_conversation(tokenizer, CONVERSATION, max_length=512)
    runs, current = [], []
    for token, label in zip(row.input_ids, row.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    assert runs == ["4.<|im_end|>", "我很好，谢谢。<|im_end|>"]


def test_template_that_is_not_prefix_stable_is_refused(tiny_model_dir):
    unstable = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer = load_tokenizer(tiny_model_dir, chat_template=unstable)
    with pytest.raises(SftpipeError, match="chat_template"):
        tokenize_conversation(tokenizer, CONVERSATION, max_length=64)


def write_cleaned(path, rows):
    with path.open("w", encoding="utf-8") as handle:
        for i, row in enumerate(rows):
            if isinstance(row, list):
                row = {"id": conversation_id(row), "messages": row}
            handle.write(
                json.dumps(row | {"source": f"x.jsonl:{i + 1}"}, ensure_ascii=False) + "\n"
            )


def run(tmp_path, model, config, rows, **kwargs):
    write_cleaned(tmp_path / "cleaned.jsonl", rows)
    return tokenize.run(
        config,
        str(model),
        tmp_path / "cleaned.jsonl",
        tmp_path / "train.parquet",
        tmp_path / "val.parquet",
        tmp_path / "quarantine.jsonl",
        report_path=tmp_path / "report.html",
        **kwargs,
    )


def chats(n):
    return [
        [
            {"role": "user", "content": f"q{i} " + "please " * (i % 9)},
            {"role": "assistant", "content": f"a{i} " * (1 + i % 5)},
        ]
        for i in range(n)
    ]


def test_packed_train_and_plain_validation(tiny_model_dir, tmp_path):
    long_prompt = [
        {"role": "user", "content": "word " * 300},
        {"role": "assistant", "content": "ok"},
    ]
    rows = [CONVERSATION[1:3], CONVERSATION, long_prompt, *chats(60)]
    config = TokenizeConfig(max_length=64, validation_fraction=0.3)
    report = run(tmp_path, tiny_model_dir, config, rows)
    assert report.quarantined_no_loss_tokens == 1 and report.truncated_rows == 0
    (bad,) = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert bad["reason"] == "no_loss_tokens" and bad["source"] == "x.jsonl:3"
    train, val = read_parquet(tmp_path / "train.parquet"), read_parquet(tmp_path / "val.parquet")
    assert (
        report.train_rows + report.validation_rows
        == 62
        == sum(r["num_samples"] for r in train) + len(val)
    )
    assert len(train) == report.train_file_rows < report.train_rows
    for row in train:
        assert row["messages"] == "" and row["num_tokens"] == len(row["input_ids"]) <= 64
        assert len(row["labels"]) == len(row["position_ids"]) == row["num_tokens"]
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) == row["num_samples"] and starts[0] == 0
        assert all(row["labels"][i] == IGNORE_INDEX for i in starts)
        assert row["num_loss_tokens"] == sum(lab != IGNORE_INDEX for lab in row["labels"]) > 0
    assert set(val[0]) == {"id", "input_ids", "labels", "num_tokens", "num_loss_tokens", "messages"}
    for row in val:
        assert json.loads(row["messages"])[-1]["role"] == "assistant"
        assert row["labels"][0] == IGNORE_INDEX
    assert report.packing_efficiency > report.unpacked_efficiency
    assert "tok loss" in (tmp_path / "report.html").read_text()
    metadata = pq.read_schema(tmp_path / "train.parquet").metadata
    assert b"<|im_start|>" in metadata[b"sftpipe.chat_template"]

    first = (tmp_path / "train.parquet").read_bytes(), (tmp_path / "val.parquet").read_bytes()
    run(tmp_path, tiny_model_dir, config, rows)
    assert first == (
        (tmp_path / "train.parquet").read_bytes(),
        (tmp_path / "val.parquet").read_bytes(),
    )


def test_worker_processes_give_the_bytes_of_one_process(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(chat_encoding, "BATCH", 4)  # 16 batches: enough to start the workers
    rows = [CONVERSATION, *chats(60)]
    config = TokenizeConfig(max_length=64, validation_fraction=0.3)
    outputs = []
    for workers in (1, 2):
        report = run(tmp_path, tiny_model_dir, config, rows, num_workers=workers)
        files = ("train.parquet", "val.parquet", "quarantine.jsonl")
        metrics = report.metrics() | {"seconds": 0}
        outputs.append((metrics, [(tmp_path / f).read_bytes() for f in files]))
    assert outputs[0] == outputs[1]


def test_long_runs_print_progress(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(chat_encoding, "BATCH", 8)
    monkeypatch.setattr(tokenize, "_PROGRESS_SECONDS", 0.0)  # a line after every batch
    run(tmp_path, tiny_model_dir, TokenizeConfig(max_length=64), chats(40), num_workers=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if "MB/s" in line]
    assert len(lines) >= 4 and all(line.startswith("[tokenize] ") for line in lines)
    assert "ETA" in lines[0] and lines[-1].endswith("tokens/s")
    assert "32 conversations" in lines[-1]  # printed before the fifth batch is counted


def test_unpacked_truncation_drop_and_groups(tiny_model_dir, tmp_path):
    grouped = [
        [{"role": "user", "content": f"again {i}"}, {"role": "assistant", "content": "A."}]
        for i in range(20)
    ]
    rows = [{"id": conversation_id(c), "group": "f" * 32, "messages": c} for c in grouped]
    rows += chats(40)
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "long " * 200}]
    rows.append(long)
    config = TokenizeConfig(
        max_length=64, packing=False, truncation="drop", validation_fraction=0.3
    )
    report = run(tmp_path, tiny_model_dir, config, rows)
    assert report.dropped_too_long == 1
    train, val = read_parquet(tmp_path / "train.parquet"), read_parquet(tmp_path / "val.parquet")
    assert len(train) == report.train_rows and "position_ids" not in train[0]
    group_ids = {r["id"] for r in rows[:20]}
    sides = {("val" if r in val else "train") for r in train + val if r["id"] in group_ids}
    assert len(sides) == 1  # one duplicate group, one side of the split
    report = run(
        tmp_path, tiny_model_dir, config.model_copy(update={"truncation": "truncate"}), rows
    )
    assert report.truncated_rows == 1 and report.dropped_too_long == 0


def test_tiny_data_still_gets_a_validation_row(tiny_model_dir, tmp_path):
    report = run(
        tmp_path,
        tiny_model_dir,
        TokenizeConfig(validation_fraction=0.01),
        [CONVERSATION[1:3], CONVERSATION],
    )
    assert (report.train_rows, report.validation_rows) == (1, 1)


def test_a_template_that_never_stops_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(SftpipeError, match="'<\\|eot_id\\|>', which does not stop generation"):
        run(tmp_path, tiny_model_dir, TokenizeConfig(chat_template="llama3"), chats(4))
    with pytest.raises(SftpipeError, match="neither a Jinja template nor a known name"):
        run(tmp_path, tiny_model_dir, TokenizeConfig(chat_template="vicuna"), chats(4))
    report = run(tmp_path, tiny_model_dir, TokenizeConfig(chat_template="plain"), chats(10))
    assert report.loss_tokens > 0  # plain ends turns with the tokenizer's EOS


def test_classification_rows_label_map_and_stratified_split(tiny_model_dir, tmp_path):
    rows = []
    for i in range(40):
        label = ["neg", "pos", "neutral"][i % 3] if i < 39 else "odd"
        text = f"review {i}: " + ("good" if label == "pos" else "bad") * (1 + i % 3)
        rows.append(
            {
                "id": f"{i:032x}",
                "group": f"{(i * 7919) % 10**6:032x}",
                "label": label,
                "lang": "en",
                "text": text,
            }
        )
    config = TokenizeConfig(max_length=16, validation_fraction=0.25)
    report = run(tmp_path, tiny_model_dir, config, rows, label_map="neg,pos,neutral")
    assert report.task == "classification" and report.unknown_labels == 1
    train, val = read_parquet(tmp_path / "train.parquet"), read_parquet(tmp_path / "val.parquet")
    assert set(train[0]) == {"id", "input_ids", "label", "num_tokens", "text"}
    assert read_label_map(tmp_path / "train.parquet") == {"neg": 0, "pos": 1, "neutral": 2}
    assert read_label_map(tmp_path / "val.parquet") == report.label_map
    per_label = {label: sum(r["label"] == label for r in val) for label in range(3)}
    assert per_label == {0: 3, 1: 3, 2: 3}  # round(0.25 x 13) of each label
    assert all(r["num_tokens"] <= 16 for r in train + val)
    report = run(tmp_path, tiny_model_dir, config, rows[:39])
    assert report.label_map == {"negative": 0} or report.label_map == {
        "neg": 0,
        "neutral": 1,
        "pos": 2,
    }


def test_classification_with_an_encoder_that_has_no_chat_template(tmp_path):
    """The sentiment demo's MiniLM (a real WordPiece tokenizer without a chat template)."""
    from sftpipe.apps.demo_sentiment import encoder_dir

    rows = [
        {
            "id": f"{i:032x}",
            "group": f"{i:032x}",
            "label": ["差", "好"][i % 2],
            "text": f"第{i}本书很好",
        }
        for i in range(10)
    ]
    report = run(tmp_path, encoder_dir(), TokenizeConfig(max_length=16), rows)
    assert report.task == "classification" and report.chat_template == ""
    written = read_parquet(tmp_path / "train.parquet") + read_parquet(tmp_path / "val.parquet")
    assert written[0]["input_ids"][0] == 101 and written[0]["input_ids"][-1] == 102  # [CLS] [SEP]
    # An English WordPiece vocabulary lacks some of these characters: counted, and loud.
    unknown = sum(row["input_ids"].count(100) for row in written)  # 100: [UNK]
    assert report.unknown_tokens == unknown > 0
    assert report.metrics()["unknown_token_fraction"] == unknown / report.tokens
    assert "vocabulary does not cover this text" in report.unknown_token_warning()
    assert "Warning:" in (tmp_path / "report.html").read_text()
