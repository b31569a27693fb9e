"""The synthesis core, tested once for every door: admission, validation, the text budget,
segmentation, event order, cancel reaching every stage, back-pressure from a slow reader, shutdown.

The core runs the real pipeline on a fake model (tests/core_fakes.py); its sink is the real
`EventStream` the HTTP doors read from.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import pytest
from core_fakes import VOICE, FakeEngine, GatedEngine, TokenFrameEngine, running_core

from speakd.protocol import DoneReason, ErrorCode
from speakd.server.audio.encoders import Pcm16FrameEncoder
from speakd.server.core.errors import Busy, RequestRefused
from speakd.server.core.event_stream import EventStream
from speakd.server.core.events import AudioChunk, Event, Failed, Finished, SegmentStarted, SegmentWords
from speakd.server.core.pace import Pace
from speakd.server.core.synthesis import Session, SynthesisCore
from speakd.server.core.utterance import Utterance
from speakd.server.engines.kokoro.engine import AcousticFeatures
from speakd.server.pipeline.capacity import CapacityMeter

FRAME_BYTES = 960  # 20 ms of PCM16 at 24 kHz


def open_pcm(
    session: Session,
    name: str = "u",
    voice: str | None = None,
    lang: str = "en-us",
    *,
    words: bool = False,
    pace: Pace | None = None,
) -> Utterance:
    return session.open(
        name,
        voice=voice,
        lang=lang,
        speed=1.0,
        encoder=lambda: Pcm16FrameEncoder(24000, 20),
        sample_rate=24000,
        words=words,
        pace=pace,
    )


def stream_for(core: SynthesisCore, limit_bytes: int = 1 << 20) -> EventStream:
    return EventStream(limit_bytes, core.pipeline.wake)


async def collect(stream: EventStream, limit_s: float = 10.0) -> list[Event]:
    """Every event up to `Finished`; the limit only fires on a hang."""

    async def gather() -> list[Event]:
        return [event async for event in stream]

    return await asyncio.wait_for(gather(), limit_s)


async def wait_until(condition: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Poll `condition`; the limit only fires on a hang."""
    for _ in range(int(limit_s / 0.002)):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition not reached")


def segments(events: list[Event]) -> list[str]:
    return [event.text for event in events if isinstance(event, SegmentStarted)]


# -- admission and validation ----------------------------------------------------------------------


async def test_sessions_are_counted_at_admission_and_released_on_close() -> None:
    async with running_core({"limits.max_connections": 2}) as core:
        first, second = core.admit(stream_for(core)), core.admit(stream_for(core))
        with pytest.raises(Busy, match="at most 2"):
            core.admit(stream_for(core))
        assert core.metrics.connections.value == 2.0
        first.close()
        first.close()  # idempotent: the place is given back once
        third = core.admit(stream_for(core))
        assert core.sessions == 2 and core.metrics.connections.value == 2.0
        second.close()
        third.close()
        assert core.sessions == 0


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"voice": "nobody"}, ErrorCode.UNKNOWN_VOICE),
        ({"lang": "xx"}, ErrorCode.INVALID_PARAM),
    ],
)
async def test_an_utterance_asking_for_what_the_model_lacks_is_refused(
    kwargs: dict[str, str], code: ErrorCode
) -> None:
    async with running_core() as core:
        session = core.admit(stream_for(core))
        with pytest.raises(RequestRefused) as refused:
            open_pcm(session, **kwargs)
        assert refused.value.code is code and refused.value.context == "u"
        assert len(session) == 0 and core.metrics.contexts.value == 0.0
        assert open_pcm(session).voice == VOICE  # the default voice
        session.close()


async def test_duplicate_names_and_too_many_utterances_are_refused() -> None:
    async with running_core({"limits.max_contexts_per_connection": 2}) as core:
        session = core.admit(stream_for(core))
        open_pcm(session, "a")
        with pytest.raises(RequestRefused) as duplicate:
            open_pcm(session, "a")
        assert duplicate.value.code is ErrorCode.DUPLICATE_CONTEXT
        open_pcm(session, "b")
        with pytest.raises(RequestRefused) as too_many:
            open_pcm(session, "c")
        assert too_many.value.code is ErrorCode.TOO_MANY_CONTEXTS
        session.close()
        assert core.metrics.contexts.value == 0.0


