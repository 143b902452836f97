"""The data reports: one self-contained HTML page per data step (shown in the KFP UI as the
step's HTML artifact and logged to MLflow). Bars are plain HTML, so the page needs nothing
but a browser, and building it costs nothing next to the data."""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sftpipe import storage
from sftpipe.data.schemas import FILTER_REASONS

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:4px 9px;
text-align:left;vertical-align:top}th{background:#f3f3f3}.num{text-align:right;
font-variant-numeric:tabular-nums}.bar{background:#4a78c2;height:12px;display:inline-block}
.filter{color:#666}.raw{font-family:monospace;font-size:12px;white-space:pre-wrap;
max-width:560px;word-break:break-all}.loss{background:#c8f0c8}.tok{border-right:1px solid #ddd}
h2{margin-top:28px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]], numeric: set[int]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class=num>{c}</td>" if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def histogram(counts: Mapping[Any, int], label: Any, title: str) -> str:
    """A horizontal bar chart of `counts` (keys in order), labelled by `label(key)`."""
    if not counts:
        return f"<p>{_e(title)}: no data.</p>"
    top = max(counts.values()) or 1
    rows = [
        (
            _e(label(key)),
            f"{counts[key]:,}",
            f"<span class=bar style='width:{max(1, round(300 * counts[key] / top))}px'></span>",
        )
        for key in sorted(counts)
    ]
    return f"<h3>{_e(title)}</h3>" + _table(("range", "rows", ""), rows, {1})


def log2_label(bin_index: int) -> str:
    """Label of a log2 bin (`int.bit_length`): 0, 1, 2-3, 4-7, ..."""
    if bin_index <= 1:
        return str(bin_index)
    return f"{1 << (bin_index - 1):,}-{(1 << bin_index) - 1:,}"


def _page(title: str, parts: list[str]) -> str:
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{_e(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>"
        + "\n".join(parts)
        + "</body></html>"
    )


def _reasons(dropped: Mapping[str, int], examples: Mapping[str, Mapping[str, str]]) -> str:
    rows = []
    for reason, count in sorted(dropped.items(), key=lambda item: (-item[1], item[0])):
        example = examples.get(reason, {})
        kind = "filter" if reason in FILTER_REASONS else "broken"
        rows.append(
            (
                f"<span class={'filter' if kind == 'filter' else ''}>{_e(reason)}</span>",
                f"{count:,}",
                _e(kind),
                _e(example.get("source", "")),
                _e(example.get("detail", "")),
                f"<div class=raw>{_e(example.get('raw', '')[:400])}</div>",
            )
        )
    if not rows:
        return "<p>No row was quarantined.</p>"
    return _table(("reason", "rows", "kind", "example at", "detail", "raw (start)"), rows, {1})


def write_clean_report(path: str | Path, report: Any, config: Any) -> None:
    """The clean step's report: counts per reason with an example each, PII, languages,
    duplicates and length histograms."""
    stats = report.stats
    quarantined = sum(report.dropped.values())
    parts = [
        f"<p>Input <code>{_e(config.data_uri)}</code>: {report.sources} file(s), "
        f"{report.rows_in:,} rows; <b>{report.rows_out:,} kept</b> ({report.task}), "
        f"{quarantined:,} quarantined ({report.bad_rows:,} broken, the rest filtered or "
        f"duplicates; the step fails above max_bad_fraction={config.max_bad_fraction} broken), "
        f"{report.empty_turns_dropped:,} empty turns dropped; {report.seconds:.1f} s.</p>",
        "<h2>Quarantine by reason</h2>",
        _reasons(report.dropped, stats.examples),
        "<h2>Duplicates</h2>",
        f"<p>{report.dropped.get('duplicate', 0):,} exact and "
        f"{report.dropped.get('near_duplicate', 0):,} near duplicates (MinHash LSH, estimated "
        f"Jaccard &ge; {config.near_duplicate_threshold}) "
        + ("removed." if config.dedupe else "kept (dedupe off), grouped for the split.")
        + "</p>",
        "<h2>PII replaced</h2>",
        _table(
            ("kind", "replacements"),
            [(_e(k), f"{n:,}") for k, n in sorted(stats.pii.items())] or [("none", "0")],
            {1},
        ),
        "<h2>Languages (kept rows)</h2>",
        histogram(stats.languages, str, "detected language"),
    ]
    if stats.labels:
        parts += ["<h2>Labels</h2>", histogram(stats.labels, str, "label")]
    parts += [
        "<h2>Lengths (rows that passed the checks)</h2>",
        histogram(stats.chars, log2_label, "characters per conversation"),
        histogram(stats.turns, str, "messages per conversation"),
        "<p>Token lengths are in the tokenize report.</p>",
    ]
    with storage.atomic_file(path) as handle:
        handle.write(_page("sftpipe clean report", parts))


def write_tokenize_report(path: str | Path, report: Any, config: Any, sample: str) -> None:
    """The tokenize step's report: counts, truncation, packing efficiency, token histogram
    and one training sample with its loss-bearing tokens highlighted."""
    metrics = report.metrics()
    rows = [(_e(k), f"{v:,.4g}") for k, v in metrics.items()]
    parts = [
        f"<p>Task {report.task}; max_length {config.max_length}, truncation "
        f"{config.truncation}, packing {'on' if config.packing else 'off'}; "
        f"{report.seconds:.1f} s.</p>",
        "<h2>Counts</h2>",
        _table(("metric", "value"), rows, {1}),
    ]
    if warning := report.unknown_token_warning():
        parts.insert(0, f"<p style='color:#b00020'><b>Warning:</b> {_e(warning)}.</p>")
    if report.task == "chat":
        parts.append(
            f"<p>Packing efficiency (non-pad fraction if every row were padded to max_length): "
            f"packed {report.packing_efficiency:.1%}, unpacked {report.unpacked_efficiency:.1%}."
            "</p>"
        )
    if report.label_map:
        parts += [
            "<h2>Label map</h2>",
            _table(("label", "id"), [(_e(k), v) for k, v in report.label_map.items()], {1}),
        ]
    parts += [
        "<h2>Token lengths</h2>",
        histogram(report.token_hist, log2_label, "tokens per example (before truncation)"),
    ]
    if sample:
        parts += [
            "<h2>A training sample</h2><p>Green tokens carry a label (trained); the rest is "
            "context. Every assistant turn should be green through its end-of-turn token.</p>",
            sample,
        ]
    with storage.atomic_file(path) as handle:
        handle.write(_page("sftpipe tokenize report", parts))


def highlight_tokens(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    """One sample as HTML: each token in a box, loss-bearing ones green."""
    pieces = []
    for token, label in zip(input_ids, labels, strict=True):
        text = tokenizer.decode([token])
        css = "tok loss" if label != -100 else "tok"
        shown = _e(text).replace("\n", "&#8629;<br>")
        pieces.append(f"<span class='{css}'>{shown}</span>")
    return f"<div class=raw>{''.join(pieces)}</div>"
