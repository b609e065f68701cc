"""Whether a question is taken, before anything is downloaded: access lists, DMs and the rate limit.

The rules themselves are Discord-agnostic (:mod:`bot.chat.access`, :mod:`bot.chat.ratelimit`); this
module only reads the server, channel, roles and person out of a message or an interaction.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import discord

from bot.chat.access import AccessRules, Place
from bot.chat.ratelimit import RateLimiter, parse_rate_limit
from bot.cogs.replies import NO_PINGS

if TYPE_CHECKING:
    from bot.client import LlavaBot

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
NOT_ADMITTED = "I don't take questions here: the people who run me chose where and from whom I answer."
NO_DMS = "I don't answer direct messages; please ask me in a server."
SLOW_DOWN = "You've reached the limit of {limit}. You can ask again {when}."


def place_of(user: discord.abc.User, guild_id: int | None, channel: object) -> Place:
    """The server, channel (and a thread's parent), roles and person of a question."""
    channel_ids = [getattr(channel, "id", None), getattr(channel, "parent_id", None)]
    roles = getattr(user, "roles", None) or ()
    return Place(
        user_id=user.id,
        guild_id=guild_id,
        channel_ids=tuple(i for i in channel_ids if isinstance(i, int)),
        role_ids=tuple(role.id for role in roles),
    )


def discord_time(seconds_from_now: float) -> str:
    """A Discord timestamp that each reader sees in their own words, e.g. "in 3 minutes"."""
    return f"<t:{math.ceil(time.time() + seconds_from_now)}:R>"


class QuestionGate:
    """Decides whether a mention or an /ask is answered; the refusals speak for themselves."""

    def __init__(self, bot: LlavaBot) -> None:
        self.bot = bot
        config = bot.config.discord
        self.rules = AccessRules(
            allowed_guild_ids=config.allowed_guild_ids,
            denied_guild_ids=config.denied_guild_ids,
            allowed_channel_ids=config.allowed_channel_ids,
            denied_channel_ids=config.denied_channel_ids,
            allowed_role_ids=config.allowed_role_ids,
            denied_role_ids=config.denied_role_ids,
            allowed_user_ids=config.allowed_user_ids,
            denied_user_ids=config.denied_user_ids,
        )
        limit = parse_rate_limit(bot.config.chat.rate_limit)
        self.limiter = RateLimiter(limit) if limit is not None else None

    async def admit_message(self, message: discord.Message) -> bool:
        """Whether to answer a message addressed to the bot; a rate-limited person is told when to come back.

        Messages from outside the allow lists are ignored without a word: a reply there would be the very
        noise the operator meant to keep out.
        """
        place = place_of(message.author, message.guild.id if message.guild else None, message.channel)
        reason = self.rules.refuses(place)
        if reason is not None:
            log.debug("Ignored message %s in channel %s: %s", message.id, message.channel.id, reason)
            return False
        sentence = await self._rate_limited(message.author, tell_again=False)
        if sentence is None:
            return True
        if sentence:
            try:
                await message.reply(sentence, mention_author=False, allowed_mentions=NO_PINGS)
            except discord.HTTPException:
                log.warning("Could not reply in channel %s", message.channel.id, exc_info=True)
        return False

    async def refuse_interaction(self, interaction: discord.Interaction) -> str | None:
        """``None`` when an /ask may go ahead, else the sentence to show the person (ephemerally)."""
        if interaction.guild_id is None and not self.bot.config.discord.answer_dms:
            log.debug("Refused /ask from %s in a DM: discord.answer_dms is off", interaction.user.id)
            return NO_DMS
        place = place_of(interaction.user, interaction.guild_id, interaction.channel)
        reason = self.rules.refuses(place)
        if reason is not None:
            log.debug("Refused /ask from %s in channel %s: %s", interaction.user.id, interaction.channel_id, reason)
            return NOT_ADMITTED
        return await self._rate_limited(interaction.user, tell_again=True)

    async def _rate_limited(self, user: discord.abc.User, *, tell_again: bool) -> str | None:
        """``None`` if the question counts and may go ahead; "" if refused and already told; else the sentence."""
        if self.limiter is None or await self._exempt(user):
            return None
        refusal = self.limiter.check(user.id)
        if refusal is None:
            return None
        if refusal.already_told and not tell_again:
            log.debug("Ignored another question from rate-limited user %s", user.id)
            return ""
        log.info("Rate-limited user %s for %.0f s", user.id, refusal.retry_after)
        return SLOW_DOWN.format(limit=self.limiter.limit.describe(), when=discord_time(refusal.retry_after))

    async def _exempt(self, user: discord.abc.User) -> bool:
        # The people who run the bot must be able to try it out as often as they like.
        if user.id in self.bot.config.discord.admin_ids:
            return True
        try:
            return await self.bot.is_owner(user)
        except discord.HTTPException:
            log.warning("Could not look up the application's owner", exc_info=True)
            return False
