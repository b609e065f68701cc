"""Where streamed answers go on Discord: a reply to a message, or an interaction's response."""

from __future__ import annotations

import logging

import discord

log = logging.getLogger(__name__)

# Nothing the model writes may ping anyone, and the asker is not pinged by the reply either.
NO_PINGS = discord.AllowedMentions.none()


class MessageReplySink:
    """The first part replies to the asking message; later parts follow in the same channel."""

    def __init__(self, message: discord.Message) -> None:
        self.message = message
        self._replied = False

    async def send(self, content: str) -> discord.Message:
        """Post one part of the answer."""
        if not self._replied:
            self._replied = True
            return await self.message.reply(content, mention_author=False, allowed_mentions=NO_PINGS)
        return await self.message.channel.send(content, allowed_mentions=NO_PINGS)

    async def edit(self, handle: discord.Message, content: str) -> None:
        """Show the part's latest text."""
        await handle.edit(content=content, allowed_mentions=NO_PINGS)


class InteractionSink:
    """The first part is the deferred response itself; later parts are follow-up messages."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction
        self._used_original = False

    async def send(self, content: str) -> discord.Message:
        """Post one part of the answer."""
        if not self._used_original:
            self._used_original = True
            return await self.interaction.edit_original_response(content=content, allowed_mentions=NO_PINGS)
        return await self.interaction.followup.send(content, allowed_mentions=NO_PINGS, wait=True)

    async def edit(self, handle: discord.Message, content: str) -> None:
        """Show the part's latest text."""
        if isinstance(handle, discord.InteractionMessage):
            await self.interaction.edit_original_response(content=content, allowed_mentions=NO_PINGS)
        else:
            await handle.edit(content=content, allowed_mentions=NO_PINGS)
