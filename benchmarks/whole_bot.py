"""The whole bot under measurement: a mention with a picture in, streamed message edits out.

Run as ``python -m benchmarks.whole_bot --model-dir DIR --engine genai --precision INT4``. The real
:class:`bot.client.LlavaBot` connects to the loopback Discord emulator of the test-suite
(``tests/e2e/discord_emulator.py``, so a source checkout is needed) and answers questions the way it would
on Discord; the numbers are what a person in the channel would see, plus what the bot costs the engine:

* mention -> first visible text: the first message write that shows part of the answer (not a placeholder);
* mention -> final edit: the last write of the answer;
* the engine's decode tokens/s inside the bot (the runner divides it by the engine's speed alone);
* lateness of the bot's event loop while it answers.

With ``--base-url`` and ``--remote-model`` the bot answers through an OpenAI-compatible server
(``model.engine = "openai"``) instead of an engine in its own process. ``--ready-file`` and ``--go-file`` let
several such processes ask at the same moment: each one touches its ready file after the warm-up and waits for
the go file before its measured questions.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.workload import (
    FIRST_QUESTION,
    LoopLag,
    emit_result,
    exit_without_teardown,
    make_image,
    median,
    percentile,
)
from bot.engine.ov_config import parse_pairs

log = logging.getLogger(__name__)

# The emulator lives with the tests, beside this package in the source checkout.
_ROOT = Path(__file__).resolve().parents[1]
_EMULATOR = _ROOT / "tests" / "e2e" / "discord_emulator.py"
_WARM_UP_SEED = 40_000
_RUN_SEED = 50_000
# Generous: a large model on a slow machine takes minutes for one answer.
_ANSWER_TIMEOUT_S = 900.0


def bot_unavailable_reason() -> str | None:
    """Why the bot cannot be measured here, or None when it can."""
    if not _EMULATOR.exists():
        return f"the loopback Discord emulator ({_EMULATOR.relative_to(_ROOT)}) is only in a source checkout"
    return None


def _emulator_module() -> Any:
    import tests.e2e.discord_emulator as emulator

    return emulator


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    make_image(seed).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _is_visible_answer(content: str) -> bool:
    """True when a message write shows answer text rather than a placeholder or a queue position."""
    from bot.chat.service import THINKING, WAITING
    from bot.chat.streaming import BLANK_STATUS, DEFAULT_MARKER

    text = content.removesuffix(DEFAULT_MARKER).strip()
    waiting_prefix = WAITING.split("{", 1)[0]
    return bool(text) and text not in {THINKING, BLANK_STATUS} and not text.startswith(waiting_prefix)


def _content(request: Any) -> str:
    body = request.json if isinstance(request.json, dict) else {}
    return str(body.get("content") or "")


async def bench_bot(
    model_dir: Path,
    *,
    engine: str,
    precision: str,
    runs: int,
    new_tokens: int,
    cache_dir: Path,
    device: str = "CPU",
    ov_config: dict[str, str] | None = None,
    base_url: str | None = None,
    remote_model: str | None = None,
    barrier: tuple[Path, Path] | None = None,
) -> dict[str, Any]:
    """Ask the running bot ``runs`` questions, each with a new picture, after one unmeasured warm-up.

    Returns the fields of :class:`benchmarks.schema.BotResult` (the raw engine speed and the ratio to it are
    filled in by the runner, which measured the engine alone). With ``base_url`` the bot uses the remote engine;
    with ``barrier`` (ready file, go file) it waits between the warm-up and the measured questions.
    """
    from bot.client import LlavaBot
    from bot.config import DiscordConfig, parse_config
    from bot.services import build_services

    emulated = _emulator_module()
    remote: dict[str, Any] = {}
    if base_url:
        # The folder still lends the tokenizer; the answers come from the server.
        remote = {
            "base_url": base_url,
            "remote_model": remote_model or "",
            "request_timeout": _ANSWER_TIMEOUT_S,
        }
    with tempfile.TemporaryDirectory(prefix="llava-bench-bot-") as scratch:
        config = parse_config(
            {
                # The default edit pace: the visible latency depends on it, as it does on Discord.
                "discord": {"token": "emulated", "edit_interval": DiscordConfig().edit_interval},
                "model": {
                    "dir": str(model_dir),
                    "precision": precision,
                    "engine": "openai" if base_url else engine,
                    "device": device,
                    "max_new_tokens": new_tokens,
                    "ov_config": {**(ov_config or {}), "CACHE_DIR": str(cache_dir)},
                    **remote,
                },
                "database": {"url": f"sqlite+aiosqlite:///{Path(scratch) / 'bench.sqlite3'}"},
            }
        )
        services = await build_services(config)
        try:
            async with (
                emulated.DiscordEmulator() as emulator,
                emulated.running_bot(
                    LlavaBot(config, services, guild_ready_timeout=0.05), emulator, ready_timeout=_ANSWER_TIMEOUT_S
                ) as bot,
            ):
                return await _ask(bot, emulator, runs, barrier)
        finally:
            await services.close()


async def _wait_for_go(barrier: tuple[Path, Path]) -> None:
    ready, go = barrier
    ready.touch()
    deadline = time.monotonic() + _ANSWER_TIMEOUT_S
    while not go.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no start signal ({go}) within {_ANSWER_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.02)


async def _ask(bot: Any, emulator: Any, runs: int, barrier: tuple[Path, Path] | None = None) -> dict[str, Any]:
    streams: list[Any] = []
    answered: list[float] = []
    generate, answer = bot.model_manager.generate, bot.chat.answer

    # Wrapped on the instances: the bot runs unchanged, the benchmark sees each engine stream and each answer's end.
    def recording_generate(conversation: Any, settings: Any) -> Any:
        stream = generate(conversation, settings)
        streams.append(stream)
        return stream

    async def recording_answer(question: Any, streamer: Any) -> Any:
        try:
            return await answer(question, streamer)
        finally:
            answered.append(time.monotonic())

    bot.model_manager.generate = recording_generate
    bot.chat.answer = recording_answer
    channel = emulator.channel_id
    samples: dict[str, list[Any]] = {
        "mention_to_first_text_s": [],
        "mention_to_final_edit_s": [],
        "bot_tokens_per_s": [],
        "edits": [],
        "new_tokens": [],
        # [first token, last token, tokens] of each answer on the machine-wide monotonic clock, so the runner can
        # merge the answers of several processes into one aggregate rate.
        "decode_spans": [],
    }
    lags: list[float] = []
    for run in range(-1, runs):
        if run == 0 and barrier is not None:
            await _wait_for_go(barrier)
        # Each question starts a fresh conversation, like the raw engine's new-image measurement.
        await bot.chat.reset(channel)
        image = _jpeg(_WARM_UP_SEED if run < 0 else _RUN_SEED + run)
        seen_requests, seen_answers = len(emulator.requests), len(answered)
        lag = LoopLag()
        async with lag.measuring():
            mentioned = time.monotonic()
            await emulator.user_message(
                channel, emulator.user, FIRST_QUESTION, attachments=[("photo.jpg", image, "image/jpeg")]
            )
            await emulator.wait_for(lambda n=seen_answers: len(answered) > n, timeout=_ANSWER_TIMEOUT_S)
        prefix = f"/channels/{channel}/messages"
        writes = [
            r
            for r in emulator.requests[seen_requests:]
            if r.method in {"POST", "PATCH"} and r.path.startswith(prefix) and r.status < 300
        ]
        visible = [r for r in writes if _is_visible_answer(_content(r))]
        if run < 0:
            continue
        if not visible or not streams:
            raise RuntimeError("the bot answered without showing any answer text")
        stats = streams[-1].stats
        samples["mention_to_first_text_s"].append(visible[0].at - mentioned)
        samples["mention_to_final_edit_s"].append(writes[-1].at - mentioned)
        samples["bot_tokens_per_s"].append(stats.decode_tokens_per_second)
        samples["edits"].append(sum(1 for r in writes if r.method == "PATCH"))
        samples["new_tokens"].append(stats.new_tokens)
        samples["decode_spans"].append([stats.first_token, stats.finished, stats.new_tokens])
        lags.extend(lag.samples)
        log.info(
            "run %d: first text after %.2f s, final edit after %.2f s",
            run + 1,
            samples["mention_to_first_text_s"][-1],
            samples["mention_to_final_edit_s"][-1],
        )
    return {
        "status": "measured",
        "mention_to_first_text_s": median(samples["mention_to_first_text_s"]),
        "mention_to_final_edit_s": median(samples["mention_to_final_edit_s"]),
        "bot_tokens_per_s": median(samples["bot_tokens_per_s"]),
        "loop_lag_p50_ms": percentile(lags, 50, scale=1000.0),
        "loop_lag_p99_ms": percentile(lags, 99, scale=1000.0),
        "edits_per_answer": median(samples["edits"]),
        "samples": samples,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.whole_bot``; writes the result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.whole_bot", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="folder holding the precision folders")
    parser.add_argument("--engine", default="genai")
    parser.add_argument("--precision", default="INT4")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--ov-config", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--base-url", help="answer through this OpenAI-compatible server (engine openai)")
    parser.add_argument("--remote-model", help="the model name the server knows")
    parser.add_argument("--ready-file", help="touched after the warm-up question")
    parser.add_argument("--go-file", help="the measured questions start once this file exists")
    parser.add_argument("--result", help="write the JSON here instead of printing it")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LLAVA_BOT_BENCH_LOG", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    reason = bot_unavailable_reason()
    if reason is not None:
        result: dict[str, Any] = {"status": "unavailable", "reason": reason}
    else:
        ov_config = parse_pairs(args.ov_config)
        result = asyncio.run(
            bench_bot(
                Path(args.model_dir),
                engine=args.engine,
                precision=args.precision,
                runs=args.runs,
                new_tokens=args.new_tokens,
                cache_dir=Path(args.cache_dir),
                device=args.device,
                ov_config=ov_config,
                base_url=args.base_url,
                remote_model=args.remote_model,
                barrier=(Path(args.ready_file), Path(args.go_file)) if args.ready_file and args.go_file else None,
            )
        )
        result.update(engine="openai" if args.base_url else args.engine, precision=args.precision)
    emit_result(result, args.result)
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
