"""A person's questions pass the one-question check in the order they arrived, whatever each does first."""

from __future__ import annotations

import asyncio

import pytest

from bot.chat.arrivals import ArrivalOrder, in_turn
from bot.chat.scheduler import AlreadyAsking, Scheduler

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Person:
    """One person's questions: each taken in line on arrival, prepared (a download of any length), checked."""

    def __init__(self) -> None:
        self.order, self.scheduler = ArrivalOrder(), Scheduler()
        self.outcome: list[str] = []
        self.answered = asyncio.Event()

    async def ask(self, name: str, prepared: asyncio.Event) -> None:
        arrival = self.order.arrive(1)
        await prepared.wait()
        try:
            async with in_turn(arrival):
                pass
            async with self.scheduler.slot(1):
                self.outcome.append(f"{name} answered")
                await self.answered.wait()
        except AlreadyAsking:
            self.outcome.append(f"{name} refused")


async def test_a_quicker_later_question_does_not_overtake_the_first() -> None:
    person = Person()
    slow_download, quick_download = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(person.ask("first", slow_download))
    await asyncio.sleep(0)
    second = asyncio.create_task(person.ask("second", quick_download))
    quick_download.set()
    await asyncio.sleep(0.05)
    # The second is ready, but the first (still downloading) came first.
    assert person.outcome == []

    slow_download.set()
    await second
    person.answered.set()
    await first
    assert person.outcome == ["first answered", "second refused"]
    assert len(person.order) == 0


async def test_other_people_and_dropped_questions_do_not_hold_anyone_up() -> None:
    order = ArrivalOrder()
    dropped = order.arrive(1)
    someone_else = order.arrive(2)
    later = order.arrive(1)
    # Another person's line is not this person's.
    await asyncio.wait_for(someone_else.turn(), 1)
    waiting = asyncio.create_task(later.turn())
    await asyncio.sleep(0)
    assert not waiting.done()
    # A question that gives up (an image rejected, the gate refusing it) lets the next one through.
    dropped.leave()
    dropped.leave()
    await asyncio.wait_for(waiting, 1)
    later.leave()
    someone_else.leave()
    assert len(order) == 0
