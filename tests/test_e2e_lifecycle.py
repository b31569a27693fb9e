"""The daemon's life: not ready while loading, graceful SIGTERM, clear failures at start-up."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon import Daemon, client
from websockets.exceptions import ConnectionClosed, InvalidStatus

from speakd.protocol import Audio, Done, DoneReason, End, Error, ErrorCode, Start, Text

pytestmark = pytest.mark.e2e

LONG_TEXT = "The birch canoe slid on the smooth planks. " * 12


async def test_readiness_and_graceful_stop(tmp_path: Path, model_cache: Path) -> None:
    d = Daemon(tmp_path, model_cache, "[server]\nshutdown_grace_s = 8.0\n")
    try:
        status, body = d.get("/readyz")
        assert (status, body) == (503, "loading\n")
        assert d.get("/healthz")[0] == 200
        with pytest.raises(InvalidStatus) as refused:
            async with client(d.url):
                pass
        assert refused.value.response.status_code == 503
        d.wait_ready()

        async with client(d.url) as short, client(d.url) as long:
            await long.send(Start(context="long"))
            await long.send(Text(context="long", text=LONG_TEXT))
            await long.send(End(context="long"))
            await long.until("long", Audio)
            await short.send(Start(context="short"))
            await short.send(Text(context="short", text="Bye now."))
            await short.send(End(context="short"))
            stop_sent = time.monotonic()
            d.proc.send_signal(15)
            # The short context finishes within the grace period; the long one is cut at its end.
            await short.until_done("short", timeout=10)
            assert short.utterance("short").done.reason is DoneReason.END  # type: ignore[union-attr]
            await long.until_done("long", timeout=10)
            assert time.monotonic() - stop_sent < 14
            assert long.utterance("long").done.reason is DoneReason.CANCEL  # type: ignore[union-attr]
            assert [e.code for e in long.utterance("long").errors] == [ErrorCode.SHUTTING_DOWN]
            for c in (short, long):
                with pytest.raises(ConnectionClosed):
                    await c.recv(timeout=5)
                assert c.ws.close_code == 1001
        assert d.proc.wait(15) == 0
        assert any("stopped" in line for line in d.log)
    finally:
        d.stop()


def run_speakd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "speakd.server.cli", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bad_config_is_reported_clearly(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nprot = 9000\n")
    result = run_speakd("--config", str(config))
    assert result.returncode == 2
    assert "server.prot" in result.stderr and "did you mean 'server.port'" in result.stderr


def test_unknown_default_voice_stops_the_daemon(tmp_path: Path, model_cache: Path) -> None:
    result = run_speakd("--voice", "af_nobody", "--cache-dir", str(model_cache))
    assert result.returncode == 1
    assert "af_nobody" in result.stderr and "jf_gongitsune" in result.stderr


def test_error_type_is_exported() -> None:
    # The lifecycle test above relies on errors being distinguishable by code alone.
    assert Error(code=ErrorCode.SHUTTING_DOWN, message="x").code.value == "shutting_down"
    assert Done(reason=DoneReason.CANCEL, audio_ms=0.0, segments=0).reason.value == "cancel"


async def test_idle_connection_times_out_even_while_answering_pings(
    tmp_path: Path, model_cache: Path
) -> None:
    d = Daemon(tmp_path, model_cache, "[limits]\nidle_timeout_s = 1.5\n")
    try:
        d.wait_ready()
        # The client pings every 0.2 s: keep-alive traffic must not count as activity.
        async with client(d.url, ping_interval=0.2) as c:
            await c.send(Start(context="s"))
            await c.send(Text(context="s", text="Short."))
            await c.send(End(context="s"))
            await c.until_done("s", timeout=30)
            ended = time.monotonic()
            msg = await c.recv(timeout=10)
            assert isinstance(msg, Error) and msg.code is ErrorCode.IDLE_TIMEOUT
            assert 1.0 < time.monotonic() - ended < 4.0
            with pytest.raises(ConnectionClosed):
                await c.recv(timeout=5)
            assert c.ws.close_code == 1008
    finally:
        d.stop()


def test_missing_libopus_is_named_with_its_install_command() -> None:
    hide_opus = (
        "import ctypes.util as u; find = u.find_library; "
        "u.find_library = lambda name: None if 'opus' in name else find(name); "
        "import sys; from speakd.server.cli import main; sys.exit(main(['serve', '--port', '0']))"
    )
    result = subprocess.run([sys.executable, "-c", hide_opus], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "apt-get install libopus0" in result.stderr
    assert "Traceback" not in result.stderr


async def test_drain_tells_systemd_and_balancers_and_finishes_what_is_open(model_cache: Path) -> None:
    """Under systemd (`Type=notify`): READY after warm-up, watchdog pings, STOPPING on SIGTERM. While
    draining the daemon still listens: /readyz says 503 and new sessions are refused with 503, so a
    balancer sends them elsewhere, while the open utterance finishes whole; then 1001 and exit 0."""
    with tempfile.TemporaryDirectory(dir="/tmp") as short_dir:  # a Unix socket path must be short
        notify_path = Path(short_dir) / "notify"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify_path))
        sock.settimeout(0.2)
        states: list[str] = []
        listening = threading.Event()
        listening.set()

        def listen() -> None:  # as systemd does: read every notification as it comes
            while listening.is_set():
                try:
                    states.extend(sock.recv(4096).decode().split("\n"))
                except TimeoutError:
                    continue

        def received() -> list[str]:
            return list(states)

        reader = threading.Thread(target=listen, daemon=True)
        reader.start()
        d = Daemon(
            Path(short_dir),
            model_cache,
            "[server]\nshutdown_grace_s = 30.0\n",
            env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"},
        )
        try:
            assert "READY=1" not in received()
            d.wait_ready()
            await wait_for(lambda: "READY=1" in received() and received().count("WATCHDOG=1") >= 2)
            text = "The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background."
            async with client(d.url) as listener:
                await listener.send(Start(context="open"))
                await listener.send(Text(context="open", text=text))
                await listener.send(End(context="open"))
                await listener.until("open", Audio)
                d.proc.send_signal(15)
                await wait_for(lambda: "STOPPING=1" in received())
                assert d.get("/readyz") == (503, "draining\n")
                with pytest.raises(InvalidStatus) as refused:
                    async with client(d.url):
                        pass
                assert refused.value.response.status_code == 503
                status, body = post_speech(d)
                assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down"
                await listener.until_done("open", timeout=60)
                listener.utterance("open").assert_complete(text, 2)
                with pytest.raises(ConnectionClosed):
                    await listener.recv(timeout=10)
                assert listener.ws.close_code == 1001
            assert d.proc.wait(30) == 0
        finally:
            d.stop()
            listening.clear()
            reader.join(5)
            sock.close()


async def wait_for(condition: Callable[[], bool], limit_s: float = 60.0) -> None:
    """Poll `condition`; the limit only fires on a hang."""
    for _ in range(int(limit_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


def post_speech(d: Daemon) -> tuple[int, str]:
    body = json.dumps({"model": "tts-1", "voice": "alloy", "input": "Hello."}).encode()
    request = urllib.request.Request(d.http + "/v1/audio/speech", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
