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
def gc_set(enabled: bool) -> Iterator[None]:
    """Turn the collector on or off for a block, then restore what it was."""
    was_enabled = gc.isenabled()
    _switch(enabled)
    try:
        yield
    finally:
        _switch(was_enabled)


def _switch(enabled: bool) -> None:
    if enabled:
        gc.enable()
    else:
        gc.disable()


def gc_paused() -> contextlib.AbstractContextManager:
    return gc_set(False)


def gc_resumed() -> contextlib.AbstractContextManager:
    """Inside gc_paused: collection back on for a block (a node's own work)."""
    return gc_set(True)
