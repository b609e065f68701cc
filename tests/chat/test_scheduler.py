"""The request scheduler: queue order, positions, one request per person, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from bot.chat import scheduler as scheduler_module
from bot.chat.scheduler import AlreadyAsking, QueueFull, Scheduler


async def settle(condition: Callable[[], bool] = lambda: False, rounds: int = 50) -> None:
    """Let other tasks run until ``condition`` holds (or a fixed number of loop rounds passes)."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)


class Person:
    """One person's request: records its queue positions and holds its turn until released."""

    def __init__(self, scheduler: Scheduler, user_id: int, log: list[int]) -> None:
        self.user_id = user_id
        self.positions: list[int] = []
        self.started = False
        self.finished = False
        self.release = asyncio.Event()
        self._log = log
        self.task = asyncio.create_task(self._run(scheduler))

    async def _report(self, position: int) -> None:
        self.positions.append(position)

    async def _run(self, scheduler: Scheduler) -> None:
        async with scheduler.slot(self.user_id, on_position=self._report):
            self.started = True
            self._log.append(self.user_id)
            await self.release.wait()
        self.finished = True

    async def done(self) -> None:
        self.release.set()
        await self.task


async def arrive(scheduler: Scheduler, started: list[int], *user_ids: int) -> list[Person]:
    people = []
    for user_id in user_ids:
        people.append(Person(scheduler, user_id, started))
        await settle()  # arrival order is the order of these calls
    return people


async def test_first_request_starts_at_once_without_a_position() -> None:
    scheduler = Scheduler()
    started: list[int] = []
    (alice,) = await arrive(scheduler, started, 1)
    assert alice.started
    assert alice.positions == []
    assert (scheduler.running, scheduler.queue_length) == (1, 0)
    await alice.done()
    assert (scheduler.running, scheduler.queue_length) == (0, 0)


async def test_requests_run_in_arrival_order_and_positions_count_down() -> None:
    scheduler = Scheduler()
    started: list[int] = []
    alice, bob, carol, dave = await arrive(scheduler, started, 1, 2, 3, 4)
    assert started == [1]
    assert scheduler.queue_length == 3
    assert (bob.positions, carol.positions, dave.positions) == ([1], [2], [3])

    await alice.done()
    await settle(lambda: bob.started and carol.positions[-1] == 1 and dave.positions[-1] == 2)
    assert started == [1, 2]
    await bob.done()
    await settle(lambda: carol.started and dave.positions[-1] == 1)
    await carol.done()
    await settle(lambda: dave.started)
    await dave.done()

    assert started == [1, 2, 3, 4]
    assert bob.positions == [1]
    assert carol.positions == [2, 1]
    assert dave.positions == [3, 2, 1]
    assert (scheduler.running, scheduler.queue_length) == (0, 0)


async def test_one_request_per_person() -> None:
    scheduler = Scheduler()
    started: list[int] = []
    alice, bob = await arrive(scheduler, started, 1, 2)
    for user_id in (1, 2):  # running, and waiting
        with pytest.raises(AlreadyAsking) as caught:
            async with scheduler.slot(user_id):
                pass
        assert str(caught.value) == scheduler_module.ALREADY_ASKING
    assert scheduler.queue_length == 1
    await alice.done()
    # Once the answer is done, the person may ask again.
    (again,) = await arrive(scheduler, started, 1)
    assert again.positions == [1]
    await settle(lambda: bob.started)
    await bob.done()
    await settle(lambda: again.started)
    await again.done()
    assert started == [1, 2, 1]


async def test_full_queue_turns_people_away_politely() -> None:
    scheduler = Scheduler(max_queue=2)
    started: list[int] = []
    people = await arrive(scheduler, started, 1, 2, 3)
    with pytest.raises(QueueFull) as caught:
        async with scheduler.slot(4):
            pass
    assert str(caught.value) == "I'm busy: 2 questions are waiting already; please try again in a few minutes."
    assert not scheduler.is_asking(4)
    for person in people:
        await settle(lambda: person.started)  # noqa: B023 - used before the loop moves on
        await person.done()
    assert started == [1, 2, 3]


async def test_cancelled_waiter_leaves_the_queue() -> None:
    scheduler = Scheduler()
    started: list[int] = []
    alice, bob, carol = await arrive(scheduler, started, 1, 2, 3)
    bob.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await bob.task
    await settle(lambda: carol.positions[-1] == 1)
    assert carol.positions == [2, 1]
    assert scheduler.queue_length == 1
    assert not scheduler.is_asking(2)

    await alice.done()
    await settle(lambda: carol.started)
    await carol.done()
    assert started == [1, 3]
    assert (scheduler.running, scheduler.queue_length) == (0, 0)


async def test_cancelled_just_as_its_turn_came_passes_the_turn_on() -> None:
    scheduler = Scheduler()
    started: list[int] = []
    async with scheduler.slot(1):
        bob, carol = await arrive(scheduler, started, 2, 3)
    # Leaving the block handed Bob the turn, but his task has not run since...
    bob.task.cancel()  # ...and is cancelled before it can.
    with pytest.raises(asyncio.CancelledError):
        await bob.task
    await settle(lambda: carol.started)
    assert started == [3]
    await carol.done()
    assert (scheduler.running, scheduler.queue_length) == (0, 0)


async def test_cancelling_a_running_request_starts_the_next() -> None:
    scheduler = Scheduler()
    started: list[int] = []
    alice, bob = await arrive(scheduler, started, 1, 2)
    alice.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await alice.task
    await settle(lambda: bob.started)
    assert bob.started
    await bob.done()


async def test_an_error_in_the_request_frees_the_turn() -> None:
    scheduler = Scheduler()
    with pytest.raises(RuntimeError):
        async with scheduler.slot(1):
            raise RuntimeError("engine exploded")
    assert (scheduler.running, scheduler.queue_length) == (0, 0)
    async with scheduler.slot(1) as ticket:
        assert ticket.user_id == 1


async def test_concurrency_runs_several_at_once() -> None:
    scheduler = Scheduler(concurrency=2)
    started: list[int] = []
    alice, bob, carol = await arrive(scheduler, started, 1, 2, 3)
    assert started == [1, 2]
    assert carol.positions == [1]
    assert (scheduler.running, scheduler.queue_length) == (2, 1)
    await bob.done()
    await settle(lambda: carol.started)
    await alice.done()
    await carol.done()
    assert started == [1, 2, 3]


async def test_a_failing_position_callback_keeps_the_place() -> None:
    scheduler = Scheduler()
    seen: list[int] = []

    async def broken(position: int) -> None:
        seen.append(position)
        raise ConnectionError("status edit failed")

    release = asyncio.Event()

    async def first() -> None:
        async with scheduler.slot(1):
            await release.wait()

    async def second() -> str:
        async with scheduler.slot(2, on_position=broken):
            return "answered"

    holder = asyncio.create_task(first())
    await settle()
    waiter = asyncio.create_task(second())
    await settle(lambda: bool(seen))
    release.set()
    assert await waiter == "answered"
    await holder
    assert seen == [1]


async def test_ticket_records_the_wait() -> None:
    scheduler = Scheduler()
    started: list[int] = []
    (alice,) = await arrive(scheduler, started, 1)
    seen: list[float] = []

    async def bob() -> None:
        async with scheduler.slot(2) as ticket:
            seen.append(ticket.waited)

    task = asyncio.create_task(bob())
    await asyncio.sleep(0.02)
    await alice.done()
    await task
    assert seen[0] > 0
