"""Each matrix's top singular directions kept on disk, so that a pair is decomposed once, not once per check.

The behaviour check and the provider check serve every rank-r variant from the top directions
of Δ = W_ft − W_base (``spectrum.decompose``). Finding them is a fixed cost per matrix, O(k³)
whatever the number of tokens scored: on one CPU thread about 0.2 s a matrix at hidden 1024 (as
much as 0.8× the forwards of a short check: BENCHMARKS.md, section 6e) and 9 s at 4096, roughly
half an hour for the 224 matrices of an 8B model. Users run many checks of one pair (a provider check per
provider, a behaviour check after it, the same provider on another day), so the directions
are kept here between runs and every later check of the pair skips its decompositions.

The key is a SHA-256 of both tensors' bytes as read (dtype, shape and data): it is exact for
local files and Hub repos alike and needs no revision or file stamp. An entry is one
safetensors file (float32 directions, k × rank; no pickle) and serves any rank up to its own.
Entries are checked when read (shape, finiteness, orthonormal columns); one that fails is
deleted and decomposed again. The directory is capped in bytes (least recently used entries go
first), writes are atomic (a temporary file renamed), and a failed write only loses the entry:
the cache never stops a check.

Not here: the decomposition itself (``spectrum``), when it is asked for (``variants``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorafid.audit.store import default_home
from lorafid.errors import LorafidError

log = logging.getLogger(__name__)

FORMAT = "lorafid-directions-1"
"""Written into every entry and into its key: a change of layout starts a new set of entries."""

DEFAULT_CAP_GB = 4.0
CAP_ENVIRONMENT = "LORAFID_DIRECTION_CACHE_GB"
"""The cache's size in GB (default 4; 0 turns it off). It lives under ``$LORAFID_HOME/directions``."""

# Columns of a kept entry must be orthonormal to this (float32 eigenvectors refined in float64
# are orthonormal to ~1e-6); a larger defect means a damaged file.
_ORTHONORMAL_TOLERANCE = 1e-4
_SUFFIX = ".safetensors"


def cap_gigabytes(text: str | None) -> float:
    """The cache's size from the text of ``LORAFID_DIRECTION_CACHE_GB``: ``DEFAULT_CAP_GB`` when
    unset or blank, 0 (off) when 0; a clear error for anything but a number ≥ 0."""
    text = (text or "").strip()
    if not text:
        return DEFAULT_CAP_GB
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and value != float("inf")):
        raise LorafidError(
            f"{CAP_ENVIRONMENT}={text!r} is not a size: give the cache's size in GB (e.g. 4), or 0 to turn it off."
        )
    return value


@dataclass(frozen=True)
class CachedDirections:
    """The top directions of one Δ as ``spectrum.Decomposition`` holds them, found before: by an
    earlier pass over the same weights (``VariantWeights.kept``) or an earlier run (this cache)."""

    vectors: torch.Tensor  # float32, k × rank, columns by decreasing σ; rank 0 means Δ = 0
    side: str  # "right" (V, n × r) or "left" (U, m × r)
    solver: str  # how they were found: "float32-refined" or "float64"


