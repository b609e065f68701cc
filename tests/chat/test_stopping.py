"""The registry of running answers and how a stop cuts a wait short, without Discord or a model."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from bot.chat.service import Question
from bot.chat.stopping import RunningAnswer, RunningAnswers, Stopped, StopReason
from bot.chat.streaming import ReplyStreamer


@dataclass
class Sent:
    id: int


@dataclass
class FakeStreamer:
    messages: list[Sent] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)

    def message_gone(self, index: int) -> None:
        self.gone.append(index)


def question(message_id: int | None = 10) -> Question:
    return Question(channel_id=1, author_id=7, author_name="ada", text="hi", message_id=message_id)


async def run(registry: RunningAnswers, body: Any, streamer: FakeStreamer | None = None) -> asyncio.Task[Any]:
    """Start ``body(running)`` as an answer's task and let it reach its first wait."""
    started = asyncio.Event()
    holder: list[RunningAnswer] = []

    async def answer() -> Any:
        running = registry.begin(question(), cast(ReplyStreamer[Any], streamer or FakeStreamer()))
        holder.append(running)
        started.set()
        try:
            return await body(running)
        finally:
            registry.end(running)

    task = asyncio.create_task(answer())
    await started.wait()
    await asyncio.sleep(0)
    return task


async def test_a_stop_cuts_an_interruptible_wait_short() -> None:
    registry = RunningAnswers()

    async def body(running: RunningAnswer) -> str:
        try:
            with running.interruptible():
                await asyncio.sleep(60)
        except Stopped:
            # The task is not left cancelled: it can still await its closing steps.
            await asyncio.sleep(0.01)
            return "stopped"
        return "finished"

    task = await run(registry, body)
    running = registry.find(10)
    assert running is not None
    assert running.stop(StopReason.STOPPED)
    assert not running.stop(StopReason.REPLY_DELETED), "only the first stop counts"
    assert await asyncio.wait_for(task, 5) == "stopped"
    assert running.reason is StopReason.STOPPED and running.ended.is_set()
    assert registry.find(10) is None and len(registry) == 0


async def test_a_stop_outside_a_wait_takes_effect_at_the_next_one() -> None:
    registry = RunningAnswers()
    gate = asyncio.Event()

    async def body(running: RunningAnswer) -> str:
        await gate.wait()  # a step that must not be cut short (storing a turn, say)
        try:
            with running.interruptible():
                await asyncio.sleep(60)
        except Stopped:
            return "stopped at the next wait"
        return "finished"

    task = await run(registry, body)
    running = registry.find(10)
    assert running is not None and running.stop(StopReason.QUESTION_DELETED)
    await asyncio.sleep(0.01)
    assert not task.done()
    gate.set()
    assert await asyncio.wait_for(task, 5) == "stopped at the next wait"


async def test_other_cancellations_pass_through() -> None:
    registry = RunningAnswers()

    async def body(running: RunningAnswer) -> str:
        with running.interruptible():
            await asyncio.sleep(60)
        return "finished"

    task = await run(registry, body)
    task.cancel()  # the bot shutting down
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_answers_are_found_by_question_and_by_reply_messages() -> None:
    registry = RunningAnswers()
    streamer = FakeStreamer([Sent(20), Sent(21)])

    async def body(running: RunningAnswer) -> None:
        with running.interruptible():
            await asyncio.sleep(60)

    task = await run(registry, body, streamer)
    running = registry.find(21)
    assert running is not None and registry.find(10) is running and registry.find(99) is None
    assert running.is_question(10) and not running.is_question(20)
    assert running.stop(StopReason.REPLY_DELETED, deleted_message_id=21)
    assert streamer.gone == [1]
    with pytest.raises(Stopped):
        await task
