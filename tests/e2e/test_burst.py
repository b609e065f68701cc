"""A busy server: 200 mentions with images from 50 people in 8 channels within 10 seconds.

Every mention must get exactly one reply, and every reply must end (no marker, no place in line left
behind). Everyone gets an answer from the model; the questions a person sends while one of theirs is still
running get the one-question-at-a-time sentence. The figures (event-loop lag, peak memory, time until the
last answer) are printed for the README's Reliability section: `pytest tests/e2e/test_burst.py -s`.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from bot.chat.scheduler import ALREADY_ASKING
from tests.e2e.bot_process import BotProcess
from tests.e2e.discord_emulator import JSON, DiscordEmulator
from tests.e2e.helpers import MARKER, WAITING, png

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

PEOPLE = 50
CHANNELS = 8
ROUNDS = 4  # questions per person


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM) so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


async def test_a_burst_of_mentions_is_answered_once_each(
    tiny_llava: tuple[Path, Path], tmp_path: Path, emulator: DiscordEmulator
) -> None:
    channels = [emulator.channel_id, emulator.second_channel_id]
    channels += [emulator.add_text_channel(f"burst-{i}") for i in range(CHANNELS - len(channels))]
    people = [emulator.add_user(f"person{i}") for i in range(PEOPLE)]
    config: dict[str, dict[str, object]] = {
        "model": {"engine": "genai-batching", "max_new_tokens": 8},
        "chat": {"max_queue": PEOPLE * ROUNDS},
    }
    loop = asyncio.get_running_loop()
    async with BotProcess(emulator, tiny_llava[1], tmp_path, config) as bot:
        started = loop.time()
        asked: list[JSON] = []
        for round_ in range(ROUNDS):
            for index, person in enumerate(people):
                # Every upload is a different picture, so no answer can come from a cache of another's.
                image = png(seed=index % 5, size=(96 + index, 72 + round_))
                channel = channels[(index + round_) % CHANNELS]
                upload = (f"photo-{index}-{round_}.png", image, "image/png")
                asked.append(await emulator.user_message(channel, person, "What is this?", attachments=[upload]))
        burst = loop.time() - started
        ids = {int(message["id"]) for message in asked}

        def settled() -> bool | None:
            replies: dict[int, int] = {}
            for message in emulator.bot_messages(include_deleted=True):
                if message.reference_id in ids:
                    if MARKER in message.content or message.content.startswith(WAITING):
                        return None
                    replies[message.reference_id] = replies.get(message.reference_id, 0) + 1
            return len(replies) == len(ids) or None

        await emulator.wait_for(settled, 900)
        answered_after = loop.time() - started
        await emulator.wait_quiet(1.0, 60)
        memory = peak_rss_mib(bot.pid) + sum(peak_rss_mib(pid) for pid in bot.worker_pids())
        code = await bot.stop()

    assert burst <= 10, f"the burst took {burst:.1f} s to send"
    assert code == 0, bot.log()
    replies = [m for m in emulator.bot_messages(include_deleted=True) if m.reference_id in ids]
    per_question = {i: [m for m in replies if m.reference_id == i] for i in ids}
    assert all(len(r) == 1 for r in per_question.values()), "a mention was answered twice or not at all"
    assert not any(m.deleted for m in replies)
    busy = [i for i, (reply,) in per_question.items() if reply.content == ALREADY_ASKING]
    modelled = [i for i, (reply,) in per_question.items() if reply.content != ALREADY_ASKING]
    # Questions reach the queue once their image is in, so a person's later message may overtake an
    # earlier one; what must hold is that everyone gets an answer from the model.
    author_of = {int(message["id"]): int(message["author"]["id"]) for message in asked}
    answered_people = {author_of[i] for i in modelled}
    assert answered_people == {person.id for person in people}, "someone got no answer from the model"
    assert all(per_question[i][0].content.strip() for i in modelled)
    assert "Traceback" not in bot.log()
    lag = re.search(r"Event loop lag over this run: (.*)", bot.log())
    assert lag, "the bot logs its event-loop lag at shutdown"
    print(
        f"\nburst: {len(asked)} mentions from {PEOPLE} people in {CHANNELS} channels sent in {burst:.1f} s; "
        f"all answered once after {answered_after:.1f} s ({len(modelled)} by the model, {len(busy)} asked to wait "
        f"for their previous answer); event-loop lag {lag.group(1)}; peak memory {memory:.0f} MiB (bot + worker)"
    )
