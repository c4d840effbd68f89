"""Socket types: the values that flow along links and can never be literals.

A node declares a socket input by annotating a parameter with one of the aliases
below (``image: Image``), or with ``socket("MYTYPE")`` for a type of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch


@dataclass(frozen=True)
class Socket:
    """Marker inside ``Annotated[...]`` that makes a parameter a linked-only input."""

    type_name: str


@dataclass(frozen=True)
class InputPath:
    """Marker for a str param that names a file or folder the node reads.

    The executor resolves a relative path against the workflow file's folder and
    adds the file's content hash to the cache key, so an edited file is re-read.
    ``must_exist=False`` accepts names that are not local paths (hub ids).
    """

    kind: str = "file"  # "file", "dir" or "any"
    must_exist: bool = True


IMAGE, MASK, LATENT, CONDITIONING = "IMAGE", "MASK", "LATENT", "CONDITIONING"
MODEL, CLIP, VAE = "MODEL", "CLIP", "VAE"
# Scalar link types: what a param of a given python type accepts through a link.
INT, FLOAT, STRING, BOOLEAN, ANY = "INT", "FLOAT", "STRING", "BOOLEAN", "ANY"
SCALAR_TYPES = frozenset({INT, FLOAT, STRING, BOOLEAN})


def socket(type_name: str, python_type: Any = Any) -> Any:
    """An annotation for a socket input of ``type_name`` (plugins declare their own)."""
    if not type_name.isupper() or not type_name.replace("_", "").isalnum():
        raise ValueError(f"socket type names are UPPER_CASE words, got {type_name!r}")
    return Annotated[python_type, Socket(type_name)]


Image = Annotated[torch.Tensor, Socket(IMAGE)]
Mask = Annotated[torch.Tensor, Socket(MASK)]
Latent = Annotated[Any, Socket(LATENT)]
Conditioning = Annotated[Any, Socket(CONDITIONING)]
Model = Annotated[Any, Socket(MODEL)]
Clip = Annotated[Any, Socket(CLIP)]
Vae = Annotated[Any, Socket(VAE)]


def link_fits(output_type: str, input_type: str) -> bool:
    """Whether a value of ``output_type`` may feed an input of ``input_type``."""
    if output_type == input_type or ANY in (output_type, input_type):
        return True
    return output_type == INT and input_type == FLOAT
