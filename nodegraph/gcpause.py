"""Pause Python's cyclic garbage collector during engine bookkeeping.

Validating or planning a large graph allocates many small objects that live until the run
ends; each collection would rescan all of them. Pauses are counted, so runs that overlap in
several threads never leave the collector switched off: it comes back on when the last pause
ends (if it was on before the first), and is on inside any ``gc_resumed`` block (node code).
"""
from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

_lock = threading.Lock()
_paused = 0
_resumed = 0
_was_enabled = True


def _apply() -> None:
    if _resumed or (not _paused and _was_enabled):
        gc.enable()
    else:
        gc.disable()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    global _paused, _was_enabled
    with _lock:
        if _paused == 0 and _resumed == 0:
            _was_enabled = gc.isenabled()
        _paused += 1
        _apply()
    try:
        yield
    finally:
        with _lock:
            _paused -= 1
            _apply()


@contextlib.contextmanager
def gc_resumed() -> Iterator[None]:
    """Collection on for a block (a node's own work), whatever pauses are in force around it."""
    global _resumed
    with _lock:
        _resumed += 1
        _apply()
    try:
        yield
    finally:
        with _lock:
            _resumed -= 1
            _apply()
