"""The synthesis pipeline: G2P → acoustic → vocoder → encoder, stages joined by bounded fair queues.

Each stage owns its worker task(s) and thread(s) (one each, several for the encoder): heavy work
never runs on the event loop, stages overlap (one segment is vocoded while the next one's acoustic
pass runs), and a context's items stay in order because each stage serves a context's lane first
in, first out. A cancel marks the
job and drops its queued items in every stage; work already running finishes and is thrown away.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from speakd.server.audio.encoders import Frame, FrameEncoder
from speakd.server.engines.kokoro.engine import AcousticFeatures, AcousticRequest, Engine
from speakd.server.engines.kokoro.g2p import EnglishG2P
from speakd.server.engines.kokoro.voices import VoiceBank
from speakd.server.errors import SynthesisError
from speakd.server.metrics import SpeakdMetrics
from speakd.server.pipeline.fair_queue import BatchLimits, FairQueue
from speakd.server.pipeline.vocoder_speed import VocoderCost, VocoderSpeed
from speakd.server.pipeline.windows import Stitcher, Window, plan_windows

logger = logging.getLogger(__name__)

# A little slower than the ONNX vocoder on 2 CPU cores, until measured here.
INITIAL_VOCODER_COST = VocoderCost(fixed_s=0.025, per_frame_s=0.010)
# Frames per phoneme token, to bound acoustic batches before their durations are known: about 2.5-3
# in running speech, more in short segments (the BOS/EOS pauses).
FRAMES_PER_TOKEN = 3


class JobSink(Protocol):
    """Where a job's results land, on the event loop (the connection that owns the context)."""

    def deliver(self, job: Job, segment: EncodedSegment) -> None: ...

    def finish(self, job: Job, tail: Sequence[Frame]) -> None: ...

    def fail(self, job: Job, error: SynthesisError) -> None: ...


class Job:
    """One context's synthesis: its settings, its encoder, and the cancel flag every stage checks."""

    def __init__(
        self, *, context: str, voice: str, lang: str, speed: float, encoder: FrameEncoder, sink: JobSink
    ) -> None:
        self.context = context
        self.voice = voice
        self.lang = lang
        self.speed = speed
        self.encoder = encoder
        self.sink = sink
        self.cancelled = False
        # Each counter has one writer (the loop or the G2P thread), so reads elsewhere are safe.
        self.texts_submitted = 0
        self.submitted_chars = 0
        self.segments_made = 0
        self.retired_chars = 0

    @property
    def pending_chars(self) -> int:
        """Text submitted but not yet through G2P: part of the context's text budget."""
        return self.submitted_chars - self.retired_chars

    def __repr__(self) -> str:
        return f"Job({self.context!r}, cancelled={self.cancelled})"


@dataclass(slots=True)
class TextItem:
    job: Job
    text: str
    first: bool


@dataclass(slots=True)
class PhonemesItem:
    job: Job
    index: int
    text: str
    tokens: tuple[int, ...]


@dataclass(slots=True)
class FeaturesItem:
    """One window of a segment to vocode; the windows of a segment share one stitcher."""

    job: Job
    index: int
    text: str
    features: AcousticFeatures
    window: Window
    stitcher: Stitcher


@dataclass(slots=True)
class WaveformItem:
    job: Job
    index: int
    text: str
    audio: npt.NDArray[np.float32]
    last_part: bool


@dataclass(slots=True)
class EncodedSegment:
    """Frames of one segment, or of one part of it when it was vocoded in windows."""

    job: Job
    index: int
    text: str
    frames: list[Frame]


@dataclass(slots=True)
class EndMarker:
    """Follows a context's last segment through every stage; the encoder stage fills in the tail."""

    job: Job
    tail: Sequence[Frame] = ()


Item = TextItem | PhonemesItem | FeaturesItem | WaveformItem | EncodedSegment | EndMarker
In = TypeVar("In", bound=Item)
Out = TypeVar("Out", bound=Item)
T = TypeVar("T")