# -- text in, events out -----------------------------------------------------------------------


async def test_text_fed_in_pieces_comes_out_as_segments_then_done() -> None:
    async with running_core() as core:
        stream = stream_for(core)
        session = core.admit(stream)
        utterance = open_pcm(session)
        for token in [
            "The",
            "first",
            "sentence",
            "is",
            "here.",
            "And",
            "then",
            "a",
            "second",
            "one",
            "follows",
        ]:
            utterance.feed(token + " ")
        utterance.end()
        events = await collect(stream)
        assert segments(events) == ["The first sentence is here.", "And then a second one follows"]
        assert isinstance(events[0], SegmentStarted)
        audio = [event for event in events if isinstance(event, AudioChunk)]
        assert [chunk.seq for chunk in audio] == list(range(len(audio)))
        assert all(len(chunk.data) == FRAME_BYTES for chunk in audio)
        done = events[-1]
        assert isinstance(done, Finished) and done.reason is DoneReason.END and done.segments == 2
        assert done.audio_ms == pytest.approx(200.0)  # two fake segments of 100 ms
        assert len(session) == 0 and core.metrics.contexts.value == 0.0
        with pytest.raises(RequestRefused, match="has ended"):
            utterance.feed("more")
        session.close()


async def test_word_timing_follows_each_segment_start_on_the_utterance_timeline() -> None:
    # One 25 ms frame per character (tests/core_fakes.py), so each word's time follows from its place.
    text = "  Hi there. Second one?\nLast"
    async with running_core(engine=TokenFrameEngine()) as core:
        stream = stream_for(core)
        session = core.admit(stream)
        utterance = open_pcm(session, words=True)
        for i in range(0, len(text), 4):
            utterance.feed(text[i : i + 4])
        utterance.end()
        events = await collect(stream)
        kinds = [type(event).__name__ for event in events if not isinstance(event, AudioChunk)]
        assert kinds == ["SegmentStarted", "SegmentWords"] * 3 + ["Finished"]
        for i, event in enumerate(events):
            if isinstance(event, SegmentStarted):
                words = events[i + 1]
                assert isinstance(words, SegmentWords) and words.segment == event.index
                # Words come before the segment's first audio, and the segment's frames follow them.
                assert isinstance(events[i + 2], AudioChunk) and events[i + 2].segment == event.index
                for word in words.words:
                    assert text[word.char_start : word.char_end] == word.word
                    # The word's first character is token k of its segment: frame k, one frame early.
                    k = word.char_start - text.index(event.text)
                    assert word.start_ms == pytest.approx(event.start_ms + 25.0 * max(0, k - 1))
                    assert word.end_ms == pytest.approx(event.start_ms + 25.0 * (k - 1 + len(word.word)))
        timed = [w.word for e in events if isinstance(e, SegmentWords) for w in e.words]
        assert timed == ["Hi", "there.", "Second", "one?", "Last"]
        session.close()


async def test_without_words_no_word_timing_is_sent() -> None:
    async with running_core(engine=TokenFrameEngine()) as core:
        stream = stream_for(core)
        session = core.admit(stream)
        utterance = open_pcm(session)
        utterance.feed("Hello there. Bye.")
        utterance.end()
        events = await collect(stream)
        assert not any(isinstance(event, SegmentWords) for event in events)
        assert len(segments(events)) == 2
        session.close()


async def test_the_text_budget_refuses_text_and_takes_none_of_it() -> None:
    async with running_core({"limits.max_buffered_text_chars": 40}) as core:
        stream = stream_for(core)
        session = core.admit(stream)
        utterance = open_pcm(session)
        utterance.feed("twenty characters -- ")  # no sentence end: held by the segmenter
        with pytest.raises(RequestRefused) as refused:
            utterance.feed("and twenty-one more.")
        assert refused.value.code is ErrorCode.TEXT_TOO_LONG and "limit is 40" in refused.value.message
        assert utterance.held_chars == len("twenty characters -- ")
        utterance.feed("fits")
        utterance.end()
        events = await collect(stream)
        assert segments(events) == ["twenty characters -- fits"]
        session.close()


