"""Admission by measured capacity, end to end: a real daemon on the embedded model measures what a
stream costs, and refuses one stream too many through both doors (the protocol's `overloaded` with
`retry_after_ms`, the OpenAI SDK's 503 with Retry-After) while the stream already playing goes on
undisturbed; with `limits.admission = "queue"` the one too many waits instead, and speaks once the
playing stream is gone."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from daemon import Client, Daemon, client

from speakd.protocol import AudioCodec, Cancel, DoneReason, End, Error, ErrorCode, Start, Started, Text

pytestmark = pytest.mark.e2e

# About a minute and a half of speech: the stream is still playing when the test is done with it.
LONG_TEXT = (
    "There are a few reasons your sourdough might not be rising, and the most common one is a starter "
    "that isn't active enough yet. Feed it twice a day for a few days and keep it somewhere warm. "
    "When it doubles within six hours of a feeding, it is ready to bake with. "
) * 4


def start_daemon(tmp: Path, model_cache: Path, config: str = "") -> Daemon:
    # A headroom this low leaves room for one stream on any machine that keeps fewer than ~6 real-time
    # streams; the tests read the measured capacity and skip where the machine is faster than that.
    d = Daemon(tmp, model_cache, "[limits]\nadmission_headroom = 0.3\n" + config)
    d.wait_ready()
    return d


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("admission"), model_cache)
    yield d
    assert d.stop() == 0, "".join(d.log)


@pytest.fixture(scope="module")
def queueing_daemon(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("admission-queue"), model_cache, 'admission = "queue"\n')
    yield d
    assert d.stop() == 0, "".join(d.log)


def gauge(daemon: Daemon, name: str) -> float:
    with urllib.request.urlopen(daemon.http + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


async def play_long_until_measured(daemon: Daemon, playing: Client) -> None:
    """Start the long stream on `playing` and read it until the daemon has measured its capacity;
    skips where that capacity admits a second stream even at a headroom of 0.3."""
    await playing.send(Start(context="long", codec=AudioCodec.PCM16))
    await playing.send(Text(context="long", text=LONG_TEXT))
    deadline = time.monotonic() + 120
    while (capacity := await asyncio.to_thread(gauge, daemon, "speakd_capacity_streams")) == 0:
        assert time.monotonic() < deadline, "the daemon never measured its capacity"
        await playing.recv()
    if capacity * 0.3 >= 2:
        pytest.skip(f"this machine keeps {capacity:.1f} streams: a headroom of 0.3 admits two")


async def test_one_stream_too_many_is_refused_and_the_playing_one_goes_on(daemon: Daemon) -> None:
    async with client(daemon.url) as playing, client(daemon.url) as late:
        await play_long_until_measured(daemon, playing)
        # The load autoscalers read: one stream's share of what this box keeps (read apart, so the
        # measured capacity may drift a little between the two gauges), not a saturated box.
        load = await asyncio.to_thread(gauge, daemon, "speakd_load")
        capacity = await asyncio.to_thread(gauge, daemon, "speakd_capacity_streams")
        assert load == pytest.approx(1 / capacity, rel=0.25)

        await late.send(Start(context="late", codec=AudioCodec.PCM16))
        error = await late.until("late", Error)
        assert isinstance(error, Error) and error.code is ErrorCode.OVERLOADED
        assert "retry in" in error.message and "stream is playing" in error.message
        assert error.retry_after_ms is not None and error.retry_after_ms >= 1000

        sdk = openai.AsyncOpenAI(base_url=daemon.http + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as refused:
            await sdk.audio.speech.create(model="tts-1", voice="alloy", input="Me too, please.")
        assert refused.value.status_code == 503
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert "at capacity" in refused.value.message

        # The refusals took nothing from the playing stream: its audio keeps coming.
        before = len(playing.utterance("long").audio)
        while len(playing.utterance("long").audio) <= before:
            await playing.recv()
        assert playing.utterance("long").done is None
        await playing.send(Cancel(context="long"))
        await playing.until_done("long")

        # Its place is free again: the same late client now gets its audio.
        await late.send(Start(context="late", codec=AudioCodec.PCM16))
        await late.send(Text(context="late", text="Now there is room for me."))
        await late.send(End(context="late"))
        await late.until_done("late")
        done = late.utterance("late").done
        assert done is not None and done.audio_ms > 500


async def test_in_queue_mode_one_stream_too_many_waits_and_speaks_once_there_is_room(
    queueing_daemon: Daemon,
) -> None:
    daemon = queueing_daemon
    async with client(daemon.url) as playing, client(daemon.url) as late:
        await play_long_until_measured(daemon, playing)

        # Answered at once; its text is taken and held while it waits for a place.
        await late.send(Start(context="late", codec=AudioCodec.PCM16))
        await late.send(Text(context="late", text="Now there is room for me."))
        await late.send(End(context="late"))
        assert isinstance(await late.until("late", Started, timeout=10), Started)
        assert await asyncio.to_thread(gauge, daemon, "speakd_admission_queued") == 1

        # It waits while the long stream plays on: no audio of its own, no error.
        before = len(playing.utterance("long").audio)
        waited_until = time.monotonic() + 2
        while time.monotonic() < waited_until:
            await playing.recv()
        assert len(playing.utterance("long").audio) > before
        assert late.utterance("late").order == ["started"]
        assert await asyncio.to_thread(gauge, daemon, "speakd_admission_queued") == 1

        await playing.send(Cancel(context="long"))
        await playing.until_done("long")
        await late.until_done("late")
        waited = late.utterance("late")
        assert waited.errors == [] and waited.done is not None and waited.done.reason is DoneReason.END
        assert waited.done.audio_ms > 500 and waited.segments[0].text == "Now there is room for me."
        assert await asyncio.to_thread(gauge, daemon, "speakd_admission_queued") == 0
