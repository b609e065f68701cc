"""A loopback emulator of Discord's REST API, gateway and attachment CDN for end-to-end tests.

The real discord.py client connects to it over ``127.0.0.1``: :func:`point_discord_at` redirects
discord.py's REST base URL, default gateway and CDN base to the emulator, and :func:`running_bot`
logs a bot in, waits for ``on_ready`` and shuts it down again.

The emulated world is one guild ("Test Guild") with two text channels and a public thread, the
``@everyone`` role, an ``Admin`` role with the ADMINISTRATOR permission and a managed bot role, and
five members: the bot, the application owner (who also owns the guild), an admin and two normal
users. DM channels are created on demand. :meth:`DiscordEmulator.add_guild` adds further guilds, each with its own
``@everyone`` role, a text channel and members of the tests' choosing.

Like Discord's gateway, the emulator shards: a client that IDENTIFYs with ``shard: [id, count]`` gets in
READY and as GUILD_CREATE only the guilds of its shard, ``(guild_id >> 22) % count`` (see :func:`shard_of`),
and only those guilds' events; DMs go to shard 0. A client that IDENTIFYs without ``shard`` gets everything.

Tests drive the bot with :meth:`DiscordEmulator.user_message`, :meth:`DiscordEmulator.slash_command`,
:meth:`DiscordEmulator.component_interaction` and :meth:`DiscordEmulator.delete_message` (or
:meth:`DiscordEmulator.bulk_delete`), then inspect what the bot did through
:attr:`DiscordEmulator.messages`, :attr:`DiscordEmulator.requests` and
:meth:`DiscordEmulator.interaction_responses`, waiting with :meth:`DiscordEmulator.wait_for` and
friends. Like Discord, the emulator rejects message content over 2000 characters, embed
descriptions over 4096 characters, empty messages and late (over 3 s) or repeated interaction
callbacks; it lets people delete only the messages Discord lets them delete; when the bot did not ask
for the Message Content intent it strips the content, attachments, embeds and components of other
people's guild messages that do not mention the bot, wherever they appear (MESSAGE_CREATE, a reply's
``referenced_message``, fetched messages), and it can rate-limit message edits with real 429 responses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import datetime as dt
import json
import re
import secrets
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from aiohttp import BodyPartReader, WSMsgType, web

if TYPE_CHECKING:
    import discord

JSON = dict[str, Any]
Upload = tuple[str, bytes, str]
"""An attachment given by a test: ``(filename, data, content_type)``."""
T = TypeVar("T")

API_PREFIX = "/api/v10"
DISCORD_EPOCH_MS = 1_420_070_400_000
MAX_CONTENT_LENGTH = 2000
MAX_EMBED_DESCRIPTION = 4096
ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024

ADMINISTRATOR = 1 << 3
MANAGE_MESSAGES = 1 << 13
ALL_PERMISSIONS = (1 << 51) - 1
EVERYONE_PERMISSIONS = (
    (1 << 6)  # add reactions
    | (1 << 10)  # view channel
    | (1 << 11)  # send messages
    | (1 << 14)  # embed links
    | (1 << 15)  # attach files
    | (1 << 16)  # read message history
    | (1 << 31)  # use application commands
    | (1 << 35)  # create public threads
    | (1 << 38)  # send messages in threads
)
GUILD_MESSAGES_INTENT = 1 << 9
DIRECT_MESSAGES_INTENT = 1 << 12
MESSAGE_CONTENT_INTENT = 1 << 15

FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
ATTACHMENT_IS_SPOILER = 1 << 3
# An interaction's token (its webhook: the response, follow-ups) works for this long after the interaction.
INTERACTION_TOKEN_LIFETIME = 15 * 60.0
_SETTABLE_FLAGS = FLAG_SUPPRESS_EMBEDS | FLAG_EPHEMERAL | FLAG_SUPPRESS_NOTIFICATIONS

# What Discord empties in a message the bot may not read (see DiscordEmulator.bot_may_read).
_WITHHELD: JSON = {"content": "", "attachments": [], "embeds": [], "components": []}

CHANNEL_TEXT, CHANNEL_DM, CHANNEL_PUBLIC_THREAD = 0, 1, 11
MESSAGE_DEFAULT, MESSAGE_REPLY, MESSAGE_CHAT_INPUT = 0, 19, 20
INTERACTION_COMMAND, INTERACTION_COMPONENT = 2, 3
_COMMAND_NAME = re.compile(r"^[-_\w]{1,32}$")


# The bot messages that the request being handled created or edited (see DiscordEmulator.bot_writes).
_WRITTEN: contextvars.ContextVar[list[MessageRecord]] = contextvars.ContextVar("written")


def shard_of(guild_id: int, shard_count: int) -> int:
    """The shard Discord routes a guild's events to."""
    return (guild_id >> 22) % shard_count


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class ApiError(Exception):
    """An error response of the emulated API, raised inside route handlers."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        *,
        errors: JSON | None = None,
        headers: Mapping[str, str] | None = None,
        extra: JSON | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: JSON = {"message": message, "code": code, **(extra or {})}
        if errors:
            self.body["errors"] = errors
        self.headers = dict(headers or {})


def _form_error(field_name: str, code: str, message: str) -> ApiError:
    errors = {field_name: {"_errors": [{"code": code, "message": message}]}}
    return ApiError(400, 50035, "Invalid Form Body", errors=errors)


def _buttons(components: list[JSON]) -> list[JSON]:
    found: list[JSON] = []
    for component in components:
        if component.get("type") == 2:
            found.append(component)
        found.extend(_buttons(component.get("components") or []))
    return found


def _json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    # Discord answers with exactly "application/json"; discord.py treats anything else as text.
    return web.Response(
        status=status,
        body=json.dumps(data).encode(),
        headers={**(headers or {}), "Content-Type": "application/json"},
    )


@dataclass(frozen=True)
class EmulatedUser:
    """A Discord user known to the emulator; usable as the author of test messages."""

    id: int
    username: str
    bot: bool = False
    role_ids: tuple[int, ...] = ()

    @property
    def mention(self) -> str:
        """The ``<@id>`` mention string of the user."""
        return f"<@{self.id}>"

    def payload(self) -> JSON:
        """The user object as Discord sends it."""
        return {
            "id": str(self.id),
            "username": self.username,
            "global_name": self.username.title(),
            "discriminator": "0",
            "avatar": None,
            "banner": None,
            "accent_color": None,
            "avatar_decoration_data": None,
            "bot": self.bot,
            "public_flags": 0,
            "flags": 0,
        }


@dataclass
class EmulatedGuild:
    """A guild of the emulated world: the ids that make it up (its roles and channels live in the emulator)."""

    id: int
    name: str
    owner_id: int
    member_ids: list[int]
    role_ids: list[int]
    system_channel_id: int


@dataclass
class RecordedRequest:
    """One REST request the bot made to the emulator."""

    method: str
    path: str
    """The path below the API base, e.g. ``/channels/123/messages``."""
    query: dict[str, str]
    json: Any
    """The JSON body (for multipart requests: the ``payload_json`` part), or ``None``."""
    files: list[Upload]
    status: int = 0
    at: float = 0.0


@dataclass
class MessageRecord:
    """The emulator's view of one message: its current payload and how it got there."""

    id: int
    channel_id: int
    author_id: int
    data: JSON
    source: str
    """``"user"`` (made by a test), ``"channel"`` (REST create), ``"interaction"`` or ``"followup"``."""
    history: list[str] = field(default_factory=list)
    """The content after creation and after each edit."""
    component_history: list[list[JSON]] = field(default_factory=list)
    """The components (buttons, selects) after creation and after each edit."""
    edits: int = 0
    deleted: bool = False
    interaction_id: int | None = None
    pinged_user_ids: set[int] = field(default_factory=set)
    """Every user that creation or an edit of this message would have notified."""
    pinged_role_ids: set[int] = field(default_factory=set)
    pinged_everyone: bool = False
    reactions: list[str] = field(default_factory=list)

    @property
    def content(self) -> str:
        """The current content."""
        return str(self.data.get("content", ""))

    @property
    def flags(self) -> int:
        """The current message flags."""
        return int(self.data.get("flags", 0))

    @property
    def components(self) -> list[JSON]:
        """The current components (action rows holding buttons and selects)."""
        return list(self.data.get("components") or [])

    @property
    def buttons(self) -> list[JSON]:
        """Every button of the message, in order, taken out of its action rows."""
        return _buttons(self.components)

    @property
    def is_loading(self) -> bool:
        """Whether this is a deferred interaction response still showing "thinking..."."""
        return bool(self.flags & FLAG_LOADING)

    @property
    def reference_id(self) -> int | None:
        """The id of the message this one replies to, if any."""
        ref = self.data.get("message_reference")
        return int(ref["message_id"]) if ref else None


@dataclass
class InteractionRecord:
    """An interaction dispatched by a test and everything the bot answered to it."""

    id: int
    token: str
    kind: int
    name: str
    user_id: int
    channel_id: int
    guild_id: int | None
    payload: JSON
    created_at: float
    message_id: int | None = None
    """For component interactions: the message carrying the component."""
    callbacks: list[JSON] = field(default_factory=list)
    response_type: int | None = None
    original_message_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)
    modal: JSON | None = None
    choices: list[JSON] | None = None


