"""Alembic migrations of the history database, shipped inside the package as ``bot.migrations``."""
