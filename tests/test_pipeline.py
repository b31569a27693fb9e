"""Pipeline stages with a fake G2P and engine: order, fairness, cancel, end marker, failures, bounds.

The fakes keep the real plumbing honest: the real FairQueues, Stage workers and threads, the real
VoiceBank, metrics and PCM16 encoder. The fake engine can be slowed down or gated on a
`threading.Event`, which holds an item inside the vocoder thread so the lanes behind it fill up:
each queue after G2P holds at most `lane_limit` items of a context (a few more where one item
expands), and a stage takes no work of a context whose lane downstream is full.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import numpy.typing as npt
import pytest

from speakd.server.audio.encoders import Frame, FrameEncoder, Pcm16FrameEncoder
from speakd.server.engines.kokoro.engine import SAMPLES_PER_FRAME, AcousticFeatures, AcousticRequest
from speakd.server.engines.kokoro.g2p import EnglishG2P, PhonemeChunk
from speakd.server.engines.kokoro.seams import SeamCarry
from speakd.server.engines.kokoro.stages import KokoroStages
from speakd.server.engines.kokoro.voices import STYLE_DIM, VoiceBank
from speakd.server.errors import SynthesisError
from speakd.server.metrics import SpeakdMetrics
from speakd.server.pipeline.fair_queue import BatchLimits
from speakd.server.pipeline.job import EncodedSegment, Job
from speakd.server.pipeline.pipeline import Pipeline

FRAME_SAMPLES = 480  # 20 ms at 24 kHz
SEGMENT_FRAMES = 4  # acoustic frames per fake segment: 2400 samples, exactly 5 PCM frames
SEGMENT_PCM_FRAMES = SEGMENT_FRAMES * SAMPLES_PER_FRAME // FRAME_SAMPLES
BOUNDED = ("acoustic", "vocoder", "encoder")


# -- fakes ------------------------------------------------------------------------------------------


class FakeG2P:
    """`EnglishG2P`'s call signature; '|' splits a text into chunks, token ids are the code points."""

    def __init__(self) -> None:
        self.langs: list[str] = []

    def __call__(self, text: str, lang: str = "en-us") -> list[PhonemeChunk]:
        self.langs.append(lang)
        pieces = [piece.strip() for piece in text.split("|")]
        return [PhonemeChunk(piece, piece, tuple(ord(c) for c in piece)) for piece in pieces if piece]


def _level(text: str) -> float:
    """The constant level the fake vocoder renders for a text, so delivered audio can be matched."""
    return (sum(map(ord, text)) % 7 + 1) / 10.0


class FakeEngine:
    """Renders `frames` (SEGMENT_FRAMES) acoustic frames of a constant level per segment, like the model would
    (600 samples a frame), and tells segments apart by an id stored in every frame of `asr`, so a
    vocoder call on any slice of a segment's features knows which text it renders.

    `vocode_delay` slows every vocoder call; while `gate` is clear, vocoding a text for which
    `gated(text)` holds blocks the vocoder thread (`held` is set once it does). `fail` names a
    stage and a substring: items whose text contains it raise there.
    """

    def __init__(self) -> None:
        self.frames = SEGMENT_FRAMES  # 40 or more: a context's first segment is vocoded in 2 windows
        self.vocode_delay = 0.0
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()
        self.gated: Callable[[str], bool] = lambda text: True
        self.fail: tuple[str, str] | None = None
        self.vocoded: list[str] = []
        self.seams: list[tuple[str, SeamCarry | None]] = []  # per vocoder call: its text and seam
        self.acoustic_texts: list[str] = []
        self.batch_sizes: dict[str, list[int]] = {"acoustic": [], "vocoder": []}

    def _check(self, stage: str, text: str) -> None:
        if self.fail is not None and self.fail[0] == stage and self.fail[1] in text:
            raise RuntimeError(f"fake {stage} failure on {text!r}")

    def acoustic(self, batch: Sequence[AcousticRequest]) -> list[AcousticFeatures]:
        self.batch_sizes["acoustic"].append(len(batch))
        out = []
        for request in batch:
            assert request.style.shape == (1, STYLE_DIM)
            text = "".join(map(chr, request.tokens))
            self._check("acoustic", text)
            self.acoustic_texts.append(text)
            durations = np.zeros(len(request.tokens) + 2, np.int64)
            durations[1] = self.frames
            out.append(
                AcousticFeatures(
                    asr=np.full((1, 1, self.frames), len(self.acoustic_texts) - 1, np.float32),
                    f0=np.zeros((1, 2 * self.frames), np.float32),
                    energy=np.zeros((1, 2 * self.frames), np.float32),
                    style=request.style,
                    durations=durations,
                )
            )
        return out

    def vocode(self, batch: Sequence[AcousticFeatures]) -> list[npt.NDArray[np.float32]]:
        self.batch_sizes["vocoder"].append(len(batch))
        out = []
        for features in batch:
            text = self.acoustic_texts[int(features.asr[0, 0, 0])]
            if self.gated(text) and not self.gate.is_set():
                self.held.set()
                assert self.gate.wait(10), "test left the vocoder gate closed"
            if self.vocode_delay:
                time.sleep(self.vocode_delay)
            self._check("vocoder", text)
            self.vocoded.append(text)
            self.seams.append((text, features.seam))
            out.append(np.full(features.frames * SAMPLES_PER_FRAME, _level(text), np.float32))
        return out


