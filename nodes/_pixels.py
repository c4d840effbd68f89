"""IMAGE / MASK tensors to and from the 8-bit arrays that OpenCV and Pillow work on.

Conventions (docs/design.md §2): IMAGE is float32 (B, 3, H, W) RGB in [0, 1]; MASK is
float32 (B, 1, H, W) in [0, 1], 1 = repaint. Going to 8 bits rounds to the
nearest level, ``round(clamp(x, 0, 1) * 255)`` (half to even), which is what
diffusers' ``numpy_to_pil`` does; coming back divides by 255, like diffusers'
``pil_to_numpy``. So an image loaded from a file survives the round trip exactly.
"""
from __future__ import annotations

from nodegraph.lazy import lazy

np = lazy("numpy")
torch = lazy("torch")
PILImage = lazy("PIL.Image")

from nodegraph.errors import NodeError


def check_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """Return ``image`` as float32 after checking it is a non-empty (B, 3, H, W) tensor."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise NodeError(f"{name} must be an IMAGE tensor of shape (B, 3, H, W), got {shape}")
    if image.numel() == 0:
        raise NodeError(f"{name} is empty (shape {tuple(image.shape)})")
    return image.float()


def check_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Return ``mask`` as float32 after checking it is a non-empty (B, 1, H, W) tensor."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[1] != 1:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise NodeError(f"{name} must be a MASK tensor of shape (B, 1, H, W), got {shape}")
    if mask.numel() == 0:
        raise NodeError(f"{name} is empty (shape {tuple(mask.shape)})")
    return mask.float()


def size_text(t: torch.Tensor) -> str:
    return f"{t.shape[-1]}x{t.shape[-2]}"


def check_same_size(a: torch.Tensor, b: torch.Tensor, a_name: str = "image", b_name: str = "mask") -> None:
    """Refuse tensors of different width/height: silently resizing a mask hides mistakes."""
    if a.shape[-2:] != b.shape[-2:]:
        raise NodeError(
            f"{b_name} is {size_text(b)} (width x height) but {a_name} is {size_text(a)}; "
            f"they must be the same size (resize one with ImageResize / MaskResize)"
        )


def match_batches(*tensors: torch.Tensor, names: tuple[str, ...] | None = None) -> list[torch.Tensor]:
    """Broadcast batch sizes of 1 to the common batch size; other mismatches are errors."""
    sizes = {t.shape[0] for t in tensors}
    target = max(sizes)
    if not sizes <= {1, target}:
        names = names or tuple(f"input {i}" for i in range(len(tensors)))
        listed = ", ".join(f"{n}: {t.shape[0]}" for n, t in zip(names, tensors))
        raise NodeError(f"batch sizes differ ({listed}); give each the same batch size, or a batch of 1")
    return [t.expand(target, *t.shape[1:]) if t.shape[0] != target else t for t in tensors]


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [0, 1] -> (B, H, W, C) uint8, rounded to the nearest level."""
    array = (t.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, H, W, C) or (H, W, C) or (H, W) uint8 -> (B, C, H, W) float32 in [0, 1]."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    tensor = torch.from_numpy(np.require(array, requirements=["C", "W"])).permute(0, 3, 1, 2).float() / 255.0
    return tensor.to(device)


def to_pil(t: torch.Tensor) -> PILImage.Image:
    """One (C, H, W) image (C = 3) or mask (C = 1) -> an 8-bit RGB or L Pillow image."""
    array = to_uint8(t[None])[0]
    return PILImage.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def from_pil(image: PILImage.Image, device: torch.device | str = "cpu") -> torch.Tensor:
    """An 8-bit RGB or L Pillow image -> (1, C, H, W) float32 in [0, 1]."""
    return from_uint8(np.asarray(image), device)
