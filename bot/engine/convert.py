"""Convert a Hugging Face LLaVA checkpoint to OpenVINO IR and compress it with NNCF.

Result: ``OUT/FP16``, ``OUT/INT8`` and ``OUT/INT4``, each a complete folder that both engines load.
Every variant is built in a hidden ``.NAME.partial`` folder and renamed into place only once its
manifest is written, so an interrupted run (Ctrl-C, kill, full disk) never leaves a folder that
looks complete but isn't.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bot.engine import variants

log = logging.getLogger(__name__)

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
SUPPORTED_FAMILIES = ("llava", "llava_next")
LANGUAGE_MODEL = "openvino_language_model"

# The reference recipe: every layer of the language model, INT4 asymmetric in groups of 128.
INT4_GROUP_SIZE = 128


class ConversionError(RuntimeError):
    """A problem the operator can fix; ``str()`` says what and how."""


Progress = Callable[[str], None]


def _log_progress(message: str) -> None:
    log.info("%s", message)


def check_model(model: str) -> dict[str, object]:
    """Load the model's config and make sure it is a LLaVA-family image-text-to-text model."""
    try:
        family = _model_type(model)
    except (OSError, ValueError) as error:
        where = "a local folder" if Path(model).exists() else "a Hugging Face model id that could be reached"
        raise ConversionError(
            f"Could not load model {model!r}: it is not {where} with a config.json ({error.__class__.__name__})."
        ) from error
    if family not in SUPPORTED_FAMILIES:
        raise ConversionError(
            f"{model!r} is a {family!r} model, not an image-text-to-text LLaVA-family model "
            f"(supported: {', '.join(SUPPORTED_FAMILIES)})."
        )
    return {"model_type": family}


def _model_type(model: str) -> object:
    """The config's ``model_type``. A local folder's config.json is read as it is: asking transformers would
    import PyTorch and most of transformers, ten seconds before any work starts."""
    folder = Path(model)
    if folder.is_dir():
        config = json.loads((folder / "config.json").read_text())  # a missing file is an OSError
        if not isinstance(config, dict):
            raise ValueError("config.json is not a JSON object")
        return config.get("model_type")
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model), "model_type", None)


