"""The Wyoming door end to end: a real daemon, the `wyoming` package's own client replaying Home
Assistant's sequences, and Whisper scoring what was said."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from captions import CAPTIONS
from daemon import Daemon, client, transcribe, word_errors
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from speakd.protocol import End, Start, Text

pytestmark = pytest.mark.e2e

SENTENCE = "The boy was there when the sun rose."
# A reply as an LLM streams it to Home Assistant: a few words at a time.
REPLY = (
    "Sure, I turned off the kitchen lights. The living room lamp is still on, and the thermostat is set "
    "to twenty degrees. Let me know if you want anything else."
)
LONG = " ".join([REPLY] * 6)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Daemon]:
    config = """
[limits]
# Streams over two doors at once on purpose; admission has its own test.
admission_headroom = 0
"""
    d = Daemon(tmp_path_factory.mktemp("wyoming"), model_cache, config, args=["--wyoming", "127.0.0.1:0"])
    d.wait_ready()
    yield d
    assert d.stop() == 0, "".join(d.log)


@dataclass
class Reply:
    """What came back for one request, in order."""

    types: list[str] = field(default_factory=list)
    starts: list[AudioStart] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    errors: list[Error] = field(default_factory=list)
    first_audio_at: float | None = None

    @property
    def seconds(self) -> float:
        return len(self.audio) / 2 / self.starts[0].rate

    def pcm(self) -> np.ndarray:
        return np.frombuffer(bytes(self.audio), dtype=np.int16)


async def collect(c: AsyncTcpClient, until: str, timeout_s: float = 120.0) -> Reply:
    reply = Reply()
    async with asyncio.timeout(timeout_s):
        while True:
            event = await c.read_event()
            assert event is not None, f"connection closed after {reply.types}"
            reply.types.append(event.type)
            if AudioStart.is_type(event.type):
                reply.starts.append(AudioStart.from_event(event))
            elif AudioChunk.is_type(event.type):
                chunk = AudioChunk.from_event(event)
                assert (chunk.rate, chunk.width, chunk.channels) == (24000, 2, 1)
                if reply.first_audio_at is None:
                    reply.first_audio_at = time.perf_counter()
                reply.audio.extend(chunk.audio)
            elif Error.is_type(event.type):
                reply.errors.append(Error.from_event(event))
            if event.type == until:
                return reply


def errors_in(text: str, reply: Reply) -> int:
    errors, _ = word_errors(text, transcribe(reply.pcm(), reply.starts[0].rate))
    return errors


async def test_describe_lists_a_streaming_program_and_every_voice(daemon: Daemon) -> None:
    async with AsyncTcpClient("127.0.0.1", daemon.wyoming_port()) as c:
        await c.write_event(Describe().event())
        event = await asyncio.wait_for(c.read_event(), 5)
    assert event is not None and Info.is_type(event.type)
    (program,) = Info.from_event(event).tts
    assert program.installed and program.supports_synthesize_streaming
    assert program.attribution.name and program.version and program.description
    names = {voice.name for voice in program.voices}
    assert "jf_gongitsune" in names and len(names) == 5
    for voice in program.voices:
        assert voice.installed and voice.attribution.url
        assert voice.languages == ["en-US"]  # what the embedded voices speak with the English G2P


async def test_describe_answers_within_a_second_under_load(daemon: Daemon) -> None:
    async with client(daemon.url) as ws:  # a long reply keeps every stage busy meanwhile
        await ws.send(Start(context="load"))
        await ws.send(Text(context="load", text=LONG))
        await ws.send(End(context="load"))
        await asyncio.sleep(1.0)
        port = daemon.wyoming_port()
        for _ in range(3):
            started = time.perf_counter()
            async with AsyncTcpClient("127.0.0.1", port) as c:
                await c.write_event(Describe().event())
                event = await asyncio.wait_for(c.read_event(), 5)
            assert event is not None and Info.is_type(event.type)
            assert time.perf_counter() - started < 1.0
        await ws.until_done("load")


async def test_whole_text_synthesize_is_one_audio_stream(daemon: Daemon) -> None:
    async with AsyncTcpClient("127.0.0.1", daemon.wyoming_port()) as c:
        await c.write_event(Synthesize(text=SENTENCE, voice=SynthesizeVoice(name="jf_alpha")).event())
        reply = await collect(c, AudioStop().event().type)
    assert reply.types[0] == "audio-start" and reply.types[-1] == "audio-stop"
    assert reply.types.count("audio-start") == 1 and not reply.errors
    assert 1.0 < reply.seconds < 6.0
    assert errors_in(SENTENCE, reply) <= 1


def median_pitch_hz(pcm: np.ndarray, rate: int) -> float:
    """The median F0 of the voiced 40 ms frames (autocorrelation peak between 70 and 400 Hz)."""
    audio = pcm.astype(np.float32) / 32768.0
    size, lo, hi = int(0.04 * rate), rate // 400, rate // 70
    pitches = []
    for start in range(0, len(audio) - size, size):
        frame = audio[start : start + size] - audio[start : start + size].mean()
        if np.sqrt(np.mean(frame**2)) < 0.02:
            continue
        corr = np.correlate(frame, frame, "full")[size - 1 :]
        lag = lo + int(np.argmax(corr[lo:hi]))
        if corr[lag] > 0.5 * corr[0]:
            pitches.append(rate / lag)
    assert len(pitches) > 10
    return float(np.median(pitches))


async def speak_with(port: int, voice: str | None) -> Reply:
    async with AsyncTcpClient("127.0.0.1", port) as c:
        named = SynthesizeVoice(name=voice) if voice else None
        await c.write_event(Synthesize(text=SENTENCE, voice=named).event())
        reply = await collect(c, "audio-stop")
    assert not reply.errors and reply.seconds > 1.0
    return reply


async def test_the_voice_asked_for_is_the_voice_heard(daemon: Daemon) -> None:
    port = daemon.wyoming_port()
    female, male = await speak_with(port, "jf_alpha"), await speak_with(port, "jm_kumo")
    assert median_pitch_hz(male.pcm(), 24000) < 0.8 * median_pitch_hz(female.pcm(), 24000)


async def test_unknown_voice_falls_back_to_the_default(daemon: Daemon) -> None:
    port = daemon.wyoming_port()
    default = median_pitch_hz((await speak_with(port, "jf_gongitsune")).pcm(), 24000)
    for voice in ("en_US-lessac-medium", None):  # another server's voice, or none at all
        pitch = median_pitch_hz((await speak_with(port, voice)).pcm(), 24000)
        assert pitch == pytest.approx(default, rel=0.03)  # jf_nezumi is 8 % lower, jf_alpha 10 % higher


async def test_a_streamed_reply_is_spoken_once_while_it_streams(daemon: Daemon) -> None:
    """Home Assistant's sequence: start, chunks as the LLM writes, the whole text again as a plain
    `synthesize` for servers that do not stream, then stop."""
    port = daemon.wyoming_port()
    async with AsyncTcpClient("127.0.0.1", port) as c:
        await c.write_event(Synthesize(text=REPLY).event())
        whole = await collect(c, "audio-stop")
    words = REPLY.split(" ")
    async with AsyncTcpClient("127.0.0.1", port) as c:
        reader = asyncio.create_task(collect(c, SynthesizeStopped().event().type))
        await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="jf_gongitsune")).event())
        for i in range(0, len(words), 3):
            await c.write_event(SynthesizeChunk(text=" ".join(words[i : i + 3]) + " ").event())
            await asyncio.sleep(0.15)  # an LLM's pace: the first sentence is spoken meanwhile
        await c.write_event(Synthesize(text=REPLY).event())
        stop_sent = time.perf_counter()
        await c.write_event(SynthesizeStop().event())
        streamed = await reader
    assert streamed.types[0] == "audio-start" and streamed.types.count("audio-start") == 1
    assert streamed.types[-2:] == ["audio-stop", "synthesize-stopped"] and not streamed.errors
    assert streamed.first_audio_at is not None and streamed.first_audio_at < stop_sent
    # Spoken once: as long as the whole text spoken alone (not twice as long).
    assert streamed.seconds == pytest.approx(whole.seconds, rel=0.15)
    assert errors_in(REPLY, streamed) <= 4


async def test_a_dropped_stream_cancels_its_work(daemon: Daemon) -> None:
    port = daemon.wyoming_port()
    async with AsyncTcpClient("127.0.0.1", port) as c:
        await c.write_event(SynthesizeStart().event())
        await c.write_event(SynthesizeChunk(text=LONG).event())
        event = await asyncio.wait_for(c.read_event(), 30)  # audio is flowing
        assert event is not None and event.type == "audio-start"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, metrics = daemon.get("/metrics")
        if status == 200 and re.search(r"^speakd_contexts 0(\.0)?$", metrics, re.M):
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("the dropped stream's context is still open:\n" + metrics)
    async with AsyncTcpClient("127.0.0.1", port) as c:  # and the daemon serves the next one
        await c.write_event(Synthesize(text=SENTENCE).event())
        assert (await collect(c, "audio-stop")).seconds > 1.0


async def test_events_without_data_and_unknown_events_are_taken_in_stride(daemon: Daemon) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.wyoming_port())
    try:
        writer.write(b'{"type": "ping-from-the-future", "data": {"x": 1}}\n')
        writer.write(b'{"type": "transcript", "data_length": 14}\n{"text": "hi"}')
        writer.write(b'{"type": "describe"}\n')  # no data block at all
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        assert b'"type": "info"' in line or b'"type":"info"' in line
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        (b"this is not json\n", "bad_message"),
        (b'{"type": "synthesize", "data_length": 999999999}\n', "message_too_large"),
        (b'{"data": {}}\n', "bad_message"),
        (b"{" + b"x" * 20000 + b"\n", "message_too_large"),
    ],
)
async def test_malformed_events_get_an_error_and_a_closed_connection(
    daemon: Daemon, garbage: bytes, code: str
) -> None:
    port = daemon.wyoming_port()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(garbage)  # raw bytes: the package's client would never write them
        await writer.drain()
        event = await asyncio.wait_for(async_read_event(reader), 5)
        assert event is not None and Error.is_type(event.type), event
        assert Error.from_event(event).code == code
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
    finally:
        writer.close()
    async with AsyncTcpClient("127.0.0.1", port) as c:  # the daemon is unharmed
        await c.write_event(Describe().event())
        assert Info.is_type((await asyncio.wait_for(c.read_event(), 5) or Event("none")).type)


async def test_text_beyond_the_limit_gets_an_error(tmp_path: Path, model_cache: Path) -> None:
    config = "[limits]\nmax_buffered_text_chars = 200\nadmission_headroom = 0\n"
    d = Daemon(tmp_path, model_cache, config, args=["--wyoming", "0"])
    try:
        d.wait_ready()
        async with AsyncTcpClient("127.0.0.1", d.wyoming_port()) as c:
            await c.write_event(Synthesize(text=LONG).event())
            event = await asyncio.wait_for(c.read_event(), 10)
            assert event is not None and Error.is_type(event.type)
            assert Error.from_event(event).code == "text_too_long"
    finally:
        assert d.stop() == 0, "".join(d.log)


def test_a_remote_wyoming_address_needs_an_explicit_opt_in(tmp_path: Path, model_cache: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with pytest.raises(RuntimeError, match="allow_remote"):
        Daemon(tmp_path, model_cache, args=["--wyoming", f"0.0.0.0:{free}"])


async def resolve(name: str, timeout_ms: int) -> AsyncServiceInfo | None:
    """The announced `_wyoming._tcp` service `name`, asked for by a fresh mDNS client (no cache)."""
    zeroconf = AsyncZeroconf()
    try:
        info = AsyncServiceInfo("_wyoming._tcp.local.", f"{name}._wyoming._tcp.local.")
        return info if await info.async_request(zeroconf.zeroconf, timeout_ms) else None
    finally:
        await zeroconf.async_close()


async def test_zeroconf_announces_a_reachable_address_and_withdraws_it(
    tmp_path: Path, model_cache: Path
) -> None:
    name = f"speakd-e2e-{os.getpid()}"
    config = f'[limits]\nadmission_headroom = 0\n[wyoming]\nzeroconf = true\nzeroconf_name = "{name}"\n'
    d = Daemon(tmp_path, model_cache, config, args=["--wyoming", "0.0.0.0:0", "--wyoming-allow-remote"])
    try:
        d.wait_ready()
        port = d.wyoming_port()
        assert any("not loopback" in line for line in d.log)  # the no-authentication warning
        info = None
        for _ in range(10):  # the announcement follows the listener
            if info := await resolve(name, 1000):
                break
        assert info is not None, "".join(d.log)
        addresses = [socket.inet_ntoa(address) for address in info.addresses]
        assert info.port == port and addresses and "0.0.0.0" not in addresses
        async with AsyncTcpClient(addresses[0], port) as c:  # Home Assistant can reach what it finds
            await c.write_event(Describe().event())
            event = await asyncio.wait_for(c.read_event(), 5)
            assert event is not None and Info.is_type(event.type)
    finally:
        assert d.stop() == 0, "".join(d.log)
    assert await resolve(name, 1500) is None  # withdrawn when the daemon stops


async def test_word_timing_is_an_opt_in_extension(daemon: Daemon) -> None:
    """`speakd_words` in `synthesize-start`: a `speakd-words` event before each segment's audio,
    timed on the chunks' clock, spans into the text sent; never without it."""
    port = daemon.wyoming_port()
    words_of: list[list[dict[str, object]]] = []
    async with AsyncTcpClient("127.0.0.1", port) as c:
        start = SynthesizeStart().event()
        start.data["speakd_words"] = True
        await c.write_event(start)
        pieces = REPLY.split(" ")
        for i in range(0, len(pieces), 4):
            await c.write_event(SynthesizeChunk(text=" ".join(pieces[i : i + 4]) + " ").event())
        await c.write_event(SynthesizeStop().event())
        types: list[str] = []
        chunk_ms: list[int] = []
        audio_ms = 0.0
        async with asyncio.timeout(120):
            while (event := await c.read_event()) is not None and event.type != "synthesize-stopped":
                types.append(event.type)
                if event.type == "speakd-words":
                    words_of.append(event.data["words"])
                    # The segment's words come before its audio: after every chunk so far.
                    assert all(w["start_ms"] >= audio_ms - 0.5 for w in event.data["words"])
                elif AudioChunk.is_type(event.type):
                    chunk = AudioChunk.from_event(event)
                    chunk_ms.append(chunk.timestamp or 0)
                    audio_ms += len(chunk.audio) / 2 / chunk.rate * 1000
    assert types[0] == "audio-start" and types[1] == "speakd-words" and types[-1] == "audio-stop"
    assert len(words_of) >= 2
    sent = "".join(" ".join(pieces[i : i + 4]) + " " for i in range(0, len(pieces), 4))
    words = [w for segment in words_of for w in segment]
    assert [w["word"] for w in words] == re.findall(r"[\w']+", REPLY)
    assert all(sent[w["char_start"] : w["char_end"]] == w["word"] for w in words)  # type: ignore[misc]
    assert all(0 <= w["start_ms"] < w["end_ms"] <= audio_ms for w in words)  # type: ignore[operator]
    assert chunk_ms == sorted(chunk_ms)
    async with AsyncTcpClient("127.0.0.1", port) as c:
        plain = Synthesize(text=SENTENCE).event()
        await c.write_event(plain)
        reply = await collect(c, "audio-stop")
        assert "speakd-words" not in reply.types
        bad = Synthesize(text=SENTENCE).event()
        bad.data["speakd_words"] = "yes"
        await c.write_event(bad)
        refused = await collect(c, "error")
        assert "speakd_words" in refused.errors[0].text and "audio-start" not in refused.types


