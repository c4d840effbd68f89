"""Cache keys: what a node's output depends on, hashed. Never the node id.

key = hash(cache format, node type, version, fingerprint of the node's code,
           device, dtype, versions of the libraries really installed,
           literal params (validated, defaults filled in),
           for each link: input name + source key + output name,
           content fingerprint of each file the node reads)

Keys are computed once per node from its parents' keys, so the cost is linear in the
number of nodes however long the chain. All key text is made here.
"""
from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path
from typing import Any

from .versions import library_versions_text

CACHE_FORMAT = 2  # bump when what a key covers, or how results are stored, changes


def canonical_params(params: dict[str, Any]) -> str:
    """Validated params, defaults included, as text: an omitted default and the same value written out give
    one key; repr keeps NaN, inf and -inf apart (JSON would write all three as null)."""
    return repr(sorted(params.items()))


def run_salt(device: Any, dtype: Any) -> str:
    return f"{CACHE_FORMAT}|{device}|{dtype}|{library_versions_text()}"


def output_salt(salt: str, out_dir: Path) -> str:
    """Output nodes write into the run's folder: the same node into another folder is other work."""
    return f"{salt}|{Path(out_dir).resolve()}"


def node_key(type_name: str, version: int, code: str, canonical: str, links: list[tuple[str, str, str]],
             salt: str, files: dict[str, str]) -> str:
    """``links``: (input name, source key, output name) for each linked input."""
    payload = repr((type_name, version, code, salt, canonical, sorted(links), sorted(files.items())))
    return hashlib.sha256(payload.encode()).hexdigest()


@functools.cache
def code_fingerprint(module_name: str) -> str:
    """Hash of the source that computes a node's results: its module's package (every .py file in it), or
    the module's own file when it is not part of a package. Any change to the node library's code is a
    new fingerprint, so cached results of the old code are not served."""
    module = sys.modules.get(module_name)
    if module is None or not getattr(module, "__file__", None):
        return f"unknown:{module_name}"
    return _source_digest(*_source_location(module))


@functools.cache
def _source_digest(location: Path, whole_folder: bool) -> str:
    """The digest of a package's folder (hashed once for all of its modules) or of one file."""
    digest = hashlib.sha256()
    files = ([(p, str(p.relative_to(location))) for p in sorted(location.rglob("*.py")) if "__pycache__" not in p.parts]
             if whole_folder else [(location, location.name)])
    for path, shown in files:
        digest.update(shown.encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"<unreadable>")
    return digest.hexdigest()[:32]


def _source_location(module) -> tuple[Path, bool]:
    """The module's package folder (True), or its own file when it is not part of a package (False)."""
    file = Path(module.__file__).resolve()
    if getattr(module, "__path__", None):
        return file.parent, True
    parent = sys.modules.get(module.__name__.rpartition(".")[0])
    parent_file = getattr(parent, "__file__", None)
    if parent_file and getattr(parent, "__path__", None) and Path(parent_file).resolve().parent == file.parent:
        return file.parent, True
    return file, False