def _checkpoint_bytes(model: str) -> int | None:
    """Size of a local checkpoint's weights, used to check the disk before starting."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in {".safetensors", ".bin"})


def _ensure_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConversionError(f"Cannot write to {out}: {error.strerror or error}.") from error


def _ensure_space(out: Path, needed: int | None, what: str) -> None:
    if needed is None:
        return
    free = shutil.disk_usage(out).free
    if free < needed:
        raise ConversionError(
            f"Not enough disk space under {out} for {what}: about {needed / 1e9:.1f} GB needed, "
            f"{free / 1e9:.1f} GB free."
        )


def _remove_stale_partials(out: Path) -> None:
    for stale in out.glob(".*.partial"):
        log.info("Removing %s left by an interrupted conversion", stale)
        shutil.rmtree(stale, ignore_errors=True)


def write_preprocessor_config(folder: Path) -> None:
    """Give openvino-genai the image settings it reads from ``preprocessor_config.json``.

    transformers 5 writes them only inside ``processor_config.json``; without this file genai falls
    back to built-in image sizes that don't match the model.
    """
    target = folder / "preprocessor_config.json"
    if target.exists():
        return
    processor_config = folder / "processor_config.json"
    if not processor_config.exists():
        raise ConversionError(f"{folder} has neither preprocessor_config.json nor processor_config.json.")
    data = json.loads(processor_config.read_text())
    image_settings = data.get("image_processor")
    if not isinstance(image_settings, dict):
        raise ConversionError(f"{processor_config} has no image_processor section.")
    # The processor-level keys (patch size, extra image tokens) are needed to expand <image> right.
    merged = {k: v for k, v in data.items() if k not in {"image_processor", "chat_template"}}
    merged.update(image_settings)
    target.write_text(json.dumps(merged, indent=2))


def _export_fp16(model: str, partial: Path, progress: Progress) -> None:
    command = [
        sys.executable, "-m", "optimum.commands.optimum_cli",
        "export", "openvino", "--model", model, "--task", "image-text-to-text",
        "--weight-format", "fp16", str(partial),
    ]  # fmt: skip
    progress(f"Exporting {model} to OpenVINO FP16 (this loads the whole model; it can take a while)")
    # A child process frees all of PyTorch's memory when it ends, before compression needs it.
    result = subprocess.run(command, check=False, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        if "No space left" in result.stderr:
            raise ConversionError(f"The disk under {partial.parent} filled up during export.")
        raise ConversionError(f"Export of {model} failed (exit code {result.returncode}):\n{tail}")
    if result.stderr:
        log.debug("optimum-cli stderr:\n%s", result.stderr)


def _compress(fp16: Path, partial: Path, precision: str, progress: Progress) -> dict[str, object]:
    import nncf
    import openvino as ov

    partial.mkdir(parents=True)
    for item in fp16.iterdir():
        if item.name.startswith(LANGUAGE_MODEL) or item.name == variants.MANIFEST:
            continue
        if item.is_dir():
            shutil.copytree(item, partial / item.name)
        else:
            shutil.copy2(item, partial / item.name)
    if precision == "INT4":
        recipe: dict[str, object] = {
            "mode": "INT4_ASYM", "group_size": INT4_GROUP_SIZE, "ratio": 1.0, "all_layers": True,
        }  # fmt: skip
    else:
        recipe = {"mode": "INT8_ASYM"}
    progress(f"Compressing the language model to {precision} with NNCF ({recipe})")
    model = ov.Core().read_model(fp16 / f"{LANGUAGE_MODEL}.xml")
    kwargs = dict(recipe)
    kwargs["mode"] = getattr(nncf.CompressWeightsMode, str(recipe["mode"]))
    compressed = nncf.compress_weights(model, **kwargs)
    ov.save_model(compressed, partial / f"{LANGUAGE_MODEL}.xml")
    return recipe


def _finish(partial: Path, final: Path, info: dict[str, object]) -> None:
    write_preprocessor_config(partial)
    variants.write_manifest(partial, info)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)  # atomic on one file system: the folder appears complete or not at all


def convert(
    model: str,
    out: Path,
    precisions: Sequence[str] = variants.PRECISIONS,
    progress: Progress = _log_progress,
) -> dict[str, str]:
    """Convert ``model`` into ``out/<PRECISION>`` folders; returns what happened to each precision."""
    wanted = [variants.normalise_precision(p) for p in precisions]
    out = Path(out)
    _ensure_writable(out)
    _remove_stale_partials(out)
    outcome: dict[str, str] = {}
    todo = [p for p in wanted if not variants.is_complete(out / p)]
    for precision in wanted:
        if precision not in todo:
            progress(f"{precision}: already converted in {out / precision}, skipped")
            outcome[precision] = "skipped"
    if not todo:
        return outcome
    details = check_model(model)
    weights = _checkpoint_bytes(model)
    fp16 = out / "FP16"
    started = time.monotonic()
    try:
        if not variants.is_complete(fp16):
            # The fp16 IR is about half an fp32 checkpoint; leave room for the compressed copies too.
            _ensure_space(out, None if weights is None else int(weights * 1.2), "the FP16 export")
            partial = out / ".FP16.partial"
            _export_fp16(model, partial, progress)
            _finish(partial, fp16, {"precision": "FP16", "source": model, **details})
            outcome["FP16"] = "converted"
            progress(f"FP16 ready in {fp16} ({time.monotonic() - started:.0f} s)")
        for precision in (p for p in todo if p != "FP16"):
            lm_bytes = (fp16 / f"{LANGUAGE_MODEL}.bin").stat().st_size
            others = sum(p.stat().st_size for p in fp16.iterdir() if not p.name.startswith(LANGUAGE_MODEL))
            _ensure_space(out, int(lm_bytes * 0.6) + others, f"the {precision} copy")
            partial = out / f".{precision}.partial"
            recipe = _compress(fp16, partial, precision, progress)
            _finish(partial, out / precision, {"precision": precision, "source": model, **details, **recipe})
            outcome[precision] = "converted"
            progress(f"{precision} ready in {out / precision} ({time.monotonic() - started:.0f} s)")
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise ConversionError(f"The disk under {out} filled up; free some space and run again.") from error
        raise ConversionError(f"Conversion failed writing under {out}: {error}") from error
    finally:
        _remove_stale_partials(out)
    # FP16 may have been built only as the source of the compressed ones; keep it: /precision offers it.
    return outcome
