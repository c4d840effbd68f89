"""The libraries whose arithmetic node outputs depend on, as really installed.

One list serves the cache keys (an upgrade must not serve results the old versions made)
and the run manifests saved with images. Some libraries install under several names
(OpenCV as opencv-python, -headless, -contrib...): the first one installed counts.
"""
from __future__ import annotations

import functools
import sys
from importlib import metadata

LIBRARIES: dict[str, tuple[str, ...]] = {
    "nodegraph": ("nodegraph",),
    "torch": ("torch",),
    "diffusers": ("diffusers",),
    "transformers": ("transformers",),
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless", "opencv-contrib-python"),
    "pillow": ("pillow", "Pillow-SIMD"),
    "numpy": ("numpy",),
    "safetensors": ("safetensors",),
}


@functools.cache
def library_versions() -> dict[str, str]:
    """{library: "version"} ("?" when not installed), plus the Python version."""
    found = {"python": sys.version.split()[0]}
    for library, distributions in LIBRARIES.items():
        found[library] = "?"
        for name in distributions:
            try:
                found[library] = f"{metadata.version(name)}" + ("" if name == distributions[0] else f" ({name})")
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def library_versions_text() -> str:
    return ",".join(f"{k}={v}" for k, v in library_versions().items())


def version() -> str:
    """nodegraph's own version."""
    try:
        return metadata.version("nodegraph")
    except metadata.PackageNotFoundError:
        return "0+unknown"