class TailEncoder(Pcm16FrameEncoder):
    """PCM16 frames plus a recognisable tail, logging the frames it makes and its tail."""

    def __init__(self) -> None:
        super().__init__(24000, 20)
        self.calls: list[str] = []

    def _frame(self, pcm: npt.NDArray[np.int16]) -> Frame:
        self.calls.append("frame")
        return super()._frame(pcm)

    def _tail(self) -> list[Frame]:
        self.calls.append("tail")
        return [Frame(b"tail", 7)]


class GatedEncoder(Pcm16FrameEncoder):
    """PCM16 frames, but the encoder thread waits at every frame while `gate` is clear."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__(24000, 20)
        self.gate = gate
        self.held = threading.Event()

    def _frame(self, pcm: npt.NDArray[np.int16]) -> Frame:
        if not self.gate.is_set():
            self.held.set()
            assert self.gate.wait(10), "test left the encoder gate closed"
        return super()._frame(pcm)


@dataclass
class Event:
    kind: str  # "deliver" | "finish" | "fail"
    context: str
    index: int = -1
    text: str = ""
    frames: list[Frame] = field(default_factory=list)
    error: SynthesisError | None = None


class RecordingSink:
    """A JobSink that logs everything, in the order the pipeline produced it."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.ended: set[str] = set()
        self.full: set[str] = set()  # contexts whose reader has no room

    def has_room(self) -> bool:
        return True

    def room_for(self, job: Job) -> bool:
        return job.context not in self.full

    def deliver(self, job: Job, segment: EncodedSegment) -> None:
        assert segment.job is job
        self.events.append(Event("deliver", job.context, segment.index, segment.text, segment.frames))

    def finish(self, job: Job, tail: Sequence[Frame]) -> None:
        self.events.append(Event("finish", job.context, frames=list(tail)))
        self.ended.add(job.context)

    def fail(self, job: Job, error: SynthesisError) -> None:
        self.events.append(Event("fail", job.context, error=error))
        self.ended.add(job.context)

    def of(self, context: str, kind: str | None = None) -> list[Event]:
        return [e for e in self.events if e.context == context and (kind is None or e.kind == kind)]

    def delivered(self, context: str) -> list[tuple[int, str]]:
        """(index, text) of each segment delivered, in order; a segment's parts count once."""
        out: list[tuple[int, str]] = []
        for e in self.of(context, "deliver"):
            if not out or out[-1] != (e.index, e.text):
                out.append((e.index, e.text))
        return out

    def frames(self, context: str, index: int) -> list[Frame]:
        return [f for e in self.of(context, "deliver") if e.index == index for f in e.frames]


# -- fixtures and helpers -----------------------------------------------------------------------------


@dataclass
class Harness:
    pipeline: Pipeline
    engine: FakeEngine
    g2p: FakeG2P
    sink: RecordingSink
    metrics: SpeakdMetrics
    lane_limit: int
    max_batch: int
    encoder_gate: threading.Event = field(default_factory=threading.Event)

    def job(self, context: str, encoder: FrameEncoder | None = None, lang: str = "en-us") -> Job:
        job = Job(
            context=context,
            voice="af_fake",
            lang=lang,
            speed=1.0,
            encoder=encoder or Pcm16FrameEncoder(24000, 20),
            sink=self.sink,
        )
        job.sink = _JobView(self.sink, job)
        return job


