"""The schema comes only from the Alembic migrations, which must work on new and existing databases."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.store import (
    HistoryStore,
    ReplyStore,
    current_revision,
    downgrade,
    head_revision,
    open_database,
    session_factory,
    upgrade,
    upgrade_sync,
)
from bot.store.replies import Interaction, abandoned
from bot.store.tables import Base, utcnow
from tests.store.conftest import count_rows, image

# The fixtures and the tests must share one event loop, as the bot's resources do.
pytestmark = pytest.mark.asyncio(loop_scope="session")

FIRST = "0001"
# The last revision without the record of replies in progress.
BEFORE_OPEN_REPLIES = "0002"
# The last revision without the rules shared between bot processes.
BEFORE_SHARED_RULES = "0003"
# The last revision whose open replies have no owner.
BEFORE_REPLY_OWNERS = "0004"
SHARED_RULES = {"active_questions", "generations"}
TABLES = {"alembic_version", "images", "turns", "turn_messages", "settings", "open_replies", *SHARED_RULES}


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))


async def seed_first_revision(engine: AsyncEngine) -> None:
    """Rows as the bot wrote them while the database was at the first revision."""
    picture = image()
    async with engine.begin() as connection:
        await connection.execute(
            text("INSERT INTO images (sha256, data, mime, width, height) VALUES (:sha, :data, :mime, 64, 48)"),
            {"sha": picture.sha256, "data": picture.data, "mime": picture.mime},
        )
        await connection.execute(
            text(
                "INSERT INTO turns (channel_id, role, author_id, author_name, text, image_sha256, message_ids)"
                " VALUES (:channel, :role, :author, :name, :text, :image, :ids)"
            ),
            [
                {
                    "channel": 7,
                    "role": "user",
                    "author": 42,
                    "name": "ada",
                    "text": "what is this?",
                    "image": picture.sha256,
                    "ids": json.dumps([100]),
                },
                {
                    "channel": 7,
                    "role": "assistant",
                    "author": None,
                    "name": None,
                    "text": "a cat",
                    "image": None,
                    "ids": json.dumps([101, 102]),
                },
            ],
        )


async def seed_open_reply(
    engine: AsyncEngine, channel_id: int, message_ids: list[int], token: str | None = None
) -> int:
    """An open reply as the bot recorded it before replies had owners; returns its id."""
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO open_replies (channel_id, message_ids, application_id, interaction_token)"
                " VALUES (:channel, :ids, :app, :token)"
            ),
            {"channel": channel_id, "ids": json.dumps(message_ids), "app": 11 if token else None, "token": token},
        )
        found = await connection.execute(text("SELECT max(id) FROM open_replies"))
        return int(found.scalar_one())


async def test_upgrade_creates_the_schema_in_a_new_database_file(sqlite_db_url: str, tmp_path: Path) -> None:
    db_url = sqlite_db_url
    assert await current_revision(db_url) is None
    assert not (tmp_path / "data").exists()

    await upgrade(db_url)
    # Start-up runs the upgrade every time; at head it must change nothing.
    await upgrade(db_url)

    assert (tmp_path / "data" / "bot.db").is_file()
    assert await current_revision(db_url) == head_revision()
    engine = open_database(db_url)
    try:
        assert await table_names(engine) == TABLES
    finally:
        await engine.dispose()


async def test_upgrade_sync_works_without_an_event_loop_and_refuses_inside_one(db_url: str) -> None:
    await asyncio.to_thread(upgrade_sync, db_url)

    assert await current_revision(db_url) == head_revision()
    with pytest.raises(RuntimeError, match="await upgrade"):
        upgrade_sync(db_url)


async def test_migrations_describe_the_same_schema_as_the_models(db_url: str) -> None:
    await upgrade(db_url)

    def differences(connection: Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))

    engine = open_database(db_url)
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(differences) == []
    finally:
        await engine.dispose()


async def test_upgrading_from_the_first_revision_keeps_stored_conversations(db_url: str) -> None:
    await upgrade(db_url, FIRST)
    engine = open_database(db_url)
    try:
        assert await table_names(engine) == {"alembic_version", "images", "turns"}
        await seed_first_revision(engine)
    finally:
        await engine.dispose()

    await upgrade(db_url)

    assert await current_revision(db_url) == head_revision()
    engine = open_database(db_url)
    try:
        store = HistoryStore(session_factory(engine))
        question, answer = await store.turns(7)
        assert (question.role, question.text, question.author_id, question.author_name) == (
            "user",
            "what is this?",
            42,
            "ada",
        )
        assert question.message_ids == (100,)
        assert question.image_sha256 == image().sha256
        assert await store.image_bytes(image().sha256) == image().data
        assert (answer.role, answer.text, answer.message_ids) == ("assistant", "a cat", (101, 102))
        # Replies to answers written before the upgrade are still recognised.
        found = await store.find_turn_by_message(102)
        assert found is not None
        assert found.id == answer.id
        await store.set_setting("precision", "int8")
        assert await store.get_setting("precision") == "int8"
    finally:
        await engine.dispose()


async def test_a_failed_upgrade_leaves_the_database_as_it_was(db_url: str) -> None:
    await upgrade(db_url, FIRST)
    engine = open_database(db_url)
    try:
        await seed_first_revision(engine)
        # A leftover table makes the second migration fail after it has already created `settings`.
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE turn_messages (x INTEGER)"))
    finally:
        await engine.dispose()

    with pytest.raises(Exception, match="turn_messages"):
        await upgrade(db_url)

    assert await current_revision(db_url) == FIRST
    engine = open_database(db_url)
    try:
        assert "settings" not in await table_names(engine)
        assert await count_rows(engine, "turns") == 2
        async with engine.begin() as connection:
            await connection.execute(text("DROP TABLE turn_messages"))
    finally:
        await engine.dispose()

    await upgrade(db_url)
    assert await current_revision(db_url) == head_revision()


async def test_downgrading_to_the_first_revision_and_back_keeps_conversations(db_url: str) -> None:
    await upgrade(db_url)
    engine = open_database(db_url)
    try:
        store = HistoryStore(session_factory(engine))
        turn_id = await store.add_assistant_turn(3, "an answer", message_ids=[500, 501])
    finally:
        await engine.dispose()

    await downgrade(db_url, FIRST)
    assert await current_revision(db_url) == FIRST
    await upgrade(db_url)

    engine = open_database(db_url)
    try:
        store = HistoryStore(session_factory(engine))
        [turn] = await store.turns(3)
        assert (turn.id, turn.text, turn.message_ids) == (turn_id, "an answer", (500, 501))
        found = await store.find_turn_by_message(501)
        assert found is not None
        assert found.id == turn_id
    finally:
        await engine.dispose()


async def test_downgrade_to_base_removes_every_table(db_url: str) -> None:
    await upgrade(db_url)
    await downgrade(db_url, "base")

    assert await current_revision(db_url) is None
    engine = open_database(db_url)
    try:
        assert await table_names(engine) <= {"alembic_version"}
    finally:
        await engine.dispose()


async def test_the_open_replies_revision_upgrades_and_downgrades_without_touching_conversations(db_url: str) -> None:
    await upgrade(db_url, BEFORE_OPEN_REPLIES)
    engine = open_database(db_url)
    try:
        assert await table_names(engine) == TABLES - {"open_replies"} - SHARED_RULES
        turn_id = await HistoryStore(session_factory(engine)).add_user_turn(
            5, "what is this?", author_id=1, author_name="ada", image=image(), message_ids=[900]
        )
    finally:
        await engine.dispose()

    await upgrade(db_url, BEFORE_SHARED_RULES)
    assert await current_revision(db_url) == BEFORE_SHARED_RULES
    engine = open_database(db_url)
    try:
        reply_id = await seed_open_reply(engine, 5, [901, 902])
        async with engine.connect() as connection:
            stored = (await connection.execute(text("SELECT id, channel_id, message_ids FROM open_replies"))).all()
        # SQLite hands JSON back as text, PostgreSQL as the list.
        ids = [row[2] if isinstance(row[2], list) else json.loads(row[2]) for row in stored]
        assert [(row[0], row[1]) for row in stored] == [(reply_id, 5)]
        assert ids == [[901, 902]]
    finally:
        await engine.dispose()

    await downgrade(db_url, BEFORE_OPEN_REPLIES)
    assert await current_revision(db_url) == BEFORE_OPEN_REPLIES
    engine = open_database(db_url)
    try:
        assert await table_names(engine) == TABLES - {"open_replies"} - SHARED_RULES
        [turn] = await HistoryStore(session_factory(engine)).turns(5)
        assert (turn.id, turn.text, turn.image_sha256) == (turn_id, "what is this?", image().sha256)
    finally:
        await engine.dispose()

    await upgrade(db_url)
    engine = open_database(db_url)
    try:
        assert await ReplyStore(session_factory(engine)).open_replies() == []
    finally:
        await engine.dispose()


async def test_the_reply_owners_revision_keeps_open_replies_and_treats_them_as_left_over(db_url: str) -> None:
    await upgrade(db_url, BEFORE_REPLY_OWNERS)
    engine = open_database(db_url)
    try:
        first = await seed_open_reply(engine, 5, [901, 902])
        second = await seed_open_reply(engine, 6, [903], token="tok")
    finally:
        await engine.dispose()

    await upgrade(db_url)
    engine = open_database(db_url)
    try:
        replies = ReplyStore(session_factory(engine))
        left = await replies.of_others()
        # Both kept with their messages; no process owns them, so a start closes them.
        assert [(r.id, r.channel_id, r.message_ids, r.owner) for r in left] == [
            (first, 5, (901, 902), None),
            (second, 6, (903,), None),
        ]
        assert left[1].interaction == Interaction(11, "tok")
        assert all(abandoned(reply, utcnow()) for reply in left)
        assert await replies.adopt(left[0])
        mine = await replies.open(7, [904])
        # New rows after the upgrade take fresh ids (AUTOINCREMENT survives a rebuild of the table on SQLite).
        assert mine > second
    finally:
        await engine.dispose()

    await downgrade(db_url, BEFORE_REPLY_OWNERS)
    assert await current_revision(db_url) == BEFORE_REPLY_OWNERS
    engine = open_database(db_url)
    try:
        async with engine.connect() as connection:
            rows = (await connection.execute(text("SELECT id, channel_id FROM open_replies ORDER BY id"))).all()
            columns = await connection.run_sync(
                lambda sync: {c["name"] for c in inspect(sync).get_columns("open_replies")}
            )
        assert [tuple(row) for row in rows] == [(first, 5), (second, 6), (mine, 7)]
        assert "owner" not in columns
    finally:
        await engine.dispose()
    await upgrade(db_url)
    assert await current_revision(db_url) == head_revision()
