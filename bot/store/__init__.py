"""The conversation store: channel histories, their images and bot-wide settings, in SQL.

Knows nothing about Discord or the model; ids are plain integers and images plain bytes.
"""

from bot.store.db import (
    alembic_config,
    create_engine,
    current_revision,
    downgrade,
    head_revision,
    session_factory,
    upgrade,
    upgrade_sync,
)
from bot.store.history import HistoryStore, StoredImage, StoredTurn

__all__ = [
    "HistoryStore",
    "StoredImage",
    "StoredTurn",
    "alembic_config",
    "create_engine",
    "current_revision",
    "downgrade",
    "head_revision",
    "session_factory",
    "upgrade",
    "upgrade_sync",
]
