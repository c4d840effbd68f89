"""Bounds on the work one workflow may ask for, each with a clear error and a setting to raise it.

Checked at validation where the numbers are known (node counts after group expansion, literal
sizes) and at run time where they are not (decoded images, sizes that come through links).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

from .errors import NodeError


@dataclass(frozen=True)
class Limits:
    """``max_nodes``: nodes after group expansion. ``max_pixels``: width x height x batch of one image,
    mask or latent batch that a node decodes or creates (2**25 is 8192 x 4096; as float32 RGB, 400 MB)."""

    max_nodes: int = 100_000
    max_pixels: int = 2**25

    def pixels_problem(self, width: int, height: int, batch: int = 1) -> str | None:
        total = int(width) * int(height) * max(int(batch), 1)
        if total <= self.max_pixels:
            return None
        size = f"{width}x{height}" + (f" x {batch} images" if batch > 1 else "")
        return (f"{size} ({total:,} pixels) is larger than the limit of {self.max_pixels:,} pixels; make it smaller, "
                "or raise the limit (--max-pixels, or Engine(limits=Limits(max_pixels=...)))")

    def check_pixels(self, width: int, height: int, batch: int = 1, what: str = "the image") -> None:
        problem = self.pixels_problem(width, height, batch)
        if problem:
            raise NodeError(f"{what}: {problem}")


_CURRENT: contextvars.ContextVar[Limits] = contextvars.ContextVar("nodegraph_limits", default=Limits())


def current_limits() -> Limits:
    """The limits of the validation or run in progress (the defaults outside one)."""
    return _CURRENT.get()


@contextlib.contextmanager
def limits_in_force(limits: Limits) -> Iterator[None]:
    token = _CURRENT.set(limits)
    try:
        yield
    finally:
        _CURRENT.reset(token)
