"""Model files: the one policy on weight files (safetensors only; pickles such as .ckpt, .pt, .pth, .bin
are refused because unpickling can run arbitrary code), file identities, safetensors headers, and reading
a state dict tensor by tensor."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from nodegraph.errors import NodeError


def files_identity(paths: Iterable[Path]) -> tuple:
    """The content of the files and folders a model is loaded from (the same fingerprints the cache keys
    hold): a model edited in any way, even keeping sizes and times, or a changed config, is another load."""
    from nodegraph.files import path_fingerprint

    return tuple((str(Path(p).resolve()), path_fingerprint(str(p))) for p in paths)


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


def weights_file_problem(path: str | Path, what: str, instead: str) -> str | None:
    """Why a weights file is refused by its name (None: a .safetensors file). ``what`` names it ("checkpoint",
    "IP-Adapter"), ``instead`` says what to give instead."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return (f"'{p.name}' is a pickle {what}, which can run arbitrary code when loaded and is refused; {instead}")
    if p.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return f"'{p.name}' is not a .safetensors {what}; {instead}"
    return None


def weights_folder_problem(folder: Path, what: str, convert: str) -> str | None:
    """Why a folder of weights is refused (None: it holds .safetensors files). ``convert`` says how to convert
    a folder that holds only pickles."""
    if any(folder.glob("*.safetensors")):
        return None
    if any(p.suffix.lower() in PICKLE_SUFFIXES for p in folder.iterdir() if p.is_file()):
        return f"{what} '{folder}' holds only pickle weights (.bin, .ckpt), which are refused; convert them ({convert})"
    return f"{what} '{folder}' has no .safetensors weights"


MAX_HEADER = 100 * 1024**2  # safetensors' own limit on the JSON header


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file, without reading the weights (or importing torch): 8 bytes of
    little-endian header length, then the JSON header (tensor name -> dtype, shape, offsets; and the
    optional ``__metadata__``, a str -> str dict)."""
    return _header_and_layout(path)[0]


def _header_and_layout(path: Path) -> tuple[dict, int, int]:
    """The header, the offset where the tensors' data starts, and the file's size."""
    import json
    import struct

    from nodegraph.files import open_regular

    try:
        with open_regular(path) as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > MAX_HEADER:
                raise ValueError(f"a header of {size} bytes is more than safetensors allows")
            header = json.loads(handle.read(size))
            end_of_file = os.fstat(handle.fileno()).st_size
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return header, 8 + size, end_of_file
    except (OSError, ValueError, struct.error) as exc:  # a damaged or foreign header
        raise NodeError(f"cannot read '{path}' as safetensors: {exc}") from None


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from a .safetensors header, without reading the weights."""
    header = safetensors_header(path)
    try:
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (KeyError, TypeError, AttributeError) as exc:
        raise NodeError(f"cannot read '{path}' as safetensors: {exc}") from None


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The free-form ``__metadata__`` of a .safetensors header ({} when there is none)."""
    metadata = safetensors_header(path).get("__metadata__")
    return dict(metadata) if isinstance(metadata, dict) else {}


# safetensors dtype names -> torch dtype names
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_tensor_values(path: Path, name: str) -> list[float]:
    """The values of one small float32/float16/bfloat16 tensor of a .safetensors file, without torch (empty when
    the file has no such tensor)."""
    import array
    import json
    import struct

    from nodegraph.files import open_regular

    try:
        with open_regular(path) as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > MAX_HEADER:
                return []
            info = json.loads(handle.read(size)).get(name)
            if not isinstance(info, dict):
                return []
            start, end = info["data_offsets"]
            handle.seek(8 + size + start)
            data = handle.read(end - start)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return []
    if info.get("dtype") == "F32":
        return list(array.array("f", data))
    if info.get("dtype") == "F16":
        return list(struct.unpack(f"<{len(data) // 2}e", data))
    if info.get("dtype") == "BF16":
        return [struct.unpack("<f", b"\0\0" + data[i:i + 2])[0] for i in range(0, len(data), 2)]
    return []


def read_state_dict(path: Path, dtype=None, readers: int | None = None) -> dict:
    """The tensors of a .safetensors file, read one at a time with plain reads (no memory map, whose pages
    would count as the process's memory) and each converted to ``dtype`` (floating point ones) as soon as it
    is read: a float16 file loaded as float32 never has both copies of the model alive, so the peak is the
    model in ``dtype`` and a tensor per reader. Reads go through a reused buffer per reader (a fresh one per
    tensor would be zeroed first, which costs as much as the read). ``readers`` threads (default: 2 where
    there are 2 cores) each read one half of the file in order, so one reads while the other converts."""
    import torch

    from nodegraph.files import open_regular

    header, data_start, end_of_file = _header_and_layout(path)

    def read_part(part: list) -> dict:
        state = {}
        with open_regular(path) as handle:
            scratch = bytearray(max((end - start for _, _, start, end in part), default=0))
            for name, info, start, end in part:
                kind = getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]])
                view = memoryview(scratch)[:end - start]
                handle.seek(start)
                if handle.readinto(view) != len(view):
                    raise ValueError(f"tensor {name} is cut short")
                raw = torch.frombuffer(view, dtype=kind) if len(view) else torch.empty(0, dtype=kind)
                target = dtype if dtype is not None and raw.is_floating_point() else raw.dtype
                state[name] = raw.to(target, copy=True).reshape(info["shape"])  # a copy: the buffer is reused
        return state

    try:
        items = sorted(((name, info, data_start + info["data_offsets"][0], data_start + info["data_offsets"][1])
                        for name, info in header.items() if name != "__metadata__"), key=lambda item: item[2])
        for name, _, start, end in items:
            if not start <= end <= end_of_file:
                raise ValueError(f"tensor {name} lies outside the file")
        parts = _split_by_bytes(items, readers or min(2, os.cpu_count() or 1))
        if len(parts) == 1:
            return read_part(parts[0])
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(parts), thread_name_prefix="read-state-dict") as pool:
            return {name: tensor for part in pool.map(read_part, parts) for name, tensor in part.items()}
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise NodeError(f"cannot read '{path}' as safetensors: {exc}") from None


def _split_by_bytes(items: list, count: int) -> list[list]:
    """``items`` (in file order) cut into at most ``count`` runs of about equal bytes."""
    total = sum(end - start for *_, start, end in items)
    parts, current, done = [], [], 0
    for item in items:
        current.append(item)
        done += item[3] - item[2]
        if len(parts) < count - 1 and done >= total * (len(parts) + 1) / count:
            parts.append(current)
            current = []
    return [part for part in parts + [current] if part] or [[]]
