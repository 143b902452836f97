import random

import numpy as np

from sftpipe.data import dedupe


def shingles(text):
    text = text.casefold()
    return {text[i : i + dedupe.SHINGLE] for i in range(max(1, len(text) - dedupe.SHINGLE + 1))}


def exact_jaccard(a, b):
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def test_signature_similarity_estimates_jaccard():
    rng = random.Random(0)
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "while",
        "我们",
        "今天",
        "学习",
        "机器",
        "学习",
        "and",
        "dogs",
        "ran",
        "far",
        "away",
    ]
    base = " ".join(rng.choice(words) for _ in range(200))
    pairs = []
    for edits in (1, 5, 20, 60):
        other = base.split()
        for _ in range(edits):
            other[rng.randrange(len(other))] = rng.choice(words)
        pairs.append((base, " ".join(other)))
    sig = dedupe.signatures([t for pair in pairs for t in pair])
    for index, (a, b) in enumerate(pairs):
        estimate = dedupe.jaccard(sig[2 * index], sig[2 * index + 1])
        assert abs(estimate - exact_jaccard(a, b)) < 0.12, (index, estimate, exact_jaccard(a, b))


def test_signatures_are_deterministic_and_batch_independent():
    texts = ["hello world", "你好世界，今天天气很好", "x", "", "Hello World"]
    together = dedupe.signatures(texts)
    alone = np.concatenate([dedupe.signatures([t]) for t in texts])
    assert together.dtype == np.uint32 and together.shape == (5, dedupe.NUM_HASHES)
    assert (together == alone).all()
    assert (together[0] == together[4]).all()  # casefolded


def test_clusters_exact_and_near_duplicates_keep_the_earliest():
    base = "Explain the difference between a list and a tuple in Python, with examples. " * 3
    texts = [base, "Something else entirely, about cooking pasta at home." * 3, base, base + "!"]
    keys = np.array([1, 2, 1, 3], dtype=np.uint64)
    root, exact, similarity = dedupe.clusters(keys, dedupe.signatures(texts), 0.8)
    assert root.tolist() == [0, 1, 0, 0]
    assert exact.tolist() == [False, False, True, False]
    assert 0.8 <= similarity[3] < 1.0
    root, exact, _ = dedupe.clusters(keys, None, 0.8)  # exact only
    assert root.tolist() == [0, 1, 0, 3]


def test_lsh_bands_fit_the_threshold():
    for threshold in (0.5, 0.7, 0.85, 0.95):
        bands, rows = dedupe.lsh_bands(threshold)
        assert bands * rows <= dedupe.NUM_HASHES
        knee = (1 / bands) ** (1 / rows)  # where the S-curve is steepest
        assert abs(knee - threshold) < 0.12, (threshold, bands, rows)
