"""Reading images and masks from files, and saving PNGs (images, masks, previews) that carry their workflow."""
from __future__ import annotations

from nodegraph.lazy import lazy

import json
import re
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Literal, Optional

np = lazy("numpy")
torch = lazy("torch")
from pydantic import Field

from nodegraph.context import RunContext
from nodegraph import node
from nodegraph.atomic import write_new_numbered
from nodegraph.context import default_temp_dir
from nodegraph.errors import NodeError
from nodegraph.files import open_regular
from nodegraph.limits import current_limits
from nodegraph.versions import library_versions
from nodegraph.sockets import IMAGE, INT, MASK, Image, InputPath, Mask

from ._pixels import check_image, check_mask, to_uint8

# Refused before decoding, from the size in the file's header: at most MAX_SIDE a side, and at
# most the run's pixel limit (nodegraph.limits; 2**25 by default, 400 MB as float32 RGB).
MAX_SIDE = 16384
WORKFLOW_KEY, MANIFEST_KEY = "nodegraph.workflow", "nodegraph.manifest"
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


# --------------------------------------------------------------------------- reading

def open_image(path: str | Path):
    """Open and decode an image file, refusing missing, non-image, damaged or oversized files.

    The size is checked from the header before any pixel is decoded. Returns a loaded
    Pillow image with its EXIF orientation applied.
    """
    from PIL import Image as PILImage, ImageOps, UnidentifiedImageError

    path = Path(path)
    limits = current_limits()
    try:
        with open_regular(path) as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            image = PILImage.open(handle)
            width, height = image.size
            if width < 1 or height < 1:
                raise NodeError(f"'{path}' has no pixels ({width}x{height})")
            if width > MAX_SIDE or height > MAX_SIDE:
                raise NodeError(f"'{path}' is {width}x{height}: larger than the limit of {MAX_SIDE} px a side; "
                                "downscale it first")
            limits.check_pixels(width, height, what=f"'{path}'")
            image.load()
            # a float file (a TIFF depth map, say) may hold NaN, which no later node can clip away
            if image.mode == "F" and np.isnan(np.asarray(image)).any():
                raise NodeError(f"'{path}' holds NaN (not-a-number) pixel values; replace them before loading it")
    except NodeError:
        raise
    except FileNotFoundError:
        raise NodeError(f"no such image file '{path}'; check the path (relative paths start at the workflow file's "
                        "folder)") from None
    except PILImage.DecompressionBombError:
        raise NodeError(f"'{path}' is larger than the limit of Pillow's decompression-bomb check; downscale it "
                        "first") from None
    except UnidentifiedImageError:
        raise NodeError(f"'{path}' is not an image file Pillow can read (PNG, JPEG, WebP, ...), or its header "
                        "is damaged (a 0x0 size, say)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise NodeError(f"cannot decode '{path}': {exc}; the file may be truncated or damaged, re-export it") from None
    return ImageOps.exif_transpose(image)


def _to_float(image) -> np.ndarray:
    """Pixels of a single-band or RGB(A) Pillow image as float32 in [0, 1]."""
    array = np.asarray(image)
    if image.mode in _SIXTEEN_BIT:
        return np.clip(array.astype(np.float32) / 65535.0, 0.0, 1.0)
    if image.mode == "F":
        return np.clip(array.astype(np.float32), 0.0, 1.0)
    return array.astype(np.float32) / 255.0


def image_and_alpha(image) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, 3) RGB and (H, W) alpha (None without transparency), float32 in [0, 1]."""
    if image.mode in _SIXTEEN_BIT or image.mode == "F":
        grey = np.repeat(_to_float(image)[..., None], 3, axis=-1)
        # a 16-bit grey PNG marks its transparent level with a tRNS chunk; Pillow's RGBA conversion reads it
        alpha = _to_float(image.convert("RGBA"))[..., 3] if image.has_transparency_data else None
        return grey, alpha
    if image.has_transparency_data:
        rgba = _to_float(image.convert("RGBA"))
        return rgba[..., :3], rgba[..., 3]
    return _to_float(image.convert("RGB")), None


def luminance(image) -> np.ndarray:
    """(H, W) luma in [0, 1]: Pillow's convert("L") (ITU-R 601-2), as diffusers greys a mask."""
    if image.mode in _SIXTEEN_BIT or image.mode == "F":
        return _to_float(image)
    return _to_float(image.convert("L"))


