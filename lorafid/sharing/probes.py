"""What is published of a provider check (``PROBE_SCHEMA``): a summary of a ``lorafid.probe/1``
document with the endpoint's host only (never a key, a URL path or a query), the model name
at the endpoint, both repos at their commits, the channel, the requests it took, the verdict
and each candidate's distance; and where it lives in the dataset. Pure: no network.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from lorafid.errors import RegistryError
from lorafid.names import is_commit_sha, is_repo_id

PROBE_SCHEMA = "lorafid.registry.probe/1"
"""Schema of a published provider check: the summary of a ``lorafid.probe/1`` document.

It carries the endpoint's host only (never a key, a URL path or a query), the model name at
the endpoint, both repos at their commits, the verdict and each candidate's distance::

    probes/<base repo>/<fine-tune repo>/<base SHA>-<fine-tune SHA>-<content hash>.json
"""
_HOST_RE = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")


def probe_summary(document: Mapping[str, Any]) -> dict[str, Any]:
    """What is published of a provider check (``PROBE_SCHEMA``): chosen fields, nothing else.

    Raises ``RegistryError`` when the document lacks what a published check needs.
    """
    base, finetune = document.get("base") or {}, document.get("finetune") or {}
    verdict = document.get("verdict") or {}
    candidates = document.get("candidates") or {}
    try:
        summary: dict[str, Any] = {
            "schema": PROBE_SCHEMA,
            "probe_schema": str(document["schema"]),
            "tool_version": str(document["tool_version"]),
            "endpoint_host": str(document["endpoint_host"]),
            "model": str(document["model"])[:200],
            "method": str(document.get("method") or ""),
            "base": str(base.get("repo_id") or ""),
            "finetune": str(finetune.get("repo_id") or ""),
            "base_sha": str(base.get("sha") or ""),
            "finetune_sha": str(finetune.get("sha") or ""),
            "verdict": {
                "sentence": str(verdict["sentence"]),
                "closest": str(verdict["closest"]),
                "matches": bool(verdict["matches"]),
                "consistent": [str(c) for c in verdict.get("consistent") or ()],
            },
            # A log-probability check's KL distance, or a text check's log-likelihood gap to the
            # closest candidate (which of the two: "method"); lower is closer either way.
            "distances": {
                str(name): {
                    "distance": float(c["distance"] if "distance" in c else c["gap"]),
                    "interval": [float(x) for x in c["interval"]],
                }
                for name, c in candidates.items()
            },
            "prompts": int((document.get("prompt_set") or {}).get("count") or 0),
            # What the check cost at the provider: requests actually sent (a free tier counts them).
            "requests": int((document.get("requests") or {}).get("sent") or 0),
        }
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RegistryError(f"This provider check cannot be published: it lacks {e}.") from e
    if not probe_well_formed(summary | {"created": ""}):
        raise RegistryError("This provider check cannot be published: it is not of two Hub repos pinned to commits.")
    return summary


def probe_path(summary: Mapping[str, Any]) -> str:
    """Where a provider check lives in the registry: named by both commits and its content."""
    content = {k: v for k, v in summary.items() if k != "created"}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{summary['base_sha']}-{summary['finetune_sha']}-{digest}"
    return f"probes/{summary['base']}/{summary['finetune']}/{name}.json"


def probe_well_formed(data: Mapping[str, Any]) -> bool:
    verdict = data.get("verdict")
    return (
        data.get("schema") == PROBE_SCHEMA
        and isinstance(data.get("endpoint_host"), str)
        and bool(_HOST_RE.match(data["endpoint_host"]))
        and isinstance(data.get("model"), str)
        and isinstance(data.get("created"), str)
        and all(isinstance(data.get(k), str) and is_repo_id(data[k]) for k in ("base", "finetune"))
        and all(isinstance(data.get(k), str) and is_commit_sha(data[k]) for k in ("base_sha", "finetune_sha"))
        and isinstance(verdict, dict)
        and isinstance(verdict.get("sentence"), str)
        and isinstance(verdict.get("matches"), bool)
    )
