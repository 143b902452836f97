"""Console progress for long loops: done/total, a rate and an ETA, one flushed line at a time
(KFP and kubectl logs show plain lines, not carriage-return bars)."""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    def __init__(self, label: str, total: int, unit: str = "it") -> None:
        self.label, self.total, self.unit = label, total, unit
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self, done: int) -> float:
        return self.elapsed() / done * (self.total - done) if done else 0.0

    def update(self, done: int, extra: str = "") -> None:
        rate = done / self.elapsed() if self.elapsed() > 0 else 0.0
        line = (
            f"[{self.label}] {done}/{self.total} {self.unit} | {rate:.2f} {self.unit}/s"
            f" | ETA {format_duration(self.eta(done))}"
        )
        print(f"{line} | {extra}" if extra else line, flush=True)
