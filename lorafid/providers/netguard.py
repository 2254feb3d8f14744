"""Which URLs a server may call on a visitor's behalf: the SSRF rules of a public deployment.

A public dashboard that calls an endpoint typed by a visitor must not become a way into the
machine's own network. Under the public rules (``NetPolicy.public()``) an outbound request
goes only to ``https`` URLs whose host resolves to public addresses: no loopback, private,
link-local (the cloud metadata service 169.254.169.254 is one), carrier-grade NAT, multicast,
reserved or unspecified address, and none behind an IPv6 mapping of such an address. The
check runs after DNS and again when each connection is opened, with the address it connects
to (``GuardedTransport``), so a name that resolves to a public address for the check and a
private one for the connection (DNS rebinding) is refused too. Redirects are checked hop by
hop by the caller (``lorafid.providers.openai_api``) with ``NetPolicy.check_url``. Proxies from the
environment are ignored under these rules: a proxy would make the connect-time check moot.

``NetPolicy.open()`` is for the command line and private deployments: any scheme, any host.

Also here: ``VisitorBudget``, the per-visitor request allowance of a public deployment.

Not here: HTTP itself, retries, anything about the OpenAI API.

Example::

    policy = NetPolicy.public(resolver=lambda host, port: ["10.0.0.7"])
    policy.check_url("https://api.example.com/v1")   # raises UnsafeEndpointError (private)
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpcore2
import httpx2

from lorafid.errors import LimitExceededError, UnsafeEndpointError

Resolver = Callable[[str, int], list[str]]
"""host, port -> the IP addresses it resolves to (as strings)."""

# Ranges that ``ipaddress``'s ``is_global`` already excludes are not repeated; these are
# global by that definition yet still reach a provider's or cloud's own infrastructure.
_EXTRA_BLOCKED = (
    ipaddress.ip_network("100.64.0.0/10"),  # carrier-grade NAT (is_global is False, kept for clarity)
    ipaddress.ip_network("fd00:ec2::/32"),  # AWS's IPv6 metadata service (unique-local anyway)
    ipaddress.ip_network("64:ff9b::/96"),  # NAT64: embeds an IPv4 address checked separately
)


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``getaddrinfo`` gives for host:port (IPv4 and IPv6), in its order."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UnsafeEndpointError(f"Cannot resolve {host}: {e.strerror}. Check the endpoint's host name.") from e
    return [str(info[4][0]) for info in infos]


def is_public_address(address: str) -> bool:
    """True for an address a public server may call: globally routable unicast.

    Examples: "8.8.8.8" -> True; "127.0.0.1", "10.1.2.3", "169.254.169.254", "::1",
    "::ffff:10.0.0.1" (IPv4-mapped private), "fe80::1" -> False.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not is_public_address(str(embedded)):
            return False
        if ip in _EXTRA_BLOCKED[2]:
            return is_public_address(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    if any(ip in net for net in _EXTRA_BLOCKED if net.version == ip.version):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_link_local)


@dataclass(frozen=True)
class NetPolicy:
    """Where outbound requests may go. Build with ``public()`` or ``open()``."""

    restricted: bool  # True: https only, public addresses only, no proxies
    resolver: Resolver = field(default=system_resolver, compare=False)

    @classmethod
    def public(cls, resolver: Resolver | None = None) -> NetPolicy:
        """The rules of a public deployment; ``resolver`` replaces DNS (tests)."""
        return cls(restricted=True, resolver=resolver or system_resolver)

    @classmethod
    def open(cls) -> NetPolicy:
        """No restriction: the command line, or a deployment its operator declared private."""
        return cls(restricted=False)

    def check_url(self, url: str) -> None:
        """Raise ``UnsafeEndpointError`` unless ``url`` may be called under this policy.

        Resolves the host (under the public rules) and refuses it if any of its addresses
        is not public: a name with one public and one private address could connect to either.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UnsafeEndpointError(f"{_shown(url)} is not an http(s) URL; give e.g. https://api.example.com/v1.")
        if not self.restricted:
            return
        if parts.scheme != "https":
            raise UnsafeEndpointError(
                f"{_shown(url)}: this server only calls https endpoints; use https://, or run the probe "
                "from the command line (lorafid probe) for other endpoints."
            )
        if parts.username or parts.password:
            raise UnsafeEndpointError("Endpoints with a user name or password in the URL are refused; pass the key.")
        self.check_host(parts.hostname, parts.port or 443)

    def check_host(self, host: str, port: int) -> list[str]:
        """The host's addresses, all checked public (under the public rules); else an error."""
        if not self.restricted:
            return self.resolver(host, port)
        addresses = [host] if _is_ip_literal(host) else self.resolver(host, port)
        if not addresses:
            raise UnsafeEndpointError(f"{host} resolves to no address.")
        refused = [a for a in addresses if not is_public_address(a)]
        if refused:
            raise UnsafeEndpointError(
                f"{host} resolves to {refused[0]}, which is not a public address: this server does not call "
                "loopback, private, link-local or metadata addresses. Run lorafid probe from the command line "
                "for endpoints on your own network."
            )
        return addresses


