"""Rules across bot processes sharing one database; each "process" here has its own engine and name."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.store import HistoryStore, open_database, session_factory
from bot.store.shared import Generations, SharedRules
from tests.store.conftest import count_rows

CHANNEL, PERSON, OTHER = 7, 42, 43


@pytest.fixture
async def second_engine(engine: AsyncEngine, db_url: str) -> AsyncIterator[AsyncEngine]:
    """A second connection pool to the same database, as another bot process would have."""
    other = open_database(db_url)
    yield other
    await other.dispose()


@pytest.fixture
def rules_a(engine: AsyncEngine) -> SharedRules:
    return SharedRules(session_factory(engine), "host-a:1:aaaa")


@pytest.fixture
def rules_b(second_engine: AsyncEngine) -> SharedRules:
    return SharedRules(session_factory(second_engine), "host-b:2:bbbb")


async def test_a_person_holds_one_question_across_processes(rules_a: SharedRules, rules_b: SharedRules) -> None:
    assert await rules_a.claim(PERSON, CHANNEL)
    assert not await rules_b.claim(PERSON, 8)
    assert not await rules_a.claim(PERSON, CHANNEL), "the same process is refused too"
    assert await rules_b.claim(OTHER, 8), "another person is not held up"
    assert await rules_a.holder(PERSON) == rules_a.owner

    # Only the process that holds the claim can end it.
    await rules_b.release(PERSON)
    assert not await rules_b.claim(PERSON, 8)
    await rules_a.release(PERSON)
    assert await rules_b.claim(PERSON, 8)
    assert await rules_b.holder(PERSON) == rules_b.owner


async def test_simultaneous_claims_admit_exactly_one(rules_a: SharedRules, rules_b: SharedRules) -> None:
    for person in range(100, 110):
        results = await asyncio.gather(rules_a.claim(person, 1), rules_b.claim(person, 2))
        assert sorted(results) == [False, True], person


async def test_a_dead_process_claim_expires_and_a_live_one_is_kept(
    rules_a: SharedRules, rules_b: SharedRules, engine: AsyncEngine
) -> None:
    # A claim whose process stopped refreshing it (here: it lapsed at once) is taken over.
    assert await rules_a.claim(PERSON, CHANNEL, ttl=0)
    assert await rules_b.claim(PERSON, CHANNEL)
    assert await rules_b.holder(PERSON) == rules_b.owner

    # A claim refreshed by its living process stays.
    assert await rules_a.claim(OTHER, CHANNEL, ttl=0)
    assert await rules_a.refresh(ttl=600) == 1
    assert not await rules_b.claim(OTHER, CHANNEL)

    # At start, a process clears whatever lapsed.
    assert await rules_a.claim(99, CHANNEL, ttl=0)
    assert await rules_b.clear_expired() == 1
    assert await count_rows(engine, "active_questions") == 2


async def test_a_reset_in_another_process_keeps_a_running_answer_out(
    rules_a: SharedRules, rules_b: SharedRules, store: HistoryStore
) -> None:
    since = await rules_a.current(CHANNEL, PERSON)
    await store.add_user_turn(CHANNEL, "what is this?", author_id=PERSON, author_name="ada")
    # Process B runs /reset while process A is still answering.
    await rules_b.bump_channel(CHANNEL)
    await store.reset(CHANNEL)

    assert await rules_a.add_answer_if_current(CHANNEL, PERSON, since, "a cat", message_ids=[5]) is None
    assert await store.turns(CHANNEL) == []
    assert await store.find_turn_by_message(5) is None

    # The next answer, begun after the reset, is kept.
    since = await rules_a.current(CHANNEL, PERSON)
    assert since.channel == 1
    turn_id = await rules_a.add_answer_if_current(CHANNEL, PERSON, since, "a dog", message_ids=[6])
    assert turn_id is not None
    assert [t.text for t in await store.turns(CHANNEL)] == ["a dog"]


async def test_a_forget_in_another_process_keeps_that_persons_answer_out(
    rules_a: SharedRules, rules_b: SharedRules, store: HistoryStore
) -> None:
    since = await rules_a.current(CHANNEL, PERSON)
    others = await rules_a.current(CHANNEL, OTHER)
    await rules_b.bump_author(PERSON)
    await store.forget_author(PERSON)

    assert await rules_a.add_answer_if_current(CHANNEL, PERSON, since, "for ada") is None
    # Someone else's answer in the same channel is not affected.
    assert await rules_a.add_answer_if_current(CHANNEL, OTHER, others, "for bob") is not None
    assert [t.text for t in await store.turns(CHANNEL)] == ["for bob"]
    assert await rules_a.current(CHANNEL, PERSON) == Generations(channel=0, author=1)


async def test_an_answer_racing_a_reset_never_outlives_it(
    rules_a: SharedRules, rules_b: SharedRules, store: HistoryStore
) -> None:
    async def reset() -> None:
        await rules_b.bump_channel(CHANNEL)
        await store.reset(CHANNEL)

    for attempt in range(10):
        since = await rules_a.current(CHANNEL, PERSON)
        await store.add_user_turn(CHANNEL, f"question {attempt}", author_id=PERSON, author_name="ada")
        await asyncio.gather(rules_a.add_answer_if_current(CHANNEL, PERSON, since, f"answer {attempt}"), reset())
        # Whichever came first, the reset leaves the channel empty: no answer without its question.
        assert await store.turns(CHANNEL) == [], attempt


async def test_a_crashed_process_on_this_host_releases_its_claims_at_the_next_start(
    engine: AsyncEngine, second_engine: AsyncEngine
) -> None:
    # A process of this host that has ended (kill -9, then a quick restart): its claim has not expired yet.
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await child.wait()
    crashed = SharedRules(session_factory(engine), f"{socket.gethostname()}:{child.pid}:dead")
    elsewhere = SharedRules(session_factory(engine), "another-host:1:cccc")
    assert await crashed.claim(PERSON, CHANNEL)
    assert await elsewhere.claim(OTHER, CHANNEL)

    restarted = SharedRules(session_factory(second_engine))
    assert await restarted.clear_expired() == 1
    assert await restarted.claim(PERSON, CHANNEL), "the person is not locked out until the claim expires"
    assert not await restarted.claim(OTHER, CHANNEL), "another host's live claim is kept"
