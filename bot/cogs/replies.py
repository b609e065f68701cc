"""Where streamed answers go on Discord: a reply to a message, or an interaction's response."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import discord
from discord.utils import MISSING

from bot.chat.streaming import MessageGone
from bot.cogs.stopping import stop_view

log = logging.getLogger(__name__)

# Nothing the model writes may ping anyone, and the asker is not pinged by the reply either.
NO_PINGS = discord.AllowedMentions.none()

# Discord's error codes for a message (or the channel, or the interaction's webhook) that no longer exists.
_GONE_CODES = frozenset({10003, 10008, 10015})


def _view(live: bool) -> dict[str, Any]:
    # While the answer is written the message carries the Stop button; its last write removes it.
    return {"view": stop_view()} if live else {"view": None}


@contextlib.contextmanager
def _unless_gone() -> Iterator[None]:
    """Turn Discord's "unknown message" into MessageGone, which the streamer never retries."""
    try:
        yield
    except discord.NotFound as error:
        if error.code in _GONE_CODES:
            raise MessageGone(str(error)) from error
        raise


class MessageReplySink:
    """The first part replies to the asking message; later parts follow in the same channel."""

    def __init__(self, message: discord.Message) -> None:
        self.message = message
        self._replied = False

    async def send(self, content: str, *, live: bool = False) -> discord.Message:
        """Post one part of the answer."""
        view = stop_view() if live else MISSING
        if not self._replied:
            self._replied = True
            return await self.message.reply(content, mention_author=False, allowed_mentions=NO_PINGS, view=view)
        return await self.message.channel.send(content, allowed_mentions=NO_PINGS, view=view)

    async def edit(self, handle: discord.Message, content: str, *, live: bool = False) -> None:
        """Show the part's latest text; raises MessageGone if someone deleted it."""
        # A live edit leaves the components as they are, so only the last write touches the button.
        extra = {} if live else _view(live)
        with _unless_gone():
            await handle.edit(content=content, allowed_mentions=NO_PINGS, **extra)


class InteractionSink:
    """The first part is the deferred response itself; later parts are follow-up messages."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction
        self._used_original = False

    async def send(self, content: str, *, live: bool = False) -> discord.Message:
        """Post one part of the answer."""
        if not self._used_original:
            self._used_original = True
            return await self.interaction.edit_original_response(
                content=content, allowed_mentions=NO_PINGS, **_view(live)
            )
        view = stop_view() if live else MISSING
        return await self.interaction.followup.send(content, allowed_mentions=NO_PINGS, wait=True, view=view)

    async def edit(self, handle: discord.Message, content: str, *, live: bool = False) -> None:
        """Show the part's latest text; raises MessageGone if someone deleted it."""
        extra = {} if live else _view(live)
        with _unless_gone():
            if isinstance(handle, discord.InteractionMessage):
                await self.interaction.edit_original_response(content=content, allowed_mentions=NO_PINGS, **extra)
            else:
                await handle.edit(content=content, allowed_mentions=NO_PINGS, **extra)
