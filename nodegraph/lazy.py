"""Heavy libraries (torch, numpy, OpenCV, Pillow, diffusers) imported on first use, not on import.

Node modules write ``torch = lazy("torch")`` instead of ``import torch``: validating a workflow,
listing nodes or printing the schema then imports none of them, and a run imports what the
nodes it runs really use.
"""
from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands for a module; the first attribute read imports it."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_module", None)

    def _load(self) -> Any:
        module = self._module
        if module is None:
            module = importlib.import_module(self._name)
            object.__setattr__(self, "_module", module)
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"


def lazy(name: str) -> Any:
    """A stand-in for ``import name`` that imports on first use."""
    return LazyModule(name)
