"""The MLflow model registry, as sftpipe uses it: retried calls with one-line errors, versions
found by pipeline run, aliases, registered chat models downloaded as Hugging Face folders, and
the version listing of `sftpipe models`.

Aliases: `challenger` is every newly registered version; `champion` is the version in service
(`models:/NAME@champion`), moved only when a challenger beats it (see stages/register.py).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sftpipe.errors import SftpipeError
from sftpipe.evaluation import metrics
from sftpipe.tracking.runs import PIPELINE_RUN_TAG

CHAMPION = "champion"
CHALLENGER = "challenger"

ATTEMPTS_ENV = "SFTPIPE_MLFLOW_ATTEMPTS"
DELAY_ENV = "SFTPIPE_MLFLOW_RETRY_DELAY_S"
DEFAULT_ATTEMPTS = 4
DEFAULT_DELAY_S = 5.0

# MLflow error codes that mean "the request is wrong", not "the server is unwell": retrying
# them cannot help.
PERMANENT_ERRORS = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "BAD_REQUEST",
        "INVALID_STATE",
        "ENDPOINT_NOT_FOUND",
        "NOT_FOUND",
    }
)

T = TypeVar("T")


def error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", "") or "")


def is_permanent(exc: BaseException) -> bool:
    return error_code(exc) in PERMANENT_ERRORS


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def retrying(what: str, call: Callable[[], T], fix: str = "") -> T:
    """`call()`, retried with exponential backoff when MLflow (or its artifact store) is
    unreachable or failing; a refusal (bad name, missing alias, ...) is not retried. Either way
    the last failure becomes one SftpipeError line."""
    attempts = max(1, int(os.environ.get(ATTEMPTS_ENV, DEFAULT_ATTEMPTS)))
    delay = float(os.environ.get(DELAY_ENV, DEFAULT_DELAY_S))
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except SftpipeError:
            raise
        except Exception as exc:  # MLflow raises MlflowException, requests, boto and OS errors
            detail = f"{type(exc).__name__}: {exc}"
            if is_permanent(exc):
                raise SftpipeError(
                    tracking_uri(), f"MLflow refused to {what} ({detail})", fix
                ) from None
            if attempt == attempts:
                raise SftpipeError(
                    tracking_uri(),
                    f"could not {what} after {attempts} attempts ({detail})",
                    fix
                    or "check that the MLflow server and its artifact store are up, then "
                    "retry the step: its inputs are kept",
                ) from None
            wait = delay * 2 ** (attempt - 1)
            print(
                f"[registry] {what} failed ({' '.join(detail.split())[:200]}); "
                f"retrying in {wait:g} s (attempt {attempt + 1}/{attempts})",
                flush=True,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def ensure_registered_model(client: Any, name: str) -> None:
    """Create the registered model if needed; a name MLflow refuses fails here, before any
    upload."""

    def create() -> None:
        try:
            client.create_registered_model(name)
        except Exception as exc:
            if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise

    retrying(
        f"create registered model {name!r}",
        create,
        "use letters, digits, '-', '_' and '.' in --model-name",
    )


def version_of_run(client: Any, name: str, pipeline_run_id: str) -> Any | None:
    """The version of `name` registered by this pipeline run, if any (a retried step)."""
    query = f"name='{name}' and tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'"
    found = retrying(f"search versions of {name!r}", lambda: client.search_model_versions(query))
    return min(found, key=lambda v: int(v.version)) if found else None


def version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    """The version holding `alias`, or None when the alias is not set."""

    def get() -> Any | None:
        try:
            return client.get_model_version_by_alias(name, alias)
        except Exception as exc:
            if "not found" in str(exc).lower() and error_code(exc) in (
                "INVALID_PARAMETER_VALUE",
                "RESOURCE_DOES_NOT_EXIST",
                "NOT_FOUND",
            ):
                return None
            raise

    return retrying(f"look up {name}@{alias}", get)


def set_alias(client: Any, name: str, alias: str, version: str) -> None:
    retrying(
        f"set alias {alias!r} of {name!r} to version {version}",
        lambda: client.set_registered_model_alias(name, alias, version),
        "aliases may only contain letters, digits, '_' and '-'",
    )


# ---------------------------------------------------------------------------------------------
# Serializing the champion decision
# ---------------------------------------------------------------------------------------------

LOCK_TAG = "sftpipe.lock"  # marks the lock's registered model (`sftpipe models` hides it)
LOCK_OWNER_TAG = "sftpipe.lock.owner"
LOCK_EXPIRES_TAG = "sftpipe.lock.expires"  # epoch seconds; the holder renews it
LEASE_ENV = "SFTPIPE_CHAMPION_LEASE_S"
WAIT_ENV = "SFTPIPE_CHAMPION_WAIT_S"
POLL_ENV = "SFTPIPE_CHAMPION_POLL_S"
DEFAULT_LEASE_S = 300.0
DEFAULT_WAIT_S = 3600.0
DEFAULT_POLL_S = 2.0


@dataclass(frozen=True)
class LockHolder:
    owner: str
    expires: float


class ChampionLock:
    """A lease on deciding the champion of registered model `name`, held by one register step
    at a time, across pods, with nothing but the MLflow server.

    Why this primitive: MLflow aliases and tags are last-writer-wins (no compare-and-set), so
    a tag cannot be a mutex: two writers both read back their own value in some orders. What
    MLflow's store does atomically is create a registered model: the name is the table's
    primary key, the create and its tags are one transaction, and a second create fails with
    RESOURCE_ALREADY_EXISTS (PostgreSQL, MySQL and SQLite alike). So the lock is a registered
    model `<name>.sftpipe-champion-lock`, created to acquire and deleted to release. A
    PostgreSQL advisory lock would need the database's credentials in every pipeline pod
    (they reach MLflow over HTTP only), and S3 conditional writes are not in every store.

    A holder that dies leaves the lock behind: it carries its owner and an expiry that the
    holder renews every third of the lease (a heartbeat thread), and a waiter deletes it once
    it has expired (at once when the owner is itself: a retried step of the same pipeline run),
    after reading it again and finding the same owner and expiry (the compare step). Before it
    moves the alias, the holder checks that it still holds the lock (`check`).
    """

    def __init__(self, client: Any, name: str, owner: str) -> None:
        self.client, self.name, self.owner = client, name, owner
        self.lock_name = f"{name}.sftpipe-champion-lock"
        self.lease_s = float(os.environ.get(LEASE_ENV, DEFAULT_LEASE_S))
        self.wait_s = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
        self.poll_s = float(os.environ.get(POLL_ENV, DEFAULT_POLL_S))
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> ChampionLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while not self._try_create():
            holder = self.holder()
            if holder is None:
                continue  # released between our create and our read: try again at once
            # Expired (its holder died), or left by an earlier attempt of this very step.
            if holder.expires < time.time() or holder.owner == self.owner:
                self._break(holder)
                continue
            if time.monotonic() > deadline:
                raise SftpipeError(
                    f"models:/{self.name}",
                    f"waited {self.wait_s:g} s for {holder.owner!r} to decide the champion",
                    f"retry the step; if no run is registering, delete the registered model "
                    f"{self.lock_name!r}",
                )
            self.waiting(holder)
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew, daemon=True, name="champion-lease")
        self._heartbeat.start()

    def waiting(self, holder: LockHolder) -> None:
        """Called while another step holds the lock: say so, then wait a poll interval."""
        print(
            f"[register] the champion of {self.name} is being decided by {holder.owner}: "
            f"waiting (polling every {self.poll_s:g} s)",
            flush=True,
        )
        time.sleep(self.poll_s)

    def holder(self) -> LockHolder | None:
        """Who holds the lock now; None when nobody does."""

        def get() -> Any | None:
            try:
                return self.client.get_registered_model(self.lock_name)
            except Exception as exc:
                if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                    return None
                raise

        model = retrying(f"read the champion lock of {self.name!r}", get)
        if model is None:
            return None
        tags = model.tags or {}
        return LockHolder(tags.get(LOCK_OWNER_TAG, ""), float(tags.get(LOCK_EXPIRES_TAG, 0)))

    def check(self) -> None:
        """Raise unless this step still holds the lock (its lease was not broken)."""
        holder = self.holder()
        if holder is None or holder.owner != self.owner:
            raise SftpipeError(
                f"models:/{self.name}",
                f"lost the champion lock to {holder.owner if holder else 'nobody'} "
                "(the lease expired)",
                f"retry the step; a slow re-score may need a longer {LEASE_ENV}",
            )

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        holder = self.holder()
        if holder is not None and holder.owner == self.owner:
            self._delete()

    def _try_create(self) -> bool:
        tags = {
            LOCK_TAG: "champion",
            LOCK_OWNER_TAG: self.owner,
            LOCK_EXPIRES_TAG: f"{time.time() + self.lease_s:.3f}",
        }

        def create() -> bool:
            try:
                self.client.create_registered_model(
                    self.lock_name,
                    tags=tags,
                    description=f"sftpipe: held while the champion of {self.name} is decided",
                )
            except Exception as exc:
                # Taken; or deleted by its holder while the server looked it up to say so.
                if error_code(exc) in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                    return False
                raise
            return True

        return retrying(f"take the champion lock of {self.name!r}", create)

    def _break(self, stale: LockHolder) -> None:
        """Delete an expired lock, unless it changed hands since it was read."""
        if self.holder() != stale:
            return
        why = "an earlier attempt of this step" if stale.owner == self.owner else "expired"
        print(
            f"[register] breaking the champion lock of {self.name} held by {stale.owner} ({why})",
            flush=True,
        )
        self._delete()

    def _delete(self) -> None:
        def delete() -> None:
            try:
                self.client.delete_registered_model(self.lock_name)
            except Exception as exc:
                if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                    raise

        retrying(f"release the champion lock of {self.name!r}", delete)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            holder = self.holder()
            if holder is None or holder.owner != self.owner:
                return  # broken: `check` says so before the alias moves
            expires = f"{time.time() + self.lease_s:.3f}"
            retrying(
                f"renew the champion lock of {self.name!r}",
                lambda e=expires: self.client.set_registered_model_tag(
                    self.lock_name, LOCK_EXPIRES_TAG, e
                ),
            )


# ---------------------------------------------------------------------------------------------
# Registered models as local Hugging Face folders
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI."""

    name: str
    alias: str = ""
    version: str = ""

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        body = uri.removeprefix("models:/").strip("/")
        if "@" in body:
            name, _, alias = body.rpartition("@")
            if name and alias and "/" not in alias:
                return cls(name, alias=alias)
        elif "/" in body:
            name, _, version = body.rpartition("/")
            if name and version.isdigit():
                return cls(name, version=version)
        raise SftpipeError(
            uri, "not a registered model URI", "use models:/NAME@ALIAS or models:/NAME/VERSION"
        )


