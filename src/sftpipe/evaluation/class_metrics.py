"""How well a classifier did: the confusion matrix and the metrics read from it, and the
TF-IDF + logistic-regression baseline every fine-tuned classifier is compared with.

Metric names (unprefixed, as the gate sees them): `accuracy`, `macro_precision`,
`macro_recall`, `macro_f1`, `min_class_recall` (the worst class's recall), and per class
`precision.<label>`, `recall.<label>`, `f1.<label>`. A class never predicted has precision 0,
a class absent from the data recall 0 (scikit-learn's `zero_division=0`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_UNSAFE = re.compile(r"[^\w.\- ]")  # MLflow metric names allow word characters, . - and space


def metric_label(name: str) -> str:
    """A label name as it may appear in a metric name (`recall.<label>`)."""
    return _UNSAFE.sub("_", name) or "_"


def confusion_matrix(true: Sequence[int], predicted: Sequence[int], classes: int) -> np.ndarray:
    """`matrix[t, p]`: how many examples of class t were predicted as p."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def summarize(matrix: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro and per-class precision / recall / F1 from a confusion matrix."""
    hits = np.diag(matrix).astype(float)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    metrics = {
        "accuracy": float(hits.sum() / max(matrix.sum(), 1)),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "min_class_recall": float(recall.min()),
    }
    for i, name in enumerate(names):
        label = metric_label(name)
        metrics |= {
            f"precision.{label}": float(precision[i]),
            f"recall.{label}": float(recall[i]),
            f"f1.{label}": float(f1[i]),
        }
    return metrics


def tfidf_baseline(
    train_texts: Sequence[str], train_labels: Sequence[int], texts: Sequence[str]
) -> np.ndarray:
    """Predicted label ids for `texts` from TF-IDF features and a logistic regression trained
    on the training split. Character 1-3-grams within word boundaries work for Chinese (no
    spaces) and English alike."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    if len(set(train_labels)) < 2:
        # One class in training: the baseline can only ever answer that class.
        return np.full(len(texts), train_labels[0] if train_labels else 0, dtype=np.int64)
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True)
    features = vectorizer.fit_transform(train_texts)
    model = LogisticRegression(max_iter=2000)  # lbfgs: deterministic, no seed needed
    model.fit(features, np.asarray(train_labels))
    return model.predict(vectorizer.transform(texts)).astype(np.int64)
