"""Reports people look at: the loss-curve plot, the evaluation plots (generation metrics and
response lengths, base vs tuned) and the evaluation HTML (shown in the KFP UI as an HTML
artifact and logged to MLflow). Self-contained: the plots are inline PNGs."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    axes.set_ylabel("loss (per assistant token)")
    axes.grid(alpha=0.3)
    axes.legend()
    return _png(figure)


# Metrics of the report's table, in order: (name, how to show it).
_TABLE = (
    ("validation_loss", "{:.4f}"),
    ("perplexity", "{:.2f}"),
    ("rouge_l", "{:.2f}"),
    ("chrf", "{:.2f}"),
    ("bleu", "{:.2f}"),
    ("eos_rate", "{:.1%}"),
    ("mean_response_tokens", "{:.1f}"),
    ("generation_tokens_per_s", "{:.1f}"),
)
_LABELS = {
    "validation_loss": "validation loss (per assistant token)",
    "rouge_l": "ROUGE-L F1 (0-100)",
    "chrf": "chrF (0-100)",
    "bleu": "BLEU (0-100)",
    "eos_rate": "EOS rate (answer ended within the budget)",
    "mean_response_tokens": "mean response length (tokens)",
    "generation_tokens_per_s": "generation speed (tokens/s)",
}
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


def write_eval_report(
    path: str | Path,
    metrics: dict[str, float],
    decision: Any,
    spec: Any,
    history: Sequence[dict[str, float]],
    samples: Sequence[Any],
    plots: dict[str, bytes],
    max_new_tokens: int,
) -> None:
    """The evaluation as one self-contained HTML page (shown in the KFP UI, logged to MLflow):
    the gate decision, the metrics table, the loss curve, the plots and sample answers."""
    from sftpipe.gate import DIRECTIONS

    verdict = "PASSED" if decision.passed else "REJECTED"
    colour = "#0a7a2f" if decision.passed else "#b00020"
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
        "</ul><table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>",
    ]
    for name, shape in _TABLE:
        if f"base_{name}" not in metrics:
            continue
        base, tuned = metrics[f"base_{name}"], metrics[f"tuned_{name}"]
        direction = DIRECTIONS.get(name, 0)
        better = (tuned - base) * direction > 0
        mark = ' class="num better"' if better else ' class="num"'
        change = f"{tuned - base:+.4g}" if name != "eos_rate" else f"{(tuned - base) * 100:+.1f} pt"
        parts.append(
            f"<tr><td>{_LABELS.get(name, name.replace('_', ' '))}</td>"
            f"<td class=num>{shape.format(base)}</td><td{mark}>{shape.format(tuned)}</td>"
            f"<td class=num>{change}</td></tr>"
        )
    parts += [
        "</table>",
        f"<p>{int(metrics['validation_rows'])} validation conversations for the loss; "
        f"{int(metrics.get('eval_prompts', 0))} prompts answered greedily by both models, at "
        f"most {max_new_tokens} new tokens each; evaluation took "
        f"{metrics.get('evaluation_seconds', 0.0):.0f} s. Loss is the mean cross-entropy per "
        "assistant token (lower is better); text scores compare answers with the references "
        "(higher is better).</p>",
    ]
    if history:
        parts.append("<h2>Loss curve</h2>" + _image("loss curve", loss_curve_png(history)))
    if plots:
        parts.append("<h2>Generation</h2>")
        parts += [_image(name, data) for name, data in plots.items()]
    if samples:
        parts.append(
            "<h2>Sample answers (greedy)</h2><p>&#9888; marks an answer that did not end within "
            f"the {max_new_tokens}-token budget.</p><table class=sample><tr><th>prompt</th>"
            "<th>reference</th><th>base</th><th>tuned</th></tr>"
        )
        for s in samples:
            cells = [html.escape(s.prompt), html.escape(s.reference)]
            for model in ("base", "tuned"):
                flag = "" if s.ended.get(model, True) else " &#9888;"
                cells.append(html.escape(s.answers.get(model, "")) + flag)
            parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    with storage.atomic_file(path) as handle:
        handle.write("\n".join(parts))
