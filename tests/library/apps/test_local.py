"""sftpipe run's plumbing around KFP's local runner (the runs themselves: tests/pipelines)."""

import io
import re
from pathlib import Path

import pytest
from kfp import dsl, local
from kfp.local import subprocess_task_handler

from sftpipe.apps import cli
from sftpipe.apps.cli import build_parser, config_from_args
from sftpipe.apps.console import log_path, quiet_console
from sftpipe.apps.local import DEMO_PRESETS, keep_executor_input_intact


def test_parameters_containing_python3_reach_the_step_unchanged():
    keep_executor_input_intact()
    keep_executor_input_intact()  # idempotent: one wrapper, not two
    command = [
        "sh",
        "-ec",
        'python3 -m kfp.dsl.executor_main "$program_path/ephemeral_component.py" "$@"',
        "def step(): ...",
        "--executor_input",
        '{"base_model": "/venv/lib/python3.11/site-packages/model"}',
    ]
    replaced = subprocess_task_handler.replace_python_executable(command, "/venv/bin/python")
    assert replaced[2].startswith("/venv/bin/python -m kfp.dsl.executor_main")
    assert replaced[5] == command[5]


def test_a_demo_preset_is_overridden_by_flags():
    args = build_parser().parse_args(["run", "--demo", "sentiment", "--learning-rate", "0.001"])
    config = config_from_args(args, DEMO_PRESETS[args.demo])
    assert config.registry.model_name == "sftpipe-sentiment"
    assert config.tokenize.max_length == DEMO_PRESETS["sentiment"]["max_length"]
    assert config.train.learning_rate == 0.001


# --- the console of `sftpipe run`: KFP's real local runner, two lightweight components ---


@dsl.component(install_kfp_package=False)
def talkative(word: str) -> str:
    """Prints what a real step prints: its own line, a library's warning, plain noise."""
    import warnings

    print(f"[talkative] said {word}", flush=True)
    print("Some weights of the model checkpoint were not used (a library's notice)", flush=True)
    print("[transformers] Ignoring clean_up_tokenization_spaces (a library's warning)", flush=True)
    warnings.warn("a deprecation the user cannot act on", UserWarning, stacklevel=1)
    return word


@dsl.component(install_kfp_package=False)
def crashing(word: str):
    """Dies before it can report (as a step does on an import error)."""
    raise ImportError(f"cannot import name {word!r}")


@dsl.pipeline
def quiet_pipeline(word: str = "hello"):
    talkative(word=word)


@dsl.pipeline
def failing_pipeline(word: str = "hello"):
    crashing(word=talkative(word=word).output)


def run_quietly(pipeline, tmp_path):
    console = io.StringIO()
    path = log_path(tmp_path / "work")
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "root"),
        raise_on_error=True,
    )
    error = None
    try:
        with quiet_console(path, console) as run_log:
            try:
                pipeline(word="hello")
            except RuntimeError as exc:
                error = exc
                raise
    except RuntimeError:
        pass
    return console.getvalue().splitlines(), path.read_text(encoding="utf-8"), run_log, error


def test_the_console_shows_stages_and_their_lines_the_log_everything(tmp_path):
    shown, logged, run_log, error = run_quietly(quiet_pipeline, tmp_path)

    assert error is None
    assert shown[0] == f"[sftpipe] full log: {run_log.path}"
    assert shown[1:3] == ["[sftpipe] talkative: started", "[talkative] said hello"]
    assert re.fullmatch(r"\[sftpipe\] talkative: done in \dm\d\ds", shown[3])
    assert len(shown) == 4
    # The log has all of it: the executor input, KFP's records, the notice and the warning.
    assert '"executorInput"' in logged or "Got executor_input" in logged
    assert '"word"' in logged
    assert "Executing task 'talkative'" in logged and "\x1b[" not in logged
    assert "a library's notice" in logged and "UserWarning: a deprecation" in logged
    assert "[transformers] Ignoring" in logged
    assert "[talkative] said hello" in logged


def test_a_step_that_dies_is_named_with_its_last_line(tmp_path):
    shown, logged, run_log, error = run_quietly(failing_pipeline, tmp_path)

    assert isinstance(error, RuntimeError)
    assert run_log.failed_task() == "crashing"
    assert run_log.last_line["crashing"] == "ImportError: cannot import name 'hello'"
    assert shown[-1].startswith("[sftpipe] crashing: FAILURE after")
    assert "Traceback" not in "\n".join(shown) and "Traceback" in logged
    assert len(shown) <= 8


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_a_failure_the_command_did_not_expect_is_one_line_and_logged(tmp_path, capsys, monkeypatch):
    """An exception that is not a step's own (here: the MLflow store cannot be made, under
    /sys, which the kernel refuses to every user, root included) ends `sftpipe run` with one
    line naming the path; its traceback is in the run's log."""
    store = Path("/sys/sftpipe-test")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    workdir = tmp_path / "work"
    data = tmp_path / "chat.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    argv = ["run", "--workdir", str(workdir), "--data-uri", str(data), "--base-model", "m"]

    code = cli.main(argv)

    out, err = capsys.readouterr()
    assert code == 1
    (log,) = (workdir / "logs").glob("run-*.log")
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"sftpipe: error: run: {store}: Operation not permitted (PermissionError")
    assert err.rstrip().endswith(f"(traceback: {log})")
    assert "Traceback (most recent call last)" in log.read_text(encoding="utf-8")
    assert "Traceback" not in out + err
