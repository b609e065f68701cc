"""The engine heals itself: the real `llava-bot run`, its real batching worker killed or stopped mid-answer."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bot.chat.streaming import FAILURE_LINE
from bot.engine.batching import GONE
from bot.engine.supervisor import INTERRUPTED, STALLED
from tests.e2e.bot_process import BotProcess
from tests.e2e.discord_emulator import JSON, DiscordEmulator
from tests.e2e.helpers import MARKER, png, reply_content, text_of, wait_answer
from tests.e2e.test_commands import command, said, status_lines

pytestmark = pytest.mark.asyncio(loop_scope="session")

STALL_TIMEOUT = 3


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def running(
    tiny_llava: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[BotProcess, DiscordEmulator]]:
    """One bot process for the module: answers long enough to strike while they stream (seconds, while the
    test strikes within milliseconds of seeing text) yet short enough to wait for, a short watchdog."""
    config = {"model": {"engine": "genai-batching", "max_new_tokens": 400, "stall_timeout": STALL_TIMEOUT}}
    async with (
        DiscordEmulator() as emulator,
        BotProcess(emulator, tiny_llava[1], tmp_path_factory.mktemp("supervised"), config) as bot,
    ):
        yield bot, emulator


async def streaming(emulator: DiscordEmulator, asked: JSON) -> None:
    """Wait until the reply to ``asked`` shows some of its answer and is still being written."""

    def shows_text() -> bool | None:
        content = reply_content(emulator, asked)
        return (MARKER in content and len(content) > 40) or None

    await emulator.wait_for(shows_text, 120)


def the_worker(bot: BotProcess) -> int:
    workers = bot.worker_pids()
    assert len(workers) == 1, workers
    return workers[0]


async def ask(emulator: DiscordEmulator, channel_id: int, question: str, seed: int) -> JSON:
    return await emulator.user_message(
        channel_id, emulator.user, question, attachments=[("p.png", png(seed=seed), "image/png")]
    )


async def answered(emulator: DiscordEmulator, asked: JSON) -> str:
    """The complete answer to ``asked``, checked to be an answer and not a failure sentence."""
    text = text_of(await wait_answer(emulator, asked, within=180))
    assert text.strip() and "⚠️" not in text, text
    return text


async def test_a_killed_worker_ends_the_answer_with_a_sentence_and_the_next_question_is_answered(
    running: tuple[BotProcess, DiscordEmulator],
) -> None:
    bot, emulator = running
    asked = await ask(emulator, emulator.channel_id, "Describe this picture.", seed=1)
    await streaming(emulator, asked)
    worker = the_worker(bot)
    os.kill(worker, signal.SIGKILL)  # what the OOM killer does

    interrupted = text_of(await wait_answer(emulator, asked, within=120))
    endings = {FAILURE_LINE.format(sentence=sentence) for sentence in (GONE, INTERRUPTED)}
    assert any(interrupted.endswith(ending) for ending in endings), interrupted[-200:]
    assert len(interrupted) > 40 + len(GONE), "the text written before the failure stays"

    # The same person asks again at once (their turn was released) and is answered after the restart.
    follow_up = await ask(emulator, emulator.channel_id, "And what is in this one?", seed=2)
    await answered(emulator, follow_up)
    assert worker not in bot.worker_pids() and len(bot.worker_pids()) == 1
    errors = [line for line in bot.log().splitlines() if " ERROR " in line]
    assert any(f"worker process {worker} was ended by SIGKILL" in line for line in errors), bot.log()[-3000:]


async def test_a_stopped_worker_is_caught_by_the_watchdog_killed_and_restarted(
    running: tuple[BotProcess, DiscordEmulator],
) -> None:
    bot, emulator = running
    before = status_lines(said(await command(emulator, "status", user=emulator.user)))
    asked = await ask(emulator, emulator.second_channel_id, "What do you see?", seed=3)
    await streaming(emulator, asked)
    worker = the_worker(bot)
    os.kill(worker, signal.SIGSTOP)  # a hung step: alive, but no token ever comes

    stalled = text_of(await wait_answer(emulator, asked, within=120))
    assert stalled.endswith(FAILURE_LINE.format(sentence=STALLED)), stalled[-200:]
    # The watchdog killed the stopped worker (a stopped process would otherwise stay for ever).
    await emulator.wait_for(lambda: not Path(f"/proc/{worker}").exists() or None, 60)

    follow_up = await ask(emulator, emulator.second_channel_id, "Tell me more.", seed=4)
    await answered(emulator, follow_up)
    assert len(bot.worker_pids()) == 1 and worker not in bot.worker_pids()

    after = status_lines(said(await command(emulator, "status", user=emulator.user)))
    assert int(after["Restarts"]) == int(before["Restarts"]) + 1
    assert re.fullmatch(r"up since <t:\d+:f>", after["Health"]), after["Health"]
    assert re.fullmatch(rf"<t:\d+:f>: an answer made no progress for {STALL_TIMEOUT} s", after["Last failure"])
