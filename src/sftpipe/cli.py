"""The `sftpipe` command line.

    sftpipe run      the whole pipeline on this machine (KFP local runner), demo defaults
    sftpipe compile  write the pipeline YAML for a Kubeflow cluster
    sftpipe submit   submit the compiled pipeline to a KFP API endpoint
    sftpipe chat     talk to a model (models:/NAME@champion or a folder) in the terminal
    sftpipe models   list registered model versions with their aliases and key metrics

Every pipeline parameter is a flag of `run` and `submit`, generated from `sftpipe.config`:
its help is the field's description, its default the field's default.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from sftpipe.config import FIELDS, SECTIONS, PipelineConfig
from sftpipe.errors import ERROR_FILE_ENV, SftpipeError

DEFAULT_PACKAGE = Path("sftpipe-sft.yaml")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped by section; unset flags stay None (not overrides)."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML file of parameters (flat `name: value`, or by section); flags override it",
    )
    for section_name, section in SECTIONS.items():
        group = parser.add_argument_group(f"{section_name} ({section.__doc__.splitlines()[0]})")
        for name, info in section.model_fields.items():
            flag = "--" + name.replace("_", "-")
            help_text = f"{' '.join(info.description.split())} (default: {info.default!r})"
            if info.annotation is bool:
                group.add_argument(
                    flag,
                    dest=name,
                    action=argparse.BooleanOptionalAction,
                    default=None,
                    help=help_text,
                )
            elif typing.get_origin(info.annotation) is typing.Literal:
                group.add_argument(
                    flag,
                    dest=name,
                    choices=typing.get_args(info.annotation),
                    default=None,
                    help=help_text,
                )
            else:
                group.add_argument(
                    flag,
                    dest=name,
                    type=info.annotation,
                    default=None,
                    metavar=info.annotation.__name__.upper(),
                    help=help_text,
                )


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    values: dict[str, Any] = {}
    if args.config:
        values.update(_read_config_file(args.config))
    values.update({name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None})
    return PipelineConfig.from_flat(values)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SftpipeError(
            str(path), f"cannot read the config file ({exc})", "check the path and YAML"
        ) from None
    if not isinstance(loaded, dict):
        raise SftpipeError(
            str(path), "expected a mapping of parameter: value", "see `sftpipe run --help`"
        )
    flat: dict[str, Any] = {}
    for key, value in loaded.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def cmd_run(args: argparse.Namespace) -> int:
    from sftpipe.local import run_local, with_demo_defaults

    config = with_demo_defaults(config_from_args(args))
    print(
        f"[sftpipe] data: {config.data.data_uri}\n[sftpipe] base model: {config.model.base_model}",
        flush=True,
    )
    result = run_local(config, args.workdir)
    print_summary(config, result)
    return 0


SUMMARY_METRICS = (
    "validation_loss",
    "perplexity",
    "rouge_l",
    "chrf",
    "bleu",
    "eos_rate",
    "mean_response_tokens",
)


def print_summary(config: PipelineConfig, result: Any) -> None:
    from mlflow.tracking import MlflowClient

    from sftpipe.progress import format_duration
    from sftpipe.tracking import model_version_url

    print(
        f"\n[sftpipe] pipeline finished in {format_duration(result.seconds)}; "
        f"artifacts under {result.pipeline_root}"
    )
    name = config.registry.model_name
    if not result.model_uri:
        print(
            "[sftpipe] the tuned model did not pass the quality gate: nothing registered "
            "(see the evaluate report and the MLflow run's sftpipe.gate tag)"
        )
    else:
        number = result.model_uri.rsplit("/", 1)[-1]
        version = MlflowClient(result.tracking_uri).get_model_version(name, number)
        aliases = ", ".join(sorted(version.aliases)) or "none"
        print(f"[sftpipe] registered {result.model_uri} (aliases: {aliases})")
        print(f"    {'metric':<22} {'base':>10} {'tuned':>10}")
        for key in SUMMARY_METRICS:
            base, tuned = version.tags.get(f"base_{key}"), version.tags.get(f"tuned_{key}")
            if base is not None and tuned is not None:
                print(f"    {key:<22} {base:>10} {tuned:>10}")
        print(f"    champion: {version.tags.get('sftpipe.champion', '-')}")
        print(f"[sftpipe] browse: {model_version_url(name, version.version)}")
        print(f"[sftpipe] talk to it: sftpipe chat --model {result.model_uri}")
    print(f"[sftpipe] MLflow UI: mlflow ui --backend-store-uri {result.tracking_uri}")


def cmd_compile(args: argparse.Namespace) -> int:
    from kfp import compiler

    from sftpipe.pipelines.sft_pipeline import build_pipeline

    compiler.Compiler().compile(build_pipeline(gpu=not args.no_gpu), str(args.output))
    print(f"[sftpipe] wrote {args.output}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    import kfp

    config = config_from_args(args)
    package = args.package
    if not package.exists():
        args.output, args.no_gpu = package, False
        cmd_compile(args)
    try:
        client = kfp.Client(host=args.host, existing_token=args.token or None)
        run = client.create_run_from_pipeline_package(
            str(package),
            arguments=config.flat(),
            experiment_name=args.experiment,
            run_name=args.run_name or None,
            enable_caching=None,
        )
    except Exception as exc:  # kfp raises ApiException, urllib3 and connection errors
        raise SftpipeError(
            args.host,
            f"the KFP API refused or did not answer ({exc})",
            "check --host, --token and that the package compiles",
        ) from None
    print(
        f"[sftpipe] submitted run {run.run_id}: {args.host.rstrip('/')}/#/runs/details/{run.run_id}"
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from sftpipe import chat

    return chat.main(args.model, args.system, args.max_new_tokens, args.temperature, args.workdir)


def cmd_models(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from sftpipe import registry

    registry.use_local_store(args.workdir)
    print(registry.format_table(registry.version_rows(MlflowClient(), args.name)))
    return 0


def add_model_commands(commands: Any) -> None:
    """`chat` and `models`: using the registered models."""
    workdir_help = "store of `sftpipe run` when MLFLOW_TRACKING_URI is not set (default: .sftpipe)"
    chat = commands.add_parser("chat", help="talk to a model in the terminal (streaming)")
    chat.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, a save_pretrained folder or s3:// prefix",
    )
    chat.add_argument("--system", default="", help="system prompt leading the conversation")
    chat.add_argument(
        "--max-new-tokens", type=int, default=256, help="answer budget in tokens (default: 256)"
    )
    chat.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)"
    )
    chat.add_argument("--workdir", type=Path, default=Path(".sftpipe"), help=workdir_help)
    chat.set_defaults(handler=cmd_chat)

    listing = commands.add_parser("models", help="list registered versions, aliases, metrics")
    listing.add_argument("name", nargs="?", default="", help="registered model (default: all)")
    listing.add_argument("--workdir", type=Path, default=Path(".sftpipe"), help=workdir_help)
    listing.set_defaults(handler=cmd_models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftpipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the whole pipeline on this machine")
    run.add_argument(
        "--workdir",
        type=Path,
        default=Path(".sftpipe"),
        help="pipeline root, MLflow store and run files (default: .sftpipe)",
    )
    add_config_flags(run)
    run.set_defaults(handler=cmd_run)

    comp = commands.add_parser("compile", help="write the pipeline YAML for a cluster")
    comp.add_argument("--output", "-o", type=Path, default=DEFAULT_PACKAGE)
    comp.add_argument(
        "--no-gpu",
        action="store_true",
        help="leave out the finetune GPU request (kind clusters without GPUs)",
    )
    comp.set_defaults(handler=cmd_compile)

    submit = commands.add_parser("submit", help="submit a run to a KFP API endpoint")
    submit.add_argument(
        "--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080"
    )
    submit.add_argument("--token", default="", help="bearer token for the KFP API")
    submit.add_argument(
        "--package",
        type=Path,
        default=DEFAULT_PACKAGE,
        help="compiled pipeline YAML (compiled first if missing)",
    )
    submit.add_argument("--experiment", default="sftpipe", help="KFP experiment name")
    submit.add_argument("--run-name", default="", help="KFP run name")
    add_config_flags(submit)
    submit.set_defaults(handler=cmd_submit)
    add_model_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SftpipeError as exc:
        print(f"sftpipe: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # KFP's local runner raises RuntimeError when a step fails; the step left its one-line
        # error in the file `sftpipe run` gave it.
        print(
            f"sftpipe: error: {failed_step_error() or _plain(str(exc).splitlines()[0])}",
            file=sys.stderr,
        )
        return 1


def failed_step_error() -> str:
    path = os.environ.get(ERROR_FILE_ENV)
    return Path(path).read_text(encoding="utf-8").strip() if path and Path(path).exists() else ""


def _plain(text: str) -> str:
    """Without terminal colour codes (KFP's local runner colours its messages)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


if __name__ == "__main__":
    raise SystemExit(main())
