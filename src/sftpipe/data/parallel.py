"""Ordered, bounded parallel map over batches, for the data stages.

Results come back in input order (outputs are deterministic whatever the scheduling) and at
most a few batches are in flight, so reading never runs ahead of the workers and memory stays
bounded. Small inputs (fewer batches than would fill the window) stay in this process: no
start-up cost for tests and tiny data. Workers are forked: they inherit the parent's state
(a loaded tokenizer, the options), which must not have started threads that matter.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _initialize() -> None:
    # One process per core already: a tokenizer must not start its own thread pool on top.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


def ordered_map(fn: Callable[[T], R], batches: Iterable[T], num_workers: int = 0) -> Iterator[R]:
    """`fn(batch)` for every batch, in order; `num_workers` processes (0: one per core)."""
    workers = num_workers or cpu_count()
    batches = iter(batches)
    window = 2 * workers + 2
    head: list[T] = []
    for batch in batches:
        head.append(batch)
        if len(head) >= window:
            break
    if workers <= 1 or len(head) < window:
        for batch in head:
            yield fn(batch)
        for batch in batches:
            yield fn(batch)
        return
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_initialize
    ) as pool:
        pending: collections.deque[concurrent.futures.Future[Any]] = collections.deque(
            pool.submit(fn, batch) for batch in head
        )
        for batch in batches:
            result = pending.popleft().result()
            pending.append(pool.submit(fn, batch))
            yield result
        while pending:
            yield pending.popleft().result()
