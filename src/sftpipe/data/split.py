"""The train/validation split of cleaned rows, by a hash of each row's duplicate group (see
clean): deterministic, stable as data grows, and duplicates never straddle it. Chat data is
split by hash alone (a side forced only when one would be empty); classification data is
stratified per label.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sftpipe.errors import SftpipeError


def is_validation(row_id: str, fraction: float) -> bool:
    return hash_fraction(row_id) < fraction


def hash_fraction(row_id: str) -> float:
    return int(row_id[:12], 16) / 16**12


_HEAD = re.compile(
    r'^\{"id": "([0-9a-f]{12,})", "group": "([0-9a-f]{12,})"(?:, "label": ("(?:[^"\\]|\\.)*"))?'
)


def heads(path: str | Path) -> Iterator[tuple[str, str | None]]:
    """(group, label or None) of every cleaned row, cheaply (a regex on the line start)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            match = _HEAD.match(line)
            if match:
                label = json.loads(match.group(3)) if match.group(3) else None
                yield match.group(2), label
            else:
                row = json.loads(line)
                label = row.get("label")
                yield row.get("group") or row["id"], None if label is None else str(label)


def split_chat(path: str | Path, fraction: float, where: str) -> tuple[set[str], set[str]]:
    """Groups forced to validation / to train, so that both sides get rows even when the
    hash puts everything on one side (tiny data). Reads only until both sides have a row
    (a few rows on real data): then nothing is forced."""
    low: tuple[float, str] | None = None
    high: tuple[float, str] | None = None
    sides = collections.Counter()
    groups = 0
    for group, _ in heads(path):
        groups += 1
        value = hash_fraction(group)
        sides[value < fraction] += 1
        if sides[True] and sides[False]:
            return set(), set()
        low = min(low, (value, group)) if low else (value, group)
        high = max(high, (value, group)) if high else (value, group)
    if groups == 0:
        raise SftpipeError(where, "no rows to tokenize", "check the clean step's output")
    if low is not None and low[1] == high[1]:  # type: ignore[index]
        raise SftpipeError(
            where,
            "fewer than 2 distinct conversations: no validation set is possible",
            "provide more data",
        )
    force_validation = {low[1]} if not sides[True] else set()  # type: ignore[index]
    force_train = {high[1]} if not sides[False] else set()  # type: ignore[index]
    return force_validation, force_train


GROUP_WIDTH = 32  # clean's ids (and so groups) are 32 hex digits


def split_stratified(
    path: str | Path, fraction: float, label_map: dict[str, int]
) -> tuple[set[str], dict[str, int]]:
    """Validation groups chosen per label (the lowest hashes, round(fraction x groups), at
    least one when a label has two groups or more), and the label map (given, or the sorted
    label names: numerically when they are all integers). Memory: each row's group as 32
    bytes in an array while reading (sorted as bytes: hex ids sort as their hash fraction
    does), then the validation groups only."""
    per_label: dict[str, bytearray] = collections.defaultdict(bytearray)
    for group, label in heads(path):
        per_label[str(label)] += group.encode()[:GROUP_WIDTH].ljust(GROUP_WIDTH, b"\0")
    if not label_map:
        names = sorted(per_label)
        if all(re.fullmatch(r"-?\d+", n) for n in names):
            names.sort(key=int)
        label_map = {name: index for index, name in enumerate(names)}
    validation: set[str] = set()
    for groups in per_label.values():
        ordered = np.unique(np.frombuffer(groups, dtype=f"S{GROUP_WIDTH}"))  # distinct, sorted
        take = round(fraction * len(ordered))
        if len(ordered) >= 2:
            take = min(max(take, 1), len(ordered) - 1)
        validation.update(group.decode() for group in ordered[:take].tolist())
    return validation, label_map
