"""The metrics table and what reads it: one row per metric decides the gate's direction, the
report's rows (order, label, format, which value is better) and the listings."""

import dataclasses

import pytest

from sftpipe.evaluation import gate, metrics, report


def test_rows_are_unique_and_consistent():
    names = [m.name for m in metrics.METRICS]
    assert len(names) == len(set(names))
    for m in metrics.METRICS:
        assert m.direction in (metrics.HIGHER, metrics.LOWER, None), m.name
        assert m.format.format(0.5), m.name  # a usable format
        assert m.label and m.tasks, m.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        metrics.METRICS[0].name = "x"  # type: ignore[misc]


def test_helpers():
    assert metrics.direction("validation_loss") == metrics.LOWER
    assert metrics.direction("chrf") == metrics.HIGHER
    assert metrics.direction("mean_response_tokens") == 0  # shown, never "better"
    assert metrics.direction("nope") == 0
    assert metrics.needs_generation("eos_rate") and not metrics.needs_generation("macro_f1")
    assert metrics.spoken_list(("a", "b", "c")) == "a, b or c"
    assert metrics.spoken_list(("a",)) == "a"
    assert gate.check_metric("macro_recall") == "macro_recall"
    with pytest.raises(ValueError, match="unknown gate metric 'mean_response_tokens'"):
        gate.check_metric("mean_response_tokens")


def test_the_report_table_follows_the_metrics_table(tmp_path):
    scores = {
        "base_validation_loss": 3.0,
        "tuned_validation_loss": 2.0,
        "base_eos_rate": 0.5,
        "tuned_eos_rate": 0.25,
        "base_mean_response_tokens": 4.0,
        "tuned_mean_response_tokens": 9.0,
        "validation_rows": 4.0,
    }
    spec = gate.GateSpec("validation_loss", 0.0, ())
    decision = gate.decide(spec, gate.prefixed(scores, "base"), gate.prefixed(scores, "tuned"))
    path = tmp_path / "r.html"
    report.write_eval_report(path, scores, decision, spec, [], [], {}, 8)
    page = path.read_text()
    loss, eos, length = (
        metrics.BY_NAME[n].label for n in ("validation_loss", "eos_rate", "mean_response_tokens")
    )
    assert page.index(loss) < page.index(eos) < page.index(length)  # the table's order
    assert '<td class="num better">2.0000</td>' in page  # lower loss is better, 4 decimals
    assert "<td class=num>25.0%</td>" in page and "-25.0 pt" in page  # a rate, in points
    assert "<td class=num>9.0</td>" in page  # no direction: never marked better
