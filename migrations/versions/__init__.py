"""Revision scripts; Alembic loads them by path."""
