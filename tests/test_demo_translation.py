"""The translation demo's inputs: CC-CEDICT entries that read as zh->en pairs, sampled into
`translation` records, and what they become through clean, tokenize and finetune on the tiny
chat model (the gloss, and only the gloss, is what the model learns to answer)."""

import json

from sftpipe.apps import demo_translation
from sftpipe.config import DataConfig, TokenizeConfig, TrainConfig
from sftpipe.data.tokenized import IGNORE_INDEX, read_parquet
from sftpipe.modeling.models import load_tokenizer
from sftpipe.stages import clean, finetune, tokenize


def test_translation_pairs_are_plain_glosses():
    pair = demo_translation.translation_pair
    assert pair("電腦 电脑 [dian4 nao3] /computer/CL:臺|台[tai2]/") == ("电脑", "computer")
    # Parenthetical notes go; the first gloss is the translation.
    assert pair("火苗 火苗 [huo3 miao2] /flame/") == ("火苗", "flame")
    assert pair("有錢 有钱 [you3 qian2] /well-off (lit. having money)/wealthy/") == (
        "有钱",
        "well-off",
    )
    refused = [
        "王 王 [Wang2] /surname Wang/",  # one character, and a surname
        "北京 北京 [Bei3 jing1] /Beijing, capital of the People's Republic of China/",
        "裡邊 里边 [li3 bian5] /variant of 裡面|里面[li3 mian4]/",
        "3C 3C [san1 C] /computers, communications, and consumer electronics/",
        "突擊檢查 突击检查 [tu1 ji1 jian3 cha2] /sudden unannounced investigation of a unit/",
        "不是 不是 [bu4 shi4] /no/is not/not/",  # fine: one word
        "broken line",
    ]
    assert [pair(line) for line in refused][:-2] == [None] * 5
    assert pair(refused[-2]) == ("不是", "no") and pair(refused[-1]) is None


def test_seeded_cached_records(tmp_path):
    path = demo_translation.prepare_translation_data(tmp_path, pairs=40)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 40 and len({r["source"] for r in rows}) == 40
    assert all(r["source_lang"] == "zh" and r["target_lang"] == "en" for r in rows)
    assert all(
        demo_translation.translation_pair(f"x {r['source']} [x] /{r['target']}/") for r in rows
    )
    manifest = json.loads((path.parent / "sftpipe-demo.json").read_text())
    assert manifest["license"].startswith("CC BY-SA 4.0") and manifest["pairs"] == 40
    before = path.stat().st_mtime_ns
    assert demo_translation.prepare_translation_data(tmp_path, pairs=40) == path
    assert path.stat().st_mtime_ns == before
    again = demo_translation.prepare_translation_data(tmp_path / "other", pairs=40)
    assert again.read_bytes() == path.read_bytes()


def test_records_train_the_tiny_chat_model_on_the_gloss(tmp_path, tiny_model_dir):
    data = demo_translation.prepare_translation_data(tmp_path / "cache", pairs=60)
    cleaned = tmp_path / "cleaned.jsonl"
    clean.run(DataConfig(data_uri=str(data)), cleaned, tmp_path / "clean-bad.jsonl")
    train, validation = tmp_path / "train.parquet", tmp_path / "validation.parquet"
    tokenize.run(
        TokenizeConfig(max_length=128, validation_fraction=0.2, packing=False),
        str(tiny_model_dir),
        cleaned,
        train,
        validation,
        tmp_path / "bad.jsonl",
    )
    tokenizer = load_tokenizer(tiny_model_dir)
    records = {
        r["source"]: r["target"]
        for r in map(json.loads, data.read_text(encoding="utf-8").splitlines())
    }
    rows = read_parquet(train) + read_parquet(validation)
    assert len(rows) == 60
    for row in rows:
        text = tokenizer.decode(row["input_ids"])
        learned = tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])
        (source,) = [s for s in records if s in text]
        assert "Chinese" in text and "English" in text  # the instruction names the languages
        assert learned == records[source] + "<|im_end|>"

    config = TrainConfig(max_steps=6, micro_batch_size=8, eval_every=3, precision="fp32")
    report = finetune.run(config, str(tiny_model_dir), train, validation, tmp_path / "out")
    assert report.best_validation_loss < report.history[0]["validation_loss"]
    assert (tmp_path / "out" / "model.safetensors").is_file()
