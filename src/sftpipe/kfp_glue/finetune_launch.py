"""The fine-tune stage as a command and as a group of torchrun processes.

`python -m sftpipe.kfp_glue.finetune_launch --base-model ... --train ... --output ...` runs
`sftpipe.stages.finetune.run` outside KFP: a restarted pod, the torchrun processes that `launch`
starts (one per GPU of this machine), a Trainer job's nodes, the preemption tests. The data and
the output may be s3:// URIs (a Trainer job's nodes share no disk with the pipeline). A failure
is printed as one line starting with `ERROR_PREFIX`, which `launch` and the TrainJob watcher
pick out of the workers' output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from sftpipe import storage
from sftpipe.config import TrainConfig
from sftpipe.errors import SftpipeError, describe
from sftpipe.stages import finetune

MODULE = "sftpipe.kfp_glue.finetune_launch"  # what torchrun and TrainJob nodes run with -m
ERROR_PREFIX = "ERROR [finetune] "
# After ERROR_PREFIX: a failure that a retry may get past (retries.is_transient); KFP's retries
# of finetune skip the others (sftpipe.kfp_glue.retries).
TRANSIENT_MARK = "(transient) "


def error_line(exc: BaseException) -> str:
    """The one line a failed worker prints."""
    from sftpipe.kfp_glue.retries import is_transient

    return f"{ERROR_PREFIX}{TRANSIENT_MARK if is_transient(exc) else ''}{describe(exc)}"


def failure(where: str, error: str, fix: str) -> SftpipeError:
    """The workers' error line (after ERROR_PREFIX) as an exception: a TransientError when they
    marked it so or printed none (killed, out of memory, a lost node)."""
    if not error or error.startswith(TRANSIENT_MARK):
        message = error.removeprefix(TRANSIENT_MARK) or "see the log above"
        return storage.TransientError(where, message, fix)
    return SftpipeError(where, error, fix)


def processes_per_node(config: TrainConfig) -> int:
    """Training processes for this machine: `nproc_per_node`, else one per visible GPU."""
    return config.nproc_per_node or max(1, torch.cuda.device_count())


def entry_args(
    config: TrainConfig,
    base_model: str,
    train: str | Path,
    validation: str | Path,
    output: str | Path,
    checkpoint_uri: str = "",
    mlflow_run_id: str = "",
) -> list[str]:
    """The arguments of `python -m sftpipe.kfp_glue.finetune_launch` for one training run."""
    args = [
        f"--base-model={base_model}",
        f"--train={train}",
        f"--validation={validation}",
        f"--output={output}",
        f"--config={config.model_dump_json()}",
    ]
    if checkpoint_uri:
        args.append(f"--checkpoint-uri={checkpoint_uri}")
    if mlflow_run_id:
        args.append(f"--mlflow-run-id={mlflow_run_id}")
    return args


def launch(nproc: int, args: list[str]) -> None:
    """Run the entry point with `args` in `nproc` processes on this machine (torchrun: NCCL on
    GPUs, gloo on CPU). Their output streams into ours; SIGTERM is passed on, so they checkpoint
    and stop; a failure is raised as the workers' own one-line error."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        f"--nproc-per-node={nproc}",
        *("-m", MODULE, *args),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
    except ValueError:  # not the main thread
        previous = None
    error = ""
    try:
        for line in process.stdout or ():
            print(line, end="", flush=True)
            if not error and line.startswith(ERROR_PREFIX):
                error = line.removeprefix(ERROR_PREFIX).strip()
        code = process.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code:
        raise failure(
            f"torchrun ({nproc} processes)",
            error or f"{TRANSIENT_MARK}exited with code {code}",
            "see the log",
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--validation", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--checkpoint-uri", default="")
    parser.add_argument("--config", default="{}", help="TrainConfig fields as JSON")
    parser.add_argument("--mlflow-run-id", default="", help="log into this MLflow run")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Train once with the command line's arguments; 0 on success, 1 with one error line."""
    args = _parser().parse_args(argv)
    local = Path(tempfile.mkdtemp(prefix="sftpipe-entry-"))
    try:
        config = TrainConfig.from_values(json.loads(args.config), where="--config")
        tracker = None
        if args.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            from sftpipe.tracking.runs import Tracker

            tracker = Tracker(MlflowClient(), args.mlflow_run_id, "")
        output = local / "model" if storage.is_s3(args.output) else Path(args.output)
        finetune.run(
            config,
            args.base_model,
            storage.local_file(args.train, local / "train.parquet"),
            storage.local_file(args.validation, local / "validation.parquet"),
            output,
            tracker,
            checkpoint_uri=args.checkpoint_uri,
        )
        if output.exists() and output != Path(args.output):  # the main process exported it
            storage.upload_dir(output, args.output)
    except Exception as exc:  # any failure of a worker: one line (launch() reports the first)
        if not isinstance(exc, SftpipeError):
            traceback.print_exc(file=sys.stderr)  # stays in the log, above the line
        print(error_line(exc), file=sys.stderr, flush=True)
        return 1
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
