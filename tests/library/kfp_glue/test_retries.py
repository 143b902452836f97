"""Deterministic failures end KFP's retries of finetune at once; transient ones are retried.

KFP 2.17 retries every failed attempt of a task (its retryPolicy has only a count and a
back-off), so the decision is made by the step: a deterministic failure leaves a marker in the
run's checkpoint folder, and the next attempt ends with the same error before doing any work.
Attempts are simulated by calling `fail_fast` again, as a new pod of the same run would.
"""

import pytest

from sftpipe import storage
from sftpipe.errors import SftpipeError
from sftpipe.kfp_glue import retries


def attempt(run_folder, failure=None):
    """One attempt of the step: True when its body ran."""
    ran = []
    with retries.fail_fast(run_folder, "finetune"):
        ran.append(True)
        if failure is not None:
            raise failure
    return bool(ran)


def test_a_deterministic_failure_is_not_retried(tmp_path):
    folder = str(tmp_path / "ckpt" / "run-1")
    nan = SftpipeError("finetune", "the loss is NaN at step 7", "lower the learning rate")
    with pytest.raises(SftpipeError, match="NaN"):
        attempt(folder, nan)
    body_ran = []
    with pytest.raises(SftpipeError) as retried, retries.fail_fast(folder, "finetune"):
        body_ran.append(True)
    assert not body_ran, "the retry must not train again"
    message = str(retried.value)
    assert message.startswith("finetune: an earlier attempt of this step failed deterministically")
    assert str(nan) in message and "start a new pipeline run" in message
    assert "\n" not in message
    assert attempt(str(tmp_path / "ckpt" / "run-2"))  # another run: its own folder, no marker


@pytest.mark.parametrize(
    "failure",
    [storage.TransientError("s3://b/k", "cannot reach the object store"), RuntimeError("CUDA")],
    ids=["transient", "foreign"],
)
def test_transient_and_foreign_failures_are_retried(tmp_path, failure):
    folder = str(tmp_path / "run-1")
    with pytest.raises(type(failure)):
        attempt(folder, failure)
    assert attempt(folder), "the retry runs (and resumes from the checkpoints)"


def test_a_permission_error_is_deterministic(tmp_path):
    folder = str(tmp_path / "run-1")
    with pytest.raises(PermissionError):
        attempt(folder, PermissionError(13, "Permission denied", "/out/model"))
    with pytest.raises(SftpipeError, match="not trying again: /out/model: Permission denied"):
        attempt(folder)


def test_without_a_run_folder_nothing_is_recorded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SftpipeError):
        attempt("", SftpipeError("x", "bad"))
    assert attempt("")
    assert list(tmp_path.iterdir()) == []


def test_the_marker_on_seaweedfs(seaweedfs, s3_env):
    folder = f"s3://{s3_env}/ckpt/run-9"
    assert attempt(folder)  # no marker: an absent object is not an error
    with pytest.raises(SftpipeError):
        attempt(folder, SftpipeError("data", "row 3: not JSON"))
    with pytest.raises(SftpipeError, match="failed deterministically.*row 3: not JSON"):
        attempt(folder)
    assert storage.list_objects(folder) == ["ckpt/run-9/FAILED.txt"]


def test_an_unreachable_store_is_transient_and_a_missing_key_is_not(seaweedfs, s3_env, monkeypatch):
    import boto3
    from botocore.config import Config

    with pytest.raises(SftpipeError) as missing:
        list(storage.iter_lines(f"s3://{s3_env}/nothing-here.jsonl"))
    assert not isinstance(missing.value, storage.TransientError)
    # A port nobody listens on, without boto3's 8 attempts with back-off (they would only wait).
    unreachable = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=1),
    )
    monkeypatch.setattr(storage, "s3_client", lambda: unreachable)
    with pytest.raises(storage.TransientError, match="cannot reach the object store"):
        storage.list_objects(f"s3://{s3_env}/x")


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (SftpipeError("finetune", "the loss is NaN at step 7"), False),
        (storage.TransientError("s3://b/k", "cannot reach the object store"), True),
        (RuntimeError("CUDA error: an illegal memory access"), True),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (PermissionError(13, "Permission denied", "/out/model"), False),
    ],
    ids=["deterministic", "transient", "foreign", "connection-reset", "permission"],
)
def test_a_workers_error_line_keeps_its_kind(exc, transient):
    """torchrun workers and TrainJob nodes report a failure as one line; the step raises it
    again as the same kind, so the retry decision survives the process boundary."""
    from sftpipe.kfp_glue import finetune_launch

    line = finetune_launch.error_line(exc)
    assert line.startswith(finetune_launch.ERROR_PREFIX) and "\n" not in line
    error = line.removeprefix(finetune_launch.ERROR_PREFIX)
    raised = finetune_launch.failure("torchrun (2 processes)", error, "see the log")
    assert isinstance(raised, storage.TransientError) == transient
    assert finetune_launch.TRANSIENT_MARK not in str(raised)
    nothing = finetune_launch.failure("torchrun (2 processes)", "", "see the log")
    assert isinstance(nothing, storage.TransientError)  # killed before it could say why


def test_the_finetune_step_fails_fast_on_its_retry(
    tokenized, tmp_path, mlflow_env, monkeypatch, capsys
):
    """The finetune step as KFP runs it (run_step, a real MLflow server): an attempt that fails
    on a wrong setting (the base model folder does not exist) leaves the marker in the run's
    checkpoint folder; the next attempt of the same run ends with one line at once."""
    from sftpipe.components.finetune import finetune

    from sftpipe.config import PipelineConfig
    from sftpipe.kfp_glue import steps
    from sftpipe.tracking.runs import RUN_ID_ENV

    class Artifact:
        def __init__(self, path):
            self.path, self.uri, self.metadata = str(path), str(path), {}

        def log_metric(self, key, value):
            self.metadata[key] = value

    monkeypatch.setenv(RUN_ID_ENV, "run-retried")
    monkeypatch.delenv("SFTPIPE_ERROR_FILE", raising=False)
    params = PipelineConfig.from_flat(
        {
            "base_model": str(tmp_path / "no-such-model"),
            "checkpoint_uri": str(tmp_path / "ckpt"),
            "mlflow_experiment": "retries",
            "max_steps": 1,
        }
    ).flat()
    wanted = finetune.component_spec.inputs  # what KFP hands the component
    inputs = {k: v for k, v in params.items() if k in wanted} | {"pipeline_run_id": "run-retried"}
    artifacts = {
        "train": Artifact(tokenized[0]),
        "validation": Artifact(tokenized[1]),
        "model": Artifact(tmp_path / "model"),
        "metrics": Artifact(tmp_path / "metrics"),
    }
    lines = []
    for _attempt in range(2):
        with pytest.raises(SystemExit):
            steps.run_step("finetune", **inputs, **artifacts)
        lines.append(capsys.readouterr().err.strip().splitlines()[-1])
    first, second = lines
    assert first.startswith("ERROR [finetune] ") and "no-such-model" in first
    assert second.startswith("ERROR [finetune] finetune: an earlier attempt of this step failed")
    assert first.removeprefix("ERROR [finetune] ") in second
    assert (tmp_path / "ckpt" / "run-retried" / "FAILED.txt").is_file()
