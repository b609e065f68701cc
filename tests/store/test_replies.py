"""Replies in progress are recorded until they are closed, and survive the process that wrote them."""

from __future__ import annotations

import asyncio
import socket
import sys
from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.store import ReplyStore, open_database, session_factory
from bot.store.replies import Interaction, abandoned
from bot.store.tables import utcnow

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def replies(engine: AsyncEngine) -> ReplyStore:
    return ReplyStore(session_factory(engine))


async def test_a_reply_is_open_until_closed_and_keeps_its_messages_in_order(replies: ReplyStore) -> None:
    first = await replies.open(7, [300])
    second = await replies.open(8, [400], interaction=Interaction(application_id=11, token="tok"))
    await replies.set_message_ids(first, [300, 302, 301, 302])

    stored = {reply.id: reply for reply in await replies.open_replies()}
    assert [reply.id for reply in await replies.open_replies()] == [first, second]
    assert (stored[first].channel_id, stored[first].message_ids) == (7, (300, 302, 301))
    assert stored[first].interaction is None
    assert (stored[second].channel_id, stored[second].message_ids) == (8, (400,))
    assert stored[second].interaction == Interaction(application_id=11, token="tok")

    await replies.close(first)
    await replies.close(first)  # closing twice is harmless: shutdown and the answer may both close it
    assert [reply.id for reply in await replies.open_replies()] == [second]


async def test_open_replies_outlive_the_process_that_recorded_them(db_url: str, replies: ReplyStore) -> None:
    reply_id = await replies.open(7, [300, 301])

    # A new engine on the same file, as a restarted bot opens it.
    engine = open_database(db_url)
    try:
        [left] = await ReplyStore(session_factory(engine)).open_replies()
    finally:
        await engine.dispose()
    assert (left.id, left.message_ids) == (reply_id, (300, 301))
    assert left.created_at.tzinfo is not None


# --- several processes on one database --------------------------------------------------------------
async def ended_process_name() -> str:
    """The name a process of this host had that has since exited."""
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await child.wait()
    return f"{socket.gethostname()}:{child.pid}:gone"


async def test_a_live_process_keeps_its_replies_and_others_see_them_as_taken(engine: AsyncEngine) -> None:
    sessions = session_factory(engine)
    writer, starter = ReplyStore(sessions), ReplyStore(sessions)
    reply_id = await writer.open(7, [300])
    mine = await starter.open(8, [400])

    others = await starter.of_others()
    assert [reply.id for reply in others] == [reply_id]
    assert others[0].owner == writer.owner
    # This very test process writes it: alive, and its expiry lies ahead.
    assert not abandoned(others[0], utcnow())
    assert [reply.id for reply in await writer.of_others()] == [mine]


async def test_the_replies_of_an_ended_process_of_this_host_are_left_over_at_once(engine: AsyncEngine) -> None:
    sessions = session_factory(engine)
    crashed = ReplyStore(sessions, await ended_process_name())
    reply_id = await crashed.open(7, [300])

    [left] = await ReplyStore(sessions).of_others()
    assert left.id == reply_id
    assert left.expires_at is not None and left.expires_at > utcnow()
    assert abandoned(left, utcnow())


async def test_another_hosts_replies_are_left_over_once_its_process_stops_refreshing_them(engine: AsyncEngine) -> None:
    sessions = session_factory(engine)
    # Another host's process cannot be looked up here: only its expiry tells whether it lives.
    remote = ReplyStore(sessions, "elsewhere.example:4242:abcd1234")
    await remote.open(7, [300], ttl=30)
    survivor = ReplyStore(sessions)

    [reply] = await survivor.of_others()
    assert not abandoned(reply, utcnow())
    assert abandoned(reply, utcnow() + timedelta(seconds=31))

    # While it lives it keeps pushing the expiry ahead.
    assert await remote.refresh(ttl=300) == 1
    [refreshed] = await survivor.of_others()
    assert not abandoned(refreshed, utcnow() + timedelta(seconds=31))
    assert abandoned(refreshed, utcnow() + timedelta(seconds=301))


async def test_exactly_one_survivor_takes_over_a_left_over_reply(engine: AsyncEngine) -> None:
    sessions = session_factory(engine)
    crashed = ReplyStore(sessions, await ended_process_name())
    reply_id = await crashed.open(7, [300])
    first, second = ReplyStore(sessions), ReplyStore(sessions)
    [seen_by_first] = await first.of_others()
    [seen_by_second] = await second.of_others()

    taken = await asyncio.gather(first.adopt(seen_by_first), second.adopt(seen_by_second))

    assert sorted(taken) == [False, True]
    winner, loser = (first, second) if taken[0] else (second, first)
    [reply] = await loser.of_others()
    assert (reply.id, reply.owner) == (reply_id, winner.owner)
    # Taken over, it is the winner's: alive while the winner lives, and nobody else's to close.
    assert not abandoned(reply, utcnow())
    assert await winner.of_others() == []


async def test_a_reply_refreshed_after_it_was_read_is_not_taken_over(engine: AsyncEngine) -> None:
    sessions = session_factory(engine)
    slow = ReplyStore(sessions, "elsewhere.example:4242:abcd1234")
    await slow.open(7, [300], ttl=30)
    survivor = ReplyStore(sessions)
    [seen] = await survivor.of_others()

    # Its process was only slow: it refreshed the reply before the survivor acted on the stale picture.
    await slow.refresh(ttl=300)

    assert not await survivor.adopt(seen)
    [reply] = await survivor.of_others()
    assert reply.owner == slow.owner
