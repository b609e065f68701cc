"""The Discord client over the services it is given, and ``run_bot``: services, then the bot, then cleanup."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import discord
import yarl
from discord import app_commands
from discord.ext import commands

from bot.chat.lifecycle import RESTARTING, AnswerTasks
from bot.config import Config
from bot.loopwatch import LoopWatch
from bot.services import Services, build_services, ensure_model

log = logging.getLogger(__name__)

EXTENSIONS = ("bot.cogs.chat", "bot.cogs.admin", "bot.cogs.privacy", "bot.cogs.recovery", "bot.cogs.stopping")
COMMAND_FAILED = "Something went wrong with that command; the details were logged."


class LlavaBot(commands.Bot):
    """The bot: Discord events and commands over the :class:`~bot.services.Services` it is given.

    It doesn't make or release the services: whoever built them closes them after the bot closed.
    """

    def __init__(self, config: Config, services: Services, **options: Any) -> None:
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
        self.services = services
        # The services the cogs use, by their short names.
        self.store = services.store
        self.replies = services.replies
        self.model_manager = services.model_manager
        self.chat = services.chat
        self.http_session = services.http_session
        self.loop_watch = LoopWatch()
        self.tree.error(self.on_app_command_error)
        self.answers = AnswerTasks()
        self._cut_short = asyncio.Event()
        self._shutdown: asyncio.Task[None] | None = None

    async def setup_hook(self) -> None:
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        await self.sync_commands()
        # Not from the start of the loop: loading the model held the GIL for seconds, and what matters is the
        # lag once the bot serves.
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
        await self.loop_watch.stop()
        log.info("Event loop lag over this run: %s", self.loop_watch.summary())


class ShardedLlavaBot(LlavaBot, commands.AutoShardedBot):
    """The same bot on discord.py's AutoShardedBot: several gateway shards in one process."""


def make_bot(config: Config, services: Services, **options: Any) -> LlavaBot:
    """The bot for ``config``: one plain connection, or the configured shards of a sharded bot."""
    shards = config.discord
    if shards.shard_count == 0:
        return LlavaBot(config, services, **options)
    # Without shard_ids discord.py runs every shard of shard_count in this process.
    ids = list(shards.shard_ids) or None
    log.info("Running shards %s of %d", ids or f"0-{shards.shard_count - 1}", shards.shard_count)
    return ShardedLlavaBot(config, services, shard_count=shards.shard_count, shard_ids=ids, **options)


def point_at(config: Config) -> None:
    """Use the configured REST base and gateway instead of Discord's own (a proxy, or a test server)."""
    if config.discord.api_base_url:
        discord.http.Route.BASE = config.discord.api_base_url.rstrip("/")
    if config.discord.gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(config.discord.gateway_url)


def run_bot(config: Config) -> int:
    """Start the bot and block until it stops."""
    logging.getLogger().setLevel(config.logging.level.upper())
    ensure_model(config)
    point_at(config)
    asyncio.run(_serve(config))
    return 0


async def _serve(config: Config) -> None:
    # discord.py's Client.run() only turns Ctrl+C into a close, and SIGTERM (a deploy, systemd, docker stop)
    # would end the process at once, leaving replies half-written. Both signals get the graceful path; one
    # that comes before the bot connects stops it before it does (a model being loaded is loaded first).
    loop = asyncio.get_running_loop()
    bot: LlavaBot | None = None
    early: list[int] = []

    def on_signal(signum: int) -> None:
        if bot is not None:
            bot.request_shutdown(signum)
        elif not early:
            log.info("%s received while starting: stopping before connecting to Discord", signal.Signals(signum).name)
            early.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await check_token(config.discord.token)
        if early:
            return
        services = await build_services(config)
        try:
            if not early:
                bot = make_bot(config, services)
                async with bot:
                    await bot.start(config.discord.token)
                await bot.wait_shutdown()
        finally:
            await services.close()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def check_token(token: str) -> None:
    """Have Discord check the token before the model loads, which can take minutes (raises LoginFailure)."""
    probe = discord.Client(intents=discord.Intents.none())
    try:
        await probe.login(token)
    finally:
        await probe.close()