@dataclass
class DirectionCache:
    """A directory of kept directions, at most ``cap_bytes`` on disk.

    Example::

        cache = DirectionCache.from_environment()          # None where LORAFID_DIRECTION_CACHE_GB=0
        key = cache.key(base_tensor, finetune_tensor)
        found = cache.load(key, rank=64, rows=1024, side="right")   # None: decompose, then cache.store(...)
    """

    directory: Path
    cap_bytes: int = int(DEFAULT_CAP_GB * 1e9)

    @classmethod
    def under(cls, home: Path | None, gigabytes: float) -> DirectionCache | None:
        """The cache under ``home`` (default ``$LORAFID_HOME``) capped at ``gigabytes``; None if 0."""
        if not gigabytes > 0:
            return None
        return cls((home or default_home()) / "directions", int(gigabytes * 1e9))

    @classmethod
    def from_environment(cls, home: Path | None = None) -> DirectionCache | None:
        """The cache ``LORAFID_DIRECTION_CACHE_GB`` asks for (``cap_gigabytes``)."""
        return cls.under(home, cap_gigabytes(os.environ.get(CAP_ENVIRONMENT)))

    @staticmethod
    def key(base: torch.Tensor, finetune: torch.Tensor) -> str:
        """SHA-256 of both tensors as read: dtype, shape and bytes (about 2 GB/s on one core)."""
        digest = hashlib.sha256(FORMAT.encode())
        for tensor in (base, finetune):
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"|{flat.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(flat.view(torch.uint8).numpy().data)
        return digest.hexdigest()

    def load(self, key: str, rank: int, rows: int, side: str) -> CachedDirections | None:
        """The entry for ``key`` if it holds at least ``rank`` directions of length ``rows`` on ``side``.

        A damaged entry is deleted (and logged); None then, as for a missing one.
        """
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            found = self._read(path)
        except FileNotFoundError:
            return None  # evicted meanwhile by another check
        except (OSError, SafetensorError, ValueError) as error:
            log.warning("Direction cache: %s is damaged (%s); it is deleted and decomposed again.", path.name, error)
            path.unlink(missing_ok=True)
            return None
        if found.side != side or found.vectors.shape[0] != rows:
            return None  # another pair with the same hash: not possible short of a SHA-256 collision
        if found.vectors.shape[1] < rank and found.vectors.shape[1] != 0:
            return None  # too few directions kept: decomposed again, and stored with more
        self._touch(path)
        return found

    def store(self, key: str, directions: CachedDirections) -> None:
        """Keep ``directions`` under ``key``; then drop the least recently used entries above the cap.

        An entry larger than the whole cap is not written. Errors (a full or read-only disk) are
        logged and otherwise ignored.
        """
        vectors = directions.vectors.detach().to("cpu", torch.float32).contiguous()
        if vectors.numel() * 4 > self.cap_bytes:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".writing-", suffix=_SUFFIX)
            os.close(handle)
            try:
                metadata = {"format": FORMAT, "side": directions.side, "solver": directions.solver}
                save_file({"vectors": vectors}, temporary, metadata=metadata)
                os.replace(temporary, self._path(key))
            finally:
                Path(temporary).unlink(missing_ok=True)
            self._evict()
        except OSError as error:
            log.warning("Direction cache: could not keep an entry in %s (%s).", self.directory, error)

    def warn_if_too_small(self, needed: int) -> bool:
        """Log (and return True) when a pair's directions, ``needed`` bytes, cannot all stay here:
        its entries would push each other out, and a later check would decompose again."""
        if needed <= self.cap_bytes:
            return False
        log.warning(
            "The directions of this pair take %.1f GB, more than the direction cache's %.1f GB: a later check "
            "will decompose again. Set %s=%d or more to keep them.",
            needed / 1e9,
            self.cap_bytes / 1e9,
            CAP_ENVIRONMENT,
            math.ceil(needed / 1e9),
        )
        return True

    def size_bytes(self) -> int:
        """Bytes of all entries now on disk."""
        return sum(size for _, size, _ in self._entries())

    def _path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a direction cache key: {key!r}")
        return self.directory / f"{key}{_SUFFIX}"

    @staticmethod
    def _read(path: Path) -> CachedDirections:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT or metadata.get("side") not in ("left", "right"):
            raise ValueError(f"not a {FORMAT} entry")
        vectors = load_file(str(path))["vectors"]
        if vectors.dtype != torch.float32 or vectors.ndim != 2:
            raise ValueError(f"directions of dtype {vectors.dtype} and shape {tuple(vectors.shape)}")
        if not bool(torch.isfinite(vectors).all()):
            raise ValueError("NaN or Inf in the directions")
        gram = vectors.T.double() @ vectors.double()
        defect = float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max()) if gram.numel() else 0.0
        if defect > _ORTHONORMAL_TOLERANCE:
            raise ValueError(f"columns not orthonormal (defect {defect:.1e})")
        return CachedDirections(vectors, metadata["side"], metadata.get("solver", "float64"))

    @staticmethod
    def _touch(path: Path) -> None:
        with contextlib.suppress(OSError):  # deleted meanwhile: nothing to keep fresh
            os.utime(path)  # the modification time orders eviction: read entries are kept longest

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(last used, bytes, path) of every entry, oldest first."""
        out = []
        try:
            with os.scandir(self.directory) as listing:
                for entry in listing:
                    if entry.name.endswith(_SUFFIX) and not entry.name.startswith("."):
                        try:
                            stat = entry.stat()
                        except OSError:
                            continue  # deleted meanwhile by another process
                        out.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        except FileNotFoundError:
            return []
        return sorted(out, key=lambda entry: entry[0])

    def _evict(self) -> None:
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.cap_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
