"""The project's performance goals, each a ratio (or difference) of two measured numbers.

Some goals are about one of the two synthetic models: the engine comparison about the small BENCH model,
where per-token overhead shows, and the bandwidth and concurrency goals about the 7b-width model, where the
weights dominate every decode step as in the real LLaVA-7B. On the other model they are reported, not judged.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from benchmarks.pairing import Arm, PairedRatio, load_refusal
from benchmarks.report import BUSY_SHARE
from benchmarks.schema import BenchResults, EngineResult, Target

log = logging.getLogger(__name__)

BASELINE_ENGINE = "optimum"
# A language model this wide is taken as LLaVA-7B's widths (the 7b-width spec or a real 7B conversion).
WIDE_HIDDEN = 4096

_ON_WIDE = "judged on the 7b-width model (`--model-spec 7b-width`); reported here"
_ON_BENCH = "judged on the BENCH model; reported here"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _value(result: EngineResult | None, name: str) -> float | None:
    return None if result is None else getattr(result, name)


def _busy(result: EngineResult | None) -> str | None:
    share = None if result is None else result.foreign_cpu_share
    if share is not None and share > BUSY_SHARE:
        return f"other processes used {share * 100:.0f}% of the CPU while it was measured"
    return None


def find_ratio(results: BenchResults, numerator: Arm, denominator: Arm) -> PairedRatio | None:
    """The paired ratio between two arms, if the run made one."""
    return next(
        (
            r
            for r in results.paired_ratios
            if r.numerator == numerator.label and r.denominator == denominator.label and r.ratios
        ),
        None,
    )


def load_baseline(path: os.PathLike[str] | str | None) -> list[EngineResult] | None:
    """The engine rows of an earlier run's results.json (for the start-up and memory goals).

    None when no path is given or the file cannot be read (logged): those goals are then not measured.
    """
    if path is None:
        return None
    fields = EngineResult.__dataclass_fields__
    try:
        data = json.loads(Path(path).read_text())
        return [EngineResult(**{k: v for k, v in row.items() if k in fields}) for row in data["engines"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning("cannot read the baseline %s: %s", path, error)
        return None


def _start_to_first_token(result: EngineResult | None) -> float | None:
    parts = [_value(result, name) for name in ("import_s", "load_warm_s", "ttft_new_image_s")]
    if any(p is None for p in parts):
        return None
    return sum(p for p in parts if p is not None)


def _engine_targets(results: BenchResults, engine: str, precision: str, wide: bool) -> list[Target]:
    main = results.engine(engine, precision)
    targets = []
    if engine != BASELINE_ENGINE:
        ratio = find_ratio(results, Arm(engine, precision), Arm(BASELINE_ENGINE, precision))
        targets.append(
            Target(
                name=f"Decode speed, {engine} vs {BASELINE_ENGINE} ({precision}), paired runs",
                value=None if ratio is None else ratio.median,
                goal=1.5,
                comparison=">=",
                unit="x",
                detail="median over rounds of the ratio of neighbouring runs' tokens/s",
                spread=None if ratio is None else f"{ratio.spread} over {len(ratio.ratios)} pair(s)",
                refused=None if ratio is None else load_refusal(ratio),
                not_applicable=_ON_BENCH if wide else None,
            )
        )
    targets.append(
        Target(
            name=f"Decode vs aggregate memory-bandwidth bound ({engine}, {precision})",
            value=_value(main, "bandwidth_fraction"),
            goal=0.75,
            comparison=">=",
            unit="%",
            detail="language-model weight bytes / what all cores read together = seconds per token",
            refused=_busy(main),
            not_applicable=None if wide else _ON_WIDE,
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
            refused=_busy(main),
        )
    )
    concurrency = next((c for c in results.concurrency if c.engine == engine and c.precision == precision), None)
    points = {p.channels: p for p in concurrency.points} if concurrency else {}
    ratio_4 = None
    if 4 in points and 1 in points:
        ratio_4 = _ratio(points[4].aggregate_tokens_per_s, points[1].aggregate_tokens_per_s)
    targets.append(
        Target(
            name=f"4-channel vs 1-channel aggregate tokens/s ({engine}, {precision})",
            value=ratio_4,
            goal=2.5,
            comparison=">=",
            unit="x",
            detail="all tokens of all conversations over the time from the common start to the last token",
            refused=_busy(main),
            not_applicable=None if wide else _ON_WIDE,
        )
    )
    return targets


def _startup_targets(
    results: BenchResults, engine: str, precision: str, baseline: list[EngineResult] | None
) -> list[Target]:
    main = results.engine(engine, precision)
    before = next((r for r in baseline or [] if r.engine == engine and r.precision == precision), None)
    no_baseline = "needs --baseline (an earlier results.json) to compare with" if before is None else None
    now_start, before_start = _start_to_first_token(main), _start_to_first_token(before)
    now_rss, before_rss = _value(main, "peak_rss_mb"), _value(before, "peak_rss_mb")
    return [
        Target(
            name=f"Start-up to first token vs baseline ({engine}, {precision}, warm cache)",
            value=_ratio(now_start, before_start),
            goal=0.40,
            comparison="<=",
            unit="x",
            detail=f"engine imports + warm load + first token: now {now_start or 0:.2f} s",
            spread=no_baseline,
            refused=_busy(main),
        ),
        Target(
            name=f"Peak memory saved vs baseline ({engine}, {precision})",
            value=None if now_rss is None or before_rss is None else before_rss - now_rss,
            goal=300.0,
            comparison=">=",
            unit="MiB",
            detail=f"peak resident memory of the measuring process: now {now_rss or 0:.0f} MiB",
            spread=no_baseline,
        ),
    ]


def _bot_targets(results: BenchResults, engine: str, precision: str) -> list[Target]:
    bot = results.bot
    main = results.engine(engine, precision)
    first_text = bot.mention_to_first_text_s
    first_token = _value(main, "ttft_new_image_s")
    return [
        Target(
            name="Mention to first visible text, beyond the engine's first token",
            value=None if first_text is None or first_token is None else first_text - first_token,
            goal=0.2,
            comparison="<=",
            unit="s",
            detail="through the bot and the loopback Discord emulator, minus the engine's own first token",
        ),
        Target(
            name="Bot decode speed / raw engine decode speed",
            value=bot.overhead_ratio,
            goal=0.97,
            comparison=">=",
            unit="x",
            detail="engine tokens/s inside the running bot over the same engine alone",
        ),
        Target(
            name="Bot event-loop lag p99 while generating",
            value=bot.loop_lag_p99_ms,
            goal=20.0,
            comparison="<=",
            unit="ms",
            detail="how late the bot's event loop runs a 5 ms timer during an answer",
        ),
    ]


def compute_targets(results: BenchResults, baseline: list[EngineResult] | None = None) -> list[Target]:
    """Every goal, about the default engine at INT4 (what a new bot runs); unmeasured ones have no value."""
    engine = results.settings.default_engine
    precision = "INT4" if "INT4" in results.settings.precisions else results.settings.precisions[0]
    wide = (results.model.hidden_size or 0) >= WIDE_HIDDEN
    main = results.engine(engine, precision)
    targets = _engine_targets(results, engine, precision, wide)
    targets += _startup_targets(results, engine, precision, baseline)
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
    targets += _bot_targets(results, engine, precision)
    return targets
