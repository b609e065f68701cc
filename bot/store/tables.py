"""Database tables of the conversation store.

The schema itself is owned by the Alembic migrations in ``migrations/``; these classes must describe the
same tables (a test compares them with the migrated database) but are never used to create them.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import JSON, TypeDecorator

log = logging.getLogger(__name__)

# Named constraints let later migrations drop or alter them by name, which SQLite's batch mode relies on.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that always comes back as an aware UTC datetime.

    SQLite has no time-zone-aware type and returns naive values; normalising here keeps every backend
    returning the same thing, so callers can compare timestamps without caring where they came from.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        # Naive values are taken to be UTC already, as everything this store writes is.
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        # SQLite's storage format has no offset field and would drop it silently.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base holding the store's metadata."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ImageRow(Base):
    """Normalised image bytes, addressed by their SHA-256.

    The bytes are kept because Discord attachment URLs expire, while follow-up questions still need the
    picture. Content addressing stores an image posted in several channels once.
    """

    __tablename__ = "images"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    mime: Mapped[str] = mapped_column(String(100), nullable=False)
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, server_default=func.current_timestamp()
    )


class TurnRow(Base):
    """One message of a channel's conversation, either the person's question or the bot's answer."""

    __tablename__ = "turns"
    __table_args__ = (
        CheckConstraint("role IN ('user', 'assistant')", name="role"),
        # Serves both "this channel's turns" and "the latest N of them" without a sort.
        Index("ix_turns_channel_id_id", "channel_id", "id"),
        Index("ix_turns_image_sha256", "image_sha256"),
        # Without AUTOINCREMENT SQLite reuses the ids of deleted rows, so a turn id held across a reset
        # could silently point at a newer turn.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    author_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    author_name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    text: Mapped[str] = mapped_column(Text, nullable=False)
    image_sha256: Mapped[str | None] = mapped_column(String(64), ForeignKey("images.sha256"), nullable=True)
    # Ordered list of Discord message ids; turn_messages indexes them for lookups.
    message_ids: Mapped[list[int]] = mapped_column(JSON, nullable=False, default=list)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, server_default=func.current_timestamp()
    )


class TurnMessageRow(Base):
    """Which turn a Discord message belongs to.

    A JSON list cannot be searched portably, and the bot asks "is this message one of ours?" for every
    reply it sees, so each message id gets its own indexed row.
    """

    __tablename__ = "turn_messages"

    message_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    turn_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("turns.id", ondelete="CASCADE"), nullable=False, index=True
    )


class SettingRow(Base):
    """A bot-wide setting that must survive restarts, such as the chosen model precision."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime,
        nullable=False,
        default=utcnow,
        onupdate=utcnow,
        server_default=func.current_timestamp(),
    )


class OpenReplyRow(Base):
    """A reply the bot is still writing; the row is deleted once the reply is closed.

    A row that outlives its process (a crash, a power cut) tells the other processes, or the next start,
    which messages still show the "still writing" marker, so that they can end them with a sentence.
    """

    __tablename__ = "open_replies"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # The reply's Discord messages in order; a long answer spans several.
    message_ids: Mapped[list[int]] = mapped_column(JSON, nullable=False, default=list)
    # For an answer to /ask: the interaction's webhook, usable for 15 minutes, which can edit the response even
    # where the bot cannot read the channel.
    application_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    interaction_token: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, server_default=func.current_timestamp()
    )
    # The process writing it (as in ``active_questions``), which pushes ``expires_at`` forward while it lives:
    # another process closes the reply only once its writer has ended. Rows from before owners were
    # recorded have neither and belong to no live process.
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ActiveQuestionRow(Base):
    """A person's question admitted by some bot process and not yet ended: one row per person at most.

    The primary key is what makes "one question per person" hold across processes. The owning process
    pushes ``expires_at`` forward while it lives, so a crashed process's rows lapse on their own.
    """

    __tablename__ = "active_questions"

    author_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    # Which process holds it: host, pid and a random part, unique per run.
    owner: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    channel_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    claimed_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, server_default=func.current_timestamp()
    )
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class GenerationRow(Base):
    """How often a channel was reset (``scope`` "channel") or a person used /forget (``scope`` "author").

    An answer remembers the numbers it started under and is stored only if they are unchanged, whichever
    process ran the /reset or /forget.
    """

    __tablename__ = "generations"
    __table_args__ = (CheckConstraint("scope IN ('channel', 'author')", name="scope"),)

    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    value: Mapped[int] = mapped_column(Integer, nullable=False)
