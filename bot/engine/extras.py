"""Which optional parts of the install are present: conversion and the reference engine need PyTorch's stack."""

from __future__ import annotations

import importlib.util

CONVERT_INSTALL = "pip install 'llava-bot[convert]'"
# Import names of what `convert` and the `optimum` engine need beyond the serving install.
CONVERT_MODULES = ("torch", "transformers", "optimum.intel", "nncf")


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing or half-installed
        return False


def missing_convert_modules() -> list[str]:
    """The conversion packages that cannot be imported here (without importing them)."""
    return [module for module in CONVERT_MODULES if not _present(module)]


def convert_extra_missing(what: str) -> str | None:
    """A one-line explanation when ``what`` cannot run for lack of the conversion packages, else None."""
    missing = missing_convert_modules()
    if not missing:
        return None
    return f"{what} needs {', '.join(missing)}, which this install lacks; install them with: {CONVERT_INSTALL}"
