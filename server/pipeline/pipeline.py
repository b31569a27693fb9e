"""The synthesis pipeline: the engine's stages, then the encoder, joined by bounded fair queues.

The pipeline knows stages, not models: an engine supplies its stages as `StageSpec`s (Kokoro's are
G2P → acoustic → vocoder), taking `TextItem`s in and giving `WaveformItem`s out; the pipeline adds
the encoder stage and delivers to each job's sink. Each stage owns its worker task(s) and thread(s),
stages overlap (one segment is vocoded while the next one's acoustic pass runs), and a job's items
stay in order because each stage serves a job's lane first in, first out. A cancel marks the job and
drops its queued items in every stage; work already running finishes and is thrown away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from speakd.server.errors import SynthesisError
from speakd.server.metrics import SpeakdMetrics
from speakd.server.pipeline.capacity import CapacityMeter
from speakd.server.pipeline.fair_queue import BatchLimits, FairQueue
from speakd.server.pipeline.job import EncodedSegment, EndMarker, Job, TextItem, WaveformItem
from speakd.server.pipeline.stage import Item, Stage, StageSpec

logger = logging.getLogger(__name__)

WarmUpStep = tuple[str, Callable[[Any], Any]]
"""A stage name and a function to run on that stage's thread; each step gets the previous one's result."""


def _deadline(owner: Hashable) -> float:
    """When a lane's listener needs its next audio: the fair queues serve the earliest first."""
    assert isinstance(owner, Job)
    return owner.playback.deadline


def _is_urgent(item: Item) -> bool:
    """A job's first segment jumps the queue (time to first audio matters most), and so does its end
    marker, which costs nothing and lets `done` go out as soon as the audio has."""
    if isinstance(item, EndMarker):
        return True
    if isinstance(item, TextItem):
        return item.first
    return getattr(item, "index", None) == 0


