"""Joining Ray: a private local instance, or a cluster, with one clear line when that fails.

A cluster started with token authentication (``RAY_AUTH_MODE=token``; Ray 2.59+ turns it on
by itself for ``ray start --head`` on a machine that has ``~/.ray/auth_token``) refuses every
client without the token, and Ray's own ``ray.init`` then retries blind for about 20 s
before a ``ConnectionError`` that reads like "no cluster". So before ``ray.init`` the driver
opens one Ray GCS client to the cluster (``ray._raylet.GcsClient``: the token settings
``ray.init`` would use, one request for the cluster ID), which raises Ray's
``AuthenticationError`` at once, and turns that into a ``RayClusterError`` that says what to set. ``--ray auto``
is probed at the address Ray would join: ``RAY_ADDRESS``, else the cluster ``ray start``
runs on this machine.

``node_label`` names a node in the batch's table and its per-node summary.

Limits: the probe uses Ray internals (``ray._raylet.GcsClient``, the token setup of
``ray._private.authentication``; checked against Ray 2.60); where a Ray version lacks them
the probe is skipped and Ray's own error is translated instead. ``ray://`` (Ray client)
addresses are not probed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

from lorafid.errors import MissingExtraError, RayClusterError

AUTH_HELP = (
    "export RAY_AUTH_MODE=token and give this machine the cluster's token (RAY_AUTH_TOKEN, or the "
    "file ~/.ray/auth_token; `ray get-auth-token` on the head prints it), as on every node of the cluster"
)


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise MissingExtraError("lorafid batch runs on Ray, which is not installed: pip install lorafid[batch]") from e
    return ray


def connect(address: str | None = "local", *, num_cpus: int | None = None) -> None:
    """Start or join Ray unless this process is connected already.

    ``"local"`` / None: a private Ray instance on this machine (``num_cpus``: its size, default
    all cores). ``"auto"``: the cluster that ``ray start`` runs on this machine, or
    ``RAY_ADDRESS``. Anything else: a cluster address (``host:6379`` or ``ray://host:10001``).

    Raises:
        RayClusterError: nobody answers at the address, the cluster refuses our token (or our
            lack of one), or Ray cannot connect for another reason.
    """
    ray = import_ray()
    if ray.is_initialized():
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address in (None, "local"):
        # Reports and spectra are small (a 70B pair: ~40 MB): a small object store is plenty.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, object_store_memory=512 * 2**20, **quiet)
        return
    target = cluster_address(address)
    if target is not None:
        check_reachable(target)
        if "://" not in target:  # Ray Client addresses go through its own server, not the GCS
            _probe_authentication(ray, address, target)
    try:
        ray.init(address=address, **quiet)
    except ray.exceptions.AuthenticationError as e:
        raise RayClusterError(_refused(target or address, _token_mode())) from e
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayClusterError(
            f"Could not join the Ray cluster at {target or address!r} ({e}). Check that `ray status` works on its "
            "head node and pass the address `ray start --head` printed, or use --ray local."
        ) from e


def cluster_address(address: str) -> str | None:
    """The host:port (or ray:// URL) that ``ray.init(address)`` would join; None when unknown.

    Example: "auto" with RAY_ADDRESS=10.0.0.5:6379 -> "10.0.0.5:6379"; "10.0.0.5:6379" -> itself.
    """
    if address != "auto":
        return address
    from_env = os.environ.get("RAY_ADDRESS", "").strip()
    if from_env:
        return from_env
    try:  # the cluster `ray start` recorded on this machine (Ray's own lookup)
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address("auto")
    except Exception:  # no cluster recorded, or another Ray: Ray says so itself
        return None
    return str(found) if found else None


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a cluster address nobody answers at: Ray itself would retry for a while.

    Example: "10.0.0.5:6379" and "ray://10.0.0.5:10001" are probed; "auto" is left to Ray.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayClusterError(
            f"Nothing answers at {host}:{port} ({e.strerror or e}). Start a cluster with `ray start --head` and "
            "pass the address it prints, or use --ray local."
        ) from e


def _probe_authentication(ray: Any, address: str, target: str) -> None:
    """Open a GCS client to ``target`` as ``ray.init(address)`` would; refuse when the cluster refuses us.

    Ray's ``GcsClient`` asks the GCS for its cluster ID once and raises ``AuthenticationError``
    at once on a token refusal (``ray.init`` instead retries that call for ~20 s).
    """
    try:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]
    except ImportError:
        return  # another Ray: its own error is translated after ray.init
    if address == "auto" and not os.environ.get("RAY_ADDRESS"):
        # ray.init("auto") turns token mode on when this machine has a token; the probe must match.
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        except ImportError:
            pass
    try:
        with _native_stderr_muted():  # Ray's C++ client logs the refusal too: one line is ours to write
            GcsClient(address=target)
    except ray.exceptions.AuthenticationError:
        raise RayClusterError(_refused(target, _token_mode())) from None
    except Exception:  # anything else (a port that is not a GCS): ray.init's own error says more
        return


@contextlib.contextmanager
def _native_stderr_muted() -> Iterator[None]:
    """File descriptor 2 to /dev/null for a moment (native code writes there, not to sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _token_mode() -> bool:
    """True when this process would send Ray a token (RAY_AUTH_MODE=token, as Ray reads it)."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        return bool(is_token_auth_enabled())
    except ImportError:
        return os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token"


def _refused(target: str, sent_token: bool) -> str:
    if sent_token:
        return (
            f"The Ray cluster at {target} refused this machine's token: give it the token the cluster was started "
            "with (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; `ray get-auth-token` on the head "
            "prints it), then run again."
        )
    return (
        f"The Ray cluster at {target} uses token authentication and RAY_AUTH_MODE is not 'token' here: "
        f"{AUTH_HELP}, then run again."
    )


def node_label(node: dict[str, Any]) -> str:
    """How the table names a node: its address and the start of its ID ("10.0.0.5 [1a2b3c4d]").

    ``node``: one entry of ``ray.nodes()``. The ID tells apart nodes that share an address.
    """
    return f"{node.get('NodeManagerAddress', '?')} [{str(node.get('NodeID', ''))[:8]}]"
