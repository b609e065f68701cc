"""OpenVINO properties compared on one engine: decode speed in alternated runs, and greedy answers.

``python -m benchmarks.properties speed --folder DIR/INT4 --engine genai-batching --b KEY=VALUE``
loads the engine twice in one process, once with the folder's default properties (arm A) and once with the
given ones (arm B), and alternates single generations A, B, B, A, A, B, ... so a neighbour's burst hits both
arms. Each run records the CPU share other processes took while it ran. It prints the per-arm median
decode rate with its range, and the median of the per-round B/A ratios.

``python -m benchmarks.properties answers --folder DIR/INT4 --reference DIR/FP16 --b KEY=VALUE`` answers N
picture questions greedily with both arms and with the reference (the FP16 folder inferred in f32) and
prints how many leading tokens each arm shares with the other and with the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.workload import FIRST_QUESTION, make_image, timed_generation
from bot.engine.base import Engine, GenerationSettings, ImageRef, Turn
from bot.engine.manager import load_engine
from bot.engine.ov_config import BadPair, parse_pairs

_QUESTIONS = (
    FIRST_QUESTION,
    "What is unusual in this picture?",
    "Which colours are there?",
    "Is this a photo or a drawing?",
)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (children are listed per thread that started them)."""
    found, todo = [], [pid]
    while todo:
        one = todo.pop()
        found.append(one)
        for task in Path(f"/proc/{one}/task").glob("*"):
            try:
                todo += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its running descendants (utime + stime from /proc)."""
    total = 0.0
    for one in _tree(pid):
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _busy_seconds() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class Load:
    """Other processes' CPU share of all cores while a block ran (this process and its workers excluded)."""

    def __enter__(self) -> Load:
        self.started, self.busy, self.own = time.monotonic(), _busy_seconds(), _cpu_seconds(os.getpid())
        return self

    def __exit__(self, *_: object) -> None:
        elapsed = (time.monotonic() - self.started) * (os.cpu_count() or 1)
        foreign = (_busy_seconds() - self.busy) - (_cpu_seconds(os.getpid()) - self.own)
        self.share = max(0.0, foreign / elapsed)


async def _load(engine: str, folder: Path, ov_config: dict[str, str]) -> Engine:
    return await asyncio.to_thread(load_engine, engine, folder, "CPU", ov_config)


async def _round(
    args: argparse.Namespace, engines: dict[str, Engine], order: Sequence[str], round_: int
) -> list[dict[str, Any]]:
    conversation = [Turn("user", FIRST_QUESTION, (ImageRef.from_image(make_image(1)),))]
    settings = GenerationSettings(max_new_tokens=args.new_tokens, ignore_eos=True)
    runs = []
    for name in order:
        with Load() as load:
            timing = await timed_generation(engines[name], conversation, settings)
        run = {"round": round_, "arm": name, "tok_s": timing.decode_tokens_per_second, "load": load.share}
        runs.append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
    return runs


async def _loaded(args: argparse.Namespace, arms: dict[str, dict[str, str]], order: Sequence[str]) -> dict[str, Engine]:
    """Both arms' engines, loaded in ``order`` and warmed up (compile, prefill, caches)."""
    engines = {name: await _load(args.engine, Path(args.folder), arms[name]) for name in order}
    conversation = [Turn("user", FIRST_QUESTION, (ImageRef.from_image(make_image(1)),))]
    for engine in engines.values():
        await timed_generation(engine, conversation, GenerationSettings(max_new_tokens=4, ignore_eos=True))
    return engines


async def _close(engines: dict[str, Engine]) -> None:
    for engine in engines.values():
        await asyncio.to_thread(engine.close)


async def speed(args: argparse.Namespace) -> dict[str, Any]:
    """Alternated runs of both arms. With ``--reload`` each round loads both engines afresh, in that round's
    order: in one process the engine loaded second was seen to run ~8% faster with the same settings."""
    arms = {"A": args.a, "B": args.b}
    runs: list[dict[str, Any]] = []
    orders = [("A", "B") if round_ % 2 == 0 else ("B", "A") for round_ in range(args.rounds)]
    if args.reload:
        for round_, order in enumerate(orders):
            engines = await _loaded(args, arms, order)
            try:
                runs += await _round(args, engines, order, round_)
            finally:
                await _close(engines)
    else:
        engines = await _loaded(args, arms, ("A", "B"))
        try:
            for round_, order in enumerate(orders):
                runs += await _round(args, engines, order, round_)
        finally:
            await _close(engines)
    summary: dict[str, Any] = {"engine": args.engine, "folder": args.folder, "arms": arms, "runs": runs}
    for name in arms:
        rates = [r["tok_s"] for r in runs if r["arm"] == name]
        loads = [r["load"] for r in runs if r["arm"] == name]
        summary[name] = {
            "median_tok_s": statistics.median(rates),
            "range": [min(rates), max(rates)],
            "median_load": statistics.median(loads),
            "load_range": [min(loads), max(loads)],
        }
    ratios = []
    for round_ in range(args.rounds):
        by_arm = {r["arm"]: r["tok_s"] for r in runs if r["round"] == round_}
        ratios.append(by_arm["B"] / by_arm["A"])
    summary["B/A"] = {"median": statistics.median(ratios), "range": [min(ratios), max(ratios)]}
    return summary


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def _answers(engine: Engine, count: int, new_tokens: int) -> list[list[int]]:
    settings = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)
    tokenizer: Any = engine.template.tokenizer  # type: ignore[attr-defined]
    out = []
    for i in range(count):
        conversation = [Turn("user", _QUESTIONS[i % len(_QUESTIONS)], (ImageRef.from_image(make_image(100 + i)),))]
        text = await engine.generate(conversation, settings).text()
        out.append([int(t) for t in tokenizer.encode(text, add_special_tokens=False).input_ids.data[0]])
    return out


