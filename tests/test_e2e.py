"""End to end through a real `speakd serve` process, real sockets, real Opus, scored by Whisper."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from daemon import Daemon, client, token_pieces, transcribe, word_errors
from devices import only_without_audio_device
from websockets.exceptions import ConnectionClosed

from speakd.protocol import (
    Audio,
    AudioCodec,
    Cancel,
    Done,
    DoneReason,
    End,
    Error,
    ErrorCode,
    Flush,
    Start,
    Started,
    Text,
)

pytestmark = pytest.mark.e2e

# Held-out sentences (Harvard lists), none of them used to pick the default voice.
SENTENCES = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
]

AFTER_BARGE_IN = SENTENCES[4] + " " + SENTENCES[5]

# Several streams at once on purpose (fairness, a slow reader beside others): on a slow CI machine
# admission by measured capacity would refuse the second. Admission has its own test.
CONFIG = """
[limits]
max_outbound_bytes = 1000000
send_timeout_s = 60.0
admission_headroom = 0
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("daemon"), model_cache, CONFIG)
    d.wait_ready()
    yield d
    assert d.stop() == 0, "".join(d.log)


def test_http_endpoints(daemon: Daemon) -> None:
    assert daemon.get("/healthz") == (200, "ok\n")
    assert daemon.get("/readyz")[0] == 200
    status, body = daemon.get("/v1/voices")
    voices = json.loads(body)
    assert status == 200
    assert {v["name"] for v in voices} >= {"jf_gongitsune", "jf_alpha", "jm_kumo"}
    assert [v["name"] for v in voices if v["default"]] == ["jf_gongitsune"]
    status, metrics = daemon.get("/metrics")
    assert status == 200
    assert "speakd_ready 1" in metrics
    assert 'speakd_stage_queue_depth{stage="vocoder"}' in metrics


async def test_token_stream_is_intelligible_and_ordered(daemon: Daemon) -> None:
    text = " ".join(SENTENCES)
    async with client(daemon.url) as c:
        await c.send(Start(context="talk"))
        started = await c.until("talk", Started)
        assert isinstance(started, Started)
        assert (started.codec, started.sample_rate, started.channels) == (AudioCodec.OPUS, 24000, 1)
        sent_all_at = None
        for piece in token_pieces(text):
            await c.send(Text(context="talk", text=piece))
            await asyncio.sleep(0.005)
        sent_all_at = time.perf_counter()
        await c.send(End(context="talk"))
        await c.until_done("talk")
    u = c.utterance("talk")
    u.assert_complete(text, min_segments=len(SENTENCES))
    assert all(a.samples == 480 for a in u.audio)
    # Streaming: audio arrived while later sentences were still being synthesized.
    assert u.first_audio_at is not None and sent_all_at is not None
    first_audio_index = u.order.index("audio")
    assert u.order.index("segment", first_audio_index) < len(u.order) - 1
    errors, total = word_errors(text, transcribe(u.pcm(), 24000))
    assert total >= 40
    assert errors / total <= 0.15, (errors, total)


async def test_cancel_stops_audio_and_context_is_reusable(daemon: Daemon) -> None:
    async with client(daemon.url) as c:
        await c.send(Start(context="barge"))
        await c.send(Text(context="barge", text=" ".join(SENTENCES * 3)))
        await c.send(Flush(context="barge"))
        await c.until("barge", Audio)
        # The vocoder is busy now; the event loop still answers, long before the text is spoken.
        assert await asyncio.to_thread(daemon.get, "/healthz") == (200, "ok\n")
        assert "speakd_contexts 1.0" in (await asyncio.to_thread(daemon.get, "/metrics"))[1]
        await c.send(Cancel(context="barge"))
        done = await c.until("barge", Done, timeout=30)
        assert isinstance(done, Done) and done.reason is DoneReason.CANCEL
        heard = len(c.utterance("barge").audio)
        assert done.audio_ms < 30_000  # far less than the whole text
        # Nothing more arrives for the cancelled context.
        with pytest.raises(TimeoutError):
            await c.recv(timeout=2.0)
        assert len(c.utterance("barge").audio) == heard
        # The same id starts afresh and speaks normally.
        c.contexts.pop("barge")
        await c.send(Start(context="barge"))
        await c.send(Text(context="barge", text=AFTER_BARGE_IN))
        await c.send(End(context="barge"))
        await c.until_done("barge")
    u = c.utterance("barge")
    assert u.done is not None and u.done.reason is DoneReason.END
    heard = transcribe(u.pcm(), 24000)
    errors, total = word_errors(AFTER_BARGE_IN, heard)
    assert errors / total <= 0.25, heard


