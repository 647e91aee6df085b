"""`GET /emosteer`: the playground, a page that streams unsteered and steered answers side by side.

Three fixed files shipped in `static/`, each on its own fixed route: nothing in a request names a file. The
page only calls this server's own API (`/v1/models`, `/v1/emosteer`, `/v1/chat/completions`), and its
Content-Security-Policy lets it load and fetch nothing else.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Callable

from fastapi import FastAPI
from fastapi.responses import Response

ROUTE = "/emosteer"
ASSETS = {
    ROUTE: ("playground.html", "text/html; charset=utf-8"),
    ROUTE + "/playground.css": ("playground.css", "text/css; charset=utf-8"),
    ROUTE + "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def attach_playground(app: FastAPI, refusal: Callable[[], Response | None]) -> None:
    """Serve the playground's files; `refusal()` answers instead while steering is not enabled."""
    static = files(__package__).joinpath("static")
    for route, (name, media_type) in ASSETS.items():
        app.add_api_route(route, _serve(static.joinpath(name).read_bytes(), media_type, refusal),
                          methods=["GET"], include_in_schema=False)


def _serve(body: bytes, media_type: str, refusal):
    async def serve_asset():
        return refusal() or Response(body, media_type=media_type, headers=HEADERS)

    return serve_asset
