"""Shared fixtures: tiny randomly initialised LLaVA models converted with the real `llava-bot convert`."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw
from xdist.scheduler import LoadFileScheduling

from tests.postgres import PostgresServer

# No test may reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
# Outside the checkout, so that every clone on the machine (and CI's fresh one) builds the tiny models once.
CACHE = Path(
    os.environ.get("LLAVA_BOT_TEST_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llava-bot" / "test-models"
)
# What the converted files depend on besides our own code.
CONVERSION_PACKAGES = ("torch", "transformers", "optimum", "optimum-intel", "nncf", "openvino", "openvino-tokenizers")
# Exact comparison with the PyTorch reference needs f32 inference (the CPU defaults to bf16).
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
# Modules that import transformers' LLaVA classes (5-15 s per process) or load its PyTorch reference models.
USES_TRANSFORMERS = frozenset(
    f"tests/engine/{name}.py"
    for name in ("test_engines", "test_batching", "test_preprocess", "test_chat_cli", "test_convert", "test_synthetic")
)


class _ModulesAndTransformers(LoadFileScheduling):
    """`--dist loadfile`, except that the USES_TRANSFORMERS modules go to one test process together, which then
    pays for transformers and the reference models once."""

    def _split_scope(self, nodeid: str) -> str:
        module = super()._split_scope(nodeid)
        return "transformers" if module in USES_TRANSFORMERS else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> LoadFileScheduling | None:
    return _ModulesAndTransformers(config, log) if config.getvalue("dist") == "loadfile" else None


def _cache_key(spec: object) -> str:
    """Rebuild the cached model whenever the builder, the converter or a conversion package changes."""
    digest = hashlib.sha256(repr(spec).encode())
    for source in ("benchmarks/synthetic.py", "bot/engine/convert.py", "bot/engine/variants.py"):
        digest.update((ROOT / source).read_bytes())
    for package in CONVERSION_PACKAGES:
        digest.update(f"{package}=={metadata.version(package)}".encode())
    return digest.hexdigest()[:16]


def converted_model(name: str, spec: object) -> tuple[Path, Path]:
    """Build the checkpoint for ``spec`` and convert it with the CLI; cached between runs."""
    base = CACHE / f"{name}-{_cache_key(spec)}"
    checkpoint, out = base / "checkpoint", base / "ov"
    CACHE.mkdir(parents=True, exist_ok=True)
    # Test processes running side by side (pytest -n) build the model once: the others wait for it.
    with (CACHE / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _build(name, spec, base, checkpoint, out)
        os.utime(base)  # in use: kept by _prune
    return checkpoint, out


def _build(name: str, spec: object, base: Path, checkpoint: Path, out: Path) -> None:
    """Build the checkpoint and convert it, whatever of that is missing (called under the lock)."""
    from benchmarks.synthetic import build_checkpoint
    from bot.engine import variants

    if not (checkpoint / "config.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        _prune(name)
        build_checkpoint(checkpoint, spec)  # type: ignore[arg-type]
    if variants.available(out) != list(variants.PRECISIONS):
        subprocess.run(
            [sys.executable, "-m", "bot", "convert", str(checkpoint), "--out", str(out)],
            check=True,
            cwd=ROOT,
        )


def _prune(name: str) -> None:
    """Remove this model's other builds that no checkout has used for a week (others may be in use)."""
    week_ago = time.time() - 7 * 24 * 3600
    for stale in CACHE.glob(f"{name}-*"):
        if stale.is_dir() and stale.stat().st_mtime < week_ago:
            shutil.rmtree(stale, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_llava() -> tuple[Path, Path]:
    """(transformers checkpoint, folder holding FP16/INT8/INT4) of a tiny LLaVA-1.5-shaped model."""
    from benchmarks.synthetic import TINY

    return converted_model("llava", TINY)


@pytest.fixture(scope="session")
def tiny_llava_next() -> tuple[Path, Path]:
    """The same for a tiny LLaVA-NeXT (v1.6) model."""
    from benchmarks.synthetic import TINY_NEXT

    return converted_model("llava_next", TINY_NEXT)


@pytest.fixture
def scripted_engine(monkeypatch: pytest.MonkeyPatch) -> str:
    """Registers the scripted engine (tests/support/scripted.py) for this test; returns its name."""
    from bot.engine.manager import ENGINES
    from tests.support.scripted import ENTRY, NAME

    monkeypatch.setitem(ENGINES, NAME, ENTRY)
    return NAME


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole test session (see tests/postgres.py)."""
    server = PostgresServer()
    server.start()
    yield server
    server.stop()


def sample_image(size: tuple[int, int] = (120, 90), seed: int = 0) -> Image.Image:
    """A small deterministic picture with shapes and colours."""
    image = Image.new("RGB", size, (30 + seed * 40 % 200, 120, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, size[0] // 2, size[1] // 2), fill=(250, 200, 20))
    draw.ellipse((size[0] // 3, size[1] // 3, size[0] - 5, size[1] - 5), fill=(200, 30, 60 + seed))
    return image
