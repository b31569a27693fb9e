"""A live context through a real daemon (issue 12, native protocol): captions faster than the voice
reads are sped up and their oldest sentences skipped whole, each skip reported with its span, and the
lag stays near its bound; captions slower than the voice are all spoken."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from captions import CAPTIONS
from daemon import Daemon, Utterance, client

from speakd.protocol import AudioCodec, DoneReason, End, Error, ErrorCode, Start, Text

pytestmark = pytest.mark.e2e

BOUND_MS = 3000


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("live"), model_cache, "[limits]\nadmission_headroom = 0\n")
    d.wait_ready()
    yield d
    assert d.stop() == 0, "".join(d.log)


async def live(url: str, captions: list[str], every_s: float) -> tuple[str, list[float], Utterance]:
    """Send one caption every `every_s`, as a live source does; the text, when each was sent, and
    what came back."""
    text, sent_at = "", []
    async with client(url) as c:
        await c.send(Start(context="tv", codec=AudioCodec.PCM16, max_lag_ms=BOUND_MS, max_speed=1.4))

        async def read() -> None:
            await c.until_done("tv", timeout=240)

        reader = asyncio.create_task(read())
        for caption in captions:
            sent_at.append(time.perf_counter())
            await c.send(Text(context="tv", text=caption + " "))
            text += caption + " "
            await asyncio.sleep(every_s)
        await c.send(End(context="tv"))
        await reader
        return text, sent_at, c.utterance("tv")


def play_times(u: Utterance) -> dict[int, float]:
    """When a player that starts 100 ms after the first frame and plays in real time would start
    each segment's first frame."""
    assert u.started is not None
    clock = u.audio_arrivals[0] + 0.1
    starts: dict[int, float] = {}
    for arrival, audio in zip(u.audio_arrivals, u.audio, strict=True):
        clock = max(clock, arrival)
        starts.setdefault(audio.segment, clock)
        clock += audio.samples / u.started.sample_rate
    return starts


def test_captions_faster_than_the_voice_are_skipped_whole_and_the_lag_stays_bounded(daemon: Daemon) -> None:
    text, sent_at, u = asyncio.run(live(daemon.url, CAPTIONS, every_s=0.5))
    assert u.started is not None and u.started.max_lag_ms == BOUND_MS
    assert u.done is not None and u.done.reason is DoneReason.END and not u.errors
    assert u.skipped, "12 captions in 6 s are 35 s of speech: some must be skipped"
    # Each skip is whole captions; spoken and skipped, in order, are every caption exactly once.
    pieces: list[str] = []
    segments, skipped = iter(u.segments), iter(u.skipped)
    for kind in u.order:
        if kind == "segment":
            pieces.append(next(segments).text)
        elif kind == "skipped":
            skip = next(skipped)
            pieces.append(text[skip.char_start : skip.char_end])
    assert " ".join(pieces).split() == " ".join(CAPTIONS).split()
    for skip in u.skipped:
        assert text[skip.char_start : skip.char_end].endswith(".")
        assert skip.char_start == 0 or text[skip.char_start - 1] == " "
    # Lag: from a caption's sending to its audio playing, for every caption spoken.
    plays = play_times(u)
    for segment in u.segments:
        caption = CAPTIONS.index(segment.text)
        lag = plays[segment.segment] - sent_at[caption]
        assert lag <= BOUND_MS / 1000 + 1.5, (segment.text, lag)


def test_captions_slower_than_the_voice_are_all_spoken(daemon: Daemon) -> None:
    captions = CAPTIONS[:4]
    _, _, u = asyncio.run(live(daemon.url, captions, every_s=3.6))
    assert u.done is not None and u.done.reason is DoneReason.END
    assert u.skipped == [] and [s.text for s in u.segments] == captions


def test_a_bound_too_tight_is_refused(daemon: Daemon) -> None:
    async def attempt() -> Error:
        async with client(daemon.url) as c:
            await c.send(Start(context="x", max_lag_ms=400))
            reply = await c.recv()
            assert isinstance(reply, Error)
            return reply

    error = asyncio.run(attempt())
    assert error.code is ErrorCode.INVALID_PARAM and "max_lag_ms" in error.message