async def test_two_contexts_on_one_connection(daemon: Daemon) -> None:
    texts = {"left": SENTENCES[1], "right": SENTENCES[4]}
    async with client(daemon.url) as c:
        for name in texts:
            await c.send(Start(context=name, codec=AudioCodec.PCM16, sample_rate=16000))
        for name, text in texts.items():
            for piece in token_pieces(text, 5):
                await c.send(Text(context=name, text=piece))
        for name in texts:
            await c.send(End(context=name))
        await c.until_done(*texts)
    for name, text in texts.items():
        u = c.utterance(name)
        assert u.done is not None and u.done.reason is DoneReason.END
        assert [a.seq for a in u.audio] == list(range(len(u.audio)))
        assert all(a.samples == 320 for a in u.audio)
        errors, total = word_errors(text, transcribe(u.pcm(), 16000))
        assert errors / total <= 0.25, (name, errors, total)


async def test_two_connections_at_once(daemon: Daemon) -> None:
    async def speak(text: str, rate: int) -> tuple[str, int, bytes]:
        async with client(daemon.url) as c:
            await c.send(Start(sample_rate=rate, frame_ms=40))
            await c.send(Text(text=text))
            await c.send(End())
            await c.until_done("default")
        u = c.utterance("default")
        assert u.done is not None and u.done.reason is DoneReason.END
        assert all(a.samples == rate * 40 // 1000 for a in u.audio)
        return text, rate, u.pcm().tobytes()

    results = await asyncio.gather(speak(SENTENCES[2], 48000), speak(SENTENCES[3], 16000))
    scores = [
        word_errors(text, transcribe(np.frombuffer(pcm, np.int16), rate)) for text, rate, pcm in results
    ]
    assert sum(e for e, _ in scores) / sum(n for _, n in scores) <= 0.2, scores


async def test_bad_input_gets_typed_errors_and_connection_survives(daemon: Daemon) -> None:
    async with client(daemon.url) as c:
        cases = [
            ("a text frame", ErrorCode.BAD_MESSAGE),
            (b"\xc1 not msgpack", ErrorCode.BAD_MESSAGE),
            (b"\x81\xa4type\xa5hello", ErrorCode.UNKNOWN_TYPE),  # {"type": "hello"}
            (b"\x81\xa4type\xa4text", ErrorCode.BAD_MESSAGE),  # text without text
            (b"\x82\xa4type\xa5start\xa5speed\xcb\x40\x24\x00\x00\x00\x00\x00\x00", ErrorCode.INVALID_PARAM),
            (b"\x80", ErrorCode.BAD_MESSAGE),
        ]
        for frame, code in cases:
            await c.ws.send(frame)
            msg = await c.recv(timeout=5)
            assert isinstance(msg, Error) and msg.code is code, (frame, msg)
        await c.send(Text(context="nobody", text="hi"))
        msg = await c.recv(timeout=5)
        assert isinstance(msg, Error) and msg.code is ErrorCode.UNKNOWN_CONTEXT and msg.context == "nobody"
        await c.send(Start(context="v", voice="nope"))
        msg = await c.recv(timeout=5)
        assert isinstance(msg, Error) and msg.code is ErrorCode.UNKNOWN_VOICE
        await c.ws.send(b"\x81\xa4type\xa4text" + b"x" * 70000)
        msg = await c.recv(timeout=5)
        assert isinstance(msg, Error) and msg.code is ErrorCode.MESSAGE_TOO_LARGE
        # Still usable: a real utterance goes through.
        await c.send(Start(context="ok"))
        await c.send(Text(context="ok", text="Still here."))
        await c.send(End(context="ok"))
        await c.until_done("ok")
        assert c.utterance("ok").done is not None
        assert c.utterance("ok").audio


async def test_non_reading_client_is_overloaded_without_hurting_others(daemon: Daemon) -> None:
    slow_sock = socket.socket()
    slow_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow_sock.connect(("127.0.0.1", int(daemon.url.split(":")[2].split("/")[0])))
    async with client(daemon.url, sock=slow_sock, max_queue=1) as slow:
        await slow.send(Start(context="hog", codec=AudioCodec.PCM16, sample_rate=48000))
        await slow.send(Text(context="hog", text=" ".join(SENTENCES * 6)))
        await slow.send(End(context="hog"))
        # Meanwhile a well-behaved client is served normally.
        async with client(daemon.url) as good:
            await good.send(Start())
            await good.send(Text(text=SENTENCES[5]))
            await good.send(End())
            await good.until_done("default")
        assert good.utterance("default").done is not None
        assert good.utterance("default").done.reason is DoneReason.END  # type: ignore[union-attr]
        # Wait until the daemon gives up on the hog, then read what it left for us.
        deadline = time.monotonic() + 300
        while 'speakd_errors_total{code="overloaded"}' not in daemon.get("/metrics")[1]:
            assert time.monotonic() < deadline, "the daemon never reported the non-reading client"
            await asyncio.sleep(0.5)
        try:
            await slow.until_done("hog", timeout=60)
        except ConnectionClosed:
            pytest.fail("the connection should stay open after overloaded")
    hog = slow.utterance("hog")
    assert [e.code for e in hog.errors] == [ErrorCode.OVERLOADED]
    assert hog.done is not None and hog.done.reason is DoneReason.ERROR
    # What got through before `overloaded` is what the kernel held: limits.socket_send_buffer_bytes
    # (256 KiB, doubled by Linux) plus small buffers, not the ~4 MiB Linux grows a stalled socket's to.
    assert len(hog.audio) * 960 * 2 < 2 * 1024 * 1024


# -- the sample client, `speakd-say`, against the real daemon ---------------------------------------

SAY = [sys.executable, "-c", "import sys; from speakd.client.cli import main; sys.exit(main())"]


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        return np.frombuffer(wav.readframes(wav.getnframes()), np.int16), wav.getframerate()


def test_say_writes_an_intelligible_wav(daemon: Daemon, tmp_path: Path) -> None:
    out = tmp_path / "say.wav"
    text = " ".join(SENTENCES[4:6])
    result = subprocess.run(
        [*SAY, text, "--url", daemon.url, "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "time to first audio" in result.stderr and "real-time factor" in result.stderr
    pcm, rate = read_wav(out)
    errors, total = word_errors(text, transcribe(pcm, rate))
    assert errors / total <= 0.2


def test_say_streams_stdin_as_it_arrives(daemon: Daemon, tmp_path: Path) -> None:
    out = tmp_path / "pipe.wav"
    proc = subprocess.Popen(
        [*SAY, "-", "--url", daemon.url, "--out", str(out), "--quiet"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(SENTENCES[1] + " ")
    proc.stdin.flush()
    # Speech for the first sentence is written while the pipe is still open (an LLM still writing).
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size > 44 + 24000):
        assert time.monotonic() < deadline, "no audio before stdin closed"
        assert proc.poll() is None
        time.sleep(0.1)
    proc.stdin.write(SENTENCES[2] + "\n")
    proc.stdin.close()
    assert proc.wait(120) == 0
    pcm, rate = read_wav(out)
    text = SENTENCES[1] + " " + SENTENCES[2]
    errors, total = word_errors(text, transcribe(pcm, rate))
    assert errors / total <= 0.2


@only_without_audio_device
def test_say_without_an_audio_device_says_so(daemon: Daemon) -> None:
    result = subprocess.run([*SAY, "Hello.", "--url", daemon.url], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert "--out" in result.stderr