def _tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, C) or (H, W) float array -> (1, C, H, W) tensor."""
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None].float()


def load_image_file(path: str | Path, empty_mask_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE (1, 3, H, W) and MASK (1, 1, H, W) = 1 - alpha; without alpha the mask is zeros of the image's
    size, or ``empty_mask_size`` square when that is not 0."""
    rgb, alpha = image_and_alpha(open_image(path))
    if alpha is None:
        mask = np.zeros((empty_mask_size,) * 2 if empty_mask_size else rgb.shape[:2], np.float32)
    else:
        mask = 1.0 - alpha
    return _tensor(rgb), _tensor(mask)


def load_mask_file(path: str | Path, channel: str = "luminance", invert: bool = False,
                   threshold: float | None = None) -> torch.Tensor:
    """MASK (1, 1, H, W) from a file's luminance (white = 1) or alpha (transparent = 1)."""
    image = open_image(path)
    if channel == "alpha":
        _, alpha = image_and_alpha(image)
        if alpha is None:
            raise NodeError(f"'{path}' has no alpha channel; use channel 'luminance' or save the mask with transparency")
        mask = 1.0 - alpha
    else:
        mask = luminance(image)
    mask = _tensor(mask)
    if invert:
        mask = 1.0 - mask
    if threshold is not None:
        mask = (mask >= threshold).float()
    return mask


# --------------------------------------------------------------------------- saving

def prefix_problem(prefix: str) -> str | None:
    """Why a SaveImage prefix would write outside the output folder (None if it is fine)."""
    if not prefix or not prefix.strip():
        return "must not be empty"
    if "\x00" in prefix:
        return "must not contain NUL characters"
    posix = PurePosixPath(prefix.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(prefix).drive or prefix.startswith("~"):
        return "must be relative to the run's output folder; absolute paths are refused"
    if ".." in posix.parts:
        return "must stay inside the run's output folder; '..' is refused"
    if prefix.endswith(("/", "\\")) or posix.name in ("", "."):
        return "must end with a file name (e.g. 'outpaint' or 'tests/outpaint')"
    return None


def target_folder(out_dir: Path, prefix: str) -> tuple[Path, str]:
    """The folder and base name a prefix names, checked to lie inside ``out_dir`` (symlinks followed)."""
    problem = prefix_problem(prefix)
    if problem:
        raise NodeError(f"prefix {prefix!r} {problem}")
    relative = PurePosixPath(prefix.replace("\\", "/"))
    root = Path(out_dir).resolve()
    folder = (root / relative.parent).resolve()
    if folder != root and root not in folder.parents:
        raise NodeError(f"prefix {prefix!r} leads outside the output folder '{root}' (through a link); choose another")
    for part in (folder, *folder.parents):
        if part == root:
            break
        if part.exists() and not part.is_dir():  # else mkdir fails with a bare FileExistsError
            raise NodeError(f"prefix {prefix!r} needs the folder '{part}', but a file of that name is in the way; "
                            "choose another prefix or move the file")
    return folder, relative.name


def next_index(folder: Path, name: str) -> int:
    """One more than the highest number already used for ``name`` in ``folder``."""
    pattern = re.compile(re.escape(name) + r"_(\d+)\.png$")
    used = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))] if folder.is_dir() else []
    return max(used, default=0) + 1


def write_png(pixels: np.ndarray, folder: Path, name: str, text: dict[str, str], compress_level: int = 6) -> Path:
    """Write ``folder/name_NNNNN.png`` atomically, numbered after the highest number there, never replacing an
    existing file; an interrupted run leaves no partly written PNG under a final name."""
    from PIL import Image as PILImage
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)

    def write(handle) -> None:
        PILImage.fromarray(pixels).save(handle, format="PNG", pnginfo=info, compress_level=compress_level)

    return write_new_numbered(folder, lambda index: f"{name}_{index:05d}.png", next_index(folder, name), write)


def run_manifest(ctx: RunContext, index: int, batch: int) -> dict:
    """What made this image: node types and versions, seeds and models (ctx.info), packages."""
    return {
        "node": {"id": ctx.node_id, "type": ctx.node_type},
        "batch_index": index,
        "batch_size": batch,
        "node_versions": dict(getattr(ctx, "node_versions", {}) or {}),
        "info": dict(ctx.info),
        "packages": library_versions(),
    }


