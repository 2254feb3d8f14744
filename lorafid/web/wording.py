"""Errors in the dashboard's words: its fields and buttons, not the command line's flags.

``in_app_words`` reads the structured fields of an error (which repo, whether the token was
refused, what was wrong with a source) and says what to do on this page; an error without
such fields is returned as it is. Free of Gradio.
"""

from __future__ import annotations

from lorafid.errors import GatedRepoError, InvalidSourceError, LorafidError, RepoNotFoundError

HUB_ONLY_HINT = "Enter a Hub repo ID like org/name; a revision goes in its own field."


def in_app_words(error: LorafidError, *, typed: bool, oauth: bool, allow_local: bool) -> LorafidError:
    """The error as the page says it, of the same class (fields kept).

    ``typed``: the visitor pasted a token (a wrong token and no token get different words);
    ``oauth``: the page has a Sign in button (mentioned only then); ``allow_local``: the
    deployment reads local paths (else a bad source is answered with what it does accept).
    """
    sign_in = ", or press Sign in with Hugging Face" if oauth else ""
    text: str | None = None
    if isinstance(error, GatedRepoError) and error.repo:
        head = f"{error.repo} is a gated repo: accept the licence at {error.page}"
        text = (
            f"{head} with the Hub account of the token you pasted: that token cannot read it yet."
            if typed
            else f"{head} (signed in to the Hub), then paste a token that can read it in the token field{sign_in}."
        )
    elif isinstance(error, RepoNotFoundError) and error.repo and error.token_rejected:
        text = (
            f"The Hub rejected the token for {error.repo} (401): it is invalid or expired. Paste a valid token "
            "(Hub settings, Access Tokens), or clear the field for public repos."
        )
    elif isinstance(error, RepoNotFoundError) and error.repo:
        text = f"Repo {error.repo} was not found on {error.endpoint}. Check the spelling (org/name)" + (
            "; if it is private, the token you pasted cannot read it."
            if typed
            else f"; if it is private, paste a token that can read it in the token field{sign_in}."
        )
    elif isinstance(error, InvalidSourceError) and error.problem and not allow_local:
        text = f"{error.problem} {HUB_ONLY_HINT}"
    if text is None or text == str(error):
        return error
    said = type(error).__new__(type(error))
    said.__dict__.update(error.__dict__)
    said.args = (text,)
    return said
