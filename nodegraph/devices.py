"""Device and dtype names, parsed in one place for the CLI, the API and nodes' dtype params."""
from __future__ import annotations

from typing import Any

from .errors import NodegraphError

DTYPE_NAMES = ("float32", "float16", "bfloat16")


def resolve_device(name: Any = None):
    """A torch.device: 'auto' (or None) picks CUDA when present; 'cuda' without a GPU is a usage error."""
    import torch

    if isinstance(name, torch.device):
        return name
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NodegraphError(f"--device {name}: no CUDA GPU is available to torch; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise NodegraphError(f"--device {name}: {exc}") from None


def resolve_dtype(name: Any = None, auto: Any = None):
    """A torch.dtype from "float32" | "float16" | "bfloat16" (or a torch.dtype); "auto" (or None) is ``auto``,
    else float32. The one parser of dtype names, for the CLI and for nodes' dtype params."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return auto if auto is not None else torch.float32
    if name not in DTYPE_NAMES:
        raise NodegraphError(f"dtype {name!r}: choose one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)
