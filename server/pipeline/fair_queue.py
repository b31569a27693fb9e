"""Per-context queues between stages, served in turn, so one long reader never starves a new listener."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """How big a batch a stage takes, and how long it may wait for batch-mates.

    `max_cost` bounds the batch as padded: batch size x its largest item's cost (a batched model pads
    every item to the longest), so a long item cannot blow up memory with many short ones; a single
    item over the bound still goes, alone (segments are bounded by pipeline.max_segment_chars). A
    batch holding an urgent item (a context's first segment) never waits for batch-mates, and an
    urgent item arriving while a batch waits ends the wait: batching must not cost time to first
    audio.
    """

    max_items: int
    max_cost: int | None = None
    linger_s: float = 0.0


class FairQueue(Generic[T]):
    """Per-owner FIFO lanes served earliest deadline first, a lane whose head is urgent before all,
    round-robin among equals; each lane bounded.

    Order within one owner is always kept. Lanes, not the queue, are bounded: a stage takes work
    only for owners whose lane in the next queue has room (`get_batch(eligible=...)`), so it never
    blocks holding one context's item while another context's first segment waits behind it, and
    a long reader runs at most `lane_limit` items ahead per stage. `discard` drops an owner's
    queued items at once, which is how a cancel reaches work that has not started yet.

    `deadline(owner)` says when an owner's listener runs out of audio (see `PlaybackClock`): the
    lane due soonest goes first, so a listener with seconds in hand yields to one about to run dry.
    Owners due at the same time keep the round-robin order.
    """

    def __init__(
        self,
        lane_limit: int | None,
        cost: Callable[[T], int] | None = None,
        deadline: Callable[[Hashable], float] | None = None,
    ) -> None:
        self._lane_limit = lane_limit
        self._cost = cost
        self._deadline = deadline
        self._lanes: dict[Hashable, deque[tuple[T, bool]]] = {}
        self._turns: deque[Hashable] = deque()
        self._size = 0
        self._getters: deque[asyncio.Future[None]] = deque()
        self._on_take: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return self._size

    def has_room(self, owner: Hashable) -> bool:
        """Whether `owner` may send another item; unbounded queues always have room."""
        lane = self._lanes.get(owner)
        return self._lane_limit is None or lane is None or len(lane) < self._lane_limit

    def on_take(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever items leave (taken or discarded): room may have opened upstream."""
        self._on_take.append(callback)

    def put_nowait(self, owner: Hashable, item: T, *, urgent: bool = False) -> None:
        """Append; never waits. Callers check `has_room` first (one item may expand into a few)."""
        self._lane(owner).append((item, urgent))
        self._size += 1
        self.poke()

    def put_front(self, owner: Hashable, item: T) -> None:
        """Put `item` back at the head of `owner`'s lane (the rest of what it was taken for)."""
        self._lane(owner).appendleft((item, False))
        self._size += 1
        self.poke()

    def _lane(self, owner: Hashable) -> deque[tuple[T, bool]]:
        """`owner`'s lane, opened (and given the last turn) if it has none."""
        lane = self._lanes.get(owner)
        if lane is None:
            lane = self._lanes[owner] = deque()
            self._turns.append(owner)
        return lane

    async def get_batch(
        self, limits: BatchLimits | int, eligible: Callable[[Hashable], bool] | None = None
    ) -> list[T]:
        """Wait for items of eligible owners, then take a batch within `limits` in serving order.

        With `limits.linger_s`, a batch that is not full and holds no urgent item waits up to that
        long for more items (taking them as they come); an urgent arrival ends the wait at once."""
        if isinstance(limits, int):
            limits = BatchLimits(limits)
        batch = _Batch[T](limits, self._cost)
        while not batch.items:
            self._take(batch, eligible)
            if not batch.items:
                await self._wait()
        self._taken()
        if limits.linger_s > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + limits.linger_s
            while not batch.urgent and not batch.full and (left := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(left):
                        await self._wait()
                except TimeoutError:
                    break
                if self._take(batch, eligible):
                    self._taken()
        return batch.items

    async def _wait(self) -> None:
        """Until the next put or poke."""
        waiter = asyncio.get_running_loop().create_future()
        self._getters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._getters:
                self._getters.remove(waiter)

    def holds(self, owner: Hashable) -> bool:
        """Whether anything of `owner`'s is queued here."""
        return owner in self._lanes

    def lane_lengths(self) -> dict[Hashable, int]:
        """Items queued per owner, for metrics and tests."""
        return {owner: len(lane) for owner, lane in self._lanes.items()}

    def poke(self) -> None:
        """Wake waiting getters to look again (new items, or room opened downstream)."""
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def discard(self, owner: Hashable) -> int:
        """Drop everything queued for `owner`; returns how many items went."""
        lane = self._lanes.pop(owner, None)
        if not lane:
            return 0
        self._turns.remove(owner)
        self._size -= len(lane)
        self._taken()
        return len(lane)

    def _take(self, batch: _Batch[T], eligible: Callable[[Hashable], bool] | None) -> int:
        """Move items into `batch` while they fit; returns how many were taken."""
        taken = 0
        while not batch.full:
            # With a downstream bound, one item per owner per batch: room is checked before taking.
            candidates = [
                o for o in self._turns if eligible is None or (o not in batch.owners and eligible(o))
            ]
            if not candidates:
                break
            owner = next((o for o in candidates if self._lanes[o][0][1]), None)
            if owner is None:
                # min keeps the first of equals: the round-robin order breaks ties.
                owner = min(candidates, key=self._deadline) if self._deadline else candidates[0]
            item, urgent = self._lanes[owner][0]
            if not batch.fits(item):
                # Serving order stops here: waiting longer would only hold this item (urgent or not).
                batch.closed = True
                break
            self._pop(owner)
            batch.add(owner, item, urgent)
            taken += 1
        return taken

    def _pop(self, owner: Hashable) -> None:
        self._turns.remove(owner)
        lane = self._lanes[owner]
        lane.popleft()
        self._size -= 1
        if lane:
            self._turns.append(owner)
        else:
            del self._lanes[owner]

    def _taken(self) -> None:
        for callback in self._on_take:
            callback()


class _Batch(Generic[T]):
    """A batch being gathered: its items, owners, padded cost and whether it holds urgent work."""

    def __init__(self, limits: BatchLimits, cost: Callable[[T], int] | None) -> None:
        self.items: list[T] = []
        self.owners: set[Hashable] = set()
        self.urgent = False
        self.closed = False  # the next item in serving order does not fit
        self._limits = limits
        self._cost = cost
        self._widest = 0

    @property
    def full(self) -> bool:
        """Nothing more can join: the count is reached, the next item does not fit, or no item could
        (every item pads to at least the widest one)."""
        limit = self._limits.max_cost
        padded_out = limit is not None and (len(self.items) + 1) * self._widest > limit
        return self.closed or padded_out or len(self.items) >= self._limits.max_items

    def fits(self, item: T) -> bool:
        """Whether `item` keeps the padded cost within bounds; the first item always fits."""
        if not self.items or self._limits.max_cost is None or self._cost is None:
            return True
        widest = max(self._widest, self._cost(item))
        return (len(self.items) + 1) * widest <= self._limits.max_cost

    def add(self, owner: Hashable, item: T, urgent: bool) -> None:
        self.items.append(item)
        self.owners.add(owner)
        self.urgent = self.urgent or urgent
        if self._cost is not None:
            self._widest = max(self._widest, self._cost(item))