async def answers(args: argparse.Namespace) -> dict[str, Any]:
    arms = {"A": args.a, "B": args.b}
    got: dict[str, list[list[int]]] = {}
    for name, config in [*arms.items(), ("reference", {"INFERENCE_PRECISION_HINT": "f32"})]:
        folder = Path(args.reference if name == "reference" else args.folder)
        engine = await _load(args.engine, folder, config)
        try:
            got[name] = await _answers(engine, args.count, args.new_tokens)
        finally:
            await asyncio.to_thread(engine.close)

    def agreement(x: str, y: str) -> dict[str, Any]:
        shared = [_common_prefix(a, b) for a, b in zip(got[x], got[y], strict=True)]
        return {
            "leading_tokens": shared,
            "mean": statistics.mean(shared),
            "identical": sum(s == len(a) for s, a in zip(shared, got[x], strict=True)),
        }

    return {
        "engine": args.engine,
        "folder": args.folder,
        "arms": arms,
        "new_tokens": args.new_tokens,
        "A vs B": agreement("A", "B"),
        "A vs reference": agreement("A", "reference"),
        "B vs reference": agreement("B", "reference"),
    }


def _teacher_forced_logits(folder: Path, ov_config: dict[str, str], ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits of the language model alone for ``ids``: ``prefill`` tokens in one request, then one at a time
    (the decode path), every model fed the same tokens whatever it would have chosen."""
    import openvino as ov

    core = ov.Core()
    embed = core.compile_model(
        folder / "openvino_text_embeddings_model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    embeds = np.array(embed({0: ids[None]})[0], dtype=np.float32)
    model = core.compile_model(folder / "openvino_language_model.xml", "CPU", ov_config)
    request = model.create_infer_request()
    names = {port.get_any_name() for port in model.inputs}
    rows = []
    spans = [(0, prefill)] + [(i, i + 1) for i in range(prefill, len(ids))]
    for start, end in spans:
        inputs: dict[str, Any] = {
            "inputs_embeds": embeds[:, start:end],
            "attention_mask": np.ones((1, end), dtype=np.int64),
            "position_ids": np.arange(start, end, dtype=np.int64)[None],
        }
        if "beam_idx" in names:
            inputs["beam_idx"] = np.zeros(1, dtype=np.int32)
        request.infer(inputs)
        rows.append(np.array(request.get_tensor("logits").data, dtype=np.float32)[0, -(end - start) :])
    return np.concatenate(rows)


def logits(args: argparse.Namespace) -> dict[str, Any]:
    """Max logit difference and top-1 agreement of both arms and the f32 reference, on the same tokens."""
    vocab = int(
        json.loads((Path(args.folder) / "config.json").read_text()).get("text_config", {}).get("vocab_size", 32000)
    )
    ids = np.random.default_rng(0).integers(3, vocab, args.prefill + args.new_tokens).astype(np.int64)
    got = {
        "A": _teacher_forced_logits(Path(args.folder), args.a, ids, args.prefill),
        "B": _teacher_forced_logits(Path(args.folder), args.b, ids, args.prefill),
        "reference": _teacher_forced_logits(
            Path(args.reference), {"INFERENCE_PRECISION_HINT": "f32"}, ids, args.prefill
        ),
    }
    decode = slice(args.prefill, None)

    def compare(x: str, y: str) -> dict[str, float]:
        diff = np.abs(got[x] - got[y])
        same = got[x].argmax(-1) == got[y].argmax(-1)
        return {
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "top1_agreement_prefill": float(same[: args.prefill].mean()),
            "top1_agreement_decode": float(same[decode].mean()),
        }

    spread = float(got["reference"].std())
    return {
        "folder": args.folder,
        "arms": {"A": args.a, "B": args.b},
        "reference_logit_std": spread,
        "A vs B": compare("A", "B"),
        "A vs reference": compare("A", "reference"),
        "B vs reference": compare("B", "reference"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints the summary as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.properties", description=__doc__)
    parser.add_argument("mode", choices=("speed", "answers", "logits"))
    parser.add_argument("--folder", required=True, help="one precision folder")
    parser.add_argument("--engine", default="genai-batching")
    parser.add_argument("--a", nargs="*", default=[], metavar="KEY=VALUE", help="arm A's properties (default: none)")
    parser.add_argument("--b", nargs="*", default=[], metavar="KEY=VALUE", help="arm B's properties")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reload", action="store_true", help="speed: load both engines afresh every round")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reference", help="answers: the FP16 folder, inferred in f32")
    parser.add_argument("--count", type=int, default=8, help="answers: how many questions")
    parser.add_argument("--prefill", type=int, default=32, help="logits: tokens given at once before decoding")
    args = parser.parse_args(argv)
    try:
        # From here on each arm is its properties as a dict.
        args.a, args.b = parse_pairs(args.a), parse_pairs(args.b)
    except BadPair as error:
        parser.error(str(error))
    if args.mode != "speed" and not args.reference:
        parser.error(f"{args.mode} compares with the FP16 folder: give --reference")
    if args.mode == "logits":
        result = logits(args)
    else:
        result = asyncio.run(speed(args) if args.mode == "speed" else answers(args))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
