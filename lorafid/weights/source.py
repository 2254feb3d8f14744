"""Where weight bytes come from: a Hub repo read by HTTP ranges, or a local file or directory.

The only module that touches the network. A ``Source`` lists the safetensors files to read,
reads and validates their headers (first ``HEADER_PROBE_BYTES``, a second read if the header
is longer), and copies any byte range into a caller's buffer. It never downloads a whole
shard, never holds a model in memory, never writes a cache, and never unpickles anything:
pickle-only repos are refused with a pointer to a safetensors conversion.

Hub sources resolve the requested revision to a commit SHA once and use that SHA in every
URL, so a push to the branch mid-audit cannot mix two versions. Errors from the Hub become
``lorafid.errors`` with a message that says what to do. Tokens go only in the Authorization
header to the Hub endpoint: never to the CDN, never into messages, logs or URLs.

Example::

    with open_source("org/name@v2") as src:      # or "./checkpoint" / "model.safetensors"
        header = src.read_header(src.weight_files()[0])
        t = next(iter(header.tensors.values()))
        buf = bytearray(t.size_bytes)
        src.read_into(t.file, t.start, t.end, memoryview(buf))
"""

from __future__ import annotations

import json
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal
from urllib.parse import urljoin, urlsplit

import httpx2
from huggingface_hub import HfApi, ModelInfo, constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import build_hf_headers

from lorafid import __version__
from lorafid.errors import (
    FetchError,
    GatedRepoError,
    InvalidSourceError,
    LimitExceededError,
    LorafidError,
    NotSafetensorsError,
    RepoNotFoundError,
    RevisionNotFoundError,
    SafetensorsHeaderError,
)
from lorafid.names import is_commit_sha, is_repo_id
from lorafid.retry import RetryPolicy, Transient, retry_after_s, with_retries, worth_retrying
from lorafid.weights.http_ranges import RangeReader, RemoteFile
from lorafid.weights.safetensors_format import (
    HEADER_BYTES_PER_TENSOR,
    HEADER_PROBE_BYTES,
    SafetensorsHeader,
    parse_file_prefix,
    parse_header_length,
)

LIBRARY_NAME = "lorafid"  # with __version__, in the user agent of every request (Hub API, resolve, CDN)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_INDEX_BYTES = 16 * 2**20  # a 405B model's index is ~100 kB
_BAD_REVISION_RE = re.compile(r"\.\.|[\x00-\x20\x7f~^:?*\[\\]|^[/-]|/$|\.$|@\{")
_SPEC_HELP = (
    "Expected a Hub repo ID org/name, optionally with a revision (org/name@v2, org/name@refs/pr/3), "
    "or a local path (./checkpoint, /data/model.safetensors)."
)


@dataclass(frozen=True)
class SourceInfo:
    """What a source is; recorded in every report."""

    spec: str  # what the user typed, e.g. "org/name@v2" or "./ckpt"
    kind: Literal["hub", "local"]
    repo_id: str | None  # hub only
    requested_revision: str | None  # hub only; None = default branch
    resolved_sha: str | None  # hub only: the commit every URL uses
    path: str | None  # local only, absolute