def resolve(client: Any, uri: str) -> Any:
    """The ModelVersion a models:/ URI points at, with a one-line error when there is none."""
    ref = ModelRef.parse(uri)
    if ref.alias:
        version = version_by_alias(client, ref.name, ref.alias)
        if version is None:
            raise SftpipeError(
                uri,
                f"model {ref.name!r} has no version with alias {ref.alias!r}",
                f"see `sftpipe models {ref.name}` for its versions and aliases",
            )
        return version
    try:
        return retrying(f"look up {uri}", lambda: client.get_model_version(ref.name, ref.version))
    except SftpipeError as exc:
        raise SftpipeError(
            uri,
            f"no such registered model version ({exc.problem})",
            f"see `sftpipe models {ref.name}`",
        ) from None


def download(uri: str, dest: Path) -> Path:
    """Download a registered transformers model into `dest` and return a folder that
    `from_pretrained` loads: the flavor keeps weights in `model/` and the tokenizer in
    `components/tokenizer/`, which are merged here."""
    import mlflow

    dest.mkdir(parents=True, exist_ok=True)
    root = Path(
        retrying(
            f"download {uri}",
            lambda: mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)),
        )
    )
    folder = root / "model" if (root / "model" / "config.json").exists() else root
    tokenizer_dir = root / "components" / "tokenizer"
    if tokenizer_dir.is_dir():
        for path in tokenizer_dir.iterdir():
            if path.is_file() and not (folder / path.name).exists():
                shutil.copy2(path, folder / path.name)
    if not (folder / "config.json").exists():
        raise SftpipeError(
            uri, "the registered model is not a transformers model folder", "log it with sftpipe"
        )
    return folder


