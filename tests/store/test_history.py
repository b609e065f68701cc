"""The conversation history as the chat feature uses it, on a real migrated SQLite file."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC

import pytest
from PIL import Image
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.engine.base import ImageRef
from bot.store import HistoryStore, StoredImage, StoredTurn, open_database, session_factory
from tests.store.conftest import count_rows, image

# The engine fixture and the tests must share one event loop, as the bot's resources do.
pytestmark = pytest.mark.asyncio(loop_scope="session")


async def ask(store: HistoryStore, channel: int, text: str, *, picture: StoredImage | None = None) -> int:
    return await store.add_user_turn(
        channel, text, author_id=42, author_name="ada", image=picture, message_ids=[channel * 1000]
    )


async def test_a_conversation_round_trips(store: HistoryStore) -> None:
    picture = image()
    question_id = await store.add_user_turn(
        1, "what is unusual here?", author_id=42, author_name="ada", image=picture, message_ids=[10]
    )
    answer_id = await store.add_assistant_turn(1, "the cat is wearing a hat", message_ids=[11, 12])

    question, answer = await store.turns(1)

    assert question == StoredTurn(
        id=question_id,
        role="user",
        text="what is unusual here?",
        author_id=42,
        author_name="ada",
        image_sha256=picture.sha256,
        message_ids=(10,),
        created_at=question.created_at,
    )
    assert answer == StoredTurn(
        id=answer_id,
        role="assistant",
        text="the cat is wearing a hat",
        author_id=None,
        author_name=None,
        image_sha256=None,
        message_ids=(11, 12),
        created_at=answer.created_at,
    )
    assert question.created_at.tzinfo is UTC
    assert question.created_at <= answer.created_at
    assert await store.image_bytes(picture.sha256) == picture.data


async def test_discord_sized_ids_survive(store: HistoryStore) -> None:
    channel, author, message = 1_180_000_000_000_000_001, 9_000_000_000_000_000_007, 2**63 - 1

    await store.add_user_turn(channel, "hi", author_id=author, author_name=None, message_ids=[message])

    [turn] = await store.turns(channel)
    assert (turn.author_id, turn.message_ids) == (author, (message,))
    assert await store.find_turn_by_message(message) == turn


async def test_limit_gives_the_most_recent_turns_oldest_first(store: HistoryStore) -> None:
    for number in range(6):
        await store.add_assistant_turn(1, f"turn {number}")

    assert [turn.text for turn in await store.turns(1, limit=3)] == ["turn 3", "turn 4", "turn 5"]
    assert [turn.text for turn in await store.turns(1)] == [f"turn {number}" for number in range(6)]
    assert await store.turns(1, limit=0) == []
    assert await store.turns(2) == []


async def test_reset_forgets_only_that_channel(store: HistoryStore) -> None:
    await ask(store, 1, "first channel")
    await store.add_assistant_turn(1, "answer", message_ids=[11])
    await ask(store, 2, "second channel")

    assert await store.reset(1) == 2

    assert await store.turns(1) == []
    assert [turn.text for turn in await store.turns(2)] == ["second channel"]
    assert await store.find_turn_by_message(11) is None
    assert await store.find_turn_by_message(2000) is not None
    assert await store.reset(1) == 0


async def test_reset_deletes_images_once_no_channel_uses_them(store: HistoryStore, engine: AsyncEngine) -> None:
    shared, own = image(b"shared"), image(b"own")
    await ask(store, 1, "look", picture=shared)
    await ask(store, 1, "and this", picture=own)
    await ask(store, 2, "same picture here", picture=shared)

    await store.reset(1)

    assert await store.image_bytes(own.sha256) is None
    assert await store.image_bytes(shared.sha256) == shared.data
    await store.reset(2)
    assert await store.image_bytes(shared.sha256) is None
    assert await count_rows(engine, "images") == 0


async def test_deleting_turns_takes_their_links_and_unused_images(store: HistoryStore, engine: AsyncEngine) -> None:
    shared, own = image(b"shared"), image(b"own")
    question = await store.add_user_turn(1, "look", author_id=42, author_name="ada", image=own, message_ids=[10])
    answer = await store.add_assistant_turn(1, "a cat", message_ids=[11])
    kept = await store.add_user_turn(1, "this too", author_id=42, author_name="ada", image=shared, message_ids=[12])
    await store.add_user_turn(2, "same picture", author_id=7, author_name="bo", image=shared, message_ids=[20])

    assert await store.delete_turns([question, answer, question, 999]) == (2, [own.sha256])

    assert [turn.id for turn in await store.turns(1)] == [kept]
    assert await store.find_turn_by_message(10) is None and await store.find_turn_by_message(11) is None
    assert await store.image_bytes(own.sha256) is None
    # Still used in another channel: the shared picture stays.
    assert await store.delete_turns([kept]) == (1, [])
    assert await store.image_bytes(shared.sha256) == shared.data
    assert await store.delete_turns([]) == (0, [])
    assert await count_rows(engine, "turn_messages") == 1


async def test_adjacent_turns_stay_within_the_channel(store: HistoryStore) -> None:
    first = await ask(store, 1, "one")
    await ask(store, 2, "elsewhere")
    second = await store.add_assistant_turn(1, "two")
    third = await ask(store, 1, "three")

    async def ids(turn_id: int) -> tuple[int | None, int | None]:
        before, after = await store.adjacent_turns(turn_id)
        return (before.id if before else None), (after.id if after else None)

    assert await ids(second) == (first, third)
    assert await ids(first) == (None, second)
    assert await ids(third) == (second, None)
    assert await ids(12345) == (None, None)


async def test_turn_ids_are_never_reused_after_a_reset(store: HistoryStore) -> None:
    first = await ask(store, 1, "hello")
    await store.reset(1)

    assert await ask(store, 1, "hello again") > first


async def test_replies_are_recognised_by_any_of_their_messages(store: HistoryStore) -> None:
    question_id = await ask(store, 1, "what is this?")
    answer_id = await store.add_assistant_turn(1, "a long answer", message_ids=[11, 12, 13])

    found_question = await store.find_turn_by_message(1000)
    found_answer = await store.find_turn_by_message(12)
    assert found_question is not None
    assert found_question.id == question_id
    assert found_answer is not None
    assert (found_answer.id, found_answer.role) == (answer_id, "assistant")
    assert await store.find_turn_by_message(999) is None


async def test_message_ids_can_be_replaced_once_an_answer_is_complete(store: HistoryStore) -> None:
    answer_id = await store.add_assistant_turn(1, "streaming…", message_ids=[11])

    assert await store.set_message_ids(answer_id, [11, 14, 14, 15])

    [answer] = await store.turns(1)
    assert answer.message_ids == (11, 14, 15)
    found = await store.find_turn_by_message(15)
    assert found is not None
    assert found.id == answer_id
    assert await store.set_message_ids(answer_id, [16])
    assert await store.find_turn_by_message(11) is None


async def test_setting_message_ids_of_a_reset_turn_reports_it_is_gone(store: HistoryStore) -> None:
    answer_id = await store.add_assistant_turn(1, "answer")
    await store.reset(1)

    assert not await store.set_message_ids(answer_id, [11])
    assert await store.find_turn_by_message(11) is None


async def test_images_are_stored_once_per_content(store: HistoryStore, engine: AsyncEngine) -> None:
    picture = image()

    sha = await store.put_image(picture.data, picture.mime, picture.width, picture.height)
    again = await store.put_image(picture.data, picture.mime, picture.width, picture.height)
    await ask(store, 1, "look", picture=picture)
    await ask(store, 2, "look", picture=picture)
    other = await store.put_image(b"other bytes", "image/jpeg", 10, 10)

    assert sha == again == picture.sha256
    assert other != sha
    assert await count_rows(engine, "images") == 2
    assert await store.image_bytes(sha) == picture.data
    assert await store.image_bytes("0" * 64) is None


async def test_an_uploaded_image_is_stored_under_the_digest_it_arrived_with(
    store: HistoryStore, engine: AsyncEngine
) -> None:
    upload = ImageRef.from_image(Image.new("RGB", (6, 4), (200, 30, 30)))
    await ask(store, 1, "look", picture=StoredImage.from_ref(upload))
    # The same picture from elsewhere (bytes alone) lands on the same row: both keys are the bytes' SHA-256.
    again = await store.put_image(upload.data, upload.mime, upload.width, upload.height)

    assert again == upload.sha256 == hashlib.sha256(upload.data).hexdigest()
    assert (await store.turns(1))[0].image_sha256 == upload.sha256
    assert await count_rows(engine, "images") == 1
    assert await store.image_bytes(upload.sha256) == upload.data


async def test_settings_keep_the_latest_value(store: HistoryStore) -> None:
    assert await store.get_setting("precision") is None

    await store.set_setting("precision", "int4")
    await store.set_setting("precision", "fp16")

    assert await store.get_setting("precision") == "fp16"


async def test_everything_survives_a_restart(db_url: str, engine: AsyncEngine, store: HistoryStore) -> None:
    picture = image()
    await ask(store, 1, "remember this", picture=picture)
    await store.add_assistant_turn(1, "I will", message_ids=[11])
    await store.set_setting("precision", "int8")
    before = await store.turns(1)
    await engine.dispose()

    reopened = open_database(db_url)
    try:
        store = HistoryStore(session_factory(reopened))
        assert await store.turns(1) == before
        assert await store.get_setting("precision") == "int8"
        assert await store.image_bytes(picture.sha256) == picture.data
        assert await store.find_turn_by_message(11) == before[1]
    finally:
        await reopened.dispose()


async def test_many_channels_write_at_once(store: HistoryStore, engine: AsyncEngine) -> None:
    writers, exchanges = 20, 5
    picture = image()

    async def converse(channel: int) -> None:
        for number in range(exchanges):
            await store.add_user_turn(
                channel,
                f"question {number}",
                author_id=channel,
                author_name=None,
                image=picture,
                message_ids=[channel * 100 + number * 2],
            )
            await store.turns(channel, limit=10)
            answer = await store.add_assistant_turn(channel, f"answer {number}")
            await store.set_message_ids(answer, [channel * 100 + number * 2 + 1])
        await store.set_setting(f"last-{channel}", "done")

    async def reset_elsewhere() -> None:
        for _ in range(exchanges):
            await ask(store, 999, "noise")
            await store.reset(999)

    await asyncio.gather(*(converse(channel) for channel in range(1, writers + 1)), reset_elsewhere())

    for channel in range(1, writers + 1):
        turns = await store.turns(channel)
        assert [turn.text for turn in turns] == [
            text for number in range(exchanges) for text in (f"question {number}", f"answer {number}")
        ]
        assert [turn.message_ids for turn in turns] == [(channel * 100 + index,) for index in range(exchanges * 2)]
        assert await store.get_setting(f"last-{channel}") == "done"
    assert await count_rows(engine, "images") == 1
