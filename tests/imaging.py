"""Photos and random masks shared by the image, mask and outpaint tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

DATA = Path(__file__).parent / "data"
PHOTOS = ("chelsea_128.png", "astronaut_96.png", "rocket_128.jpg")


def photo_array(name: str = "chelsea_128.png") -> np.ndarray:
    """(H, W, 3) uint8 RGB straight from Pillow."""
    return np.asarray(Image.open(DATA / name).convert("RGB"))


def as_image(*arrays: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> IMAGE batch, level / 255."""
    return torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255 for a in arrays])


def as_mask(*arrays: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) arrays -> MASK batch, level / 255."""
    return torch.stack([torch.from_numpy(a.copy())[None].float() / 255 for a in arrays])


def to_u8(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor -> (H, W, C) uint8, rounded to the nearest level (or (H, W) for one channel)."""
    a = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def random_masks(h: int, w: int, count: int, seed: int = 0, soft: bool = False) -> list[np.ndarray]:
    """uint8 (H, W) masks of a few random rectangles and discs; soft ones get random grey levels."""
    rng = np.random.default_rng(seed)
    masks = []
    yy, xx = np.mgrid[:h, :w]
    for _ in range(count):
        m = np.zeros((h, w), np.uint8)
        for _ in range(rng.integers(1, 4)):
            level = int(rng.integers(1, 256)) if soft else 255
            if rng.random() < 0.5:
                x1, y1 = rng.integers(0, w - 1), rng.integers(0, h - 1)
                x2, y2 = rng.integers(x1 + 1, w + 1), rng.integers(y1 + 1, h + 1)
                m[y1:y2, x1:x2] = np.maximum(m[y1:y2, x1:x2], level)
            else:
                cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(2, max(3, min(h, w) // 3))
                m[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = level
        masks.append(m)
    return masks
