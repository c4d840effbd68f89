"""Pause Python's cyclic garbage collector during engine bookkeeping.

Validating or planning a 10,000-node graph allocates many small objects that live
until the run ends; each collection then rescans all of them, which made the cost
per node grow with the graph. Node code itself always runs with the collector on.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def gc_resumed() -> Iterator[None]:
    """Inside gc_paused: turn collection back on for a block (a node's own work)."""
    was_enabled = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        if not was_enabled:
            gc.disable()
