"""Reading and writing local paths and s3:// URIs, and publishing outputs atomically.

S3 settings come from the standard environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and
an endpoint in AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL (MinIO,
SeaweedFS and other S3-compatible stores).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import IO, Any

from sftpipe.errors import SftpipeError


class TransientError(SftpipeError):
    """A failure that may pass on its own (an object store or API server that stayed unreachable
    through the in-process retries, a lost node): a KFP retry of the step may succeed. Every
    other SftpipeError is deterministic (bad input, a NaN loss, a wrong setting) and must not be
    retried (sftpipe.kfp_glue.retries)."""


# S3 error codes of an overloaded or restarting store, not of a wrong request.
TRANSIENT_S3_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "500",
    "503",
}


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key/part` -> (`bucket`, `key/part`)."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise SftpipeError(uri, "no bucket in the URI", "write it as s3://bucket/key")
    return bucket, key


@cache
def s3_client() -> Any:
    import boto3
    from botocore.config import Config

    endpoint = (
        os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    )
    # Object stores drop connections under load; the standard retry mode backs off and retries
    # throttling and transient errors.
    config = Config(
        retries={"max_attempts": 8, "mode": "standard"}, s3={"addressing_style": "path"}
    )
    return boto3.client("s3", endpoint_url=endpoint or None, config=config)


def _s3_error(uri: str, exc: Exception) -> SftpipeError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
    fixes = {
        "NoSuchBucket": ("bucket does not exist", "create it or fix the bucket name"),
        "NoSuchKey": ("no such object", "check the key; list it with `aws s3 ls`"),
        "404": ("no such object", "check the key; list it with `aws s3 ls`"),
        "AccessDenied": ("access denied", "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"),
        "403": ("access denied", "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"),
        "InvalidAccessKeyId": ("unknown access key", "check AWS_ACCESS_KEY_ID"),
        "SignatureDoesNotMatch": ("wrong secret key", "check AWS_SECRET_ACCESS_KEY"),
    }
    problem, fix = fixes.get(code, (f"S3 request failed ({code}: {exc})", "check the endpoint"))
    return (TransientError if code in TRANSIENT_S3_CODES else SftpipeError)(uri, problem, fix)


def _s3_call(uri: str, fn: Any, **kwargs: Any) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        return fn(**kwargs)
    except ClientError as exc:
        raise _s3_error(uri, exc) from None
    except NoCredentialsError:
        raise SftpipeError(
            uri, "no S3 credentials", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    except BotoCoreError as exc:
        raise TransientError(
            uri,
            f"cannot reach the object store ({exc})",
            "check AWS_ENDPOINT_URL and that the server is up",
        ) from None


def open_binary(uri: str) -> IO[bytes]:
    """A readable binary stream over a local file or an S3 object (streamed, not buffered)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _s3_call(uri, s3_client().get_object, Bucket=bucket, Key=key)["Body"]
    path = Path(uri)
    if not path.is_file():
        raise SftpipeError(uri, "no such file", "check the path")
    return path.open("rb")


def iter_lines(uri: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without the newline) for every line of a file or object."""
    with contextlib.closing(open_binary(uri)) as stream:
        lines = stream.iter_lines(chunk_size=1 << 16) if is_s3(uri) else stream
        for number, line in enumerate(lines, start=1):
            yield number, line.rstrip(b"\r\n")


def local_file(uri: str, path: Path) -> Path:
    """`uri` itself when it is a local path; for s3://, a copy downloaded to `path` (for readers
    that need a file, such as a Parquet reader on a node that shares no disk with the data)."""
    if not is_s3(uri):
        return Path(uri)
    with open_binary(uri) as source, open(path, "wb") as target:
        shutil.copyfileobj(source, target)
    return path


def upload_file(path: Path, uri: str) -> None:
    bucket, key = split_s3(uri)
    _s3_call(uri, s3_client().upload_file, Filename=str(path), Bucket=bucket, Key=key)


def list_keys(bucket: str, prefix: str, uri: str) -> list[str]:
    """Every key of `bucket` that starts with `prefix` as given (no slash implied); `uri` names
    the request in errors."""
    paginator = s3_client().get_paginator("list_objects_v2")
    pages = _s3_call(uri, lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix)))
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def list_objects(uri: str) -> list[str]:
    """Keys under an s3:// prefix (as a folder: a trailing slash is implied)."""
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    keys: list[str] = []
    paginator = s3_client().get_paginator("list_objects_v2")
    pages = _s3_call(uri, lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix)))
    for page in pages:
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys


