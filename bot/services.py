"""The one place that turns the configuration into the bot's long-lived services, and releases them.

:func:`build_services` makes the database, the stores, the model manager (the model loaded), the scheduler and
the chat service; :class:`bot.client.LlavaBot` receives them and only speaks Discord. The caller closes the
services after the bot: answers are drained and Discord closed first, then :meth:`Services.close` releases the
model and the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.chat.scheduler import Scheduler
from bot.chat.service import ChatService
from bot.config import Config
from bot.engine import variants
from bot.engine.base import GenerationSettings
from bot.engine.manager import REMOTE_KIND, ModelManager, needs_model_folder
from bot.store.db import open_database, session_factory, upgrade
from bot.store.history import HistoryStore
from bot.store.replies import ReplyStore
from bot.store.shared import QUESTION_TTL, SharedRules, process_name

log = logging.getLogger(__name__)

NO_MODEL = (
    "No converted {precision} model in {folder}: run `{command}` first "
    "(or set model.auto_convert = true to convert at start)."
)
CONVERSION_FAILED = "Converting the model failed: {error}"


class StartupError(RuntimeError):
    """The bot can't start; ``str()`` says what to do."""


@dataclass
class Services:
    """What the bot works with; built by :func:`build_services`, released by :meth:`close`."""

    db_engine: AsyncEngine
    store: HistoryStore
    replies: ReplyStore
    rules: SharedRules
    model_manager: ModelManager
    scheduler: Scheduler
    chat: ChatService
    # Downloads of the attachments people ask about.
    http_session: aiohttp.ClientSession
    _resources: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack, repr=False)

    async def close(self) -> None:
        """Release everything in the reverse order of its making: the model first, the database last."""
        await self._resources.aclose()


async def build_services(config: Config) -> Services:
    """Migrate the database, load the model at the saved precision and wire the chat service to both.

    What was made before a step fails is released again before the error propagates.
    """
    resources = contextlib.AsyncExitStack()
    try:
        await upgrade(config.database.url)
        db_engine = open_database(config.database.url)
        resources.push_async_callback(db_engine.dispose)
        store = HistoryStore(session_factory(db_engine))
        http_session = aiohttp.ClientSession()
        resources.push_async_callback(http_session.close)
        model_manager = make_model_manager(config)
        resources.push_async_callback(model_manager.close)
        await model_manager.switch(await _saved_precision(config, store, model_manager))
        # One name for this process in the database: its open replies and its question claims.
        replies = ReplyStore(session_factory(db_engine), process_name())
        rules = SharedRules(session_factory(db_engine), replies.owner)
        await rules.clear_expired()
        claims = asyncio.create_task(keep_claims(rules, replies), name="keep-claims")
        resources.push_async_callback(_cancel, claims)
    except BaseException:
        await resources.aclose()
        raise
    model = config.model
    settings = GenerationSettings(max_new_tokens=model.max_new_tokens, temperature=model.temperature, top_p=model.top_p)
    scheduler = Scheduler(max_queue=config.chat.max_queue, concurrency=model_manager.concurrency)
    return Services(
        db_engine=db_engine,
        store=store,
        replies=replies,
        rules=rules,
        model_manager=model_manager,
        scheduler=scheduler,
        chat=ChatService(store, model_manager, scheduler, settings, config.chat.history_turns, rules=rules),
        http_session=http_session,
        _resources=resources,
    )


def make_model_manager(config: Config) -> ModelManager:
    """The model manager for the configured engine (nothing loaded yet)."""
    model = config.model
    return ModelManager(
        Path(model.dir),
        model.engine,
        model.device,
        model.ov_config,
        stall_timeout=model.stall_timeout,
        batching=model.batching(),
        **remote_options(config),
    )


async def _saved_precision(config: Config, store: HistoryStore, model_manager: ModelManager) -> str:
    # /precision persists its choice; a variant deleted since then falls back to the configured one.
    precision = await store.get_setting("precision") or config.model.precision
    available = model_manager.available()
    if available and precision not in available:
        log.warning("The saved precision %s is no longer available; using %s", precision, config.model.precision)
        precision = config.model.precision
    return precision


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def keep_claims(rules: SharedRules, replies: ReplyStore | None = None) -> None:
    """Keep this process's questions claimed, and its open replies its own, in the database while it lives
    (a crash lets both lapse)."""
    while True:
        await asyncio.sleep(QUESTION_TTL / 3)
        try:
            await rules.refresh()
            if replies is not None:
                await replies.refresh()
        except Exception:
            log.exception("Could not refresh the questions this process is answering")


def remote_options(config: Config) -> dict[str, Any]:
    """The remote engine's settings for ModelManager (nothing for the local engines)."""
    model = config.model
    if model.engine != REMOTE_KIND:
        return {}
    from bot.engine.remote import RemoteSettings

    settings = RemoteSettings(
        base_url=model.base_url,
        model=model.remote_model,
        api_key_env=model.api_key_env,
        timeout=model.request_timeout,
        context_window=model.context_window,
    )
    return {"remote": settings, "remote_models": model.remote_models}


def ensure_model(config: Config) -> None:
    """Make sure the configured precision exists, converting it first if the operator allowed that."""
    if not needs_model_folder(config.model.engine):
        return  # e.g. the remote engine: a local folder, if any, only lends its tokenizer
    model_dir = Path(config.model.dir)
    precision = config.model.precision
    if variants.is_complete(model_dir / precision):
        return
    command = f"llava-bot convert {config.model.source} --out {model_dir}"
    if not config.model.auto_convert:
        raise StartupError(NO_MODEL.format(precision=precision, folder=model_dir, command=command))
    from bot.engine.convert import ConversionError, convert

    log.info(
        "No %s model in %s yet: converting %s (this can take a long time)", precision, model_dir, config.model.source
    )
    try:
        convert(config.model.source, model_dir, [precision])
    except ConversionError as error:
        raise StartupError(CONVERSION_FAILED.format(error=error)) from error
