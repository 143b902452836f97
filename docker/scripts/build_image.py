#!/usr/bin/env python3
"""Build an image with BuildKit the way `make images` does: this machine's pip settings passed
in as build secrets, a temporary tag that is renamed only when the build succeeded, the whole
log in a file and one line when it fails.

Usage (the docker command line after the script's own options):
    build_image.py [--log FILE] docker build -f docker/Dockerfile [ARGS...] -t IMAGE .

- The docker client: the one given, unless it is plain `docker` and the first `docker` on PATH
  cannot build with BuildKit (a client >= 23 without buildx): then the first one that can.
- pip inside the build sees this machine's pip settings (`pip config list`: index URLs,
  find-links, CA certificate, timeout) as the build secrets `pip_conf` and `pip_cert`, never
  as build args or layers: the Dockerfiles mount them for their `pip install` steps only.
  Local sources (file:// indexes, find-links folders) are served read-only on 127.0.0.1 for
  the build's duration, and the build uses host networking to reach them.
- torch: when a local find-links folder holds the very wheel the Dockerfile's torch index
  would serve (torch-<TORCH_VERSION>+<variant>, the variant being the index's last path part,
  e.g. cpu, or --torch-variant), TORCH_INDEX_URL points at that folder instead. Nothing is
  asked of the index to decide.
- The image is built as IMAGE-building-<pid> and tagged IMAGE only on success: a failed build
  never leaves a half-built image under IMAGE.
Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PIP_KEYS = ("index-url", "extra-index-url", "find-links", "cert", "trusted-host", "timeout")
PIP_KEY_ALIASES = {"default-timeout": "timeout"}
SECRET_DIR = "/run/secrets"
SERVE_PORT = int(os.environ.get("SFTPIPE_BUILD_PORT", "38517"))


ENGINE_EOF = "rpc error: code = Internal desc = unexpected EOF"


def fail(message: str) -> None:
    print(f"sftpipe: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def say(message: str) -> None:
    print(f"[sftpipe] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The docker client and engine


def builds_with_buildkit(client: str) -> bool:
    def ok(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([client, *args], capture_output=True, text=True, check=False)

    if ok("buildx", "version").returncode == 0:
        return True
    version = ok("version", "--format", "{{.Client.Version}}").stdout.strip()
    major = re.match(r"(\d+)\.", version)
    return bool(major) and int(major[1]) < 23  # 18.09-22.x have BuildKit built in


def docker_client(given: str) -> str:
    if given != "docker":
        return given
    seen = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder or ".") / "docker"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            real = candidate.resolve()
            if real not in seen:
                seen.append(real)
                if builds_with_buildkit(str(candidate)):
                    return str(candidate)
    if not seen:
        fail("no docker client on PATH (Debian: apt-get install docker.io)")
    fail(
        f"no docker client on PATH builds with BuildKit ({', '.join(map(str, seen))}): "
        "install buildx, or Debian's docker.io (20.10)"
    )
    raise AssertionError  # unreachable


def check_engine(client: str) -> None:
    done = subprocess.run(
        [client, "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        host = os.environ.get("DOCKER_HOST", "the default socket")
        fail(
            f"no Docker engine answers at {host}: start one (make engine-up, then export the "
            "DOCKER_HOST it prints)"
        )


# ---------------------------------------------------------------------------------------------
# This machine's pip settings


def pip_settings() -> dict[str, str]:
    """key -> value of the pip settings in force here (files, then PIP_* variables)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=False,
    )
    settings: dict[str, str] = {}
    for line in done.stdout.splitlines():
        match = re.match(r"^[^.]*\.([\w-]+)='(.*)'$", line.strip())
        if match:
            key = PIP_KEY_ALIASES.get(match[1], match[1])
            if key in PIP_KEYS and match[2]:
                settings[key] = match[2]
    return settings


def local_path(source: str) -> Path | None:
    """The folder behind a pip source when it is local (file:// URL or a path)."""
    if source.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(source).path))
    if "://" not in source:
        return Path(source)
    return None