def _phoneme_frames(item: PhonemesItem | EndMarker) -> int:
    """An acoustic item's batch cost: the frames it will probably make (BOS/EOS included)."""
    if isinstance(item, EndMarker):
        return 0
    return math.ceil(FRAMES_PER_TOKEN * (len(item.tokens) + 2) / item.job.speed)


def _window_frames(item: FeaturesItem | EndMarker) -> int:
    """A vocoder item's batch cost: the frames its window renders."""
    return 0 if isinstance(item, EndMarker) else item.window.render_end - item.window.render_start


def _is_urgent(item: Item) -> bool:
    """A context's first segment jumps the queue (time to first audio matters most), and so does
    its end marker, which costs nothing and lets `done` go out as soon as the audio has."""
    if isinstance(item, EndMarker):
        return True
    return item.first if isinstance(item, TextItem) else getattr(item, "index", None) == 0


class Stage(Generic[In, Out]):
    """Worker tasks pulling batches from `inbox`, computing in their own threads, pushing onward.

    It takes only items whose context has room in `outbox`, so pushing never waits, and none of a
    context that another of its workers is busy with, so a context's items stay in order (and its
    stateful encoder is used by one thread at a time) however many workers there are.
    """

    def __init__(
        self,
        name: str,
        work: Callable[[list[In]], list[Out]],
        inbox: FairQueue[In | EndMarker],
        outbox: FairQueue[Out | EndMarker] | None,
        emit: Callable[[Out | EndMarker], None],
        *,
        limits: BatchLimits,
        metrics: SpeakdMetrics,
        on_failure: Callable[[Job, SynthesisError], None],
        finish: Callable[[EndMarker], EndMarker] | None = None,
        workers: int = 1,
    ) -> None:
        # A worker lingering for batch-mates holds items its context is not yet marked busy with, so
        # another worker could take that context's next item: lingering needs a single worker.
        assert workers == 1 or limits.linger_s == 0, "a stage with several workers cannot linger"
        self.name = name
        self.inbox = inbox
        self.workers = workers
        self._outbox = outbox
        self._busy: set[Job] = set()
        if outbox is not None:
            outbox.on_take(inbox.poke)
        self._work = work
        self._emit = emit
        self._limits = limits
        self._metrics = metrics
        self._on_failure = on_failure
        self._finish = finish
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"speakd-{name}")

    def _eligible(self, owner: Hashable) -> bool:
        return owner not in self._busy and (self._outbox is None or self._outbox.has_room(owner))

    async def run(self) -> None:
        """One worker's loop; a stage runs `workers` of them."""
        while True:
            taken = await self.inbox.get_batch(self._limits, self._eligible)
            owners = {item.job for item in taken}
            self._busy |= owners
            try:
                await self._process(taken)
            finally:
                self._busy -= owners
                if self.workers > 1:
                    self.inbox.poke()

    async def _process(self, taken: list[In | EndMarker]) -> None:
        loop = asyncio.get_running_loop()
        batch = [item for item in taken if not item.job.cancelled]
        work: list[In] = [item for item in batch if not isinstance(item, EndMarker)]
        outputs: list[Out | EndMarker] = []
        if work:
            outputs.extend(await self._compute(loop, work))
        for item in batch:
            if isinstance(item, EndMarker):
                try:
                    marker = (
                        await loop.run_in_executor(self._executor, self._finish, item)
                        if self._finish
                        else item
                    )
                except Exception as exc:
                    self._fail(item.job, exc)
                    continue
                outputs.append(marker)
        for output in outputs:
            if not output.job.cancelled:
                try:
                    self._emit(output)
                except Exception as exc:
                    self._fail(output.job, exc)

    def _fail(self, job: Job, exc: Exception) -> None:
        """One context's failure must never end the worker that serves all the others."""
        logger.error("%s stage failed for context %r", self.name, job.context, exc_info=exc)
        error = SynthesisError(f"{self.name} failed for context {job.context!r}: {exc}")
        error.__cause__ = exc
        self._on_failure(job, error)

    async def _compute(self, loop: asyncio.AbstractEventLoop, work: list[In]) -> list[Out]:
        started = time.perf_counter()
        try:
            outputs: list[Out] = await loop.run_in_executor(self._executor, self._work, work)
        except Exception as exc:
            if len(work) == 1:
                self._fail(work[0].job, exc)
                return []
            # Isolate the culprit so one bad segment cannot fail its batch-mates.
            outputs = []
            for item in work:
                outputs.extend(await self._compute(loop, [item]))
            return outputs
        self._metrics.stage_seconds.labels(stage=self.name).observe(time.perf_counter() - started)
        self._metrics.batch_items.labels(stage=self.name).observe(len(work))
        return outputs

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run `function` on this stage's own thread (with one worker, the thread that serves items)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Pipeline:
    """The four stages, their queues, and the operations a connection needs: submit, end, cancel."""

    STAGES = ("g2p", "acoustic", "vocoder", "encoder")

    def __init__(
        self,
        *,
        g2p: EnglishG2P,
        engine: Engine,
        voices: VoiceBank,
        metrics: SpeakdMetrics,
        lane_limit: int,
        batching: BatchLimits | None = None,
        encoder_workers: int = 1,
    ) -> None:
        """`batching` bounds the acoustic and vocoder stages' batches (cost = frames, padded); G2P and
        the encoder work item by item, so a batch would only delay its first item's output. Opus costs
        about 1.5 % of a core per live stream: `encoder_workers` threads encode contexts in parallel
        (opuslib releases the GIL), which a GPU serving hundreds of streams needs."""
        self._g2p = g2p
        self._engine = engine
        self._voices = voices
        # Learnt in the vocoder thread, read by the acoustic thread to size first windows.
        self._vocoder_speed = VocoderSpeed(INITIAL_VOCODER_COST)
        # Text waiting for G2P is bounded per context by the connection's text budget; the other
        # queues hold at most `lane_limit` items per context (a few more where one item expands).
        self._text_queue: FairQueue[TextItem | EndMarker] = FairQueue(None)
        self._phoneme_queue: FairQueue[PhonemesItem | EndMarker] = FairQueue(lane_limit, _phoneme_frames)
        self._feature_queue: FairQueue[FeaturesItem | EndMarker] = FairQueue(lane_limit, _window_frames)
        self._waveform_queue: FairQueue[WaveformItem | EndMarker] = FairQueue(lane_limit)

        def stage(
            name: str,
            work: Callable[[list[In]], list[Out]],
            inbox: FairQueue[In | EndMarker],
            outbox: FairQueue[Out | EndMarker] | None,
            emit: Callable[[Out | EndMarker], None],
            finish: Callable[[EndMarker], EndMarker] | None = None,
            limits: BatchLimits | None = None,
            workers: int = 1,
        ) -> Stage[In, Out]:
            depth = metrics.stage_queue_depth.labels(stage=name)
            depth.set_function(lambda: float(len(inbox)))
            return Stage(
                name,
                work,
                inbox,
                outbox,
                emit,
                limits=limits or BatchLimits(1),
                metrics=metrics,
                on_failure=self._fail,
                finish=finish,
                workers=workers,
            )

        self._stages: list[Stage[Any, Any]] = [
            stage("g2p", self._phonemize, self._text_queue, *self._into(self._phoneme_queue)),
            stage(
                "acoustic",
                self._acoustic,
                self._phoneme_queue,
                *self._into(self._feature_queue),
                limits=batching,
            ),
            stage(
                "vocoder",
                self._vocode,
                self._feature_queue,
                *self._into(self._waveform_queue),
                limits=batching,
            ),
            stage(
                "encoder",
                self._encode,
                self._waveform_queue,
                None,
                self._deliver,
                self._encode_tail,
                workers=encoder_workers,
            ),
        ]
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(stage.run(), name=f"stage-{stage.name}-{worker}")
            for stage in self._stages
            for worker in range(stage.workers)
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for stage in self._stages:
            stage.close()

    async def warm_up(self, requests: Sequence[AcousticRequest]) -> None:
        """One synthesis on the acoustic and vocoder stages' own threads, before serving: lazy
        allocations and kernel choices are made there, and on a GPU in those threads' own CUDA streams,
        whose cached memory then serves clients (a warm-up on another thread would leave its memory
        cached for a stream nobody uses again)."""
        acoustic, vocoder = self._stages[1], self._stages[2]
        features = await acoustic.call(self._engine.acoustic, requests)
        await vocoder.call(self._engine.vocode, features)

    def submit(self, job: Job, text: str) -> None:
        item = TextItem(job, text, first=job.texts_submitted == 0)
        job.texts_submitted += 1
        job.submitted_chars += len(text)
        self._text_queue.put_nowait(job, item, urgent=item.first)

    def end(self, job: Job) -> None:
        self._text_queue.put_nowait(job, EndMarker(job), urgent=True)

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        for stage in self._stages:
            stage.inbox.discard(job)

    def depths(self) -> dict[str, int]:
        return {stage.name: len(stage.inbox) for stage in self._stages}

    # -- wiring --------------------------------------------------------------------------------

    @staticmethod
    def _into(
        queue: FairQueue[In | EndMarker],
    ) -> tuple[FairQueue[In | EndMarker], Callable[[In | EndMarker], None]]:
        """A queue and the function that feeds it, for a stage's outbox and emit."""

        def emit(item: In | EndMarker) -> None:
            queue.put_nowait(item.job, item, urgent=_is_urgent(item))

        return queue, emit

    @staticmethod
    def _deliver(item: EncodedSegment | EndMarker) -> None:
        if isinstance(item, EndMarker):
            item.job.sink.finish(item.job, item.tail)
        else:
            item.job.sink.deliver(item.job, item)

    def _fail(self, job: Job, error: SynthesisError) -> None:
        if not job.cancelled:
            self.cancel(job)
            job.sink.fail(job, error)

    # -- stage work, each run in its stage's thread ------------------------------------------------

    def _phonemize(self, items: list[TextItem]) -> list[PhonemesItem]:
        out = []
        for item in items:
            chunks = self._g2p(item.text, item.job.lang)
            for chunk in chunks:
                out.append(PhonemesItem(item.job, item.job.segments_made, chunk.text, chunk.tokens))
                item.job.segments_made += 1
            item.job.retired_chars += len(item.text)
        return out

    def _acoustic(self, items: list[PhonemesItem]) -> list[FeaturesItem]:
        requests = [
            AcousticRequest(item.tokens, self._voices.style(item.job.voice, len(item.tokens)), item.job.speed)
            for item in items
        ]
        out: list[FeaturesItem] = []
        for item, feats in zip(items, self._engine.acoustic(requests), strict=True):
            # Only a context's first segment is worth splitting: later ones render while earlier
            # audio plays.
            windows = plan_windows(feats, progressive=item.index == 0, vocoder=self._vocoder_speed.cost)
            stitcher = Stitcher()
            out.extend(FeaturesItem(item.job, item.index, item.text, feats, w, stitcher) for w in windows)
        return out

    def _vocode(self, items: list[FeaturesItem]) -> list[WaveformItem]:
        started = time.perf_counter()
        rendered = self._engine.vocode([item.window.slice(item.features) for item in items])
        # A batch costs what its padded size does: its items, each as long as the longest.
        longest = max(item.window.render_end - item.window.render_start for item in items)
        self._vocoder_speed.observe(len(items) * longest, time.perf_counter() - started)
        return [
            WaveformItem(
                item.job,
                item.index,
                item.text,
                item.stitcher.add(item.window, wave),
                last_part=item.window.last,
            )
            for item, wave in zip(items, rendered, strict=True)
        ]

    @staticmethod
    def _encode(items: list[WaveformItem]) -> list[EncodedSegment]:
        return [
            EncodedSegment(
                item.job,
                item.index,
                item.text,
                item.job.encoder.encode(item.audio, end_of_segment=item.last_part),
            )
            for item in items
        ]

    @staticmethod
    def _encode_tail(marker: EndMarker) -> EndMarker:
        return EndMarker(marker.job, marker.job.encoder.finish())
