"""Hugging Face datasets as input: save_to_disk folders (Dataset and DatasetDict), hf:// loaded
with `datasets.load_dataset(..., streaming=True)` (a script-free local folder here: the Hub is
not reachable from the test machine), the one-line error offline, and column mapping for
datasets and files alike. All datasets are built locally with the real `datasets` library."""

from __future__ import annotations

import json

import datasets
import pytest

from sftpipe.config import DataConfig
from sftpipe.data import hf
from sftpipe.data.records import RecordOptions, parse_columns, to_example
from sftpipe.data.sources import fingerprint, list_sources
from sftpipe.errors import SftpipeError
from sftpipe.stages import clean
from sftpipe.stages.clean import read_jsonl


def dialog(i: int) -> list[dict]:
    return [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
    ]


ROWS = [{"dialog": dialog(i), "topic": "math"} for i in range(6)]
ROWS[3] = {"dialog": [{"role": "robot", "content": "beep"}], "topic": "math"}  # quarantined


def run(tmp_path, **config):
    report = clean.run(
        DataConfig(max_bad_fraction=0.5, **config), tmp_path / "c.jsonl", tmp_path / "q.jsonl"
    )
    return report, read_jsonl(tmp_path / "c.jsonl"), read_jsonl(tmp_path / "q.jsonl")


def test_save_to_disk_dataset_with_column_mapping(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "chats"))
    report, kept, bad = run(tmp_path, data_uri=str(tmp_path / "chats"), columns="messages=dialog")
    assert [row["source"] for row in kept] == [f"chats:row {i}" for i in (1, 2, 3, 5, 6)]
    assert kept[0]["messages"] == dialog(0)
    assert [(b["source"], b["reason"]) for b in bad] == [("chats:row 4", "unknown_role")]
    assert report.rows_in == 6 and report.sources == 1
    # without the mapping, no record format fits: every row names its columns
    with pytest.raises(SftpipeError, match=r"6 of 6 rows are bad.*missing_columns=6"):
        run(tmp_path, data_uri=str(tmp_path / "chats"))


def test_saved_dataset_dict_reads_train_and_digests_are_stable(tmp_path):
    split = datasets.Dataset.from_list(ROWS)
    folder = tmp_path / "dict"
    datasets.DatasetDict({"train": split, "test": split.select(range(2))}).save_to_disk(str(folder))
    (source,) = list_sources(str(folder))
    assert (source.uri, source.name) == (str(folder / "train"), "dict/train")
    first, kept, _ = run(tmp_path, data_uri=str(folder), columns="messages=dialog")
    assert len(kept) == 5 and kept[0]["source"] == "dict/train:row 1"
    second, _, _ = run(tmp_path, data_uri=str(folder / "train"), columns="messages=dialog")
    assert first.input_digest == second.input_digest and len(first.input_digest) == 64
    assert fingerprint([source]) == fingerprint(list_sources(str(folder)))

    only_test = tmp_path / "no_train"
    datasets.DatasetDict({"a": split, "b": split}).save_to_disk(str(only_test))
    with pytest.raises(SftpipeError, match="splits a, b and no train split"):
        list_sources(str(only_test))


def test_class_label_columns_are_read_as_names(tmp_path):
    features = datasets.Features(
        {"review": datasets.Value("string"), "sentiment": datasets.ClassLabel(names=["neg", "pos"])}
    )
    rows = {"review": ["Awful film.", "Loved every minute.", "Dull."], "sentiment": [0, 1, 0]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "reviews"))
    report, kept, _ = run(
        tmp_path, data_uri=str(tmp_path / "reviews"), columns="text=review,label=sentiment"
    )
    assert report.task == "classification"
    assert [(r["text"], r["label"]) for r in kept] == [
        ("Awful film.", "neg"),
        ("Loved every minute.", "pos"),
        ("Dull.", "neg"),
    ]


