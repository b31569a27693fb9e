"""FairQueue: per-owner order, round-robin between owners, urgent first, bounded, discard."""

from __future__ import annotations

import asyncio

import pytest

from speakd.server.fair_queue import FairQueue


async def drain(queue: FairQueue[str]) -> list[str]:
    out: list[str] = []
    while len(queue):
        out.extend(await queue.get_batch(1))
    return out


async def test_owners_take_turns_and_keep_their_order() -> None:
    queue: FairQueue[str] = FairQueue(None)
    for i in range(3):
        queue.put_nowait("a", f"a{i}")
    queue.put_nowait("b", "b0")
    queue.put_nowait("b", "b1")
    assert await drain(queue) == ["a0", "b0", "a1", "b1", "a2"]


async def test_urgent_item_jumps_ahead_of_long_reader() -> None:
    queue: FairQueue[str] = FairQueue(None)
    for i in range(5):
        queue.put_nowait("long", f"l{i}")
    queue.put_nowait("new", "first", urgent=True)
    assert (await queue.get_batch(1)) == ["first"]


async def test_batch_takes_up_to_max_items() -> None:
    queue: FairQueue[str] = FairQueue(None)
    for i in range(5):
        queue.put_nowait("a", f"a{i}")
    assert await queue.get_batch(3) == ["a0", "a1", "a2"]
    assert len(queue) == 2


async def test_put_waits_while_full_and_resumes_after_get() -> None:
    queue: FairQueue[str] = FairQueue(2)
    await queue.put("a", "1")
    await queue.put("a", "2")
    blocked = asyncio.create_task(queue.put("a", "3"))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait("a", "x")
    assert await queue.get_batch(1) == ["1"]
    await asyncio.wait_for(blocked, 1)
    assert await drain(queue) == ["2", "3"]


async def test_discard_drops_only_that_owner_and_frees_room() -> None:
    queue: FairQueue[str] = FairQueue(3)
    await queue.put("a", "a0")
    await queue.put("b", "b0")
    await queue.put("a", "a1")
    blocked = asyncio.create_task(queue.put("c", "c0"))
    await asyncio.sleep(0.01)
    assert queue.discard("a") == 2
    await asyncio.wait_for(blocked, 1)
    assert await drain(queue) == ["b0", "c0"]
    assert queue.discard("nobody") == 0


async def test_getter_wakes_on_put_and_cancelled_getter_loses_nothing() -> None:
    queue: FairQueue[str] = FairQueue(None)
    cancelled = asyncio.create_task(queue.get_batch(1))
    waiting = asyncio.create_task(queue.get_batch(1))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    queue.put_nowait("a", "x")
    assert await asyncio.wait_for(waiting, 1) == ["x"]
