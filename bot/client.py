"""The Discord client: owns the long-lived resources and loads the cogs."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.chat.lifecycle import RESTARTING, AnswerTasks
from bot.chat.scheduler import Scheduler
from bot.chat.service import ChatService
from bot.config import Config
from bot.engine import variants
from bot.engine.base import GenerationSettings
from bot.engine.manager import REMOTE_KIND, ModelManager, needs_model_folder
from bot.loopwatch import LoopWatch
from bot.store.db import open_database, session_factory, upgrade
from bot.store.history import HistoryStore
from bot.store.replies import ReplyStore
from bot.store.shared import QUESTION_TTL, SharedRules

log = logging.getLogger(__name__)

EXTENSIONS = ("bot.cogs.chat", "bot.cogs.admin", "bot.cogs.privacy", "bot.cogs.recovery", "bot.cogs.stopping")
COMMAND_FAILED = "Something went wrong with that command; the details were logged."


class StartupError(RuntimeError):
    """The bot can't start; ``str()`` says what to do."""


class LlavaBot(commands.Bot):
    """The bot. Resources are created in :meth:`setup_hook` and released in :meth:`close`."""

    store: HistoryStore
    replies: ReplyStore
    models: ModelManager
    chat: ChatService
    http_session: aiohttp.ClientSession
    db_engine: AsyncEngine
    rules: SharedRules

    def __init__(self, config: Config, **options: Any) -> None:
        # Message Content is a privileged intent the bot needs only for replies to other people's pictures:
        # Discord still delivers the content and attachments of messages that mention the bot (a reply
        # that pings it counts) and of DMs.
        intents = discord.Intents.default()
        intents.message_content = config.discord.message_content_intent
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            help_command=None,
            allowed_mentions=discord.AllowedMentions.none(),
            **options,
        )
        self.config = config
        self.loop_watch = LoopWatch()
        self.tree.error(self.on_app_command_error)
        self.answers = AnswerTasks()
        self._cut_short = asyncio.Event()
        self._shutdown: asyncio.Task[None] | None = None
        self._keep_claims: asyncio.Task[None] | None = None

    async def setup_hook(self) -> None:
        config = self.config
        await upgrade(config.database.url)
        self.db_engine = open_database(config.database.url)
        self.store = HistoryStore(session_factory(self.db_engine))
        self.replies = ReplyStore(session_factory(self.db_engine))
        self.http_session = aiohttp.ClientSession()
        model = config.model
        self.models = ModelManager(
            Path(model.dir),
            model.engine,
            model.device,
            model.ov_config,
            stall_timeout=model.stall_timeout,
            **remote_options(config),
        )
        precision = await self.store.get_setting("precision") or model.precision
        available = self.models.available()
        if available and precision not in available:
            log.warning("The saved precision %s is no longer available; using %s", precision, model.precision)
            precision = model.precision
        await self.models.switch(precision)
        settings = GenerationSettings(
            max_new_tokens=model.max_new_tokens, temperature=model.temperature, top_p=model.top_p
        )
        scheduler = Scheduler(max_queue=config.chat.max_queue, concurrency=self.models.concurrency)
        self.rules = SharedRules(session_factory(self.db_engine))
        await self.rules.clear_expired()
        self._keep_claims = asyncio.create_task(keep_claims(self.rules), name="keep-claims")
        self.chat = ChatService(
            self.store, self.models, scheduler, settings, config.chat.history_turns, rules=self.rules
        )
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        await self.sync_commands()
        # Loading the model holds the GIL for seconds; what matters is the lag once the bot serves.
        self.loop_watch.start()

    async def sync_commands(self) -> None:
        """Register slash commands globally and, for instant availability, in the configured servers."""
        try:
            await self.tree.sync()
            for guild_id in self.config.discord.command_guild_ids:
                guild = discord.Object(id=guild_id)
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
        except discord.HTTPException:
            log.exception("Registering slash commands failed; they may be missing until the next start")

    async def on_message(self, message: discord.Message, /) -> None:
        """Questions are handled by the chat cog; there are no prefix commands to look for."""

    async def on_ready(self) -> None:
        user = self.user
        log.info("Connected as %s (%s) in %d servers", user, user.id if user else "?", len(self.guilds))

    async def on_app_command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """One plain sentence for the person; the details go to the log."""
        log.error("Command %s failed", interaction.command.name if interaction.command else "?", exc_info=error)
        try:
            if interaction.response.is_done():
                await interaction.followup.send(COMMAND_FAILED, ephemeral=True)
            else:
                await interaction.response.send_message(COMMAND_FAILED, ephemeral=True)
        except discord.HTTPException:
            log.warning("Could not report the failure of a command", exc_info=True)

    def request_shutdown(self, signum: int) -> None:
        """A signal asked the bot to stop: finish answers within the grace period, then close; twice: hurry."""
        name = signal.Signals(signum).name
        if self._shutdown is None:
            log.info(
                "%s received: taking no new questions; answers get up to %.0f s to finish",
                name,
                self.config.discord.shutdown_grace,
            )
            self._shutdown = asyncio.create_task(self.shutdown(), name="shutdown")
        elif not self._cut_short.is_set():
            log.info("%s received again: ending the remaining answers now", name)
            self._cut_short.set()

    async def shutdown(self) -> None:
        """Stop taking questions, let running answers finish within ``discord.shutdown_grace``, then close."""
        if hasattr(self, "chat"):
            self.chat.interrupted_sentence = RESTARTING
        running = len(self.answers)
        cut = await self.answers.drain(self.config.discord.shutdown_grace, self._cut_short)
        if running:
            log.info("%d answers finished in time, %d were cut short", running - cut, cut)
        await self.close()

    async def wait_shutdown(self) -> None:
        """Wait for a shutdown that a signal started, if any, to complete."""
        if self._shutdown is not None:
            await self._shutdown

    async def close(self) -> None:
        # Closing within guild_ready_timeout of connecting: discord.py's pending "ready" would otherwise fire
        # on the closed client and fail with a traceback.
        ready = getattr(self._connection, "_ready_task", None)
        if ready is not None:
            ready.cancel()
        for name in list(self.extensions):
            await self.unload_extension(name)
        await super().close()
        if hasattr(self, "models"):
            await self.models.close()
        if hasattr(self, "http_session"):
            await self.http_session.close()
        if self._keep_claims is not None:
            self._keep_claims.cancel()
        if hasattr(self, "db_engine"):
            await self.db_engine.dispose()
        await self.loop_watch.stop()
        log.info("Event loop lag over this run: %s", self.loop_watch.summary())


