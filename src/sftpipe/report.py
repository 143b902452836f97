"""Reports people look at: the loss-curve plot and the evaluation HTML (shown in the KFP UI as
an HTML artifact and logged to MLflow). Self-contained: the plot is an inline PNG."""

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
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def write_eval_report(
    path: str | Path,
    metrics: dict[str, float],
    history: Sequence[dict[str, float]],
    samples: Sequence[Any],
) -> None:
    rows = []
    for name in ("validation_loss", "perplexity"):
        base, tuned = metrics[f"base_{name}"], metrics[f"tuned_{name}"]
        mark = ' class="num better"' if tuned < base else ' class="num"'
        rows.append(
            f"<tr><td>{name.replace('_', ' ')}</td><td class=num>{base:.4f}</td>"
            f"<td{mark}>{tuned:.4f}</td></tr>"
        )
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>sftpipe evaluation</title>"
        f"<style>{_STYLE}</style></head><body><h1>Base vs tuned</h1>",
        "<table><tr><th>metric</th><th>base</th><th>tuned</th></tr>",
        *rows,
        "</table>",
        f"<p>Validation conversations: {int(metrics['validation_rows'])}. Lower is better; "
        "loss is the mean cross-entropy per assistant token.</p>",
    ]
    if history:
        image = base64.b64encode(loss_curve_png(history)).decode()
        parts.append(
            f"<h2>Loss curve</h2><img alt='loss curve' src='data:image/png;base64,{image}'>"
        )
    if samples:
        parts.append(
            "<h2>Sample answers (greedy)</h2><table class=sample><tr><th>prompt</th>"
            "<th>reference</th><th>base</th><th>tuned</th></tr>"
        )
        for s in samples:
            cells = (s.prompt, s.reference, s.answers.get("base", ""), s.answers.get("tuned", ""))
            parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    with storage.atomic_file(path) as handle:
        handle.write("\n".join(parts))
