"""Vocabulary extension: characters the tokenizer can only spell as its unknown token become
tokens of their own.

An encoder with an English WordPiece vocabulary (all-MiniLM-L6-v2) turns most Chinese characters
into `[UNK]`, so the model sees a review as a handful of known characters among identical
blanks. tokenize adds every character that encodes to the unknown token and occurs at least
`min_count` times in the training texts (never the validation texts: what the model is scored on
must not shape its vocabulary), in code-point order (`tokenizer.add_tokens` gives them ids
in that order, so finetune's ids match tokenize's), and records them in the Parquet metadata
(`sftpipe.added_tokens`); finetune adds the same tokens to the tokenizer and grows the input
embeddings, whose new rows start at the old rows' mean and spread (transformers'
`mean_resizing`) and learn at `embedding_learning_rate`. A tokenizer without an unknown token
(byte-level BPE) can spell everything and gets nothing added.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable
from typing import Any

from sftpipe.data.schemas import ADDED_TOKENS_KEY


def unknown_characters(tokenizer: Any, texts: Iterable[str], min_count: int) -> list[str]:
    """The characters of `texts` seen at least `min_count` times that `tokenizer` encodes as
    its unknown token alone, in code-point order."""
    counts = collections.Counter(ch for text in texts for ch in text if not ch.isspace())
    candidates = sorted(ch for ch, count in counts.items() if count >= min_count)
    if tokenizer.unk_token_id is None or not candidates:
        return []
    encoded = tokenizer(candidates, add_special_tokens=False)["input_ids"]
    unknown = [tokenizer.unk_token_id]
    return [ch for ch, ids in zip(candidates, encoded, strict=True) if ids == unknown]


def added_tokens(metadata: dict[str, str]) -> list[str]:
    """The tokens tokenize added, from a tokenized file's schema metadata ([] when none)."""
    return json.loads(metadata.get(ADDED_TOKENS_KEY, "[]"))


def metadata_of(tokens: list[str]) -> dict[str, str]:
    return {ADDED_TOKENS_KEY: json.dumps(tokens, ensure_ascii=False)} if tokens else {}


def grow_embeddings(model: Any, size: int) -> None:
    """Give `model` at least `size` input embeddings (the tokenizer's length after `extend`);
    the new rows are drawn around the old rows' mean (seeded by the caller's torch seed)."""
    if size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(size, mean_resizing=True)
