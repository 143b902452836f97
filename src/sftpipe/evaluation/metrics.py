"""The one table of evaluation metrics: every place that names, orders, compares or shows a
metric reads it here (the gate, the HTML report, the registered version's listing, the
`sftpipe run` summary, the config's help).

Adding a metric = one row here, plus the code that computes it (in its task's evaluation).
Names are unprefixed, as the gate sees them: evaluate reports `base_<name>`, `tuned_<name>`
(and `tfidf_<name>` for classifiers).

This module imports nothing: the config validates gate settings with it.
"""

from __future__ import annotations

from dataclasses import dataclass

HIGHER, LOWER = 1, -1

CHAT, CLASSIFICATION = "chat", "classification"


@dataclass(frozen=True)
class Metric:
    name: str
    direction: int | None  # HIGHER or LOWER is better; None: shown, never gated on
    format: str  # how the report shows a value ("%" in it: a rate, changes in points)
    label: str  # the report's row label
    tasks: tuple[str, ...]  # the tasks whose evaluation reports it
    needs_generation: bool = False  # only measured when answers are generated
    short: str = ""  # its column in `sftpipe models` ("": not listed)
    summary: bool = False  # shown in the `sftpipe run` summary

    @property
    def gateable(self) -> bool:
        return self.direction is not None


METRICS: tuple[Metric, ...] = (
    Metric(
        "validation_loss",
        LOWER,
        "{:.4f}",
        "validation loss (per assistant token)",
        (CHAT, CLASSIFICATION),
        short="val_loss",
        summary=True,
    ),
    Metric("perplexity", LOWER, "{:.2f}", "perplexity", (CHAT,), short="ppl", summary=True),
    Metric(
        "rouge_l",
        HIGHER,
        "{:.2f}",
        "ROUGE-L F1 (0-100)",
        (CHAT,),
        needs_generation=True,
        short="ROUGE-L",
        summary=True,
    ),
    Metric(
        "chrf",
        HIGHER,
        "{:.2f}",
        "chrF (0-100)",
        (CHAT,),
        needs_generation=True,
        short="chrF",
        summary=True,
    ),
    Metric("bleu", HIGHER, "{:.2f}", "BLEU (0-100)", (CHAT,), needs_generation=True, summary=True),
    Metric(
        "eos_rate",
        HIGHER,
        "{:.1%}",
        "EOS rate (answer ended within the budget)",
        (CHAT,),
        needs_generation=True,
        short="EOS",
        summary=True,
    ),
    Metric(
        "mean_response_tokens",
        None,
        "{:.1f}",
        "mean response length (tokens)",
        (CHAT,),
        needs_generation=True,
        summary=True,
    ),
    Metric(
        "generation_tokens_per_s",
        None,
        "{:.1f}",
        "generation speed (tokens/s)",
        (CHAT,),
        needs_generation=True,
    ),
    Metric("accuracy", HIGHER, "{:.1%}", "accuracy", (CLASSIFICATION,), short="acc", summary=True),
    Metric(
        "macro_f1",
        HIGHER,
        "{:.4f}",
        "macro F1",
        (CLASSIFICATION,),
        short="macro F1",
        summary=True,
    ),
    Metric("macro_precision", HIGHER, "{:.4f}", "macro precision", (CLASSIFICATION,)),
    Metric("macro_recall", HIGHER, "{:.4f}", "macro recall", (CLASSIFICATION,)),
    Metric(
        "min_class_recall",
        HIGHER,
        "{:.1%}",
        "worst class recall",
        (CLASSIFICATION,),
        summary=True,
    ),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}

GATE_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.gateable)
"""Metrics a gate can use (those with a direction), in table order."""


def direction(name: str) -> int:
    """HIGHER or LOWER for a gate metric; 0 for anything else (never "better")."""
    metric = BY_NAME.get(name)
    return (metric.direction or 0) if metric else 0


def needs_generation(name: str) -> bool:
    return name in BY_NAME and BY_NAME[name].needs_generation


def listed(what: str) -> tuple[Metric, ...]:
    """The rows shown by one consumer: "short" (`sftpipe models`) or "summary"."""
    return tuple(m for m in METRICS if getattr(m, what))


def spoken_list(names: tuple[str, ...]) -> str:
    """`a, b or c`, for help texts."""
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)
