import random

import numpy as np
import pytest

from sftpipe.data.packing import IGNORE_INDEX, Packer, Sample, best_fit_decreasing, pack


def test_best_fit_decreasing_is_complete_within_capacity_and_deterministic():
    rng = random.Random(1)
    lengths = [min(512, int(rng.lognormvariate(4, 1)) + 1) for _ in range(3000)]
    bins = best_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert bins == best_fit_decreasing(lengths, 512)
    efficiency = sum(lengths) / (len(bins) * 512)
    assert efficiency > 0.95
    assert best_fit_decreasing([3, 3, 2, 2], 5) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError):
        best_fit_decreasing([6], 5)


def sample(name, length, start):
    ids = np.arange(start, start + length, dtype=np.int32)
    labels = ids.copy()
    labels[: length // 2] = IGNORE_INDEX
    return Sample(name, ids, labels)


def test_packed_rows_restart_positions_and_never_predict_across_samples():
    samples = [sample("a", 5, 100), sample("b", 3, 200), sample("c", 4, 300)]
    rows = list(pack(samples, 8))
    assert [r.num_samples for r in rows] == [2, 1]
    first = rows[0]
    assert first.input_ids.tolist() == list(range(100, 105)) + list(range(200, 203))
    assert first.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert first.labels[0] == IGNORE_INDEX and first.labels[5] == IGNORE_INDEX
    assert first.labels.tolist()[2:5] == [102, 103, 104]
    assert len(first.id) == 32 and first.id != rows[1].id


def test_packer_packs_chunk_by_chunk():
    packer = Packer(8, chunk_tokens=10)
    rows = [r for s in (sample("a", 6, 0), sample("b", 6, 10)) for r in packer.add(s)]
    rows += list(packer.flush())
    assert [r.num_samples for r in rows] == [1, 1] and not packer.pending


def test_rows_laid_out_in_groups_equal_rows_laid_out_at_once(monkeypatch):
    rng = random.Random(2)
    samples = [sample(str(i), rng.randint(1, 8), 10 * i) for i in range(200)]
    whole = list(pack(samples, 8))
    monkeypatch.setattr("sftpipe.data.packing._LAYOUT_TOKENS", 5)  # a group every row or two
    grouped = list(pack(samples, 8))
    assert len(grouped) == len(whole) > 50
    for a, b in zip(whole, grouped, strict=True):
        assert a.id == b.id and a.num_samples == b.num_samples
        for column in ("input_ids", "labels", "position_ids"):
            assert getattr(a, column).tolist() == getattr(b, column).tolist()
