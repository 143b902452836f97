"""An input opened as a byte stream: hashed as it is read (the input digest) and gunzipped when
it is gzip data. A damaged gzip stream (truncated, corrupt, or expanding like a bomb) reads as
an early end, its `fault` saying why and at which line, instead of an exception in the middle
of a reader.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from sftpipe import storage
from sftpipe.data.schemas import Reason
from sftpipe.data.sources import Source

# A gzip stream that expands more than this (decompressed / stored bytes) is refused: text
# compresses 3-10x, very repetitive JSONL ~50x, a "zip bomb" ~1000x (deflate's limit).
MAX_GZIP_RATIO = 200
_GZIP_RATIO_GRACE = 16 << 20  # decompressed bytes before the ratio is checked (small files)


class Hashing(io.RawIOBase):
    """Passes the bytes of a file or S3 body through, hashing them (the input digest)."""

    def __init__(self, body: Any) -> None:
        self._body = body
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        self.sha256.update(data)
        self.bytes_read += len(data)
        return len(data)

    def drain(self) -> str:
        """Hash what was not read (a reader may stop early) and return the hex digest."""
        while data := self._body.read(1 << 20):
            self.sha256.update(data)
        return self.sha256.hexdigest()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


@dataclass(frozen=True)
class StreamFault:
    """Why a compressed stream stopped early, and the (1-based) line it stopped in."""

    reason: Reason
    detail: str
    line: int


class Gunzip(io.RawIOBase):
    """Gunzips a stream; a damaged stream (truncated, corrupt, or expanding like a bomb) reads
    as an early end with `fault` set, instead of an exception in the middle of a reader."""

    def __init__(self, compressed: IO[bytes], hashing: Hashing) -> None:
        self._gzip = gzip.GzipFile(fileobj=compressed)  # type: ignore[arg-type]
        self._hashing = hashing
        self.fault: StreamFault | None = None
        self.bytes_out = 0
        self.newlines = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.fault is not None:
            return 0
        try:
            data = self._gzip.read1(len(buffer))
        except EOFError:
            return self._stop(
                Reason.TRUNCATED_FILE,
                "the gzip stream ends early (the file is truncated: copy or upload it again)",
            )
        except (zlib.error, gzip.BadGzipFile, OSError) as exc:
            return self._stop(
                Reason.CORRUPT_FILE, f"the gzip stream is corrupt ({exc}): the rest is unreadable"
            )
        self.bytes_out += len(data)
        self.newlines += data.count(b"\n")
        stored = self._hashing.bytes_read
        if self.bytes_out > _GZIP_RATIO_GRACE and self.bytes_out > MAX_GZIP_RATIO * stored:
            return self._stop(
                Reason.TOO_COMPRESSED,
                f"the gzip stream expands more than {MAX_GZIP_RATIO}x ({self.bytes_out:,} bytes "
                f"from {stored:,}): refused as a decompression bomb; the rest is skipped",
            )
        buffer[: len(data)] = data
        return len(data)

    def _stop(self, reason: Reason, detail: str) -> int:
        where = f"after {self.bytes_out:,} decompressed bytes"
        self.fault = StreamFault(reason, f"{detail} ({where})", self.newlines + 1)
        return 0


@contextlib.contextmanager
def open_stream(source: Source) -> Iterator[tuple[IO[bytes], Hashing, Gunzip | None]]:
    """A buffered binary stream of the file's content (gunzipped when it is gzip data), the
    hashing layer under it, which gives the digest of the stored bytes, and the gunzip layer
    (None for plain files), whose `fault` says why a damaged stream ended early."""
    hashing = Hashing(storage.open_binary(source.uri))
    stream: IO[bytes] = io.BufferedReader(hashing, 1 << 20)
    gunzip = None
    try:
        if stream.peek(2)[:2] == b"\x1f\x8b":  # type: ignore[attr-defined]
            gunzip = Gunzip(stream, hashing)
            stream = io.BufferedReader(gunzip, 1 << 20)
        yield stream, hashing, gunzip
    finally:
        stream.close()
        hashing.close()
