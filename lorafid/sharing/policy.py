"""What may be published: only complete results of two Hub repos that are public (an audit:
public when audited, as the app recorded it, or now, asked with calls that send no token; a
provider check: public now, and a model name of one plain line: ``MODEL_NAME``). Each rule
returns the reason in words, or None.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.errors import (
    GatedRepoError,
    RepositoryNotFoundError,
)

from lorafid.audit.report import Report
from lorafid.errors import RegistryError
from lorafid.sharing.hub_errors import NETWORK_ERRORS, reason
from lorafid.sharing.probes import probe_summary


def publish_refusal(
    report: Report, *, visibility: tuple[bool, bool] | None = None, endpoint: str | None = None
) -> str | None:
    """Why this audit may not be published, or None when it may.

    Only complete audits of two Hub repos that were public when audited are published.
    ``visibility``: (base public, fine-tune public) as the app recorded it while auditing;
    without it (the CLI), each repo is checked now with a metadata call that sends no token.

    Example: a fine-tune that is gated -> "org/tuned is gated: only audits of two public
    repos are published."
    """
    if report.status != "complete" or report.pending:
        return "only complete audits are published."
    if not report.matrices:
        return "this audit has no result to publish."
    if report.base.kind != "hub" or report.finetune.kind != "hub":
        return "audits of local files are never published."
    if not (report.base.resolved_sha and report.finetune.resolved_sha):
        return "the audit is not pinned to commits."
    if visibility is not None:
        for record, public in zip((report.base, report.finetune), visibility, strict=True):
            if not public:
                return f"{record.repo_id} was not public when audited: only audits of two public repos are published."
        return None
    repos = [(str(r.repo_id), str(r.resolved_sha)) for r in (report.base, report.finetune)]
    return not_public(repos, endpoint, "audits")


def probe_refusal(document: Mapping[str, Any], *, endpoint: str | None = None) -> str | None:
    """Why this provider check may not be published, or None: only complete checks with a
    verdict, of two Hub repos that are public now (checked with calls that send no token)."""
    if document.get("status") != "complete" or not document.get("verdict"):
        return "only complete provider checks with a verdict are published."
    refused = model_name_refusal(document.get("model"))
    if refused:
        return refused
    try:
        summary = probe_summary(document)
    except RegistryError as e:
        return str(e).removeprefix("This provider check cannot be published: ")
    return not_public(
        [(summary["base"], summary["base_sha"]), (summary["finetune"], summary["finetune_sha"])], endpoint, "checks"
    )


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,127}")
"""A model name that may be published under the server's token: one line, at most 128 characters
of letters, digits and ``. _ : / @ + = -``, starting with a letter or digit ("org/Model-7B",
"accounts/x/models/y", "llama3:8b", "anthropic.model-v2:1"). A visitor types it; published as
typed it could hold newlines or markup imitating another provider's verdict line."""


def model_name_refusal(name: object) -> str | None:
    """Why this model name may not be published, or None (``MODEL_NAME``)."""
    if isinstance(name, str) and MODEL_NAME.fullmatch(name):
        return None
    return (
        "the model name is not one plain line of at most 128 letters, digits and . _ : / @ + = - "
        "(only such names are published)."
    )


def not_public(repos: list[tuple[str, str]], endpoint: str | None, what: str) -> str | None:
    """Why these (repo, commit) pairs are not all public now, or None; ``what`` names what is
    published ("audits", "checks"). Asked with calls that send no token."""
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=False)
    for repo_id, sha in repos:
        try:
            info = api.model_info(repo_id, revision=sha, token=False)
        except (RepositoryNotFoundError, GatedRepoError):
            return f"{repo_id} is not public: only {what} of two public repos are published."
        except NETWORK_ERRORS as e:
            return f"could not confirm that {repo_id} is public ({reason(e)})."
        if info.private or info.gated:
            kind = "private" if info.private else "gated"
            return f"{repo_id} is {kind}: only {what} of two public repos are published."
    return None
