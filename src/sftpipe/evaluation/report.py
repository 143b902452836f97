"""Reports people look at: the loss-curve plot, the evaluation plots (generation metrics and
response lengths, base vs tuned) and the evaluation HTML (shown in the KFP UI as an HTML
artifact and logged to MLflow). Self-contained: the plots are inline PNGs."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftpipe import storage

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:6px 10px;
vertical-align:top;text-align:left}th{background:#f3f3f3}.num{text-align:right;
font-variant-numeric:tabular-nums}.better{color:#0a7a2f;font-weight:600}
.sample td{max-width:420px;white-space:pre-wrap}
"""


def loss_curve_png(history: Sequence[dict[str, float]]) -> bytes:
    """Training and validation loss against optimizer step, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.5), dpi=100)
    for key, style in (("train_loss", "-"), ("validation_loss", "o-")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            axes.plot(*zip(*points, strict=True), style, label=key.replace("_", " "))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (per assistant token or example)")
    axes.grid(alpha=0.3)
    axes.legend()
    return _png(figure)


MODELS = {"base": "base", "tuned": "tuned", "tfidf": "TF-IDF + LogReg"}
"""Columns of the report: every model whose metrics are there (tfidf: classification only)."""
_BARS = ("rouge_l", "chrf", "bleu", "eos_rate")


def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def evaluation_plots(
    metrics: dict[str, float], samples: Sequence[Any], max_new_tokens: int
) -> dict[str, bytes]:
    """PNG plots of the generation metrics (base vs tuned) and of the response lengths; empty
    when no answers were generated."""
    if "tuned_eos_rate" not in metrics:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.5), dpi=100)
    positions = range(len(_BARS))
    for offset, model in ((-0.2, "base"), (0.2, "tuned")):
        values = [metrics[f"{model}_{m}"] * (100.0 if m == "eos_rate" else 1.0) for m in _BARS]
        axes.bar([p + offset for p in positions], values, width=0.4, label=model)
    axes.set_xticks(list(positions), ["ROUGE-L", "chrF", "BLEU", "EOS rate %"])
    axes.set_ylabel("score (0-100)")
    axes.grid(alpha=0.3, axis="y")
    axes.legend()
    plots = {"generation_metrics.png": _png(figure)}

    figure, axes = plt.subplots(figsize=(7, 3.5), dpi=100)
    bins = list(range(0, max_new_tokens + 2, max(1, (max_new_tokens + 1) // 24)))
    for model in ("base", "tuned"):
        lengths = [s.tokens[model] for s in samples if model in s.tokens]
        axes.hist(lengths, bins=bins, alpha=0.55, label=model)
    axes.axvline(max_new_tokens, color="#a00", linestyle="--", label="token budget")
    axes.set_xlabel("response length (tokens, EOS excluded)")
    axes.set_ylabel("answers")
    axes.legend()
    plots["response_lengths.png"] = _png(figure)
    return plots


def _image(name: str, data: bytes) -> str:
    encoded = base64.b64encode(data).decode()
    return f"<img alt='{html.escape(name)}' src='data:image/png;base64,{encoded}'>"


@dataclass(frozen=True)
class Confusion:
    """Confusion matrices (`matrix[true, predicted]`) of several classifiers on one label set."""

    names: list[str]
    matrices: dict[str, Any]  # model -> classes x classes array


def confusion_png(confusion: Confusion) -> bytes:
    """One heat map per model, counts in the cells, true labels down, predictions across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(confusion.matrices)
    size = max(3.0, 0.45 * len(confusion.names) + 2.0)
    figure, axes = plt.subplots(1, count, figsize=(size * count, size), dpi=100, squeeze=False)
    for ax, (model, matrix) in zip(axes[0], confusion.matrices.items(), strict=True):
        ax.imshow(matrix, cmap="Blues")
        ticks = range(len(confusion.names))
        ax.set_xticks(list(ticks), confusion.names, rotation=45, ha="right")
        ax.set_yticks(list(ticks), confusion.names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(MODELS.get(model, model))
        peak = max(int(matrix.max()), 1)
        for (t, q), value in np.ndenumerate(matrix):
            colour = "white" if value > peak / 2 else "black"
            ax.text(q, t, str(int(value)), ha="center", va="center", color=colour, fontsize=8)
    return _png(figure)


def classification_samples(samples: Sequence[Any], count: int) -> list[Any]:
    """The examples worth reading first: those the models disagree on, then the rest."""
    disputed = [s for s in samples if len(set(s.answers.values())) > 1]
    agreed = [s for s in samples if len(set(s.answers.values())) <= 1]
    return (disputed + agreed)[:count]


def _metrics_table(metrics: dict[str, float], models: list[str]) -> list[str]:
    from sftpipe.evaluation.metrics import METRICS

    header = "".join(f"<th>{MODELS[m]}</th>" for m in models)
    rows = [f"<table><tr><th>metric</th>{header}<th>tuned - base</th></tr>"]
    for row in METRICS:
        name, shape = row.name, row.format
        if f"tuned_{name}" not in metrics:
            continue
        base = metrics.get(f"base_{name}")
        cells = []
        for model in models:
            value = metrics.get(f"{model}_{name}")
            better = (
                model == "tuned"
                and base is not None
                and value is not None
                and (value - base) * (row.direction or 0) > 0
            )
            css = ' class="num better"' if better else " class=num"
            cells.append(f"<td{css}>{'' if value is None else shape.format(value)}</td>")
        change = ""
        if base is not None:
            delta = metrics[f"tuned_{name}"] - base
            change = f"{delta * 100:+.1f} pt" if "%" in shape else f"{delta:+.4g}"  # rates
        rows.append(f"<tr><td>{row.label}</td>{''.join(cells)}<td class=num>{change}</td></tr>")
    rows.append("</table>")
    return rows


def _per_class_table(metrics: dict[str, float], names: list[str], models: list[str]) -> list[str]:
    from sftpipe.evaluation.class_metrics import metric_label

    header = "".join(f"<th>{MODELS[m]} P / R / F1</th>" for m in models)
    rows = [f"<h2>Per class</h2><table><tr><th>label</th>{header}</tr>"]
    for name in names:
        label = metric_label(name)
        cells = "".join(
            "<td class=num>"
            + " / ".join(
                f"{metrics.get(f'{model}_{kind}.{label}', 0.0):.3f}"
                for kind in ("precision", "recall", "f1")
            )
            + "</td>"
            for model in models
        )
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    rows.append("</table>")
    return rows


def _samples_table(
    samples: Sequence[Any], models: list[str], max_new_tokens: int, classification: bool
) -> list[str]:
    if classification:
        intro = "<h2>Examples</h2><p>Disagreements first; &#10007; marks a wrong label.</p>"
        heads = ["text", "true label", *(MODELS[m] for m in models)]
    else:
        intro = (
            "<h2>Sample answers (greedy)</h2><p>&#9888; marks an answer that did not end within "
            f"the {max_new_tokens}-token budget.</p>"
        )
        heads = ["prompt", "reference", *(MODELS[m] for m in models)]
    rows = [intro, "<table class=sample><tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>"]
    for s in samples:
        cells = [html.escape(s.prompt), html.escape(s.reference)]
        for model in models:
            answer = s.answers.get(model, "")
            if classification:
                flag = "" if answer == s.reference else " &#10007;"
            else:
                flag = "" if s.ended.get(model, True) else " &#9888;"
            cells.append(html.escape(answer) + flag)
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    rows.append("</table>")
    return rows


def write_eval_report(
    path: str | Path,
    metrics: dict[str, float],
    decision: Any,
    spec: Any,
    history: Sequence[dict[str, float]],
    samples: Sequence[Any],
    plots: dict[str, bytes],
    max_new_tokens: int,
    confusion: Confusion | None = None,
) -> None:
    """The evaluation as one self-contained HTML page (shown in the KFP UI, logged to MLflow):
    the gate decision, the metrics table, the loss curve, the plots and sample answers (chat)
    or per-class metrics, confusion matrices and examples (classification)."""
    verdict = "PASSED" if decision.passed else "REJECTED"
    colour = "#0a7a2f" if decision.passed else "#b00020"
    models = [m for m in MODELS if f"{m}_accuracy" in metrics or f"{m}_validation_loss" in metrics]
    parts = [
        "<!doctype html><html><head><meta charset=utf-8><title>sftpipe evaluation</title>"
        f"<style>{_STYLE}</style></head><body><h1>Base vs tuned</h1>",
        f"<h2>Quality gate: <span style='color:{colour}'>{verdict}</span></h2>",
        f"<p>{html.escape(spec.describe())}.</p><ul>",
        *(
            f"<li>{'&#10003;' if c.passed else '&#10007;'} {c.role}: {html.escape(c.describe())}"
            "</li>"
            for c in decision.checks
        ),
        "</ul>",
        *_metrics_table(metrics, models),
    ]
    seconds = metrics.get("evaluation_seconds", 0.0)
    rows = int(metrics["validation_rows"])
    if confusion is not None:
        parts.append(
            f"<p>{rows} validation texts. Base is the base model with a fresh (untrained) "
            "classification head; TF-IDF + LogReg is a logistic regression on character "
            f"n-grams trained on the same training split. Evaluation took {seconds:.0f} s.</p>"
        )
        parts += _per_class_table(metrics, confusion.names, models)
    else:
        parts.append(
            f"<p>{rows} validation conversations for the loss; "
            f"{int(metrics.get('eval_prompts', 0))} prompts answered greedily by both models, at "
            f"most {max_new_tokens} new tokens each; evaluation took {seconds:.0f} s. Loss is the "
            "mean cross-entropy per assistant token (lower is better); text scores compare "
            "answers with the references (higher is better).</p>"
        )
    if history:
        parts.append("<h2>Loss curve</h2>" + _image("loss curve", loss_curve_png(history)))
    if plots:
        title = "Confusion matrices" if confusion is not None else "Generation"
        parts.append(f"<h2>{title}</h2>")
        parts += [_image(name, data) for name, data in plots.items()]
    if samples:
        parts += _samples_table(samples, models, max_new_tokens, confusion is not None)
    parts.append("</body></html>")
    with storage.atomic_file(path) as handle:
        handle.write("\n".join(parts))