class Pipeline:
    """The engine's stages and the encoder, their queues, and what a door needs: submit, end, cancel."""

    def __init__(
        self,
        *,
        stages: Sequence[StageSpec],
        metrics: SpeakdMetrics,
        lane_limit: int,
        batching: BatchLimits | None = None,
        encoder_workers: int = 1,
        sample_rate: int = 24000,
    ) -> None:
        """`batching` bounds the batches of the stages that batch (cost = their `cost`, padded); the
        others and the encoder work item by item. Opus costs about 1.5 % of a core per live stream:
        `encoder_workers` threads encode jobs in parallel (opuslib and PyAV release the GIL), which a
        GPU serving hundreds of streams needs. `sample_rate` is the engine's, to time the listeners'
        playback (each job's deadline) from the waveforms its last stage makes."""
        if not stages:
            raise ValueError("an engine must supply at least one stage")
        self._metrics = metrics
        self._sample_rate = sample_rate
        self.capacity = CapacityMeter()
        # Text waiting for the first stage is bounded per job by the utterance's text budget; the
        # other queues hold at most `lane_limit` items per job (a few more where one item expands).
        inboxes: list[FairQueue[Any]] = [FairQueue(None, deadline=_deadline)]
        inboxes += [FairQueue(lane_limit, spec.cost, _deadline) for spec in stages[1:]]
        encoder_inbox: FairQueue[WaveformItem | EndMarker] = FairQueue(lane_limit, deadline=_deadline)
        self._text_queue: FairQueue[TextItem | EndMarker] = inboxes[0]
        self._encoder_inbox = encoder_inbox
        outboxes: list[FairQueue[Any]] = [*inboxes[1:], encoder_inbox]
        self._stages: list[Stage[Any, Any]] = []
        for spec, inbox, outbox in zip(stages, inboxes, outboxes, strict=True):
            self._stages.append(
                self._stage(
                    spec.name,
                    spec.work,
                    inbox,
                    outbox.has_room,
                    self._into(outbox) if outbox is not encoder_inbox else self._produced,
                    limits=(batching or BatchLimits(1)) if spec.batched else BatchLimits(1),
                )
            )
            outbox.on_take(inbox.poke)
        self._stages.append(
            self._stage(
                "encoder",
                self._encode,
                encoder_inbox,
                lambda job: job.sink.has_room(),
                self._deliver,
                finish=self._encode_tail,
                workers=encoder_workers,
            )
        )
        self._tasks: list[asyncio.Task[None]] = []
        metrics.load.set_function(self.load)  # until a core, which knows the streams, takes it over
        metrics.capacity_streams.set_function(lambda: min(self.capacity.streams() or 0.0, 1e6))

    def _stage(
        self,
        name: str,
        work: Callable[[list[Any]], list[Any]],
        inbox: FairQueue[Any],
        has_room: Callable[[Job], bool],
        emit: Callable[[Any], None],
        *,
        limits: BatchLimits | None = None,
        finish: Callable[[EndMarker], EndMarker] | None = None,
        workers: int = 1,
    ) -> Stage[Any, Any]:
        depth = self._metrics.stage_queue_depth.labels(stage=name)
        depth.set_function(lambda: float(len(inbox)))
        return Stage(
            name,
            work,
            inbox,
            has_room,
            emit,
            limits=limits or BatchLimits(1),
            metrics=self._metrics,
            on_failure=self._fail,
            finish=finish,
            workers=workers,
            on_computed=self.capacity.computed,
        )

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self._stages]

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

    async def warm_up(self, steps: Sequence[WarmUpStep], first_input: Any) -> None:
        """Run the engine's warm-up on its stages' own threads, before serving: lazy allocations and
        kernel choices are made there, and on a GPU in those threads' own CUDA streams, whose cached
        memory then serves clients (a warm-up on another thread would leave its memory cached for a
        stream nobody uses again)."""
        stages = {stage.name: stage for stage in self._stages}
        value = first_input
        for name, function in steps:
            value = await stages[name].call(function, value)

    def submit(self, job: Job, text: str, offset: int = 0, speed: float | None = None) -> None:
        """Queue `text`, which starts at code point `offset` of all the text `job` was fed, spoken at
        `speed` (None: the job's)."""
        job.playback.submitted()
        item = TextItem(job, text, first=job.texts_submitted == 0, offset=offset, speed=speed)
        job.texts_submitted += 1
        job.submitted_chars += len(text)
        self._text_queue.put_nowait(job, item, urgent=item.first)

    def end(self, job: Job) -> None:
        self._text_queue.put_nowait(job, EndMarker(job), urgent=True)

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        for stage in self._stages:
            stage.inbox.discard(job)

    def wake(self) -> None:
        """A sink has room again: let the encoder stage look at the jobs it held back."""
        self._encoder_inbox.poke()

    def lanes(self) -> dict[str, dict[Job, int]]:
        """Items queued before each stage, per job."""
        return {
            stage.name: {
                owner: n for owner, n in stage.inbox.lane_lengths().items() if isinstance(owner, Job)
            }
            for stage in self._stages
        }

    def load(self) -> float:
        """The busiest stage's busy fraction over the last seconds (0 idle, 1 saturated: new work
        waits). One stream alone keeps a stage busy while it renders ahead, so this says whether
        work waits, not how many more streams fit (see `SynthesisCore.load`)."""
        return max(stage.busy.fraction() for stage in self._stages)

    def active(self, job: Job) -> bool:
        """Whether `job` holds a share of synthesis capacity: work of its is queued or running in
        some stage, or its listener still has audio to play."""
        return job.playback.playing() or any(
            stage.inbox.holds(job) or stage.working_on(job) for stage in self._stages
        )

    def depths(self) -> dict[str, int]:
        """Items queued before each stage, by stage name: all zero when no work is left anywhere."""
        return {stage.name: len(stage.inbox) for stage in self._stages}

    # -- wiring --------------------------------------------------------------------------------

    @staticmethod
    def _into(queue: FairQueue[Any]) -> Callable[[Item], None]:
        """The function that feeds `queue`, a stage's emit."""

        def emit(item: Item) -> None:
            queue.put_nowait(item.job, item, urgent=_is_urgent(item))

        return emit

    def _produced(self, item: WaveformItem | EndMarker) -> None:
        """The engine's last stage made audio: the listener's clock moves on, then it is encoded."""
        if isinstance(item, WaveformItem):
            seconds = len(item.audio) / self._sample_rate
            item.job.playback.produced(seconds)
            self.capacity.produced(seconds)
        self._encoder_inbox.put_nowait(item.job, item, urgent=_is_urgent(item))

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

    # -- the encoder stage's work, in its threads ----------------------------------------------------

    @staticmethod
    def _encode(items: list[WaveformItem]) -> list[EncodedSegment]:
        return [
            EncodedSegment(
                item.job,
                item.index,
                item.text,
                item.job.encoder.encode(item.audio, end_of_segment=item.last_part),
                item.words,
                item.last_part,
                item.speed,
            )
            for item in items
        ]

    @staticmethod
    def _encode_tail(marker: EndMarker) -> EndMarker:
        return EndMarker(marker.job, marker.job.encoder.finish())
