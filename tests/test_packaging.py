"""`pip install .` gives a working bot: the wheel carries every package and the database migrations."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from bot.store.db import head_revision
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of the sources so the checkout stays clean."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("bot", "migrations"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
    )
    (built,) = out.glob("llava_bot-*.whl")
    return built


def test_the_wheel_holds_every_package_and_migration(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "bot").rglob("__init__.py"))
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not missing, f"packages left out of the wheel: {missing}"
    revisions = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("0*.py"))
    assert revisions, "the source tree holds no migrations"
    for name in revisions:
        assert f"bot/migrations/versions/{name}" in names
    assert "bot/migrations/env.py" in names and "bot/migrations/script.py.mako" in names


def install_in_new_venv(wheel: Path, venv: Path) -> Path:
    """A new virtual environment holding only ``wheel``; returns its Python.

    With uv (the README installs it beside the interpreter) when there is one: ``venv`` would first install pip
    into the new environment, which takes seconds.
    """
    uv = Path(sys.executable).parent / "uv"
    found = str(uv) if uv.exists() else shutil.which("uv")
    python = venv / "bin" / "python"
    if found:
        subprocess.run([found, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
        subprocess.run(
            [found, "pip", "install", "-q", "--python", str(python), "--no-deps", "--offline", str(wheel)], check=True
        )
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    return python


def test_an_installed_wheel_migrates_its_database(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    python = install_in_new_venv(wheel, venv)
    # The dependencies come from the test environment (installing them again would take minutes); the
    # project itself only from the wheel, since the new environment's own packages come first on its path.
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    dependencies = [path for path in sys.path if path.endswith("site-packages")] or [sysconfig.get_path("purelib")]
    (site / "test-dependencies.pth").write_text("\n".join(dependencies) + "\n")
    work = tmp_path / "work"  # not the checkout, so nothing can be imported from the sources
    work.mkdir()
    where = subprocess.run(
        [python, "-c", "import bot; print(bot.__file__)"], cwd=work, check=True, capture_output=True, text=True
    ).stdout
    assert where.startswith(str(venv)), where
    (work / "config.toml").write_text(f'[database]\nurl = "sqlite+aiosqlite:///{work / "bot.sqlite3"}"\n')
    cli = venv / "bin" / "llava-bot"

    empty = subprocess.run([cli, "db", "current"], cwd=work, capture_output=True, text=True, timeout=120, check=False)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.strip() == "(empty database)"

    upgraded = subprocess.run(
        [cli, "db", "upgrade"], cwd=work, capture_output=True, text=True, timeout=120, check=False
    )
    assert upgraded.returncode == 0, upgraded.stderr
    current = subprocess.run([cli, "db", "current"], cwd=work, capture_output=True, text=True, timeout=120, check=False)
    assert current.returncode == 0, current.stderr
    assert current.stdout.strip() == head_revision()
    assert "never awaited" not in current.stderr


def test_serving_needs_no_pytorch_stack_and_the_convert_extra_brings_it(wheel: Path) -> None:
    """`pip install llava-bot` serves without PyTorch; `llava-bot[convert]` (and `dev`) add conversion."""
    (metadata,) = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA")]
    requirements = [
        line.split(":", 1)[1].strip()
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]

    def names(extra: str | None) -> set[str]:
        chosen = [r for r in requirements if (f'extra == "{extra}"' in r if extra else "extra ==" not in r)]
        return {r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip() for r in chosen}

    conversion = {"optimum-intel", "nncf", "transformers", "torch"}
    assert not names(None) & conversion
    assert {"openvino", "openvino-genai", "openvino-tokenizers", "jinja2", "numpy", "pillow"} <= names(None)
    assert {"optimum-intel", "nncf", "transformers"} <= names("convert")
    assert "llava-bot" in names("dev")
