"""The emulator shards like Discord: real discord.py AutoShardedClients see only their shards' guilds and events."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import discord
import pytest
import pytest_asyncio
from discord import app_commands

from tests.e2e.discord_emulator import DiscordEmulator, running_bot, shard_of

pytestmark = pytest.mark.asyncio(loop_scope="session")


class ShardClient(discord.AutoShardedClient):
    """A sharded client that records which guilds and events reached it."""

    def __init__(self, shard_count: int | None, shard_ids: list[int] | None) -> None:
        # None for either is discord.py's default: ask GET /gateway/bot, run every shard.
        options: dict[str, Any] = {"shard_count": shard_count, "shard_ids": shard_ids}
        super().__init__(intents=discord.Intents.default(), guild_ready_timeout=0.05, **options)
        self.tree = app_commands.CommandTree(self)
        self.seen: list[tuple[int | None, int | None, str]] = []  # (guild, shard, content)
        self.interacted: list[int | None] = []

        @self.tree.command(description="Say where you are")
        async def where(interaction: discord.Interaction) -> None:
            self.interacted.append(interaction.guild_id)
            await interaction.response.send_message(f"shard {self.shard_ids}")

    async def setup_hook(self) -> None:
        await self.tree.sync()

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """No pause between this client's shards: the emulator has no IDENTIFY rate limit."""

    async def on_message(self, message: discord.Message) -> None:
        """Note every message that reached this client, with the shard it came through."""
        guild = message.guild.id if message.guild else None
        self.seen.append((guild, message.guild.shard_id if message.guild else None, message.content))


@pytest_asyncio.fixture
async def world(emulator: DiscordEmulator) -> AsyncIterator[DiscordEmulator]:
    """The emulator with two more guilds: one on each shard of two, besides the main guild."""
    for shard in (0, 1):
        emulator.add_guild(f"Shard {shard}", guild_id=emulator.snowflake_on_shard(shard, 2), members=[emulator.user])
    yield emulator


async def _mention_everywhere(emulator: DiscordEmulator) -> dict[int, str]:
    """A mention in each guild's first text channel; returns guild id -> content."""
    sent = {}
    for guild in emulator.guilds.values():
        content = f"hello guild {guild.id}"
        await emulator.user_message(guild.system_channel_id, emulator.user, content)
        sent[guild.id] = f"{emulator.bot_user.mention} {content}"
    return sent


async def test_each_shard_gets_only_its_guilds_and_their_events(world: DiscordEmulator) -> None:
    emulator = world
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(running_bot(ShardClient(2, [shard]), emulator)) for shard in (0, 1)]
        assert emulator.connected_shards == {(0, 2), (1, 2)}
        for shard, client in enumerate(clients):
            expected = set(emulator.shard_guilds(shard, 2))
            assert expected and {g.id for g in client.guilds} == expected
            assert all(shard_of(g, 2) == shard for g in expected)
        sent = await _mention_everywhere(emulator)
        await emulator.wait_for(lambda: sum(len(c.seen) for c in clients) == len(sent))
        for shard, client in enumerate(clients):
            assert sorted(client.seen) == sorted(
                (g, shard, content) for g, content in sent.items() if shard_of(g, 2) == shard
            )

        # A DM has no guild: Discord sends it to shard 0.
        await emulator.user_message(emulator.dm_channel(emulator.other_user), emulator.other_user, "psst")
        await emulator.wait_for(lambda: any(g is None for g, _, _ in clients[0].seen))
        assert all(g is not None for g, _, _ in clients[1].seen)

        # Interactions follow their guild too, and the answer is posted in that guild.
        on_one = emulator.shard_guilds(1, 2)[0]
        channel = emulator.guilds[on_one].system_channel_id
        interaction = await emulator.slash_command("where", user=emulator.user, channel_id=channel)
        response = await emulator.wait_for(lambda: emulator.interaction_responses(interaction).original)
        assert (clients[0].interacted, clients[1].interacted) == ([], [on_one])
        assert response.content == "shard [1]" and response.channel_id == channel


async def test_one_process_may_run_every_shard(world: DiscordEmulator) -> None:
    emulator = world
    async with running_bot(ShardClient(2, None), emulator) as client:
        assert emulator.connected_shards == {(0, 2), (1, 2)}
        assert {g.id for g in client.guilds} == set(emulator.guilds)
        sent = await _mention_everywhere(emulator)
        await emulator.wait_for(lambda: len(client.seen) == len(sent))
        assert sorted(client.seen) == sorted((g, shard_of(g, 2), c) for g, c in sent.items())


async def test_the_recommended_shard_count_comes_from_gateway_bot(world: DiscordEmulator) -> None:
    emulator = world
    async with running_bot(ShardClient(None, None), emulator) as client:
        assert emulator.requests_to("GET", "^/gateway/bot$")
        assert client.shard_count == 1 and emulator.connected_shards == {(0, 1)}
        assert {g.id for g in client.guilds} == set(emulator.guilds)


async def test_an_unsharded_client_still_gets_everything(world: DiscordEmulator) -> None:
    emulator = world
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.05)
    seen: list[int | None] = []

    @client.event
    async def on_message(message: discord.Message) -> None:
        seen.append(message.guild.id if message.guild else None)

    async with running_bot(client, emulator):
        assert emulator.connected_shards == {None}
        assert not emulator.requests_to("GET", "^/gateway")
        assert {g.id for g in client.guilds} == set(emulator.guilds)
        sent = await _mention_everywhere(emulator)
        await emulator.wait_for(lambda: len(seen) == len(sent))
        assert Counter(seen) == Counter(list(sent))


@pytest.mark.parametrize("shard", [[2, 2], [0, 0], [-1, 2], "0,2"])
async def test_an_invalid_shard_is_refused(emulator: DiscordEmulator, shard: object) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(emulator.gateway_url) as ws:
        hello = await ws.receive_json()
        assert hello["op"] == 10
        identify = {"token": emulator.token, "intents": 0, "properties": {}, "shard": shard}
        await ws.send_str(json.dumps({"op": 2, "d": identify}))
        closed = await asyncio.wait_for(ws.receive(), 10)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 4010
    assert emulator.identify_count == 0 and not emulator.connected
