"""Replies on record while written; a shutdown's grace period for the answers in progress."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bot.chat.lifecycle import AnswerTasks, TrackedSink
from bot.chat.streaming import ReplyStreamer
from bot.store import ReplyStore, open_database, session_factory, upgrade

pytestmark = pytest.mark.asyncio(loop_scope="session")


@dataclass
class Message:
    id: int
    content: str


class Channel:
    """A message sink that numbers its messages."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def send(self, content: str, *, live: bool) -> Message:
        self.messages.append(Message(100 + len(self.messages), content))
        return self.messages[-1]

    async def edit(self, handle: Message, content: str, *, live: bool) -> None:
        handle.content = content


@pytest.fixture
async def replies(tmp_path: Path) -> AsyncIterator[ReplyStore]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    await upgrade(url)
    engine = open_database(url)
    yield ReplyStore(session_factory(engine))
    await engine.dispose()


# --- on record -------------------------------------------------------------------------------------
async def test_a_reply_is_on_record_with_all_its_messages_until_closed(replies: ReplyStore) -> None:
    channel = Channel()
    sink = TrackedSink(channel, replies, 7)
    streamer = ReplyStreamer(sink, limit=50, edit_interval=0.2)
    await streamer.start("thinking")
    await sink.flush()
    [reply] = await replies.open_replies()
    assert (reply.channel_id, reply.message_ids) == (7, (100,))

    streamer.feed("word " * 30)  # 150 characters: three messages
    await streamer.finish()
    await sink.flush()
    [reply] = await replies.open_replies()
    assert reply.message_ids == (100, 101, 102)
    assert len(channel.messages) == 3

    await sink.close()
    assert await replies.open_replies() == []


class SlowReplies(ReplyStore):
    """A database that takes its time with every write."""

    def __init__(self, replies: ReplyStore) -> None:
        super().__init__(replies._sessions, replies.owner)
        self.release = asyncio.Event()

    async def open(self, *args: Any, **kwargs: Any) -> int:
        await self.release.wait()
        return await super().open(*args, **kwargs)


async def test_a_posted_message_is_part_of_the_reply_before_it_is_on_record(replies: ReplyStore) -> None:
    slow = SlowReplies(replies)
    sink = TrackedSink(Channel(), slow, 7)
    streamer = ReplyStreamer(sink, edit_interval=0.2)

    # The streamer (and so the registry of running answers) knows the message while the write still waits.
    await streamer.start("thinking")
    assert [m.id for m in streamer.messages] == [100]
    assert await replies.open_replies() == []

    # Closing waits for the write under way, so the record cannot outlive the reply.
    closing = asyncio.create_task(sink.close())
    await asyncio.sleep(0.05)
    assert not closing.done()
    slow.release.set()
    await closing
    assert await replies.open_replies() == []


async def test_a_reply_that_never_posted_leaves_no_record(replies: ReplyStore) -> None:
    sink = TrackedSink(Channel(), replies, 7)
    await sink.close()
    assert await replies.open_replies() == []


async def test_bookkeeping_failures_do_not_cost_the_answer(tmp_path: Path) -> None:
    engine = open_database(f"sqlite+aiosqlite:///{tmp_path / 'never-migrated.db'}")
    try:
        channel = Channel()
        sink = TrackedSink(channel, ReplyStore(session_factory(engine)), 7)
        streamer = ReplyStreamer(sink, edit_interval=0.2)
        await streamer.start("thinking")
        streamer.feed("an answer")
        assert await streamer.finish()
        await sink.close()
    finally:
        await engine.dispose()
    assert [m.content for m in channel.messages] == ["an answer"]


# --- the grace period ------------------------------------------------------------------------------
async def test_answers_that_finish_within_the_grace_period_are_left_alone() -> None:
    tasks = AnswerTasks()
    quick = asyncio.create_task(asyncio.sleep(0.05, "done"))
    tasks.add(quick)

    assert await tasks.drain(30, asyncio.Event()) == 0
    assert not tasks.accepting
    assert quick.result() == "done"


async def test_answers_still_running_when_the_grace_period_ends_are_cancelled() -> None:
    tasks = AnswerTasks()
    ended: list[str] = []

    async def answer() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # writes its closing sentence before it ends
            ended.append("closed")
            raise

    running = asyncio.create_task(answer())
    tasks.add(running)
    assert len(tasks) == 1

    assert await tasks.drain(0.1, asyncio.Event()) == 1
    assert running.cancelled()
    assert ended == ["closed"]
    assert len(tasks) == 0


async def test_a_second_signal_cuts_the_grace_period_short() -> None:
    tasks = AnswerTasks()
    running = asyncio.create_task(asyncio.sleep(3600))
    tasks.add(running)
    cut_short = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, cut_short.set)

    drained = asyncio.create_task(tasks.drain(3600, cut_short))
    assert await asyncio.wait_for(drained, 30) == 1
    assert running.cancelled()