async def test_cancel_reaches_queued_work_in_every_stage_and_withdraws_unsent_audio() -> None:
    engine = GatedEngine()
    async with running_core(engine=engine) as core:
        stream = stream_for(core)
        session = core.admit(stream)
        utterance = open_pcm(session)
        utterance.feed("One. Two. Three. Four. Five. Six. Seven. Eight. ")
        await wait_until(lambda: sum(core.pipeline.depths().values()) >= 3)
        utterance.cancel()
        assert core.pipeline.depths() == dict.fromkeys(core.pipeline.stage_names, 0)
        engine.gate.set()
        events = await collect(stream)
        assert [type(event) for event in events] == [Finished]
        assert isinstance(events[0], Finished) and events[0].reason is DoneReason.CANCEL
        utterance.cancel()  # a second cancel is a no-op, not a second done
        await asyncio.sleep(0.05)
        assert stream.buffered_bytes == 0
        session.close()


async def test_abort_sends_its_error_before_done() -> None:
    async with running_core() as core:
        stream = stream_for(core)
        session = core.admit(stream)
        utterance = open_pcm(session)
        utterance.feed("Some words.")
        utterance.abort(ErrorCode.OVERLOADED, "too slow")
        events = await collect(stream)
        assert [type(event) for event in events] == [Failed, Finished]
        failed, done = events
        assert isinstance(failed, Failed) and failed.code is ErrorCode.OVERLOADED
        assert isinstance(done, Finished) and done.reason is DoneReason.ERROR
        assert core.metrics.errors.labels(code="overloaded").value == 1.0
        session.close()


async def test_a_session_closed_mid_utterance_leaves_no_work_and_no_gauges() -> None:
    engine = GatedEngine()
    async with running_core(engine=engine) as core:
        session = core.admit(stream_for(core))
        utterance = open_pcm(session)
        utterance.feed("One. Two. Three. Four. Five. Six. ")
        await wait_until(lambda: sum(core.pipeline.depths().values()) >= 2)
        session.close()
        assert utterance.closed
        assert core.pipeline.depths() == dict.fromkeys(core.pipeline.stage_names, 0)
        assert (core.metrics.contexts.value, core.metrics.connections.value) == (0.0, 0.0)
        engine.gate.set()


# -- back-pressure -----------------------------------------------------------------------


async def test_a_reader_that_does_not_read_stalls_only_its_own_utterance() -> None:
    """A stream with room for two frames: its utterance's work stops at the encoder and its lanes stay
    bounded, while another session's utterance goes all the way through. Reading resumes it."""
    async with running_core(lane_limit=2) as core:
        slow_stream = EventStream(2 * FRAME_BYTES, core.pipeline.wake)
        slow = open_pcm(core.admit(slow_stream), "slow")
        texts = [f"Sentence number {i} is right here." for i in range(12)]
        slow.feed(" ".join(texts))
        slow.end()
        await wait_until(lambda: slow_stream.buffered_bytes >= 2 * FRAME_BYTES)
        fast_stream = stream_for(core)
        fast = open_pcm(core.admit(fast_stream), "fast")
        fast.feed("A quick one. And another.")
        fast.end()
        fast_events = await collect(fast_stream)
        assert segments(fast_events) == ["A quick one.", "And another."]
        for stage, lanes in core.pipeline.lanes().items():
            if stage != "g2p":  # text waiting for G2P is bounded by the text budget instead
                assert all(count <= 2 + 1 for count in lanes.values()), (stage, lanes)
        # One segment's frames may land past the bound (a segment is encoded whole), never more.
        assert slow_stream.buffered_bytes <= 2 * FRAME_BYTES + 5 * FRAME_BYTES
        events = await collect(slow_stream)
        assert segments(events) == texts
        chunks = [event for event in events if isinstance(event, AudioChunk)]
        assert [chunk.seq for chunk in chunks] == list(range(len(texts) * 5))