class Source(ABC):
    """Safetensors files of one model, read by byte range. Thread-safe; use ``with`` or ``close()``."""

    info: SourceInfo
    _files: list[str]
    _other_files: frozenset[str] = frozenset()  # root-level file names, weights included

    def weight_files(self) -> list[str]:
        """The safetensors files to read, relative names, in index or name order."""
        return list(self._files)

    def read_header(self, file: str, max_header_bytes: int | None = None) -> SafetensorsHeader:
        """Read and validate one file's header (offsets are checked against the file size).

        ``max_header_bytes`` (a server's cap, ``header_cap(max_tensors)``) is checked against the
        8-byte length prefix, so a longer header is refused after the first read, unfetched.
        """
        size = self.size_bytes(file)
        prefix = bytearray(min(HEADER_PROBE_BYTES, size))
        self.read_into(file, 0, len(prefix), memoryview(prefix))
        try:
            header_len = parse_header_length(bytes(prefix[:8]), file=file, file_size=size)
            if max_header_bytes is not None and header_len > max_header_bytes:
                raise LimitExceededError(
                    f"{self.describe()}: {file} announces a {header_len:,}-byte header, above this server's cap of "
                    f"{max_header_bytes:,} bytes (set by LORAFID_MAX_TENSORS: {HEADER_BYTES_PER_TENSOR} bytes a "
                    "tensor, plus 1 MB of metadata). Run it with the CLI on your own machine: "
                    "lorafid audit BASE FINETUNE"
                )
            if 8 + header_len > len(prefix):  # a header longer than the probe: one more read
                probed = len(prefix)
                prefix.extend(bytes(8 + header_len - probed))
                self.read_into(file, probed, 8 + header_len, memoryview(prefix)[probed:])
            return parse_file_prefix(bytes(prefix), file=file, file_size=size)
        except SafetensorsHeaderError as e:
            raise SafetensorsHeaderError(f"{self.describe()}: {e}") from e

    def read_small_file(self, name: str, max_bytes: int = MAX_INDEX_BYTES) -> bytes | None:
        """A small root-level file of the repo or directory read whole (``config.json``,
        ``tokenizer.json``), at the same pinned commit; None when the file is not there.

        For files beside the weights that other layers need; never used for weights.

        Raises:
            FetchError: the file is larger than ``max_bytes`` or cannot be read.
        """
        if not _is_plain_name(name):
            raise FetchError(f"{name!r} is not a plain file name of {self.describe()}.")
        if name not in self._other_files:
            return None
        return self._read_small_file(name, max_bytes)

    @abstractmethod
    def _read_small_file(self, name: str, max_bytes: int) -> bytes: ...

    def describe(self, file: str | None = None) -> str:
        """``repo org/name@1a2b3c4d5e6f`` or ``/abs/path``, plus the file: for messages."""
        i = self.info
        where = f"repo {i.repo_id}@{(i.resolved_sha or '')[:12]}" if i.kind == "hub" else str(i.path)
        return f"{where}, file {file}" if file else where

    def _check_known(self, file: str) -> None:
        # Only listed weight files are readable: a caller cannot steer reads elsewhere.
        if file not in self._files:
            raise FetchError(f"{file} is not a weight file of {self.describe()}; known: {', '.join(self._files)}.")

    @property
    @abstractmethod
    def bytes_read(self) -> int:
        """Bytes delivered to callers so far (for benchmarks and tests)."""

    @property
    @abstractmethod
    def requests_made(self) -> int:
        """Range requests (or positioned reads) made so far."""

    @abstractmethod
    def size_bytes(self, file: str) -> int: ...

    @abstractmethod
    def read_into(self, file: str, start: int, end: int, out: memoryview) -> None:
        """Fill ``out[: end - start]`` with bytes ``[start, end)`` of ``file``; FetchError on failure."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def model_info(api: HfApi, repo_id: str, revision: str | None, retry: RetryPolicy) -> ModelInfo:
    """A repo's metadata at a revision (its commit SHA and files), asked again after an answer
    worth another try (HTTP 408, 429, 5xx, a dropped connection) as ``retry`` allows: on a busy
    Hub, or from many batch workers at once, one such answer would fail an audit before it
    starts. Other answers (missing, gated, private) raise at once; the last transient one
    raises as itself once the tries are spent, so callers word it as they word any Hub error.
    """

    def attempt() -> ModelInfo:
        try:
            return api.model_info(repo_id, revision=revision, timeout=30)
        except hf_errors.HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status is not None and worth_retrying(status):
                raise Transient(f"HTTP {status}", retry_after_s(e.response.headers.get("Retry-After"))) from e
            raise
        except httpx2.TransportError as e:
            raise Transient(f"{type(e).__name__}: {e}") from e

    def give_up(tries: int, last: Transient) -> Exception:
        cause = last.__cause__
        return cause if isinstance(cause, Exception) else last

    return with_retries(attempt, retry, what=f"metadata of {repo_id}", give_up=give_up)


def parse_source_spec(spec: str, *, revision: str | None = None, allow_local: bool = True) -> SourceInfo:
    """Classify and validate what the user typed; touches the file system only if ``allow_local``.

    Local: starts with ``./``, ``../``, ``/`` or ``~``, ends with ``.safetensors``, or exists.
    Hub: ``org/name`` or ``org/name@revision`` (``revision=`` must agree with ``@revision``).
    Example: "org/m@v2" -> SourceInfo(kind="hub", repo_id="org/m", requested_revision="v2", ...).

    Raises:
        InvalidSourceError: a malformed repo ID or revision, or a local path when not allowed.
    """
    text = spec.strip()
    looks_local = (
        text in (".", "..")
        or text.startswith(("./", "../", "~", ".\\", "..\\"))
        or os.path.isabs(text)
        or text.endswith(".safetensors")
        or (allow_local and bool(text) and os.path.exists(text))
    )
    if looks_local:
        if not allow_local:
            problem = f"{spec!r} is a local path; this deployment reads Hub repos only."
            raise InvalidSourceError(f"{problem} {_SPEC_HELP}", problem=problem)
        if revision is not None:
            raise InvalidSourceError(f"{spec!r} is a local path; a revision applies to Hub repos only.")
        path = os.path.abspath(os.path.expanduser(text))
        return SourceInfo(spec, "local", None, None, None, path)
    repo_id, _, at_revision = text.partition("@")
    if "@" in text and revision is not None and revision != at_revision:
        raise InvalidSourceError(f"{spec!r} names revision {at_revision!r} but {revision!r} was also given.")
    if "://" in repo_id or repo_id.startswith(("huggingface.co/", "hf.co/")):
        problem = f"{spec!r} is a URL; pass the repo ID (org/name) instead."
        raise InvalidSourceError(f"{problem} {_SPEC_HELP}", problem=problem)
    if not is_repo_id(repo_id):
        problem = f"{spec!r} is not a valid Hub repo ID or an existing path."
        raise InvalidSourceError(f"{problem} {_SPEC_HELP}", problem=problem)
    rev = at_revision if "@" in text else revision
    if rev is not None and (not rev or len(rev) > 255 or _BAD_REVISION_RE.search(rev)):
        problem = (
            f"Revision {rev!r} of {repo_id} is not a valid branch, tag or commit (no spaces, '..', control or "
            "~^:?*[\\ characters)."
        )
        raise InvalidSourceError(f"{problem} {_SPEC_HELP}", problem=problem)
    return SourceInfo(spec, "hub", repo_id, rev, None, None)


def open_source(
    spec: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    allow_local: bool = True,
    chunk_bytes: int = 16 * 2**20,
    max_workers: int = 8,
    retry: RetryPolicy | None = None,
) -> Source:
    """Open a Hub repo or local path for reading (see ``parse_source_spec`` for the forms).

    Args:
        token: Hub token; None uses huggingface_hub's lookup (HF_TOKEN, stored login); False sends none.
        endpoint: Hub URL; None uses HF_ENDPOINT, else https://huggingface.co.
        allow_local: False for public deployments, so users cannot read server files.
        chunk_bytes, max_workers: larger ranges are split into parallel GETs of this size.
        retry: backoff for transient HTTP failures (default: 5 tries, 0.5 s doubling).

    Raises:
        InvalidSourceError, RepoNotFoundError, GatedRepoError, RevisionNotFoundError,
        NotSafetensorsError, FetchError.
    """
    info = parse_source_spec(spec, revision=revision, allow_local=allow_local)
    if info.kind == "local":
        return LocalSource(info)
    return HubSource(
        info, token=token, endpoint=endpoint, chunk_bytes=chunk_bytes, max_workers=max_workers, retry=retry
    )


def choose_weight_files(
    names: list[str], read_index: Callable[[], bytes], *, where: str, pickle_hint: str
) -> list[str]:
    """Pick the safetensors files of a model from its file list.

    Rules: the files of ``model.safetensors.index.json``'s weight_map if present; else
    ``model.safetensors``; else every root-level ``*.safetensors``, without
    ``consolidated*.safetensors`` when other shards exist (Mistral ships both layouts).
    """
    present = set(names)
    if INDEX_FILE in present:
        files = _index_files(read_index(), where=where)
        missing = [f for f in files if f not in present]
        if missing:
            raise NotSafetensorsError(
                f"{where}: {INDEX_FILE} lists {missing[0]}, which is not there. The index is stale or the "
                "upload is incomplete; pick another revision."
            )
        return files
    if SINGLE_FILE in present:
        return [SINGLE_FILE]
    shards = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
    if shards:
        return [n for n in shards if not n.startswith("consolidated")] or shards
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise NotSafetensorsError(
            f"{where} has only pickle weights ({pickles[0]}); lorafid never unpickles downloaded files. {pickle_hint}"
        )
    raise NotSafetensorsError(f"{where} has no weights: no .safetensors file and no index. Is it a model?")


def _index_files(raw: bytes, *, where: str) -> list[str]:
    """The distinct shard names of an index json, validated as relative names."""
    try:
        weight_map = json.loads(raw)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SafetensorsHeaderError(f"{where}: {INDEX_FILE} has no readable weight_map ({e}).") from e
    bad = [f for f in files if not _is_safe_name(f)]
    if bad or not files:
        raise SafetensorsHeaderError(f"{where}: {INDEX_FILE} names unusable files: {bad or 'none'}.")
    return files


def _is_safe_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and name.endswith(".safetensors")
        and not name.startswith("/")
        and "\\" not in name
        and ".." not in name.split("/")
    )


class HubSource(Source):
    """A Hub repo at one commit, read with checked HTTP range requests (see ``http_ranges``)."""

    def __init__(
        self,
        info: SourceInfo,
        *,
        token: str | bool | None = None,
        endpoint: str | None = None,
        chunk_bytes: int = 16 * 2**20,
        max_workers: int = 8,
        retry: RetryPolicy | None = None,
    ) -> None:
        assert info.repo_id is not None  # parse_source_spec guarantees it for kind "hub"
        self._repo_id = info.repo_id
        # HF_ENDPOINT read now, not at huggingface_hub's import, so tests and apps can set it late.
        self._endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self._token = token  # None: huggingface_hub looks up HF_TOKEN / the stored login
        self.info = info
        self._files = []
        try:
            api = HfApi(endpoint=self._endpoint, token=token, library_name=LIBRARY_NAME, library_version=__version__)
            model = model_info(api, self._repo_id, info.requested_revision, retry or RetryPolicy())
        except (hf_errors.HfHubHTTPError, httpx2.TransportError) as e:
            raise self._hub_error(e) from e
        if not is_commit_sha(model.sha or ""):
            raise FetchError(f"{self._endpoint} returned no commit SHA for {self._repo_id}; is it a Hub endpoint?")
        self.info = replace(info, resolved_sha=model.sha)
        self._reader = RangeReader(
            self._locate, self.describe, chunk_bytes=chunk_bytes, max_workers=max_workers, retry=retry
        )
        try:
            names = [s.rfilename for s in model.siblings or []]
            self._other_files = frozenset(n for n in names if "/" not in n)
            self._files = choose_weight_files(
                names,
                lambda: self._reader.fetch_whole(INDEX_FILE, MAX_INDEX_BYTES),
                where=self.describe(),
                pickle_hint="Look for a safetensors conversion: a revision like refs/pr/N from the Hub's "
                f"conversion bot (see {self._endpoint}/{self._repo_id}/discussions), and pass it as "
                f"{self._repo_id}@refs/pr/N.",
            )
            # Gated repos show their file list to anyone; resolving a shard now turns a missing
            # licence into an error before any work starts (the location is needed anyway).
            self._reader.size_bytes(self._files[0])
        except BaseException:
            self._reader.close()
            raise

    @property
    def bytes_read(self) -> int:
        return self._reader.bytes_read

    @property
    def requests_made(self) -> int:
        return self._reader.requests_made

    def size_bytes(self, file: str) -> int:
        self._check_known(file)
        return self._reader.size_bytes(file)

    def read_into(self, file: str, start: int, end: int, out: memoryview) -> None:
        self._check_known(file)
        self._reader.read_into(file, start, end, out)

    def close(self) -> None:
        self._reader.close()

    def _read_small_file(self, name: str, max_bytes: int) -> bytes:
        return self._reader.fetch_whole(name, max_bytes)

    def _locate(self, file: str) -> RemoteFile:
        """HEAD the resolve URL at the pinned SHA: the CDN location (or itself) and the size."""
        url = hf_hub_url(self._repo_id, file, revision=self.info.resolved_sha, endpoint=self._endpoint)
        try:
            meta = get_hf_file_metadata(
                url,
                token=self._token,
                timeout=30,
                endpoint=self._endpoint,
                retry_on_errors=True,
                library_name=LIBRARY_NAME,
                library_version=__version__,
            )
        except (hf_errors.HfHubHTTPError, httpx2.TransportError) as e:
            raise self._hub_error(e, file) from e
        if meta.size is None:
            raise FetchError(f"{self.describe(file)}: the Hub did not report the file size; cannot read by range.")
        location = urljoin(url, meta.location)
        headers = build_hf_headers(token=self._token, library_name=LIBRARY_NAME, library_version=__version__)
        if _origin(location) != _origin(self._endpoint):
            headers.pop("authorization", None)  # the CDN URL is signed; the token stays with the Hub
        return RemoteFile(location, meta.size, headers)

    def _hub_error(self, e: Exception, file: str | None = None) -> LorafidError:
        repo, page = self._repo_id, f"{self._endpoint}/{self._repo_id}"
        status = e.response.status_code if isinstance(e, hf_errors.HfHubHTTPError) else None
        if isinstance(e, hf_errors.GatedRepoError) or status == 403:
            return GatedRepoError(
                f"{repo} is a gated repo: accept the licence at {page} (signed in to the Hub), then pass a token "
                "with --token or HF_TOKEN, or sign in (hf auth login, or the app's Sign in button).",
                repo=repo,
                page=page,
            )
        if isinstance(e, hf_errors.RepositoryNotFoundError):
            return RepoNotFoundError(
                f"Repo {repo} was not found on {self._endpoint}. Check the spelling (org/name); a private "
                "repo also needs a token that can read it (--token or HF_TOKEN).",
                repo=repo,
                endpoint=self._endpoint,
            )
        if isinstance(e, hf_errors.RevisionNotFoundError):
            return RevisionNotFoundError(
                f"Revision {self.info.requested_revision!r} does not exist in {repo}. Pass a branch, tag or "
                f"commit SHA listed at {page}/commits/main, or leave the revision out for the default branch."
            )
        if status == 401:
            return RepoNotFoundError(
                f"The Hub rejected the token for {repo} (401): it is invalid or expired. Create a new one at "
                f"{self._endpoint}/settings/tokens and pass it with --token or HF_TOKEN.",
                repo=repo,
                endpoint=self._endpoint,
                token_rejected=True,
            )
        what = f"file {file} of {repo}" if file else repo
        if isinstance(e, hf_errors.EntryNotFoundError):
            return FetchError(f"The Hub lists {what} but cannot serve it (404). Try again, or another revision.")
        reason = f"HTTP {status}" if status else type(e).__name__
        return FetchError(
            f"Could not read {what} from {self._endpoint} ({reason}). Check the network and HF_ENDPOINT, "
            "or try again later."
        )


class LocalSource(Source):
    """A local ``.safetensors`` file or a directory of shards, read with positioned reads."""

    def __init__(self, info: SourceInfo) -> None:
        assert info.path is not None  # parse_source_spec guarantees it for kind "local"
        self.info = info
        self._bytes_read = 0
        self._requests_made = 0
        self._lock = threading.Lock()
        path = info.path
        if os.path.isdir(path):
            self._root = path
            with os.scandir(path) as entries:
                names = sorted(e.name for e in entries if e.is_file())
            self._other_files = frozenset(names)
            self._files = choose_weight_files(
                names,
                lambda: _read_small(os.path.join(path, INDEX_FILE)),
                where=path,
                pickle_hint="Convert it to safetensors first (safetensors.torch.save_file), in a trusted environment.",
            )
        elif os.path.isfile(path) and path.endswith(".safetensors"):
            self._root, name = os.path.split(path)
            self._files = [name]
            with os.scandir(self._root) as entries:
                self._other_files = frozenset(e.name for e in entries if e.is_file())
        elif os.path.isfile(path):
            raise NotSafetensorsError(f"{path} is not a .safetensors file; lorafid reads safetensors weights only.")
        else:
            raise InvalidSourceError(f"{info.spec!r}: no such file or directory ({path}). {_SPEC_HELP}")

    def size_bytes(self, file: str) -> int:
        self._check_known(file)
        return os.path.getsize(os.path.join(self._root, file))

    def read_into(self, file: str, start: int, end: int, out: memoryview) -> None:
        self._check_known(file)
        if out.format != "B" or out.ndim != 1:
            out = out.cast("B")
        want = end - start
        if start < 0 or want < 0 or len(out) < want:
            raise FetchError(f"Bad byte range [{start}, {end}) for {self.describe(file)} into {len(out)} bytes.")
        got = 0
        # Unbuffered FileIO.readinto copies straight from the kernel into the caller's buffer.
        with open(os.path.join(self._root, file), "rb", buffering=0) as fh:
            fh.seek(start)
            while got < want:
                n = fh.readinto(out[got:want])
                if not n:
                    raise FetchError(
                        f"{self.describe(file)} ended at byte {start + got}, before {end}: the file is shorter "
                        "than its header says (truncated copy, or changed while reading?)."
                    )
                got += n
        with self._lock:
            self._bytes_read += want
            self._requests_made += 1

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    @property
    def requests_made(self) -> int:
        return self._requests_made

    def close(self) -> None:
        pass  # files are opened per read

    def _read_small_file(self, name: str, max_bytes: int) -> bytes:
        path = os.path.join(self._root, name)
        return _read_capped(
            path,
            max_bytes,
            lambda size: FetchError(f"{path} is {size} bytes; more than the {max_bytes} expected of it."),
        )


def _read_small(path: str) -> bytes:
    def too_large(size: int) -> Exception:
        return SafetensorsHeaderError(f"{path} is {size} bytes; an index is expected to be under {MAX_INDEX_BYTES}.")

    return _read_capped(path, MAX_INDEX_BYTES, too_large)


def _read_capped(path: str, max_bytes: int, too_large: Callable[[int], Exception]) -> bytes:
    """A local file read whole, refused from its size (``too_large(size)``) before any byte is read."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise too_large(size)
    with open(path, "rb") as fh:
        return fh.read()


def _is_plain_name(name: str) -> bool:
    """A root-level file name: no folders, no parent references, no control characters."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and name.isprintable()


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    return (parts.scheme, (parts.hostname or "").lower(), parts.port or default_port)
