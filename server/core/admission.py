"""Admission by measured capacity: one stream more than the box keeps real-time would make every
listener stall, so a new utterance that would be one too many is refused, or queued, as configured.

`limits.admission = "refuse"` answers `overloaded` with a retry hint at once. With `"queue"`, the
utterance opens (the client may stream its text already; the utterance holds it, bounded by the text
budget) and waits, first come first served, until the streams playing plus one fit in
`limits.admission_headroom` of the capacity again; then its text goes to the pipeline in order. A
waiter that outlasts `limits.admission_queue_timeout_s` gets `overloaded` with a retry hint, and a
full queue (`limits.admission_queue_max`) refuses at once. Waiting is one task for the whole queue,
woken when an utterance ends and every `RECHECK_S`: a stream also stops counting when its
listener's audio runs out, which no event marks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Sequence

from speakd.protocol import DoneReason, ErrorCode
from speakd.server.config import LimitsSection
from speakd.server.core.errors import RequestRefused
from speakd.server.core.utterance import Utterance
from speakd.server.metrics import SpeakdMetrics

logger = logging.getLogger(__name__)

RECHECK_S = 0.25
"""How often waiters look again without a wake-up: streams also go quiet as their audio plays out."""
RESERVE_S = 2.0
"""An utterance let in from the queue counts as a stream this long before its first segment reaches
the pipeline, so one free place does not let the whole queue in while their texts are on the way."""


class Admission:
    """The admission check, and the queue of utterances waiting for a place (queue mode)."""

    def __init__(
        self,
        limits: LimitsSection,
        *,
        capacity: Callable[[], float | None],
        streams: Callable[[], Sequence[Utterance]],
        metrics: SpeakdMetrics,
    ) -> None:
        """`capacity` is the real-time streams the box keeps up with (None until measured); `streams`
        the utterances that are real-time streams now."""
        self._limits = limits
        self._capacity = capacity
        self._streams = streams
        self._waiting: dict[Utterance, float] = {}  # in arrival order -> deadline (loop time)
        self._reserved: dict[Utterance, float] = {}  # let in from the queue -> when (loop time)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        metrics.admission_queued.set_function(lambda: float(len(self._waiting)))

    @property
    def queued(self) -> int:
        """Utterances waiting for a place now."""
        return len(self._waiting)

    def must_wait(self, context: str | None = None) -> bool:
        """Whether a new utterance has to wait for a place (queue mode); raises `RequestRefused`
        (`overloaded`, with a retry hint) when it may not have one: refuse mode, or a full queue."""
        refusal = self._refusal(context)
        if self._limits.admission != "queue":
            if refusal is not None:
                raise refusal
            return False
        if refusal is None and not self._waiting:
            return False
        limit = self._limits.admission_queue_max
        if len(self._waiting) >= limit:
            retry_s = self._retry_after_s()
            raise RequestRefused(
                ErrorCode.OVERLOADED,
                f"the daemon is at capacity and {limit} contexts are already waiting; retry in {retry_s} s",
                context,
                retry_after_s=retry_s,
            )
        return True  # behind those already waiting even if there is room now: first come, first served

    def enqueue(self, utterance: Utterance) -> None:
        """`utterance` (opened held) waits for a place; the queue's task starts with its first waiter."""
        loop = asyncio.get_running_loop()
        self._waiting[utterance] = loop.time() + self._limits.admission_queue_timeout_s
        logger.debug("context %r queued for admission (%d waiting)", utterance.name, len(self._waiting))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="speakd-admission")
        self._wake.set()

    def discard(self, utterance: Utterance) -> None:
        """An utterance ended (cancelled, dropped, done): it leaves the queue, and its place may be free."""
        self._waiting.pop(utterance, None)
        self._reserved.pop(utterance, None)
        if self._waiting:
            self._wake.set()

    def poke(self) -> None:
        """Look at the waiters now: a place may have come free."""
        if self._waiting:
            self._wake.set()

    async def close(self) -> None:
        """Daemon stop: every waiter gets `shutting_down` (then `Finished`, reason cancel), none is let in."""
        self._closed = True
        for utterance in list(self._waiting):
            self._waiting.pop(utterance, None)
            utterance.abort(ErrorCode.SHUTTING_DOWN, "the daemon is stopping", DoneReason.CANCEL)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- the check ----------------------------------------------------------------------------------

    def _refusal(self, context: str | None) -> RequestRefused | None:
        """The refusal one more stream would get now, or None if it fits; at least one always fits."""
        headroom = self._limits.admission_headroom
        capacity = self._capacity()
        if headroom <= 0 or capacity is None:
            return None
        active = list(self._streams())
        count = len(active) + self._reserved_count()
        if count == 0 or count + 1 <= capacity * headroom:
            return None
        retry_s = self._retry_after_s(active)
        playing = "1 stream is" if count == 1 else f"{count} streams are"
        return RequestRefused(
            ErrorCode.OVERLOADED,
            f"the daemon is at capacity: {playing} playing and this machine keeps "
            f"about {capacity:.1f} going in real time (measured); retry in {retry_s} s",
            context,
            retry_after_s=retry_s,
        )

    def _retry_after_s(self, active: Sequence[Utterance] | None = None) -> int:
        """Whole seconds until the first stream playing now may run out of audio (at least 1)."""
        active = list(self._streams()) if active is None else active
        return max(1, math.ceil(min((u.audio_in_hand_s for u in active), default=1.0)))

    def _reserved_count(self) -> int:
        """Utterances let in lately that have no work in the pipeline yet (see RESERVE_S)."""
        if not self._reserved:
            return 0
        now = asyncio.get_running_loop().time()
        for utterance, at in list(self._reserved.items()):
            if utterance.closed or utterance.submitted_any or now - at >= RESERVE_S:
                del self._reserved[utterance]
        return len(self._reserved)

    # -- the queue's task ---------------------------------------------------------------------------

    async def _run(self) -> None:
        """Let waiters in while they fit, time out those that waited too long; exits when none is left."""
        loop = asyncio.get_running_loop()
        while self._waiting and not self._closed:
            try:
                self._admit_fitting()
                self._expire(loop.time())
            except Exception:
                # A bug must not strand the waiters: log it and look again at the next re-check.
                logger.exception("admission check failed")
            if not self._waiting:
                break
            self._wake.clear()
            next_deadline = min(self._waiting.values())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(RECHECK_S, next_deadline - loop.time()))):
                    await self._wake.wait()

    def _admit_fitting(self) -> None:
        """Let in waiters from the head of the queue while one more still fits."""
        now = asyncio.get_running_loop().time()
        while self._waiting:
            utterance = next(iter(self._waiting))
            if self._refusal(utterance.name) is not None:
                return
            waited_s = self._limits.admission_queue_timeout_s - (self._waiting.pop(utterance) - now)
            # Counted from now: as a stream once its text is in the pipeline, until then as reserved.
            self._reserved[utterance] = now
            try:
                utterance.admit()
            except Exception:
                # A bug must cost this utterance, not every waiter behind it.
                logger.exception("admitting context %r failed", utterance.name)
                utterance.abort(ErrorCode.INTERNAL, "internal error; see the daemon's log")
            else:
                logger.debug("context %r admitted after %.1f s in the queue", utterance.name, waited_s)

    def _expire(self, now: float) -> None:
        for utterance, deadline in list(self._waiting.items()):
            if deadline > now:
                continue
            del self._waiting[utterance]
            retry_s = self._retry_after_s()
            waited = self._limits.admission_queue_timeout_s
            logger.info("context %r waited %g s for admission; refused", utterance.name, waited)
            utterance.abort(
                ErrorCode.OVERLOADED,
                f"the daemon stayed at capacity for the {waited:g} s this context may wait; "
                f"retry in {retry_s} s",
                DoneReason.ERROR,
                retry_after_s=retry_s,
            )
