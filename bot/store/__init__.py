"""The conversation store: channel histories, their images, bot-wide settings and open replies, in SQL.

Knows nothing about Discord or the model; ids are plain integers and images plain bytes.
"""

from bot.store.db import (
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    open_database,
    session_factory,
    upgrade,
    upgrade_sync,
)
from bot.store.history import HistoryStore, StoredImage, StoredTurn
from bot.store.replies import ReplyStore, StoredReply

__all__ = [
    "HistoryStore",
    "ReplyStore",
    "StoredImage",
    "StoredReply",
    "StoredTurn",
    "alembic_config",
    "current_revision",
    "downgrade",
    "head_revision",
    "open_database",
    "session_factory",
    "upgrade",
    "upgrade_sync",
]
