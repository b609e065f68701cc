"""`llava-bot bench --quick` on the tiny model: every report is written and its numbers make sense.

Speed itself is the benchmark's business, not a test's: nothing here compares a number with a goal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bot.bench.report import markdown
from bot.bench.runner import default_engine
from bot.bench.schema import BenchResults, BotResult, Machine, ModelInfo, Settings
from bot.bench.targets import BASELINE_ENGINE
from bot.bench.workload import Timing, decode_union_rate, percentile
from tests.conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tiny_llava: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(output folder, printed table) of one quick benchmark of the tiny model's converted folders."""
    out = tmp_path_factory.mktemp("bench")
    # The default engine and the reference it is compared with are enough to produce every field; more engines
    # would only make the test slower.
    engines = list(dict.fromkeys([default_engine(), BASELINE_ENGINE]))
    command = [sys.executable, "-m", "bot", "bench", "--quick", "--model", str(tiny_llava[1]), "--out", str(out)]
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