def save_pngs(levels: np.ndarray, root: Path, prefix: str, ctx: RunContext, compress_level: int = 6) -> list[Path]:
    """Each 8-bit array of a batch ((B, H, W, 3) RGB or (B, H, W) grey) as a numbered PNG under
    ``root``, with the workflow and the run manifest in text chunks; each file is recorded in ``ctx``."""
    folder, name = target_folder(root, prefix)
    workflow = ctx.workflow
    paths = []
    for i, pixels in enumerate(levels):
        ctx.check_interrupt()
        text = {MANIFEST_KEY: json.dumps(run_manifest(ctx, i, len(levels)), sort_keys=True, default=str)}
        if workflow is not None:
            text[WORKFLOW_KEY] = json.dumps(workflow, sort_keys=True, default=str)
        path = write_png(pixels, folder, name, text, compress_level)
        ctx.record_file(path)
        paths.append(path)
    return paths


def image_levels(image: torch.Tensor, levels: str = "round") -> np.ndarray:
    """(B, 3, H, W) -> (B, H, W, 3) uint8: rounded to the nearest level, or truncated after clipping
    ``255 * x`` to [0, 255] (what ComfyUI's SaveImage writes)."""
    image = check_image(image)
    if levels == "round":
        return to_uint8(image)
    return np.clip(255.0 * image.detach().cpu().permute(0, 2, 3, 1).numpy(), 0, 255).astype(np.uint8)


def save_images(image: torch.Tensor, prefix: str, ctx: RunContext, levels: str = "round") -> list[Path]:
    """Each image of the batch as an RGB PNG under the run's output folder."""
    return save_pngs(image_levels(image, levels), ctx.out_dir, prefix, ctx)


def save_masks(mask: torch.Tensor, prefix: str, ctx: RunContext) -> list[Path]:
    """Each mask of the batch as an 8-bit greyscale PNG (white = 1 = repaint) under the run's output folder."""
    return save_pngs(to_uint8(check_mask(mask))[..., 0], ctx.out_dir, prefix, ctx)


def preview_dir(ctx: RunContext) -> Path:
    """Where previews go: the run's temp folder, or nodegraph-preview in the system's temp folder
    for a context that has none."""
    return getattr(ctx, "temp_dir", None) or default_temp_dir()


def save_previews(image: torch.Tensor, prefix: str, ctx: RunContext, levels: str = "round") -> list[Path]:
    """Each image of the batch as an RGB PNG in the preview folder; fast compression (level 1,
    as ComfyUI's previews) since previews are thrown away."""
    return save_pngs(image_levels(image, levels), preview_dir(ctx), prefix, ctx, compress_level=1)


# --------------------------------------------------------------------------- nodes

_Levels = Annotated[Literal["round", "truncate"], Field(description="8-bit levels: round(x * 255), or ComfyUI's truncation of clip(x * 255, 0, 255)")]
_ImagePath = Annotated[str, InputPath(kind="file"), Field(description="image file (PNG, JPEG, WebP, ...); relative to the workflow file's folder")]


@node("LoadImage", version=1, category="io", outputs={"image": IMAGE, "mask": MASK, "width": INT, "height": INT},
      reference="PIL.Image.open + ImageOps.exif_transpose")
def load_image(
    path: _ImagePath,
    empty_mask_size: Annotated[int, Field(ge=0, le=MAX_SIDE, description="side of the all-0 mask given for a file without alpha; 0 = the image's size (ComfyUI's LoadImage gives 64)")] = 0,
):
    """Load an image file as an RGB image and a mask from its transparency.

    PNG, JPEG, WebP (anything Pillow decodes), with its EXIF orientation applied. The mask is
    1 where the file is transparent (1 - alpha: transparent pixels are the ones to repaint)
    and all 0 when the file has no alpha (the image's size, or `empty_mask_size` square, as
    ComfyUI's 64 x 64). 8-bit levels become level / 255; 16-bit grey files level / 65535. Files over 16384 px a side or 2^27 pixels are refused before
    decoding; missing, damaged or non-image files are errors that name the path.
    The engine hashes the file's content into the cache key, so an edited file is reloaded.
    """
    image, mask = load_image_file(path, empty_mask_size)
    return {"image": image, "mask": mask, "width": image.shape[-1], "height": image.shape[-2]}


