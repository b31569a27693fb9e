"""Headless Chromium (Debian's `chromium`, driven by Playwright) on speakd's browser page, for the e2e
tests and scripts/screenshot_page.py: the launch flags, and a page wrapper that records every request
and WebSocket frame and reads back the PCM the page's AudioWorklet played (`window.speakdTap`)."""

from __future__ import annotations

import base64
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from playwright.sync_api import Browser, BrowserContext, Page, WebSocket, sync_playwright

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Root needs --no-sandbox; autoplay without a gesture lets the page start audio on a scripted click;
# the rest keeps a browser on a machine without network quiet (no update, sync or first-run traffic).
FLAGS = (
    "--no-sandbox",
    "--autoplay-policy=no-user-gesture-required",
    "--mute-audio",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
)


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's chromium, headless, on a fresh profile (Playwright makes one per launch)."""
    if CHROMIUM is None:
        raise RuntimeError(
            "chromium is not installed: scripts/setup.sh test installs it (apt-get install chromium)"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=list(FLAGS))
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Frame:
    """One WebSocket frame the page sent or received, decoded."""

    sent: bool
    msg: dict[str, Any]
    at: float


class SpeakdPage:
    """The page in its own browser context, with every request URL and WebSocket frame recorded."""

    def __init__(self, context: BrowserContext, url: str) -> None:
        self.context = context
        self.page: Page = context.new_page()
        self.requests: list[str] = []
        self.sockets: list[str] = []
        self.frames: list[Frame] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("websocket", self._watch)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.goto(url)
        self.wait("document.getElementById('voice').options.length > 1 && !!window.MessagePack", 60)

    def _watch(self, socket: WebSocket) -> None:
        self.sockets.append(socket.url)
        socket.on("framesent", lambda payload: self._frame(True, payload))
        socket.on("framereceived", lambda payload: self._frame(False, payload))

    def _frame(self, sent: bool, payload: str | bytes) -> None:
        data = payload if isinstance(payload, bytes) else payload.encode()
        self.frames.append(Frame(sent, msgpack.unpackb(data), time.monotonic()))

    def js(self, expression: str) -> Any:
        return self.page.evaluate(expression)

    def wait(self, expression: str, timeout: float = 60.0) -> Any:
        """Poll a JS expression until truthy. Not wait_for_function: that evals a string, which the
        page's Content-Security-Policy forbids (as it should)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.page.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression} still false after {timeout} s; status: {self.status()!r}")
            self.page.wait_for_timeout(20)

    def status(self) -> str:
        text: str = self.page.inner_text("#status")
        return text

    def speak(self, text: str) -> None:
        self.page.fill("#text", text)
        self.page.click("#speak")

    def wait_finished(self, timeout: float = 90.0) -> str:
        """Wait until playback has drained (or the page shows an error); the status line then."""
        self.wait(
            "document.getElementById('status').textContent.startsWith('Done')"
            " || document.getElementById('status').classList.contains('error')",
            timeout,
        )
        return self.status()

    def received(self, kind: str, context: str | None = None) -> list[dict[str, Any]]:
        return [
            f.msg
            for f in self.frames
            if not f.sent
            and f.msg.get("type") == kind
            and (context is None or f.msg.get("context") == context)
        ]

    def sent(self, kind: str) -> list[dict[str, Any]]:
        return [f.msg for f in self.frames if f.sent and f.msg.get("type") == kind]

    def played(self, from_frame: int = 0) -> tuple[np.ndarray[Any, np.dtype[np.int16]], int, int]:
        """What the worklet output since the tap was enabled: 16-bit PCM, its rate and its first frame."""
        tapped = self.js(f"speakdTap.pcmBase64({from_frame})")
        pcm = np.frombuffer(base64.b64decode(tapped["pcm"]), dtype="<i2").astype(np.int16)
        return pcm, int(self.js("speakdTap.sampleRate")), int(tapped["frame"])
