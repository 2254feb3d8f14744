"""A Hub-compatible HTTP server on 127.0.0.1 for offline tests, with a separate "CDN" origin.

The real ``huggingface_hub`` client talks to it (``endpoint=hub.endpoint`` or ``HF_ENDPOINT``),
so tests exercise the same requests, redirects and error headers as the Hugging Face Hub:

- ``GET /api/models/{id}`` and ``/api/models/{id}/revision/{rev}``: ``id``, ``sha``, ``siblings``...
- ``GET /api/models/{id}/tree/{rev}[/{path}]`` and ``POST /api/models/{id}/paths-info/{rev}``.
- ``HEAD|GET /{id}/resolve/{rev}/{file}``: ``*.safetensors`` answer 302 to a signed URL on the
  CDN origin (another port); other files are served directly. Both honour single ``Range``s
  (206 + ``Content-Range``, 416 when unsatisfiable).
- errors carry ``X-Error-Code`` (``RepoNotFound``, ``GatedRepo``, ``RevisionNotFound``,
  ``EntryNotFound``) and a JSON ``{"error": ...}`` body, which is what ``hf_raise_for_status`` reads.

Fault injection (``hub.faults``, or ``with hub.inject(...)``) applies to every response that
carries file bytes (CDN GETs and direct resolve GETs), never to API calls or HEADs. Every
request to either origin is recorded in ``hub.requests``. ``HubServer(link_bytes_per_s=...)``
puts all those bytes, of every connection on both origins, through one shared link of that
rate (for benchmarks: ``slow_bytes_per_s`` paces each response on its own, so 8 parallel
range requests would get 8× the rate).

Dataset repos and writes (what ``HfApi.create_repo``/``create_commit``/``list_repo_tree``/
``hf_hub_download`` call for ``repo_type="dataset"``; see "datasets" at the end of the handler):
``POST /api/repos/create``, ``GET /api/datasets/{id}[/revision/{rev}]``, ``.../tree/{rev}[/{path}]``,
``POST /api/datasets/{id}/preupload/{rev}`` (the Hub's rule: ``*.safetensors``, binary or over
``regular_max_bytes`` -> "lfs", else "regular"), ``POST /api/datasets/{id}/commit/{rev}`` (NDJSON),
the LFS batch API (``POST /datasets/{id}.git/info/lfs/objects/batch``, basic transfer: ``PUT``
to the hub origin) and ``HEAD|GET /datasets/{id}/resolve/{rev}/{file}``. Anonymous writes get
401; ``write_tokens`` (None: any token) limits who may write, others get 403 as a read-only
token does. ``hub.dataset_commits`` logs each commit. The client must not use Xet for these
uploads (``huggingface_hub.constants.HF_HUB_DISABLE_XET = True`` in the test).
Model repos are written the same way (``upload_folder``/``push_to_hub``): ``/api/repos/create``
without a type, ``POST /api/models/{id}/preupload|commit/{rev}``, ``POST /{id}.git/info/lfs/objects/batch``;
``POST /api/validate-yaml`` (asked before a README.md is uploaded) accepts a front matter that
is a YAML mapping.

Not a goal: Xet storage, spaces, pagination, HTTP/2, multi-range requests
(they get the whole file with 200, as many servers do).

Example::

    hub.add_repo("org/base", {"model.safetensors": data})
    with hub.inject(status_sequence=[503, 502]):
        ...  # the next two byte responses are errors, then the server behaves
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.server
import json
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

Origin = Literal["hub", "cdn"]

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
# Handler sockets time out so a stuck client can never hang a test or the shutdown.
_SOCKET_TIMEOUT_S = 10.0
_SLOW_PIECE_BYTES = 4096
_LINK_PIECE_BYTES = 64 * 2**10  # small enough that 8 connections interleave smoothly at 25 MB/s


class _Link:
    """Hands out send slots so that all senders together stay at ``bytes_per_s``; no burst credit."""

    def __init__(self, bytes_per_s: float) -> None:
        self.bytes_per_s = bytes_per_s
        self._lock = threading.Lock()
        self._free_at = time.monotonic()

    def wait(self, size_bytes: int) -> None:
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + size_bytes / self.bytes_per_s
            until = self._free_at
        time.sleep(max(0.0, until - time.monotonic()))


@dataclass
class Faults:
    """Ways the byte-serving responses misbehave; defaults are a well-behaved server.

    ``status_sequence`` and ``rate_limit`` consume themselves one response at a time. The
    other switches hit every byte response while ``times`` is None, else the next ``times``.
    """

    ignore_range: bool = False  # 200 with the whole file, as a Range-stripping proxy would
    drop_connection_after_bytes: int | None = None  # send headers + this many bytes, then close
    truncate_body: bool = False  # honest Content-Length, half the body, then close
    status_sequence: list[int] = field(default_factory=list)  # e.g. [503, 502, 500], then OK
    rate_limit: int = 0  # answer this many byte requests with 429
    retry_after: str = "0"  # Retry-After value sent with each 429
    slow_bytes_per_s: float | None = None  # pace every body at this rate
    wrong_content_range: bool = False  # 206 whose Content-Range is one byte off
    times: int | None = None  # budget for the four switches above marked "every"
    # The next model-info answers (GET /api/models/...): these statuses, then the real answer.
    api_status_sequence: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it: enough to count calls and check what was asked."""

    origin: Origin
    method: str
    path: str  # raw (still quoted) path, without the query
    query: str
    range: str | None  # the Range header, verbatim
    has_authorization: bool
    headers: dict[str, str]  # lower-cased names
    status: int
    bytes_sent: int  # body bytes actually written