# -- shutdown -----------------------------------------------------------------------


async def test_shutdown_lets_utterances_finish_then_refuses_new_ones() -> None:
    async with running_core() as core:
        stream = stream_for(core)
        session = core.admit(stream)
        utterance = open_pcm(session)
        utterance.feed("Finish this sentence please.")
        utterance.end()
        await asyncio.wait_for(core.shutdown(grace_s=30), 10)
        events = await collect(stream)
        assert isinstance(events[-1], Finished) and events[-1].reason is DoneReason.END
        with pytest.raises(RequestRefused) as refused:
            open_pcm(session, "late")
        assert refused.value.code is ErrorCode.SHUTTING_DOWN
        with pytest.raises(Busy):
            core.admit(stream_for(core))
        session.close()


async def test_shutdown_cuts_off_what_outlasts_the_grace_with_shutting_down() -> None:
    engine = GatedEngine()
    async with running_core(engine=engine) as core:
        stream = stream_for(core)
        session = core.admit(stream)
        utterance = open_pcm(session)
        utterance.feed("This never gets vocoded in time.")
        utterance.end()
        await core.shutdown(grace_s=0.05)
        engine.gate.set()
        events = await collect(stream)
        assert [type(event) for event in events] == [Failed, Finished]
        assert isinstance(events[0], Failed) and events[0].code is ErrorCode.SHUTTING_DOWN
        session.close()


async def test_shutdown_does_not_wait_out_the_grace_when_the_client_leaves() -> None:
    """Regression: a client that left during shutdown used to make it wait the whole grace period."""
    engine = GatedEngine()
    async with running_core(engine=engine) as core:
        session = core.admit(stream_for(core))
        utterance = open_pcm(session)
        utterance.feed("Held in the vocoder.")
        utterance.end()
        stopping = asyncio.create_task(core.shutdown(grace_s=600))
        await asyncio.sleep(0.05)
        assert not stopping.done()
        session.close()
        await asyncio.wait_for(stopping, 10)  # far below the 600 s grace
        engine.gate.set()


class SlowEngine(FakeEngine):
    """A vocoder that takes half a second per second of audio: this box keeps two streams real time."""

    def vocode(self, batch: Sequence[AcousticFeatures]) -> list[npt.NDArray[np.float32]]:
        time.sleep(0.5 * sum(f.frames for f in batch) * 600 / 24000)
        return super().vocode(batch)


async def test_a_stream_beyond_the_measured_capacity_is_refused_with_a_retry_hint() -> None:
    async with running_core({"limits.admission_headroom": 0.85}, engine=SlowEngine(frames=40)) as core:
        first = core.admit(stream_for(core))
        playing = open_pcm(first, "playing")
        playing.feed(" ".join(f"Sentence number {i} is here." for i in range(12)))
        await wait_until(lambda: core.pipeline.capacity.streams() is not None)
        streams = core.pipeline.capacity.streams()
        assert streams is not None and 1.0 < streams < 2.0  # 0.5 s of vocoding per second, plus the rest
        assert playing.active

        second = core.admit(stream_for(core))
        with pytest.raises(RequestRefused) as refused:
            open_pcm(second, "one-too-many")
        assert refused.value.code is ErrorCode.OVERLOADED
        assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
        assert "retry in" in refused.value.message and len(second) == 0

        playing.cancel()  # its work leaves every stage, and its listener has nothing more to play
        assert not playing.active
        open_pcm(second, "now-there-is-room")


async def test_admission_headroom_zero_admits_every_stream() -> None:
    async with running_core({"limits.admission_headroom": 0}, engine=SlowEngine(frames=40)) as core:
        first = core.admit(stream_for(core))
        open_pcm(first, "playing").feed(" ".join(f"Sentence number {i} is here." for i in range(12)))
        await wait_until(lambda: core.pipeline.capacity.streams() is not None)
        open_pcm(core.admit(stream_for(core)), "also-playing")


