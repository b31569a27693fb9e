"""One pipeline stage: worker tasks that pull fair batches and compute them in the stage's own threads.

Heavy work never runs on the event loop. A stage takes only items whose job has room downstream (in
the next queue, or at the reader for the last stage), so pushing never waits and a slow reader stalls
only its own lanes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from speakd.server.errors import SynthesisError
from speakd.server.metrics import SpeakdMetrics
from speakd.server.pipeline.busy import BusyMeter
from speakd.server.pipeline.fair_queue import BatchLimits, FairQueue
from speakd.server.pipeline.job import EndMarker, Job

logger = logging.getLogger(__name__)


class Item(Protocol):
    """Anything that flows between stages: it belongs to a job."""

    @property
    def job(self) -> Job: ...


In = TypeVar("In", bound=Item)
Out = TypeVar("Out", bound=Item)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Again:
    """What is left of an item a stage did only part of: it goes back to the head of its job's lane
    in the same stage, so other jobs due sooner may take the stage first (a long segment vocoded
    window by window)."""

    item: Any

    @property
    def job(self) -> Job:
        job: Job = self.item.job
        return job


@dataclass(frozen=True, slots=True)
class StageSpec:
    """What an engine supplies for one of its stages; the pipeline builds queues and workers from it.

    `work` runs in the stage's thread on a batch of items and returns the items for the next stage
    (one in may give several out, or none), and `Again` for work it left for a later turn. `cost` is
    an item's weight in a batch (frames, for padded batches); `batched` stages take batches bounded
    by the pipeline's batch limits, the others one item at a time (a batch would only delay its
    first item's output).
    """

    name: str
    work: Callable[[list[Any]], list[Any]]
    cost: Callable[[Any], int] | None = None
    batched: bool = False


class Stage(Generic[In, Out]):
    """Worker tasks pulling batches from `inbox`, computing in their own threads, pushing onward.

    It takes only items whose job has room downstream (`has_room`), so pushing never waits, and none
    of a job that another of its workers is busy with, so a job's items stay in order (and its
    stateful encoder is used by one thread at a time) however many workers there are.
    """

    def __init__(
        self,
        name: str,
        work: Callable[[list[In]], list[Out | Again]],
        inbox: FairQueue[In | EndMarker],
        has_room: Callable[[Job], bool],
        emit: Callable[[Out | EndMarker], None],
        *,
        limits: BatchLimits,
        metrics: SpeakdMetrics,
        on_failure: Callable[[Job, SynthesisError], None],
        finish: Callable[[EndMarker], EndMarker] | None = None,
        workers: int = 1,
        on_computed: Callable[[float, int], None] | None = None,
    ) -> None:
        """`on_computed(seconds, workers)` hears of every batch computed (the capacity meter)."""
        # A worker lingering for batch-mates holds items its job is not yet marked busy with, so
        # another worker could take that job's next item: lingering needs a single worker.
        assert workers == 1 or limits.linger_s == 0, "a stage with several workers cannot linger"
        self.name = name
        self.inbox = inbox
        self.workers = workers
        self._has_room = has_room
        self._busy: set[Hashable] = set()
        self._work = work
        self._emit = emit
        self._limits = limits
        self._metrics = metrics
        self._on_failure = on_failure
        self._finish = finish
        self._on_computed = on_computed
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"speakd-{name}")
        self.busy = BusyMeter(workers)

    def working_on(self, job: Job) -> bool:
        """Whether one of this stage's workers is computing an item of `job` now."""
        return job in self._busy

    def _eligible(self, owner: Hashable) -> bool:
        assert isinstance(owner, Job)
        return owner not in self._busy and self._has_room(owner)

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
        outputs: list[Out | EndMarker | Again] = []
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
            if isinstance(output, Again):
                if not output.job.cancelled:
                    self.inbox.put_front(output.job, output.item)
            elif not output.job.cancelled:
                try:
                    self._emit(output)
                except Exception as exc:
                    self._fail(output.job, exc)

    def _fail(self, job: Job, exc: Exception) -> None:
        """One job's failure must never end the worker that serves all the others."""
        logger.error("%s stage failed for context %r", self.name, job.context, exc_info=exc)
        error = SynthesisError(f"{self.name} failed for context {job.context!r}: {exc}")
        error.__cause__ = exc
        self._on_failure(job, error)

    async def _compute(self, loop: asyncio.AbstractEventLoop, work: list[In]) -> list[Out | Again]:
        started = time.perf_counter()
        token = self.busy.start()
        try:
            outputs: list[Out | Again] = await loop.run_in_executor(self._executor, self._work, work)
        except Exception as exc:
            self.busy.stop(token)
            if len(work) == 1:
                self._fail(work[0].job, exc)
                return []
            # Isolate the culprit so one bad segment cannot fail its batch-mates.
            outputs = []
            for item in work:
                outputs.extend(await self._compute(loop, [item]))
            return outputs
        self.busy.stop(token)
        elapsed = time.perf_counter() - started
        self._metrics.stage_seconds.labels(stage=self.name).observe(elapsed)
        if self._on_computed is not None:
            self._on_computed(elapsed, self.workers)
        self._metrics.batch_items.labels(stage=self.name).observe(len(work))
        return outputs

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run `function` on this stage's own thread (with one worker, the thread that serves items)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
