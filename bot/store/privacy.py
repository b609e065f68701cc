"""Deleting people's data: everything one person stored (``/forget``), and everything past its retention.

What goes with a person's questions: the bot's answer that directly follows each of them in its channel
(it is derived from their words), the Discord message links of both, and the images no remaining turn
refers to. Other people's questions and the answers to them stay, as do images they also used.

Both operations follow the store's SQLite rule (see :mod:`bot.store.history`): they write first, so every
read that decides what to delete happens under the write lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from sqlalchemy import ColumnElement, delete, exists, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from bot.store.db import rowcount
from bot.store.tables import ImageRow, TurnMessageRow, TurnRow

log = logging.getLogger(__name__)

# Ids are deleted in batches so that no statement exceeds a backend's limit on bound parameters.
_BATCH = 500
_T = TypeVar("_T")


@dataclass(frozen=True)
class Removed:
    """How much was deleted."""

    questions: int = 0
    answers: int = 0
    images: int = 0

    @property
    def turns(self) -> int:
        """Questions and answers together."""
        return self.questions + self.answers


def _batches(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _BATCH):
        yield items[start : start + _BATCH]


async def _delete_turns(session: AsyncSession, turn_ids: Sequence[int]) -> int:
    removed = 0
    for batch in _batches(turn_ids):
        await session.execute(
            delete(TurnMessageRow).where(TurnMessageRow.turn_id.in_(batch)).execution_options(synchronize_session=False)
        )
        result = await session.execute(
            delete(TurnRow).where(TurnRow.id.in_(batch)).execution_options(synchronize_session=False)
        )
        removed += rowcount(result)
    return removed


async def _delete_unused_images(session: AsyncSession, candidates: Iterable[str]) -> int:
    still_used = exists().where(TurnRow.image_sha256 == ImageRow.sha256)
    removed = 0
    for batch in _batches(sorted(set(candidates))):
        result = await session.execute(
            delete(ImageRow).where(ImageRow.sha256.in_(batch), ~still_used).execution_options(synchronize_session=False)
        )
        removed += rowcount(result)
    return removed


async def forget_author(sessions: async_sessionmaker[AsyncSession], author_id: int) -> Removed:
    """Delete every question ``author_id`` asked, in every channel, with the answers to them and their images."""
    asked = (TurnRow.role == "user") & (TurnRow.author_id == author_id)
    following = aliased(TurnRow)
    next_turn = (
        select(func.min(following.id))
        .where(following.channel_id == TurnRow.channel_id, following.id > TurnRow.id)
        .scalar_subquery()
    )
    async with sessions() as session, session.begin():
        # Written first, so the reads below already run under the write lock.
        await session.execute(
            delete(TurnMessageRow)
            .where(TurnMessageRow.turn_id.in_(select(TurnRow.id).where(asked)))
            .execution_options(synchronize_session=False)
        )
        rows = (await session.execute(select(TurnRow.id, TurnRow.image_sha256, next_turn).where(asked))).all()
        questions = [row[0] for row in rows]
        images = {row[1] for row in rows if row[1] is not None}
        followers = [row[2] for row in rows if row[2] is not None]
        answers: list[int] = []
        for batch in _batches(followers):
            answers += await session.scalars(
                select(TurnRow.id).where(TurnRow.id.in_(batch), TurnRow.role == "assistant")
            )
        removed = Removed(
            questions=await _delete_turns(session, questions),
            answers=await _delete_turns(session, answers),
            images=await _delete_unused_images(session, images),
        )
    log.info(
        "Forgot user %s: %d questions, %d answers and %d images removed",
        author_id,
        removed.questions,
        removed.answers,
        removed.images,
    )
    return removed


async def _leading_answers(session: AsyncSession, channels: Sequence[int]) -> list[int]:
    """Answers that now open their channel's history: their question is gone."""
    earlier = aliased(TurnRow)
    found: list[int] = []
    for batch in _batches(channels):
        has_earlier: ColumnElement[bool] = exists().where(
            earlier.channel_id == TurnRow.channel_id, earlier.id < TurnRow.id
        )
        query = select(TurnRow.id).where(TurnRow.channel_id.in_(batch), TurnRow.role == "assistant", ~has_earlier)
        found += await session.scalars(query)
    return found


async def delete_older_than(sessions: async_sessionmaker[AsyncSession], cutoff: datetime) -> Removed:
    """Delete turns created before ``cutoff``, then the images no turn refers to that were stored before it.

    An image is stored no later than the first turn that refers to it, so this takes every image that only
    old turns used, and never one that a question is being stored with right now. An answer left at the
    head of its channel (its question was older than the cutoff) goes too: a conversation must not open
    with an answer to nothing.
    """
    old = TurnRow.created_at < cutoff
    async with sessions() as session, session.begin():
        await session.execute(
            delete(TurnMessageRow)
            .where(TurnMessageRow.turn_id.in_(select(TurnRow.id).where(old)))
            .execution_options(synchronize_session=False)
        )
        channels = list(await session.scalars(select(TurnRow.channel_id).where(old).distinct()))
        questions = rowcount(
            await session.execute(
                delete(TurnRow).where(old, TurnRow.role == "user").execution_options(synchronize_session=False)
            )
        )
        answers = rowcount(
            await session.execute(delete(TurnRow).where(old).execution_options(synchronize_session=False))
        )
        answers += await _delete_turns(session, await _leading_answers(session, channels))
        unused = ~exists().where(TurnRow.image_sha256 == ImageRow.sha256)
        images = rowcount(
            await session.execute(
                delete(ImageRow)
                .where(ImageRow.created_at < cutoff, unused)
                .execution_options(synchronize_session=False)
            )
        )
    removed = Removed(questions=questions, answers=answers, images=images)
    if removed.turns or removed.images:
        log.info(
            "Retention: %d questions, %d answers and %d images older than %s removed",
            removed.questions,
            removed.answers,
            removed.images,
            cutoff.isoformat(timespec="seconds"),
        )
    return removed
