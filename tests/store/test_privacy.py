"""Deleting people's data on a real migrated SQLite file: /forget and retention."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.cogs.privacy import PrivacyCog
from bot.config import parse_config
from bot.store import HistoryStore, StoredImage
from bot.store.privacy import Removed
from bot.store.tables import ImageRow, TurnRow
from tests.store.conftest import count_rows, image

pytestmark = pytest.mark.asyncio(loop_scope="session")

ADA, BOB = 42, 43


async def ask(
    store: HistoryStore, channel: int, author: int, words: str, message: int, *, picture: StoredImage | None = None
) -> int:
    return await store.add_user_turn(
        channel, words, author_id=author, author_name=str(author), image=picture, message_ids=[message]
    )


async def texts(store: HistoryStore, channel: int) -> list[str]:
    return [turn.text for turn in await store.turns(channel)]


async def test_forget_removes_a_persons_questions_and_their_answers_everywhere(
    store: HistoryStore, engine: AsyncEngine
) -> None:
    own, shared = image(b"own"), image(b"shared")
    await ask(store, 1, ADA, "ada asks", 100, picture=own)
    await store.add_assistant_turn(1, "answer to ada", message_ids=[101, 102])
    await ask(store, 1, BOB, "bob asks", 103, picture=shared)
    await store.add_assistant_turn(1, "answer to bob", message_ids=[104])
    await ask(store, 2, ADA, "ada in a DM", 200, picture=shared)
    await store.add_assistant_turn(2, "answer in the DM", message_ids=[201])
    # A question whose answer failed: the next turn is someone else's question, which must stay.
    await ask(store, 3, ADA, "unanswered", 300)
    await ask(store, 3, BOB, "bob's turn", 301)

    removed = await store.forget_author(ADA)

    assert removed == Removed(questions=3, answers=2, images=1)
    assert await texts(store, 1) == ["bob asks", "answer to bob"]
    assert await texts(store, 2) == []
    assert await texts(store, 3) == ["bob's turn"]
    for gone in (100, 101, 102, 200, 201, 300):
        assert await store.find_turn_by_message(gone) is None
    for kept in (103, 104, 301):
        assert await store.find_turn_by_message(kept) is not None
    assert await store.image_bytes(own.sha256) is None
    assert await store.image_bytes(shared.sha256) == shared.data, "bob still uses this picture"
    assert await count_rows(engine, "turn_messages") == 3
    assert await store.forget_author(ADA) == Removed()


async def test_forget_leaves_the_store_usable(store: HistoryStore) -> None:
    await ask(store, 1, ADA, "first", 100)
    await store.add_assistant_turn(1, "one", message_ids=[101])
    await store.forget_author(ADA)

    await ask(store, 1, ADA, "again", 102)

    assert await texts(store, 1) == ["again"]


async def test_forget_while_others_write(store: HistoryStore) -> None:
    async def converse(channel: int) -> None:
        for number in range(5):
            await ask(store, channel, BOB, f"q{number}", channel * 100 + number * 2)
            await store.add_assistant_turn(channel, f"a{number}", message_ids=[channel * 100 + number * 2 + 1])

    for channel in (1, 2):
        await ask(store, channel, ADA, "ada", channel * 1000)
        await store.add_assistant_turn(channel, "to ada", message_ids=[channel * 1000 + 1])
    await asyncio.gather(converse(1), converse(2), store.forget_author(ADA))

    for channel in (1, 2):
        assert await texts(store, channel) == [t for n in range(5) for t in (f"q{n}", f"a{n}")]


async def age(engine: AsyncEngine, days: float, *, turn_ids: Sequence[int] = (), image_sha: str | None = None) -> None:
    """Pretend rows were stored ``days`` ago."""
    when = datetime.now(UTC) - timedelta(days=days)
    async with engine.begin() as connection:
        if turn_ids:
            await connection.execute(update(TurnRow).where(TurnRow.id.in_(turn_ids)).values(created_at=when))
        if image_sha is not None:
            await connection.execute(update(ImageRow).where(ImageRow.sha256 == image_sha).values(created_at=when))


async def test_retention_deletes_old_turns_and_their_orphaned_images(store: HistoryStore, engine: AsyncEngine) -> None:
    old_picture, reused, fresh = image(b"old"), image(b"reused"), image(b"fresh")
    old_q = await ask(store, 1, ADA, "old question", 100, picture=old_picture)
    old_a = await store.add_assistant_turn(1, "old answer", message_ids=[101])
    reused_q = await ask(store, 2, ADA, "old but its picture is reused", 200, picture=reused)
    await ask(store, 1, BOB, "recent question", 102, picture=fresh)
    await store.add_assistant_turn(1, "recent answer", message_ids=[103])
    await ask(store, 3, BOB, "recent, same picture", 300, picture=reused)
    await age(engine, 40, turn_ids=[old_q, old_a, reused_q], image_sha=old_picture.sha256)
    await age(engine, 40, image_sha=reused.sha256)

    removed = await store.delete_older_than(datetime.now(UTC) - timedelta(days=30))

    assert removed == Removed(questions=2, answers=1, images=1)
    assert await texts(store, 1) == ["recent question", "recent answer"]
    assert await texts(store, 2) == []
    assert await texts(store, 3) == ["recent, same picture"]
    assert await store.image_bytes(old_picture.sha256) is None
    assert await store.image_bytes(reused.sha256) == reused.data
    assert await store.image_bytes(fresh.sha256) == fresh.data
    assert await store.find_turn_by_message(100) is None and await store.find_turn_by_message(101) is None
    assert await store.find_turn_by_message(102) is not None


async def test_retention_takes_an_answer_whose_question_it_took(store: HistoryStore, engine: AsyncEngine) -> None:
    question = await ask(store, 1, ADA, "asked just before the cutoff", 100)
    await store.add_assistant_turn(1, "answered just after it", message_ids=[101])
    await ask(store, 1, ADA, "later", 102)
    await age(engine, 31, turn_ids=[question])

    removed = await store.delete_older_than(datetime.now(UTC) - timedelta(days=30))

    assert removed == Removed(questions=1, answers=1, images=0)
    assert await texts(store, 1) == ["later"]
    assert await store.find_turn_by_message(101) is None


async def test_retention_keeps_everything_recent(store: HistoryStore, engine: AsyncEngine) -> None:
    picture = image()
    await ask(store, 1, ADA, "hello", 100, picture=picture)
    await store.add_assistant_turn(1, "hi", message_ids=[101])

    assert await store.delete_older_than(datetime.now(UTC) - timedelta(days=1)) == Removed()

    assert await texts(store, 1) == ["hello", "hi"]
    assert await count_rows(engine, "turn_messages") == 2
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT count(*) FROM images"))).scalar_one() == 1


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        assert loop.time() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


async def test_retention_runs_at_start_and_then_periodically(store: HistoryStore, engine: AsyncEngine) -> None:
    bot = SimpleNamespace(config=parse_config({"chat": {"retention_days": 30}}), store=store)
    cog = PrivacyCog(bot)  # type: ignore[arg-type]
    cog.retention_every = 0.05
    await age(engine, 40, turn_ids=[await ask(store, 1, ADA, "old at start", 100)])

    await cog.cog_load()
    await eventually(lambda: store_is_empty(store, 1))
    await age(engine, 40, turn_ids=[await ask(store, 1, ADA, "old later", 101)])
    await eventually(lambda: store_is_empty(store, 1))
    await cog.cog_unload()

    await age(engine, 40, turn_ids=[await ask(store, 1, ADA, "old after unloading", 102)])
    await asyncio.sleep(cog.retention_every * 4)
    assert await texts(store, 1) == ["old after unloading"]


async def test_no_retention_by_default(store: HistoryStore, engine: AsyncEngine) -> None:
    cog = PrivacyCog(SimpleNamespace(config=parse_config({}), store=store))  # type: ignore[arg-type]
    cog.retention_every = 0.01
    await age(engine, 4000, turn_ids=[await ask(store, 1, ADA, "kept forever", 100)])

    await cog.cog_load()
    await asyncio.sleep(0.1)
    await cog.cog_unload()

    assert await texts(store, 1) == ["kept forever"]


async def store_is_empty(store: HistoryStore, channel: int) -> bool:
    return await texts(store, channel) == []
