"""Conversation and model management: /reset, /precision and /status."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.replies import NO_PINGS
from bot.engine.base import EngineError
from bot.engine.manager import REMOTE_KIND
from bot.engine.supervisor import Health
from bot.engine.variants import PRECISIONS

if TYPE_CHECKING:
    from bot.client import LlavaBot

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
RESET_DONE = "Done: I forgot this channel's conversation ({turns} {messages})."
RESET_NOTHING = "There is nothing to reset: this channel has no conversation with me yet."
RESET_NOT_ALLOWED = "Only {who} may reset this channel's conversation."
PRECISION_CURRENT = "The model runs at **{precision}** (available: {available})."
PRECISION_NOT_ALLOWED = "Only the bot's owner and its admins may change the model's precision."
PRECISION_MISSING = "{precision} is not available; choose one of {available}."
PRECISION_ALREADY = "The model already runs at **{precision}**."
PRECISION_SWITCHED = "Switched the model to **{precision}** (loaded in {seconds:.1f} s)."
PRECISION_FAILED = "I couldn't load {precision}, so the model stays at {current}: {reason}"
PRECISION_RELOADED = "Reloaded the model at **{precision}** (loaded in {seconds:.1f} s)."
STATUS = (
    "**Model:** {model}\n**Precision:** {precision} (available: {available})\n**Engine:** {engine} on {device}\n"
    "**Queue:** {running} answering, {waiting} waiting\n"
    "**Health:** {health}\n**Restarts:** {restarts}\n**Last failure:** {failure}"
)
HEALTH_UP = "up since <t:{since}:f>"
HEALTH_WAITING = {
    "restarting": "restarting (next attempt <t:{at}:R>)",
    "down": "can't start; the log says why (next attempt <t:{at}:R>)",
}
HEALTH_LOADING = {
    "starting": "starting",
    "restarting": "restarting (loading the model now)",
    "down": "can't start; the log says why (trying again now)",
    "closed": "shutting down",
}
NO_FAILURE = "none"
FAILURE = "<t:{at}:f>: {reason}"
PRECISION_SERVER = "The model server decides the precision: this bot asks it for **{model}**."
STATUS_SERVER = "\n**Server:** {url}, model {model}: {health}"
WHO_MAY_RESET = {"moderators": "moderators (Manage Messages)", "admins": "the bot's admins"}


class AdminCog(commands.Cog):
    """Commands that manage the conversation and the model."""

    def __init__(self, bot: LlavaBot) -> None:
        self.bot = bot

    async def is_bot_admin(self, user: discord.abc.User) -> bool:
        """The application's owner(s) and the user ids listed in ``discord.admin_ids``."""
        return user.id in self.bot.config.discord.admin_ids or await self.bot.is_owner(user)

    async def may_reset(self, interaction: discord.Interaction) -> bool:
        rule = self.bot.config.discord.reset_permission
        if rule == "everyone" or interaction.guild is None:
            return True
        if await self.is_bot_admin(interaction.user):
            return True
        permissions = interaction.permissions
        return rule == "moderators" and (permissions.manage_messages or permissions.administrator)

    @app_commands.command(name="reset", description="Forget this channel's conversation with the bot")
    async def reset(self, interaction: discord.Interaction) -> None:
        """Clear this channel's conversation; the next question starts fresh."""
        if not await self.may_reset(interaction):
            who = WHO_MAY_RESET[self.bot.config.discord.reset_permission]
            await interaction.response.send_message(RESET_NOT_ALLOWED.format(who=who), ephemeral=True)
            return
        channel_id = interaction.channel_id or interaction.user.id
        turns = await self.bot.chat.reset(channel_id)
        log.info("User %s reset channel %s (%d turns)", interaction.user.id, channel_id, turns)
        messages = "message" if turns == 1 else "messages"
        sentence = RESET_DONE.format(turns=turns, messages=messages) if turns else RESET_NOTHING
        await interaction.response.send_message(sentence, ephemeral=True)

    @app_commands.command(name="precision", description="Show or switch the model's precision (admins)")
    @app_commands.describe(precision="INT4 is fastest, FP16 most accurate")
    async def precision(self, interaction: discord.Interaction, precision: str | None = None) -> None:
        """Show the model's precision, or switch it for the whole bot (owner and admins only)."""
        models = self.bot.model_manager
        available = models.available()
        if models.remote is not None and not available:
            text = PRECISION_SERVER.format(model=models.remote.model)
            await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_PINGS)
            return
        if precision is None:
            current = PRECISION_CURRENT.format(precision=models.precision, available=", ".join(available))
            await interaction.response.send_message(current, ephemeral=True)
            return
        if not await self.is_bot_admin(interaction.user):
            await interaction.response.send_message(PRECISION_NOT_ALLOWED, ephemeral=True)
            return
        wanted = precision.strip().upper()
        if wanted not in available:
            missing = PRECISION_MISSING.format(precision=precision, available=", ".join(available))
            await interaction.response.send_message(missing, ephemeral=True, allowed_mentions=NO_PINGS)
            return
        # The same precision on a broken engine reloads it: the way back an admin can take at once.
        reload = wanted == models.precision
        if reload and models.healthy:
            await interaction.response.send_message(PRECISION_ALREADY.format(precision=wanted), ephemeral=True)
            return
        # Loading takes longer than the 3 s an interaction may wait for its first answer.
        await interaction.response.defer(ephemeral=True, thinking=True)
        started = time.monotonic()
        try:
            await models.switch(wanted)
        except (EngineError, RuntimeError) as error:
            log.exception("Switching to %s failed", wanted)
            text = PRECISION_FAILED.format(precision=wanted, current=models.precision, reason=str(error)[:300])
            await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_PINGS)
            return
        await self.bot.store.set_setting("precision", wanted)
        log.info("User %s switched the model to %s", interaction.user.id, wanted)
        done = PRECISION_RELOADED if reload else PRECISION_SWITCHED
        switched = done.format(precision=wanted, seconds=time.monotonic() - started)
        await interaction.followup.send(switched, ephemeral=True)

    @precision.autocomplete("precision")
    async def precision_choices(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        """Offer only the variants that exist on disk."""
        available = self.bot.model_manager.available()
        return [app_commands.Choice(name=p, value=p) for p in PRECISIONS if p in available and current.upper() in p]

    @app_commands.command(name="status", description="Model, precision, engine and queue of the bot")
    async def status(self, interaction: discord.Interaction) -> None:
        """Show which model answers, how, and how busy it is."""
        models = self.bot.model_manager
        scheduler = self.bot.chat.scheduler
        text = STATUS.format(
            model=models.model_dir.name,
            precision=models.precision,
            available=", ".join(models.available()) or "the server decides",
            engine=models.kind,
            device=models.device,
            running=scheduler.running,
            waiting=scheduler.queue_length,
            **health_lines(models.health),
        )
        engine = models.engine
        if models.kind == REMOTE_KIND:
            # Imported here: the OpenAI client it pulls in would cost an in-process bot a second at start.
            from bot.engine.remote import RemoteEngine

            if isinstance(engine, RemoteEngine):
                health = await engine.health()
                text += STATUS_SERVER.format(url=engine.settings.base_url, model=engine.settings.model, health=health)
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_PINGS)


def health_lines(health: Health) -> dict[str, str]:
    """The engine's health as /status shows it (Discord renders ``<t:...>`` in each reader's time zone)."""
    if health.state == "up" and health.up_since is not None:
        state = HEALTH_UP.format(since=int(health.up_since))
    elif health.state in HEALTH_WAITING and health.next_attempt is not None:
        state = HEALTH_WAITING[health.state].format(at=int(health.next_attempt))
    else:
        state = HEALTH_LOADING.get(health.state, health.state)
    failure = health.last_failure
    described = FAILURE.format(at=int(failure.at), reason=failure.reason) if failure else NO_FAILURE
    return {"health": state, "restarts": str(health.restarts), "failure": described}


async def setup(bot: LlavaBot) -> None:
    """Load the cog (discord.py extension entry point)."""
    await bot.add_cog(AdminCog(bot))
