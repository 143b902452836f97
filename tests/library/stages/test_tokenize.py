import json

import pytest

from sftpipe.config import TokenizeConfig
from sftpipe.errors import SftpipeError
from sftpipe.models import load_tokenizer
from sftpipe.stages import tokenize
from sftpipe.stages.clean import conversation_id
from sftpipe.stages.tokenize import IGNORE_INDEX, read_parquet, tokenize_conversation

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "你好吗？"},
    {"role": "assistant", "content": "我很好，谢谢。"},
]

LLAMA3_STYLE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{{ m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def labeled_runs(tokenizer, row):
    """Decoded text of each contiguous run of loss-bearing tokens."""
    runs, current = [], []
    for token, label in zip(row.input_ids, row.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_chatml_mask_trains_every_assistant_turn_and_its_end_of_turn(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"  # the dangerous case
    row = tokenize_conversation(tokenizer, CONVERSATION, max_length=512)
    assert labeled_runs(tokenizer, row) == ["4.<|im_end|>", "我很好，谢谢。<|im_end|>"]
    assert not row.truncated
    # Unlabeled tokens are exactly the prompt side: system, user turns, headers.
    prompt_ids = [
        t for t, lab in zip(row.input_ids, row.labels, strict=True) if lab == IGNORE_INDEX
    ]
    assert "What is 2+2?" in tokenizer.decode(prompt_ids)


def test_llama3_style_template(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir, chat_template=LLAMA3_STYLE)
    row = tokenize_conversation(tokenizer, CONVERSATION, max_length=512)
    assert labeled_runs(tokenizer, row) == ["4.<|eot_id|>", "我很好，谢谢。<|eot_id|>"]


def test_truncation_keeps_the_start(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    full = tokenize_conversation(tokenizer, CONVERSATION, max_length=512)
    cut = tokenize_conversation(tokenizer, CONVERSATION, max_length=len(full.input_ids) - 3)
    assert cut.truncated and cut.input_ids == full.input_ids[: len(cut.input_ids)]


def test_template_that_is_not_prefix_stable_is_refused(tiny_model_dir):
    # Renders the message count up front, so a prefix renders differently from the whole.
    unstable = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer = load_tokenizer(tiny_model_dir, chat_template=unstable)
    with pytest.raises(SftpipeError, match="chat_template"):
        tokenize_conversation(tokenizer, CONVERSATION, max_length=64)


def write_cleaned(path, conversations):
    with path.open("w", encoding="utf-8") as handle:
        for i, messages in enumerate(conversations):
            row = {
                "id": conversation_id(messages),
                "messages": messages,
                "source": f"x.jsonl:{i + 1}",
            }
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def run(tmp_path, model, config, conversations):
    write_cleaned(tmp_path / "cleaned.jsonl", conversations)
    report = tokenize.run(
        config,
        str(model),
        tmp_path / "cleaned.jsonl",
        tmp_path / "train.parquet",
        tmp_path / "val.parquet",
        tmp_path / "quarantine.jsonl",
    )
    return report


def test_run_splits_deterministically_and_quarantines_unlabeled_rows(tiny_model_dir, tmp_path):
    long_prompt = [
        {"role": "user", "content": "word " * 300},
        {"role": "assistant", "content": "ok"},
    ]
    conversations = [CONVERSATION[1:3], CONVERSATION, long_prompt] + [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        for i in range(20)
    ]
    config = TokenizeConfig(max_length=64, validation_fraction=0.3)
    report = run(tmp_path, tiny_model_dir, config, conversations)
    assert report.quarantined_no_loss_tokens == 1
    (bad,) = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert bad["reason"] == "no_loss_tokens" and bad["source"] == "x.jsonl:3"
    train, val = read_parquet(tmp_path / "train.parquet"), read_parquet(tmp_path / "val.parquet")
    assert len(train) + len(val) == 22 and train and val
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in val})
    for row in train + val:
        assert row["num_tokens"] == len(row["input_ids"]) <= 64
        assert row["num_loss_tokens"] == sum(lab != IGNORE_INDEX for lab in row["labels"]) > 0
    assert report.loss_tokens == sum(r["num_loss_tokens"] for r in train + val)

    first = (tmp_path / "train.parquet").read_bytes(), (tmp_path / "val.parquet").read_bytes()
    run(tmp_path, tiny_model_dir, config, conversations)
    assert first == (
        (tmp_path / "train.parquet").read_bytes(),
        (tmp_path / "val.parquet").read_bytes(),
    )


def test_tiny_data_still_gets_a_validation_row(tiny_model_dir, tmp_path):
    report = run(
        tmp_path,
        tiny_model_dir,
        TokenizeConfig(validation_fraction=0.01),
        [CONVERSATION[1:3], CONVERSATION],
    )
    assert (report.train_rows, report.validation_rows) == (1, 1)


def test_model_without_tokenizer_or_template(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SftpipeError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "plain")
    config_file = tmp_path / "plain" / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config.pop("chat_template", None)
    config_file.write_text(json.dumps(tokenizer_config))
    (tmp_path / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(SftpipeError, match="no chat template.*--chat-template"):
        load_tokenizer(tmp_path / "plain")
