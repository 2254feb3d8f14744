"""``RefuseUploads``: the dashboard takes no file from anyone, so its upload route answers 403.

Gradio serves ``POST /gradio_api/upload`` (and ``/upload``) for every app, whether or not a
component takes files, and keeps what arrives in its cache for a while; ``max_file_size``
only bounds the size (1 kB files were still accepted and kept 15 minutes). This ASGI
middleware answers every request to an upload route with 403 before Gradio reads a byte of
its body. Installed through ``launch(app_kwargs={"middleware": ...})`` (``launch_options``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

UPLOAD_ROUTES = ("/upload", "/upload_progress")
"""Route endings refused (under any prefix: ``/gradio_api/upload``, a Space's mount path, ...)."""
REFUSAL = b"This server takes no uploads: lorafid reads models from the Hub by name."


class RefuseUploads:
    """ASGI middleware: 403 for any HTTP request to an upload route; everything else passes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        path = str(scope.get("path", "")).rstrip("/")
        if scope.get("type") == "http" and path.endswith(UPLOAD_ROUTES):
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", b"%d" % len(REFUSAL)),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": REFUSAL})
            return
        await self.app(scope, receive, send)