@dataclass
class InteractionResponses:
    """A summary of how the bot answered one interaction."""

    callback_type: int | None
    original: MessageRecord | None
    followups: list[MessageRecord]
    modal: JSON | None
    choices: list[JSON] | None

    @property
    def deferred(self) -> bool:
        """Whether the bot answered with a deferred (type 5 or 6) callback."""
        return self.callback_type in (5, 6)

    @property
    def messages(self) -> list[MessageRecord]:
        """The original response (if any) followed by the follow-up messages, deleted ones left out."""
        found = ([self.original] if self.original else []) + self.followups
        return [m for m in found if not m.deleted]

    @property
    def contents(self) -> list[str]:
        """The final content of each message in :attr:`messages`."""
        return [m.content for m in self.messages]

    @property
    def ephemeral(self) -> bool:
        """Whether the original response is ephemeral."""
        return bool(self.original and self.original.flags & FLAG_EPHEMERAL)


@dataclass
class _EditLimit:
    limit: int
    per_seconds: float
    announce: bool
    include_webhooks: bool
    hits: dict[str, collections.deque[float]] = field(default_factory=dict)


class _GatewayConnection:
    """One websocket client of the emulated gateway, with its own sequence and zlib stream."""

    def __init__(self, ws: web.WebSocketResponse, compress: str | None) -> None:
        self.ws = ws
        self.compress = compress
        self.sequence = 0
        self.session_id: str | None = None
        self.intents = 0
        self.shard: tuple[int, int] | None = None
        """``(shard_id, shard_count)`` from IDENTIFY; None for an unsharded client."""
        # zlib-stream: one compression context per connection, every message ends in a sync flush.
        # For zstd-stream we answer with text frames, which discord.py accepts as well.
        self._zlib = zlib.compressobj() if compress == "zlib-stream" else None
        self._lock = asyncio.Lock()

    def receives(self, guild_id: int | None) -> bool:
        """Whether Discord would send this connection the events of ``guild_id`` (None: a DM)."""
        if self.shard is None:
            return True
        shard_id, count = self.shard
        return shard_id == (0 if guild_id is None else shard_of(guild_id, count))

    async def send(self, op: int, data: Any = None, event: str | None = None) -> None:
        async with self._lock:
            if self.ws.closed:
                return
            payload: JSON = {"op": op, "d": data, "s": None, "t": event}
            if op == 0:
                self.sequence += 1
                payload["s"] = self.sequence
            text = json.dumps(payload)
            if self._zlib is None:
                await self.ws.send_str(text)
            else:
                chunk = self._zlib.compress(text.encode()) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
                await self.ws.send_bytes(chunk)