@dataclass
class _Repo:
    repo_id: str
    gated: bool = False
    private: bool = False
    revisions: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files


class _Handled(Exception):
    """Raised after an error response has been sent, to stop handling the request."""


class HubServer:
    """The Hub and its CDN on two loopback ports. ``start()``/``stop()`` or use as a context manager."""

    def __init__(
        self,
        *,
        valid_tokens: set[str] | None = None,
        cdn_url_ttl_s: float = 3600.0,
        link_bytes_per_s: float | None = None,
    ) -> None:
        self.valid_tokens = valid_tokens  # None: any "Bearer ..." is accepted
        self.cdn_url_ttl_s = cdn_url_ttl_s
        self.link = _Link(link_bytes_per_s) if link_bytes_per_s else None  # one link shared by all
        self.faults = Faults()
        self._requests: list[RecordedRequest] = []
        self._in_flight = 0  # requests being answered; their records are not in the log yet
        self._repos: dict[str, _Repo] = {}
        self._blobs: dict[str, bytes] = {}  # sha256 hex -> content, what the CDN serves
        self._datasets: dict[str, _Repo] = {}  # dataset repos, apart from models (same IDs may exist)
        self.write_tokens: set[str] | None = None  # None: any token may write to datasets
        self.regular_max_bytes = 10 * 2**20  # larger files must go through LFS, as on the Hub
        self.dataset_commits: list[tuple[str, str, tuple[str, ...]]] = []  # (repo, commit sha, paths)
        self._lock = threading.Lock()
        self._quiet = threading.Condition(self._lock)
        self._key = secrets.token_bytes(16)
        self._cdn_epoch = 0
        self._servers: list[http.server.ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.endpoint = ""
        self.cdn_endpoint = ""

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> HubServer:
        for origin in ("hub", "cdn"):
            server = _Server(("127.0.0.1", 0), _make_handler(self, origin))
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_endpoint = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content ----------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        revision: str = "main",
        gated: bool = False,
        private: bool = False,
        sha: str | None = None,
    ) -> str:
        """Add (or add a revision to) a model repo; returns the commit SHA.

        The SHA is derived from the content and revision name unless given. The SHA itself is
        always a valid revision. ``gated``/``private`` apply to the whole repo (last call wins).
        """
        if sha is None:
            digest = hashlib.sha1(revision.encode())
            for name in sorted(files):
                digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
            sha = digest.hexdigest()
        if not re.fullmatch(r"[0-9a-f]{40}", sha):
            raise ValueError(f"sha must be 40 lowercase hex characters, got {sha!r}")
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(repo_id))
            repo.gated, repo.private = gated, private
            repo.revisions[revision] = sha
            repo.commits[sha] = dict(files)
            for content in files.values():
                self._blobs[hashlib.sha256(content).hexdigest()] = content
        return sha

    def dataset_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a dataset repo at a revision (what commits made of it)."""
        with self._lock:
            repo = self._datasets[repo_id]
            return dict(repo.commits[repo.revisions.get(revision, revision)])

    # -- faults and log ---------------------------------------------------------------------
    @contextlib.contextmanager
    def inject(self, **faults: Any) -> Iterator[Faults]:
        """Use ``Faults(**faults)`` inside the block, then restore a well-behaved server."""
        previous = self.faults
        self.faults = Faults(**faults)
        try:
            yield self.faults
        finally:
            self.faults = previous

    def expire_cdn_urls(self) -> None:
        """Every CDN URL signed so far now answers 403 (as an expired signed URL does)."""
        with self._lock:
            self._cdn_epoch += 1

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the log, taken once no request is mid-answer.

        A client can hold a complete response a moment before the handler thread has logged
        it; waiting (at most 5 s) for the server to go quiet makes the log complete.
        """
        with self._quiet:
            self._quiet.wait_for(lambda: self._in_flight == 0, timeout=5)
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._quiet:
            self._quiet.wait_for(lambda: self._in_flight == 0, timeout=5)
            self._requests.clear()

    def requests_matching(
        self, *, origin: Origin | None = None, method: str | None = None, path_contains: str = ""
    ) -> list[RecordedRequest]:
        return [
            r
            for r in self.requests
            if (origin is None or r.origin == origin)
            and (method is None or r.method == method)
            and path_contains in unquote(r.path)
        ]

    def bytes_served(self, contents: Iterable[bytes]) -> int:
        """Body bytes sent of these files' contents (e.g. a model's weight files), over every GET
        of the CDN (by blob) or of the Hub's resolve URLs (by content), ranges included."""
        blobs = {hashlib.sha256(c).hexdigest() for c in contents}
        names = {
            path
            for repo in self._repos.values()
            for files in repo.commits.values()
            for path, content in files.items()
            if hashlib.sha256(content).hexdigest() in blobs
        }
        total = 0
        for r in self.requests:
            path = unquote(r.path)
            resolved = "/resolve/" in path and any(path.endswith("/" + name) for name in names)
            if r.method == "GET" and (path.removeprefix("/blobs/") in blobs or resolved):
                total += r.bytes_sent
        return total

    # -- internals used by the handler -----------------------------------------------------
    def _begin(self) -> None:
        with self._lock:
            self._in_flight += 1

    def _record(self, request: RecordedRequest) -> None:
        with self._quiet:
            self._requests.append(request)
            self._in_flight -= 1
            self._quiet.notify_all()

    def _sign(self, blob: str) -> str:
        with self._lock:
            epoch = self._cdn_epoch
        expires = int(time.time() + self.cdn_url_ttl_s)
        signature = hmac.new(self._key, f"{blob}:{epoch}:{expires}".encode(), "sha256").hexdigest()
        return f"{self.cdn_endpoint}/blobs/{blob}?epoch={epoch}&Expires={expires}&Signature={signature}"

    def _signature_ok(self, blob: str, query: dict[str, list[str]]) -> bool:
        try:
            epoch = int(query["epoch"][0])
            expires = int(query["Expires"][0])
            signature = query["Signature"][0]
        except (KeyError, ValueError, IndexError):
            return False
        expected = hmac.new(self._key, f"{blob}:{epoch}:{expires}".encode(), "sha256").hexdigest()
        with self._lock:
            current = self._cdn_epoch
        return hmac.compare_digest(signature, expected) and epoch == current and expires >= time.time()

    def _take_fault(self) -> tuple[str, Any] | None:  # (kind, its argument)
        """Decide, atomically, which fault (if any) the next byte response gets."""
        with self._lock:
            f = self.faults
            if f.status_sequence:
                return ("status", f.status_sequence.pop(0))
            if f.rate_limit > 0:
                f.rate_limit -= 1
                return ("rate_limit", f.retry_after)
            switches = [
                ("ignore_range", f.ignore_range),
                ("wrong_content_range", f.wrong_content_range),
                ("truncate_body", f.truncate_body),
                ("drop", f.drop_connection_after_bytes is not None),
            ]
            active = next((name for name, on in switches if on), None)
            if active is None or f.times == 0:
                return None
            if f.times is not None:
                f.times -= 1
            return (active, f.drop_connection_after_bytes)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not delay stop()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up (on purpose, in fault tests) is not a server bug worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


