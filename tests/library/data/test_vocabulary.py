"""Vocabulary extension (sftpipe.data.vocabulary, tokenize's extend_vocabulary): characters a
real English WordPiece tokenizer (all-MiniLM-L6-v2's) encodes as [UNK] become tokens."""

import collections

import pytest
from fixtures.classification import UNKNOWN_TO_MINILM
from transformers import AutoTokenizer

from sftpipe.config import TokenizeConfig
from sftpipe.data import vocabulary
from sftpipe.data.tokenized import read_parquet, schema_metadata
from sftpipe.errors import SftpipeError
from sftpipe.stages import tokenize


@pytest.fixture(scope="module")
def minilm_tokenizer(minilm_encoder):
    return AutoTokenizer.from_pretrained(minilm_encoder)


def test_unknown_characters_by_count_in_code_point_order(minilm_tokenizer):
    texts = ["好书 good 好", "差 差 真", "坑 a"]  # 真 and the Latin letters are in the vocabulary
    assert vocabulary.unknown_characters(minilm_tokenizer, texts, 2) == sorted("好差")
    assert vocabulary.unknown_characters(minilm_tokenizer, texts, 1) == sorted("好书差坑")
    assert vocabulary.unknown_characters(minilm_tokenizer, texts, 3) == []


def test_a_byte_level_tokenizer_needs_nothing_added(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.unk_token_id is None
    assert vocabulary.unknown_characters(tokenizer, ["好书好书"], 1) == []


def test_added_characters_encode_as_themselves(minilm_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer.name_or_path)
    size = len(tokenizer)
    tokenizer.add_tokens(["差", "好"])
    ids = tokenizer("这本书好，不差", add_special_tokens=False)["input_ids"]
    assert [ids[3], ids[-1]] == [size + 1, size]  # ids in the order added
    assert tokenizer.decode(ids[3:]).replace(" ", "") == "好，不差"
    assert vocabulary.added_tokens(vocabulary.metadata_of(["差", "好"])) == ["差", "好"]
    assert vocabulary.added_tokens({}) == [] and vocabulary.metadata_of([]) == {}


def test_tokenize_adds_what_the_training_texts_need_and_nothing_from_validation(
    unknown_script_splits, minilm_tokenizer
):
    train, validation, report = unknown_script_splits["extended"]
    added = vocabulary.added_tokens(schema_metadata(train))
    assert added == vocabulary.added_tokens(schema_metadata(validation))
    assert report.added_tokens == len(added) > 0
    train_rows, validation_rows = read_parquet(train), read_parquet(validation)
    # Exactly the training texts' unknown characters seen twice, whatever validation holds.
    assert added == vocabulary.unknown_characters(
        minilm_tokenizer, [r["text"] for r in train_rows], 2
    )
    everywhere = collections.Counter(ch for r in train_rows + validation_rows for ch in r["text"])
    assert any(everywhere[ch] >= 2 and ch not in added for ch in everywhere), "a split pair"
    assert set("".join(UNKNOWN_TO_MINILM.values())) <= set(added)
    # The label-carrying characters now have ids of their own, above the base vocabulary.
    base = len(minilm_tokenizer)
    assert all(any(i >= base for i in r["input_ids"]) for r in train_rows)
    plain_report = unknown_script_splits["plain"][2]
    assert report.unknown_token_fraction < plain_report.unknown_token_fraction / 3
    assert report.metrics()["added_tokens"] == len(added)


def test_conversations_refuse_extend_vocabulary(tiny_model_dir, tmp_path):
    cleaned = tmp_path / "cleaned.jsonl"
    cleaned.write_text(
        '{"id": "0", "group": "0", "messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "hello"}]}\n'
    )
    with pytest.raises(SftpipeError, match="extend_vocabulary: adds tokens for classification"):
        tokenize.run(
            TokenizeConfig(extend_vocabulary=2),
            str(tiny_model_dir),
            cleaned,
            tmp_path / "t.parquet",
            tmp_path / "v.parquet",
            tmp_path / "q.jsonl",
        )
    assert not (tmp_path / "t.parquet").exists()
