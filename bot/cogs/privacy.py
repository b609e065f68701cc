"""People and their data: /forget deletes what a person stored, and old data expires after chat.retention_days.

What /forget deletes: every question the person asked, in every channel and DM; the bot's answer that
directly follows each of those questions (it is made from their words and often repeats them); the images
no remaining question uses; and the links from Discord messages to all of these. Other people's questions
and the answers to them stay. Messages on Discord itself are left as they are: they belong to the channel,
and the person can delete their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.replies import NO_PINGS
from bot.store.privacy import Removed
from bot.store.tables import utcnow

if TYPE_CHECKING:
    from bot.client import LlavaBot

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
FORGET_ASK = (
    "This deletes everything I have stored from you, in every channel and DM: your questions, the images "
    "only you sent, and my answers to your questions. Messages on Discord stay as they are. Delete it all?"
)
FORGET_DONE = "Done: I deleted {questions}, {answers} and {images}."
FORGET_NOTHING = "There was nothing stored from you, so nothing was deleted."
FORGET_CANCELLED = "Cancelled: nothing was deleted."
FORGET_TIMED_OUT = "No answer within {seconds} seconds, so nothing was deleted."
FORGET_FAILED = "Deleting your data failed; the details were logged. Please try /forget again."
FORGET_NOT_YOURS = "Only the person who used /forget can answer this."
CONFIRM_LABEL = "Delete everything"
CANCEL_LABEL = "Cancel"

# How long the buttons wait for the person; afterwards nothing happens.
CONFIRM_TIMEOUT = 60.0
# How often data past its retention is looked for (also once at start).
RETENTION_EVERY = 3600.0


def _count(amount: int, word: str) -> str:
    return f"{amount} {word}" if amount == 1 else f"{amount} {word}s"


def forgotten(removed: Removed) -> str:
    """The sentence that tells a person what /forget deleted."""
    if not removed.turns and not removed.images:
        return FORGET_NOTHING
    return FORGET_DONE.format(
        questions=_count(removed.questions, "question"),
        answers=_count(removed.answers, "answer"),
        images=_count(removed.images, "image"),
    )


class ForgetConfirmation(discord.ui.View):
    """Confirm / Cancel buttons under the /forget question; only the person who asked may press them."""

    def __init__(self, bot: LlavaBot, asked: discord.Interaction, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.bot = bot
        self.asked = asked
        self.asker_id = asked.user.id

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        if interaction.user.id == self.asker_id:
            return True
        await interaction.response.send_message(FORGET_NOT_YOURS, ephemeral=True)
        return False

    @discord.ui.button(label=CONFIRM_LABEL, style=discord.ButtonStyle.danger, custom_id="forget:confirm")
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button[ForgetConfirmation]) -> None:
        """Delete everything, then say what went."""
        self.stop()
        # Acknowledged at once: on a large database deleting can take longer than Discord waits.
        await interaction.response.defer()
        try:
            sentence = forgotten(await self.bot.chat.forget(self.asker_id))
        except Exception:
            log.exception("Forgetting user %s failed", self.asker_id)
            sentence = FORGET_FAILED
        await interaction.edit_original_response(content=sentence, view=None, allowed_mentions=NO_PINGS)

    @discord.ui.button(label=CANCEL_LABEL, style=discord.ButtonStyle.secondary, custom_id="forget:cancel")
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button[ForgetConfirmation]) -> None:
        """Keep everything."""
        self.stop()
        log.info("User %s cancelled /forget", self.asker_id)
        await interaction.response.edit_message(content=FORGET_CANCELLED, view=None)

    async def on_timeout(self) -> None:
        log.info("User %s did not confirm /forget in time; nothing was deleted", self.asker_id)
        try:
            text = FORGET_TIMED_OUT.format(seconds=f"{self.timeout:g}")
            await self.asked.edit_original_response(content=text, view=None)
        except discord.HTTPException:
            log.warning("Could not close the /forget question of user %s", self.asker_id, exc_info=True)


class PrivacyCog(commands.Cog):
    """/forget, and the background deletion of data older than ``chat.retention_days``."""

    confirm_timeout = CONFIRM_TIMEOUT
    retention_every = RETENTION_EVERY

    def __init__(self, bot: LlavaBot) -> None:
        self.bot = bot
        self._retention: asyncio.Task[None] | None = None

    async def cog_load(self) -> None:
        days = self.bot.config.chat.retention_days
        if days > 0:
            self._retention = asyncio.create_task(self._expire_forever(days), name="retention")

    async def cog_unload(self) -> None:
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention

    async def expire(self, days: int) -> Removed:
        """Delete the turns and images stored more than ``days`` days ago."""
        return await self.bot.store.delete_older_than(utcnow() - timedelta(days=days))

    async def _expire_forever(self, days: int) -> None:
        while True:
            try:
                await self.expire(days)
            except Exception:
                log.exception("Deleting data older than %d days failed; trying again later", days)
            await asyncio.sleep(self.retention_every)

    @app_commands.command(name="forget", description="Delete everything the bot has stored from you (asks first)")
    async def forget(self, interaction: discord.Interaction) -> None:
        """Offer to delete everything the person stored, in every channel; nothing happens without a confirm."""
        log.info("User %s asked to be forgotten", interaction.user.id)
        view = ForgetConfirmation(self.bot, interaction, self.confirm_timeout)
        await interaction.response.send_message(FORGET_ASK, view=view, ephemeral=True)


async def setup(bot: LlavaBot) -> None:
    """Load the cog (discord.py extension entry point)."""
    await bot.add_cog(PrivacyCog(bot))