def upload_dir(path: Path, uri: str) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        upload_file(file, f"{uri.rstrip('/')}/{file.relative_to(path).as_posix()}")


def path_under(dest: Path, relative: str, source: str) -> Path:
    """Where the object `source` goes when a prefix is copied into `dest`: `dest/relative`.

    Object keys are arbitrary strings: after the prefix is cut off, `m/../../x` leaves
    `../../x` and `m//etc/x` leaves `/etc/x`, which a plain `dest / rest` would write outside
    `dest` (an absolute part even replaces `dest` entirely). Such keys are refused, in one line,
    before anything is written.
    """
    parts = relative.split("/")
    escapes = relative.startswith("/") or ".." in parts
    target = dest / relative
    root = dest.resolve()
    if escapes or not target.resolve().is_relative_to(root) or target.resolve() == root:
        raise SftpipeError(
            source,
            f"the object key maps outside the download folder ({relative!r} under {dest})",
            "rename or delete the object: keys under a model or checkpoint prefix must be "
            "relative paths without '..' or a leading '/'",
        )
    return target


def local_dir(
    uri: str, cache_root: Path | None = None, skip_suffixes: tuple[str, ...] = ()
) -> Path:
    """A local directory holding the folder at `uri`: the path itself, or a download of an S3
    prefix (without files ending in `skip_suffixes`) into `cache_root` (default: a temporary
    directory)."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_dir():
            raise SftpipeError(uri, "no such directory", "check the path")
        return path
    bucket, prefix = split_s3(uri)
    keys = list_objects(uri)
    if not keys:
        raise SftpipeError(uri, "no objects under this prefix", "check the bucket and prefix")
    dest = Path(tempfile.mkdtemp(prefix="sftpipe-", dir=cache_root))
    base = prefix.rstrip("/") + "/" if prefix else ""
    # Every key is checked before the first download: a hostile key fails the copy whole.
    try:
        targets = {
            key: path_under(dest, key[len(base) :], f"s3://{bucket}/{key}")
            for key in keys
            if not key.endswith(skip_suffixes) and not key.endswith("/")  # "/": a folder marker
        }
    except SftpipeError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    for key, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        _s3_call(uri, s3_client().download_file, Bucket=bucket, Key=key, Filename=str(target))
    return dest


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temporary sibling and rename it over `path` only when the block succeeds, so a
    failed step never leaves a complete-looking output behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with tmp.open(mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Fill a temporary sibling directory, then move it to `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(uris: list[str]) -> str:
    """A digest of what the files at `uris` hold, from their metadata only: local files by size
    and modification time (ns), S3 objects by ETag and size (one listing per bucket, not one
    request per object). Any change of content changes it; a rewrite of identical bytes may too.
    KFP's cache keys clean on it instead of on the `data_uri` string (new data, same URI)."""
    digest = hashlib.sha256()
    by_bucket: dict[str, list[str]] = {}
    for uri in sorted(uris):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            by_bucket.setdefault(bucket, []).append(key)
            continue
        try:
            stat = Path(uri).stat()
        except OSError as exc:
            raise SftpipeError(uri, f"cannot read it ({exc.strerror})", "check the path") from None
        digest.update(f"{uri}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    for bucket, keys in sorted(by_bucket.items()):
        common = os.path.commonprefix(keys)  # noqa: RUF071 (an S3 prefix is a string)
        listed = _list_entries(bucket, common, f"s3://{bucket}/{common}")
        for key in keys:
            if key not in listed:
                raise SftpipeError(f"s3://{bucket}/{key}", "no such object", "check the key")
            etag, size = listed[key]
            digest.update(f"s3://{bucket}/{key}\t{size}\t{etag}\n".encode())
    return digest.hexdigest()


def list_files(uri: str) -> list[str]:
    """The URIs of every file under a local folder or an s3:// prefix, sorted."""
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        return sorted(f"s3://{bucket}/{key}" for key in list_objects(uri) if not key.endswith("/"))
    path = Path(uri)
    if not path.is_dir():
        raise SftpipeError(uri, "no such directory", "check the path")
    return sorted(str(file) for file in path.rglob("*") if file.is_file())


def _list_entries(bucket: str, prefix: str, uri: str) -> dict[str, tuple[str, int]]:
    """key -> (ETag, size) of every object of `bucket` whose key starts with `prefix`."""
    paginator = s3_client().get_paginator("list_objects_v2")
    pages = _s3_call(uri, lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix)))
    return {
        item["Key"]: (str(item.get("ETag", "")), int(item.get("Size", 0)))
        for page in pages
        for item in page.get("Contents", [])
    }
