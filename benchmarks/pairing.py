"""Paired runs: engines and precisions alternated run by run, each ratio taken from neighbouring runs.

On a shared machine a neighbour's job can slow every run of one engine if the engines are measured one after
the other, and a ratio of two such medians says more about the neighbour than about the engines. Alternating
the arms (A, B, A, B, ...) puts both runs of a pair into the same few seconds, so a slow spell hits both; the
spread of the per-pair ratios shows how much the machine still moved them. Each run also records the CPU that
other processes used while it ran, and a ratio whose paired runs saw different background load is reported
but never counted as meeting a goal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# Paired runs whose other-process CPU shares differ by more than this (a share of all cores) are not
# comparable enough to call a goal met.
LOAD_GAP_LIMIT = 0.10


@dataclass(frozen=True)
class Arm:
    """One thing being compared: an engine on a precision."""

    engine: str
    precision: str

    @property
    def label(self) -> str:
        """``engine precision``, as the report prints it."""
        return f"{self.engine} {self.precision}"


@dataclass
class PairedRun:
    """One fresh measuring process of one arm in one round."""

    round: int
    engine: str
    precision: str
    decode_tokens_per_s: float | None = None
    ttft_new_image_s: float | None = None
    # Through the whole bot (the remote rows): from the mention to the first visible answer text.
    mention_to_first_text_s: float | None = None
    # CPU time other processes took while this run went, as a share of all cores.
    foreign_cpu_share: float | None = None
    error: str | None = None


@dataclass
class PairedRatio:
    """``numerator / denominator`` of one quantity, from the runs of the same round."""

    numerator: str
    denominator: str
    quantity: str
    ratios: list[float] = field(default_factory=list)
    median: float | None = None
    low: float | None = None
    high: float | None = None
    q1: float | None = None
    q3: float | None = None
    # The largest difference in other processes' CPU share between the two runs of any pair.
    load_gap: float | None = None
    load_limit: float = LOAD_GAP_LIMIT

    @property
    def load_ok(self) -> bool:
        """Whether every pair ran under comparable background load (unknown load counts as not comparable)."""
        return self.load_gap is not None and self.load_gap <= self.load_limit

    @property
    def spread(self) -> str:
        """``min-max`` of the per-pair ratios (and the interquartile range when there are four or more)."""
        if self.low is None or self.high is None:
            return "–"
        text = f"{self.low:.2f}–{self.high:.2f}"
        if len(self.ratios) >= 4 and self.q1 is not None and self.q3 is not None:
            text += f" (IQR {self.q1:.2f}–{self.q3:.2f})"
        return text


def schedule(arms: Sequence[Arm], rounds: int) -> list[tuple[int, Arm]]:
    """The order of the runs: every arm once per round, in the same order each round (A, B, A, B, ...)."""
    return [(index, arm) for index in range(rounds) for arm in arms]


def quantile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation quantile (``q`` in 0..1) of ``values``; None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    position = q * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def _find(runs: Sequence[PairedRun], round_: int, arm: Arm) -> PairedRun | None:
    return next(
        (r for r in runs if r.round == round_ and r.engine == arm.engine and r.precision == arm.precision), None
    )


def paired_ratio(
    runs: Sequence[PairedRun],
    numerator: Arm,
    denominator: Arm,
    quantity: str = "decode_tokens_per_s",
    load_limit: float = LOAD_GAP_LIMIT,
) -> PairedRatio:
    """The ratio of ``quantity`` between two arms, one value per round in which both arms measured it."""
    result = PairedRatio(numerator.label, denominator.label, quantity, load_limit=load_limit)
    gaps: list[float] = []
    unknown_load = False
    for round_ in sorted({r.round for r in runs}):
        top, bottom = _find(runs, round_, numerator), _find(runs, round_, denominator)
        if top is None or bottom is None:
            continue
        a, b = getattr(top, quantity), getattr(bottom, quantity)
        if a is None or not b:
            continue
        result.ratios.append(a / b)
        if top.foreign_cpu_share is None or bottom.foreign_cpu_share is None:
            unknown_load = True
        else:
            gaps.append(abs(top.foreign_cpu_share - bottom.foreign_cpu_share))
    if result.ratios:
        result.median = quantile(result.ratios, 0.5)
        result.low, result.high = min(result.ratios), max(result.ratios)
        result.q1, result.q3 = quantile(result.ratios, 0.25), quantile(result.ratios, 0.75)
        # Unknown load (not Linux) leaves the gap unknown, so the ratio is shown but never judged.
        result.load_gap = None if unknown_load or not gaps else max(gaps)
    return result


def paired_ratios(
    runs: Sequence[PairedRun], arms: Sequence[Arm], default: str, load_limit: float = LOAD_GAP_LIMIT
) -> list[PairedRatio]:
    """The default engine over every other engine, per precision, from the runs of the same round."""
    ratios = []
    for arm in arms:
        if arm.engine == default:
            continue
        ratios.append(paired_ratio(runs, Arm(default, arm.precision), arm, load_limit=load_limit))
    return ratios


def load_refusal(ratio: PairedRatio) -> str | None:
    """Why ``ratio`` may not mark a goal met, or None when its pairs ran under comparable load."""
    if not ratio.ratios:
        return None
    if ratio.load_gap is None:
        return "background load of the paired runs unknown"
    if ratio.load_gap > ratio.load_limit:
        return (
            f"paired runs differed in background load by up to {ratio.load_gap * 100:.0f}% of the CPU "
            f"(limit {ratio.load_limit * 100:.0f}%)"
        )
    return None