class _GuardedBackend(httpcore2.NetworkBackend):
    """Opens each TCP connection to an address the policy has just checked, never to the raw name."""

    def __init__(self, policy: NetPolicy) -> None:
        self._policy = policy
        self._inner = httpcore2.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.NetworkStream:
        addresses = self._policy.check_host(host, port)
        # TLS still verifies the certificate for `host`: httpcore starts TLS with the
        # request's own host name after this connection is made.
        return self._inner.connect_tcp(addresses[0], port, timeout, local_address, socket_options)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class GuardedTransport(httpx2.HTTPTransport):
    """An ``httpx2`` transport whose connections go only where ``policy`` allows (no proxy)."""

    def __init__(self, policy: NetPolicy, *, max_connections: int = 8) -> None:
        super().__init__(trust_env=False)
        # Replaces the pool HTTPTransport built: the same settings plus the checking backend.
        self._pool = httpcore2.ConnectionPool(
            ssl_context=httpx2.create_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=5.0,
            network_backend=_GuardedBackend(policy),
        )


@dataclass(frozen=True)
class ProbeServerSettings:
    """How a dashboard deployment lets visitors probe endpoints (read from the environment).

    ``LORAFID_PROBE_ANY_ENDPOINT=1``: a private deployment; the public rules are off (any
    scheme, any address, the environment's proxies). ``LORAFID_PROBE_REQUESTS_PER_HOUR``:
    requests one visitor may make the server send in an hour (default 300: ten default probes).
    ``LORAFID_PROBE_SERVER_REQUESTS_PER_HOUR``: requests the whole server sends in an hour,
    all visitors together (default 3,000: ten visitors at their full allowance), so many
    addresses cannot make it a firehose at one provider.
    """

    any_endpoint: bool = False
    requests_per_hour: int = 300
    server_requests_per_hour: int = 3_000

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProbeServerSettings:
        any_endpoint = env.get("LORAFID_PROBE_ANY_ENDPOINT", "").strip().lower() in ("1", "true", "yes", "on")
        return cls(
            any_endpoint=any_endpoint,
            requests_per_hour=_whole(env, "LORAFID_PROBE_REQUESTS_PER_HOUR", cls.requests_per_hour, "300"),
            server_requests_per_hour=_whole(
                env, "LORAFID_PROBE_SERVER_REQUESTS_PER_HOUR", cls.server_requests_per_hour, "3000"
            ),
        )

    def policy(self) -> NetPolicy:
        return NetPolicy.open() if self.any_endpoint else NetPolicy.public()

    def budget(self) -> VisitorBudget:
        """The per-visitor and server-wide request allowance these settings give."""
        return VisitorBudget(self.requests_per_hour, server_max_requests=self.server_requests_per_hour)


def _whole(env: Mapping[str, str], name: str, default: int, example: str) -> int:
    raw = env.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = 0
    if value < 1:
        raise LimitExceededError(f"{name}={raw!r} is not a positive whole number; set it to e.g. {example}.")
    return value


class VisitorBudget:
    """At most ``max_requests`` outbound requests per visitor, and ``server_max_requests`` for
    all visitors together, in any ``window_s`` (thread-safe).

    Example: VisitorBudget(100, 3600).take("visitor-a", 40) twice leaves 20 for that visitor
    this hour; a third take of 40 raises ``LimitExceededError`` and takes nothing.
    ``give_back`` returns what a reservation did not need (a check reserves its most before
    it knows its plan).
    """

    def __init__(
        self,
        max_requests: int,
        window_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        server_max_requests: int | None = None,
    ):
        self.max_requests, self.window_s, self._clock = max_requests, window_s, clock
        self.server_max_requests = server_max_requests
        self._spent: dict[str, list[list[float]]] = {}  # visitor -> [time, requests] reservations
        self._lock = threading.Lock()

    def take(self, visitor: str, requests: int) -> None:
        """Reserve ``requests`` for ``visitor`` or raise without reserving anything."""
        now = self._clock()
        with self._lock:
            for who in list(self._spent):  # forget what left the window (every visitor: the total counts them)
                self._spent[who] = [r for r in self._spent[who] if now - r[0] < self.window_s]
                if not self._spent[who]:
                    del self._spent[who]
            used = sum(n for _, n in self._spent.get(visitor, []))
            if used + requests > self.max_requests:
                raise LimitExceededError(
                    f"This probe needs up to {requests} requests and you have {self.max_requests - used:g} of "
                    f"{self.max_requests} left this hour on this server; use fewer prompts, wait, or run "
                    "lorafid probe from the command line."
                )
            total = sum(n for reservations in self._spent.values() for _, n in reservations)
            if self.server_max_requests is not None and total + requests > self.server_max_requests:
                raise LimitExceededError(
                    f"This server has sent its {self.server_max_requests} provider requests for this hour (all "
                    "visitors together); try again later, or run lorafid probe from the command line."
                )
            self._spent.setdefault(visitor, []).append([now, requests])

    def give_back(self, visitor: str, requests: int) -> None:
        """Return ``requests`` of the visitor's latest reservation (never more than it holds)."""
        with self._lock:
            reservations = self._spent.get(visitor, [])
            if reservations:
                reservations[-1][1] = max(0, reservations[-1][1] - requests)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


def _shown(url: str) -> str:
    """The URL without query or user info, for messages (they may carry secrets)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else repr(url[:60])
