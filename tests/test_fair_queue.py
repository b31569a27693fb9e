"""FairQueue: per-owner order, turns between owners, urgent first, lanes bounded, eligibility, discard,
batch limits by padded cost, and lingering for batch-mates that never delays urgent work."""

from __future__ import annotations

import asyncio

from speakd.server.pipeline.fair_queue import BatchLimits, FairQueue


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


def sized_queue() -> FairQueue[str]:
    """Items named like "a:30": owner a, cost 30 (frames)."""
    return FairQueue(None, cost=lambda item: int(item.split(":")[1]))


def everyone(owner: object) -> bool:
    return True


async def test_batch_cost_is_bounded_as_padded_to_its_longest_item() -> None:
    queue = sized_queue()
    for item in ("a:10", "b:10", "c:40", "d:10"):
        queue.put_nowait(item[0], item)
    # a, b: 2 x 10 = 20; adding c pads all three to 40: 120 > 100, so the batch stops before c.
    assert await queue.get_batch(BatchLimits(8, max_cost=100), everyone) == ["a:10", "b:10"]
    assert await queue.get_batch(BatchLimits(8, max_cost=100), everyone) == ["c:40", "d:10"]


async def test_an_item_over_the_cost_bound_still_goes_alone() -> None:
    queue = sized_queue()
    queue.put_nowait("a", "a:500")
    queue.put_nowait("b", "b:1")
    assert await queue.get_batch(BatchLimits(8, max_cost=100), everyone) == ["a:500"]


async def test_lingering_gathers_items_that_arrive_within_the_window() -> None:
    queue = sized_queue()
    queue.put_nowait("a", "a:1")
    getting = asyncio.create_task(queue.get_batch(BatchLimits(3, linger_s=5.0), everyone))
    await asyncio.sleep(0.02)
    assert not getting.done()  # lingering for batch-mates
    queue.put_nowait("b", "b:1")
    await asyncio.sleep(0.02)
    assert not getting.done()
    queue.put_nowait("c", "c:1")  # the batch is full: no more waiting
    assert await asyncio.wait_for(getting, 1) == ["a:1", "b:1", "c:1"]


async def test_lingering_ends_after_linger_s_with_what_it_has() -> None:
    queue = sized_queue()
    queue.put_nowait("a", "a:1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await queue.get_batch(BatchLimits(3, linger_s=0.05), everyone) == ["a:1"]
    assert loop.time() - started >= 0.04


async def test_a_batch_holding_urgent_work_does_not_linger() -> None:
    queue = sized_queue()
    queue.put_nowait("late", "late:1")
    queue.put_nowait("new", "new:1", urgent=True)
    batch = await asyncio.wait_for(queue.get_batch(BatchLimits(3, linger_s=30.0), everyone), 1)
    assert batch == ["new:1", "late:1"]


async def test_an_urgent_arrival_ends_the_lingering_at_once() -> None:
    queue = sized_queue()
    queue.put_nowait("a", "a:1")
    getting = asyncio.create_task(queue.get_batch(BatchLimits(4, linger_s=30.0), everyone))
    await asyncio.sleep(0.02)
    queue.put_nowait("new", "new:1", urgent=True)
    assert await asyncio.wait_for(getting, 1) == ["a:1", "new:1"]


async def test_items_taken_while_lingering_free_room_upstream_at_once() -> None:
    queue = sized_queue()
    calls: list[int] = []
    queue.on_take(lambda: calls.append(len(queue)))
    queue.put_nowait("a", "a:1")
    getting = asyncio.create_task(queue.get_batch(BatchLimits(2, linger_s=30.0), everyone))
    await asyncio.sleep(0.02)
    assert calls == [0]
    queue.put_nowait("b", "b:1")
    assert await asyncio.wait_for(getting, 1) == ["a:1", "b:1"]
    assert calls == [0, 0]


async def test_an_urgent_arrival_that_does_not_fit_still_ends_the_lingering() -> None:
    queue = sized_queue()
    queue.put_nowait("a", "a:60")
    getting = asyncio.create_task(queue.get_batch(BatchLimits(4, max_cost=100, linger_s=30.0), everyone))
    await asyncio.sleep(0.02)
    queue.put_nowait("new", "new:60", urgent=True)  # 2 x 60 > 100: it goes in the next batch, at once
    assert await asyncio.wait_for(getting, 1) == ["a:60"]
    assert await asyncio.wait_for(queue.get_batch(BatchLimits(4, max_cost=100), everyone), 1) == ["new:60"]


async def test_a_batch_no_item_could_join_does_not_linger() -> None:
    queue = sized_queue()
    queue.put_nowait("a", "a:100")
    batch = await asyncio.wait_for(queue.get_batch(BatchLimits(4, max_cost=100, linger_s=30.0), everyone), 1)
    assert batch == ["a:100"]


async def test_the_lane_due_soonest_goes_first_and_equals_take_turns() -> None:
    due = {"in_hand": 12.0, "dry_soon": 10.5, "a": 11.0, "b": 11.0}
    queue: FairQueue[str] = FairQueue(None, deadline=due.__getitem__)
    for owner in due:
        queue.put_nowait(owner, f"{owner}0")
        queue.put_nowait(owner, f"{owner}1")
    # Deadlines do not move here, so a lane due soonest keeps the stage until it is empty; a and b,
    # due together, alternate.
    assert await drain(queue) == ["dry_soon0", "dry_soon1", "a0", "b0", "a1", "b1", "in_hand0", "in_hand1"]


async def test_an_urgent_head_goes_before_any_deadline() -> None:
    due = {"late": 1.0, "new": 50.0}
    queue: FairQueue[str] = FairQueue(None, deadline=due.__getitem__)
    queue.put_nowait("late", "l0")
    queue.put_nowait("new", "first", urgent=True)
    assert await queue.get_batch(1) == ["first"]


async def test_put_front_returns_the_rest_of_an_item_to_the_head_of_its_lane() -> None:
    queue: FairQueue[str] = FairQueue(1)
    queue.put_nowait("a", "a1")
    queue.put_nowait("a", "end")
    queue.put_front("a", "a0 rest")
    queue.put_front("b", "b0 rest")
    assert queue.lane_lengths() == {"a": 3, "b": 1}
    assert queue.holds("a") and not queue.holds("c")
    assert await drain(queue) == ["a0 rest", "b0 rest", "a1", "end"]