# ---------------------------------------------------------------------------------------------
# `sftpipe models`
# ---------------------------------------------------------------------------------------------

# The columns of `sftpipe models`: the tuned model's metrics with a short name in the table.
KEY_METRICS = tuple((f"tuned_{m.name}", m.short) for m in metrics.listed("short"))


def use_local_store(workdir: Path) -> None:
    """Without MLFLOW_TRACKING_URI, read the store `sftpipe run` keeps in `workdir`."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    database = Path(workdir) / "mlflow.db"
    if not database.exists():
        raise SftpipeError(
            "MLFLOW_TRACKING_URI",
            f"not set, and there is no local store at {database}",
            "point MLFLOW_TRACKING_URI at the MLflow server, or pass --workdir of `sftpipe run`",
        )
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{database.resolve()}"


def version_rows(client: Any, name: str = "") -> list[dict[str, str]]:
    """One row per registered version (newest first): name, version, aliases, key metrics."""
    if name:
        names = [name]
    else:
        listed = retrying("list models", client.search_registered_models)
        names = sorted(m.name for m in listed if LOCK_TAG not in (m.tags or {}))
    rows = []
    for model in names:
        versions = retrying(
            f"list versions of {model!r}",
            lambda m=model: client.search_model_versions(f"name='{m}'"),
        )
        if name and not versions:
            raise SftpipeError(
                tracking_uri(), f"no registered model {name!r}", "see `sftpipe models`"
            )
        aliases: dict[str, list[str]] = {}
        registered = retrying(f"read {model!r}", lambda m=model: client.get_registered_model(m))
        for alias, version in (registered.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in sorted(versions, key=lambda v: -int(v.version)):
            row = {
                "model": model,
                "version": str(v.version),
                "aliases": ",".join(sorted(aliases.get(str(v.version), []))) or "-",
                "created": time.strftime(
                    "%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)
                ),
            }
            for key, label in KEY_METRICS:
                row[label] = _short(v.tags.get(key, ""))
            row["pipeline run"] = v.tags.get(PIPELINE_RUN_TAG, "-")[:36]
            rows.append(row)
    return rows


def _short(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value or "-"


def format_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "no registered models"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
