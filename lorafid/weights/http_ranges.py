"""Checked, parallel HTTP Range reads into caller-owned buffers.

A ``RangeReader`` fills ``out[: end - start]`` with bytes ``[start, end)`` of a remote file by
splitting the range into chunks and fetching them with a small thread pool of ``GET``s with
``Range`` headers. Every response is checked before its bytes count: status 206, the exact
``Content-Range`` asked for, no content encoding, and exactly the expected byte count. A
server (or proxy) that ignores ``Range`` answers 200 with the whole file; that is an error,
never "the first N bytes of what came back".

Where the bytes live is someone else's job: the reader calls ``locate(file)`` (the Hub's
resolve -> CDN redirect, done by ``source.py``), caches the answer, and calls it again when
the signed CDN URL has expired (403). Transient failures (429, 5xx, connection errors, short
bodies) are retried by ``lorafid.retry``'s one loop, with bounded exponential backoff, and each
retry is logged (``logging``, logger ``lorafid.retry``, level INFO: ``lorafid --verbose`` shows them).

Requests go through huggingface_hub's configured HTTP client (``get_session``), so proxies,
CA bundles and transports set with ``huggingface_hub.set_client_factory`` apply to the byte
reads as they do to the Hub API calls.

Not here: Hub API calls, error mapping for repos, header parsing, any retry of a response
that came back wrong-but-complete (wrong status or Content-Range: retrying would not help).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import httpx2
from huggingface_hub import get_session

from lorafid.errors import FetchError
from lorafid.retry import RetryPolicy, Transient, retry_after_s, with_retries, worth_retrying

logger = logging.getLogger(__name__)

# connect 10 s: a Hub or CDN that does not accept a connection in 10 s is down; read 60 s:
# the longest pause between two body packets we wait out before retrying the chunk.
HTTP_TIMEOUT = httpx2.Timeout(connect=10.0, read=60.0, write=60.0, pool=60.0)
# A signed CDN URL that still answers 403 after two fresh resolves is not an expiry problem.
MAX_RELOCATIONS = 2


@dataclass(frozen=True)
class RemoteFile:
    """Where one file's bytes can be read, as ``locate`` found it."""

    url: str  # the signed CDN URL, or the resolve URL itself for files served directly
    size_bytes: int
    headers: dict[str, str]  # sent with every GET; carries auth only for the Hub's own origin


def http_range(start: int, end: int) -> str:
    """The ``Range`` header for the half-open byte range ``[start, end)``.

    HTTP ranges are inclusive, so this is the one place where ``end - 1`` appears.
    Example: http_range(0, 100) -> "bytes=0-99"; http_range(8, 9) -> "bytes=8-8".
    """
    if not 0 <= start < end:
        raise ValueError(f"empty or negative byte range [{start}, {end})")
    return f"bytes={start}-{end - 1}"


def expected_content_range(start: int, end: int, size_bytes: int) -> str:
    """The ``Content-Range`` a correct 206 answer to ``http_range(start, end)`` carries."""
    return f"bytes {start}-{end - 1}/{size_bytes}"


