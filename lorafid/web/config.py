"""How one deployment of the dashboard behaves: ``AppConfig``, read from the environment.

Also the rank bounds every tab shares (``DEFAULT_RANK``, ``MAX_RANK``) and where the bundled
examples live (``EXAMPLES_DIR``). Settings only: nothing here opens a file, the network or
Gradio; a bad setting is a ``LorafidError`` naming the variable, raised by ``from_env``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lorafid.audit.engine import AuditConfig
from lorafid.audit.store import Store
from lorafid.behaviour.direction_cache import CAP_ENVIRONMENT, DEFAULT_CAP_GB, DirectionCache, cap_gigabytes
from lorafid.compute import ComputeHook
from lorafid.errors import LorafidError

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"
MAX_RANK = 4096  # slider range; any rank is exact, this only bounds the widget
DEFAULT_RANK = 64
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class AppConfig:
    """How this deployment of the dashboard behaves. Defaults are those of a public Space."""

    allow_local: bool = False  # read server paths: only for a private deployment
    endpoint: str | None = None  # Hub URL; None = HF_ENDPOINT or huggingface.co
    max_model_bytes: int | None = None  # refuse audits reading more than this
    # One tensor pair costs ~7x its storage size in memory (float32 copies, Δ, Gram matrix):
    # 0.5 GB fits a 70B model's largest matrix (28672 x 8192 in bf16 = 0.47 GB).
    max_tensor_bytes: int | None = 500_000_000
    max_tensors: int | None = 200_000  # per model; the largest MoE checkpoints list ~100k
    max_audit_minutes: float | None = 60.0  # an audit stops (keeping its results) after this
    max_audits_per_visitor: int = 1  # audits one visitor (address) may run at once
    concurrency: int = 1  # audits running at once
    max_queue: int = 16  # audits waiting; more are refused
    oauth: bool = False  # render "Sign in with Hugging Face" (needs a Space with hf_oauth)
    server_token: bool = False  # let audits fall back to the server's own HF login
    device: str = "auto"
    examples_dir: Path = EXAMPLES_DIR
    store_home: Path | None = field(default=None)  # None = LORAFID_HOME / user cache
    # Disk kept for the checks' directions of Δ between runs, under store_home (0: none).
    direction_cache_gb: float = DEFAULT_CAP_GB

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, allow_local: bool = False) -> AppConfig:
        """Read ``LORAFID_ALLOW_LOCAL``, ``LORAFID_CONCURRENCY``, ``LORAFID_MAX_QUEUE``,
        ``LORAFID_MAX_MODEL_GB``, ``LORAFID_MAX_TENSOR_GB``, ``LORAFID_MAX_TENSORS``,
        ``LORAFID_MAX_AUDIT_MINUTES``, ``LORAFID_MAX_AUDITS_PER_VISITOR``,
        ``LORAFID_USE_SERVER_TOKEN``, ``LORAFID_DEVICE``, ``LORAFID_DIRECTION_CACHE_GB`` and ``OAUTH_CLIENT_ID`` (set on
        Spaces with ``hf_oauth: true``).

        Example: {"LORAFID_MAX_MODEL_GB": "40"} -> max_model_bytes=40_000_000_000.
        """
        env = os.environ if env is None else env
        max_gb = _positive_setting(env, "LORAFID_MAX_MODEL_GB", float)
        tensor_gb = _positive_setting(env, "LORAFID_MAX_TENSOR_GB", float)
        defaults = cls()
        return cls(
            allow_local=allow_local or env.get("LORAFID_ALLOW_LOCAL", "").lower() in _TRUE,
            max_model_bytes=int(max_gb * 1e9) if max_gb else None,
            max_tensor_bytes=int(tensor_gb * 1e9) if tensor_gb else defaults.max_tensor_bytes,
            max_tensors=int(_positive_setting(env, "LORAFID_MAX_TENSORS", int) or defaults.max_tensors or 0) or None,
            max_audit_minutes=_positive_setting(env, "LORAFID_MAX_AUDIT_MINUTES", float) or defaults.max_audit_minutes,
            max_audits_per_visitor=int(_positive_setting(env, "LORAFID_MAX_AUDITS_PER_VISITOR", int) or 1),
            concurrency=int(_positive_setting(env, "LORAFID_CONCURRENCY", int) or 1),
            max_queue=int(_positive_setting(env, "LORAFID_MAX_QUEUE", int) or 16),
            oauth=bool(env.get("OAUTH_CLIENT_ID")),
            server_token=env.get("LORAFID_USE_SERVER_TOKEN", "").lower() in _TRUE,
            device=env.get("LORAFID_DEVICE") or "auto",
            direction_cache_gb=cap_gigabytes(env.get(CAP_ENVIRONMENT)),
        )

    def direction_cache(self) -> DirectionCache | None:
        """Where the behaviour and provider checks keep directions of Δ between runs (None: off)."""
        return DirectionCache.under(self.store_home, self.direction_cache_gb)


def _positive_setting(env: Mapping[str, str], name: str, kind: type[int] | type[float]) -> float | None:
    """A positive number from the environment, None when unset; a clear error when not a number."""
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if not value > 0:
        example = "40" if kind is float else "2"
        raise LorafidError(f"{name}={text!r} is not a positive {kind.__name__}; unset it or set e.g. {name}={example}.")
    return value


def check_token(signed_in: str | None, *, private: bool) -> str | bool | None:
    """The Hub token a behaviour or provider check runs with: the visitor's own sign-in; else,
    on a private deployment only, the server's own login (None: huggingface_hub's lookup);
    else none at all (False). Never the server's login for an anonymous visitor of a public
    server, even with ``LORAFID_USE_SERVER_TOKEN=1``: a check's stored document has no
    weights to re-check against, and its repos would be read with the server's rights."""
    if signed_in:
        return signed_in
    return None if private else False


def check_deadline(app: AppConfig) -> float | None:
    """``time.monotonic()`` at which a check started now passes ``LORAFID_MAX_AUDIT_MINUTES``."""
    return time.monotonic() + app.max_audit_minutes * 60 if app.max_audit_minutes else None


def audit_config(
    app: AppConfig,
    *,
    rank: int,
    base_revision: str,
    finetune_revision: str,
    token: str | bool | None,
    store: Store,
    compute: ComputeHook | None,
) -> AuditConfig:
    """The one way the dashboard configures an audit (the weight audit and the adapter audit):
    this deployment's limits, the app's own store, and its compute hook (ZeroGPU)."""
    return AuditConfig(
        rank=int(rank),
        device=app.device,
        base_revision=base_revision.strip() or None,
        finetune_revision=finetune_revision.strip() or None,
        token=token,
        endpoint=app.endpoint,
        allow_local=app.allow_local,
        max_model_bytes=app.max_model_bytes,
        max_tensor_bytes=app.max_tensor_bytes,
        max_tensors=app.max_tensors,
        store=store,
        compute=compute,
    )
