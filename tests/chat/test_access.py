"""Allow and deny lists of servers, channels, roles and users."""

from __future__ import annotations

from bot.chat.access import AccessRules, Place

GUILD, OTHER_GUILD = 1, 2
CHANNEL, THREAD, OTHER_CHANNEL = 10, 11, 12
MEMBER_ROLE, MUTED_ROLE = 20, 21
ADA, BOB = 30, 31


def in_channel(user: int = ADA, *, roles: tuple[int, ...] = (MEMBER_ROLE,), guild: int = GUILD) -> Place:
    return Place(user_id=user, guild_id=guild, channel_ids=(CHANNEL,), role_ids=roles)


def in_thread(user: int = ADA) -> Place:
    return Place(user_id=user, guild_id=GUILD, channel_ids=(THREAD, CHANNEL), role_ids=(MEMBER_ROLE,))


def in_dm(user: int = ADA) -> Place:
    return Place(user_id=user, channel_ids=(99,))


def test_empty_lists_admit_everyone() -> None:
    rules = AccessRules()
    assert rules.admits(in_channel()) and rules.admits(in_thread()) and rules.admits(in_dm())


def test_an_allow_list_admits_only_what_it_names() -> None:
    rules = AccessRules(allowed_channel_ids=[CHANNEL])

    assert rules.admits(in_channel())
    assert rules.admits(in_thread()), "a thread counts as its parent channel"
    assert not rules.admits(Place(user_id=ADA, guild_id=GUILD, channel_ids=(OTHER_CHANNEL,)))
    assert rules.refuses(Place(user_id=ADA, guild_id=GUILD, channel_ids=(OTHER_CHANNEL,))) == (
        "none of [12] is in discord.allowed_channel_ids"
    )


def test_deny_wins_over_allow() -> None:
    rules = AccessRules(allowed_user_ids=[ADA, BOB], denied_user_ids=[BOB], denied_role_ids=[MUTED_ROLE])

    assert rules.admits(in_channel(ADA))
    assert rules.refuses(in_channel(BOB)) == f"{BOB} is in discord.denied_user_ids"
    assert rules.refuses(in_channel(ADA, roles=(MEMBER_ROLE, MUTED_ROLE))) == "21 is in discord.denied_role_ids"


def test_a_denied_parent_channel_denies_its_threads() -> None:
    rules = AccessRules(denied_channel_ids=[CHANNEL])
    assert not rules.admits(in_thread())
    only_thread = AccessRules(allowed_channel_ids=[THREAD])
    assert only_thread.admits(in_thread()) and not only_thread.admits(in_channel())


def test_servers_and_roles() -> None:
    rules = AccessRules(allowed_guild_ids=[GUILD], allowed_role_ids=[MEMBER_ROLE])

    assert rules.admits(in_channel())
    assert not rules.admits(in_channel(guild=OTHER_GUILD))
    assert not rules.admits(in_channel(roles=()))
    assert not AccessRules(denied_guild_ids=[GUILD]).admits(in_channel())


def test_direct_messages_only_follow_the_user_lists() -> None:
    server_rules = AccessRules(allowed_guild_ids=[GUILD], allowed_channel_ids=[CHANNEL], allowed_role_ids=[1])
    assert server_rules.admits(in_dm())
    assert not AccessRules(denied_user_ids=[ADA]).admits(in_dm())
    assert not AccessRules(allowed_user_ids=[BOB]).admits(in_dm())
