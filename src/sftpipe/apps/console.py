"""What `sftpipe run` shows on the console, and the full log behind it.

KFP's local runner writes everything to `sys.stdout`: its own records through `logging` (a
handler on `sys.stdout` that it installs around every task), each step's executor input as
pretty-printed JSON, and the step's whole output (library warnings and tracebacks included),
about a thousand lines for one run. A user acts on far fewer: which stage runs, the stages'
own `[stage] ...` lines (progress, counts, gate decision) and the result.

`RunLog` takes the place of `sys.stdout` and `sys.stderr` while a run is on: every line goes
to the log file; the console gets one line when a task starts and one when it ends (from
KFP's records, seen by a filter on the root logger, which KFP's handler swapping leaves in
place) and the lines that a stage or `sftpipe` itself prints with its prefix. It works the
same for every KFP runner, since it only reads what the runner prints.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from sftpipe.progress import format_duration

# Lines a user reads: a stage's own (`[clean] 80 of 81 rows kept`), sftpipe's (`[sftpipe] ...`,
# the demo's `sftpipe: converting ...`), a TrainJob node's, and those of the task that runs (a
# pipeline of other components). By name: libraries use brackets too (`[transformers] Ignoring
# ...`, `[KFP Executor ...]`, torchrun's `[rank0]: Traceback`), and those stay in the log.
USER_PREFIX = re.compile(
    r"^(?:\[(?:sftpipe|clean|tokenize|finetune|evaluate|register|mlflow|node-\d+)\] |sftpipe: )"
)
TASK_STARTED = re.compile(r"^Executing task '([^']+)'")
TASK_FINISHED = re.compile(r"^Task '([^']+)' finished with status (\w+)")
# Added to an exception that ends a run: where its traceback is.
LOG_NOTE = "sftpipe log: "
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def plain(text: str) -> str:
    """Without terminal colour codes (KFP's local runner colours task names and statuses)."""
    return ANSI_COLOUR.sub("", text)


class RunLog(io.TextIOBase):
    """A text stream: every line to the log file, the lines a user needs to the console."""

    def __init__(self, path: Path, console: TextIO) -> None:
        super().__init__()
        self.path = path
        self.console = console
        # Line-buffered: `tail -f` on the log follows a run as it goes.
        self._file = path.open("a", encoding="utf-8", errors="replace", buffering=1)
        self._pending = ""
        self._lock = threading.RLock()
        self.started: dict[str, float] = {}
        self.finished: dict[str, str] = {}
        # The last line each task printed: a step that dies before it can report (an import
        # error, a killed process) is named by it.
        self.last_line: dict[str, str] = {}
        self.current_task = ""

    # --- the stream interface (print, logging.StreamHandler, warnings) ---
    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # some libraries read it off sys.stdout
        return "utf-8"

    @property
    def errors(self) -> str:
        return "replace"

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                self._line(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
            self.console.flush()

    def close(self) -> None:
        with self._lock:
            if self._pending:
                self._line(self._pending)
                self._pending = ""
            super().close()
            self._file.close()

    # --- what goes where ---
    def log(self, line: str) -> None:
        """To the log file only."""
        self._file.write(plain(line) + "\n")

    def show(self, line: str) -> None:
        """To the console and the log file."""
        with self._lock:
            self.log(line)
            self.console.write(line + "\n")
            self.console.flush()

    def _line(self, line: str) -> None:
        # The runner indents a step's output by four spaces, and tqdm redraws with \r.
        text = plain(line).rsplit("\r", 1)[-1].strip()
        if USER_PREFIX.match(text) or (
            self.current_task and text.startswith(f"[{self.current_task}] ")
        ):
            self.show(text)
            return
        self.log(line)
        if self.current_task and text.strip("-"):
            self.last_line[self.current_task] = text

    # --- KFP's task records ---
    def task_record(self, message: str) -> None:
        message = plain(message)
        if match := TASK_STARTED.match(message):
            task = match.group(1)
            self.current_task = task
            self.started[task] = time.perf_counter()
            self.show(f"[sftpipe] {task}: started")
        elif match := TASK_FINISHED.match(message):
            task, status = match.groups()
            self.finished[task] = status
            self.current_task = ""
            now = time.perf_counter()
            took = format_duration(now - self.started.get(task, now))
            if status == "SUCCESS":
                self.show(f"[sftpipe] {task}: done in {took}")
            else:
                self.show(f"[sftpipe] {task}: {status} after {took} (full log: {self.path})")

    def failed_task(self) -> str:
        """The task that failed: the one KFP reported, else the one that never finished."""
        failed = [task for task, status in self.finished.items() if status != "SUCCESS"]
        running = [task for task in self.started if task not in self.finished]
        return (failed or running or [""])[-1]


class _TaskRecords(logging.Filter):
    """On the root logger: sees KFP's records before any handler, lets them all through."""

    def __init__(self, run_log: RunLog) -> None:
        super().__init__()
        self.run_log = run_log

    def filter(self, record: logging.LogRecord) -> bool:
        self.run_log.task_record(record.getMessage())
        return True


def log_path(workdir: Path) -> Path:
    """A new file under `<workdir>/logs`, named by the start time (a random suffix keeps two
    runs started in the same second apart)."""
    return workdir / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.log"


@contextlib.contextmanager
def quiet_console(path: Path, console: TextIO | None = None) -> Iterator[RunLog]:
    """While inside: stdout and stderr of this process go to `path`, and only the lines a
    user needs reach `console` (default: the current stdout). Prints the log's path first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run_log = RunLog(path, console or sys.stdout)
    records = _TaskRecords(run_log)
    root = logging.getLogger()
    root.addFilter(records)
    shown = _relative(path)
    run_log.show(f"[sftpipe] full log: {shown}")
    try:
        with contextlib.redirect_stdout(run_log), contextlib.redirect_stderr(run_log):
            yield run_log
    except BaseException as exc:
        # Whatever ends the run, its traceback belongs to the log; the caller reports it in
        # one line and finds the log by this note.
        run_log.log(_traceback())
        exc.add_note(f"{LOG_NOTE}{path}")
        raise
    finally:
        root.removeFilter(records)
        run_log.close()


def _relative(path: Path) -> Path:
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def _traceback() -> str:
    import traceback

    return traceback.format_exc().rstrip()
