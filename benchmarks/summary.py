"""Summaries of the measuring processes' raw JSON: medians per engine and precision, bandwidth bounds."""

from __future__ import annotations

from typing import Any

from benchmarks.options import BenchOptions
from benchmarks.schema import Bandwidth, BenchResults, ConcurrencyPoint, ConcurrencyResult, EngineResult, ModelInfo
from benchmarks.workload import median


def fill_engine_result(
    result: EngineResult,
    *,
    measured: dict[str, Any],
    colds: list[dict[str, Any]],
    warms: list[dict[str, Any]],
    model: ModelInfo,
) -> None:
    """Summarise the processes of one engine and precision into ``result`` (medians, samples kept)."""
    runs = measured.get("runs", [])
    samples: dict[str, list[Any]] = {
        "load_cold_s": [c["load_s"] for c in colds],
        "load_warm_s": [w["load_s"] for w in warms],
        "import_s": [p["import_s"] for p in colds + warms],
        "peak_rss_cold_mb": [c["peak_rss_mb"] for c in colds],
        "ttft_new_image_s": [r["new_image"]["ttft_s"] for r in runs],
        "ttft_follow_up_s": [r["follow_up"]["ttft_s"] for r in runs],
        "decode_tokens_per_s": [r["new_image"]["decode_tokens_per_s"] for r in runs],
        "new_tokens": [r["new_image"]["new_tokens"] for r in runs],
    }
    result.samples = samples
    result.load_cold_s = median(samples["load_cold_s"])
    result.load_warm_s = median(samples["load_warm_s"])
    result.import_s = median(samples["import_s"])
    result.peak_rss_cold_mb = median(samples["peak_rss_cold_mb"])
    result.ttft_new_image_s = median(samples["ttft_new_image_s"])
    result.ttft_follow_up_s = median(samples["ttft_follow_up_s"])
    result.decode_tokens_per_s = median(samples["decode_tokens_per_s"])
    if runs:
        result.prompt_tokens_new_image = runs[0]["new_image"]["prompt_tokens"] or None
        result.prompt_tokens_follow_up = runs[0]["follow_up"]["prompt_tokens"] or None
    result.peak_rss_mb = measured.get("peak_rss_mb")
    result.loop_lag_p50_ms = measured.get("loop_lag_p50_ms")
    result.loop_lag_p99_ms = measured.get("loop_lag_p99_ms")
    result.language_model_bytes = model.language_model_bytes.get(result.precision)


def apply_bandwidth(results: BenchResults) -> None:
    """Set every result's bandwidth bound and the share of it that its decode speed reaches."""
    if results.bandwidth is None:
        return
    for result in results.engines:
        if not result.language_model_bytes:
            continue
        # Every decode step reads all language-model weights once (the token embedding table is a separate
        # model of which one row is read), so memory bandwidth / weight bytes bounds the decode rate. OpenVINO
        # reads them with a thread per core, so the bandwidth is what all cores read together.
        result.bandwidth_bound_tokens_per_s = results.bandwidth.bound_gb_per_s * 1e9 / result.language_model_bytes
        if result.decode_tokens_per_s:
            result.bandwidth_fraction = result.decode_tokens_per_s / result.bandwidth_bound_tokens_per_s


def concurrency_result(
    engine: str, precision: str, options: BenchOptions, measured: dict[str, Any]
) -> ConcurrencyResult:
    """Medians over the repetitions of every channel count."""
    result = ConcurrencyResult(engine, precision, options.concurrency_tokens)
    result.peak_rss_mb = measured.get("peak_rss_concurrent_mb")
    for entry in measured.get("concurrency", []):
        reps = entry["reps"]
        count = entry["channels"]
        per_channel = [median([rep["ttft_s"][i] for rep in reps]) for i in range(count)]
        point = ConcurrencyPoint(
            channels=count,
            aggregate_tokens_per_s=median([rep["aggregate_tokens_per_s"] for rep in reps]),
            aggregate_decode_tokens_per_s=median([rep["aggregate_decode_tokens_per_s"] for rep in reps]),
            wall_s=median([rep["wall_s"] for rep in reps]),
            ttft_s=per_channel,
            ttft_max_s=max((t for t in per_channel if t is not None), default=None),
            loop_lag_p99_ms=median([rep["loop_lag_p99_ms"] for rep in reps]),
            samples={key: [rep[key] for rep in reps] for key in reps[0]} if reps else {},
        )
        result.points.append(point)
    return result


def best_bandwidth(first: Bandwidth, second: Bandwidth) -> Bandwidth:
    """One bandwidth from two measurements: the higher of each figure, with every sample kept."""
    aggregates = [b.aggregate_gb_per_s for b in (first, second) if b.aggregate_gb_per_s is not None]
    return Bandwidth(
        gb_per_s=max(first.gb_per_s, second.gb_per_s),
        samples_gb_per_s=first.samples_gb_per_s + second.samples_gb_per_s,
        array_mib=first.array_mib,
        method=f"{first.method}, measured at the start and at the end",
        aggregate_gb_per_s=max(aggregates, default=None),
        aggregate_samples_gb_per_s=first.aggregate_samples_gb_per_s + second.aggregate_samples_gb_per_s,
        readers=first.readers or second.readers,
    )
