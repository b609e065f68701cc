"""Replies in progress are recorded until they are closed, and survive the process that wrote them."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.store import ReplyStore, open_database, session_factory
from bot.store.replies import Interaction

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
