"""The browser page's door: its files answer without a token (a browser must load the page before it can
ask for one) and nothing else becomes public; every file index.html links is served, with its type,
an ETag and a Content-Security-Policy; the vendored msgpack build is the one VENDOR.md names."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from speakd.server import app as app_module
from speakd.server.config import load_config
from speakd.server.engines.backend import SpeechBackend
from speakd.server.frontends import page_door
from speakd.server.frontends.auth import AccessTokens

TOKEN = "page-door-token"
AppClient = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AppClient]:
    """The real app with access tokens on, its model never loading (the page does not need it)."""
    release = threading.Event()

    def never_loads(config: object) -> SpeechBackend:
        release.wait(30)
        raise RuntimeError("model load abandoned by the test")

    monkeypatch.setattr(app_module, "load_backend", never_loads)
    app = app_module.create_app(load_config(None), AccessTokens.from_lines([TOKEN]))
    test_client: AppClient = TestClient(TestServer(app))
    await test_client.start_server()
    try:
        yield test_client
    finally:
        release.set()
        await test_client.close()


def test_public_paths_are_the_page_files_only() -> None:
    paths = page_door.page_paths()
    assert paths["/"].name == "index.html"
    assert page_door.PUBLIC_PATHS == set(paths) <= app_module.PUBLIC_PATHS
    assert all(p == "/" or p.startswith("/page/") for p in paths)
    assert {"/page/page.js", "/page/player-worklet.js", "/page/page.css"} <= set(paths)
    assert not any(p.endswith((".md", "LICENSE")) for p in paths)


async def test_the_page_and_everything_it_links_load_without_a_token(client: AppClient) -> None:
    response = await client.get("/")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    html = await response.text()
    links = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert links and all(not link.startswith(("/", "http:", "https:", "//")) for link in links), links
    for link in (link for link in links if not link.startswith("data:")):
        linked = await client.get("/" + link)
        assert linked.status == 200, link
        expected = "text/css" if link.endswith(".css") else "text/javascript"
        assert linked.headers["Content-Type"].startswith(expected), link
    # The worklet is loaded from script, not linked.
    assert (await client.get("/page/player-worklet.js")).status == 200


async def test_the_rest_still_needs_the_token(client: AppClient) -> None:
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/page/missing.js")).status == 401
    assert (await client.get("/page/vendor/msgpack/LICENSE")).status == 401
    authorized = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.get("/page/missing.js", headers=authorized)).status == 404


async def test_a_reload_revalidates_with_the_etag(client: AppClient) -> None:
    first = await client.get("/page/page.js")
    etag = first.headers["ETag"]
    assert first.headers["Cache-Control"] == "no-cache"
    again = await client.get("/page/page.js", headers={"If-None-Match": etag})
    assert again.status == 304 and await again.read() == b""
    assert (await client.get("/page/page.js", headers={"If-None-Match": '"other"'})).status == 200


def test_vendored_msgpack_matches_its_note() -> None:
    vendor = page_door.PAGE_DIR / "vendor" / "msgpack"
    digest = hashlib.sha256((vendor / "msgpack.min.js").read_bytes()).hexdigest()
    note = (vendor / "VENDOR.md").read_text()
    assert f"`msgpack.min.js` sha256 | `{digest}`" in note
    assert "3.1.3" in note and (vendor / "LICENSE").read_text().startswith("Copyright")