@dataclass
class _JobView:
    """The recording sink as one job sees it: its room is that job's."""

    sink: RecordingSink
    job: Job

    def has_room(self) -> bool:
        return self.sink.room_for(self.job)

    def deliver(self, job: Job, segment: EncodedSegment) -> None:
        self.sink.deliver(job, segment)

    def finish(self, job: Job, tail: Sequence[Frame]) -> None:
        self.sink.finish(job, tail)

    def fail(self, job: Job, error: SynthesisError) -> None:
        self.sink.fail(job, error)


def _voices() -> VoiceBank:
    rng = np.random.default_rng(7)
    return VoiceBank({"af_fake": rng.standard_normal((510, STYLE_DIM)).astype(np.float32)})


async def _start(lane_limit: int, max_batch: int, linger_s: float = 0.0, encoder_workers: int = 1) -> Harness:
    engine, g2p, sink, metrics = FakeEngine(), FakeG2P(), RecordingSink(), SpeakdMetrics()
    pipeline = Pipeline(
        stages=KokoroStages(cast(EnglishG2P, g2p), engine, _voices()).specs(),
        metrics=metrics,
        lane_limit=lane_limit,
        batching=BatchLimits(max_batch, linger_s=linger_s),
        encoder_workers=encoder_workers,
    )
    await pipeline.start()
    return Harness(pipeline, engine, g2p, sink, metrics, lane_limit, max_batch)


@pytest.fixture
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """A started pipeline; `@pytest.mark.parametrize("harness", [(lane_limit, max_batch[, linger_s[,
    encoder_workers]])], indirect=True)`."""
    lane_limit, max_batch, *linger = getattr(request, "param", (8, 1))
    h = await _start(lane_limit, max_batch, *linger)
    try:
        yield h
    finally:
        h.engine.gate.set()  # never leave a worker thread blocked behind the test
        h.encoder_gate.set()
        await h.pipeline.close()