def _make_handler(hub: HubServer, origin: Origin) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.hub = hub
    Handler.origin = origin
    return Handler


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client pools connections
    # Headers and body go out in separate writes: with Nagle's algorithm on, the body waits
    # for the client's delayed ACK (40 ms on Linux) on every response, as no real Hub does.
    disable_nagle_algorithm = True
    timeout = _SOCKET_TIMEOUT_S
    hub: HubServer
    origin: Origin

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean; the request log is in hub.requests

    # -- dispatch ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self.hub._begin()
        self._status, self._sent = 0, 0
        split = urlsplit(self.path)
        self._raw_path, self._query = split.path, split.query
        try:
            length = int(self.headers.get("Content-Length") or 0)
            self._body = self.rfile.read(length) if length else b""
            if self.origin == "cdn":
                self._serve_cdn()
            else:
                self._serve_hub()
        except _Handled:
            pass
        except (ConnectionError, TimeoutError, ValueError):
            self.close_connection = True
        finally:
            self.hub._record(
                RecordedRequest(
                    origin=self.origin,
                    method=self.command,
                    path=self._raw_path,
                    query=self._query,
                    range=self.headers.get("Range"),
                    has_authorization=self.headers.get("Authorization") is not None,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    status=self._status,
                    bytes_sent=self._sent,
                )
            )

    # -- CDN origin ------------------------------------------------------------------------
    def _serve_cdn(self) -> None:
        match = re.fullmatch(r"/blobs/([0-9a-f]{64})", self._raw_path)
        content = self.hub._blobs.get(match.group(1)) if match else None
        if match is None or content is None or self.command != "GET":
            self._send_simple(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
            return
        if not self.hub._signature_ok(match.group(1), parse_qs(self._query)):
            # What CloudFront/S3 answer for an expired or tampered signed URL.
            self._send_simple(403, b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>")
            return
        self._send_content(content, {"ETag": f'"{match.group(1)}"'})

    # -- Hub origin ------------------------------------------------------------------------
    def _serve_hub(self) -> None:
        parts = [unquote(p) for p in self._raw_path.split("/")[1:]]
        if self._serve_datasets(parts):
            return
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if self.command == "GET" and (not rest or rest[0] == "revision"):
                with self.hub._lock:
                    queued = self.hub.faults.api_status_sequence
                    failing = queued.pop(0) if queued else None
                if failing is not None:
                    self._send_simple(failing, b'{"error": "injected"}', "application/json", {"Retry-After": "0"})
                    return
            repo = self._repo(repo_id)
            self._check_private(repo)
            if not rest and self.command == "GET":
                self._model_info(repo, "main")
            elif len(rest) == 2 and rest[0] == "revision" and self.command == "GET":
                self._model_info(repo, rest[1])
            elif len(rest) >= 2 and rest[0] == "tree" and self.command == "GET":
                self._tree(repo, rest[1], "/".join(rest[2:]))
            elif len(rest) == 2 and rest[0] == "paths-info" and self.command == "POST":
                self._paths_info(repo, rest[1])
            elif len(rest) == 2 and rest[0] in ("preupload", "commit") and self.command == "POST":
                self._check_write(repo)  # model uploads: the same flow as the datasets' below
                (self._preupload if rest[0] == "preupload" else self._dataset_commit)(repo, rest[1])
            else:
                self._send_simple(404, b'{"error": "Not Found"}', "application/json")
            return
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            repo = self._repo(f"{parts[0]}/{parts[1].removesuffix('.git')}")
            self._check_write(repo)
            self._lfs_batch()
            return
        if len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
            repo = self._repo("/".join(parts[:2]))
            self._check_private(repo)
            self._check_gated(repo)
            sha, files = self._commit(repo, parts[3])
            self._resolve(repo, sha, files, "/".join(parts[4:]))
            return
        self._send_simple(404, b'{"error": "Not Found"}', "application/json")

    def _repo(self, repo_id: str) -> _Repo:
        repo = self.hub._repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        assert repo is not None
        return repo

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") and len(auth) > 7 else None

    def _check_private(self, repo: _Repo) -> None:
        token = self._token()
        valid = self.hub.valid_tokens
        if token is not None and valid is not None and token not in valid:
            # The Hub's answer to a bad token; huggingface_hub raises a plain HfHubHTTPError.
            self._error(401, None, "Invalid credentials in Authorization header")
        if repo.private and token is None:
            self._error(401, "RepoNotFound", "Repository not found")

    def _check_gated(self, repo: _Repo) -> None:
        if repo.gated and self._token() is None:
            self._error(
                401,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in.",
            )

    def _commit(self, repo: _Repo, revision: str) -> tuple[str, dict[str, bytes]]:
        sha = repo.revisions.get(revision) or (revision if revision in repo.commits else None)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        assert sha is not None
        return sha, repo.commits[sha]

    def _model_info(self, repo: _Repo, revision: str) -> None:
        sha, files = self._commit(repo, revision)
        info = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "library_name": "transformers",
            "siblings": [{"rfilename": name} for name in sorted(files)],
        }
        self._send_json(info, {"X-Repo-Commit": sha})

    def _entry(self, name: str, content: bytes) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": _git_blob_sha(content), "size": len(content), "path": name}
        if name.endswith(".safetensors"):
            entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
        return entry

    def _tree(self, repo: _Repo, revision: str, folder: str) -> None:
        _, files = self._commit(repo, revision)
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        recursive = parse_qs(self._query).get("recursive", ["false"])[0].lower() == "true"
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for name in sorted(files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append(self._entry(name, files[name]))
        if prefix and not entries and not folders:
            self._error(404, "EntryNotFound", f"{folder} does not exist on {revision!r}")
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(folders)]
        self._send_json(entries)

    def _paths_info(self, repo: _Repo, revision: str) -> None:
        _, files = self._commit(repo, revision)
        paths: list[str] = []
        if self._body:
            if "json" in (self.headers.get("Content-Type") or ""):
                paths = list(json.loads(self._body).get("paths", []))
            else:
                paths = parse_qs(self._body.decode()).get("paths", [])
        self._send_json([self._entry(p, files[p]) for p in paths if p in files])

    def _resolve(self, repo: _Repo, sha: str, files: dict[str, bytes], name: str) -> None:
        content = files.get(name)
        if content is None:
            self._error(404, "EntryNotFound", f"{name} does not exist on this revision")
        assert content is not None
        common = {"X-Repo-Commit": sha, "Vary": "Origin, Accept-Encoding"}
        if name.endswith(".safetensors"):
            blob = hashlib.sha256(content).hexdigest()
            headers = {
                **common,
                "ETag": f'"{blob}"',
                "X-Linked-Etag": f'"{blob}"',
                "X-Linked-Size": str(len(content)),
                "Location": self.hub._sign(blob),
            }
            self._send_simple(302, b"", "text/plain", headers)
            return
        self._send_content(content, {**common, "ETag": f'"{_git_blob_sha(content)}"'})

    # -- responses -------------------------------------------------------------------------
    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code is not None:
            headers["X-Error-Code"] = code
        self._send_simple(status, json.dumps({"error": message}).encode(), "application/json", headers)
        raise _Handled

    def _send_json(self, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send_simple(200, json.dumps(data).encode(), "application/json", headers)

    def _send_simple(
        self, status: int, body: bytes, content_type: str = "text/plain", headers: dict[str, str] | None = None
    ) -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self._sent += len(body)

    def _send_content(self, content: bytes, headers: dict[str, str]) -> None:
        """Serve file bytes, honouring one Range, with whatever fault is switched on."""
        size = len(content)
        fault = self.hub._take_fault() if self.command == "GET" else None
        kind, arg = fault if fault else (None, 0)
        if kind == "status":
            self._send_simple(arg, json.dumps({"error": "injected fault"}).encode(), "application/json")
            return
        if kind == "rate_limit":
            self._send_simple(429, b'{"error": "rate limited"}', "application/json", {"Retry-After": str(arg)})
            return
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        wanted = self._parse_range(self.headers.get("Range"), size)
        if wanted == "unsatisfiable":
            self._send_simple(416, b"", "text/plain", {**headers, "Content-Range": f"bytes */{size}"})
            return
        status, start, end = 200, 0, size
        if isinstance(wanted, tuple) and kind != "ignore_range":
            status, (start, end) = 206, wanted
            if kind == "wrong_content_range":
                # A one-byte shift: the bytes match the header, but not the request.
                start, end = (start + 1, min(end + 1, size)) if end < size else (max(start - 1, 0), end - 1)
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        body = content[start:end]
        self._status = status
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        limit = len(body)
        if kind == "truncate_body":
            limit = len(body) // 2
        elif kind == "drop":
            limit = min(len(body), arg)
        self._write_paced(body[:limit])
        if limit < len(body):
            # Close mid-body: the client sees fewer bytes than Content-Length promised.
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)

    def _write_paced(self, data: bytes) -> None:
        rate, link = self.hub.faults.slow_bytes_per_s, self.hub.link
        if not rate and link is None:
            self.wfile.write(data)
            self._sent += len(data)
            return
        size = _SLOW_PIECE_BYTES if rate else _LINK_PIECE_BYTES
        for i in range(0, len(data), size):
            piece = data[i : i + size]
            if link is not None:
                link.wait(len(piece))
            self.wfile.write(piece)
            self.wfile.flush()
            self._sent += len(piece)
            if rate:
                time.sleep(len(piece) / rate)

    @staticmethod
    def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
        """``Range`` -> half-open (start, end), None for "whole file", or "unsatisfiable".

        Example: ``bytes=0-99`` on a 50-byte file -> (0, 50); ``bytes=-10`` -> (40, 50);
        ``bytes=60-`` -> "unsatisfiable".
        """
        if header is None:
            return None
        match = _RANGE_RE.match(header.strip())
        if match is None or match.group(1) == match.group(2) == "":
            return None  # multi-range or garbage: ignored, as RFC 9110 allows
        first, last = match.group(1), match.group(2)
        if first == "":
            n = int(last)
            return (max(size - n, 0), size) if n > 0 and size > 0 else "unsatisfiable"
        start = int(first)
        end = size if last == "" else min(int(last) + 1, size)
        if start >= size or (last != "" and int(last) < start):
            return "unsatisfiable"
        return (start, end)

    # -- datasets: create, commit (regular + LFS), list, download --------------------------
    def _serve_datasets(self, parts: list[str]) -> bool:
        """Answer dataset and write requests; False when the path is not one of them."""
        if parts[:3] == ["api", "repos", "create"] and self.command == "POST":
            self._create_repo()
        elif parts[:2] == ["api", "validate-yaml"] and self.command == "POST":
            self._validate_yaml()
        elif parts[:2] == ["api", "datasets"] and len(parts) >= 4:
            repo = self._dataset("/".join(parts[2:4]))
            self._check_private(repo)
            rest = parts[4:]
            if not rest and self.command == "GET":
                self._dataset_info(repo, "main")
            elif len(rest) == 2 and rest[0] == "revision" and self.command == "GET":
                self._dataset_info(repo, rest[1])
            elif len(rest) >= 2 and rest[0] == "tree" and self.command == "GET":
                self._tree(repo, rest[1], "/".join(rest[2:]))
            elif len(rest) == 2 and rest[0] == "paths-info" and self.command == "POST":
                self._paths_info(repo, rest[1])
            elif len(rest) == 2 and rest[0] == "preupload" and self.command == "POST":
                self._check_write(repo)
                self._preupload(repo, rest[1])
            elif len(rest) == 2 and rest[0] == "commit" and self.command == "POST":
                self._check_write(repo)
                self._dataset_commit(repo, rest[1])
            else:
                self._send_simple(404, b'{"error": "Not Found"}', "application/json")
        elif (
            parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve" and self.command in ("GET", "HEAD")
        ):
            repo = self._dataset("/".join(parts[1:3]))
            self._check_private(repo)
            sha, files = self._commit(repo, parts[4])
            self._resolve(repo, sha, files, "/".join(parts[5:]))
        elif parts[:1] == ["datasets"] and parts[-4:] == ["info", "lfs", "objects", "batch"] and len(parts) == 7:
            repo = self._dataset("/".join(parts[1:3]).removesuffix(".git"))
            self._check_write(repo)
            self._lfs_batch()
        elif parts[:1] == ["lfs-upload"] and len(parts) == 2 and self.command == "PUT":
            self._lfs_put(parts[1])
        else:
            return False
        return True

    def _dataset(self, repo_id: str) -> _Repo:
        repo = self.hub._datasets.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        assert repo is not None
        return repo

    def _check_write(self, repo: _Repo | None) -> None:
        """401 without a token (the Hub's answer), 403 for a token that may not write."""
        token = self._token()
        if token is None:
            self._error(401, None, "Invalid username or password.")
        allowed = self.hub.write_tokens
        if allowed is not None and token not in allowed:
            where = repo.repo_id if repo is not None else "this namespace"
            self._error(403, None, f"You don't have the rights to write to {where}: read-only token.")

    def _create_repo(self) -> None:
        self._check_write(None)
        payload = json.loads(self._body or b"{}")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        kind = payload.get("type") or "model"  # huggingface_hub sends no type for model repos
        if kind not in ("dataset", "model"):
            self._error(400, None, "The loopback Hub creates dataset and model repos only")
        repos = self.hub._datasets if kind == "dataset" else self.hub._repos
        url = f"{self.hub.endpoint}/datasets/{repo_id}" if kind == "dataset" else f"{self.hub.endpoint}/{repo_id}"
        with self.hub._lock:
            if repo_id in repos:
                exists = True
            else:
                exists = False
                repo = _Repo(repo_id, private=payload.get("visibility") == "private")
                attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                sha = hashlib.sha1(repo_id.encode() + b"\0initial").hexdigest()
                repo.revisions["main"], repo.commits[sha] = sha, {".gitattributes": attributes}
                repos[repo_id] = repo
        if exists:
            self._send_simple(409, json.dumps({"error": f"You already created this {kind} repo", "url": url}).encode())
            return
        self._send_json({"url": url, "name": repo_id})

    def _validate_yaml(self) -> None:
        """What uploads of a README.md ask first: its YAML front matter must be a mapping."""
        content = str(json.loads(self._body or b"{}").get("content", ""))
        if content.startswith("---\n"):
            front = content[4:].split("\n---", 1)[0]
            try:
                metadata = yaml.safe_load(front)
            except yaml.YAMLError as e:
                metadata = f"invalid YAML: {e}"
            if not isinstance(metadata, dict):
                body = {"errors": [{"message": f"README.md metadata is not a mapping: {metadata!r}"[:300]}]}
                self._send_simple(400, json.dumps(body).encode(), "application/json")
                return
        self._send_json({"errors": [], "warnings": []})

    def _dataset_info(self, repo: _Repo, revision: str) -> None:
        sha, files = self._commit(repo, revision)
        info = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": [{"rfilename": name} for name in sorted(files)],
        }
        self._send_json(info, {"X-Repo-Commit": sha})

    def _preupload(self, repo: _Repo, revision: str) -> None:
        self._commit(repo, revision)
        files = json.loads(self._body).get("files", [])
        answers = []
        for f in files:
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].endswith(".safetensors") or f["size"] > self.hub.regular_max_bytes or b"\0" in sample
            answers.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        self._send_json({"files": answers})

    def _lfs_batch(self) -> None:
        payload = json.loads(self._body)
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size}
            if oid not in self.hub._blobs:  # already stored: no actions, the client skips the upload
                entry["actions"] = {"upload": {"href": f"{self.hub.endpoint}/lfs-upload/{oid}"}}
            objects.append(entry)
        self._send_simple(
            200, json.dumps({"objects": objects, "transfer": "basic"}).encode(), "application/vnd.git-lfs+json"
        )

    def _lfs_put(self, oid: str) -> None:
        if hashlib.sha256(self._body).hexdigest() != oid:
            self._error(400, None, "LFS object does not match its oid")
        with self.hub._lock:
            self.hub._blobs[oid] = self._body
        self._send_simple(200, b"")

    def _dataset_commit(self, repo: _Repo, revision: str) -> None:
        """Apply an NDJSON commit (header, file, lfsFile, deletedFile lines) on top of ``revision``."""
        parent, files = self._commit(repo, revision)
        files = dict(files)
        summary, touched = "", []
        for line in self._body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            touched += [] if key == "header" else [value["path"]]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                blob = self.hub._blobs.get(value["oid"])
                if blob is None:
                    self._error(400, None, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                assert blob is not None
                files[value["path"]] = blob
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                self._error(400, None, f"Unsupported commit operation {key!r}")
        digest = hashlib.sha1(parent.encode() + summary.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        sha = digest.hexdigest()
        where = "datasets/" if self.hub._datasets.get(repo.repo_id) is repo else ""
        with self.hub._lock:
            repo.commits[sha] = files
            repo.revisions[revision] = sha
            if where:
                self.hub.dataset_commits.append((repo.repo_id, sha, tuple(touched)))
        url = f"{self.hub.endpoint}/{where}{repo.repo_id}/commit/{sha}"
        self._send_json({"commitUrl": url, "commitOid": sha, "success": True})


def _git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
