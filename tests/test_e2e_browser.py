"""The browser page (`GET /`), end to end: Debian's headless Chromium loads it from a real daemon and
speaks through it. What the page's AudioWorklet actually played is tapped and scored by Whisper; the
captions must follow the words as they are played; Stop must silence the output at once; the PCM
fallback, access tokens and a path prefix behind a reverse proxy must work as well."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientSession, WSMsgType, WSServerHandshakeError, hdrs, web
from browser import CHROMIUM, SpeakdPage, chromium
from daemon import Daemon, transcribe, word_errors
from playwright.sync_api import Browser

pytestmark = pytest.mark.e2e

TOKEN = "browser-token-Qx7.k_9~z"
# First sentences of LLM replies, a different one per test so a mix-up cannot pass.
REPLY = "Sure! The quickest way to get there is to take the train to the central station."
PCM_REPLY = "Good question. Most plants need sunlight, water and a little patience to grow well."
LONG_REPLY = (
    "Here is a short overview of the project. It started as a small experiment in streaming speech, "
    "and it grew into a daemon that many people now use every day. The rest of this answer explains "
    "how the pieces fit together."
)
TOKEN_REPLY = "Of course, I can help you write a polite email to your landlord."
PROXY_REPLY = "Happy to help with that recipe. First, warm the oven and line a tray with paper."
HIGHLIGHT_TOLERANCE_MS = 80
STOP_LIMIT_MS = 100
SILENT = 1e-3  # -60 dBFS: anything louder counts as sound


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: scripts/setup.sh test installs it (apt-get install chromium)")
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("browser"), model_cache)
    d.wait_ready()
    yield d
    assert d.stop() == 0, "".join(d.log)


@pytest.fixture(scope="module")
def token_daemon(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("browser-token")
    tokens = tmp / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    tokens.chmod(0o600)
    d = Daemon(tmp, model_cache, args=["--token-file", str(tokens)])
    d.wait_ready()
    yield d
    assert d.stop() == 0, "".join(d.log)
    assert TOKEN not in "".join(d.log)


def open_page(browser: Browser, url: str, init_script: str | None = None) -> SpeakdPage:
    context = browser.new_context()
    if init_script:
        context.add_init_script(init_script)
    page = SpeakdPage(context, url)
    page.js("speakdTap.enable()")
    return page


def assert_says(pcm: np.ndarray[Any, np.dtype[np.int16]], rate: int, text: str) -> str:
    assert np.abs(pcm).max() > 3000, "the page played nothing audible"
    heard = transcribe(pcm, rate)
    errors, total = word_errors(text, heard)
    # Whisper tiny hears these replies without error here; a loaded machine can starve playback
    # mid-word (an underrun), which costs a word or two.
    assert errors <= max(2, total // 6), (text, heard)
    return heard


def context_of(page: SpeakdPage) -> str:
    starts = page.sent("start")
    assert starts, "the page sent no start"
    context: str = starts[-1]["context"]
    return context


def test_page_speaks_with_captions_in_step_with_playback(browser: Browser, daemon: Daemon) -> None:
    page = open_page(browser, daemon.http + "/")
    try:
        assert page.js("document.getElementById('format').value") == "opus"
        page.speak(REPLY)
        assert page.wait_finished() == "Done.", page.errors
        context = context_of(page)
        start = page.sent("start")[-1]
        assert start["codec"] == "opus" and start["words"] is True
        assert page.received("started", context)[0]["words"] is True
        assert page.received("done", context)[0]["reason"] == "end"

        pcm, rate, _ = page.played()
        assert_says(pcm, rate, REPLY)

        ttfa = page.js("document.getElementById('ttfa').dataset.ms")
        assert ttfa is not None and 0 < int(ttfa) < 5000, ttfa

        # Every word the server timed is highlighted once, in order, as the played position reaches it.
        words = [w for m in page.received("words", context) for w in m["words"]]
        assert len(words) >= 12, words
        highlights = [h for h in page.js("speakdTap.highlights") if h["context"] == context]
        assert [h["index"] for h in highlights] == list(range(len(words)))
        for h, w in zip(highlights, words, strict=True):
            assert h["shown"] == REPLY[w["char_start"] : w["char_end"]] == h["word"] == w["word"]
            assert abs(h["heard_ms"] - w["start_ms"]) <= HIGHLIGHT_TOLERANCE_MS, (h, w)
            assert 0 <= h["played_ms"] - h["heard_ms"] <= 150, h  # what is still on its way out
        assert page.errors == []
    finally:
        page.context.close()


def test_stop_silences_playback_at_once_and_the_server_cancels(browser: Browser, daemon: Daemon) -> None:
    page = open_page(browser, daemon.http + "/")
    try:
        page.speak(LONG_REPLY)
        page.wait("speakdTap.highlights.length >= 8", 60)  # well into the speech
        page.page.click("#stop")
        page.page.wait_for_timeout(600)
        context = context_of(page)
        click = page.js("speakdTap.stops[speakdTap.stops.length - 1]")
        assert click["context"] == context
        pcm, rate, first = page.played()
        click_at = click["frame"] - first
        before = np.abs(pcm[max(0, click_at - rate // 2) : click_at]).max() / 32768
        assert before > 0.05, "no speech was playing when Stop was clicked"
        loud = np.flatnonzero(np.abs(pcm.astype(np.float32) / 32768) > SILENT)
        latency_ms = (loud[-1] - click_at) * 1000 / rate
        assert latency_ms <= STOP_LIMIT_MS, latency_ms
        assert len(pcm) - click_at > rate // 2, "the tap must cover the half second after Stop"

        assert [m["context"] for m in page.sent("cancel")] == [context]
        page.wait("speakdTap.events.some(e => e.type === 'done')", 10)
        assert [m["reason"] for m in page.received("done", context)] == ["cancel"]
        assert page.status() == "Stopped."
        assert page.js("document.getElementById('stop').disabled") is True
        # No word is highlighted after the stop.
        assert len(page.js("speakdTap.highlights")) == click["highlights"] >= 8
    finally:
        page.context.close()


def test_pcm_fallback_without_webcodecs(browser: Browser, daemon: Daemon) -> None:
    page = open_page(browser, daemon.http + "/", init_script="delete window.AudioDecoder;")
    try:
        assert page.js("typeof window.AudioDecoder") == "undefined"
        assert page.js("document.getElementById('format').value") == "pcm16"
        assert page.js("document.querySelector('#format option[value=opus]').disabled") is True
        assert "WebCodecs" in page.page.inner_text("#codec-note")
        page.speak(PCM_REPLY)
        assert page.wait_finished() == "Done.", page.errors
        context = context_of(page)
        started = page.received("started", context)[0]
        assert started["codec"] == "pcm16"
        pcm, rate, _ = page.played()
        assert_says(pcm, rate, PCM_REPLY)
        assert page.errors == []
    finally:
        page.context.close()


def test_speak_as_i_type_streams_appended_text_and_counts_code_points(
    browser: Browser, daemon: Daemon
) -> None:
    """Typed at an LLM's pace: only whole appended words go out as `text`, a pause sends the rest and a
    `flush`; captions index the text by code points (the smiley is two UTF-16 units in JS)."""
    page = open_page(browser, daemon.http + "/")
    typed = "Sure \U0001f642 the caf\u00e9 opens at nine"
    try:
        page.page.check("#live")
        page.page.click("#text")
        page.page.keyboard.type(typed, delay=25)
        page.wait("speakdTap.events.some(e => e.type === 'started')", 30)
        page.page.wait_for_timeout(1200)  # a typing pause: the last word and a flush go out
        texts = [m["text"] for m in page.sent("text")]
        assert "".join(texts) == typed
        assert all(t.endswith(" ") for t in texts[:-1]), texts  # whole words until the pause
        assert len(page.sent("flush")) == 1
        assert page.sent("end") == []
        page.page.keyboard.type(". Bye.", delay=25)
        page.page.uncheck("#live")  # ends the utterance: what was typed is spoken to the end
        assert page.wait_finished() == "Done.", page.errors
        context = context_of(page)
        full = typed + ". Bye."
        assert "".join(m["text"] for m in page.sent("text")) == full
        assert page.received("done", context)[0]["reason"] == "end"
        words = [w for m in page.received("words", context) for w in m["words"]]
        highlights = [h for h in page.js("speakdTap.highlights") if h["context"] == context]
        assert highlights, "nothing was highlighted"
        for h in highlights:
            w = words[h["index"]]
            assert h["shown"] == full[w["char_start"] : w["char_end"]], (h, w)
        assert any(h["word"] == "nine" for h in highlights)
        assert page.errors == []
    finally:
        page.context.close()


def test_access_token_from_the_page_never_in_a_url_or_the_log(browser: Browser, token_daemon: Daemon) -> None:
    page = open_page(browser, token_daemon.http + "/")
    try:
        # The page itself loads without a token; the WebSocket is refused, and the page says why.
        page.speak(TOKEN_REPLY)
        status = page.wait_finished()
        assert "needs an access token" in status, status
        assert page.js("document.getElementById('auth').open") is True

        page.page.fill("#token", TOKEN)
        page.page.click("#speak")
        assert page.wait_finished() == "Done.", page.errors
        pcm, rate, _ = page.played()
        assert_says(pcm, rate, TOKEN_REPLY)
        assert page.js("sessionStorage.getItem('speakd.token')") == TOKEN

        # A reload in the same tab keeps the token, from sessionStorage; nothing puts it in a URL.
        page.page.reload()
        page.wait("document.getElementById('voice').options.length > 1")
        assert page.js("document.getElementById('token').value") == TOKEN
        urls = [*page.requests, *page.sockets, page.page.url]
        assert all(TOKEN not in url for url in urls), urls
        assert any(url.endswith("/v1/stream") for url in page.sockets)
        assert TOKEN not in "".join(token_daemon.log)
        errors = [e for e in page.errors if "401" not in e and "WebSocket" not in e]
        assert errors == []

        # A wrong token is named as such.
        page.page.click("#auth summary")
        page.page.fill("#token", "not-the-token")
        page.speak(TOKEN_REPLY)
        assert "refused this access token" in page.wait_finished()
    finally:
        page.context.close()


class PrefixProxy:
    """A reverse proxy that serves the daemon under `/speakd/`, WebSockets included, keeping the Host
    header as proxies do; run on its own event loop in a thread."""

    PREFIX = "/speakd/"

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.paths: list[str] = []
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.session = ClientSession()
        app = web.Application()
        app.router.add_route("*", self.PREFIX + "{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def close(self) -> None:
        async def stop() -> None:
            await self.runner.cleanup()
            await self.session.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.PREFIX}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path)
        target = self.upstream + "/" + request.match_info["tail"]
        keep = (hdrs.HOST, hdrs.ORIGIN, hdrs.AUTHORIZATION, hdrs.IF_NONE_MATCH, hdrs.ACCEPT)
        headers = {name: request.headers[name] for name in keep if name in request.headers}
        if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
            return await self._websocket(request, target, headers)
        async with self.session.request(request.method, target, headers=headers) as response:
            body = await response.read()
            passed = {
                k: v
                for k, v in response.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")
            }
            return web.Response(status=response.status, body=body, headers=passed)

    async def _websocket(
        self, request: web.Request, target: str, headers: dict[str, str]
    ) -> web.StreamResponse:
        offered = [
            p.strip() for p in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(",") if p.strip()
        ]
        try:
            upstream = await self.session.ws_connect(
                target.replace("http", "ws", 1), protocols=offered, headers=headers
            )
        except WSServerHandshakeError as exc:
            return web.Response(status=exc.status)
        ws = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else ())
        await ws.prepare(request)

        async def pipe(source: Any, sink: Any) -> None:
            async for msg in source:
                if msg.type == WSMsgType.BINARY:
                    await sink.send_bytes(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await sink.send_str(msg.data)
            await sink.close()

        await asyncio.gather(pipe(ws, upstream), pipe(upstream, ws), return_exceptions=True)
        return ws


def test_page_works_under_a_path_prefix_behind_a_proxy(browser: Browser, daemon: Daemon) -> None:
    proxy = PrefixProxy(daemon.http)
    try:
        page = open_page(browser, proxy.url)
        try:
            page.speak(PROXY_REPLY)
            assert page.wait_finished() == "Done.", page.errors
            pcm, rate, _ = page.played()
            assert_says(pcm, rate, PROXY_REPLY)
            assert all(url.startswith(proxy.url) for url in page.requests), page.requests
            assert page.sockets == [re.sub(r"^http", "ws", proxy.url) + "v1/stream"]
            assert set(proxy.paths) >= {
                "/speakd/",
                "/speakd/page/page.js",
                "/speakd/page/player-worklet.js",
                "/speakd/v1/voices",
                "/speakd/v1/stream",
            }
            assert page.errors == []
        finally:
            page.context.close()
    finally:
        proxy.close()
