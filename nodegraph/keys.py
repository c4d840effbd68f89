"""Cache keys: what a node's output depends on, hashed. Never the node id.

key = hash(type, version, device, dtype, library versions,
           literal params (validated, defaults filled in),
           for each link: input name + source key + output name,
           content hash of each file the node reads)

Keys are computed once per node from its parents' keys, so the cost is linear in
the number of nodes however long the chain.
"""
from __future__ import annotations

import functools
import hashlib
import os
from importlib import metadata
from pathlib import Path

from .validate import GraphNode

_FILE_HASHES: dict[tuple[str, int, int], str] = {}
_LIBRARIES = ("nodegraph", "torch", "diffusers", "transformers", "opencv-python-headless", "pillow")


@functools.cache
def library_versions() -> str:
    """Versions of the libraries whose arithmetic node outputs depend on: part of every key, so
    an upgrade does not serve results made by the old versions from the disk cache."""
    found = []
    for name in _LIBRARIES:
        try:
            found.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name}=?")
    return ",".join(found)


def node_key(node: GraphNode, parent_keys: dict[str, str], run_salt: str, files: dict[str, str]) -> str:
    definition = node.definition
    links = sorted((name, parent_keys[src], output) for name, (src, output) in node.links.items())
    payload = repr((definition.type_name, definition.version, run_salt, node.canonical, links, sorted(files.items())))
    return hashlib.sha256(payload.encode()).hexdigest()


def path_fingerprint(path: str) -> str:
    """Content hash of a file; for a folder, the hashes of the files in it."""
    p = Path(path)
    if p.is_file():
        return file_hash(p)
    if p.is_dir():
        digest = hashlib.sha256()
        for root, dirs, names in os.walk(p):  # iterative; sorted for a stable order
            dirs.sort()
            for name in sorted(names):
                child = Path(root) / name
                digest.update(str(child.relative_to(p)).encode())
                digest.update(file_hash(child).encode())
        return digest.hexdigest()
    return f"absent:{path}"  # a hub id, say: the name is its identity


# Model files run to gigabytes; hashing one whole costs seconds per process. Past this
# size a file is fingerprinted by its size, modification time and first and last
# SAMPLE bytes (a safetensors header, which lists every tensor, sits at the start).
LARGE_FILE = 256 * 1024**2
SAMPLE = 8 * 1024**2


def file_hash(path: Path) -> str:
    """SHA-256 of a file's content (a sampled fingerprint for large files), remembered per
    (path, size, mtime) for this process."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    cached = _FILE_HASHES.get(memo)
    if cached is None:
        with open(path, "rb") as handle:
            if stat.st_size < LARGE_FILE:
                cached = hashlib.file_digest(handle, "sha256").hexdigest()
            else:
                digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
                digest.update(handle.read(SAMPLE))
                handle.seek(-SAMPLE, os.SEEK_END)
                digest.update(handle.read(SAMPLE))
                cached = "sampled:" + digest.hexdigest()
        _FILE_HASHES[memo] = cached
    return cached