async def wait_until(condition: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


async def settle(rounds: int = 20) -> None:
    """Let every stage run until none has anything left to move (the gate may still hold one item)."""
    for _ in range(rounds):
        await asyncio.sleep(0.005)


def lanes(pipeline: Pipeline) -> dict[str, dict[str, int]]:
    """Items queued before each stage, per context."""
    return {
        stage: {job.context: count for job, count in per_job.items()}
        for stage, per_job in pipeline.lanes().items()
    }


def _pcm_level(frames: list[Frame]) -> float:
    """The level of PCM16 frames of a constant signal (a seam's crossfade may move it by an LSB)."""
    samples = np.frombuffer(b"".join(f.data for f in frames), "<i2").astype(np.int32)
    assert int(samples.max()) - int(samples.min()) <= 2
    return float(samples.mean()) / 32767.0


# -- tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("harness", [(4, 1), (4, 3)], indirect=True)
async def test_one_context_comes_out_in_order(harness: Harness) -> None:
    h = harness
    h.engine.vocode_delay = 0.001
    job = h.job("solo", lang="en-gb")
    texts = [f"sentence {i} | clause {i}" if i % 3 == 0 else f"sentence {i}" for i in range(24)]
    for text in texts:
        h.pipeline.submit(job, text)
    h.pipeline.end(job)
    await wait_until(lambda: "solo" in h.sink.ended)

    expected = [piece.strip() for text in texts for piece in text.split("|")]
    assert h.sink.delivered("solo") == list(enumerate(expected))
    assert [e.kind for e in h.sink.of("solo")][-1] == "finish"
    assert len(h.sink.of("solo", "finish")) == 1
    for index, text in enumerate(expected):
        frames = h.sink.frames("solo", index)
        assert [f.samples for f in frames] == [FRAME_SAMPLES] * SEGMENT_PCM_FRAMES
        assert _pcm_level(frames) == pytest.approx(_level(text), abs=3e-4)
    assert set(h.g2p.langs) == {"en-gb"}
    assert job.segments_made == len(expected) and job.pending_chars == 0


@pytest.mark.parametrize(
    ("harness", "max_ahead"),
    [
        # Lanes with room: the long context's segments all wait before the vocoder.
        ((32, 1), 1),
        # The long context's lanes are full, but no stage waits holding its work, so the new first
        # segment passes every stage at once and waits only for the vocoder call in flight.
        ((4, 1), 1),
        # The same, with a batch of up to two long-context items in flight.
        ((4, 2), 2),
    ],
    indirect=["harness"],
)
async def test_new_context_is_served_long_before_a_long_one_finishes(
    harness: Harness, max_ahead: int
) -> None:
    h = harness
    h.engine.vocode_delay = 0.01
    long = h.job("long")
    for i in range(20):
        h.pipeline.submit(long, f"long {i}")
    h.pipeline.end(long)

    def lanes_filled() -> bool:
        if len(h.sink.of("long", "deliver")) < 2:
            return False
        queued = lanes(h.pipeline)
        return h.lane_limit > 20 or all(queued[name].get("long") == h.lane_limit for name in BOUNDED[:2])

    await wait_until(lanes_filled)
    # Hold the vocoder inside its next long-context call, so what the stages have in hand is known
    # (timing alone would let a loaded machine move the new item a vocoder call later).
    h.engine.held.clear()
    h.engine.gate.clear()
    assert await asyncio.to_thread(h.engine.held.wait, 5)

    new = h.job("new")
    h.pipeline.submit(new, "new 0")
    h.pipeline.submit(new, "new 1")
    h.pipeline.end(new)
    await wait_until(lambda: "new 0" in h.engine.acoustic_texts)
    await settle()
    queued = lanes(h.pipeline)
    assert queued["vocoder"]["new"] >= 1  # the new first segment waits for the vocoder...
    if h.lane_limit < 20:
        # ...though the long context's lanes are still full: nothing of it had to move first.
        assert queued["acoustic"]["long"] == queued["vocoder"]["long"] == h.lane_limit
    before = len(h.sink.events)
    h.engine.gate.set()
    await wait_until(lambda: {"long", "new"} <= h.sink.ended)

    later = h.sink.events[before:]
    first_new = next(i for i, e in enumerate(later) if e.context == "new")
    assert later[first_new].index == 0
    # Only what the vocoder had in hand goes first: the new first segment is among the next
    # max_ahead + 1 deliveries.
    assert first_new <= max_ahead, [(e.context, e.index) for e in later]
    long_after = [e for e in later[first_new:] if e.context == "long" and e.kind == "deliver"]
    assert len(long_after) >= 8
    assert h.sink.delivered("long") == [(i, f"long {i}") for i in range(20)]
    assert h.sink.delivered("new") == [(0, "new 0"), (1, "new 1")]


async def test_cancel_reaches_every_stage_and_drops_the_item_in_flight(harness: Harness) -> None:
    h = harness
    limit, total = h.lane_limit, 40
    h.engine.gated = lambda text: text.startswith("doomed")
    h.engine.gate.clear()
    doomed = h.job("doomed")
    for i in range(total):
        h.pipeline.submit(doomed, f"doomed {i}")
    h.pipeline.end(doomed)
    assert await asyncio.to_thread(h.engine.held.wait, 5)
    # Behind the held item the job's lanes before the vocoder fill up; the rest waits for G2P.
    piled = {
        "g2p": {"doomed": total + 1 - 1 - 2 * limit},
        "acoustic": {"doomed": limit},
        "vocoder": {"doomed": limit},
        "encoder": {},
    }
    await wait_until(lambda: lanes(h.pipeline) == piled)

    # Another context starts before the cancel: the doomed job's full lanes do not hold it back,
    # its first item goes straight through to wait for the vocoder.
    other = h.job("other")
    h.pipeline.submit(other, "other 0")
    await wait_until(lambda: lanes(h.pipeline)["vocoder"] == {"doomed": limit, "other": 1})
    assert "other 0" in h.engine.acoustic_texts
    h.pipeline.cancel(doomed)
    assert doomed.cancelled
    # Nothing of the cancelled job is queued anywhere, at once and after every stage has had its
    # turn: all that is left is the other context's first item, waiting behind the held vocoder call.
    left = {"g2p": {}, "acoustic": {}, "vocoder": {"other": 1}, "encoder": {}}
    assert lanes(h.pipeline) == left
    await settle()
    assert lanes(h.pipeline) == left
    assert h.pipeline.depths() == {"g2p": 0, "acoustic": 0, "vocoder": 1, "encoder": 0}
    assert h.metrics.stage_queue_depth.labels(stage="vocoder").value == 1.0
    h.pipeline.submit(other, "other 1")
    h.pipeline.end(other)

    h.engine.gate.set()
    await wait_until(lambda: "other" in h.sink.ended)
    await settle()
    assert h.sink.of("doomed") == []  # the held item, finished after the cancel, was thrown away
    assert {text for text in h.engine.vocoded if text.startswith("doomed")} == {"doomed 0"}
    assert h.sink.delivered("other") == [(0, "other 0"), (1, "other 1")]
    assert h.pipeline.depths() == dict.fromkeys(h.pipeline.stage_names, 0)


@pytest.mark.parametrize("harness", [(2, 1), (8, 4)], indirect=True)
async def test_end_marker_follows_the_last_segment_with_the_encoder_tail(harness: Harness) -> None:
    h = harness
    h.engine.vocode_delay = 0.002
    encoder = TailEncoder()
    job = h.job("ending", encoder)
    for i in range(6):
        h.pipeline.submit(job, f"part {i}")
    h.pipeline.end(job)  # queued at once, though urgent it must not overtake the segments
    empty = h.job("empty", TailEncoder())
    h.pipeline.end(empty)
    await wait_until(lambda: {"ending", "empty"} <= h.sink.ended)

    events = h.sink.of("ending")
    assert [e.kind for e in events] == ["deliver"] * (len(events) - 1) + ["finish"]
    assert h.sink.delivered("ending") == [(i, f"part {i}") for i in range(6)]
    assert events[-1].frames == [Frame(b"tail", 7)]
    assert encoder.calls == ["frame"] * (6 * SEGMENT_PCM_FRAMES) + ["tail"]
    # A context ended without text still gets its finish (and its encoder's tail).
    assert [(e.kind, e.frames) for e in h.sink.of("empty")] == [("finish", [Frame(b"tail", 7)])]


@pytest.mark.parametrize("stage", ["acoustic", "vocoder"])
@pytest.mark.parametrize("harness", [(4, 1), (4, 3)], indirect=True)
async def test_a_failing_item_fails_only_its_own_job(harness: Harness, stage: str) -> None:
    h = harness
    h.engine.fail = (stage, "boom")
    good, bad = h.job("good"), h.job("bad")
    for i in range(6):
        h.pipeline.submit(good, f"fine {i}")
        h.pipeline.submit(bad, "boom 2" if i == 2 else f"okay {i}")
    h.pipeline.end(good)
    h.pipeline.end(bad)
    await wait_until(lambda: {"good", "bad"} <= h.sink.ended)
    await settle()

    assert h.sink.delivered("good") == [(i, f"fine {i}") for i in range(6)]
    assert h.sink.of("good")[-1].kind == "finish"
    bad_events = h.sink.of("bad")
    assert [e.kind for e in bad_events if e.kind != "deliver"] == ["fail"]
    assert bad_events[-1].kind == "fail"  # nothing after the failure, not even a finish
    before_culprit = h.sink.delivered("bad")
    assert before_culprit == [(i, f"okay {i}") for i in range(len(before_culprit))]
    assert len(before_culprit) <= 2  # at most the segments before the culprit
    error = bad_events[-1].error
    assert isinstance(error, SynthesisError)
    assert stage in str(error) and "'bad'" in str(error) and "boom 2" in str(error)
    assert bad.cancelled and not good.cancelled
    assert h.pipeline.depths() == dict.fromkeys(h.pipeline.stage_names, 0)

    # The pipeline keeps serving afterwards.
    again = h.job("again")
    h.pipeline.submit(again, "after the failure")
    h.pipeline.end(again)
    await wait_until(lambda: "again" in h.sink.ended)
    assert h.sink.delivered("again") == [(0, "after the failure")]


@pytest.mark.parametrize("gated", ["vocoder", "encoder"])
@pytest.mark.parametrize("harness", [(4, 1)], indirect=True)
async def test_a_gated_stage_holds_a_context_to_lane_limit_items_per_queue(
    harness: Harness, gated: str
) -> None:
    h = harness
    limit, total = h.lane_limit, 200
    if gated == "vocoder":
        h.engine.gate.clear()
        gate, held_event = h.engine.gate, h.engine.held
    else:
        encoder = GatedEncoder(h.encoder_gate)
        gate, held_event = h.encoder_gate, encoder.held
    job = h.job("flood", encoder if gated == "encoder" else None)
    peaks = dict.fromkeys(BOUNDED, 0)

    def sample() -> None:
        queued = lanes(h.pipeline)
        for name in BOUNDED:
            depth = queued[name].get("flood", 0)
            peaks[name] = max(peaks[name], depth)
            assert depth <= limit, (name, depth)

    for i in range(total):
        h.pipeline.submit(job, f"flood {i}")
        sample()
        await asyncio.sleep(0)
    h.pipeline.end(job)
    assert await asyncio.to_thread(held_event.wait, 5)
    # One item in the gated stage's thread and none in any other worker's hands (a stage takes no
    # work it could not pass on); every lane up to the gate is full, and the rest (with the end
    # marker) waits for G2P, whose queue the connection bounds by its text budget instead.
    full = BOUNDED[: BOUNDED.index(gated) + 1]
    held = {name: limit if name in full else 0 for name in h.pipeline.stage_names}
    held["g2p"] = total + 1 - (len(full) * limit + 1)

    def settled() -> bool:
        sample()
        return h.pipeline.depths() == held

    await wait_until(settled)
    for _ in range(50):
        sample()
        await asyncio.sleep(0.001)
    assert h.pipeline.depths() == held

    gate.set()
    while "flood" not in h.sink.ended:
        sample()
        await asyncio.sleep(0.001)
    assert all(peaks[name] == limit for name in full)
    assert h.sink.delivered("flood") == [(i, f"flood {i}") for i in range(total)]


@pytest.mark.parametrize("harness", [(4, 1)], indirect=True)
async def test_many_contexts_are_each_bounded_by_their_own_lane(harness: Harness) -> None:
    h = harness
    limit, contexts, texts = h.lane_limit, 8, 12
    h.engine.gate.clear()
    jobs = [h.job(f"c{n}") for n in range(contexts)]
    names = [job.context for job in jobs]

    def sample() -> None:
        queued = lanes(h.pipeline)
        for name in BOUNDED:
            assert max(queued[name].values(), default=0) <= limit, (name, queued[name])

    for i in range(texts):
        for job in jobs:
            h.pipeline.submit(job, f"{job.context} {i}")
            sample()
            await asyncio.sleep(0)
    for job in jobs:
        h.pipeline.end(job)
    assert await asyncio.to_thread(h.engine.held.wait, 5)
    # With the vocoder held on one item, every context fills its own lanes before the vocoder and
    # no more: each of those queues holds contexts x lane_limit items, the rest waits for G2P.
    full = {"acoustic": dict.fromkeys(names, limit), "vocoder": dict.fromkeys(names, limit), "encoder": {}}

    def settled() -> bool:
        sample()
        queued = lanes(h.pipeline)
        return all(queued[name] == lanes_ for name, lanes_ in full.items())

    await wait_until(settled)
    for _ in range(50):
        sample()
        await asyncio.sleep(0.001)
    assert h.pipeline.depths() == {
        "g2p": contexts * (texts + 1) - 1 - 2 * contexts * limit,
        "acoustic": contexts * limit,
        "vocoder": contexts * limit,
        "encoder": 0,
    }

    h.engine.gate.set()
    while not set(names) <= h.sink.ended:
        sample()
        await asyncio.sleep(0.001)
    for name in names:
        assert h.sink.delivered(name) == [(i, f"{name} {i}") for i in range(texts)]
        assert h.sink.of(name)[-1].kind == "finish"


@pytest.mark.parametrize("harness", [(1, 1)], indirect=True)
async def test_an_item_that_expands_overfills_its_lane_by_its_expansion_only(harness: Harness) -> None:
    h = harness
    h.engine.frames = 40  # long enough for a context's first segment to be vocoded in two windows
    h.engine.gated = lambda text: text.startswith("busy")
    h.engine.gate.clear()
    busy = h.job("busy")
    h.pipeline.submit(busy, "busy 0")
    assert await asyncio.to_thread(h.engine.held.wait, 5)

    x = h.job("x")
    h.pipeline.submit(x, "x 0 | x 1 | x 2")  # one text, three segments
    h.pipeline.submit(x, "x 3")
    h.pipeline.end(x)
    # G2P took the text while x's lane was empty and put all three segments (lane_limit + 2); the
    # acoustic stage took the first into x's empty vocoder lane. Neither stage takes more of x until
    # there is room (the vocoder plans windows as it goes: they never crowd its lane).
    expected = {"g2p": {"x": 2}, "acoustic": {"x": 2}, "vocoder": {"x": 1}, "encoder": {}}
    await wait_until(lambda: lanes(h.pipeline) == expected)
    await settle()
    assert lanes(h.pipeline) == expected

    h.engine.gate.set()
    h.pipeline.end(busy)
    await wait_until(lambda: {"busy", "x"} <= h.sink.ended)
    assert h.sink.delivered("x") == [(i, f"x {i}") for i in range(4)]
    assert [e.index for e in h.sink.of("x", "deliver")] == [0, 0, 1, 2, 3]  # the first in two parts


async def test_the_windows_of_a_split_segment_share_one_seam_and_a_whole_render_has_none(
    harness: Harness,
) -> None:
    h = harness
    h.engine.frames = 40  # a context's first segment is vocoded in two windows
    job = h.job("x")
    h.pipeline.submit(job, "x 0")
    h.pipeline.end(job)
    await wait_until(lambda: "x" in h.sink.ended)
    (first, first_seam), (second, second_seam) = h.engine.seams
    assert first == second == "x 0"
    assert first_seam is not None and first_seam is second_seam

    h.engine.seams.clear()
    h.engine.frames = 20  # too short to split: one render on its own
    short = h.job("short")
    h.pipeline.submit(short, "short 0")
    h.pipeline.end(short)
    await wait_until(lambda: "short" in h.sink.ended)
    assert h.engine.seams == [("short 0", None)]


class ExplodingSink(RecordingSink):
    """Raises while delivering one context's audio: a bug downstream, not in the model."""

    def deliver(self, job: Job, segment: EncodedSegment) -> None:
        if job.context == "cursed":
            raise RuntimeError("sink bug")
        super().deliver(job, segment)


class BrokenTailEncoder(Pcm16FrameEncoder):
    def _tail(self) -> list[Frame]:
        raise RuntimeError("tail bug")


async def test_a_bug_after_the_model_fails_one_context_and_keeps_the_workers_alive(harness: Harness) -> None:
    h = harness
    sink = ExplodingSink()

    def job(context: str, encoder: FrameEncoder | None = None) -> Job:
        encoder = encoder or Pcm16FrameEncoder(24000, 20)
        return Job(context=context, voice="af_fake", lang="en-us", speed=1.0, encoder=encoder, sink=sink)

    for each in (job("cursed"), job("tail", BrokenTailEncoder(24000, 20)), job("fine")):
        h.pipeline.submit(each, f"text of {each.context}")
        h.pipeline.end(each)
    await wait_until(lambda: {"cursed", "tail", "fine"} <= sink.ended)
    assert [e.kind for e in sink.of("cursed")] == ["fail"]
    assert "sink bug" in str(sink.of("cursed")[0].error)
    assert [e.kind for e in sink.of("tail")] == ["deliver", "fail"]
    assert "tail bug" in str(sink.of("tail")[-1].error)
    assert [e.kind for e in sink.of("fine")] == ["deliver", "finish"]
    # Every worker still runs: a new context goes all the way through.
    after = job("after")
    h.pipeline.submit(after, "still alive")
    h.pipeline.end(after)
    await wait_until(lambda: "after" in sink.ended)
    assert sink.delivered("after") == [(0, "still alive")]


@pytest.mark.parametrize("harness", [(8, 4, 0.3)], indirect=True)
async def test_contexts_are_batched_together_and_every_one_gets_its_own_audio(harness: Harness) -> None:
    contexts = [f"c{i}" for i in range(3)]
    texts = {c: [f"{c} one", f"{c} two", f"{c} three"] for c in contexts}
    for c in contexts:
        job = harness.job(c)
        harness.pipeline.submit(job, "|".join(texts[c]))
        harness.pipeline.end(job)
    await wait_until(lambda: harness.sink.ended == set(contexts))
    assert max(harness.engine.batch_sizes["vocoder"]) > 1
    assert max(harness.engine.batch_sizes["acoustic"]) > 1
    for c in contexts:
        assert harness.sink.delivered(c) == list(enumerate(texts[c]))
        for index, text in enumerate(texts[c]):
            assert _pcm_level(harness.sink.frames(c, index)) == pytest.approx(_level(text), abs=1e-3)


@pytest.mark.parametrize("harness", [(8, 4, 30.0)], indirect=True)
async def test_a_first_segment_never_waits_for_batch_mates(harness: Harness) -> None:
    """Lingering is 30 s here: only a batch that does not wait can finish within wait_until's 5 s."""
    job = harness.job("new")
    harness.pipeline.submit(job, "hello")
    harness.pipeline.end(job)
    await wait_until(lambda: "new" in harness.sink.ended)
    assert harness.sink.delivered("new") == [(0, "hello")]


class RendezvousEncoder(Pcm16FrameEncoder):
    """PCM16 frames; its first frame waits until every encoder sharing `barrier` is at its own first
    frame, so encoding only gets past it when the contexts are encoded in parallel."""

    def __init__(self, barrier: threading.Barrier) -> None:
        super().__init__(24000, 20)
        self.barrier = barrier
        self.met = False

    def _frame(self, pcm: npt.NDArray[np.int16]) -> Frame:
        if not self.met:
            self.barrier.wait(5)
            self.met = True
        return super()._frame(pcm)


@pytest.mark.parametrize("harness", [(8, 1, 0.0, 3)], indirect=True)
async def test_encoder_workers_encode_contexts_in_parallel_and_keep_each_in_order(harness: Harness) -> None:
    barrier = threading.Barrier(3)
    contexts = [f"c{i}" for i in range(3)]
    texts = {c: [f"{c} a", f"{c} b", f"{c} c", f"{c} d"] for c in contexts}
    for c in contexts:
        job = harness.job(c, encoder=RendezvousEncoder(barrier))
        harness.pipeline.submit(job, "|".join(texts[c]))
        harness.pipeline.end(job)
    await wait_until(lambda: harness.sink.ended == set(contexts), limit_s=10)
    assert not barrier.broken  # all three encoders were inside a frame at once
    for c in contexts:
        assert [e.kind for e in harness.sink.of(c)][-1] == "finish"
        assert harness.sink.delivered(c) == list(enumerate(texts[c]))
        for index, text in enumerate(texts[c]):
            assert _pcm_level(harness.sink.frames(c, index)) == pytest.approx(_level(text), abs=1e-3)


async def test_warm_up_runs_on_the_threads_that_serve_each_stage(harness: Harness) -> None:
    """A GPU engine keeps a CUDA stream (and its cached memory) per calling thread: the warm-up must
    run where the stage's own work runs, not on a thread of its own."""
    h = harness
    threads: dict[str, list[str]] = {"acoustic": [], "vocoder": []}
    acoustic, vocode = h.engine.acoustic, h.engine.vocode

    def record_acoustic(batch: Sequence[AcousticRequest]) -> list[AcousticFeatures]:
        threads["acoustic"].append(threading.current_thread().name)
        return acoustic(batch)

    def record_vocode(batch: Sequence[AcousticFeatures]) -> list[npt.NDArray[np.float32]]:
        threads["vocoder"].append(threading.current_thread().name)
        return vocode(batch)

    h.engine.acoustic, h.engine.vocode = record_acoustic, record_vocode  # type: ignore[method-assign]
    style = _voices().style("af_fake", 5)
    steps = [("acoustic", h.engine.acoustic), ("vocoder", h.engine.vocode)]
    await h.pipeline.warm_up(steps, [AcousticRequest(tuple(map(ord, "Hello")), style, 1.0)])
    assert h.engine.vocoded == ["Hello"]
    job = h.job("a")
    h.pipeline.submit(job, "Served after the warm-up.")
    h.pipeline.end(job)
    await wait_until(lambda: "a" in h.sink.ended)
    assert len(threads["acoustic"]) >= 2 and len(threads["vocoder"]) >= 2
    for stage, names in threads.items():
        assert len(set(names)) == 1, names  # the warm-up's thread is the one that then served
        assert names[0].startswith(f"speakd-{stage}"), names


async def test_a_reader_without_room_holds_only_its_own_job(harness: Harness) -> None:
    """A sink that says it has no room (a slow HTTP reader) stalls its job at the encoder: its lanes
    fill up to their bounds while another job goes all the way through; room again, and a wake, let
    it finish in order."""
    h = harness
    h.sink.full.add("slow")
    slow, other = h.job("slow"), h.job("other")
    texts = [f"slow {i}" for i in range(12)]
    h.pipeline.submit(slow, "|".join(texts))
    h.pipeline.end(slow)
    await wait_until(lambda: lanes(h.pipeline)["encoder"].get("slow", 0) >= 1)
    h.pipeline.submit(other, "other 0|other 1")
    h.pipeline.end(other)
    await wait_until(lambda: "other" in h.sink.ended)
    assert h.sink.of("slow") == []
    queued = lanes(h.pipeline)
    for stage in BOUNDED:
        assert queued[stage].get("slow", 0) <= h.lane_limit + 2, queued
    h.sink.full.discard("slow")
    h.pipeline.wake()
    await wait_until(lambda: "slow" in h.sink.ended)
    assert h.sink.delivered("slow") == list(enumerate(texts))