# -- admission: queue mode ---------------------------------------------------------------------------

QUEUE = {"limits.admission": "queue", "limits.admission_headroom": 1.0}


@pytest.fixture
def room_for_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A box measured to keep 1.5 streams real time: one plays, a second would be one too many."""
    monkeypatch.setattr(CapacityMeter, "streams", lambda self: 1.5)


def admission_tasks() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == "speakd-admission" and not task.done()]


async def playing_stream(core: SynthesisCore, name: str = "playing") -> tuple[Session, Utterance]:
    """An utterance whose work sits in the pipeline (behind a held vocoder): a stream playing."""
    session = core.admit(stream_for(core))
    utterance = open_pcm(session, name)
    utterance.feed("Held in the vocoder for now. ")
    await wait_until(lambda: utterance.active)
    return session, utterance


@pytest.mark.usefixtures("room_for_one")
async def test_a_queued_context_takes_its_text_and_speaks_it_once_a_place_frees() -> None:
    engine = GatedEngine()
    overrides = {**QUEUE, "limits.max_buffered_text_chars": 60}
    async with running_core(overrides, engine=engine) as core:
        _, playing = await playing_stream(core)
        stream = stream_for(core)
        session = core.admit(stream)
        waiting = open_pcm(session, "waiting")
        assert waiting.queued and not waiting.active and len(session) == 1
        assert core.admission.queued == 1 and core.metrics.admission_queued.value == 1.0
        waiting.feed("First one. Second")
        waiting.feed(" one. ")
        with pytest.raises(RequestRefused) as refused:  # held text counts against the text budget
            waiting.feed("x" * 50)
        assert refused.value.code is ErrorCode.TEXT_TOO_LONG
        waiting.end()
        await asyncio.sleep(0.3)  # a re-check or two: still no place
        assert (
            waiting.queued
            and not waiting.submitted_any
            and waiting.held_chars == len("First one.Second one.")
        )

        playing.cancel()  # its place frees at once: the waiter is let in without waiting for a re-check
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.queued
        engine.gate.set()
        events = await collect(stream)
        assert segments(events) == ["First one.", "Second one."]
        assert isinstance(events[-1], Finished) and events[-1].reason is DoneReason.END
        assert core.metrics.admission_queued.value == 0.0 and not admission_tasks()
        session.close()


@pytest.mark.usefixtures("room_for_one")
async def test_waiters_are_let_in_first_come_first_served() -> None:
    engine = GatedEngine()
    async with running_core(QUEUE, engine=engine) as core:
        _, playing = await playing_stream(core)
        first = open_pcm(core.admit(stream_for(core)), "first")
        first.feed("I came first. ")
        playing.cancel()
        # There is room now, but `first` waits for it: a newcomer queues behind, it does not jump ahead.
        second = open_pcm(core.admit(stream_for(core)), "second")
        assert second.queued
        await wait_until(lambda: not first.queued)
        await asyncio.sleep(0.3)
        assert second.queued and first.active  # first's text is in the pipeline: it is the stream now
        first.cancel()
        await wait_until(lambda: not second.queued)
        engine.gate.set()


@pytest.mark.usefixtures("room_for_one")
async def test_a_place_freed_by_the_playback_clock_alone_is_found_by_the_periodic_recheck() -> None:
    """No event marks a listener's audio running out; the queue looks again on its own."""
    async with running_core(QUEUE, engine=FakeEngine(frames=40)) as core:  # a second of audio a segment
        player = core.admit(stream_for(core))
        playing = open_pcm(player, "playing")
        playing.feed("One second of audio. ")  # no end: it stays open after its audio plays out
        await wait_until(
            lambda: (
                playing.submitted_any
                and core.pipeline.depths() == dict.fromkeys(core.pipeline.stage_names, 0)
                and playing.audio_in_hand_s > 0.5
            )
        )
        waiting = open_pcm(core.admit(stream_for(core)), "waiting")
        assert waiting.queued and playing.active
        await wait_until(lambda: not waiting.queued, limit_s=3.0)
        assert not playing.closed and not playing.active


