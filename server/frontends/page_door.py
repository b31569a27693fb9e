"""The browser page at `/`: static files shipped inside the package (`page/`), with no build step.

The files are public (`PUBLIC_PATHS`): a browser must load the page before it can ask for a token, and
the files hold no secret. The page then speaks the WebSocket protocol like any client, so the token
check still guards every door that does work. The files are read once, at startup, and served from
memory with an ETag, so a reload costs a 304.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import hdrs, web

logger = logging.getLogger(__name__)

PAGE_DIR: Final = Path(__file__).with_name("page")
INDEX: Final = "index.html"
ASSET_PREFIX: Final = "/page/"
_CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Everything the page needs is its own: scripts, styles and the worklet from this origin, the WebSocket
# back to it. `'self'` covers ws:/wss: to the same host only in newer browsers, hence ws: and wss:.
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time: the ETag makes that a 304, and a new version of the page shows at once.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: str
    etag: str


def page_paths(directory: Path = PAGE_DIR) -> dict[str, Path]:
    """URL path → file: `/` for the page itself, `/page/<relative path>` for its html, js and css."""
    paths: dict[str, Path] = {}
    for file in sorted(directory.rglob("*")):
        if not file.is_file() or file.suffix not in _CONTENT_TYPES:
            continue
        relative = file.relative_to(directory).as_posix()
        paths["/" if relative == INDEX else ASSET_PREFIX + relative] = file
    return paths


PUBLIC_PATHS: Final = frozenset(page_paths())
"""The page's own paths, which answer without a token."""


def _load(file: Path) -> _File:
    body = file.read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return _File(body=body, content_type=_CONTENT_TYPES[file.suffix], etag=etag)


def _handler(served: _File) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def serve(request: web.Request) -> web.StreamResponse:
        headers = {**_SECURITY_HEADERS, hdrs.ETAG: served.etag}
        if served.etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
            return web.Response(status=304, headers=headers)
        headers[hdrs.CONTENT_TYPE] = served.content_type
        return web.Response(body=served.body, headers=headers)

    return serve


def add_routes(app: web.Application) -> None:
    """One plain GET route per file, so the auth middleware's exact-path exemption applies to each."""
    paths = page_paths()
    if "/" not in paths:
        logger.warning("the browser page is missing (%s not found); / will answer 404", PAGE_DIR / INDEX)
    for path, file in paths.items():
        app.router.add_get(path, _handler(_load(file)))
