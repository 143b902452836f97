"""Where a step ends: any exception (not only SftpipeError) becomes one line naming the step and
the path, last in the step's log; the traceback stays in the log above it.

The machines here run tests as root, for whom permission bits are no obstacle: a path under
/sys (sysfs) is refused by the kernel to every user, root included, so it stands for a
read-only output directory."""

from __future__ import annotations

import errno
import json
import re
import sys
from pathlib import Path

import pytest

from sftpipe.config import PipelineConfig
from sftpipe.errors import ERROR_FILE_ENV, SftpipeError, describe
from sftpipe.kfp_glue import steps
from sftpipe.tracking.runs import RUN_ID_ENV

UNWRITABLE = Path("/sys/sftpipe-test-output")

needs_sysfs = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not Path("/sys/kernel").is_dir(),
    reason="the unwritable directory is a sysfs path (Linux)",
)


class Artifact:
    def __init__(self, path: Path) -> None:
        self.path, self.uri, self.metadata = str(path), str(path), {}

    def log_metric(self, key: str, value: float) -> None:
        self.metadata[key] = value


def chat_file(folder: Path) -> Path:
    path = folder / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(4)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@needs_sysfs
def test_an_unwritable_output_is_one_line_naming_step_and_path(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(RUN_ID_ENV, raising=False)  # no MLflow: clean works without it
    error_file = tmp_path / "last-error.txt"
    monkeypatch.setenv(ERROR_FILE_ENV, str(error_file))
    params = PipelineConfig.from_flat({"data_uri": str(chat_file(tmp_path))}).flat()
    data_params = {k: v for k, v in params.items() if k in {"data_uri", "mlflow_experiment"}}

    with pytest.raises(SystemExit) as ended:
        steps.run_step(
            "clean",
            **data_params,
            cleaned=Artifact(UNWRITABLE / "cleaned"),
            quarantine=Artifact(UNWRITABLE / "quarantine"),
            metrics=Artifact(tmp_path / "metrics"),
            report=Artifact(tmp_path / "report.html"),
        )

    assert ended.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert last.startswith(f"ERROR [clean] {UNWRITABLE}")
    # sysfs answers EPERM to mkdir and EACCES to open: both are PermissionError.
    assert re.search(
        r": (Operation not permitted|Permission denied) \(PermissionError, errno", last
    )
    assert last.endswith("(check the permissions of that path)")
    # The traceback is in the step's log, above the line; the error file has the line alone.
    assert err[0] == "Traceback (most recent call last):"
    assert error_file.read_text(encoding="utf-8") == last.removeprefix("ERROR ") + "\n"


def test_a_missing_input_is_one_line_naming_step_and_path(tmp_path, capsys, monkeypatch):
    """A failure the step does not expect (here: the base model folder is gone when finetune
    reads it) is one line too, whatever its type."""
    monkeypatch.delenv(ERROR_FILE_ENV, raising=False)

    def broken(params, **artifacts):
        (tmp_path / "gone" / "config.json").read_text()

    monkeypatch.setitem(steps.STEPS, "finetune", broken)
    with pytest.raises(SystemExit):
        steps.run_step("finetune", learning_rate=1e-4)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"ERROR [finetune] {tmp_path / 'gone' / 'config.json'}: No such file or directory "
        "(FileNotFoundError, errno 2) (check the path)"
    )


def test_disk_full_and_foreign_errors_are_one_line():
    try:
        with open("/dev/full", "w", encoding="utf-8") as full:
            full.write("x")
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
        assert describe(exc) == (
            "No space left on device (OSError, errno 28) "
            "(free space where the step writes (outputs, TMPDIR))"
        )
    moved = OSError(errno.EXDEV, "Invalid cross-device link", "/a/x", None, "/b/x")
    assert describe(moved).startswith("/a/x -> /b/x: Invalid cross-device link (OSError, errno 18)")
    long = ValueError("line one\nline two " + "x" * 1000)
    text = describe(long)
    assert text.startswith("ValueError: line one line two xxx") and "\n" not in text
    assert len(text) < 450 and text.endswith("...")
    assert describe(SftpipeError("f.jsonl", "bad", "fix it")) == "f.jsonl: bad (fix it)"
    assert describe(KeyError()) == "KeyError"


@needs_sysfs
def test_a_finetune_worker_ends_with_one_line_whatever_fails(tiny_model_dir, tokenized, capsys):
    """The entry point of torchrun workers and TrainJob nodes: here the export folder cannot be
    made; the worker's line is what `launch` reports for the group."""
    from sftpipe.kfp_glue import finetune_launch

    train, validation = tokenized
    argv = [
        *("--base-model", str(tiny_model_dir), "--train", str(train)),
        *("--validation", str(validation), "--output", str(UNWRITABLE / "model")),
        *("--config", json.dumps({"max_steps": 1, "eval_every": 1, "precision": "fp32"})),
    ]
    assert finetune_launch.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"{finetune_launch.ERROR_PREFIX}{UNWRITABLE}")
    assert "(PermissionError" in err[-1] and "Traceback (most recent call last):" in err