class LocalSources:
    """Local pip sources served read-only over HTTP on 127.0.0.1 while the build runs.

    /s<i>/... is folder i as it is (an index's parent, so that its relative links work);
    /links<i>/<project>/ is a PEP 503 project page of a find-links folder's files.
    """

    def __init__(self) -> None:
        self.folders: list[Path] = []
        self.server: ThreadingHTTPServer | None = None

    def add(self, folder: Path) -> int:
        self.folders.append(folder.resolve())
        return len(self.folders) - 1

    def url(self, path: str) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/{path}"

    def start(self) -> None:
        folders = self.folders

        class Handler(SimpleHTTPRequestHandler):
            def translate_path(self, path: str) -> str:
                parts = urllib.parse.unquote(urllib.parse.urlsplit(path).path).split("/")
                match = re.fullmatch(r"s(\d+)", parts[1]) if len(parts) > 1 else None
                if not match or int(match[1]) >= len(folders):
                    return "/nonexistent"
                root = folders[int(match[1])]
                inner = [p for p in parts[2:] if p not in ("", ".", "..")]
                return str(root.joinpath(*inner))

            def do_GET(self) -> None:
                match = re.fullmatch(r"/links(\d+)/([^/]+)/", self.path)
                if match and int(match[1]) < len(folders):
                    self.send_project_page(folders[int(match[1])], match[2], int(match[1]))
                else:
                    super().do_GET()

            def send_project_page(self, folder: Path, project: str, index: int) -> None:
                def project_of(name: str) -> str:
                    return re.sub(r"[-_.]+", "-", re.split(r"-\d", name, maxsplit=1)[0]).lower()

                wanted = re.sub(r"[-_.]+", "-", project).lower()
                links = [
                    f'<a href="/s{index}/{urllib.parse.quote(f.name)}">{html.escape(f.name)}</a>'
                    for f in sorted(folder.iterdir())
                    if project_of(f.name) == wanted
                ]
                body = "<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>"
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        # One fixed port when it is free: the URLs end up in build args (TORCH_INDEX_URL),
        # which are part of the layers' cache keys, so a rebuild must see the same ones.
        try:
            self.server = ThreadingHTTPServer(("127.0.0.1", SERVE_PORT), Handler)
        except OSError:
            self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


def build_pip_conf(settings: dict[str, str], sources: LocalSources) -> tuple[str, list[Path]]:
    """pip.conf text for inside the build, and the local find-links folders."""
    lines = ["[global]"]
    find_links: list[Path] = []

    def remote(value: str, index: bool) -> str:
        folder = local_path(value)
        if folder is None:
            return value
        if not folder.is_dir():
            return ""
        if index:  # serve the parent: indexes link their files relatively (../../files/x)
            number = sources.add(folder.parent)
            return sources.url(f"s{number}/{folder.name}")
        find_links.append(folder)
        return sources.url(f"s{sources.add(folder)}/")

    for key in ("index-url", "extra-index-url", "find-links"):
        if key in settings:
            values = [remote(v, key != "find-links") for v in settings[key].split()]
            if any(values):
                lines.append(f"{key} = {' '.join(v for v in values if v)}")
    if "trusted-host" in settings:
        lines.append(f"trusted-host = {settings['trusted-host']}")
    if "timeout" in settings:
        lines.append(f"timeout = {settings['timeout']}")
    if "cert" in settings and Path(settings["cert"]).is_file():
        lines.append(f"cert = {SECRET_DIR}/pip_cert")
    return "\n".join(lines) + "\n", find_links


def local_torch(find_links: list[Path], version: str | None, variant: str | None) -> Path | None:
    """The local find-links folder holding torch-<version>+<variant> wheels, if one does."""
    if not version or not variant:
        return None
    for folder in find_links:
        if any(folder.glob(f"torch-{version}+{variant}-*.whl")):
            return folder
    return None


def dockerfile_arg_default(dockerfile: Path, name: str) -> str | None:
    match = re.search(rf"^ARG {name}=(\S+)", dockerfile.read_text(encoding="utf-8"), re.M)
    return match[1] if match else None


# ---------------------------------------------------------------------------------------------
# The build


def option_value(args: list[str], *names: str) -> tuple[int, str] | None:
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            return i + 1, args[i + 1]
        for name in names:
            if name.startswith("--") and arg.startswith(name + "="):
                return i, arg.split("=", 1)[1]
    return None


def failed_step(log_text: str) -> str:
    """Which step failed and its last output line (the cause: a pip or Python error), from
    BuildKit's plain log; else BuildKit's own last error (an unknown base image, say)."""
    failures = re.findall(r"^#(\d+) ERROR: (.+)$", log_text, re.M)
    if failures:
        number, error = failures[-1]
        header = re.search(rf"^#{number} \[([^\]]+)\] (.+)$", log_text, re.M)
        output = [
            line.strip()
            for line in re.findall(rf"^#{number} [\d.]+ (.*)$", log_text, re.M)
            if line.strip()
        ]
        cause = output[-1] if output else error
        if header:
            command = " ".join(re.sub(r"--mount=\S+", "", header[2]).split())
            return f"[{header[1]}] {command[:70]}...: {cause[:240]}"
        return cause[:300]
    errors = re.findall(r"^(?:error|ERROR|failed to solve)[: ](.+)$", log_text, re.M)
    return errors[-1].strip()[:300] if errors else "see the log"