async def test_a_live_stream_keeps_pace_by_skipping_whole_captions(daemon: Daemon) -> None:
    """`speakd_max_lag_ms` in `synthesize-start`: captions faster than the voice are spoken within the
    bound, the oldest skipped whole and told by `speakd-skipped` spans; spoken and skipped together
    are every caption once, in order. Bad values get an `error` and no audio."""
    port = daemon.wyoming_port()
    bound_s = 3.0
    sent, sent_at = "", []
    async with AsyncTcpClient("127.0.0.1", port) as c:
        start = SynthesizeStart().event()
        start.data.update(speakd_max_lag_ms=int(bound_s * 1000), speakd_max_speed=1.4, speakd_words=True)
        await c.write_event(start)
        events: list[tuple[float, Event]] = []

        async def read() -> None:
            async with asyncio.timeout(240):
                while (event := await c.read_event()) is not None:
                    events.append((time.perf_counter(), event))
                    if event.type == "synthesize-stopped":
                        return

        reader = asyncio.create_task(read())
        for caption in CAPTIONS:
            sent_at.append(time.perf_counter())
            await c.write_event(SynthesizeChunk(text=caption + " ").event())
            sent += caption + " "
            await asyncio.sleep(0.5)
        await c.write_event(SynthesizeStop().event())
        await reader
    types = [event.type for _, event in events]
    assert "error" not in types and types[-2:] == ["audio-stop", "synthesize-stopped"]
    skips = [(e.data["char_start"], e.data["char_end"]) for _, e in events if e.type == "speakd-skipped"]
    assert skips, "12 captions in 6 s are 35 s of speech: some must be skipped"
    # Words spoken and text skipped, in the order they came, rebuild every caption exactly once.
    pieces: list[str] = []
    clock, rate, playing = 0.0, 24000, None
    lags: list[float] = []
    for arrived, event in events:
        if event.type == "speakd-skipped":
            start_char, end_char = event.data["char_start"], event.data["char_end"]
            assert sent[start_char:end_char].endswith(".") and (
                start_char == 0 or sent[start_char - 1] == " "
            )
            pieces.append(sent[start_char:end_char])
        elif event.type == "speakd-words":
            words = event.data["words"]
            pieces.extend(sent[w["char_start"] : w["char_end"]] for w in words)
            playing = sent_at[sent[: words[0]["char_start"]].count(". ")] if words else None
        elif AudioChunk.is_type(event.type):
            chunk = AudioChunk.from_event(event)
            # A listener playing in real time from 100 ms after the first chunk.
            clock = max(clock, arrived) if clock else arrived + 0.1
            if playing is not None:
                lags.append(clock - playing)  # this caption's first audio plays now
                playing = None
            clock += len(chunk.audio) / 2 / rate
    assert re.findall(r"[\w']+", " ".join(pieces)) == re.findall(r"[\w']+", sent)
    assert lags and max(lags) <= bound_s + 1.5, lags
    async with AsyncTcpClient("127.0.0.1", port) as c:
        for data, expected in (
            ({"speakd_max_lag_ms": "3000"}, "speakd_max_lag_ms"),
            ({"speakd_max_lag_ms": 400}, "max_lag_ms"),
            ({"speakd_max_lag_ms": 3000, "speakd_max_speed": 9}, "max_speed"),
            ({"speakd_max_speed": 1.2}, "speakd_max_lag_ms"),
        ):
            bad = SynthesizeStart().event()
            bad.data.update(data)
            await c.write_event(bad)
            refused = await collect(c, "error")
            assert expected in refused.errors[0].text and "audio-start" not in refused.types
            await c.write_event(SynthesizeStop().event())  # the refused stream's stop is dropped quietly
        whole = Synthesize(text=SENTENCE).event()
        whole.data["speakd_max_lag_ms"] = 3000
        await c.write_event(whole)
        refused = await collect(c, "error")
        assert "synthesize-start" in refused.errors[0].text
