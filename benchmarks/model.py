"""The model a benchmark measures: a synthetic LLaVA-1.5-shaped one built offline, or a converted folder."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.schema import ModelInfo
from bot.engine import variants
from bot.engine.convert import LANGUAGE_MODEL

log = logging.getLogger(__name__)

# Written once conversion finished; it names the spec, so a changed spec rebuilds the model.
_STAMP = "bench-model.json"

# The synthetic models ``--model-spec`` chooses from. "bench" is a small LLaVA-1.5 whose decoding is dominated
# by per-token overhead; "7b-width" has two language-model layers of LLaVA-7B's exact widths, so each layer's
# per-step work (and the bytes it reads) is the real model's, and decoding is bound by memory bandwidth.
MODEL_SPECS = ("bench", "7b-width")
DEFAULT_SPEC = "bench"


def synthetic_spec(name: str) -> Any:
    """The :class:`SyntheticSpec` named ``name`` (one of :data:`MODEL_SPECS`)."""
    from benchmarks.synthetic import BENCH

    if name == "bench":
        return BENCH
    if name == "7b-width":
        # Vicuna-7B, LLaVA-1.5-7B's language model: full multi-head attention (32 KV heads). The vision tower
        # stays BENCH's: it runs once per image, and decode speed is what this model is for.
        return dataclasses.replace(
            BENCH,
            text_hidden=4096,
            text_layers=2,
            text_heads=32,
            text_kv_heads=32,
            text_intermediate=11008,
            vocab_size=32000,
        )
    raise ValueError(f"unknown model spec {name!r}; choose one of {', '.join(MODEL_SPECS)}")


class BenchModelError(RuntimeError):
    """The model cannot be measured; ``str()`` says why and what to do."""


def prepare_synthetic(work_dir: Path, spec: Any = None) -> Path:
    """Build and convert the synthetic benchmark model under ``work_dir``; returns the folder of precisions.

    Nothing is downloaded: the checkpoint is generated locally (random weights, a locally trained
    tokenizer) and converted with the project's own ``convert``, exactly as a real release would be.
    A previous complete build of the same spec is reused.
    """
    from benchmarks.synthetic import BENCH, build_checkpoint, parameter_count
    from bot.engine.convert import convert

    spec = BENCH if spec is None else spec
    work_dir = Path(work_dir)
    out, checkpoint, stamp = work_dir / "ov", work_dir / "checkpoint", work_dir / _STAMP
    wanted = repr(spec)
    try:
        recorded = json.loads(stamp.read_text())
        previous = recorded.get("spec")
    except (OSError, ValueError, AttributeError):
        recorded, previous = {}, None
    if previous == wanted and variants.available(out) == list(variants.PRECISIONS):
        log.info("reusing the benchmark model in %s", out)
        if "parameters" not in recorded:
            stamp.write_text(json.dumps({"spec": wanted, "parameters": parameter_count(spec)["total"]}) + "\n")
        return out
    if previous is not None and previous != wanted:
        log.info("the benchmark model in %s was built from another spec; rebuilding it", work_dir)
        shutil.rmtree(work_dir)
    stamp.unlink(missing_ok=True)
    if not (checkpoint / "config.json").exists():
        log.info("building the synthetic benchmark checkpoint in %s", checkpoint)
        build_checkpoint(checkpoint, spec)
    convert(str(checkpoint), out, variants.PRECISIONS)
    parameters = parameter_count(spec)["total"]
    stamp.write_text(json.dumps({"spec": wanted, "parameters": parameters}) + "\n")
    # The float32 checkpoint is four times the FP16 model and only needed to convert again.
    shutil.rmtree(checkpoint, ignore_errors=True)
    return out


def check_model_dir(model_dir: Path, precisions: list[str]) -> list[str]:
    """The wanted precisions that ``model_dir`` holds complete; raises when it holds none of them."""
    model_dir = Path(model_dir)
    if variants.is_complete(model_dir):
        raise BenchModelError(
            f"{model_dir} is one precision folder; pass the folder that holds FP16, INT8 and INT4 ({model_dir.parent})"
        )
    found = variants.available(model_dir)
    usable = [p for p in precisions if p in found]
    if not usable:
        raise BenchModelError(
            f"{variants.describe_missing(model_dir)}; a model folder made by `llava-bot convert` holds "
            f"{', '.join(variants.PRECISIONS)}"
        )
    missing = [p for p in precisions if p not in found]
    if missing:
        log.warning("%s has no complete %s; measuring %s only", model_dir, ", ".join(missing), ", ".join(usable))
    return usable


def describe_model(model_dir: Path, precisions: list[str], synthetic: bool, spec_name: str = DEFAULT_SPEC) -> ModelInfo:
    """What the report says about the model: family, image tokens, vocabulary and weight sizes."""
    model_dir = Path(model_dir)
    sizes = {}
    for precision in precisions:
        weights = model_dir / precision / f"{LANGUAGE_MODEL}.bin"
        if weights.is_file():
            sizes[precision] = weights.stat().st_size
    config: dict[str, Any] = {}
    for precision in precisions:
        try:
            config = json.loads((model_dir / precision / "config.json").read_text())
            break
        except (OSError, ValueError):
            continue
    text = config.get("text_config") or {}
    vision = config.get("vision_config") or {}
    image_tokens = config.get("image_seq_length")
    if image_tokens is None and vision.get("image_size") and vision.get("patch_size"):
        image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    parts = [str(config.get("model_type", "unknown model"))]
    if text.get("hidden_size"):
        parts.append(f"LM {text.get('num_hidden_layers')}x{text['hidden_size']}")
    if vision.get("image_size"):
        parts.append(f"{vision['image_size']} px")
    if image_tokens:
        parts.append(f"{image_tokens} image tokens")
    if text.get("vocab_size"):
        parts.append(f"{text['vocab_size'] // 1000}k vocab")
    kind = f"synthetic random-weight model ({spec_name} spec)" if synthetic else "converted model"
    try:
        # The synthetic model's folder of precisions sits in the work dir, beside the stamp.
        parameters = json.loads((model_dir.parent / _STAMP).read_text()).get("parameters") if synthetic else None
    except (OSError, ValueError, AttributeError):
        parameters = None
    if parameters:
        parts.append(f"{parameters / 1e6:.0f}M parameters")
    return ModelInfo(
        path=str(model_dir),
        synthetic=synthetic,
        description=f"{kind}: {', '.join(parts)}",
        model_type=config.get("model_type"),
        image_tokens=image_tokens,
        vocab_size=text.get("vocab_size"),
        hidden_size=text.get("hidden_size"),
        language_model_bytes=sizes,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.model --work-dir DIR``: prepare the synthetic model, print the folder of precisions.

    The benchmark runs this in a process of its own so that the gigabyte of PyTorch state that building and
    converting leave behind does not sit beside the measurements.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model", description="Prepare the benchmark model.")
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--spec", choices=MODEL_SPECS, default=DEFAULT_SPEC, help="which synthetic model")
    parser.add_argument("--result", help='write {"folder": ...} as JSON here instead of printing the folder')
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LLAVA_BOT_BENCH_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    folder = prepare_synthetic(Path(args.work_dir), synthetic_spec(args.spec))
    if args.result:
        Path(args.result).write_text(json.dumps({"folder": str(folder)}) + "\n")
    else:
        print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
