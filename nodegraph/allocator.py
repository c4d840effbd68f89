"""Freed memory kept for reuse (glibc, i.e. most Linux systems).

A sampler step on the CPU allocates and frees some hundreds of MB of temporaries. With glibc's defaults,
blocks over 128 KB get a mapping of their own and memory at the top of the heap goes back to the system
once 128 KB of it are free, so every step maps those pages again and faults each one in; where touching a
fresh page is dear (a virtual machine: about 7 µs a page on the one the figures come from) that doubles a
step: an SD 1.5-sized UNet evaluation on 2 cores took 0.78 s with the defaults and 0.35 s with these
settings. Blocks up to 32 MiB then come from the heap, and up to 1 GiB freed at its top stays mapped for
the next step. Set NODEGRAPH_MALLOC_TUNING=0 to keep glibc's defaults (or set them with GLIBC_TUNABLES).
It works for what is allocated after it, so the Engine applies it once, before any model loads.
"""
from __future__ import annotations

import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # glibc's largest
TRIM_THRESHOLD = 1 << 30
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the thresholds once per process; whether they are in effect (False off glibc or when turned off)."""
    global _applied
    if _applied is None:
        _applied = False
        if os.environ.get("NODEGRAPH_MALLOC_TUNING", "1") != "0":
            import ctypes

            try:
                mallopt = ctypes.CDLL(None).mallopt  # glibc's; musl and macOS have none
            except (OSError, AttributeError):
                return False
            _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                      TRIM_THRESHOLD))
    return _applied