@node("LoadMask", version=1, category="io", outputs={"mask": MASK}, reference="PIL.Image.convert('L') / alpha channel")
def load_mask(
    path: _ImagePath,
    channel: Annotated[Literal["luminance", "alpha"], Field(description="luminance: white = 1 (repaint); alpha: transparent = 1")] = "luminance",
    invert: Annotated[bool, Field(description="use 1 - mask (for masks drawn white = keep)")] = False,
    threshold: Annotated[Optional[float], Field(ge=0, le=1, description="if set, 1 where the mask >= threshold, else 0")] = None,
) -> torch.Tensor:
    """Load a mask from an image file's luminance or alpha channel.

    luminance: Pillow's grey conversion (ITU-R 601-2 luma), white = 1 = repaint, the
    diffusers convention. alpha: 1 - alpha, so transparent pixels are repainted (as LoadImage's
    mask). Then optionally inverted, then optionally thresholded. Same file checks as LoadImage.
    """
    return load_mask_file(path, channel, invert, threshold)


def _check_save(params: dict):
    prefix = params.get("prefix")
    if isinstance(prefix, str) and (problem := prefix_problem(prefix)):
        yield "prefix", problem


@node("SaveImage", version=1, category="io", outputs={}, output=True, cacheable=False, check=_check_save,
      reference="PIL PNG writer with tEXt chunks")
def save_image(
    image: Image,
    ctx: RunContext,
    prefix: Annotated[str, Field(min_length=1, max_length=200, description="file name start inside the run's output folder, optionally with subfolders ('outpaint' -> outpaint_00001.png)")] = "image",
    levels: _Levels = "round",
) -> None:
    """Save images as PNG files in the run's output folder, with the workflow embedded.

    Each image of the batch becomes `<prefix>_NNNNN.png`, numbered after the highest number
    already there, so no existing file is ever overwritten. Files are written to a temporary
    name and then renamed, so an interrupted run leaves no half-written PNG. A prefix that
    would leave the output folder (absolute, `..`, a link outside) is refused at validation.
    Text chunks: "nodegraph.workflow" (the workflow as run, so `nodegraph run IMAGE.png`
    reruns it) and "nodegraph.manifest" (node types and versions, seeds and model ids,
    package versions). 8-bit levels are round(x * 255), as diffusers' numpy_to_pil, or with
    `levels` "truncate" int(clip(x * 255, 0, 255)), as ComfyUI's SaveImage.
    """
    save_images(image, prefix, ctx, levels)


@node("SaveMask", version=1, category="io", outputs={}, output=True, cacheable=False, check=_check_save,
      reference="PIL PNG writer (mode L) with tEXt chunks; read back exactly by LoadMask")
def save_mask(
    mask: Mask,
    ctx: RunContext,
    prefix: Annotated[str, Field(min_length=1, max_length=200, description="file name start inside the run's output folder, optionally with subfolders ('mask' -> mask_00001.png)")] = "mask",
) -> None:
    """Save masks as 8-bit greyscale PNG files in the run's output folder, with the workflow embedded.

    White is 1 (repaint), black 0 (keep), each level round(x * 255); LoadMask (channel
    "luminance") reads the file back to the same levels. Names, numbering, atomic writing,
    prefix checks and text chunks are SaveImage's.
    """
    save_masks(mask, prefix, ctx)


@node("PreviewImage", version=1, category="io", outputs={}, output=True, cacheable=False, check=_check_save,
      reference="ComfyUI PreviewImage (SaveImage into the temp folder)")
def preview_image(
    image: Image,
    ctx: RunContext,
    prefix: Annotated[str, Field(min_length=1, max_length=200, description="file name start inside the preview folder, optionally with subfolders")] = "preview",
    levels: _Levels = "round",
) -> None:
    """Save images as PNG files in a temporary preview folder instead of the output folder.

    For servers and notebooks that show a result without keeping it. The folder is the run's
    temp folder, by default `nodegraph-preview` in the system's temp folder; treat its files as
    disposable. Written like SaveImage (numbered, never overwriting, atomic, same prefix checks)
    but with fast PNG compression, as ComfyUI's previews. Previews embed the workflow and
    the run manifest as SaveImage does (ComfyUI's previews carry theirs too), so a preview worth
    keeping can be rerun with `nodegraph run PREVIEW.png`. `levels` as in SaveImage.
    """
    save_previews(image, prefix, ctx, levels)
