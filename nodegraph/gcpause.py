"""Keep Python's cyclic garbage collector off the engine's bookkeeping.

Validating or planning a large graph allocates many small objects that live as long as the
graph. With the collector on, each collection would rescan them, so the cost per node would
grow with the graph. During bookkeeping the collector is paused; when the last pause ends,
everything allocated meanwhile is moved straight to the oldest generation (``gc.freeze()``
then ``gc.unfreeze()``: no scan), where only the interpreter's rare full collections look at
it. Pauses are counted, so runs that overlap in several threads never leave the collector off.
Node code runs with the collector as the process has it.
"""
from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

_lock = threading.Lock()
_paused = 0
_was_enabled = True


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    global _paused, _was_enabled
    with _lock:
        if _paused == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        yield
    finally:
        with _lock:
            _paused -= 1
            if _paused == 0:
                gc.freeze()  # promote what the pause allocated to the oldest generation, unscanned
                gc.unfreeze()
                if _was_enabled:
                    gc.enable()


_frozen = 0


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """Keep every object alive now out of the collector's reach for a block (``gc.freeze``): the collections
    that a run's own allocations trigger then scan only what the run made since, never the graph, its keys
    and the caches. Counted across threads: the last block to end gives the objects back to the oldest
    generation (``gc.unfreeze``), where the interpreter's rare full collections see them."""
    global _frozen
    with _lock:
        _frozen += 1
        gc.freeze()
    try:
        yield
    finally:
        with _lock:
            _frozen -= 1
            if _frozen == 0:
                gc.unfreeze()