@pytest.mark.usefixtures("room_for_one")
async def test_a_waiter_past_the_queue_timeout_gets_overloaded_with_a_retry_hint() -> None:
    engine = GatedEngine()
    async with running_core({**QUEUE, "limits.admission_queue_timeout_s": 0.2}, engine=engine) as core:
        await playing_stream(core)
        stream = stream_for(core)
        session = core.admit(stream)
        started = time.monotonic()
        waiting = open_pcm(session, "waiting")
        waiting.feed("Never spoken. ")
        events = await collect(stream)
        assert 0.2 <= time.monotonic() - started < 5.0
        assert [type(event) for event in events] == [Failed, Finished]
        failed, done = events
        assert isinstance(failed, Failed) and failed.code is ErrorCode.OVERLOADED
        assert failed.retry_after_s is not None and failed.retry_after_s >= 1 and "retry in" in failed.message
        assert isinstance(done, Finished) and done.reason is DoneReason.ERROR
        assert not waiting.submitted_any and len(session) == 0
        assert core.admission.queued == 0 and core.metrics.errors.labels(code="overloaded").value == 1.0
        await wait_until(lambda: not admission_tasks())
        engine.gate.set()


@pytest.mark.usefixtures("room_for_one")
async def test_a_full_queue_refuses_at_once_with_a_retry_hint() -> None:
    engine = GatedEngine()
    async with running_core({**QUEUE, "limits.admission_queue_max": 1}, engine=engine) as core:
        await playing_stream(core)
        assert open_pcm(core.admit(stream_for(core)), "waiting").queued
        late = core.admit(stream_for(core))
        with pytest.raises(RequestRefused) as refused:
            open_pcm(late, "one-too-many")
        assert refused.value.code is ErrorCode.OVERLOADED and refused.value.context == "one-too-many"
        assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
        assert "1 contexts are already waiting" in refused.value.message
        assert len(late) == 0 and core.admission.queued == 1
        engine.gate.set()


@pytest.mark.usefixtures("room_for_one")
async def test_cancel_and_disconnect_take_a_waiter_out_of_the_queue() -> None:
    engine = GatedEngine()
    async with running_core(QUEUE, engine=engine) as core:
        _, playing = await playing_stream(core)
        stream = stream_for(core)
        cancelled = open_pcm(core.admit(stream), "cancelled")
        cancelled.feed("Cancelled before its turn. ")
        leaving = core.admit(stream_for(core))
        left = open_pcm(leaving, "left")
        left.feed("Its client leaves. ")
        assert core.admission.queued == 2

        cancelled.cancel()
        events = await collect(stream)
        assert [type(event) for event in events] == [Finished]
        assert isinstance(events[0], Finished) and events[0].reason is DoneReason.CANCEL
        leaving.close()
        assert left.closed and core.admission.queued == 0
        assert core.metrics.admission_queued.value == 0.0 and core.metrics.contexts.value == 1.0
        await wait_until(lambda: not admission_tasks())

        playing.cancel()
        engine.gate.set()
        await asyncio.sleep(0.1)
        assert not cancelled.submitted_any and not left.submitted_any  # neither reached the pipeline


@pytest.mark.usefixtures("room_for_one")
async def test_shutdown_refuses_waiters_at_once_and_leaves_no_task() -> None:
    engine = GatedEngine()
    async with running_core(QUEUE, engine=engine) as core:
        player, _ = await playing_stream(core)
        stream = stream_for(core)
        session = core.admit(stream)
        waiting = open_pcm(session, "waiting")
        waiting.feed("Never spoken. ")
        stopping = asyncio.create_task(core.shutdown(grace_s=600))
        events = await collect(stream)
        assert [type(event) for event in events] == [Failed, Finished]
        failed, done = events
        assert isinstance(failed, Failed) and failed.code is ErrorCode.SHUTTING_DOWN
        assert isinstance(done, Finished) and done.reason is DoneReason.CANCEL
        assert core.admission.queued == 0 and not admission_tasks()
        player.close()
        session.close()
        await asyncio.wait_for(stopping, 10)
        engine.gate.set()
