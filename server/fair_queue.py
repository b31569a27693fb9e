"""A bounded queue that serves contexts in turn, so one long reader never starves a new listener."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Per-owner FIFO lanes served round-robin; urgent items (a context's first audio) go first.

    Order within one owner is always kept. `discard` drops an owner's queued items at once, which
    is how a cancel reaches work that has not started yet. Waiting follows asyncio.Queue: futures
    woken synchronously, so `discard` and `put_nowait` can be called from plain callbacks.
    """

    def __init__(self, maxsize: int | None) -> None:
        self._maxsize = maxsize
        self._lanes: dict[Hashable, deque[tuple[T, bool]]] = {}
        self._turns: deque[Hashable] = deque()
        self._size = 0
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return self._size

    def full(self) -> bool:
        return self._maxsize is not None and self._size >= self._maxsize

    async def put(self, owner: Hashable, item: T, *, urgent: bool = False) -> None:
        """Append to the owner's lane, waiting while the queue is full (back-pressure)."""
        while self.full():
            await self._wait(self._putters)
        self._append(owner, item, urgent)

    def put_nowait(self, owner: Hashable, item: T, *, urgent: bool = False) -> None:
        """Append without waiting; for queues whose growth is bounded by the caller."""
        if self.full():
            raise asyncio.QueueFull
        self._append(owner, item, urgent)

    async def get_batch(self, max_items: int) -> list[T]:
        """Wait for at least one item, then take up to `max_items` in serving order."""
        while not self._size:
            await self._wait(self._getters)
        batch = [self._pop() for _ in range(min(max_items, self._size))]
        self._wake_one(self._putters)
        return batch

    def discard(self, owner: Hashable) -> int:
        """Drop everything queued for `owner`; returns how many items went."""
        lane = self._lanes.pop(owner, None)
        if not lane:
            return 0
        self._turns.remove(owner)
        self._size -= len(lane)
        for _ in lane:
            self._wake_one(self._putters)
        return len(lane)

    def _append(self, owner: Hashable, item: T, urgent: bool) -> None:
        lane = self._lanes.get(owner)
        if lane is None:
            lane = self._lanes[owner] = deque()
            self._turns.append(owner)
        lane.append((item, urgent))
        self._size += 1
        self._wake_one(self._getters)

    def _pop(self) -> T:
        owner = next((o for o in self._turns if self._lanes[o][0][1]), self._turns[0])
        self._turns.remove(owner)
        lane = self._lanes[owner]
        item, _ = lane.popleft()
        self._size -= 1
        if lane:
            self._turns.append(owner)
        else:
            del self._lanes[owner]
        return item

    async def _wait(self, waiters: deque[asyncio.Future[None]]) -> None:
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter in waiters:
                waiters.remove(waiter)
            elif not waiter.cancelled():
                # Woken, then cancelled before running: pass the wake-up on, as asyncio.Queue does.
                self._wake_one(waiters)
            raise

    @staticmethod
    def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