def engine_dropped(log_text: str) -> bool:
    """Whether a build failed because the engine's BuildKit dropped its own RPC stream (an
    intermittent dockerd 20.10 fault seen on parallel stages, moby/buildkit#1983), not because
    a step failed."""
    errors = re.findall(r"^#\d+ ERROR: (.+)$", log_text, re.M)
    return bool(errors) and all(e.strip() == ENGINE_EOF for e in errors)


def run_build(full: list[str], log_path: Path, mode: str) -> int:
    """Run `docker build`, its plain progress into `log_path` and its step lines to stderr."""
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    with log_path.open(mode, encoding="utf-8") as log:
        log.write("$ " + " ".join(full) + "\n")
        log.flush()
        process = subprocess.Popen(
            full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if re.match(r"#\d+ \[[^\]]+\] ", line) and "CACHED" not in line:
                print("  " + line.rstrip()[:160], file=sys.stderr, flush=True)
        return process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, help="the build log (default: build/<image>.log)")
    parser.add_argument(
        "--torch-variant",
        help="the local torch wheel to use (cpu, cu128, ...; default: the last part of the "
        "Dockerfile's TORCH_INDEX_URL)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="docker build ... -t IMAGE CTX")
    options = parser.parse_args()
    command = list(options.command)
    if len(command) < 3 or command[1] != "build":
        fail("usage: build_image.py [--log FILE] docker build [ARGS...] -t IMAGE CONTEXT")
    client = docker_client(command[0])
    args = command[2:]
    tag_at = option_value(args, "-t", "--tag")
    if tag_at is None:
        fail("build_image.py: the docker build command has no -t IMAGE")
    at, image = tag_at
    staging = f"{image}-building-{os.getpid()}"
    args[at] = staging if args[at] == image else args[at].replace(image, staging)
    file_at = option_value(args, "-f", "--file")
    dockerfile = Path(file_at[1] if file_at else "Dockerfile")
    log_path = options.log or REPO / "build" / (re.sub(r"[^\w.-]+", "_", image) + ".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)

    check_engine(client)
    settings = pip_settings()
    sources = LocalSources()
    sources.start()  # the handler reads sources.folders as they are added below
    with tempfile.TemporaryDirectory(prefix="sftpipe-build-") as tmp:
        conf_text, find_links = build_pip_conf(settings, sources)
        conf = Path(tmp) / "pip.conf"
        conf.write_text(conf_text, encoding="utf-8")
        extra = ["--secret", f"id=pip_conf,src={conf}", "--progress", "plain"]
        if "cert" in settings and Path(settings["cert"]).is_file():
            extra += ["--secret", f"id=pip_cert,src={settings['cert']}"]
        explicit = {a.split("=", 1)[0] for a in args if "=" in a}
        index_default = dockerfile_arg_default(dockerfile, "TORCH_INDEX_URL") or ""
        version = next(
            (a.split("=", 1)[1] for a in args if a.startswith("TORCH_VERSION=")),
            dockerfile_arg_default(dockerfile, "TORCH_VERSION"),
        )
        variant = options.torch_variant or index_default.rstrip("/").rsplit("/", 1)[-1]
        folder = local_torch(find_links, version, variant)
        if "TORCH_INDEX_URL" not in explicit and folder is not None:
            index = sources.folders.index(folder.resolve())
            extra += ["--build-arg", f"TORCH_INDEX_URL={sources.url(f'links{index}/')}"]
            say(f"torch {version}+{variant} from this machine's pip find-links {folder}")
        if sources.folders:
            extra += ["--network", "host"]  # the local sources listen on 127.0.0.1
        full = [client, "build", *extra, *args]
        say(f"building {image} from {dockerfile} (log: {log_path})")
        start = time.perf_counter()
        try:
            code = run_build(full, log_path, "w")
            if code != 0 and engine_dropped(log_path.read_text(encoding="utf-8", errors="replace")):
                # Done steps come from the layer cache: the second try costs little.
                say("BuildKit dropped the build (unexpected EOF, moby/buildkit#1983); once more")
                code = run_build(full, log_path, "a")
        finally:
            sources.stop()
    seconds = time.perf_counter() - start
    if code != 0:
        subprocess.run([client, "rmi", "--force", staging], capture_output=True, check=False)
        text = log_path.read_text(encoding="utf-8", errors="replace")
        fail(f"building {image} from {dockerfile} failed at {failed_step(text)}; read {log_path}")
    subprocess.run([client, "tag", staging, image], check=True)
    subprocess.run([client, "rmi", staging], capture_output=True, check=True)
    size = subprocess.run(
        [client, "image", "inspect", "--format", "{{.Size}}", image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    say(f"built {image} in {seconds:.0f} s, {int(size) / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