class DiscordEmulator:
    """Discord's REST API, gateway and CDN on a random port of 127.0.0.1.

    Use as ``async with DiscordEmulator() as emu:``. Ids of the emulated world are attributes:
    :attr:`guild_id`, :attr:`channel_id`, :attr:`second_channel_id`, :attr:`thread_id`,
    :attr:`admin_role_id`; the users are :attr:`bot_user`, :attr:`owner`, :attr:`admin`,
    :attr:`user` and :attr:`other_user`. :attr:`guilds` maps every guild's id to its :class:`EmulatedGuild`.
    """

    def __init__(
        self,
        *,
        token: str = "emulated.bot.token",
        interaction_ack_timeout: float | None = 3.0,
        echo_bot_messages: bool = True,
        heartbeat_interval: float = 41.25,
    ) -> None:
        """Set up the emulated world; the server starts in :meth:`start`.

        ``interaction_ack_timeout`` is how long an interaction may wait for its callback (None: forever);
        ``echo_bot_messages`` makes the bot's own messages come back as MESSAGE_CREATE/UPDATE like on Discord.
        """
        self.token = token
        self.interaction_ack_timeout = interaction_ack_timeout
        self.echo_bot_messages = echo_bot_messages
        self._heartbeat_ms = int(heartbeat_interval * 1000)
        self._last_snowflake = 0

        bot_id = self.snowflake()
        self.application_id = bot_id  # like on Discord, the application and its bot user share the id
        self.guild_id = self.snowflake()
        self.admin_role_id = self.snowflake()
        self.bot_role_id = self.snowflake()
        self.bot_user = EmulatedUser(bot_id, "llava-bot", bot=True, role_ids=(self.bot_role_id,))
        self.owner = EmulatedUser(self.snowflake(), "owner")
        self.admin = EmulatedUser(self.snowflake(), "admin", role_ids=(self.admin_role_id,))
        self.user = EmulatedUser(self.snowflake(), "alice")
        self.other_user = EmulatedUser(self.snowflake(), "bob")
        self.users: dict[int, EmulatedUser] = {
            u.id: u for u in (self.bot_user, self.owner, self.admin, self.user, self.other_user)
        }
        self.roles: dict[int, JSON] = {
            self.guild_id: self._role(self.guild_id, "@everyone", EVERYONE_PERMISSIONS, 0),
            self.admin_role_id: self._role(self.admin_role_id, "Admin", ADMINISTRATOR, 2),
            self.bot_role_id: {
                **self._role(self.bot_role_id, "llava-bot", EVERYONE_PERMISSIONS | MANAGE_MESSAGES, 1),
                "managed": True,
                "tags": {"bot_id": str(self.bot_user.id)},
            },
        }
        self.channel_id = self.snowflake()
        self.second_channel_id = self.snowflake()
        self.thread_id = self.snowflake()
        self.channels: dict[int, JSON] = {
            self.channel_id: self._text_channel(self.channel_id, "general", 0),
            self.second_channel_id: self._text_channel(self.second_channel_id, "images", 1),
            self.thread_id: {
                "id": str(self.thread_id),
                "type": CHANNEL_PUBLIC_THREAD,
                "guild_id": str(self.guild_id),
                "parent_id": str(self.channel_id),
                "owner_id": str(self.owner.id),
                "name": "a thread",
                "message_count": 0,
                "member_count": 2,
                "total_message_sent": 0,
                "rate_limit_per_user": 0,
                "flags": 0,
                "last_message_id": None,
                "thread_metadata": {
                    "archived": False,
                    "auto_archive_duration": 1440,
                    "archive_timestamp": _now_iso(),
                    "locked": False,
                },
            },
        }
        self._joined_at = _now_iso()
        self.guilds: dict[int, EmulatedGuild] = {
            self.guild_id: EmulatedGuild(
                self.guild_id,
                "Test Guild",
                self.owner.id,
                list(self.users),
                list(self.roles),
                self.channel_id,
            )
        }

        self.messages: dict[int, MessageRecord] = {}
        self.requests: list[RecordedRequest] = []
        self.gateway_log: list[JSON] = []
        """Every payload the bot sent over the gateway (tokens redacted)."""
        self.interactions: dict[int, InteractionRecord] = {}
        self.commands: dict[int | None, list[JSON]] = {}
        """Synced application commands by guild id (``None`` for global commands)."""
        self.typing: list[int] = []
        """The channel id of every typing indicator the bot triggered, in order."""
        self.downloads: list[int] = []
        """The id of every attachment fetched from the CDN, in order."""
        self.intents: int | None = None
        self.compression: str | None = None
        self.identify_count = 0
        self.resume_count = 0

        self.bot_writes: list[Callable[[MessageRecord], object]] = []
        """Called with a bot message whenever a request of the bot created or edited it, right after Discord's
        answer to that request went out (a test can act on a message the instant it exists for the bot)."""
        self._held_downloads: dict[str, asyncio.Event] = {}  # file name -> set when its downloads may finish
        self._uploads: dict[int, tuple[bytes, str, str]] = {}  # attachment id -> data, type, signature
        self._connections: set[_GatewayConnection] = set()
        self._sessions: dict[str, tuple[int, tuple[int, int] | None]] = {}  # id -> sequence, shard
        self._edit_limit: _EditLimit | None = None
        self._changed = asyncio.Event()
        self._last_request_at = 0.0
        # Routes whose answers wait until their event is set (a slow Discord), by path.
        self._held: dict[str, asyncio.Event] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ----------------------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> DiscordEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def api_base(self) -> str:
        """The value for ``discord.http.Route.BASE``."""
        return self.url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        """The websocket URL of the emulated gateway."""
        return self.url.replace("http://", "ws://", 1) + "/gateway"

    @property
    def cdn_base(self) -> str:
        """The value for ``discord.asset.Asset.BASE``."""
        return self.url + "/cdn"

    @property
    def connected(self) -> bool:
        """Whether a client has identified (or resumed) on the gateway."""
        return any(c.session_id for c in self._connections)

    async def start(self) -> None:
        """Start serving on a random port of 127.0.0.1."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/cdn/attachments/{channel_id}/{attachment_id}/{filename}", self._cdn)
        app.router.add_get("/media/attachments/{channel_id}/{attachment_id}/{filename}", self._cdn)
        routes: list[tuple[str, str, Callable[..., Awaitable[web.StreamResponse]], bool]] = [
            ("GET", "/users/@me", self._get_me, True),
            ("GET", "/oauth2/applications/@me", self._get_application, True),
            ("GET", "/gateway", self._get_gateway, False),
            ("GET", "/gateway/bot", self._get_gateway, True),
            ("POST", "/users/@me/channels", self._create_dm, True),
            ("GET", "/guilds/{guild_id}", self._get_guild, True),
            ("GET", "/guilds/{guild_id}/members/{user_id}", self._get_member, True),
            ("GET", "/channels/{channel_id}", self._get_channel, True),
            ("GET", "/channels/{channel_id}/messages", self._list_messages, True),
            ("POST", "/channels/{channel_id}/messages", self._post_message, True),
            ("GET", "/channels/{channel_id}/messages/{message_id}", self._get_message, True),
            ("PATCH", "/channels/{channel_id}/messages/{message_id}", self._patch_message, True),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}", self._delete_message, True),
            ("POST", "/channels/{channel_id}/typing", self._typing, True),
            ("PUT", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self._react, True),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self._react, True),
            ("GET", "/applications/{app_id}/commands", self._get_commands, True),
            ("PUT", "/applications/{app_id}/commands", self._put_commands, True),
            ("GET", "/applications/{app_id}/guilds/{guild_id}/commands", self._get_commands, True),
            ("PUT", "/applications/{app_id}/guilds/{guild_id}/commands", self._put_commands, True),
            ("POST", "/interactions/{interaction_id}/{token}/callback", self._callback, False),
            ("POST", "/webhooks/{app_id}/{token}", self._post_followup, False),
            ("GET", "/webhooks/{app_id}/{token}/messages/{message_id}", self._get_webhook_message, False),
            ("PATCH", "/webhooks/{app_id}/{token}/messages/{message_id}", self._patch_webhook_message, False),
            ("DELETE", "/webhooks/{app_id}/{token}/messages/{message_id}", self._delete_webhook_message, False),
        ]
        for method, path, handler, auth in routes:
            app.router.add_route(method, API_PREFIX + path, self._wrap(handler, auth=auth))
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self._wrap(self._not_found, auth=False))
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        """Close gateway connections and stop the server."""
        for conn in list(self._connections):
            await conn.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ----------------------------------------------------------------------------- world helpers

    def snowflake(self) -> int:
        """A new, strictly increasing snowflake id."""
        candidate = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last_snowflake = max(candidate, self._last_snowflake + 1)
        return self._last_snowflake

    def snowflake_on_shard(self, shard_id: int, shard_count: int) -> int:
        """A new snowflake that, as a guild id, Discord would route to shard ``shard_id`` of ``shard_count``.

        The shard comes from the id's timestamp, so this steps the timestamp a millisecond at a time.
        """
        candidate = self.snowflake()
        while shard_of(candidate, shard_count) != shard_id:
            candidate += 1 << 22
        self._last_snowflake = max(self._last_snowflake, candidate)
        return candidate

    def add_user(self, username: str, *, admin: bool = False, guild_id: int | None = None) -> EmulatedUser:
        """Add another member of the main guild (an admin when ``admin``), or of ``guild_id``."""
        user = EmulatedUser(self.snowflake(), username, role_ids=(self.admin_role_id,) if admin else ())
        self.users[user.id] = user
        self._guild_record(guild_id).member_ids.append(user.id)
        return user

    def add_text_channel(self, name: str, *, guild_id: int | None = None) -> int:
        """Add a text channel to the main guild (or ``guild_id``); bots that connect afterwards see it."""
        guild = self._guild_record(guild_id)
        channel_id = self.snowflake()
        position = sum(c["type"] == CHANNEL_TEXT and c["guild_id"] == str(guild.id) for c in self.channels.values())
        self.channels[channel_id] = self._text_channel(channel_id, name, position, guild.id)
        return channel_id

    def add_guild(
        self, name: str, *, guild_id: int | None = None, members: Sequence[EmulatedUser] = ()
    ) -> EmulatedGuild:
        """Add a guild owned by :attr:`owner`, with the bot, ``members`` and one text channel, "general".

        ``guild_id`` picks the snowflake (and so the shard, see :func:`shard_of`); later snowflakes stay
        above it. Bots that connect afterwards see the guild in READY and GUILD_CREATE.
        """
        if guild_id is None:
            guild_id = self.snowflake()
        if guild_id in self.guilds or guild_id in self.channels or guild_id in self.users:
            raise ValueError(f"id {guild_id} is taken")
        self._last_snowflake = max(self._last_snowflake, guild_id)
        self.roles[guild_id] = self._role(guild_id, "@everyone", EVERYONE_PERMISSIONS, 0)
        people = [self.bot_user.id, self.owner.id, *(u.id for u in members)]
        guild = EmulatedGuild(guild_id, name, self.owner.id, list(dict.fromkeys(people)), [guild_id], 0)
        self.guilds[guild_id] = guild
        guild.system_channel_id = self.add_text_channel("general", guild_id=guild_id)
        return guild

    def shard_guilds(self, shard_id: int, shard_count: int) -> list[int]:
        """The ids of the guilds that Discord would put on shard ``shard_id`` of ``shard_count``."""
        return [g for g in self.guilds if shard_of(g, shard_count) == shard_id]

    @property
    def connected_shards(self) -> set[tuple[int, int] | None]:
        """``(shard_id, shard_count)`` of every identified connection (None for an unsharded one)."""
        return {c.shard for c in self._connections if c.session_id}

    def dm_channel(self, user: EmulatedUser) -> int:
        """The id of the DM channel between the bot and ``user``, created on first use."""
        for cid, channel in self.channels.items():
            if channel["type"] == CHANNEL_DM and channel["recipients"][0]["id"] == str(user.id):
                return cid
        cid = self.snowflake()
        self.channels[cid] = {
            "id": str(cid),
            "type": CHANNEL_DM,
            "recipients": [user.payload()],
            "last_message_id": None,
            "flags": 0,
        }
        return cid

    def permissions_of(self, user: EmulatedUser, guild_id: int | None = None) -> int:
        """The guild-wide permission bits of ``user`` in the main guild (or ``guild_id``)."""
        guild = self._guild_record(guild_id)
        if user.id == guild.owner_id:
            return ALL_PERMISSIONS
        bits = int(self.roles[guild.id]["permissions"])
        for role_id in user.role_ids:
            if role_id in guild.role_ids:
                bits |= int(self.roles[role_id]["permissions"])
        return ALL_PERMISSIONS if bits & ADMINISTRATOR else bits

    def add_attachment(
        self, channel_id: int, filename: str, data: bytes, content_type: str, *, description: str | None = None
    ) -> JSON:
        """Store bytes on the emulated CDN and return the attachment object pointing at them."""
        attachment_id = self.snowflake()
        signature = secrets.token_hex(8)
        self._uploads[attachment_id] = (data, content_type, signature)
        path = f"attachments/{channel_id}/{attachment_id}/{quote(filename)}"
        expiry = int(time.time()) + 86400
        query = f"?ex={expiry:x}&is={int(time.time()):x}&hm={signature}&"
        payload: JSON = {
            "id": str(attachment_id),
            "filename": filename,
            "size": len(data),
            "url": f"{self.url}/cdn/{path}{query}",
            "proxy_url": f"{self.url}/media/{path}{query}",
            "content_type": content_type,
            "ephemeral": False,
            # Discord marks a file sent as a spoiler by its name and by this flag.
            "flags": ATTACHMENT_IS_SPOILER if filename.startswith("SPOILER_") else 0,
        }
        if description is not None:
            payload["description"] = description
        return payload

    def hold(self, path: str) -> asyncio.Event:
        """Make requests to ``path`` (e.g. ``/users/@me``) wait for their answer until the returned event is set.

        They are recorded in :attr:`requests` on arrival, so a test can wait for one and act while it waits.
        """
        return self._held.setdefault(path, asyncio.Event())

    def hold_downloads(self, filename: str) -> asyncio.Event:
        """Make CDN downloads of attachments named ``filename`` wait until the returned event is set, like a
        large file on a slow link."""
        return self._held_downloads.setdefault(filename, asyncio.Event())

    def expire_interaction_token(self, interaction: InteractionRecord) -> None:
        """Age ``interaction`` past its token's 15 minutes: its webhook then answers 401 Invalid Webhook Token."""
        interaction.created_at -= INTERACTION_TOKEN_LIFETIME

    def expire_attachment_urls(self) -> None:
        """Make every attachment URL handed out so far answer 404, like an expired signed CDN URL."""
        for attachment_id, (data, content_type, _) in list(self._uploads.items()):
            self._uploads[attachment_id] = (data, content_type, secrets.token_hex(8))

    def rate_limit_edits(
        self,
        limit: int = 5,
        per_seconds: float = 5.0,
        *,
        announce: bool = False,
        include_webhooks: bool = True,
    ) -> None:
        """Allow at most ``limit`` message edits per ``per_seconds`` per channel (or interaction token).

        Edits over the limit get a 429 with ``Retry-After``, ``X-RateLimit-*`` and ``Via`` headers and a
        JSON body with ``retry_after`` and ``global: false``, so discord.py sleeps and retries. With
        ``announce`` successful edits carry the bucket headers too, letting discord.py wait in advance.
        """
        self._edit_limit = _EditLimit(limit, per_seconds, announce, include_webhooks)

    def clear_rate_limits(self) -> None:
        """Stop rate-limiting edits."""
        self._edit_limit = None

    # ----------------------------------------------------------------------------- inspection

    def bot_messages(self, channel_id: int | None = None, *, include_deleted: bool = False) -> list[MessageRecord]:
        """Messages authored by the bot, oldest first, optionally only those of one channel."""
        return [
            m
            for m in self.messages.values()
            if m.author_id == self.bot_user.id
            and (channel_id is None or m.channel_id == channel_id)
            and (include_deleted or not m.deleted)
        ]

    def requests_to(self, method: str | None = None, pattern: str | None = None) -> list[RecordedRequest]:
        """Recorded REST requests, filtered by method and by a regex searched in the path."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method) and (pattern is None or re.search(pattern, r.path))
        ]

    def message_writes(self) -> list[RecordedRequest]:
        """Every request that created or edited a message (channel messages, interactions, webhooks)."""
        writes = re.compile(r"^/channels/\d+/messages(/\d+)?$|^/webhooks/|^/interactions/")
        return [r for r in self.requests if r.method in ("POST", "PATCH") and writes.search(r.path)]

    def writes_that_may_ping(self) -> list[RecordedRequest]:
        """Message writes with content or embeds whose ``allowed_mentions`` would let anyone be pinged.

        A silent write carries ``allowed_mentions`` with an empty ``parse`` list, no ``users``/``roles``
        and no true ``replied_user`` (discord.py omits ``replied_user`` instead of sending false).
        """
        risky: list[RecordedRequest] = []
        for request in self.message_writes():
            body = request.json if isinstance(request.json, dict) else {}
            if request.path.startswith("/interactions/"):
                body = body.get("data") or {}
            if not (body.get("content") or body.get("embeds")):
                continue
            allowed = body.get("allowed_mentions")
            silent = (
                isinstance(allowed, dict)
                and allowed.get("parse") == []
                and not allowed.get("users")
                and not allowed.get("roles")
                and not allowed.get("replied_user", False)
            )
            if not silent:
                risky.append(request)
        return risky

    def interaction_responses(self, interaction: InteractionRecord | int) -> InteractionResponses:
        """What the bot answered to ``interaction``: callback type, original response and follow-ups."""
        record = self.interactions[interaction if isinstance(interaction, int) else interaction.id]
        original = self.messages.get(record.original_message_id) if record.original_message_id else None
        followups = [self.messages[i] for i in record.followup_ids if i != record.original_message_id]
        return InteractionResponses(record.response_type, original, followups, record.modal, record.choices)

    async def wait_for(
        self,
        predicate: Callable[[], T | None],
        timeout: float = 10.0,  # noqa: ASYNC109
        recheck: float = 0.25,
    ) -> T:
        """Wait until ``predicate()`` is truthy and return its value; re-checked on every state change.

        A predicate that turns true with time alone (a quiet spell) is re-checked every ``recheck`` seconds too.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout} s")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, recheck))

    async def wait_for_message(
        self,
        predicate: Callable[[MessageRecord], bool] | None = None,
        *,
        channel_id: int | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> MessageRecord:
        """Wait for a (non-deleted) bot message matching ``predicate`` and return it."""

        def find() -> MessageRecord | None:
            return next((m for m in self.bot_messages(channel_id) if predicate is None or predicate(m)), None)

        return await self.wait_for(find, timeout)

    async def wait_quiet(self, quiet: float = 0.3, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until the bot has made no REST request for ``quiet`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() - self._last_request_at < quiet:
            if loop.time() > deadline:
                raise TimeoutError(f"the bot kept making requests for {timeout} s")
            await asyncio.sleep(quiet / 4)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # ----------------------------------------------------------------------------- driving the bot

    async def dispatch(self, event: str, data: JSON) -> None:
        """Send a DISPATCH event to the identified connections that Discord would send it to.

        Unsharded connections get every event; sharded ones only their guilds' (DMs: shard 0).
        """
        if not await self._deliver(event, data):
            raise RuntimeError(f"cannot dispatch {event}: no bot connection receives guild {data.get('guild_id')}")

    async def _deliver(self, event: str, data: JSON) -> int:
        guild_id = int(data["guild_id"]) if data.get("guild_id") else None
        connections = [c for c in self._connections if c.session_id and c.receives(guild_id)]
        for conn in connections:
            await conn.send(0, data, event)
        self._notify()
        return len(connections)

    async def request_reconnect(self) -> None:
        """Ask connected clients to reconnect (opcode 7); discord.py then RESUMEs."""
        for conn in list(self._connections):
            await conn.send(7)

    async def user_message(
        self,
        channel_id: int,
        author: EmulatedUser,
        content: str = "",
        *,
        attachments: Sequence[Upload] = (),
        mention_bot: bool = True,
        reply_to: MessageRecord | JSON | int | None = None,
        reply_ping: bool = True,
    ) -> JSON:
        """Post a message as ``author`` and dispatch MESSAGE_CREATE; returns the full message object.

        With ``mention_bot`` the content starts with the bot's mention and ``mentions`` lists the bot.
        A reply (``reply_to``) to a bot message also lists the bot in ``mentions`` when ``reply_ping``.
        Works in DM channels too (see :meth:`dm_channel`), where ``guild_id`` is absent.
        """
        channel = self._channel(channel_id)
        if mention_bot:
            content = f"{self.bot_user.mention} {content}" if content else self.bot_user.mention
        reference = self._reference(reply_to)
        mentioned = [self.bot_user] if mention_bot else []
        if reference and reply_ping and reference.author_id not in {u.id for u in mentioned}:
            mentioned.append(self.users[reference.author_id])
        uploads = [self.add_attachment(channel_id, *upload) for upload in attachments]
        data = self._message_data(channel_id, author, content, attachments=uploads, reference=reference)
        data["mentions"] = [u.payload() for u in mentioned]
        record = MessageRecord(int(data["id"]), channel_id, author.id, data, "user", history=[content])
        self.messages[record.id] = record
        event = self._gateway_message(data, channel)
        if not self.bot_may_read(data):
            event.update(_WITHHELD)
        await self.dispatch("MESSAGE_CREATE", event)
        return data

    async def delete_message(self, message: MessageRecord | JSON | int, *, by: EmulatedUser) -> None:
        """Delete a message as ``by`` would in the Discord client, and dispatch MESSAGE_DELETE.

        Like Discord, anyone may delete their own message; deleting someone else's (the bot's reply, say)
        needs Manage Messages in the guild and is impossible in a DM. The event carries only ``id``,
        ``channel_id`` and ``guild_id``, never the content, and goes to bots with the GUILD_MESSAGES
        (in guilds) or DIRECT_MESSAGES (in DMs) intent.
        """
        record = self._record_of(message)
        self._check_may_delete(record, by)
        if record.deleted:
            raise ApiError(404, 10008, "Unknown Message")
        record.deleted = True
        event: JSON = {"id": str(record.id), "channel_id": str(record.channel_id)}
        if guild_id := self._guild_of(record.channel_id):
            event["guild_id"] = str(guild_id)
        await self._dispatch_deletion("MESSAGE_DELETE", event, guild_id)

    async def bulk_delete(
        self, channel_id: int, messages: Sequence[MessageRecord | JSON | int], *, by: EmulatedUser
    ) -> None:
        """Delete several messages of a guild channel at once, as a moderator (MESSAGE_DELETE_BULK)."""
        guild_id = self._guild_of(channel_id)
        if guild_id is None:
            raise PermissionError("bulk deletion exists only in guild channels")
        records = [self._record_of(m) for m in messages]
        for record in records:
            if record.channel_id != channel_id:
                raise ValueError(f"message {record.id} is not in channel {channel_id}")
            self._check_may_delete(record, by, moderator=True)
        for record in records:
            record.deleted = True
        event: JSON = {
            "ids": [str(r.id) for r in records],
            "channel_id": str(channel_id),
            "guild_id": str(guild_id),
        }
        await self._dispatch_deletion("MESSAGE_DELETE_BULK", event, guild_id)

    def _record_of(self, message: MessageRecord | JSON | int) -> MessageRecord:
        if isinstance(message, MessageRecord):
            return message
        return self.messages[int(message["id"]) if isinstance(message, dict) else int(message)]

    def _check_may_delete(self, record: MessageRecord, by: EmulatedUser, *, moderator: bool = False) -> None:
        if record.flags & FLAG_EPHEMERAL:
            raise PermissionError("ephemeral messages can't be deleted by users")
        if record.author_id == by.id and not moderator:
            return
        if self._guild_of(record.channel_id) is None:
            raise PermissionError("in a DM only one's own messages can be deleted")
        if not self.permissions_of(by) & MANAGE_MESSAGES:
            raise PermissionError(f"{by.username} lacks Manage Messages")

    async def _dispatch_deletion(self, event: str, data: JSON, guild_id: int | None) -> None:
        needed = GUILD_MESSAGES_INTENT if guild_id else DIRECT_MESSAGES_INTENT
        if (self.intents or 0) & needed:
            await self.dispatch(event, data)
        else:
            self._notify()

    async def slash_command(
        self,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        user: EmulatedUser,
        channel_id: int | None = None,
        attachments: Mapping[str, Upload] | None = None,
    ) -> InteractionRecord:
        """Dispatch INTERACTION_CREATE for the chat-input command ``name`` (``"group sub"`` for subcommands).

        Option values are typed from the synced command when it is known (else from the Python type);
        an :data:`Upload` tuple becomes an attachment option (stored on the CDN and put in ``resolved``),
        an :class:`EmulatedUser` a user option. ``attachments`` maps further option names to uploads.
        """
        channel_id = channel_id or self.channel_id
        guild_id = self._guild_of(channel_id)
        parts = name.split()
        command = self._find_command(parts[0], guild_id)
        schema: list[JSON] = command.get("options", []) if command else []
        kinds: list[int] = []
        for index, part in enumerate(parts[1:]):
            sub = next((o for o in schema if o["name"] == part), None)
            kinds.append(sub["type"] if sub else (1 if index == len(parts) - 2 else 2))
            schema = sub.get("options", []) if sub else []
        resolved: JSON = {}
        values = {**(options or {}), **(attachments or {})}
        built = [self._option(key, value, schema, channel_id, resolved) for key, value in values.items()]
        for part, kind in reversed(list(zip(parts[1:], kinds, strict=True))):
            built = [{"name": part, "type": kind, "options": built}]
        data: JSON = {
            "id": command["id"] if command else str(self.snowflake()),
            "name": parts[0],
            "type": 1,
            "options": built,
        }
        if resolved:
            data["resolved"] = resolved
        if command and command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        return await self._interaction(INTERACTION_COMMAND, data, user, channel_id, name=name)

    async def component_interaction(
        self,
        message: MessageRecord | int,
        custom_id: str,
        *,
        user: EmulatedUser,
        component_type: int = 2,
        values: Sequence[str] | None = None,
    ) -> InteractionRecord:
        """Dispatch INTERACTION_CREATE for a click on (or selection in) a component of a bot message."""
        record = message if isinstance(message, MessageRecord) else self.messages[message]
        data: JSON = {"custom_id": custom_id, "component_type": component_type}
        if values is not None:
            data["values"] = list(values)
        return await self._interaction(
            INTERACTION_COMPONENT, data, user, record.channel_id, name=custom_id, message=record
        )

    # ----------------------------------------------------------------------------- payload builders

    def _role(self, role_id: int, name: str, permissions: int, position: int) -> JSON:
        return {
            "id": str(role_id),
            "name": name,
            "permissions": str(permissions),
            "position": position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "icon": None,
            "unicode_emoji": None,
            "flags": 0,
        }

    def _text_channel(self, channel_id: int, name: str, position: int, guild_id: int | None = None) -> JSON:
        return {
            "id": str(channel_id),
            "type": CHANNEL_TEXT,
            "guild_id": str(guild_id or self.guild_id),
            "name": name,
            "position": position,
            "parent_id": None,
            "topic": None,
            "nsfw": False,
            "rate_limit_per_user": 0,
            "permission_overwrites": [],
            "last_message_id": None,
            "flags": 0,
        }

    def _member(self, user: EmulatedUser, *, with_user: bool = True, guild_id: int | None = None) -> JSON:
        guild = self._guild_record(guild_id)
        member: JSON = {
            "roles": [str(r) for r in user.role_ids if r in guild.role_ids],
            "joined_at": self._joined_at,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "nick": None,
            "avatar": None,
            "communication_disabled_until": None,
        }
        if with_user:
            member["user"] = user.payload()
        return member

    def _guild_record(self, guild_id: int | None) -> EmulatedGuild:
        try:
            return self.guilds[guild_id or self.guild_id]
        except KeyError:
            raise ApiError(404, 10004, "Unknown Guild") from None

    def _guild(self, guild_id: int | None = None) -> JSON:
        guild = self._guild_record(guild_id)
        own = [c for c in self.channels.values() if c.get("guild_id") == str(guild.id)]
        return {
            "id": str(guild.id),
            "name": guild.name,
            "icon": None,
            "owner_id": str(guild.owner_id),
            "unavailable": False,
            "large": False,
            "member_count": len(guild.member_ids),
            "joined_at": self._joined_at,
            "roles": [self.roles[r] for r in guild.role_ids],
            "channels": [c for c in own if c["type"] == CHANNEL_TEXT],
            "threads": [c for c in own if c["type"] == CHANNEL_PUBLIC_THREAD],
            "members": [self._member(self.users[u], guild_id=guild.id) for u in guild.member_ids],
            "emojis": [],
            "stickers": [],
            "features": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "system_channel_id": str(guild.system_channel_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 1,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "application_id": None,
        }

    def _channel(self, channel_id: int) -> JSON:
        try:
            return self.channels[channel_id]
        except KeyError:
            raise ApiError(404, 10003, "Unknown Channel") from None

    def _guild_of(self, channel_id: int) -> int | None:
        guild = self._channel(channel_id).get("guild_id")
        return int(guild) if guild else None

    def _message_data(
        self,
        channel_id: int,
        author: EmulatedUser,
        content: str,
        *,
        attachments: list[JSON] | None = None,
        embeds: list[JSON] | None = None,
        reference: MessageRecord | None = None,
        flags: int = 0,
    ) -> JSON:
        message_id = self.snowflake()
        data: JSON = {
            "id": str(message_id),
            "channel_id": str(channel_id),
            "type": MESSAGE_REPLY if reference else MESSAGE_DEFAULT,
            "author": author.payload(),
            "content": content,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "mention_channels": [],
            "attachments": attachments or [],
            "embeds": embeds or [],
            "reactions": [],
            "pinned": False,
            "flags": flags,
            "components": [],
            "sticker_items": [],
        }
        guild_id = self._guild_of(channel_id)
        if guild_id:
            data["guild_id"] = str(guild_id)
        if reference:
            data["message_reference"] = {
                "type": 0,
                "message_id": str(reference.id),
                "channel_id": str(reference.channel_id),
                **({"guild_id": str(guild_id)} if guild_id else {}),
            }
            data["referenced_message"] = {k: v for k, v in reference.data.items() if k != "referenced_message"}
        channel = self.channels[channel_id]
        channel["last_message_id"] = str(message_id)
        return data

    def bot_may_read(self, data: JSON) -> bool:
        """Whether Discord shows the bot the content and attachments of the message ``data``.

        Without the Message Content intent only the bot's own messages, DMs and messages that mention
        the bot keep them; Discord applies this to every message object it sends, nested ones included.
        """
        if (self.intents or 0) & MESSAGE_CONTENT_INTENT or "guild_id" not in data:
            return True
        if int(data["author"]["id"]) == self.bot_user.id:
            return True
        return any(int(user["id"]) == self.bot_user.id for user in data.get("mentions", []))

    def as_seen_by_bot(self, data: JSON) -> JSON:
        """A copy of the message object ``data`` as Discord would send it to the bot (see :meth:`bot_may_read`)."""
        seen = json.loads(json.dumps(data))
        if not self.bot_may_read(seen):
            seen.update(_WITHHELD)
        if seen.get("referenced_message"):
            seen["referenced_message"] = self.as_seen_by_bot(seen["referenced_message"])
        return seen

    def _gateway_message(self, data: JSON, channel: JSON) -> JSON:
        """A copy of a message object as the gateway sends it (with ``member`` in guilds)."""
        event = json.loads(json.dumps(data))
        if event.get("referenced_message"):
            event["referenced_message"] = self.as_seen_by_bot(event["referenced_message"])
        if "guild_id" in channel:
            author = self.users.get(int(data["author"]["id"]))
            if author is not None:
                event["member"] = self._member(author, with_user=False, guild_id=int(channel["guild_id"]))
        else:
            event["channel_type"] = channel["type"]
        return event

    def _reference(self, reply_to: MessageRecord | JSON | int | None) -> MessageRecord | None:
        if reply_to is None:
            return None
        if isinstance(reply_to, MessageRecord):
            return reply_to
        message_id = int(reply_to["id"]) if isinstance(reply_to, dict) else int(reply_to)
        return self.messages[message_id]

    def _find_command(self, name: str, guild_id: int | None) -> JSON | None:
        scopes = [guild_id, None] if guild_id else [None]
        for scope in scopes:
            for command in self.commands.get(scope, []):
                if command["name"] == name and command.get("type", 1) == 1:
                    return command
        return None

    def _option(self, name: str, value: Any, schema: list[JSON], channel_id: int, resolved: JSON) -> JSON:
        spec = next((o for o in schema if o["name"] == name), None)
        if isinstance(value, tuple):
            attachment = self.add_attachment(channel_id, *value)
            resolved.setdefault("attachments", {})[attachment["id"]] = attachment
            return {"name": name, "type": 11, "value": attachment["id"]}
        if isinstance(value, EmulatedUser):
            resolved.setdefault("users", {})[str(value.id)] = value.payload()
            if guild_id := self._guild_of(channel_id):
                member = {
                    **self._member(value, with_user=False, guild_id=guild_id),
                    "permissions": str(self.permissions_of(value, guild_id)),
                }
                resolved.setdefault("members", {})[str(value.id)] = member
            return {"name": name, "type": 6, "value": str(value.id)}
        if spec is not None:
            kind = int(spec["type"])
        elif isinstance(value, bool):
            kind = 5
        elif isinstance(value, int):
            kind = 4
        elif isinstance(value, float):
            kind = 10
        else:
            kind = 3
        return {"name": name, "type": kind, "value": value}

    async def _interaction(
        self,
        kind: int,
        data: JSON,
        user: EmulatedUser,
        channel_id: int,
        *,
        name: str,
        message: MessageRecord | None = None,
    ) -> InteractionRecord:
        channel = self._channel(channel_id)
        guild_id = self._guild_of(channel_id)
        interaction_id = self.snowflake()
        token = "aW50ZXJhY3Rpb24" + secrets.token_hex(32)
        payload: JSON = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "channel_id": str(channel_id),
            "channel": channel,
            "token": token,
            "version": 1,
            "app_permissions": str(ALL_PERMISSIONS),
            "locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild_id or 0)},
            "context": 0 if guild_id else 1,
            "attachment_size_limit": ATTACHMENT_SIZE_LIMIT,
        }
        if guild_id:
            member = {**self._member(user, guild_id=guild_id), "permissions": str(self.permissions_of(user, guild_id))}
            payload.update(
                guild_id=str(guild_id),
                guild={"id": str(guild_id), "locale": "en-US", "features": []},
                guild_locale="en-US",
                member=member,
            )
        else:
            payload["user"] = user.payload()
        if message is not None:
            payload["message"] = message.data
        record = InteractionRecord(
            id=interaction_id,
            token=token,
            kind=kind,
            name=name,
            user_id=user.id,
            channel_id=channel_id,
            guild_id=guild_id,
            payload=payload,
            created_at=asyncio.get_running_loop().time(),
            message_id=message.id if message else None,
        )
        self.interactions[interaction_id] = record
        await self.dispatch("INTERACTION_CREATE", payload)
        return record

    # ----------------------------------------------------------------------------- message logic

    def _validate(self, body: JSON) -> None:
        content = body.get("content")
        if content is not None and len(content) > MAX_CONTENT_LENGTH:
            raise _form_error("content", "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")
        embeds = body.get("embeds") or []
        if len(embeds) > 10:
            raise _form_error("embeds", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        for embed in embeds:
            if len(embed.get("description") or "") > MAX_EMBED_DESCRIPTION:
                raise _form_error("embeds.0.description", "BASE_TYPE_MAX_LENGTH", "Must be 4096 or fewer in length.")

    def _check_not_empty(self, data: JSON) -> None:
        if not (data.get("content") or data.get("embeds") or data.get("attachments") or data.get("components")):
            raise ApiError(400, 50006, "Cannot send an empty message")

    def _attachments(
        self, channel_id: int, body: JSON, files: Mapping[str, Upload], existing: list[JSON]
    ) -> list[JSON]:
        specs = body.get("attachments")
        if specs is None:
            specs = [*existing, *({"id": name[6:-1]} for name in files)]
        kept = {a["id"]: a for a in existing}
        result: list[JSON] = []
        for spec in specs:
            spec_id = str(spec.get("id"))
            if spec_id in kept:
                result.append(kept[spec_id])
                continue
            upload = files.get(f"files[{spec_id}]")
            if upload is None:
                raise _form_error("attachments", "ATTACHMENT_NOT_FOUND", f"Unknown attachment {spec_id}")
            filename = spec.get("filename") or upload[0]
            result.append(
                self.add_attachment(channel_id, filename, upload[1], upload[2], description=spec.get("description"))
            )
        return result

    def _apply_mentions(self, record: MessageRecord, allowed: JSON | None, *, creating: bool) -> None:
        """Fill ``mentions`` like Discord: the users/roles the content pings, filtered by allowed_mentions."""
        content = record.content
        parse = {"users", "roles", "everyone"} if allowed is None else set(allowed.get("parse") or [])
        allowed_users = {int(u) for u in (allowed or {}).get("users") or []}
        allowed_roles = {int(r) for r in (allowed or {}).get("roles") or []}
        replied_user = creating if allowed is None else bool(allowed.get("replied_user", False))
        user_ids = [int(m) for m in re.findall(r"<@!?(\d+)>", content)]
        role_ids = [int(m) for m in re.findall(r"<@&(\d+)>", content)]
        users = [u for u in dict.fromkeys(user_ids) if u in self.users and ("users" in parse or u in allowed_users)]
        roles = [r for r in dict.fromkeys(role_ids) if r in self.roles and ("roles" in parse or r in allowed_roles)]
        reference = self.messages.get(record.reference_id) if record.reference_id else None
        if reference and replied_user and reference.author_id not in users:
            users.append(reference.author_id)
        everyone = "everyone" in parse and ("@everyone" in content or "@here" in content)
        record.data["mentions"] = [self.users[u].payload() for u in users]
        record.data["mention_roles"] = [str(r) for r in roles]
        record.data["mention_everyone"] = everyone
        record.pinged_user_ids.update(users)
        record.pinged_role_ids.update(roles)
        record.pinged_everyone = record.pinged_everyone or everyone

    async def _create_bot_message(
        self,
        channel_id: int,
        body: JSON,
        files: Mapping[str, Upload],
        *,
        source: str,
        interaction: InteractionRecord | None = None,
        extra_flags: int = 0,
        allow_empty: bool = False,
    ) -> MessageRecord:
        self._validate(body)
        channel = self._channel(channel_id)
        reference = None
        if ref := body.get("message_reference"):
            reference = self.messages.get(int(ref.get("message_id", 0)))
            if reference is None and ref.get("fail_if_not_exists", True):
                raise _form_error("message_reference", "REPLIES_UNKNOWN_MESSAGE", "Unknown message")
        flags = (int(body.get("flags") or 0) & _SETTABLE_FLAGS) | extra_flags
        if interaction is None:
            flags &= ~FLAG_EPHEMERAL
        data = self._message_data(
            channel_id,
            self.bot_user,
            body.get("content") or "",
            attachments=self._attachments(channel_id, body, files, []),
            embeds=body.get("embeds") or [],
            reference=reference,
            flags=flags,
        )
        data["components"] = body.get("components") or []
        data["tts"] = bool(body.get("tts", False))
        if body.get("nonce") is not None:
            data["nonce"] = body["nonce"]
        if interaction is not None:
            user = self.users[interaction.user_id].payload()
            data.update(
                type=MESSAGE_CHAT_INPUT if interaction.kind == INTERACTION_COMMAND else MESSAGE_DEFAULT,
                webhook_id=str(self.application_id),
                application_id=str(self.application_id),
                interaction={
                    "id": str(interaction.id),
                    "type": interaction.kind,
                    "name": interaction.name,
                    "user": user,
                },
                interaction_metadata={
                    "id": str(interaction.id),
                    "type": interaction.kind,
                    "user": user,
                    "authorizing_integration_owners": interaction.payload["authorizing_integration_owners"],
                },
            )
        if not allow_empty:
            self._check_not_empty(data)
        record = MessageRecord(
            int(data["id"]),
            channel_id,
            self.bot_user.id,
            data,
            source,
            history=[data["content"]],
            component_history=[list(data["components"])],
            interaction_id=interaction.id if interaction else None,
        )
        self._apply_mentions(record, body.get("allowed_mentions"), creating=True)
        self.messages[record.id] = record
        self._written(record)
        if self.echo_bot_messages and not flags & FLAG_EPHEMERAL:
            await self._deliver("MESSAGE_CREATE", self._gateway_message(data, channel))
        return record

    async def _edit_bot_message(self, record: MessageRecord, body: JSON, files: Mapping[str, Upload]) -> None:
        self._validate(body)
        if record.deleted:
            raise ApiError(404, 10008, "Unknown Message")
        data = json.loads(json.dumps(record.data))
        if "content" in body:
            data["content"] = body["content"] or ""
        if "embeds" in body:
            data["embeds"] = body["embeds"] or []
        if "components" in body:
            data["components"] = body["components"] or []
        if "attachments" in body or files:
            data["attachments"] = self._attachments(record.channel_id, body, files, data["attachments"])
        flags = data["flags"] & ~FLAG_LOADING
        if body.get("flags") is not None:
            flags = (flags & FLAG_EPHEMERAL) | (int(body["flags"]) & FLAG_SUPPRESS_EMBEDS)
        data["flags"] = flags
        self._check_not_empty(data)
        data["edited_timestamp"] = _now_iso()
        record.data = data
        record.edits += 1
        record.history.append(data["content"])
        record.component_history.append(list(data["components"]))
        self._apply_mentions(record, body.get("allowed_mentions"), creating=False)
        self._written(record)
        if self.echo_bot_messages and not flags & FLAG_EPHEMERAL:
            await self._deliver("MESSAGE_UPDATE", self._gateway_message(data, self.channels[record.channel_id]))

    def _written(self, record: MessageRecord) -> None:
        written = _WRITTEN.get(None)
        if written is not None and self.bot_writes:
            written.append(record)

    async def _delete(self, record: MessageRecord) -> None:
        if record.deleted:
            raise ApiError(404, 10008, "Unknown Message")
        record.deleted = True
        if self.echo_bot_messages and not record.flags & FLAG_EPHEMERAL:
            event: JSON = {"id": str(record.id), "channel_id": str(record.channel_id)}
            if guild_id := self._guild_of(record.channel_id):
                event["guild_id"] = str(guild_id)
            await self._deliver("MESSAGE_DELETE", event)

    def _take_edit_slot(self, key: str, *, webhook: bool) -> dict[str, str]:
        """Count one edit against the edit limit; raise a 429 over it, else return headers to announce."""
        limit = self._edit_limit
        if limit is None or (webhook and not limit.include_webhooks):
            return {}
        now = time.monotonic()
        hits = limit.hits.setdefault(key, collections.deque())
        while hits and now - hits[0] >= limit.per_seconds:
            hits.popleft()
        reset_after = limit.per_seconds - (now - hits[0]) if hits else limit.per_seconds
        bucket = {
            "X-RateLimit-Limit": str(limit.limit),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": "emulated-message-edit",
        }
        if len(hits) >= limit.limit:
            headers = {
                **bucket,
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Scope": "user",
                "Retry-After": str(max(1, int(reset_after + 0.999))),
                "Via": "1.1 google",
            }
            extra = {"retry_after": round(reset_after, 3), "global": False}
            raise ApiError(429, 0, "You are being rate limited.", headers=headers, extra=extra)
        hits.append(now)
        if not limit.announce:
            return {}
        return {**bucket, "X-RateLimit-Remaining": str(limit.limit - len(hits))}

    def _message_in(self, channel_id: int, message_id: int) -> MessageRecord:
        record = self.messages.get(message_id)
        if record is None or record.channel_id != channel_id or record.deleted:
            raise ApiError(404, 10008, "Unknown Message")
        return record

    def _own_message(self, record: MessageRecord) -> MessageRecord:
        if record.author_id != self.bot_user.id:
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        # Interaction responses are the bot's own messages and can be edited through the channel too, except
        # ephemeral ones: only the interaction's webhook reaches those.
        if record.flags & FLAG_EPHEMERAL:
            raise ApiError(404, 10008, "Unknown Message")
        return record

    # ----------------------------------------------------------------------------- HTTP plumbing

    def _wrap(
        self, handler: Callable[..., Awaitable[web.StreamResponse]], *, auth: bool
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def route(request: web.Request) -> web.StreamResponse:
            body, files = await self._read_body(request)
            recorded = RecordedRequest(
                method=request.method,
                path=request.path[len(API_PREFIX) :],
                query=dict(request.query),
                json=body,
                files=list(files.values()),
                at=time.monotonic(),
            )
            self.requests.append(recorded)
            self._last_request_at = asyncio.get_running_loop().time()
            held = self._held.get(recorded.path)
            if held is not None:
                self._notify()
                await held.wait()
            written: list[MessageRecord] = []
            _WRITTEN.set(written)
            try:
                if auth and request.headers.get("Authorization") != f"Bot {self.token}":
                    raise ApiError(401, 0, "401: Unauthorized")
                response = await handler(request, body, files)
            except ApiError as error:
                response = _json_response(error.body, error.status, error.headers)
            recorded.status = response.status
            self._last_request_at = asyncio.get_running_loop().time()
            self._notify()
            if written:
                # The answer goes out first, as on Discord, where nobody sees a message before it exists.
                await response.prepare(request)
                await response.write_eof()
                for record in written:
                    for watcher in list(self.bot_writes):
                        watcher(record)
            return response

        return route

    async def _read_body(self, request: web.Request) -> tuple[Any, dict[str, Upload]]:
        files: dict[str, Upload] = {}
        if request.content_type == "multipart/form-data":
            body: Any = None
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "payload_json":
                    body = json.loads(await part.text())
                else:
                    content_type = part.headers.get("Content-Type", "application/octet-stream")
                    files[part.name or ""] = (part.filename or "file", bytes(await part.read()), content_type)
            return body, files
        raw = await request.read()
        return (json.loads(raw) if raw else None), files

    def _interaction_for(self, app_id: str, token: str) -> InteractionRecord:
        if int(app_id) == self.application_id:
            for record in self.interactions.values():
                if record.token == token:
                    age = asyncio.get_running_loop().time() - record.created_at
                    if age >= INTERACTION_TOKEN_LIFETIME:
                        raise ApiError(401, 50027, "Invalid Webhook Token")
                    return record
        raise ApiError(404, 10015, "Unknown Webhook")

    def _webhook_message(self, interaction: InteractionRecord, message_id: str) -> MessageRecord:
        if message_id == "@original":
            target = interaction.original_message_id
        else:
            target = int(message_id)
            if target != interaction.original_message_id and target not in interaction.followup_ids:
                target = None
        record = self.messages.get(target) if target else None
        if record is None or record.deleted:
            raise ApiError(404, 10008, "Unknown Message")
        return record

    # ----------------------------------------------------------------------------- REST routes

    async def _not_found(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        raise ApiError(404, 0, "404: Not Found")

    async def _get_me(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        return _json_response({**self.bot_user.payload(), "verified": True, "mfa_enabled": False, "email": None})

    async def _get_application(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        return _json_response(
            {
                "id": str(self.application_id),
                "name": self.bot_user.username,
                "description": "",
                "icon": None,
                "bot_public": False,
                "bot_require_code_grant": False,
                "owner": self.owner.payload(),
                "team": None,
                "verify_key": secrets.token_hex(32),
                "flags": 0,
                "summary": "",
                "bot": self.bot_user.payload(),
                "redirect_uris": [],
                "interactions_endpoint_url": None,
            }
        )

    async def _get_gateway(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        limits = {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}
        # Discord recommends one shard per 1000 guilds (at least one); only /gateway/bot says so.
        shards = max(1, -(-len(self.guilds) // 1000))
        data: JSON = {"url": self.gateway_url}
        if request.path.endswith("/bot"):
            data.update(shards=shards, session_start_limit=limits)
        return _json_response(data)

    async def _create_dm(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        user = self.users.get(int(body["recipient_id"]))
        if user is None:
            raise ApiError(400, 50007, "Cannot send messages to this user")
        return _json_response(self.channels[self.dm_channel(user)])

    async def _get_guild(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        guild = self._guild(int(request.match_info["guild_id"]))
        for key in ("channels", "threads", "members", "voice_states", "presences"):
            guild.pop(key)
        return _json_response(guild)

    async def _get_member(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        user = self.users.get(int(request.match_info["user_id"]))
        guild = self._guild_record(int(request.match_info["guild_id"]))
        if user is None or user.id not in guild.member_ids:
            raise ApiError(404, 10007, "Unknown Member")
        return _json_response(self._member(user, guild_id=guild.id))

    async def _get_channel(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        return _json_response(self._channel(int(request.match_info["channel_id"])))

    async def _list_messages(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        channel_id = int(request.match_info["channel_id"])
        self._channel(channel_id)
        limit = min(int(request.query.get("limit", 50)), 100)
        before = int(request.query.get("before", 1 << 63))
        after = int(request.query.get("after", 0))
        found = [
            self.as_seen_by_bot(m.data)
            for m in self.messages.values()
            if m.channel_id == channel_id and not m.deleted and not m.flags & FLAG_EPHEMERAL and after < m.id < before
        ]
        found.sort(key=lambda d: int(d["id"]), reverse=True)
        if "after" in request.query and "before" not in request.query:
            found = found[-limit:]
        return _json_response(found[:limit])

    async def _post_message(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        channel_id = int(request.match_info["channel_id"])
        record = await self._create_bot_message(channel_id, body or {}, files, source="channel")
        return _json_response(self.as_seen_by_bot(record.data))

    async def _get_message(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        channel_id, message_id = int(request.match_info["channel_id"]), int(request.match_info["message_id"])
        record = self._message_in(channel_id, message_id)
        if record.flags & FLAG_EPHEMERAL:
            raise ApiError(404, 10008, "Unknown Message")
        return _json_response(self.as_seen_by_bot(record.data))

    async def _patch_message(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        channel_id, message_id = int(request.match_info["channel_id"]), int(request.match_info["message_id"])
        record = self._own_message(self._message_in(channel_id, message_id))
        headers = self._take_edit_slot(f"channel:{channel_id}", webhook=False)
        await self._edit_bot_message(record, body or {}, files)
        return _json_response(self.as_seen_by_bot(record.data), headers=headers)

    async def _delete_message(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        channel_id, message_id = int(request.match_info["channel_id"]), int(request.match_info["message_id"])
        await self._delete(self._message_in(channel_id, message_id))
        return web.Response(status=204)

    async def _typing(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        channel_id = int(request.match_info["channel_id"])
        self._channel(channel_id)
        self.typing.append(channel_id)
        return web.Response(status=204)

    async def _react(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        channel_id, message_id = int(request.match_info["channel_id"]), int(request.match_info["message_id"])
        record = self._message_in(channel_id, message_id)
        emoji = request.match_info["emoji"]
        if request.method == "PUT" and emoji not in record.reactions:
            record.reactions.append(emoji)
        elif request.method == "DELETE" and emoji in record.reactions:
            record.reactions.remove(emoji)
        return web.Response(status=204)

    def _command_scope(self, request: web.Request) -> int | None:
        if int(request.match_info["app_id"]) != self.application_id:
            raise ApiError(403, 50001, "Missing Access")
        guild = request.match_info.get("guild_id")
        if guild is not None and int(guild) not in self.guilds:
            raise ApiError(403, 50001, "Missing Access")
        return int(guild) if guild is not None else None

    async def _get_commands(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        return _json_response(self.commands.get(self._command_scope(request), []))

    async def _put_commands(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        scope = self._command_scope(request)
        previous = {(c["name"], c.get("type", 1)): c["id"] for c in self.commands.get(scope, [])}
        seen: set[tuple[str, int]] = set()
        synced: list[JSON] = []
        for index, command in enumerate(body or []):
            kind = int(command.get("type", 1))
            name = str(command.get("name", ""))
            if kind == 1 and (not _COMMAND_NAME.match(name) or name != name.lower()):
                raise _form_error(f"{index}.name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
            if kind == 1 and not 1 <= len(command.get("description", "")) <= 100:
                raise _form_error(f"{index}.description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100")
            if (name, kind) in seen:
                raise _form_error(f"{index}.name", "APPLICATION_COMMANDS_DUPLICATE_NAME", "Duplicate name")
            seen.add((name, kind))
            synced.append(
                {
                    "default_member_permissions": None,
                    "nsfw": False,
                    "options": [],
                    "description": "",
                    **command,
                    "id": previous.get((name, kind)) or str(self.snowflake()),
                    "application_id": str(self.application_id),
                    "version": str(self.snowflake()),
                    "type": kind,
                    **({"guild_id": str(scope)} if scope else {}),
                }
            )
        self.commands[scope] = synced
        return _json_response(synced)

    async def _callback(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        interaction = self.interactions.get(int(request.match_info["interaction_id"]))
        if interaction is None or interaction.token != request.match_info["token"]:
            raise ApiError(404, 10062, "Unknown interaction")
        age = asyncio.get_running_loop().time() - interaction.created_at
        if self.interaction_ack_timeout is not None and age > self.interaction_ack_timeout:
            raise ApiError(404, 10062, "Unknown interaction")
        if interaction.response_type is not None:
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        kind = int(body["type"])
        data: JSON = body.get("data") or {}
        summary: JSON = {
            "id": str(interaction.id),
            "type": interaction.kind,
            "response_message_loading": kind == 5,
            "response_message_ephemeral": bool(int(data.get("flags") or 0) & FLAG_EPHEMERAL),
        }
        resource: JSON | None = None
        message: MessageRecord | None = None
        if kind in (4, 5):
            loading = FLAG_LOADING if kind == 5 else 0
            message = await self._create_bot_message(
                interaction.channel_id,
                data if kind == 4 else {"flags": data.get("flags")},
                files,
                source="interaction",
                interaction=interaction,
                extra_flags=loading | (int(data.get("flags") or 0) & FLAG_EPHEMERAL),
                allow_empty=kind == 5,
            )
            interaction.original_message_id = message.id
        elif kind in (6, 7):
            if interaction.message_id is None:
                raise ApiError(400, 50035, "Invalid interaction application command")
            interaction.original_message_id = interaction.message_id
            if kind == 7:
                message = self.messages[interaction.message_id]
                await self._edit_bot_message(message, data, files)
        elif kind == 8:
            interaction.choices = list(data.get("choices") or [])
        elif kind == 9:
            interaction.modal = data
        elif kind != 1:
            raise _form_error("type", "BASE_TYPE_CHOICES", f"Value must be one of (1, 4, 5, 6, 7, 8, 9), got {kind}")
        interaction.callbacks.append(body)
        interaction.response_type = kind
        if message is not None:
            summary["response_message_id"] = str(message.id)
            resource = {"type": kind, "message": message.data}
        if "with_response" not in request.query:
            return web.Response(status=204)
        return _json_response({"interaction": summary, **({"resource": resource} if resource else {})})

    async def _post_followup(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        interaction = self._interaction_for(request.match_info["app_id"], request.match_info["token"])
        if interaction.response_type is None:
            raise ApiError(404, 10015, "Unknown Webhook")
        original = self.messages.get(interaction.original_message_id or 0)
        if original is not None and original.is_loading and not original.deleted:
            # The first follow-up after a "thinking" defer replaces the loading message.
            await self._edit_bot_message(original, {**(body or {}), "flags": None}, files)
            record = original
        else:
            record = await self._create_bot_message(
                interaction.channel_id,
                body or {},
                files,
                source="followup",
                interaction=interaction,
                extra_flags=int((body or {}).get("flags") or 0) & FLAG_EPHEMERAL,
            )
        interaction.followup_ids.append(record.id)
        if request.query.get("wait", "false").lower() not in ("true", "1"):
            return web.Response(status=204)
        return _json_response(record.data)

    async def _get_webhook_message(self, request: web.Request, body: Any, files: Mapping[str, Upload]) -> web.Response:
        interaction = self._interaction_for(request.match_info["app_id"], request.match_info["token"])
        return _json_response(self._webhook_message(interaction, request.match_info["message_id"]).data)

    async def _patch_webhook_message(
        self, request: web.Request, body: Any, files: Mapping[str, Upload]
    ) -> web.Response:
        interaction = self._interaction_for(request.match_info["app_id"], request.match_info["token"])
        record = self._webhook_message(interaction, request.match_info["message_id"])
        headers = self._take_edit_slot(f"webhook:{interaction.token}", webhook=True)
        await self._edit_bot_message(record, body or {}, files)
        return _json_response(self.as_seen_by_bot(record.data), headers=headers)

    async def _delete_webhook_message(
        self, request: web.Request, body: Any, files: Mapping[str, Upload]
    ) -> web.Response:
        interaction = self._interaction_for(request.match_info["app_id"], request.match_info["token"])
        await self._delete(self._webhook_message(interaction, request.match_info["message_id"]))
        return web.Response(status=204)

    # ----------------------------------------------------------------------------- CDN and gateway

    async def _cdn(self, request: web.Request) -> web.Response:
        self.downloads.append(int(request.match_info["attachment_id"]))
        if (held := self._held_downloads.get(request.match_info["filename"])) is not None:
            await held.wait()
        upload = self._uploads.get(int(request.match_info["attachment_id"]))
        if upload is None or request.query.get("hm") != upload[2]:
            return web.Response(status=404, text="This content is no longer available.")
        return web.Response(body=upload[0], content_type=upload[1])

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.compression = request.query.get("compress")
        conn = _GatewayConnection(ws, self.compression)
        self._connections.add(conn)
        try:
            await conn.send(10, {"heartbeat_interval": self._heartbeat_ms, "_trace": ["emulator"]})
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(message.data)
                op, data = payload.get("op"), payload.get("d")
                if isinstance(data, dict) and "token" in data:
                    self.gateway_log.append({**payload, "d": {**data, "token": "<redacted>"}})
                else:
                    self.gateway_log.append(payload)
                if op == 1:
                    await conn.send(11)
                elif op == 2:
                    await self._identify(conn, data)
                elif op == 6:
                    await self._resume(conn, data)
                elif op == 8:
                    await self._send_member_chunk(conn, data)
                self._notify()
        finally:
            self._connections.discard(conn)
            if conn.session_id:
                self._sessions[conn.session_id] = (conn.sequence, conn.shard)
            self._notify()
        return ws

    async def _identify(self, conn: _GatewayConnection, data: JSON) -> None:
        if data.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        shard = data.get("shard")
        if shard is not None:
            valid = isinstance(shard, list) and len(shard) == 2 and all(isinstance(n, int) for n in shard)
            if not valid or not 0 <= shard[0] < shard[1]:
                await conn.ws.close(code=4010, message=b"Invalid shard.")
                return
            conn.shard = (shard[0], shard[1])
        self.identify_count += 1
        self.intents = conn.intents = int(data.get("intents", 0))
        conn.session_id = secrets.token_hex(16)
        user = {**self.bot_user.payload(), "verified": True, "mfa_enabled": False, "email": None}
        guild_ids = [g for g in self.guilds if conn.receives(g)]
        ready: JSON = {
            "v": 10,
            "user": user,
            "guilds": [{"id": str(g), "unavailable": True} for g in guild_ids],
            "session_id": conn.session_id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "user_settings": {},
            "geo_ordered_rtc_regions": [],
            "_trace": ["emulator"],
        }
        if conn.shard is not None:
            ready["shard"] = list(conn.shard)
        await conn.send(0, ready, "READY")
        for guild_id in guild_ids:
            await conn.send(0, self._guild(guild_id), "GUILD_CREATE")

    async def _resume(self, conn: _GatewayConnection, data: JSON) -> None:
        session_id = data.get("session_id")
        if data.get("token") != self.token or session_id not in self._sessions:
            await conn.send(9, False)
            return
        self.resume_count += 1
        conn.session_id = session_id
        conn.intents = self.intents or 0
        sequence, conn.shard = self._sessions.pop(session_id)
        conn.sequence = max(sequence, int(data.get("seq") or 0))
        await conn.send(0, {"_trace": ["emulator"]}, "RESUMED")

    async def _send_member_chunk(self, conn: _GatewayConnection, data: JSON) -> None:
        guild = self.guilds.get(int(data.get("guild_id") or self.guild_id))
        if guild is None:
            return
        members = [self._member(self.users[u], guild_id=guild.id) for u in guild.member_ids]
        wanted = {int(u) for u in data.get("user_ids") or []}
        if wanted:
            members = [m for m in members if int(m["user"]["id"]) in wanted]
        chunk = {
            "guild_id": str(guild.id),
            "members": members,
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
            "nonce": data.get("nonce"),
        }
        await conn.send(0, chunk, "GUILD_MEMBERS_CHUNK")


@contextlib.contextmanager
def point_discord_at(emulator: DiscordEmulator) -> Iterator[None]:
    """Redirect discord.py's REST base, default gateway and CDN base to ``emulator``, restoring them after.

    discord.py builds every REST URL (including interaction callbacks and webhooks) from
    ``discord.http.Route.BASE`` when a request is made, and a plain ``Client``/``commands.Bot`` connects
    straight to ``DiscordWebSocket.DEFAULT_GATEWAY`` (adding ``?v=10&encoding=json&compress=...``)
    without asking ``GET /gateway``; reconnects go to READY's ``resume_gateway_url``.
    """
    import discord.asset
    import discord.gateway
    import discord.http
    import yarl

    saved = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY, discord.asset.Asset.BASE)
    discord.http.Route.BASE = emulator.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(emulator.gateway_url)
    discord.asset.Asset.BASE = emulator.cdn_base
    try:
        yield
    finally:
        (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY, discord.asset.Asset.BASE) = saved


ClientT = TypeVar("ClientT", bound="discord.Client")


@contextlib.asynccontextmanager
async def running_bot(
    bot: ClientT, emulator: DiscordEmulator, *, ready_timeout: float = 15.0
) -> AsyncIterator[ClientT]:
    """Log ``bot`` in to ``emulator``, connect it, wait for ``on_ready``, and close it on exit.

    Pass ``guild_ready_timeout=0.1`` (or similar) to the bot's constructor: discord.py waits that long
    after the last GUILD_CREATE before firing ``on_ready`` (2 s by default).
    """
    with point_discord_at(emulator):
        await bot.login(emulator.token)
        connection = asyncio.create_task(bot.connect(reconnect=True))
        try:
            ready = asyncio.create_task(bot.wait_until_ready())
            done, _ = await asyncio.wait(
                {connection, ready}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if ready not in done:
                ready.cancel()
                if connection in done:
                    connection.result()
                raise TimeoutError(f"the bot did not become ready within {ready_timeout} s")
            yield bot
        finally:
            await bot.close()
            with contextlib.suppress(asyncio.CancelledError):
                await connection
