"""``results.json``, ``results.md`` and ``results.png`` from one benchmark run."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.pairing import PairedRatio
from benchmarks.schema import Bandwidth, BenchResults, EngineResult, RemoteResult, Target

log = logging.getLogger(__name__)

MISSING = "–"


def _num(value: float | None, digits: int = 2) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _rate(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _compact(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _foreign(share: float | None, load: list[float] | None) -> str:
    parts = []
    if share is not None:
        parts.append(f"other processes used {share * 100:.0f}% of the CPU during the run")
        if share > 0.05:
            parts[-1] = f"**{parts[-1]}: numbers are lower than this machine can do**"
    if load:
        parts.append(f"load average at start {load[0]:.2f}")
    return "; ".join(parts) or MISSING


def _aggregate(bandwidth: Bandwidth | None) -> str:
    if bandwidth is None or bandwidth.aggregate_gb_per_s is None:
        return MISSING
    text = f"{bandwidth.aggregate_gb_per_s:.1f} GB/s, {bandwidth.readers} readers at once"
    if bandwidth.aggregate_gb_per_s < bandwidth.gb_per_s:
        text += " (below one thread's: a neighbour held a core, so the bound uses one thread's figure)"
    return text


def _target_value(target: Target) -> str:
    if target.value is None:
        return "not measured"
    if target.unit == "%":
        return f"{target.value * 100:.0f}%"
    if target.unit == "ms":
        return f"{target.value:.1f} ms"
    if target.unit in ("s", "MiB"):
        return f"{target.value:.2f} {target.unit}" if target.unit == "s" else f"{target.value:.0f} MiB"
    return f"{target.value:.2f}x"


def _target_goal(target: Target) -> str:
    if target.unit == "%":
        return f"{target.comparison} {target.goal * 100:.0f}%"
    if target.unit in ("ms", "s", "MiB"):
        return f"{target.comparison} {target.goal:g} {target.unit}"
    return f"{target.comparison} {target.goal:g}x"


def target_status(target: Target) -> str:
    """met / **not met** / not measured, with the reason when a measured value is not judged or refused."""
    if target.value is None:
        return "not measured"
    if target.not_applicable:
        return f"not measured ({target.not_applicable})"
    if target.met:
        return "met"
    if target.reached and target.refused:
        return f"**not met**: {target.refused}, so the run cannot show it"
    if target.refused:
        return f"**not met** ({target.refused})"
    return "**not met**"


def _paired_section(results: BenchResults) -> list[str]:
    if not results.paired:
        return []
    lines = [
        "",
        f"## Paired runs ({results.settings.pairs} round(s), engines and precisions alternated run by run)",
        "",
    ]
    arms = list(dict.fromkeys((r.engine, r.precision) for r in results.paired))
    rounds = sorted({r.round for r in results.paired})
    header = ["engine", "precision", *[f"round {i + 1} tok/s (other load)" for i in rounds]]
    rows = []
    for engine, precision in arms:
        cells = [engine, precision]
        for index in rounds:
            run = next(r for r in results.paired if (r.engine, r.precision, r.round) == (engine, precision, index))
            if run.error:
                cells.append("failed")
                continue
            load = MISSING if run.foreign_cpu_share is None else f"{run.foreign_cpu_share * 100:.0f}%"
            cells.append(f"{_rate(run.decode_tokens_per_s)} ({load})")
        rows.append(cells)
    lines += _table(header, rows)
    if results.paired_ratios:
        lines += [""]
        lines += _table(
            ["ratio (decode tok/s)", "median", "min-max over pairs", "largest load gap in a pair"],
            [
                [
                    f"{r.numerator} / {r.denominator}",
                    MISSING if r.median is None else f"{r.median:.2f}x",
                    r.spread,
                    (MISSING if r.load_gap is None else f"{r.load_gap * 100:.0f}%")
                    + ("" if r.load_ok else f" (over the {r.load_limit * 100:.0f}% limit: not judged)"),
                ]
                for r in results.paired_ratios
            ],
        )
    return lines


def _ratio_cells(ratio: PairedRatio | None) -> list[str]:
    if ratio is None or ratio.median is None:
        return [MISSING, MISSING]
    gap = MISSING if ratio.load_gap is None else f"{ratio.load_gap * 100:.0f}%"
    return [f"{ratio.median:.2f}x", f"{ratio.spread}; largest load gap {gap}"]


def _remote_section(remote: RemoteResult, quick: bool = False) -> list[str]:
    lines = ["", "## Going remote (the bot through `llava-bot serve` on loopback)", ""]
    if remote.status != "measured":
        return [*lines, f"Not measured ({remote.status})" + (f": {remote.reason}" if remote.reason else "")]
    lines += _table(
        ["bot", "mention -> first text (s)", "decode in bot (tok/s)"],
        [
            [
                f"in-process {remote.engine} {remote.precision}",
                _num(remote.in_process_first_text_s),
                _rate(remote.in_process_tokens_per_s),
            ],
            [
                f"openai -> llava-bot serve ({remote.engine})",
                _num(remote.remote_first_text_s),
                _rate(remote.remote_tokens_per_s),
            ],
            [
                "2 bot processes at once, same server (aggregate)",
                MISSING,
                _rate(remote.two_bots_tokens_per_s),
            ],
        ],
    )
    lines += [""]
    lines += _table(
        ["ratio, per round", "median", "min-max over rounds"],
        [
            ["mention -> first text, remote / in-process", *_ratio_cells(remote.first_text_ratio)],
            ["decode in bot, remote / in-process", *_ratio_cells(remote.decode_ratio)],
            ["aggregate decode, 2 bots / 1 bot (same server)", *_ratio_cells(remote.two_bots_ratio)],
        ],
    )
    failed = [f"round {r.round + 1} {r.engine}: {r.error}" for r in remote.runs if r.error]
    lines += [
        "",
        f"{remote.rounds} round(s), each a fresh bot process per arm (one warm-up question, one measured) in turn: "
        'the bot with the engine in its process, the bot with `model.engine = "openai"` against the server '
        "(same engine, same folder), and two such bots asking at the same moment. The server's CPU time counts "
        "as the benchmark's own in the load gap."
        + (" In quick mode the in-process arm is the bot row above, measured the same way." if quick else ""),
    ]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(failed)]
    return lines


# Rows measured while other processes took more than this share of the CPU are marked in the table, and
# cannot meet a goal.
BUSY_SHARE = 0.10
BUSY_MARK = "†"


def _engine_row(result: EngineResult) -> list[str]:
    busy = result.foreign_cpu_share is not None and result.foreign_cpu_share > BUSY_SHARE
    engine = f"{result.engine} {BUSY_MARK}" if busy else result.engine
    if result.error:
        return [engine, result.precision, f"failed: {result.error}", *([""] * 7)]
    bound = MISSING
    if result.bandwidth_fraction is not None and result.bandwidth_bound_tokens_per_s is not None:
        bound = f"{result.bandwidth_fraction * 100:.0f}% of {result.bandwidth_bound_tokens_per_s:.0f}"
    return [
        engine,
        result.precision,
        _num(result.load_cold_s),
        _num(result.load_warm_s),
        _num(result.ttft_new_image_s),
        _num(result.ttft_follow_up_s),
        _rate(result.decode_tokens_per_s),
        bound,
        _num(result.peak_rss_mb, 0),
        _num(result.loop_lag_p99_ms, 1),
    ]


def markdown(results: BenchResults) -> str:
    """The human-readable report: the run, one row per engine and precision, concurrency, the bot, targets."""
    machine, settings, model = results.machine, results.settings, results.model
    versions = ", ".join(f"{name} {version}" for name, version in machine.versions.items() if version)
    bandwidth = results.bandwidth
    lines = ["# python -m benchmarks", ""]
    lines += _table(
        ["run", ""],
        [
            ["date", results.date],
            ["CPU", machine.cpu_model],
            ["cores", f"{machine.logical_cpus} logical, {machine.usable_cpus} usable"],
            ["RAM", MISSING if machine.ram_gib is None else f"{machine.ram_gib:.1f} GiB"],
            ["system", f"{machine.system}, Python {machine.python}"],
            ["other load", _foreign(machine.foreign_cpu_share, machine.load_average)],
            ["software", versions],
            ["single-thread read bandwidth", MISSING if bandwidth is None else f"{bandwidth.gb_per_s:.1f} GB/s"],
            ["aggregate read bandwidth (the bound)", _aggregate(bandwidth)],
            ["model", f"{model.description} ({model.path})"],
            [
                "settings",
                f"median of {settings.runs} run(s); {settings.load_runs} cold + {settings.load_runs} warm start(s) "
                f"per row, each a fresh process; {settings.new_tokens} new tokens (EOS ignored), follow-ups "
                f"{settings.follow_up_tokens}; device {settings.device}; default engine {settings.default_engine}"
                + (" (quick mode)" if settings.quick else ""),
            ],
            ["wall time", _duration(results.wall_time_s)],
        ],
    )
    lines += ["", "## Engines", ""]
    lines += _table(
        [
            "engine",
            "precision",
            "load cold (s)",
            "load warm (s)",
            "1st token, new image (s)",
            "1st token, follow-up (s)",
            "decode (tok/s)",
            "of bandwidth bound (tok/s)",
            "peak RSS (MiB)",
            "event-loop lag p99 (ms)",
        ],
        [_engine_row(r) for r in results.engines],
    )
    busy = [r for r in results.engines if r.foreign_cpu_share is not None and r.foreign_cpu_share > BUSY_SHARE]
    if busy:
        shares = ", ".join(f"{r.engine} {r.precision} {(r.foreign_cpu_share or 0.0) * 100:.0f}%" for r in busy)
        lines += ["", f"{BUSY_MARK} Other processes were busy while this row was measured ({shares} of the CPU)."]
    first = next((r for r in results.engines if r.prompt_tokens_new_image), None)
    if first is not None:
        lines += [
            "",
            f"Prompts: {first.prompt_tokens_new_image} tokens for a new image, {first.prompt_tokens_follow_up} for "
            "the follow-up (image, first answer and second question). Load: a new process loading the engine "
            "with an empty (cold) or filled (warm) CACHE_DIR; the model files are in the OS page cache either way, "
            f"and Python imports are not counted (median {_num(first.import_s)} s). Event-loop lag: how late the "
            "measuring process's asyncio loop ran a 5 ms timer while the engine generated.",
        ]
    for concurrency in results.concurrency:
        lines += [
            "",
            f"## Concurrent conversations ({concurrency.engine}, {concurrency.precision}, "
            f"{concurrency.tokens_per_channel} tokens each, every one with a new image)",
            "",
        ]
        if concurrency.error:
            lines.append(f"Failed: {concurrency.error}")
            continue
        lines += _table(
            [
                "channels",
                "aggregate tok/s (end to end)",
                "aggregate decode tok/s",
                "1st token per channel (s)",
                "wall (s)",
            ],
            [
                [
                    str(p.channels),
                    _rate(p.aggregate_tokens_per_s),
                    _rate(p.aggregate_decode_tokens_per_s),
                    " / ".join(_num(t) for t in p.ttft_s),
                    _num(p.wall_s),
                ]
                for p in concurrency.points
            ],
        )
    lines += _paired_section(results)
    bot = results.bot
    lines += ["", "## Through the bot (loopback Discord emulator)", ""]
    if bot.status == "measured":
        lines += _table(
            [
                "engine",
                "mention -> first text (s)",
                "mention -> final edit (s)",
                "decode in bot (tok/s)",
                "engine alone (tok/s)",
                "edits per answer",
                "loop lag p50 / p99 (ms)",
            ],
            [
                [
                    f"{bot.engine} {bot.precision}",
                    _num(bot.mention_to_first_text_s),
                    _num(bot.mention_to_final_edit_s),
                    _rate(bot.bot_tokens_per_s),
                    _rate(bot.engine_tokens_per_s),
                    _num(bot.edits_per_answer, 0),
                    f"{_num(bot.loop_lag_p50_ms, 1)} / {_num(bot.loop_lag_p99_ms, 1)}",
                ]
            ],
        )
    else:
        lines.append(f"Not measured ({bot.status}): {bot.reason}")
    lines += _remote_section(results.remote, results.settings.quick)
    lines += ["", "## Targets", ""]
    lines += _table(
        ["target", "measured", "spread / note", "goal", "status"],
        [[t.name, _target_value(t), t.spread or "", _target_goal(t), target_status(t)] for t in results.targets],
    )
    return "\n".join(lines) + "\n"


def write_chart(results: BenchResults, path: Path) -> bool:
    """Draw the main numbers into a PNG; False (and a log line) when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning(
            "matplotlib is not installed, so there is no %s; install it with: pip install 'llava-bot[bench]'", path
        )
        return False
    import numpy as np

    measured = [r for r in results.engines if not r.error]
    # Long engine names wrap at their hyphen so that neighbouring labels do not run into each other.
    labels = [r.engine.replace("-", "-\n") + "\n" + r.precision for r in measured]
    value_size = "x-small" if len(measured) <= 6 else "xx-small"
    positions = np.arange(len(measured))
    figure = Figure(figsize=(15, 8.5), layout="constrained")
    axes = figure.subplots(2, 3)
    machine = results.machine
    figure.suptitle(
        f"python -m benchmarks, {results.date[:16].replace('T', ' ')} UTC: {machine.cpu_model}, "
        f"{machine.usable_cpus} cores, {results.model.description}",
        fontsize="medium",
    )

    def bars(ax: Any, fields: list[tuple[str, str]], title: str, unit: str) -> None:
        width = 0.8 / len(fields)
        for i, (field, label) in enumerate(fields):
            values = [getattr(r, field) for r in measured]
            drawn = ax.bar(
                positions + (i - (len(fields) - 1) / 2) * width,
                [np.nan if v is None else v for v in values],
                width,
                label=label,
            )
            ax.bar_label(drawn, labels=["" if v is None else _compact(v) for v in values], fontsize=value_size)
        ax.set_xticks(positions, labels, fontsize="small" if len(measured) <= 6 else "x-small")
        ax.set_title(title)
        ax.set_ylabel(unit)
        if len(fields) > 1:
            ax.legend(fontsize="small")

    bars(axes[0][0], [("decode_tokens_per_s", "decode")], "Decode speed (% of the bandwidth bound)", "tokens/s")
    for patch, result in zip(axes[0][0].patches, measured, strict=True):
        if result.bandwidth_fraction is not None:
            # Inside the bar, so that it does not collide with the value above it.
            axes[0][0].annotate(
                f"{result.bandwidth_fraction * 100:.0f}%",
                (patch.get_x() + patch.get_width() / 2, patch.get_height() / 2),
                ha="center",
                color="white",
                fontsize="small",
            )
    bars(
        axes[0][1],
        [("ttft_new_image_s", "new image"), ("ttft_follow_up_s", "follow-up")],
        "First token",
        "s",
    )
    bars(axes[0][2], [("load_cold_s", "empty cache"), ("load_warm_s", "warm cache")], "Engine load", "s")
    bars(axes[1][0], [("peak_rss_mb", "peak RSS")], "Peak resident memory", "MiB")
    speed, waiting = axes[1][1], axes[1][2]
    for concurrency in results.concurrency:
        points = [p for p in concurrency.points if p.aggregate_tokens_per_s is not None]
        if not points:
            continue
        channels = [p.channels for p in points]
        label = f"{concurrency.engine} {concurrency.precision}"
        speed.plot(channels, [p.aggregate_tokens_per_s for p in points], "o-", label=f"{label}, end to end")
        decode = [
            np.nan if p.aggregate_decode_tokens_per_s is None else p.aggregate_decode_tokens_per_s for p in points
        ]
        speed.plot(channels, decode, "s--", label=f"{label}, while decoding")
        waiting.plot(channels, [p.ttft_max_s for p in points], "o-", label=f"{label}, slowest channel")
        first = [min((t for t in p.ttft_s if t is not None), default=np.nan) for p in points]
        waiting.plot(channels, first, "s--", label=f"{label}, fastest channel")
        speed.set_xticks(channels)
        waiting.set_xticks(channels)
    speed.set_title("Concurrent conversations: aggregate speed")
    speed.set_ylabel("tokens/s")
    waiting.set_title("Concurrent conversations: first token")
    waiting.set_ylabel("s")
    for ax in (speed, waiting):
        ax.set_xlabel("conversations")
        ax.set_ylim(bottom=0)
        if results.concurrency:
            ax.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    return True


def write_reports(results: BenchResults, out: Path) -> str:
    """Write results.json, results.md and results.png into ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results.to_json(), indent=2) + "\n")
    text = markdown(results)
    (out / "results.md").write_text(text)
    write_chart(results, out / "results.png")
    log.info("wrote %s, %s and %s", out / "results.json", out / "results.md", out / "results.png")
    return text
