"""Measure one engine on one precision folder, in a process of its own.

Run as ``python -m benchmarks.worker --engine genai --folder models/x/INT4 --cache-dir DIR [--measure]``.
Load time and peak memory are properties of a whole process, so the benchmark starts this module afresh for
every sample of them: a compiled model, an allocator's high-water mark or a page cache of an earlier engine
would otherwise leak into the next number. The result is one JSON object, printed on stdout or written to
``--result``; progress goes to the log on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.workload import (
    FIRST_QUESTION,
    FOLLOW_UP_QUESTION,
    LoopLag,
    Timing,
    decode_union_rate,
    emit_result,
    exit_without_teardown,
    make_image,
    timed_generation,
)
from bot.engine.base import Engine, GenerationSettings, ImageRef, Turn
from bot.engine.ov_config import parse_pairs

log = logging.getLogger(__name__)

# Seeds of the pictures: each measured request gets one no earlier request used.
_WARM_UP_SEED = 10_000
_RUN_SEED = 20_000
_CONCURRENT_SEED = 30_000


def _self_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _proc_tree_rss(pid: int, page: int) -> int:
    """Resident bytes of ``pid`` and its descendants from /proc, without scanning every process."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * page
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):  # the process just exited
            continue
    return total


class PeakMemory:
    """Peak resident memory of this process and every process it started, in MiB.

    An engine may run its model in a child process, whose memory ``getrusage(RUSAGE_SELF)`` does not see; a
    thread therefore samples the resident size of the whole process tree. This process's own exact
    high-water mark is taken too, so a short spike between two samples still counts when it happens here.
    On Linux the tree is read straight from /proc (a handful of small reads, so sampling does not compete with
    the engine for the GIL); elsewhere psutil walks it.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self._pid = os.getpid()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._use_proc = Path(f"/proc/{self._pid}/task/{self._pid}/children").exists()
        self._interval = interval
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)
        self._thread.start()

    def _tree_bytes(self) -> int:
        if self._use_proc:
            return _proc_tree_rss(self._pid, self._page)
        import psutil

        total = 0
        root = psutil.Process(self._pid)
        for process in [root, *root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:  # a child that just exited
                continue
        return total

    def _sample(self) -> None:
        self._peak = max(self._peak, self._tree_bytes() / 2**20)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def peak_mb(self) -> float:
        """The highest total seen so far (sampling once more now)."""
        self._sample()
        return max(self._peak, _self_peak_mb())

    def stop(self) -> None:
        """End the sampling thread."""
        self._stop.set()
        self._thread.join()


def _import_engine_modules(kind: str) -> float:
    # Importing what the engine imports while loading before the clock starts keeps Python's import time (the
    # same cold or warm) out of the load time, which is about reading and compiling the model.
    from bot.engine.manager import engine_class

    started = time.monotonic()
    for name in engine_class(kind).imports_on_load:
        try:
            importlib.import_module(name)
        except ImportError:
            log.debug("could not import %s ahead of loading", name)
    return time.monotonic() - started


def _is_empty(folder: Path) -> bool:
    return not any(folder.glob("*"))


def _load(kind: str, folder: Path, device: str, ov_config: dict[str, str]) -> tuple[Engine, float]:
    from bot.engine.manager import load_engine

    started = time.monotonic()
    engine = load_engine(kind, folder, device, ov_config)
    return engine, time.monotonic() - started


def _timing_dict(timing: Timing) -> dict[str, Any]:
    return {
        "ttft_s": timing.ttft,
        "decode_tokens_per_s": timing.decode_tokens_per_second,
        "new_tokens": timing.new_tokens,
        "prompt_tokens": timing.prompt_tokens,
        "wall_s": timing.finished - timing.submitted,
    }


async def _single_runs(engine: Engine, runs: int, new_tokens: int, follow_up_tokens: int) -> dict[str, Any]:
    """New-image and follow-up latency and decode speed, ``runs`` times, after one unmeasured warm-up."""
    decode = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)
    follow = GenerationSettings(max_new_tokens=follow_up_tokens, ignore_eos=True)
    # The first request after loading pays one-off costs (allocations, kernel selection) that a running bot
    # pays once at start, not per question.
    await timed_generation(
        engine, [Turn("user", FIRST_QUESTION, (ImageRef.from_image(make_image(_WARM_UP_SEED)),))], follow
    )
    samples = []
    lag = LoopLag()
    async with lag.measuring():
        for run in range(runs):
            first = [Turn("user", FIRST_QUESTION, (ImageRef.from_image(make_image(_RUN_SEED + run)),))]
            answer = await timed_generation(engine, first, decode)
            # The follow-up is what the bot sends for a second question in the same channel: the whole
            # history, image included, with the answer as the model gave it.
            second = [*first, Turn("assistant", answer.text.strip()), Turn("user", FOLLOW_UP_QUESTION)]
            follow_up = await timed_generation(engine, second, follow)
            samples.append({"new_image": _timing_dict(answer), "follow_up": _timing_dict(follow_up)})
            log.info(
                "run %d: first token %.3f s (follow-up %.3f s), %.1f tokens/s",
                run + 1,
                answer.ttft or float("nan"),
                follow_up.ttft or float("nan"),
                answer.decode_tokens_per_second or float("nan"),
            )
    p50, p99 = lag.percentiles_ms()
    return {"runs": samples, "loop_lag_p50_ms": p50, "loop_lag_p99_ms": p99}


async def _concurrent_runs(engine: Engine, channels: Sequence[int], runs: int, new_tokens: int) -> list[dict[str, Any]]:
    """Several conversations, each with its own new image, started at the same moment."""
    settings = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)
    results = []
    seed = _CONCURRENT_SEED
    for count in channels:
        reps = []
        for _ in range(runs):
            conversations = [
                [Turn("user", FIRST_QUESTION, (ImageRef.from_image(make_image(seed + i)),))] for i in range(count)
            ]
            seed += count
            lag = LoopLag()
            async with lag.measuring():
                started = time.monotonic()
                timings = await asyncio.gather(*(timed_generation(engine, c, settings) for c in conversations))
                wall = max(t.finished for t in timings) - started
            tokens = sum(t.new_tokens for t in timings)
            p50, p99 = lag.percentiles_ms()
            reps.append(
                {
                    "wall_s": wall,
                    "tokens": tokens,
                    "aggregate_tokens_per_s": tokens / wall if wall > 0 else None,
                    "aggregate_decode_tokens_per_s": decode_union_rate(timings),
                    # Measured from the common start: waiting behind another channel counts, as it does in chat.
                    "ttft_s": [None if t.first_token is None else t.first_token - started for t in timings],
                    "loop_lag_p50_ms": p50,
                    "loop_lag_p99_ms": p99,
                }
            )
            log.info("%d channel(s): %d tokens in %.2f s", count, tokens, wall)
        results.append({"channels": count, "reps": reps})
    return results


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Load the engine, then (with ``--measure``) time generations; returns the JSON-ready result."""
    ov_config = parse_pairs(args.ov_config)
    ov_config["CACHE_DIR"] = str(args.cache_dir)
    result: dict[str, Any] = {
        "engine": args.engine,
        "folder": str(args.folder),
        "cache_was_empty": _is_empty(Path(args.cache_dir)),
    }
    result["import_s"] = _import_engine_modules(args.engine)
    memory = PeakMemory()
    try:
        engine, result["load_s"] = await asyncio.to_thread(
            _load, args.engine, Path(args.folder), args.device, ov_config
        )
        log.info("%s loaded %s in %.2f s", args.engine, args.folder, result["load_s"])
        result["peak_rss_after_load_mb"] = memory.peak_mb()
        try:
            if args.measure:
                result.update(await _single_runs(engine, args.runs, args.new_tokens, args.follow_up_tokens))
                # Recorded before the concurrent requests, whose extra KV caches would raise it.
                result["peak_rss_mb"] = memory.peak_mb()
                if args.channels:
                    result["concurrency"] = await _concurrent_runs(
                        engine, args.channels, args.concurrency_runs, args.concurrency_tokens
                    )
                    result["peak_rss_concurrent_mb"] = memory.peak_mb()
            else:
                result["peak_rss_mb"] = memory.peak_mb()
        finally:
            await asyncio.to_thread(engine.close)
    finally:
        memory.stop()
    return result


def build_parser() -> argparse.ArgumentParser:
    """The worker's arguments (the benchmark runner builds them; they are usable by hand too)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, help="engine kind known to load_engine (genai, optimum, ...)")
    parser.add_argument("--folder", required=True, help="one precision folder, e.g. models/x/INT4")
    parser.add_argument("--cache-dir", required=True, help="OpenVINO compiled-model cache (CACHE_DIR)")
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--ov-config", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--measure", action="store_true", help="time generations after loading")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--follow-up-tokens", type=int, default=8)
    parser.add_argument("--channels", type=int, nargs="*", default=[], help="concurrent conversations to time")
    parser.add_argument("--concurrency-runs", type=int, default=1)
    parser.add_argument("--concurrency-tokens", type=int, default=64)
    parser.add_argument("--result", help="write the JSON here instead of printing it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.worker``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LLAVA_BOT_BENCH_LOG", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    result = asyncio.run(measure(args))
    emit_result(result, args.result)
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
