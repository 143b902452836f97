"""The quality gate: may a candidate model replace a baseline?

A gate has a primary metric and guard metrics. The candidate passes when it beats the baseline
on the primary metric by more than a margin AND regresses on no guard metric by more than that
guard's allowance. "Beats" and "regresses" follow each metric's direction (lower validation
loss is better, a higher chrF or EOS rate is better); margins and allowances are absolute, in
the metric's own units.

The same gate decides twice: in evaluate (tuned vs base; the decision goes into the Metrics,
the HTML report and the MLflow run) and in register, which enforces it again from the metrics
and then uses it once more to decide whether the new version takes `champion` from the current
champion (re-scored on the same evaluation set).

Metric names are those of the evaluation without the model prefix: `validation_loss` for
`base_validation_loss` / `tuned_validation_loss`; which metrics exist and which way is better
comes from the metrics table (`sftpipe.evaluation.metrics`). Each task has its own default gate
(`sftpipe.tasks`); the config's `gate_metric` / `gate_guards` override it.

This module imports nothing heavy: the config validates gate settings with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from sftpipe.errors import SftpipeError
from sftpipe.evaluation import metrics

HIGHER, LOWER = metrics.HIGHER, metrics.LOWER

DIRECTIONS: dict[str, int] = {m.name: m.direction for m in metrics.METRICS if m.direction}
"""Metrics a gate can use, and which way is better (from the metrics table)."""

GENERATION_METRICS = frozenset(m.name for m in metrics.METRICS if m.needs_generation)
"""Metrics that need generated answers (the others come from the loss pass alone)."""

NO_GUARDS = "none"


@dataclass(frozen=True)
class TaskGate:
    """A task's own gate, used when the config leaves gate_metric / gate_guards empty."""

    primary: str
    guards: str


@dataclass(frozen=True)
class Guard:
    metric: str
    allowed_regression: float


@dataclass(frozen=True)
class GateSpec:
    primary: str
    margin: float
    guards: tuple[Guard, ...]

    @classmethod
    def from_fields(
        cls, gate_metric: str, min_improvement: float, gate_guards: str, defaults: TaskGate
    ) -> GateSpec:
        """The gate from the config fields; empty fields mean the task's defaults."""
        primary = check_metric(gate_metric or defaults.primary)
        return cls(primary, min_improvement, parse_guards(gate_guards or defaults.guards))

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.primary, *(g.metric for g in self.guards if g.metric != self.primary))

    @property
    def needs_generation(self) -> bool:
        return any(m in GENERATION_METRICS for m in self.metrics)

    def describe(self) -> str:
        guards = ", ".join(
            f"{g.metric} (may regress by {g.allowed_regression:g})" for g in self.guards
        )
        return (
            f"primary {self.primary} ({'higher' if DIRECTIONS[self.primary] > 0 else 'lower'} "
            f"is better) must improve by more than {self.margin:g}; guards: {guards or 'none'}"
        )


def check_metric(name: str) -> str:
    if name not in DIRECTIONS:
        raise ValueError(f"unknown gate metric {name!r}; choose from {', '.join(DIRECTIONS)}")
    return name


def parse_guards(text: str) -> tuple[Guard, ...]:
    """`"eos_rate:0.05,chrf:2"` -> guards; `"none"` -> no guards. Raises ValueError."""
    if text.strip().lower() == NO_GUARDS:
        return ()
    guards = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, allowance = item.partition(":")
        if not sep:
            raise ValueError(f"guard {item!r} is not metric:allowed_regression")
        try:
            value = float(allowance)
        except ValueError:
            raise ValueError(f"guard {item!r}: {allowance!r} is not a number") from None
        if not value >= 0 or math.isinf(value):
            raise ValueError(f"guard {item!r}: the allowed regression must be >= 0")
        guards.append(Guard(check_metric(name.strip()), value))
    return tuple(guards)


@dataclass(frozen=True)
class Check:
    metric: str
    role: str  # "primary" or "guard"
    baseline: float
    candidate: float
    improvement: float  # candidate better than baseline by this much (direction-aware)
    threshold: float  # primary: improvement must be > threshold; guard: >= -threshold
    passed: bool

    def describe(self) -> str:
        arrow = f"{self.metric} {self.baseline:.4g} -> {self.candidate:.4g}"
        if self.role == "primary":
            relation = ">" if self.passed else "<="
            return (
                f"{arrow}: improvement {self.improvement:.4g} {relation} margin {self.threshold:g}"
            )
        if self.passed:
            return f"{arrow}: within the allowed regression {self.threshold:g}"
        return f"{arrow}: regressed by {-self.improvement:.4g} > allowed {self.threshold:g}"


@dataclass(frozen=True)
class Decision:
    passed: bool
    checks: tuple[Check, ...]
    baseline: str  # what was compared: "base", "champion v3", ...
    candidate: str

    def reasons(self) -> list[str]:
        """The failed checks when refused, every check when passed."""
        failed = [c for c in self.checks if not c.passed]
        return [c.describe() for c in (failed if failed else self.checks)]

    def summary(self) -> str:
        """One line for tags and logs: `passed (tuned vs base): ...` or `rejected ...`."""
        verdict = "passed" if self.passed else "rejected"
        return f"{verdict} ({self.candidate} vs {self.baseline}): " + "; ".join(self.reasons())

    def metrics(self, prefix: str = "gate") -> dict[str, float]:
        """Numbers for KFP Metrics / MLflow: the verdict and the primary improvement."""
        primary = self.checks[0]
        return {
            f"{prefix}_passed": float(self.passed),
            f"{prefix}_primary_improvement": primary.improvement,
        }


def prefixed(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """`{"tuned_chrf": 1.0, ...}`, "tuned" -> `{"chrf": 1.0, ...}`."""
    start = prefix + "_"
    return {k[len(start) :]: float(v) for k, v in metrics.items() if k.startswith(start)}


def decide(
    spec: GateSpec,
    baseline: Mapping[str, float],
    candidate: Mapping[str, float],
    baseline_name: str = "base",
    candidate_name: str = "tuned",
) -> Decision:
    """Apply the gate to two metric dicts keyed by unprefixed metric names."""
    checks = []
    for role, metric, threshold in (
        ("primary", spec.primary, spec.margin),
        *(("guard", g.metric, g.allowed_regression) for g in spec.guards),
    ):
        for who, values in ((baseline_name, baseline), (candidate_name, candidate)):
            if metric not in values or math.isnan(values[metric]):
                hint = (
                    "set --eval-prompts above 0 so answers are generated"
                    if metric in GENERATION_METRICS
                    else "check the evaluation metrics"
                )
                raise SftpipeError("gate", f"{who} has no {metric!r} metric", hint)
        before, after = float(baseline[metric]), float(candidate[metric])
        improvement = (after - before) * DIRECTIONS[metric]
        passed = improvement > threshold if role == "primary" else improvement >= -threshold
        checks.append(Check(metric, role, before, after, improvement, threshold, passed))
    return Decision(all(c.passed for c in checks), tuple(checks), baseline_name, candidate_name)
