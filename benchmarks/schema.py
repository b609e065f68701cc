"""The shape of ``results.json``: plain dataclasses, every field present even when not measured (``null``).

Times are seconds, rates tokens per second, memory MiB unless a field's name says otherwise. Every
``*_s``/rate field that summarises several runs is their median; the raw values are kept in ``samples``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from benchmarks.pairing import PairedRatio, PairedRun

SCHEMA_VERSION = 1


@dataclass
class Machine:
    """Where the benchmark ran."""

    cpu_model: str
    logical_cpus: int
    usable_cpus: int
    ram_gib: float | None
    system: str
    python: str
    versions: dict[str, str | None] = field(default_factory=dict)
    load_average: list[float] | None = None
    # CPU time of other processes during the run, as a share of all usable cores (0.0 = a quiet machine).
    foreign_cpu_share: float | None = None


@dataclass
class Bandwidth:
    """Memory read bandwidth (1 GB = 10^9 bytes): one thread's, and all usable cores' reading together."""

    gb_per_s: float
    samples_gb_per_s: list[float]
    array_mib: int
    method: str
    # One reader per usable core at once, as OpenVINO's threads read the weights: what bounds decoding.
    aggregate_gb_per_s: float | None = None
    aggregate_samples_gb_per_s: list[float] = field(default_factory=list)
    readers: int | None = None

    @property
    def bound_gb_per_s(self) -> float:
        """The figure decode speed is held against: what all cores read together.

        Never below one thread's figure: every core reading at once reads at least what one of them does, so
        an aggregate below it only says that a neighbour held a core during that measurement.
        """
        return max(self.aggregate_gb_per_s or 0.0, self.gb_per_s)


@dataclass
class ModelInfo:
    """The measured model."""

    path: str
    synthetic: bool
    description: str
    model_type: str | None = None
    image_tokens: int | None = None
    vocab_size: int | None = None
    # The language model's hidden width: 4096 is LLaVA-7B's, where decoding is bound by memory bandwidth.
    hidden_size: int | None = None
    # Bytes of the language model's weights per precision: what one decode step has to read.
    language_model_bytes: dict[str, int] = field(default_factory=dict)


@dataclass
class Settings:
    """How the benchmark was run."""

    runs: int
    load_runs: int
    new_tokens: int
    follow_up_tokens: int
    concurrency_tokens: int
    channels: list[int]
    engines: list[str]
    precisions: list[str]
    default_engine: str
    device: str
    ov_config: dict[str, str]
    quick: bool
    # Rounds of paired runs (every engine and precision once per round); 0 when none were made.
    pairs: int = 0
    # The synthetic model's spec name, or None for a converted model given with --model.
    model_spec: str | None = None


@dataclass
class EngineResult:
    """One engine on one precision. ``error`` is set (and most numbers null) when it could not run."""

    engine: str
    precision: str
    load_cold_s: float | None = None
    load_warm_s: float | None = None
    # Python imports the engine needs before it can load anything (the same cold or warm).
    import_s: float | None = None
    ttft_new_image_s: float | None = None
    ttft_follow_up_s: float | None = None
    decode_tokens_per_s: float | None = None
    prompt_tokens_new_image: int | None = None
    prompt_tokens_follow_up: int | None = None
    peak_rss_mb: float | None = None
    peak_rss_cold_mb: float | None = None
    language_model_bytes: int | None = None
    bandwidth_bound_tokens_per_s: float | None = None
    bandwidth_fraction: float | None = None
    # Lateness of the measuring process's own event loop while this engine generated.
    loop_lag_p50_ms: float | None = None
    loop_lag_p99_ms: float | None = None
    # CPU time other processes took while this row was measured, as a share of all cores (see Machine).
    foreign_cpu_share: float | None = None
    error: str | None = None
    samples: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class ConcurrencyPoint:
    """``channels`` conversations, each with a new image, started together."""

    channels: int
    aggregate_tokens_per_s: float | None = None
    aggregate_decode_tokens_per_s: float | None = None
    wall_s: float | None = None
    ttft_s: list[float | None] = field(default_factory=list)
    ttft_max_s: float | None = None
    loop_lag_p99_ms: float | None = None
    samples: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class ConcurrencyResult:
    """Concurrency measurements of one engine on one precision."""

    engine: str
    precision: str
    tokens_per_channel: int
    points: list[ConcurrencyPoint] = field(default_factory=list)
    peak_rss_mb: float | None = None
    error: str | None = None


@dataclass
class BotResult:
    """The whole bot against the loopback Discord emulator. ``status`` is "measured", "unavailable" or "failed"."""

    status: str = "unavailable"
    reason: str | None = None
    engine: str | None = None
    precision: str | None = None
    mention_to_first_text_s: float | None = None
    mention_to_final_edit_s: float | None = None
    bot_tokens_per_s: float | None = None
    engine_tokens_per_s: float | None = None
    # bot_tokens_per_s / engine_tokens_per_s: 1.0 means the bot costs nothing on top of the engine.
    overhead_ratio: float | None = None
    loop_lag_p50_ms: float | None = None
    loop_lag_p99_ms: float | None = None
    edits_per_answer: float | None = None
    samples: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class RemoteResult:
    """The bot through ``llava-bot serve`` on loopback against the bot with the engine in its own process.

    Every round runs three arms one after the other (alternated, see :mod:`benchmarks.pairing`): the bot with the
    default engine in its process, the bot with ``model.engine = "openai"`` against the server, and two such bot
    processes asking at once. ``status`` is "measured", "unavailable" or "failed".
    """

    status: str = "unavailable"
    reason: str | None = None
    precision: str | None = None
    # The engine of the in-process bot, and the one the server runs (the same, so only the HTTP hop differs).
    engine: str | None = None
    rounds: int = 0
    # Medians over the rounds.
    in_process_first_text_s: float | None = None
    remote_first_text_s: float | None = None
    in_process_tokens_per_s: float | None = None
    remote_tokens_per_s: float | None = None
    # Two bots at once: their answers' tokens over the time at least one of them was decoding.
    two_bots_tokens_per_s: float | None = None
    # remote / in-process, per round: above 1.0 the first text comes later, below 1.0 decoding is slower.
    first_text_ratio: PairedRatio | None = None
    decode_ratio: PairedRatio | None = None
    # two bots' aggregate / one bot's, per round: 2.0 would be perfect sharing of the server.
    two_bots_ratio: PairedRatio | None = None
    runs: list[PairedRun] = field(default_factory=list)


@dataclass
class Target:
    """A goal shown as a ratio; ``met`` is null when a number it needs was not measured."""

    name: str
    value: float | None
    goal: float
    comparison: str  # ">=" or "<="
    unit: str
    detail: str
    # Spread of a ratio taken from paired runs (min-max over the pairs), shown beside the value.
    spread: str | None = None
    # Why the value may not count as meeting the goal (e.g. the paired runs saw different background load).
    refused: str | None = None
    # Why the goal is not judged on this model (it is about another one); the value is still reported.
    not_applicable: str | None = None

    @property
    def reached(self) -> bool | None:
        """Whether the value is on the right side of the goal, whatever the conditions; None if unmeasured."""
        if self.value is None:
            return None
        return self.value >= self.goal if self.comparison == ">=" else self.value <= self.goal

    @property
    def met(self) -> bool | None:
        """Met, not met, or None when not measured here; a refused value is never met."""
        if self.reached is None or self.not_applicable:
            return None
        return self.reached and not self.refused


@dataclass
class BenchResults:
    """Everything one ``python -m benchmarks`` run measured."""

    date: str
    machine: Machine
    model: ModelInfo
    settings: Settings
    bandwidth: Bandwidth | None = None
    engines: list[EngineResult] = field(default_factory=list)
    concurrency: list[ConcurrencyResult] = field(default_factory=list)
    bot: BotResult = field(default_factory=BotResult)
    remote: RemoteResult = field(default_factory=RemoteResult)
    targets: list[Target] = field(default_factory=list)
    # Engines and precisions alternated run by run, and the ratios taken from neighbouring runs.
    paired: list[PairedRun] = field(default_factory=list)
    paired_ratios: list[PairedRatio] = field(default_factory=list)
    wall_time_s: float | None = None
    schema_version: int = SCHEMA_VERSION

    def engine(self, engine: str, precision: str) -> EngineResult | None:
        """The result of ``engine`` on ``precision``, if it was measured."""
        return next((r for r in self.engines if r.engine == engine and r.precision == precision), None)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; targets carry their computed ``met`` too."""
        data = dataclasses.asdict(self)
        data["targets"] = [{**dataclasses.asdict(t), "met": t.met} for t in self.targets]
        data["paired_ratios"] = [
            {**dataclasses.asdict(r), "spread": r.spread, "load_ok": r.load_ok} for r in self.paired_ratios
        ]
        for key in ("first_text_ratio", "decode_ratio", "two_bots_ratio"):
            ratio = getattr(self.remote, key)
            if ratio is not None:
                data["remote"][key].update(spread=ratio.spread, load_ok=ratio.load_ok)
        return data
