"""FairQueue: per-owner order, turns between owners, urgent first, lanes bounded, eligibility, discard."""

from __future__ import annotations

import asyncio

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


async def test_urgent_head_jumps_ahead_of_long_reader() -> None:
    queue: FairQueue[str] = FairQueue(None)
    for i in range(5):
        queue.put_nowait("long", f"l{i}")
    queue.put_nowait("new", "first", urgent=True)
    assert await queue.get_batch(1) == ["first"]


async def test_batch_takes_up_to_max_items() -> None:
    queue: FairQueue[str] = FairQueue(None)
    for i in range(5):
        queue.put_nowait("a", f"a{i}")
    assert await queue.get_batch(3) == ["a0", "a1", "a2"]
    assert len(queue) == 2


async def test_lanes_are_bounded_per_owner() -> None:
    queue: FairQueue[str] = FairQueue(2)
    queue.put_nowait("a", "a0")
    assert queue.has_room("a")
    queue.put_nowait("a", "a1")
    assert not queue.has_room("a")
    assert queue.has_room("b")  # another context is not held back by a's full lane
    await queue.get_batch(1)
    assert queue.has_room("a")


async def test_only_eligible_owners_are_taken_and_a_poke_rechecks() -> None:
    queue: FairQueue[str] = FairQueue(None)
    queue.put_nowait("blocked", "x")
    queue.put_nowait("free", "y")
    allowed = {"free"}
    assert await queue.get_batch(5, allowed.__contains__) == ["y"]
    waiting = asyncio.create_task(queue.get_batch(1, allowed.__contains__))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    allowed.add("blocked")
    queue.poke()
    assert await asyncio.wait_for(waiting, 1) == ["x"]


async def test_taking_and_discarding_notify_upstream() -> None:
    queue: FairQueue[str] = FairQueue(4)
    calls: list[int] = []
    queue.on_take(lambda: calls.append(len(queue)))
    queue.put_nowait("a", "a0")
    queue.put_nowait("b", "b0")
    queue.put_nowait("a", "a1")
    await queue.get_batch(1)
    assert queue.discard("a") == 1
    assert queue.discard("nobody") == 0
    assert calls == [2, 1]
    assert await drain(queue) == ["b0"]


async def test_getter_wakes_on_put_and_cancelled_getter_loses_nothing() -> None:
    queue: FairQueue[str] = FairQueue(None)
    cancelled = asyncio.create_task(queue.get_batch(1))
    waiting = asyncio.create_task(queue.get_batch(1))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    queue.put_nowait("a", "x")
    assert await asyncio.wait_for(waiting, 1) == ["x"]


async def test_a_bounded_batch_takes_one_item_per_owner() -> None:
    queue: FairQueue[str] = FairQueue(None)
    for i in range(3):
        queue.put_nowait("a", f"a{i}")
    queue.put_nowait("b", "b0")
    assert await queue.get_batch(4, lambda owner: True) == ["a0", "b0"]
    assert await queue.get_batch(4) == ["a1", "a2"]
