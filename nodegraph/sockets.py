"""Socket types: the values that flow along links and can never be literals.

A node declares a socket input by annotating a parameter with one of the aliases
below (``image: Image``), or with ``socket("MYTYPE")`` for a type of its own.
What a node returns for each declared output is checked against its type, so a
node that returns the wrong thing is blamed itself, not the node that uses it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Any, Callable


@dataclass(frozen=True)
class Socket:
    """Marker inside ``Annotated[...]`` that makes a parameter a linked-only input."""

    type_name: str


@dataclass(frozen=True)
class InputPath:
    """Marker for a str param that names a file or folder the node reads.

    Validation resolves a relative path against the workflow file's folder, else (with ``folder``) as a
    name in that folder of the models roots (docs/models.md), and the executor adds the file's content
    hash to the cache key, so an edited file is re-read. ``must_exist=False`` accepts names that are not
    local paths (hub ids): those ``remote`` accepts, or any when it is None.
    """

    kind: str = "file"  # "file", "dir" or "any"
    must_exist: bool = True
    # The models folder a name is looked up in ("checkpoints", "vae", "loras", "controlnet", "clip_vision",
    # "ipadapter", ...: ComfyUI's layout); None: paths only.
    folder: str | None = None
    # With must_exist=False: the values found nowhere that the node fetches itself (a hub id); the rest are
    # missing models. None: every value found nowhere goes to the node.
    remote: Callable[[str], bool] | None = None
    # Other files the node reads because of this one (a single-file checkpoint's config folder, a hub id's
    # local snapshot): given the resolved value, their paths; their content goes into the key as well.
    implies: Callable[[str], list[str]] | None = None


@dataclass(frozen=True)
class SpaceRule:
    """Which of a node's sockets (inputs and outputs, by name) live in one latent space, for validation.

    Latents of different model families (a Stable Diffusion VAE's, Kandinsky's MoVQ) look alike (4 channels)
    but mean different things. Validation follows the space along links: a node with ``fixed`` makes that
    space (a loader); otherwise its space is that of its linked ``sockets``, which must agree, and its
    outputs named in ``sockets`` carry it on. Spaces are plain names that read well in a message."""

    sockets: tuple[str, ...] = ()
    fixed: str | None = None


@dataclass(frozen=True)
class Randomizable:
    """Marker for an int param that also accepts "random": the engine draws a value once per run, uses it
    in the cache key and records it in the run's manifest (like ComfyUI's "randomize")."""


IMAGE, MASK, LATENT, CONDITIONING = "IMAGE", "MASK", "LATENT", "CONDITIONING"
MODEL, CLIP, VAE = "MODEL", "CLIP", "VAE"
# Scalar link types: what a param of a given python type accepts through a link.
INT, FLOAT, STRING, BOOLEAN, ANY = "INT", "FLOAT", "STRING", "BOOLEAN", "ANY"


def _tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported
    return torch is not None and isinstance(value, torch.Tensor)


def _describe(value: Any) -> str:
    if _tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"


def _tensor_check(channels: int, shape: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if _tensor(value) and value.ndim == 4 and value.shape[1] == channels:
            return None
        return f"{_describe(value)}, not a tensor of shape {shape}"

    return check


def _instance_check(kinds: tuple, words: str, exclude: tuple = ()) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, kinds) and not isinstance(value, exclude):
            return None
        return f"{_describe(value)}, not {words}"

    return check


def _not_none(value: Any) -> str | None:
    return "None" if value is None else None


# type name -> check of a node's output value (None: fine, else what is wrong)
_OUTPUT_CHECKS: dict[str, Callable[[Any], str | None]] = {
    IMAGE: _tensor_check(3, "(B, 3, H, W)"),
    MASK: _tensor_check(1, "(B, 1, H, W)"),
    LATENT: lambda v: None if _tensor(getattr(v, "samples", None)) else f"{_describe(v)} without latent samples",
    CONDITIONING: _not_none, MODEL: _not_none, CLIP: _not_none, VAE: _not_none,
    INT: _instance_check((int,), "an integer", (bool,)),
    FLOAT: _instance_check((int, float), "a number", (bool,)),
    STRING: _instance_check((str,), "a string"),
    BOOLEAN: _instance_check((bool,), "true or false"),
}


def output_problem(type_name: str, value: Any) -> str | None:
    """What is wrong with ``value`` as an output of type ``type_name`` (None: nothing, or a type with no check)."""
    check = _OUTPUT_CHECKS.get(type_name)
    return check(value) if check is not None else None


def socket(type_name: str, python_type: Any = Any) -> Any:
    """An annotation for a socket input of ``type_name`` (plugins declare their own). With a class as
    ``python_type``, outputs of that type are checked to be instances of it."""
    if not type_name.isupper() or not type_name.replace("_", "").isalnum():
        raise ValueError(f"socket type names are UPPER_CASE words, got {type_name!r}")
    if isinstance(python_type, type) and python_type is not Any and type_name not in _OUTPUT_CHECKS:
        _OUTPUT_CHECKS[type_name] = _instance_check((python_type,), f"a {python_type.__name__}")
    return Annotated[python_type, Socket(type_name)]


Image = Annotated[Any, Socket(IMAGE)]  # a torch.Tensor (B, 3, H, W) in [0, 1]
Mask = Annotated[Any, Socket(MASK)]  # a torch.Tensor (B, 1, H, W) in [0, 1], 1 = repaint
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