def chunk_bounds(start: int, end: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Split ``[start, end)`` into consecutive chunks of at most ``chunk_bytes``.

    Example: chunk_bounds(10, 35, 10) -> [(10, 20), (20, 30), (30, 35)].
    """
    return [(a, min(a + chunk_bytes, end)) for a in range(start, end, chunk_bytes)]


class _Expired(Exception):
    """403 from the byte server: the signed URL has expired; resolve the file again."""


class RangeReader:
    """Thread-safe range reads of the files of one source; counts bytes and requests.

    Args:
        locate: file name -> ``RemoteFile``; may raise ``LorafidError``s of its own.
        describe: file name -> "repo org/name, file x" for error messages.
        chunk_bytes: largest single GET; ranges above it are split and fetched in parallel.
        max_workers: parallel GETs per reader.
        client: the HTTP client; None uses huggingface_hub's configured, shared one (never closed here).
    """

    def __init__(
        self,
        locate: Callable[[str], RemoteFile],
        describe: Callable[[str], str],
        *,
        chunk_bytes: int = 16 * 2**20,
        max_workers: int = 8,
        retry: RetryPolicy | None = None,
        client: httpx2.Client | None = None,
    ) -> None:
        if chunk_bytes < 1 or max_workers < 1:
            raise ValueError("chunk_bytes and max_workers must be positive")
        self._locate_fn, self._describe = locate, describe
        self.chunk_bytes, self.max_workers = chunk_bytes, max_workers
        self.retry = retry or RetryPolicy()
        # Looked up per request, not kept: set_client_factory() replaces the shared client.
        self._own_client = client
        self._pool: ThreadPoolExecutor | None = None
        self._located: dict[str, RemoteFile] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.requests_made = 0

    def size_bytes(self, file: str) -> int:
        return self._locate(file).size_bytes

    def read_into(self, file: str, start: int, end: int, out: memoryview) -> None:
        """Fill ``out[: end - start]`` with bytes ``[start, end)`` of ``file``, or raise ``FetchError``."""
        if out.format != "B" or out.ndim != 1:
            out = out.cast("B")
        size = self._locate(file).size_bytes
        if not 0 <= start <= end <= size or len(out) < end - start:
            raise FetchError(
                f"Cannot read bytes [{start}, {end}) of {self._describe(file)} ({size} bytes) into a "
                f"{len(out)}-byte buffer: the offsets are outside the file (a stale header or index?)."
            )
        chunks = chunk_bounds(start, end, self.chunk_bytes)
        if len(chunks) <= 1:  # the common small tensor: no pool hop
            for a, b in chunks:
                self._fetch_chunk(file, a, b, out[a - start : b - start])
            return
        pool = self._get_pool()
        futures: list[Future[None]] = [
            pool.submit(self._fetch_chunk, file, a, b, out[a - start : b - start]) for a, b in chunks
        ]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        # Running chunks write into `out`: let them finish before the caller may reuse it.
        wait(futures)
        for f in futures:
            error = None if f.cancelled() else f.exception()
            if error is not None:
                raise error

    def fetch_whole(self, file: str, max_bytes: int) -> bytes:
        """Read a small file completely (an index json), through the same checked path."""
        size = self.size_bytes(file)
        if size > max_bytes:
            raise FetchError(f"{self._describe(file)} is {size} bytes; more than the {max_bytes} expected of it.")
        buffer = bytearray(size)
        if size:
            self.read_into(file, 0, size, memoryview(buffer))
        return bytes(buffer)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        # The client is huggingface_hub's shared one, or the caller's: not ours to close.

    # -- internals ---------------------------------------------------------------------------
    def _get_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="lorafid-range")
            return self._pool

    def _locate(self, file: str, stale: RemoteFile | None = None) -> RemoteFile:
        """Cached ``locate``; with ``stale``, resolve again unless another thread already did."""
        with self._lock:
            known = self._located.get(file)
        if known is not None and known is not stale:
            return known
        # Outside the lock: a slow resolve must not block reads of other files.
        fresh = self._locate_fn(file)
        with self._lock:
            current = self._located.get(file)
            if current is not None and current is not stale:
                return current
            self._located[file] = fresh
        return fresh

    def _fetch_chunk(self, file: str, start: int, end: int, out: memoryview) -> None:
        def give_up(tries: int, last: Transient) -> FetchError:
            return FetchError(
                f"Bytes {start}-{end - 1} of {self._describe(file)} could not be read after "
                f"{tries} tries (last: {last}). The Hub or the network is failing; try again later."
            )

        with_retries(
            lambda: self._fetch_relocating(file, start, end, out),
            self.retry,
            what=f"bytes {start}-{end - 1} of {self._describe(file)}",
            give_up=give_up,
        )

    def _fetch_relocating(self, file: str, start: int, end: int, out: memoryview) -> None:
        """One try: an expired signed URL (403) is resolved again, which is not a failed try."""
        remote = self._locate(file)
        for relocations in range(MAX_RELOCATIONS + 1):
            try:
                self._get_once(file, remote, start, end, out)
                return
            except _Expired as e:
                if relocations >= MAX_RELOCATIONS:
                    raise FetchError(
                        f"Bytes {start}-{end - 1} of {self._describe(file)}: the file server kept answering "
                        f"403 Forbidden after {relocations} fresh resolves. Check that the token can read this "
                        "repo and that the system clock is correct (signed URLs expire)."
                    ) from e
                logger.info("%s: the signed file URL expired (HTTP 403); resolving it again", self._describe(file))
                remote = self._locate(file, stale=remote)

    def _get_once(self, file: str, remote: RemoteFile, start: int, end: int, out: memoryview) -> None:
        """One GET of ``[start, end)`` straight into ``out``; raises unless every check passes."""
        where = f"bytes {start}-{end - 1} of {self._describe(file)}"
        headers = {**remote.headers, "Range": http_range(start, end), "Accept-Encoding": "identity"}
        with self._lock:
            self.requests_made += 1
        try:
            client = self._own_client if self._own_client is not None else get_session()
            # follow_redirects=False: the only redirect accepted is resolve -> CDN, done by locate().
            with client.stream(
                "GET", remote.url, headers=headers, follow_redirects=False, timeout=HTTP_TIMEOUT
            ) as response:
                status = response.status_code
                if status == 403:
                    raise _Expired()
                if worth_retrying(status):
                    raise Transient(f"HTTP {status}", retry_after_s(response.headers.get("Retry-After")))
                if status == 200:
                    raise FetchError(
                        f"Reading {where}: the server ignored the Range header and sent the whole file. "
                        "lorafid needs range reads (is HF_ENDPOINT a proxy that strips Range?)."
                    )
                if status != 206:
                    raise FetchError(f"Reading {where}: the server answered HTTP {status} instead of 206.")
                content_range = response.headers.get("Content-Range")
                expected = expected_content_range(start, end, remote.size_bytes)
                if content_range != expected:
                    raise FetchError(
                        f"Reading {where}: the server sent Content-Range {content_range!r}, expected "
                        f"{expected!r}. The file may have changed, or a proxy rewrote the response."
                    )
                encoding = response.headers.get("Content-Encoding", "identity").lower()
                if encoding != "identity":
                    raise FetchError(f"Reading {where}: the server compressed the body ({encoding}) despite identity.")
                received = 0
                want = end - start
                for piece in response.iter_raw():
                    if received + len(piece) > want:
                        raise FetchError(f"Reading {where}: the server sent more bytes than the range holds.")
                    out[received : received + len(piece)] = piece
                    received += len(piece)
                if received != want:
                    raise Transient(f"short body: {received} of {want} bytes")
        except httpx2.TransportError as e:
            raise Transient(f"{type(e).__name__}: {e}") from e
        with self._lock:
            self.bytes_read += want
