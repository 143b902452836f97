"""Architecture rules, measured from the code's imports (`ast`, every import statement,
function-level ones included: a lazy import is a dependency all the same; only an entry-point
shim under `if __name__ == "__main__":` is not one).

Layers, lowest first; a module may import its own layer and the layers below:

    config, errors, storage, progress
    data, modeling, evaluation, tracking, tasks
    stages              (orchestration: a stage imports no other stage)
    kfp_glue
    components
    pipelines
    apps

Also: no import cycles between modules; every metric the gate knows is a row of the metrics
table; the cluster flags of `sftpipe compile` / `submit` are generated from `ClusterOptions`.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {  # module prefix -> folder (as pyproject's package-dir maps them)
    "sftpipe": ROOT / "src" / "sftpipe",
    "sftpipe.components": ROOT / "components",
    "sftpipe.pipelines": ROOT / "pipelines",
}
LAYERS = (
    ("sftpipe", "sftpipe.config", "sftpipe.errors", "sftpipe.storage", "sftpipe.progress"),
    ("sftpipe.data", "sftpipe.modeling", "sftpipe.evaluation", "sftpipe.tracking", "sftpipe.tasks"),
    ("sftpipe.stages",),
    ("sftpipe.kfp_glue",),
    ("sftpipe.components",),
    ("sftpipe.pipelines",),
    ("sftpipe.apps",),
)
# The one typed config validates its knobs with the parsers of the modules that own them (PII
# kinds, languages, label maps, gate metrics). They import nothing from the config's layer back
# but types, so there is no cycle; these are the only imports allowed to point up.
CONFIG_VALIDATORS = {
    ("sftpipe.config", "sftpipe.data.langid"),
    ("sftpipe.config", "sftpipe.data.pii"),
    ("sftpipe.config", "sftpipe.data.records"),
    ("sftpipe.config", "sftpipe.evaluation.gate"),
    ("sftpipe.config", "sftpipe.evaluation.metrics"),
}


def modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([prefix, *parts])] = path
    return found


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, except under `if __name__ == "__main__":` (an entry-point shim
    runs only as the program, never when the module is imported: no dependency of it)."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        pending.extend(child for child in ast.iter_child_nodes(node) if not _is_main_guard(child))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the sftpipe modules it imports (a package's name when only the package is)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                for alias in node.names:  # `from pkg import module` imports the module
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in known else base)
        resolved = set()
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                resolved.add(target)
        graph[name] = resolved
    return graph


def layer(module: str) -> int:
    found = 0
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or (p != "sftpipe" and module.startswith(p + ".")) for p in prefixes):
            found = index
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_the_imports(graph):
    """The measurement itself: known edges are found (relative, from-package, lazy)."""
    assert "sftpipe.stages.evaluate" in graph["sftpipe.kfp_glue.steps"]
    assert "sftpipe.tasks" in graph["sftpipe.stages.evaluate"]
    assert "sftpipe.evaluation.metrics" in graph["sftpipe.evaluation.gate"]
    assert "sftpipe.tasks" in graph["sftpipe.apps.cli"]  # imported inside a function


def test_no_stage_imports_another_stage(graph):
    crossing = sorted(
        (module, target)
        for module, targets in graph.items()
        if module.startswith("sftpipe.stages.")
        for target in targets
        if target.startswith("sftpipe.stages.")
    )
    assert crossing == [], "stages import each other; move what they share below the stages"


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_no_upward_imports(graph):
    upward = sorted(
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if layer(target) > layer(module) and (module, target) not in CONFIG_VALIDATORS
    )
    assert upward == [], "imports that point up a layer (see LAYERS)"


def test_every_gate_metric_is_in_the_metrics_table():
    from sftpipe import tasks
    from sftpipe.evaluation import gate, metrics

    assert set(gate.DIRECTIONS) == {m.name for m in metrics.METRICS if m.gateable}
    assert set(metrics.BY_NAME) >= gate.GENERATION_METRICS
    for task in tasks.TASKS:
        spec = gate.GateSpec.from_fields("", 0.0, "", task.default_gate)
        for name in spec.metrics:
            assert metrics.BY_NAME[name].gateable, (task.name, name)
            assert task.name in metrics.BY_NAME[name].tasks, (task.name, name)
    assert len(metrics.BY_NAME) == len(metrics.METRICS), "a metric appears twice"
    every_task = {t.name for t in tasks.TASKS}
    assert all(set(m.tasks) <= every_task for m in metrics.METRICS)


def test_the_consumers_of_metrics_read_the_table():
    from sftpipe.apps import cli
    from sftpipe.config import RegisterConfig
    from sftpipe.evaluation import metrics
    from sftpipe.tracking import registry

    assert tuple(m.name for m in metrics.METRICS if m.summary) == cli.SUMMARY_METRICS
    assert (
        tuple((f"tuned_{m.name}", m.short) for m in metrics.METRICS if m.short)
        == registry.KEY_METRICS
    )
    help_text = RegisterConfig.model_fields["gate_metric"].description
    assert metrics.spoken_list(metrics.GATE_METRICS) in help_text


def test_cli_cluster_flags_are_generated_from_cluster_options():
    from sftpipe.pipelines.cluster import ClusterOptions

    from sftpipe.apps import cli

    parser = cli.build_parser()
    for command in ("compile", "submit"):
        sub = parser._subparsers._group_actions[0].choices[command]  # argparse has no API
        dests = {a.dest for a in sub._actions if a.dest.startswith(cli.CLUSTER_DEST)}
        fields = {cli.CLUSTER_DEST + f.name for f in dataclasses.fields(ClusterOptions)}
        assert dests == fields, command
    # No flag given: exactly the defaults; every field can be set from its flag.
    assert cli.cluster_options_from_args(parser.parse_args(["compile"])) == ClusterOptions()
    flags = "--no-gpu --gpu-count 3 --backoff-max 9m --cpu-request finetune=2 --toleration"
    args = parser.parse_args(["compile", *flags.split(), "pool=a:NoExecute"])
    options = cli.cluster_options_from_args(args)
    assert (options.gpu, options.accelerator_count, options.backoff_max) == (False, 3, "9m")
    assert options.cpu_requests == ClusterOptions().cpu_requests | {"finetune": "2"}
    assert [str(t) for t in options.tolerations] == ["pool=a:NoExecute"]


@pytest.mark.parametrize("module", ["sftpipe.evaluation.gate", "sftpipe.tasks", "sftpipe.apps.cli"])
def test_light_modules_stay_light(module):
    """The config validates with the gate, and the CLI consults the tasks: importing them
    must not pull in torch, transformers or mlflow (seconds each)."""
    import subprocess
    import sys

    heavy = ("torch", "transformers", "mlflow")
    code = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
