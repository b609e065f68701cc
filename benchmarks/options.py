"""The benchmark's settings and the ``python -m benchmarks`` arguments that fill them (no heavy imports here)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.pairing import LOAD_GAP_LIMIT
from bot.engine import variants
from bot.engine.ov_config import BadPair, parse_pairs

DEFAULT_OUT = Path("bench-results")
DEFAULT_WORK_DIR = DEFAULT_OUT / "model"


@dataclass
class BenchOptions:
    """What to measure and how often. The defaults finish within about 15 minutes on 2 cores."""

    model: Path | None = None
    # Which synthetic model to build when no --model is given: "bench" or "7b-width" (see benchmarks.model).
    model_spec: str = "bench"
    work_dir: Path = DEFAULT_WORK_DIR
    out: Path = DEFAULT_OUT
    # Generations per measurement (median reported).
    runs: int = 3
    # Fresh processes per engine and precision for each of the cold and the warm start.
    load_runs: int = 3
    new_tokens: int = 64
    follow_up_tokens: int = 8
    # Longer than the single answers: with several conversations the interesting part is the shared decoding,
    # and Discord answers are typically a few hundred tokens.
    concurrency_tokens: int = 256
    channels: tuple[int, ...] = (1, 2, 4)
    # Rounds of paired runs: every engine and precision once per round, alternated run by run.
    pairs: int = 3
    # Paired runs differing by more than this share of the CPU in background load cannot meet a goal.
    load_gap_limit: float = LOAD_GAP_LIMIT
    # An earlier results.json to compare start-up time and peak memory with.
    baseline: Path | None = None
    # None: every engine load_engine knows.
    engines: list[str] | None = None
    # None: the engine the bot uses by default plus any batching engine.
    concurrency_engines: list[str] | None = None
    precisions: list[str] = field(default_factory=lambda: list(variants.PRECISIONS))
    device: str = "CPU"
    ov_config: dict[str, str] = field(default_factory=dict)
    bandwidth_mib: int = 512
    bot: bool = True
    # The bot through `llava-bot serve` against the in-process engine, and two bots sharing one server.
    remote: bool = True
    quick: bool = False
    # Longest a single measuring process may take before it counts as hung.
    worker_timeout_s: float = 1200.0

    @classmethod
    def quick_mode(cls, **overrides: object) -> BenchOptions:
        """A smoke run: one sample of everything, few tokens, INT4 only, two channels at most."""
        values: dict[str, object] = {
            "runs": 1,
            "load_runs": 1,
            "new_tokens": 8,
            "follow_up_tokens": 4,
            "concurrency_tokens": 8,
            "channels": (1, 2),
            "pairs": 2,
            "precisions": ["INT4"],
            "bandwidth_mib": 128,
            "quick": True,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``python -m benchmarks`` options."""
    parser.add_argument(
        "--model", help="folder holding FP16/INT8/INT4 made by `llava-bot convert` (default: a synthetic model)"
    )
    parser.add_argument(
        "--model-spec",
        choices=("bench", "7b-width"),
        default="bench",
        help="synthetic model to build: bench (~235M parameters) or 7b-width (2 layers of LLaVA-7B's widths)",
    )
    parser.add_argument(
        "--work-dir",
        help=f"where the synthetic model is kept (default: {DEFAULT_WORK_DIR}, or {DEFAULT_OUT}/model-SPEC)",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default: {DEFAULT_OUT})")
    parser.add_argument("--runs", type=int, help="generations per measurement (default: 3, quick: 1)")
    parser.add_argument(
        "--load-runs", type=int, help="cold and warm starts per engine and precision (default: 3, quick: 1)"
    )
    parser.add_argument("--new-tokens", type=int, help="tokens per timed answer (default: 64, quick: 8)")
    parser.add_argument(
        "--concurrency-tokens", type=int, help="tokens per answer with concurrent conversations (default: 256)"
    )
    parser.add_argument("--engines", nargs="+", metavar="ENGINE", help="engines to measure (default: all)")
    parser.add_argument(
        "--concurrency-engines", nargs="+", metavar="ENGINE", help="engines to time with concurrent conversations"
    )
    parser.add_argument("--precision", nargs="+", metavar="P", help="any of int4 int8 fp16 (default: all three)")
    parser.add_argument("--channels", type=int, nargs="+", metavar="N", help="concurrent conversations (1 2 4)")
    parser.add_argument(
        "--pairs", type=int, help="rounds of paired runs, engines alternated run by run (default: 3, quick: 2; 0: none)"
    )
    parser.add_argument(
        "--load-gap",
        type=float,
        metavar="SHARE",
        help=f"largest background-load difference (share of the CPU) between paired runs that may still meet a goal "
        f"(default: {LOAD_GAP_LIMIT})",
    )
    parser.add_argument("--baseline", metavar="RESULTS_JSON", help="earlier results.json for start-up and memory goals")
    parser.add_argument("--device", default="CPU", help="OpenVINO device (default: CPU)")
    parser.add_argument("--ov-config", action="append", default=[], metavar="KEY=VALUE", help="OpenVINO property")
    parser.add_argument("--no-bot", action="store_true", help="skip the measurement through the whole bot")
    parser.add_argument(
        "--no-remote",
        action="store_true",
        help="skip the rows of the bot through `llava-bot serve` (the cost of going remote, two bots on one server)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: one short sample of everything, INT4 only")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """Turn parsed arguments into options; raises ValueError with a sentence on a bad value."""
    spec = args.model_spec
    work_dir = args.work_dir or (DEFAULT_WORK_DIR if spec == "bench" else DEFAULT_OUT / f"model-{spec}")
    overrides: dict[str, object] = {
        "model": Path(args.model) if args.model else None,
        "model_spec": spec,
        "work_dir": Path(work_dir),
        "baseline": Path(args.baseline) if args.baseline else None,
        "out": Path(args.out),
        "device": args.device,
        "bot": not args.no_bot,
        "remote": not args.no_bot and not args.no_remote,
    }
    for name in ("runs", "load_runs", "new_tokens", "concurrency_tokens"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
            overrides[name] = value
    if args.pairs is not None:
        if args.pairs < 0:
            raise ValueError("--pairs must be 0 or more")
        overrides["pairs"] = args.pairs
    if args.load_gap is not None:
        if not 0 <= args.load_gap <= 1:
            raise ValueError("--load-gap is a share of the CPU between 0 and 1")
        overrides["load_gap_limit"] = args.load_gap
    if args.engines:
        overrides["engines"] = list(args.engines)
    if args.concurrency_engines:
        overrides["concurrency_engines"] = list(args.concurrency_engines)
    if args.precision:
        overrides["precisions"] = [variants.normalise_precision(p) for p in args.precision]
    if args.channels:
        if min(args.channels) < 1:
            raise ValueError("--channels must be positive numbers")
        overrides["channels"] = tuple(args.channels)
    try:
        overrides["ov_config"] = parse_pairs(args.ov_config)
    except BadPair as error:
        raise ValueError(f"--ov-config: {error}") from error
    if args.quick:
        return BenchOptions.quick_mode(**overrides)
    return BenchOptions(**overrides)  # type: ignore[arg-type]
