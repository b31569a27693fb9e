"""Keeping a live context's lag bounded (server/core/pace.py, live.py and the utterance's live mode).

The policy is tested on its own with made-up segments, then through the real core on a fake engine
whose audio lasts what the speed asks, fed faster and slower than it can speak.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from core_fakes import FakeEngine, running_core
from test_core import open_pcm, stream_for

from speakd.server.core.errors import RequestRefused
from speakd.server.core.events import AudioChunk, Event, Finished, SegmentStarted, Skipped
from speakd.server.core.live import LiveHold
from speakd.server.core.pace import HeldSegment, Pace, decide
from speakd.server.core.segmenter import Located
from speakd.server.engines.kokoro.engine import SAMPLES_PER_FRAME, AcousticFeatures, AcousticRequest

PACE = Pace(max_lag_s=4.0, max_speed=1.4)


def held(*spec: tuple[float, bool], length: int = 28) -> list[HeldSegment]:
    """Segments of `length` characters arriving at the given times, each ending a sentence or not."""
    return [HeldSegment("x" * length, i * length, arrival, ends) for i, (arrival, ends) in enumerate(spec)]


def two_seconds(segment: HeldSegment) -> float:
    return 2.0


def test_within_the_bound_nothing_changes() -> None:
    d = decide(
        PACE, 1.0, now=10.0, ahead_s=0.5, held=held((9.5, True)), seconds=two_seconds, mid_sentence=False
    )
    assert (d.skip, d.speed) == (0, 1.0)


def test_speed_rises_smoothly_as_the_lag_nears_the_bound() -> None:
    speeds = []
    for ahead in (1.0, 2.6, 3.0, 3.4, 3.8, 4.0):
        d = decide(PACE, 1.0, 10.0, ahead, held((10.0, True)), two_seconds, mid_sentence=False)
        speeds.append(d.speed)
        assert d.skip == 0
    assert speeds[0] == 1.0 and speeds[-1] == pytest.approx(1.4)
    assert speeds == sorted(speeds) and len(set(speeds)) >= 4
    # Past the bound even the newest sentence is stale: skipped, and the listener waits for newer text.
    late = decide(PACE, 1.0, 10.0, 4.2, held((10.0, True)), two_seconds, mid_sentence=False)
    assert late.skip == 1


def test_a_backlog_is_played_faster_before_anything_is_skipped() -> None:
    # Three sentences waiting, just arrived: at speed 1 the last would start 4 s late, at 1.4 in 2.9 s.
    d = decide(
        PACE, 1.0, 10.0, 0.0, held((10.0, True), (10.0, True), (10.0, True)), two_seconds, mid_sentence=False
    )
    assert d.skip == 0 and 1.0 < d.speed <= 1.4


def test_still_behind_at_full_speed_the_oldest_whole_sentences_are_skipped() -> None:
    # Six sentences of 2 s from 12 s ago: even at 1.4x the newest would start far past the bound.
    segments = held(*[(-2.0, True)] * 5, (9.0, True))
    d = decide(PACE, 1.0, 10.0, 1.0, segments, two_seconds, mid_sentence=False)
    assert d.skip == 5  # only the newest is left: it is in time


def test_skips_take_whole_sentences_and_never_the_rest_of_one_begun() -> None:
    # A sentence cut in two (a clause, then its rest), then two more sentences, all late.
    segments = held((0.0, False), (0.0, True), (0.0, True), (9.9, True))
    d = decide(PACE, 1.0, 10.0, 2.0, segments, two_seconds, mid_sentence=False)
    assert d.skip in (2, 3)  # the cut sentence goes whole, never just its clause
    begun = decide(PACE, 1.0, 10.0, 2.0, segments[1:], two_seconds, mid_sentence=True)
    assert begun.skip == 0 and begun.speed == pytest.approx(1.4)


class SpeedEngine(FakeEngine):
    """A segment lasts `frames` 25 ms frames at speed 1, fewer when faster; remembers the speeds."""

    def __init__(self, frames: int) -> None:
        super().__init__(frames)
        self.speeds: list[float] = []

    def acoustic(self, batch: Sequence[AcousticRequest]) -> list[AcousticFeatures]:
        out = []
        for request in batch:
            self.speeds.append(request.speed)
            frames = max(1, round(self.frames / request.speed))
            durations = np.zeros(len(request.tokens) + 2, np.int64)
            durations[1] = frames
            curve = np.zeros((1, 2 * frames), np.float32)
            out.append(
                AcousticFeatures(np.zeros((1, 1, frames), np.float32), curve, curve, request.style, durations)
            )
        return out

    def vocode(self, batch: Sequence[AcousticFeatures]) -> list[npt.NDArray[np.float32]]:
        return [np.full(f.frames * SAMPLES_PER_FRAME, 0.1, np.float32) for f in batch]


async def live_run(
    engine: SpeedEngine, pace: Pace, sentences: int, every_s: float
) -> tuple[str, list[tuple[float, Event]]]:
    """Feed `sentences` at one per `every_s` into a live utterance; each event with when it came."""
    pieces = [f"Sentence number {k} is right here now. " for k in range(sentences)]
    return await live_feed(engine, pace, pieces, every_s)


async def live_feed(
    engine: SpeedEngine, pace: Pace, pieces: list[str], every_s: float
) -> tuple[str, list[tuple[float, Event]]]:
    """Feed `pieces` at one per `every_s` into a live utterance; each event with when it came."""
    async with running_core(engine=engine) as core:
        stream = stream_for(core)
        session = core.admit(stream)
        utterance = open_pcm(session, "live", pace=pace)
        text = ""
        events: list[tuple[float, Event]] = []

        async def read() -> None:
            async for event in stream:
                events.append((time.monotonic(), event))

        reader = asyncio.create_task(read())
        for piece in pieces:
            utterance.feed(piece)
            text += piece
            await asyncio.sleep(every_s)
        utterance.end()
        await asyncio.wait_for(reader, 30)
        session.close()
        return text, events


def spoken_and_skipped(text: str, events: list[tuple[float, Event]]) -> list[tuple[str, str]]:
    out = []
    for _, event in events:
        if isinstance(event, SegmentStarted):
            out.append(("spoken", event.text))
        elif isinstance(event, Skipped):
            out.append(("skipped", text[event.char_start : event.char_end]))
    return out


async def test_a_source_faster_than_the_voice_is_sped_up_then_skipped_with_the_lag_bounded() -> None:
    engine = SpeedEngine(frames=60)  # 1.5 s per sentence at speed 1; one arrives every 0.5 s
    text, events = await live_run(engine, Pace(max_lag_s=2.0, max_speed=1.4), sentences=16, every_s=0.5)
    parts = spoken_and_skipped(text, events)
    assert any(kind == "skipped" for kind, _ in parts) and max(engine.speeds) == pytest.approx(1.4)
    # Every sentence is either spoken or skipped, whole, once, in order.
    sentences = [f"Sentence number {k} is right here now." for k in range(16)]
    accounted = " ".join(piece for _, piece in parts)
    assert accounted.split() == " ".join(sentences).split()
    # Lag: a segment plays when the audio before it has played from the first audio on.
    arrivals = {sentence: 0.5 * k for k, sentence in enumerate(sentences)}
    first_audio = next(t for t, e in events if isinstance(e, AudioChunk))
    start = events[0][0] - 0.0
    for when, event in events:
        if isinstance(event, SegmentStarted):
            plays_at = max(when, first_audio + event.start_ms / 1000)
            lag = plays_at - (start + arrivals[event.text])
            assert lag <= 2.0 + 0.6, (event.text, lag)  # the bound, plus this loop's own timing slack
    assert isinstance(events[-1][1], Finished)


async def test_a_source_slower_than_the_voice_is_spoken_whole_at_its_own_speed() -> None:
    engine = SpeedEngine(frames=20)  # 0.5 s per sentence; one arrives every 0.7 s
    text, events = await live_run(engine, Pace(max_lag_s=2.0, max_speed=1.4), sentences=6, every_s=0.7)
    assert all(kind == "spoken" for kind, _ in spoken_and_skipped(text, events))
    assert set(engine.speeds) == {1.0}


async def test_a_bound_too_tight_or_a_ceiling_too_high_is_refused() -> None:
    async with running_core() as core:
        session = core.admit(stream_for(core))
        for pace in (Pace(0.5, 1.4), Pace(3.0, 0.9), Pace(3.0, 2.5)):
            with pytest.raises(RequestRefused, match="max_"):
                open_pcm(session, "x", pace=pace)
        session.close()


async def test_a_slow_source_sent_word_by_word_is_spoken_whole_at_its_own_speed() -> None:
    """A sentence is dated by its last word, when it could first be spoken: long sentences arriving
    word by word more slowly than they are read are neither sped up nor skipped."""
    engine = SpeedEngine(frames=24)  # 0.6 s per segment
    sentence = "One two three four five six seven eight nine ten eleven. "
    pieces = [word + " " for _ in range(3) for word in sentence.split()]
    text, events = await live_feed(engine, Pace(max_lag_s=2.0, max_speed=1.4), pieces, every_s=0.15)
    assert [kind for kind, _ in spoken_and_skipped(text, events)] == ["spoken"] * 3
    assert set(engine.speeds) == {1.0}  # 11 words take 1.65 s to arrive: dated by the first, sped up


async def test_text_without_sentence_ends_is_cut_once_it_has_waited_for_the_bound() -> None:
    """Captions without punctuation are spoken in pieces cut at word boundaries, the first soon after
    it has waited for the bound, not held back until the end."""
    engine = SpeedEngine(frames=8)
    words = [f"word{k} " for k in range(40)]
    began = time.monotonic()
    text, events = await live_feed(engine, Pace(max_lag_s=1.5, max_speed=1.4), words, every_s=0.1)
    spoken = [when - began for when, event in events if isinstance(event, SegmentStarted)]
    assert len(spoken) >= 3
    assert 1.4 <= spoken[0] <= 2.5, spoken  # 4 s of words arrive; the first cut waits 1.5 s, not 4
    # Each piece is whole words; spoken and skipped are all the words once, in order.
    parts = spoken_and_skipped(text, events)
    assert " ".join(piece for _, piece in parts).split() == text.split()


def test_a_live_hold_keeps_nothing_of_what_it_has_spoken() -> None:
    """Hours of text: what a live hold keeps stays the size of what it holds now."""
    live = LiveHold(Pace(max_lag_s=3.0, max_speed=1.4), 1.0)
    fed, now = 0, 0.0
    for k in range(50_000):
        piece = f"Caption {k} here. "
        live.arrived(piece, now)
        live.hold(Located(piece.strip(), fed, True))
        fed += len(piece)
        now += 0.5
        handover = live.next(now, ahead_s=1.0)
        assert handover.segment is not None or handover.skipped
        assert not live and live.chars == 0 and len(live._arrivals) <= 2


async def test_a_source_without_sentence_ends_falling_behind_is_skipped_piece_by_piece() -> None:
    """No sentence ever ends, so none could be skipped whole: once one has been spoken for longer
    than the bound, its parts are skipped like sentences, and the words are each spoken or skipped."""
    engine = SpeedEngine(frames=120)  # every piece lasts 3 s; one is cut about every 1.5 s
    words = [f"word{k} " for k in range(90)]
    text, events = await live_feed(engine, Pace(max_lag_s=1.5, max_speed=1.4), words, every_s=0.1)
    parts = spoken_and_skipped(text, events)
    assert any(kind == "skipped" for kind, _ in parts)
    assert " ".join(piece for _, piece in parts).split() == text.split()