class ShardedLlavaBot(LlavaBot, commands.AutoShardedBot):
    """The same bot on discord.py's AutoShardedBot: several gateway shards in one process."""


def make_bot(config: Config, **options: Any) -> LlavaBot:
    """The bot for ``config``: one plain connection, or the configured shards of a sharded bot."""
    shards = config.discord
    if shards.shard_count == 0:
        return LlavaBot(config, **options)
    # Without shard_ids discord.py runs every shard of shard_count in this process.
    ids = list(shards.shard_ids) or None
    log.info("Running shards %s of %d", ids or f"0-{shards.shard_count - 1}", shards.shard_count)
    return ShardedLlavaBot(config, shard_count=shards.shard_count, shard_ids=ids, **options)


async def keep_claims(rules: SharedRules) -> None:
    """Keep this process's questions claimed in the database while it lives (a crash lets them lapse)."""
    while True:
        await asyncio.sleep(QUESTION_TTL / 3)
        try:
            await rules.refresh()
        except Exception:
            log.exception("Could not refresh the questions this process is answering")


def point_at(config: Config) -> None:
    """Use the configured REST base and gateway instead of Discord's own (a proxy, or a test server)."""
    if config.discord.api_base_url:
        discord.http.Route.BASE = config.discord.api_base_url.rstrip("/")
    if config.discord.gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(config.discord.gateway_url)


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
        return  # e.g. the model lives on a server; a local folder, if any, only lends its tokenizer
    model_dir = Path(config.model.dir)
    precision = config.model.precision
    if variants.is_complete(model_dir / precision):
        return
    command = f"llava-bot convert {config.model.source} --out {model_dir}"
    if not config.model.auto_convert:
        raise StartupError(
            f"No converted {precision} model in {model_dir}: run `{command}` first "
            "(or set model.auto_convert = true to convert at start)."
        )
    from bot.engine.convert import ConversionError, convert

    log.info(
        "No %s model in %s yet: converting %s (this can take a long time)", precision, model_dir, config.model.source
    )
    try:
        convert(config.model.source, model_dir, [precision])
    except ConversionError as error:
        raise StartupError(f"Converting the model failed: {error}") from error


def run_bot(config: Config) -> int:
    """Start the bot and block until it stops."""
    logging.getLogger().setLevel(config.logging.level.upper())
    ensure_model(config)
    point_at(config)
    bot = make_bot(config)
    asyncio.run(_serve(bot, config.discord.token))
    return 0


async def _serve(bot: LlavaBot, token: str) -> None:
    # discord.py's Client.run() only turns Ctrl+C into a close, and SIGTERM (a deploy, systemd, docker stop)
    # would end the process at once, leaving replies half-written. Both signals get the graceful path.
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, bot.request_shutdown, signum)
    try:
        async with bot:
            await bot.start(token)
        await bot.wait_shutdown()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
