"""Classification metrics match scikit-learn's, and the TF-IDF baseline learns from text in any
script."""

import numpy as np
import pytest
from sklearn import metrics as sk

from sftpipe.evaluation import class_metrics


def test_metrics_match_scikit_learn_including_empty_classes():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 3, size=200)
    predicted = np.where(rng.random(200) < 0.6, true, rng.integers(0, 3, size=200))
    predicted[predicted == 2] = 1  # class 2 is never predicted: its precision is 0, not NaN
    names = ["neg", "neu", "pos"]
    matrix = class_metrics.confusion_matrix(true, predicted, 3)
    assert matrix.tolist() == sk.confusion_matrix(true, predicted, labels=[0, 1, 2]).tolist()
    got = class_metrics.summarize(matrix, names)
    p, r, f, _ = sk.precision_recall_fscore_support(
        true, predicted, labels=[0, 1, 2], zero_division=0
    )
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(true, predicted))
    assert got["macro_precision"] == pytest.approx(p.mean())
    assert got["macro_recall"] == pytest.approx(r.mean())
    assert got["macro_f1"] == pytest.approx(f.mean())
    assert got["min_class_recall"] == pytest.approx(r.min())
    for i, name in enumerate(names):
        assert got[f"precision.{name}"] == pytest.approx(p[i])
        assert got[f"recall.{name}"] == pytest.approx(r[i])
        assert got[f"f1.{name}"] == pytest.approx(f[i])
    assert got["precision.pos"] == 0.0


def test_label_names_become_valid_metric_names():
    assert class_metrics.metric_label("正面") == "正面"  # MLflow accepts Unicode word characters
    assert class_metrics.metric_label("a/b: c?") == "a_b_ c_"
    assert class_metrics.metric_label("") == "_"


def test_tfidf_baseline_learns_chinese_and_english():
    good, bad = ["很好", "喜欢", "great", "love it"], ["很差", "讨厌", "awful", "hate it"]
    train = [f"{w}，真的{w}" for w in good + bad] * 3
    labels = ([1] * 4 + [0] * 4) * 3
    predicted = class_metrics.tfidf_baseline(
        train, labels, ["我很喜欢", "太差了，很差", "I love it"]
    )
    assert predicted.tolist() == [1, 0, 1]


def test_tfidf_baseline_with_one_class_answers_that_class():
    assert class_metrics.tfidf_baseline(["a", "b"], [1, 1], ["c"]).tolist() == [1]
