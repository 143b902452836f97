"""The tasks sftpipe trains (chat, classification), chosen once from the data and consulted
by every stage; see `sftpipe.tasks.base.Task`."""

from __future__ import annotations

from pathlib import Path

from sftpipe.errors import SftpipeError
from sftpipe.tasks import chat, classification
from sftpipe.tasks.base import Task

# Asked in order; the first task that recognizes the data is it (chat, the fallback, is last).
TASKS: tuple[Task, ...] = (classification.TASK, chat.TASK)
TASK_TAG = "sftpipe.task"  # the registered version's task (MLflow tag)


def by_name(name: str) -> Task:
    for task in TASKS:
        if task.name == name:
            return task
    raise SftpipeError(
        "task", f"unknown task {name!r}", f"one of {', '.join(t.name for t in TASKS)}"
    )


def of_tokenized(path: str | Path) -> Task:
    """The task of a tokenized Parquet file (from its schema metadata)."""
    from sftpipe.data.tokenized import schema_metadata

    metadata = schema_metadata(path)
    return next(task for task in TASKS if task.recognizes_tokenized(metadata))


def of_cleaned(label: str | None) -> Task:
    """The task of cleaned data, from its first row's label (None: the row has none)."""
    return next(task for task in TASKS if task.recognizes_cleaned(label))


def of_version_tags(tags: dict[str, str]) -> Task:
    """The task of a registered model version (its `sftpipe.task` tag; versions registered
    before the tag existed are told apart by their metrics: only classifiers have accuracy)."""
    if TASK_TAG in tags:
        return by_name(tags[TASK_TAG])
    return classification.TASK if "tuned_accuracy" in tags else chat.TASK
