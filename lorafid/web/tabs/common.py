"""What every tab shares: the one error boundary (``user_errors``) and the limits on input.

Library errors (``LorafidError``) become ``gr.Error`` pop-ups here and nowhere else, escaped
and cut to ``MAX_MESSAGE_CHARS``; other exceptions pass through untouched (Gradio shows its
generic error). ``MAX_INPUT_CHARS`` bounds a text field; ``TEXT_INTERVAL_S`` paces status
lines while a check streams.
"""

import functools
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr

from lorafid.audit.store import Store
from lorafid.errors import LorafidError, ReportFormatError
from lorafid.web.downloads import write_download
from lorafid.web.gallery import Catalog
from lorafid.web.links import page_url
from lorafid.web.text import html_text, md_text

T = TypeVar("T")

TEXT_INTERVAL_S = 0.1  # update a status line at most ten times a second while a check streams
MAX_INPUT_CHARS = 200  # a Hub repo ID is at most 96 characters, a revision a branch name or SHA
MAX_MESSAGE_CHARS = 600  # an error message quoting user input is cut, never echoed whole


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one boundary where library errors become messages for the user."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except LorafidError as e:
                raise gr.Error(_message(e), print_exception=False) from e

        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LorafidError as e:
            raise gr.Error(_message(e), print_exception=False) from e

    return call


def _message(error: LorafidError) -> str:
    """The error's sentence for a pop-up: Gradio renders it as HTML, so it is escaped, and cut."""
    return html_text(str(error), MAX_MESSAGE_CHARS)


def open_stored_check(
    store: Store,
    catalog: Catalog,
    kind: str,
    key: str,
    token: str | bool,
    decode: Callable[[dict[str, Any]], T],
    what: str,
) -> T | str:
    """A stored check (``kind`` "behaviour" or "probe") for a visitor holding ``token``, read
    through its document's ``from_dict`` (``decode``); else the words to show instead.

    The audit's visibility rule applies (both repos public when checked, or readable with the
    visitor's own token now), and a missing check and a private one get the same words, so the
    answer reveals nothing. A damaged document is its ``ReportFormatError``'s one line.
    """
    document = store.load_document(kind, key)
    if document is None or not catalog.document_visible(kind, key, document, token):
        return (
            f"That {what} is not stored on this server, or is of a gated or private repo: sign in with an "
            "account that can read both repos."
        )
    try:
        return decode(document)
    except ReportFormatError as e:
        return md_text(str(e), MAX_MESSAGE_CHARS)


def scroll_if_linked_js(parameter: str, selector: str) -> str:
    """Page-load JS: where the URL has ``?parameter=``, scroll ``selector`` to the top of the
    screen, after the tab switch has drawn it (scrolling earlier finds nothing to scroll to); on
    a phone the result sat two screens below the form."""
    return (
        f"() => {{ if (new URLSearchParams(window.location.search).get('{parameter}')) "
        f"setTimeout(() => document.querySelector('{selector}')?.scrollIntoView({{block: 'start'}}), 300); }}"
    )


def stored_check_link(request: gr.Request | None, kind: str, key: str) -> str:
    """The Markdown permalink of a stored check (``?behaviour=KEY``, ``?probe=KEY``) as the
    visitor's page sees it, behind a proxy too; empty where no request is known (a handler
    called outside a page)."""
    if request is None:
        return ""
    return f"[Permalink]({page_url(dict(request.headers or {}), str(request.url))}?{kind}={key})"


def stored_check_download(downloads: Path, kind: str, key: str, text: str) -> str:
    """The JSON of a stored check (``kind`` "behaviour" or "probe"), written for this request
    as ``lorafid-KIND-KEY.json``: after a run and when a link opens it, the same file."""
    return str(write_download(downloads, f"lorafid-{kind}-{key}.json", text + "\n"))
