"""`python -m benchmarks --quick` on the tiny model: every report is written and its numbers make sense.

Speed itself is the benchmark's business, not a test's: nothing here compares a number with a goal.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.machine import aggregate_rates
from benchmarks.model import synthetic_spec
from benchmarks.options import add_arguments, options_from_args
from benchmarks.pairing import Arm, PairedRun, load_refusal, paired_ratio, paired_ratios, schedule
from benchmarks.remote import REMOTE, TWO_BOTS, aggregate_rate
from benchmarks.report import markdown, target_status
from benchmarks.runner import default_engine
from benchmarks.schema import Bandwidth, BenchResults, BotResult, Machine, ModelInfo, Settings, Target
from benchmarks.targets import compute_targets
from benchmarks.workload import Timing, decode_union_rate, percentile
from tests.conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tiny_llava: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(output folder, printed table) of one quick benchmark of the tiny model's converted folders."""
    out = tmp_path_factory.mktemp("bench")
    # Two engines produce every field (rows, paired runs and their ratio); the reference engine (optimum)
    # would add a PyTorch import to each of its five processes, and its ratio is computed the same way.
    engines = list(dict.fromkeys([default_engine(), "genai"]))
    # One round of paired runs gives the ratio and the alternation as well as two would.
    command = [sys.executable, "-m", "benchmarks", "--quick", "--pairs", "1", "--model", str(tiny_llava[1])]
    command += ["--out", str(out)]
    done = subprocess.run(
        [*command, "--engines", *engines],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


def test_writes_json_markdown_and_png(quick_run: tuple[Path, str]) -> None:
    out, printed = quick_run
    assert (out / "results.md").read_text() == printed
    assert (out / "results.png").read_bytes().startswith(PNG_MAGIC)
    data = json.loads((out / "results.json").read_text())
    for key in ("date", "machine", "model", "settings", "bandwidth", "engines", "concurrency", "bot", "targets"):
        assert key in data
    assert data["machine"]["logical_cpus"] >= 1 and data["machine"]["cpu_model"]
    assert _positive(data["bandwidth"]["gb_per_s"])
    assert _positive(data["wall_time_s"])
    # The table shows the machine and the date.
    assert data["machine"]["cpu_model"] in printed and data["date"] in printed


def test_every_engine_has_sane_numbers(quick_run: tuple[Path, str]) -> None:
    data = json.loads((quick_run[0] / "results.json").read_text())
    settings = data["settings"]
    assert settings["quick"] and settings["precisions"] == ["INT4"]
    measured = {(e["engine"], e["precision"]): e for e in data["engines"]}
    assert set(measured) == {(engine, "INT4") for engine in settings["engines"]}
    for result in measured.values():
        assert result["error"] is None, result["error"]
        for field in (
            "load_cold_s",
            "load_warm_s",
            "ttft_new_image_s",
            "ttft_follow_up_s",
            "decode_tokens_per_s",
            "peak_rss_mb",
            "language_model_bytes",
            "bandwidth_bound_tokens_per_s",
            "bandwidth_fraction",
        ):
            assert _positive(result[field]), (result["engine"], field, result[field])
        # A follow-up carries the first answer too, so its prompt is longer.
        assert result["prompt_tokens_follow_up"] > result["prompt_tokens_new_image"] > 0
        assert len(result["samples"]["load_cold_s"]) == settings["load_runs"]


def test_concurrency_of_the_default_engine(quick_run: tuple[Path, str]) -> None:
    data = json.loads((quick_run[0] / "results.json").read_text())
    default = next(c for c in data["concurrency"] if c["engine"] == data["settings"]["default_engine"])
    assert default["error"] is None
    assert [p["channels"] for p in default["points"]] == data["settings"]["channels"]
    for point in default["points"]:
        assert _positive(point["aggregate_tokens_per_s"]) and _positive(point["aggregate_decode_tokens_per_s"])
        assert len(point["ttft_s"]) == point["channels"] and all(_positive(t) for t in point["ttft_s"])


def test_bot_and_targets_are_reported(quick_run: tuple[Path, str]) -> None:
    out, printed = quick_run
    data = json.loads((out / "results.json").read_text())
    bot = data["bot"]
    for field in ("mention_to_first_text_s", "mention_to_final_edit_s", "overhead_ratio", "loop_lag_p99_ms"):
        assert field in bot
    if bot["status"] == "measured":
        assert _positive(bot["mention_to_first_text_s"]) and _positive(bot["mention_to_final_edit_s"])
        assert bot["mention_to_final_edit_s"] >= bot["mention_to_first_text_s"]
        assert _positive(bot["bot_tokens_per_s"]) and _positive(bot["overhead_ratio"])
    else:
        assert bot["reason"]
    names = [t["name"] for t in data["targets"]]
    assert any("bandwidth" in name for name in names) and any("Cold start" in name for name in names)
    for target in data["targets"]:
        assert target["met"] in (True, False, None)
        assert target["name"] in printed


def test_paired_runs_alternate_the_engines(quick_run: tuple[Path, str]) -> None:
    out, printed = quick_run
    data = json.loads((out / "results.json").read_text())
    settings = data["settings"]
    runs = data["paired"]
    assert len(runs) == settings["pairs"] * len(settings["engines"])
    # Run by run, the engines take turns.
    assert [r["engine"] for r in runs] == settings["engines"] * settings["pairs"]
    for run in runs:
        assert run["error"] is None, run["error"]
        assert _positive(run["decode_tokens_per_s"]) and run["foreign_cpu_share"] is not None
    (ratio,) = data["paired_ratios"]
    assert ratio["numerator"].startswith(settings["default_engine"]) and len(ratio["ratios"]) == settings["pairs"]
    assert ratio["low"] <= ratio["median"] <= ratio["high"]
    assert "Paired runs" in printed
    bandwidth = data["bandwidth"]
    assert _positive(bandwidth["aggregate_gb_per_s"]) and bandwidth["readers"] == data["machine"]["usable_cpus"]


def test_going_remote_is_measured_against_the_in_process_bot(quick_run: tuple[Path, str]) -> None:
    out, printed = quick_run
    data = json.loads((out / "results.json").read_text())
    remote = data["remote"]
    assert remote["status"] == "measured", remote["reason"]
    assert remote["engine"] == data["settings"]["default_engine"] and remote["precision"] == "INT4"
    runs = remote["runs"]
    # Every round runs the in-process bot, one bot through the server, then two at once, in that order.
    assert [r["engine"] for r in runs] == [remote["engine"], REMOTE, TWO_BOTS] * remote["rounds"]
    for run in runs:
        assert run["error"] is None, run["error"]
        assert _positive(run["mention_to_first_text_s"]) and _positive(run["decode_tokens_per_s"])
        assert run["foreign_cpu_share"] is not None
    for field in (
        "in_process_first_text_s",
        "remote_first_text_s",
        "in_process_tokens_per_s",
        "remote_tokens_per_s",
        "two_bots_tokens_per_s",
    ):
        assert _positive(remote[field]), field
    local, one, two = runs[:3]
    ratios = {
        "first_text_ratio": one["mention_to_first_text_s"] / local["mention_to_first_text_s"],
        "decode_ratio": one["decode_tokens_per_s"] / local["decode_tokens_per_s"],
        "two_bots_ratio": two["decode_tokens_per_s"] / one["decode_tokens_per_s"],
    }
    for key, first_round in ratios.items():
        ratio = remote[key]
        assert len(ratio["ratios"]) == remote["rounds"] and ratio["ratios"][0] == pytest.approx(first_round)
        assert ratio["low"] <= ratio["median"] <= ratio["high"] and ratio["spread"]
    assert "Going remote" in printed and "2 bots / 1 bot" in printed


def test_two_bots_decoding_at_once_add_up() -> None:
    # Two processes' answers decoding over the same second: twice the tokens of one in that second.
    one = {"samples": {"decode_spans": [[100.0, 101.0, 11]]}}
    assert aggregate_rate([one]) == pytest.approx(10.0)
    assert aggregate_rate([one, one]) == pytest.approx(20.0)
    later = {"samples": {"decode_spans": [[101.0, 102.0, 11]]}}
    assert aggregate_rate([one, later]) == pytest.approx(10.0)
    assert aggregate_rate([{"samples": {"decode_spans": [[None, None, 0]]}}]) is None


def test_the_remote_rows_can_be_skipped() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert options_from_args(parser.parse_args([])).remote
    assert not options_from_args(parser.parse_args(["--no-remote"])).remote
    # They go through the bot, so skipping the bot skips them too.
    assert not options_from_args(parser.parse_args(["--no-bot"])).remote


def test_decode_union_counts_overlapping_decoding_once() -> None:
    # Two generations decoding over the same second produce twice the tokens in that second.
    together = [Timing(0.0, 1.0, 2.0, 11, 5, ""), Timing(0.0, 1.0, 2.0, 11, 5, "")]
    assert decode_union_rate(together) == pytest.approx(20.0)
    # One after the other: the rate of one.
    serial = [Timing(0.0, 1.0, 2.0, 11, 5, ""), Timing(0.0, 3.0, 4.0, 11, 5, "")]
    assert decode_union_rate(serial) == pytest.approx(10.0)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([], 99) is None


def test_markdown_of_an_empty_run_says_what_is_missing() -> None:
    results = BenchResults(
        date="2026-01-01T00:00:00+00:00",
        machine=Machine("Some CPU", 2, 2, 8.0, "Linux", "3.11"),
        model=ModelInfo(path="m", synthetic=True, description="synthetic"),
        settings=Settings(1, 1, 8, 4, 8, [1], ["genai"], ["INT4"], "genai", "CPU", {}, True),
        bot=BotResult(status="unavailable", reason="no client"),
    )
    text = markdown(results)
    assert "Some CPU" in text and "2026-01-01" in text and "no client" in text


# --- paired runs, ratios and the background-load refusal ---------------------------------------------------


def _run(round_: int, engine: str, rate: float, load: float | None = 0.0) -> PairedRun:
    return PairedRun(round=round_, engine=engine, precision="INT4", decode_tokens_per_s=rate, foreign_cpu_share=load)


GENAI, OPTIMUM = Arm("genai", "INT4"), Arm("optimum", "INT4")


def test_schedule_alternates_the_arms_run_by_run() -> None:
    order = [(r, a.engine) for r, a in schedule([GENAI, OPTIMUM], 3)]
    assert order == [(0, "genai"), (0, "optimum"), (1, "genai"), (1, "optimum"), (2, "genai"), (2, "optimum")]


def test_each_ratio_comes_from_the_runs_of_its_own_round() -> None:
    # A slow spell in round 1 halves both engines: the paired ratio stays 2, a ratio of medians would not.
    runs = [_run(0, "genai", 100), _run(0, "optimum", 50), _run(1, "genai", 50), _run(1, "optimum", 25)]
    runs += [_run(2, "genai", 120), _run(2, "optimum", 40)]
    ratio = paired_ratio(runs, GENAI, OPTIMUM)
    assert ratio.ratios == pytest.approx([2.0, 2.0, 3.0])
    assert ratio.median == pytest.approx(2.0)
    assert (ratio.low, ratio.high) == (pytest.approx(2.0), pytest.approx(3.0))
    assert ratio.spread == "2.00–3.00"
    assert ratio.load_ok and load_refusal(ratio) is None


def test_spread_shows_the_interquartile_range_from_four_pairs() -> None:
    runs = [
        r for i, rate in enumerate((1.0, 2.0, 3.0, 4.0, 5.0)) for r in (_run(i, "genai", rate), _run(i, "optimum", 1))
    ]
    ratio = paired_ratio(runs, GENAI, OPTIMUM)
    assert (ratio.q1, ratio.q3) == (pytest.approx(2.0), pytest.approx(4.0))
    assert ratio.spread == "1.00–5.00 (IQR 2.00–4.00)"


def test_a_round_with_a_failed_run_gives_no_ratio() -> None:
    failed = PairedRun(round=1, engine="optimum", precision="INT4", error="exit code 1")
    runs = [_run(0, "genai", 90), _run(0, "optimum", 60), _run(1, "genai", 90), failed]
    assert paired_ratio(runs, GENAI, OPTIMUM).ratios == pytest.approx([1.5])
    assert paired_ratio([failed], GENAI, OPTIMUM).median is None


def test_pairs_with_different_background_load_are_refused() -> None:
    runs = [_run(0, "genai", 100, 0.02), _run(0, "optimum", 50, 0.05), _run(1, "genai", 100, 0.0)]
    runs.append(_run(1, "optimum", 50, 0.30))
    ratio = paired_ratio(runs, GENAI, OPTIMUM)
    assert ratio.load_gap == pytest.approx(0.30)
    assert not ratio.load_ok
    reason = load_refusal(ratio)
    assert reason is not None and "30%" in reason
    # A looser limit accepts the same runs.
    assert load_refusal(paired_ratio(runs, GENAI, OPTIMUM, load_limit=0.5)) is None
    # Unknown load (no /proc/stat) is never taken as comparable.
    unknown = [_run(0, "genai", 100, None), _run(0, "optimum", 50, None)]
    assert load_refusal(paired_ratio(unknown, GENAI, OPTIMUM)) is not None


def test_paired_ratios_put_the_default_engine_over_each_other_one() -> None:
    arms = [GENAI, OPTIMUM, Arm("genai-batching", "INT4")]
    runs = [_run(0, "genai", 90), _run(0, "optimum", 60), _run(0, "genai-batching", 45)]
    ratios = paired_ratios(runs, arms, "genai")
    assert [(r.numerator, r.denominator, r.median) for r in ratios] == [
        ("genai INT4", "optimum INT4", pytest.approx(1.5)),
        ("genai INT4", "genai-batching INT4", pytest.approx(2.0)),
    ]


def _results(hidden: int, runs: list[PairedRun]) -> BenchResults:
    results = BenchResults(
        date="2026-01-01T00:00:00+00:00",
        machine=Machine("Some CPU", 2, 2, 8.0, "Linux", "3.11"),
        model=ModelInfo(path="m", synthetic=True, description="synthetic", hidden_size=hidden),
        settings=Settings(1, 1, 8, 4, 8, [1], ["genai", "optimum"], ["INT4"], "genai", "CPU", {}, True, pairs=2),
    )
    results.paired = runs
    results.paired_ratios = paired_ratios(runs, [GENAI, OPTIMUM], "genai")
    return results


def _engine_target(results: BenchResults) -> Target:
    return next(t for t in compute_targets(results) if "paired" in t.name)


def test_engine_target_is_met_only_under_comparable_load() -> None:
    quiet = [_run(0, "genai", 90, 0.01), _run(0, "optimum", 50, 0.02), _run(1, "genai", 80, 0.0)]
    quiet.append(_run(1, "optimum", 50, 0.03))
    target = _engine_target(_results(1024, quiet))
    assert target.met is True and target.value == pytest.approx(1.7)
    assert target.spread is not None and "1.60–1.80" in target.spread
    busy = [*quiet[:3], _run(1, "optimum", 50, 0.40)]
    target = _engine_target(_results(1024, busy))
    assert target.reached and target.met is False and target.refused
    assert "differed in background load" in target_status(target)
    results = _results(1024, busy)
    results.targets = compute_targets(results)
    table = markdown(results)
    assert "not judged" in table and "differed in background load" in table


def test_goals_of_the_other_model_are_reported_not_judged() -> None:
    runs = [_run(0, "genai", 90, 0.0), _run(0, "optimum", 50, 0.0)]
    wide = _engine_target(_results(4096, runs))
    assert wide.value == pytest.approx(1.8) and wide.met is None
    assert target_status(wide).startswith("not measured (judged on the BENCH model")
    targets = compute_targets(_results(1024, runs))
    bound = next(t for t in targets if "bandwidth" in t.name)
    assert bound.goal == 0.75 and bound.met is None


def test_aggregate_rate_counts_all_readers_over_their_common_span() -> None:
    # Two readers of 1 GB each, the second starting 0.5 s later: 2 GB over 1.5 s in the first round.
    spans = [(10**9, [(0.0, 1.0), (5.0, 6.0)]), (10**9, [(0.5, 1.5), (5.0, 6.0)])]
    assert aggregate_rates(spans) == pytest.approx([2 / 1.5, 2.0])
    slow_neighbour = Bandwidth(30.0, [30.0], 64, "x", aggregate_gb_per_s=20.0, readers=2)
    assert slow_neighbour.bound_gb_per_s == 30.0
    assert Bandwidth(18.0, [18.0], 64, "x", aggregate_gb_per_s=37.0, readers=2).bound_gb_per_s == 37.0


def test_bench_options_choose_the_7b_width_model() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = options_from_args(parser.parse_args(["--model-spec", "7b-width", "--quick", "--pairs", "3"]))
    assert options.model_spec == "7b-width" and options.pairs == 3 and options.work_dir.name == "model-7b-width"
    spec = synthetic_spec(options.model_spec)
    assert (spec.text_hidden, spec.text_intermediate, spec.text_heads, spec.vocab_size) == (4096, 11008, 32, 32000)
    with pytest.raises(ValueError, match="load-gap"):
        options_from_args(parser.parse_args(["--load-gap", "2"]))


def test_the_operation_profile_accounts_for_a_decode_step(tiny_llava: tuple[Path, Path]) -> None:
    from benchmarks.op_profile import profile

    folder = tiny_llava[1] / "INT4"
    result = profile(folder, tokens=4, prompt=8, config={})
    counted = sum(result["ops_ms"].values())
    # The counters cover the step (the rest is the call's own overhead), and the linear layers are among them.
    assert 0 < counted <= result["step_ms"] * 1.5
    assert result["weight_ops_ms"] > 0 and result["weight_kernels"]
    assert result["weight_bytes"] == (folder / "openvino_language_model.bin").stat().st_size
