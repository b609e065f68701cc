"""Who may ask: allow and deny lists of servers, channels, roles and users, independent of Discord.

Each kind of list works the same way: an empty allow list admits everyone, a non-empty one admits only
what it names, and a deny list always wins over an allow list. A thread counts as itself and as its
parent channel. In direct messages there is no server, channel or role to match, so only the user lists
apply there (``discord.answer_dms`` decides whether DMs are answered at all).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Place:
    """Where a question comes from and who asks it."""

    user_id: int
    guild_id: int | None = None
    # The channel, and for a thread its parent channel as well.
    channel_ids: tuple[int, ...] = ()
    role_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Lists:
    name: str
    allowed: frozenset[int]
    denied: frozenset[int]

    def refuses(self, ids: Collection[int]) -> str | None:
        hit = sorted(self.denied.intersection(ids))
        if hit:
            return f"{hit[0]} is in discord.denied_{self.name}_ids"
        if self.allowed and not self.allowed.intersection(ids):
            return f"none of {sorted(ids)} is in discord.allowed_{self.name}_ids"
        return None


class AccessRules:
    """The configured lists; :meth:`refuses` says why a place is not admitted."""

    def __init__(
        self,
        *,
        allowed_guild_ids: Iterable[int] = (),
        denied_guild_ids: Iterable[int] = (),
        allowed_channel_ids: Iterable[int] = (),
        denied_channel_ids: Iterable[int] = (),
        allowed_role_ids: Iterable[int] = (),
        denied_role_ids: Iterable[int] = (),
        allowed_user_ids: Iterable[int] = (),
        denied_user_ids: Iterable[int] = (),
    ) -> None:
        self._users = _Lists("user", frozenset(allowed_user_ids), frozenset(denied_user_ids))
        self._server = (
            _Lists("guild", frozenset(allowed_guild_ids), frozenset(denied_guild_ids)),
            _Lists("channel", frozenset(allowed_channel_ids), frozenset(denied_channel_ids)),
            _Lists("role", frozenset(allowed_role_ids), frozenset(denied_role_ids)),
        )

    def refuses(self, place: Place) -> str | None:
        """``None`` when ``place`` may ask, else the reason (for logs, not for the person)."""
        reason = self._users.refuses((place.user_id,))
        if reason is not None or place.guild_id is None:
            return reason
        guilds, channels, roles = self._server
        return guilds.refuses((place.guild_id,)) or channels.refuses(place.channel_ids) or roles.refuses(place.role_ids)

    def admits(self, place: Place) -> bool:
        """Whether ``place`` may ask."""
        return self.refuses(place) is None
