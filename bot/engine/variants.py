"""Precision variants of a converted model: which exist, and whether a folder is complete."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PRECISIONS = ("INT4", "INT8", "FP16")

# Written last, just before the folder is moved into place: its presence means "complete".
MANIFEST = "llava_bot_variant.json"

# Files both engines need; a manifest that lists fewer is not ours or is damaged.
REQUIRED_FILES = (
    "config.json",
    "openvino_language_model.xml",
    "openvino_language_model.bin",
    "openvino_text_embeddings_model.xml",
    "openvino_vision_embeddings_model.xml",
    "openvino_tokenizer.xml",
    "openvino_detokenizer.xml",
    "preprocessor_config.json",
)


def normalise_precision(value: str) -> str:
    """Turn user spellings (``int4``, ``Int8``) into the folder name, or raise ValueError."""
    upper = value.strip().upper()
    if upper not in PRECISIONS:
        raise ValueError(f"unknown precision {value!r}; choose one of {', '.join(PRECISIONS)}")
    return upper


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The variant's manifest, or None when the folder is missing, partial or not a variant."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(folder: Path) -> bool:
    """True when ``folder`` is a finished conversion whose files are all still there."""
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(name in files for name in REQUIRED_FILES):
        return False
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def write_manifest(folder: Path, info: dict[str, Any]) -> None:
    """Record every file's size so a truncated copy is never mistaken for a complete one."""
    files = {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({**info, "files": files}, indent=2))


def available(model_dir: Path) -> list[str]:
    """Precisions that exist, complete, under ``model_dir`` (in INT4, INT8, FP16 order)."""
    return [p for p in PRECISIONS if is_complete(model_dir / p)]


def describe_missing(folder: Path) -> str:
    """One sentence naming what is wrong with a folder that should hold a converted model."""
    if not folder.exists():
        return f"{folder} does not exist"
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if available(folder):
        return f"{folder} holds precision folders ({', '.join(available(folder))}); pass one of them"
    if read_manifest(folder) is None:
        return f"{folder} is not a converted model (no {MANIFEST}; the conversion may have been interrupted)"
    return f"{folder} is incomplete or damaged (files missing or truncated)"
