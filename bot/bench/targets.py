"""The project's performance goals, each a ratio of two measured numbers."""

from __future__ import annotations

import logging

from bot.bench.schema import BenchResults, EngineResult, Target

log = logging.getLogger(__name__)

BASELINE_ENGINE = "optimum"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _value(result: EngineResult | None, name: str) -> float | None:
    return None if result is None else getattr(result, name)


def compute_targets(results: BenchResults) -> list[Target]:
    """Every goal, about the default engine at INT4 (what a new bot runs); unmeasured ones have no value."""
    engine = results.settings.default_engine
    precision = "INT4" if "INT4" in results.settings.precisions else results.settings.precisions[0]
    main = results.engine(engine, precision)
    base = results.engine(BASELINE_ENGINE, precision)
    targets = []
    if engine != BASELINE_ENGINE:
        targets.append(
            Target(
                name=f"Decode speed, {engine} vs {BASELINE_ENGINE} ({precision})",
                value=_ratio(_value(main, "decode_tokens_per_s"), _value(base, "decode_tokens_per_s")),
                goal=1.5,
                comparison=">=",
                unit="x",
                detail="tokens/s of the default engine over the Optimum Intel reference",
            )
        )
    targets.append(
        Target(
            name=f"Follow-up first token / new-image first token ({engine}, {precision})",
            value=_ratio(_value(main, "ttft_follow_up_s"), _value(main, "ttft_new_image_s")),
            goal=0.25,
            comparison="<=",
            unit="x",
            detail="a second question about the same image should not pay for the image again",
        )
    )
    concurrency = next((c for c in results.concurrency if c.engine == engine and c.precision == precision), None)
    points = {p.channels: p for p in concurrency.points} if concurrency else {}
    ratio = None
    if 4 in points and 1 in points:
        ratio = _ratio(points[4].aggregate_tokens_per_s, points[1].aggregate_tokens_per_s)
    targets.append(
        Target(
            name=f"4-channel vs 1-channel aggregate tokens/s ({engine}, {precision})",
            value=ratio,
            goal=2.5,
            comparison=">=",
            unit="x",
            detail="all tokens of all conversations over the time from the common start to the last token",
        )
    )
    targets.append(
        Target(
            name=f"Decode vs memory-bandwidth bound ({engine}, {precision})",
            value=main.bandwidth_fraction if main else None,
            goal=0.5,
            comparison=">=",
            unit="%",
            detail="language-model weight bytes / single-thread bandwidth = seconds per token",
        )
    )
    targets.append(
        Target(
            name=f"Cold start / warm start ({engine}, {precision})",
            value=_ratio(_value(main, "load_cold_s"), _value(main, "load_warm_s")),
            goal=2.0,
            comparison=">=",
            unit="x",
            detail="engine load with an empty vs a filled CACHE_DIR",
        )
    )
    bot = results.bot
    targets.append(
        Target(
            name="Bot decode speed / raw engine decode speed",
            value=bot.overhead_ratio,
            goal=0.97,
            comparison=">=",
            unit="x",
            detail="engine tokens/s inside the running bot over the same engine alone",
        )
    )
    targets.append(
        Target(
            name="Bot event-loop lag p99 while generating",
            value=bot.loop_lag_p99_ms,
            goal=20.0,
            comparison="<=",
            unit="ms",
            detail="how late the bot's event loop runs a 5 ms timer during an answer",
        )
    )
    return targets
