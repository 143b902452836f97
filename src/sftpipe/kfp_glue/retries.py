"""Retries on a cluster: transient failures are retried, deterministic ones fail fast.

What KFP 2.17 offers: a task's retryPolicy has a count and a back-off (duration, factor,
maximum) and nothing else; the backend compiles it into an Argo retryStrategy without a
retryPolicy or expression, so Argo retries every failed attempt of the main container, whatever
the exit code. A step cannot say "do not retry me" by how it exits.

So the decision lives in sftpipe:
- Transient I/O is retried inside the steps, where it happens: boto3's standard retry mode
  (8 attempts with back-off, storage.s3_client), MLflow's HTTP retries, checkpoint uploads
  (modeling.checkpoint._retry), the TrainJob driver re-attaching to a running job. What outlives
  those is a `storage.TransientError`.
- KFP retries (ClusterOptions.retries) are set on finetune only (its single-node and TrainJob
  tasks): a lost or preempted GPU node is the failure worth a new pod, and the retry resumes
  from the run's checkpoints. clean, tokenize, evaluate and register get no KFP retries: what
  fails there after the in-process retries is deterministic (the same data, the same error).
- A finetune attempt that fails deterministically (`is_transient` false: an SftpipeError such
  as a NaN loss, bad data, a wrong setting; a permission or disk-full OSError) leaves a marker in
  the run's own checkpoint folder (`fail_fast`); the attempts KFP starts after it find the
  marker and end at once with the same one-line error, before loading data or a model, instead
  of training again. Transient errors and other exceptions (a CUDA or NCCL error, a connection
  reset, a killed process) leave no marker: the retry trains, resuming. torchrun workers and
  TrainJob nodes carry the verdict across the process boundary in their error line
  (finetune_launch.TRANSIENT_MARK).
  Without checkpoint_uri there is no run folder and so no marker: KFP's retries then repeat
  the deterministic failure too (checkpoint_uri is needed to resume anyway).
A new pipeline run has a new run key, hence a new checkpoint folder without a marker; a
"Retry" of the same KFP run after fixing the input hits the marker: start a new run instead.
"""

from __future__ import annotations

import contextlib
import errno
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sftpipe import storage
from sftpipe.errors import SftpipeError, describe

MARKER = "FAILED.txt"
# OSErrors that a new pod would meet again: the same path, the same permissions, the same size.
DETERMINISTIC_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENOSPC,
    errno.EDQUOT,
}


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may get past `exc`: a storage.TransientError, or an exception sftpipe did
    not expect (a CUDA or NCCL error, a connection reset, a bug) unless it is an OSError of the
    kinds above. Every other SftpipeError (bad input, a NaN loss, a wrong setting) is not."""
    if isinstance(exc, storage.TransientError):
        return True
    if isinstance(exc, SftpipeError):
        return False
    return not (isinstance(exc, OSError) and exc.errno in DETERMINISTIC_ERRNOS)


def _marker_uri(run_folder: str) -> str:
    return f"{run_folder.rstrip('/')}/{MARKER}"


def _read_marker(run_folder: str) -> str:
    uri = _marker_uri(run_folder)
    if storage.is_s3(uri):
        try:
            with contextlib.closing(storage.open_binary(uri)) as stream:
                return stream.read().decode("utf-8", "replace").strip()
        except storage.TransientError:
            return ""  # unknown: better one needless retry than a wrong verdict
        except SftpipeError:  # no such object (or bucket): no earlier deterministic failure
            return ""
    path = Path(uri)
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


def _write_marker(run_folder: str, message: str) -> None:
    """Best effort: without the marker a retry only repeats the failure."""
    uri = _marker_uri(run_folder)
    try:
        if storage.is_s3(uri):
            with tempfile.TemporaryDirectory(prefix="sftpipe-") as tmp:
                path = Path(tmp) / MARKER
                path.write_text(message + "\n", encoding="utf-8")
                storage.upload_file(path, uri)
        else:
            with storage.atomic_file(uri) as handle:
                handle.write(message + "\n")
    except (SftpipeError, OSError) as exc:
        print(f"[retries] could not leave the failure marker at {uri} ({exc})", flush=True)


@contextlib.contextmanager
def fail_fast(run_folder: str, step: str) -> Iterator[None]:
    """Around a step that KFP retries; `run_folder` is this pipeline run's own folder (finetune:
    its checkpoint prefix), "" for none. See the module docstring."""
    if not run_folder:
        yield
        return
    earlier = _read_marker(run_folder)
    if earlier:
        raise SftpipeError(
            step,
            "an earlier attempt of this step failed deterministically, not trying again: "
            + earlier,
            f"fix the cause and start a new pipeline run (marker: {_marker_uri(run_folder)})",
        )
    try:
        yield
    except Exception as exc:
        if not is_transient(exc):
            _write_marker(run_folder, describe(exc))
        raise