def test_hf_uri_streams_a_local_folder_through_load_dataset(tmp_path):
    """hf://PATH:SPLIT goes through `datasets.load_dataset(PATH, split=..., streaming=True)`:
    the same code path as a Hub name, with a script-free folder of data files."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "test.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    uri = f"hf://{folder}:train"
    _, kept, bad = run(tmp_path, data_uri=uri, columns="messages=dialog")
    assert [row["source"] for row in kept][:2] == [f"{uri}#row 1", f"{uri}#row 2"]
    assert bad[0]["source"] == f"{uri}#row 4" and bad[0]["reason"] == "unknown_role"
    _, kept, _ = run(tmp_path, data_uri=f"hf://{folder}:test", columns="messages=dialog")
    assert len(kept) == 1


def test_a_hub_name_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # HF_HUB_OFFLINE=1, as read at import time by both libraries
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SftpipeError) as caught:
        run(tmp_path, data_uri="hf://someorg/some-chats/default:train")
    message = str(caught.value)
    assert message.startswith("hf://someorg/some-chats/default:train: cannot load it")
    assert "HF_HUB_OFFLINE" in message and "save_to_disk" in message and "\n" not in message


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("hf://imdb", ("imdb", None, "train")),
        ("hf://stanfordnlp/imdb:test", ("stanfordnlp/imdb", None, "test")),
        ("hf://org/name/zh-en:validation", ("org/name", "zh-en", "validation")),
    ],
)
def test_hub_uris(uri, parsed):
    got = hf.parse_hub_uri(uri)
    assert (got.name, got.config, got.split) == parsed
    assert list_sources(uri)[0].name == got.label


@pytest.mark.parametrize("uri", ["hf://", "hf://a/b/c/d", "hf://bad name"])
def test_bad_hub_uris(uri):
    with pytest.raises(SftpipeError, match="not a Hugging Face dataset name"):
        hf.parse_hub_uri(uri)


def test_column_mapping_applies_to_files(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("body,stars\nGreat phone,pos\nBroke in a week,neg\n", encoding="utf-8")
    _, kept, _ = run(tmp_path, data_uri=str(path), columns="text=body,label=stars")
    assert [(r["text"], r["label"], r["source"]) for r in kept] == [
        ("Great phone", "pos", "reviews.csv:2"),
        ("Broke in a week", "neg", "reviews.csv:3"),
    ]


def test_column_mapping_parsing():
    assert parse_columns(" messages = dialog , label=sentiment ") == (
        ("messages", "dialog"),
        ("label", "sentiment"),
    )
    options = RecordOptions(columns=(("prompt", "q"), ("completion", "a")))
    example = to_example({"q": "2+2?", "a": "4", "prompt": "ignored"}, options)
    assert example["messages"][0]["content"] == "2+2?"  # the mapping wins
    for bad, words in [
        ("messages", "RECORD_COLUMN=DATA_COLUMN"),
        ("msgs=dialog", "not a record column"),
        ("text=a,text=b", "mapped once"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_columns(bad)
    with pytest.raises(SftpipeError, match="columns="):
        DataConfig.from_values({"columns": "msgs=dialog"})


def test_hub_fingerprint_offline_never_repeats(monkeypatch):
    """KFP's cache key of a Hub dataset is its revision; offline it cannot be known, and two
    runs then get different keys (clean runs again) instead of a stale cache hit."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    sources = list_sources("hf://someorg/some-chats:train")
    assert fingerprint(sources) != fingerprint(sources)


def test_saved_dataset_fingerprint_follows_its_files(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "a"))
    sources = list_sources(str(tmp_path / "a"))
    before = fingerprint(sources)
    assert fingerprint(sources) == before
    datasets.Dataset.from_list(ROWS[:2]).save_to_disk(str(tmp_path / "a"))
    assert fingerprint(sources) != before


def test_a_damaged_saved_dataset_is_one_line(tmp_path):
    datasets.Dataset.from_list(ROWS * 50).save_to_disk(str(tmp_path / "a"))
    (arrow,) = (tmp_path / "a").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])  # cut in half
    with pytest.raises(SftpipeError) as caught:
        run(tmp_path, data_uri=str(tmp_path / "a"), columns="messages=dialog")
    assert str(caught.value).startswith(str(tmp_path / "a")) and "\n" not in str(caught.value)
    (tmp_path / "a" / "state.json").write_text("{not json")
    with pytest.raises(SftpipeError, match="not a readable saved dataset"):
        run(tmp_path, data_uri=str(tmp_path / "a"))


def test_a_saved_dataset_inside_a_folder_of_files_is_refused(tmp_path):
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text(json.dumps({"messages": dialog(1)}) + "\n")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "mixed" / "saved"))
    with pytest.raises(SftpipeError, match="saved Hugging Face dataset inside a folder"):
        list_sources(str(tmp_path / "mixed"))
