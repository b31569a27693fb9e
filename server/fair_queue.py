"""Per-context queues between stages, served in turn, so one long reader never starves a new listener."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Per-owner FIFO lanes served round-robin, a lane whose head is urgent first, each lane bounded.

    Order within one owner is always kept. Lanes, not the queue, are bounded: a stage takes work
    only for owners whose lane in the next queue has room (`get_batch(eligible=...)`), so it never
    blocks holding one context's item while another context's first segment waits behind it, and
    a long reader runs at most `lane_limit` items ahead per stage. `discard` drops an owner's
    queued items at once, which is how a cancel reaches work that has not started yet.
    """

    def __init__(self, lane_limit: int | None) -> None:
        self._lane_limit = lane_limit
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
        lane = self._lanes.get(owner)
        if lane is None:
            lane = self._lanes[owner] = deque()
            self._turns.append(owner)
        lane.append((item, urgent))
        self._size += 1
        self.poke()

    async def get_batch(self, max_items: int, eligible: Callable[[Hashable], bool] | None = None) -> list[T]:
        """Wait for items of eligible owners, then take up to `max_items` in serving order."""
        while True:
            batch = self._take(max_items, eligible)
            if batch:
                self._taken()
                return batch
            waiter = asyncio.get_running_loop().create_future()
            self._getters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._getters:
                    self._getters.remove(waiter)

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

    def _take(self, max_items: int, eligible: Callable[[Hashable], bool] | None) -> list[T]:
        batch: list[T] = []
        taken: set[Hashable] = set()
        while len(batch) < max_items:
            # With a downstream bound, one item per owner per batch: room is checked before taking.
            candidates = [o for o in self._turns if eligible is None or (o not in taken and eligible(o))]
            if not candidates:
                break
            owner = next((o for o in candidates if self._lanes[o][0][1]), candidates[0])
            taken.add(owner)
            batch.append(self._pop(owner))
        return batch

    def _pop(self, owner: Hashable) -> T:
        self._turns.remove(owner)
        lane = self._lanes[owner]
        item, _ = lane.popleft()
        self._size -= 1
        if lane:
            self._turns.append(owner)
        else:
            del self._lanes[owner]
        return item

    def _taken(self) -> None:
        for callback in self._on_take:
            callback()
