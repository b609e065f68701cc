"""Where a decode step's time goes inside OpenVINO, per operation type, and what bandwidth the weights get.

Run as ``python -m benchmarks.op_profile --folder DIR/INT4 [--tokens 32] [--prompt 64]``. It compiles the
language model of one precision folder with OpenVINO's per-operation counters on, prefills a prompt of
random embeddings, then times single-token steps. For each step it adds up the counters by operation type,
and it divides the weight bytes of the model's file by the time the matrix multiplications took: the
bandwidth the weight-reading kernels reached, to set against the machine's (``benchmarks.machine``).
When those kernels read far below the machine's bandwidth, decode is bound by them and not by memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The operation types that read the weights: OpenVINO's CPU plugin runs (compressed) linear layers as
# FullyConnected / FullyConnectedCompressed; a model compiled without that fusion shows them as MatMul.
WEIGHT_OPS = ("FullyConnected", "MatMul")


def _is_weight_op(kind: str) -> bool:
    return kind.startswith(WEIGHT_OPS)


def _totals(request: Any, calls: int) -> dict[str, float]:
    # The CPU plugin reports each node's mean time over every inference of the request so far, so the
    # running total is that mean times the calls; one step's time is the difference of two totals.
    totals: dict[str, float] = defaultdict(float)
    for info in request.profiling_info:
        totals[info.node_type] += info.real_time.total_seconds() * calls
    return totals


def _step_inputs(hidden: int, length: int, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(past)
    return {
        "inputs_embeds": rng.standard_normal((1, length, hidden), dtype=np.float32) * 0.02,
        "attention_mask": np.ones((1, past + length), dtype=np.int64),
        "position_ids": np.arange(past, past + length, dtype=np.int64)[None, :],
        "beam_idx": np.zeros((1,), dtype=np.int32),
    }


def profile(folder: Path, tokens: int, prompt: int, config: dict[str, str]) -> dict[str, Any]:
    """Time ``tokens`` decode steps after a ``prompt``-token prefill; per-type times are medians over steps."""
    import openvino as ov

    core = ov.Core()
    xml = folder / "openvino_language_model.xml"
    model = core.read_model(xml)
    hidden = int(model.input("inputs_embeds").get_partial_shape()[2].get_length())
    compiled = core.compile_model(model, "CPU", {"PERF_COUNT": "YES", **config})
    request = compiled.create_infer_request()
    request.reset_state()
    request.infer(_step_inputs(hidden, prompt, 0))
    before = _totals(request, 1)
    by_type: dict[str, list[float]] = defaultdict(list)
    walls: list[float] = []
    for step in range(1, tokens + 1):
        started = time.perf_counter()
        request.infer(_step_inputs(hidden, 1, prompt + step - 1))
        walls.append(time.perf_counter() - started)
        after = _totals(request, step + 1)
        for kind, seconds in after.items():
            by_type[kind].append(seconds - before.get(kind, 0.0))
        before = after
    exec_types = {info.exec_type for info in request.profiling_info if _is_weight_op(info.node_type)}
    weight_bytes = (folder / "openvino_language_model.bin").stat().st_size
    ops = {kind: statistics.median(times) for kind, times in by_type.items()}
    weight_s = sum(seconds for kind, seconds in ops.items() if _is_weight_op(kind))
    wall = statistics.median(walls)
    return {
        "folder": str(folder),
        "config": config,
        "tokens": tokens,
        "step_ms": wall * 1000,
        "tok_s": 1 / wall,
        "weight_bytes": weight_bytes,
        "weight_ops_ms": weight_s * 1000,
        "weight_ops_share": weight_s / sum(ops.values()) if ops else 0.0,
        "weight_read_gb_s": weight_bytes / weight_s / 1e9 if weight_s else 0.0,
        "ops_ms": {kind: seconds * 1000 for kind, seconds in sorted(ops.items(), key=lambda item: -item[1])},
        "inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
        "weight_kernels": sorted(exec_types),
    }


def _table(result: dict[str, Any], top: int = 8) -> str:
    total = sum(result["ops_ms"].values())
    lines = [
        f"{result['folder']} {result['config'] or ''}: step {result['step_ms']:.1f} ms ({result['tok_s']:.1f} tok/s), "
        f"inference precision {result['inference_precision']}, weight kernels {', '.join(result['weight_kernels'])}",
        f"weights {result['weight_bytes'] / 1e6:.0f} MB read by {'/'.join(WEIGHT_OPS)} in "
        f"{result['weight_ops_ms']:.1f} ms = {result['weight_read_gb_s']:.1f} GB/s "
        f"({result['weight_ops_share']:.0%} of the counted time)",
        "| operation type | ms per step | share |",
        "|---|---|---|",
    ]
    for kind, ms in list(result["ops_ms"].items())[:top]:
        lines.append(f"| {kind} | {ms:.2f} | {ms / total:.0%} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.op_profile``."""
    from bot.engine.ov_config import parse_pairs

    parser = argparse.ArgumentParser(prog="python -m benchmarks.op_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="one precision folder (e.g. .../ov/INT4)")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps to time")
    parser.add_argument("--prompt", type=int, default=64, help="tokens prefilled first")
    parser.add_argument("--ov-config", action="append", default=[], metavar="KEY=VALUE", help="OpenVINO property")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    try:
        config = parse_pairs(args.ov_config)
    except ValueError as error:
        print(f"op_profile: {error}", file=sys.stderr)
        return 2
    result = profile(args.folder, args.tokens, args.prompt, config)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
