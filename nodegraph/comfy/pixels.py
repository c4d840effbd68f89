"""Converters of ComfyUI's image, mask and latent-scaling types (ComfyUI's pixel arithmetic reproduced exactly).

ComfyUI's IMAGE is (B, H, W, C) and its MASK (B, H, W); nodegraph's are (B, 3, H, W) and (B, 1, H, W). The
nodes written here take care of the layout, so converters only map inputs. Specs follow ComfyUI's
``INPUT_TYPES`` (nodes.py, comfy_extras/nodes_mask.py) in order, with its defaults and bounds."""
from __future__ import annotations

import re

from .convert import Builder, ComfyNode, ComfyType, converts

MAX_RESOLUTION = 16384
IMAGE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
LATENT_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
CROPS = ["disabled", "center"]
MASK_CHANNELS = ["alpha", "red", "green", "blue"]
_ANNOTATION = re.compile(r"^(?P<name>.*?) \[(?P<folder>input|output|temp)\]$")
_SUBSTITUTION = re.compile(r"%[^%]+%")


def _side(default: int, step: int) -> tuple:
    return ("INT", {"default": default, "min": 0, "max": MAX_RESOLUTION, "step": step})


def _margin(step: int) -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": step})


def _image_name(node: ComfyNode, b: Builder) -> str | None:
    """The file a LoadImage-like node names; ComfyUI's " [input]" suffix is dropped, other folders refused."""
    name = b.value(node, "image")
    if name is None:
        return None
    if not isinstance(name, str) or not name.strip():
        b.problem(node, "image", "must be an image file name")
        return None
    match = _ANNOTATION.match(name)
    if match and match["folder"] != "input":
        b.problem(node, "image", f"names a file in ComfyUI's {match['folder']} folder; copy it into the input "
                                 "folder and name it there")
        return None
    return match["name"] if match else name


# --------------------------------------------------------------------------- files

@converts("LoadImage", spec=ComfyType({"image": ([], {"image_upload": True})}, files={"image": "input"}, outputs=("IMAGE", "MASK"),
                                      category="image"))
def load_image(node: ComfyNode, b: Builder) -> list:
    """The image as RGB and its mask 1 - alpha; a file without alpha gives ComfyUI's 64x64 mask of zeros."""
    path = _image_name(node, b)
    if path is None:
        return None
    nid = b.add(node, "LoadImage", params={"path": path, "empty_mask_size": 64})
    return [f"{nid}.image", f"{nid}.mask"]


@converts("LoadImageMask", spec=ComfyType({"image": ([], {"image_upload": True}), "channel": (MASK_CHANNELS,)}, files={"image": "input"},
                                          outputs=("MASK",), category="mask"))
def load_image_mask(node: ComfyNode, b: Builder) -> list:
    """One channel of an image file as a mask: alpha gives 1 - alpha (0 without alpha), a colour its level."""
    path, channel = _image_name(node, b), b.value(node, "channel")
    if channel is not None and channel not in MASK_CHANNELS:
        b.problem(node, "channel", f"must be one of {', '.join(MASK_CHANNELS)}")
        return None
    if path is None or channel is None:
        return None
    nid = b.add(node, "LoadImage", params={"path": path})
    if channel == "alpha":
        return [f"{nid}.mask"]
    to_mask = b.add(node, "ImageToMask", suffix="channel", inputs={"image": f"{nid}.image"},
                    params={"channel": channel})
    return [f"{to_mask}.mask"]


def _save(node: ComfyNode, b: Builder, type_name: str, prefix: str | None) -> list:
    params = {"levels": "truncate"}  # ComfyUI writes int(clip(255 * x, 0, 255))
    if prefix is not None:
        params["prefix"] = prefix
    b.add(node, type_name, inputs={"image": b.link(node, "images")}, params=params)
    return []


@converts("SaveImage", spec=ComfyType({"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                                      category="image", output_node=True))
def save_image(node: ComfyNode, b: Builder) -> list:
    """Saves the images as PNG files in the output folder, with ComfyUI's 8-bit levels."""
    prefix = b.value(node, "filename_prefix")
    if prefix is not None and (not isinstance(prefix, str) or _SUBSTITUTION.search(prefix)):
        b.problem(node, "filename_prefix", "ComfyUI's %...% substitutions (dates, other nodes' values) are not "
                                           "supported; write the prefix out")
        prefix = None
    return _save(node, b, "SaveImage", prefix)


@converts("PreviewImage", spec=ComfyType({"images": ("IMAGE",)}, category="image", output_node=True))
def preview_image(node: ComfyNode, b: Builder) -> list:
    """Saves the images as PNG files in the temporary preview folder."""
    return _save(node, b, "PreviewImage", None)


# --------------------------------------------------------------------------- scaling

@converts("ImageScale", spec=ComfyType({"image": ("IMAGE",), "upscale_method": (IMAGE_METHODS,),
                                        "width": _side(512, 1), "height": _side(512, 1), "crop": (CROPS,)},
                                       outputs=("IMAGE",), category="image/upscaling"))
def image_scale(node: ComfyNode, b: Builder) -> list:
    """Scales images with torch's interpolation (or Pillow's Lanczos); a 0 side keeps the aspect."""
    inputs, params = {"image": b.link(node, "image")}, {}
    for name, to in (("upscale_method", "method"), ("width", None), ("height", None), ("crop", None)):
        b.either(node, name, inputs, params, to=to)
    nid = b.add(node, "ImageScale", inputs=inputs, params=params)
    return [f"{nid}.image"]


@converts("ImageScaleBy", spec=ComfyType({"image": ("IMAGE",), "upscale_method": (IMAGE_METHODS,),
                                          "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0,
                                                                 "step": 0.01})},
                                         outputs=("IMAGE",), category="image/upscaling"))
def image_scale_by(node: ComfyNode, b: Builder) -> list:
    """Scales images by a factor (each side rounded)."""
    inputs, params = {"image": b.link(node, "image")}, {}
    b.either(node, "upscale_method", inputs, params, to="method")
    b.either(node, "scale_by", inputs, params)
    nid = b.add(node, "ImageScaleBy", inputs=inputs, params=params)
    return [f"{nid}.image"]


@converts("LatentUpscale", spec=ComfyType({"samples": ("LATENT",), "upscale_method": (LATENT_METHODS,),
                                           "width": _side(512, 8), "height": _side(512, 8), "crop": (CROPS,)},
                                          outputs=("LATENT",), category="latent"))
def latent_upscale(node: ComfyNode, b: Builder) -> list:
    """Scales latents to an image size (sides at least 64, divided by 8)."""
    inputs, params = {"latent": b.link(node, "samples")}, {}
    for name, to in (("upscale_method", "method"), ("width", None), ("height", None), ("crop", None)):
        b.either(node, name, inputs, params, to=to)
    nid = b.add(node, "LatentScale", inputs=inputs, params=params)
    return [f"{nid}.latent"]


@converts("LatentUpscaleBy", spec=ComfyType({"samples": ("LATENT",), "upscale_method": (LATENT_METHODS,),
                                             "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0,
                                                                    "step": 0.01})},
                                            outputs=("LATENT",), category="latent"))
def latent_upscale_by(node: ComfyNode, b: Builder) -> list:
    """Scales latents by a factor (each latent side rounded)."""
    inputs, params = {"latent": b.link(node, "samples")}, {}
    b.either(node, "upscale_method", inputs, params, to="method")
    b.either(node, "scale_by", inputs, params)
    nid = b.add(node, "LatentScaleBy", inputs=inputs, params=params)
    return [f"{nid}.latent"]


# --------------------------------------------------------------------------- padding and compositing

@converts("ImagePadForOutpaint", spec=ComfyType(
    {"image": ("IMAGE",), "left": _margin(8), "top": _margin(8), "right": _margin(8), "bottom": _margin(8),
     "feathering": ("INT", {"default": 40, "min": 0, "max": MAX_RESOLUTION, "step": 1})},
    outputs=("IMAGE", "MASK"), category="image"))
def image_pad_for_outpaint(node: ComfyNode, b: Builder) -> list:
    """Pads images with grey and gives a mask of the new area, feathered into the old image."""
    inputs, params = {"image": b.link(node, "image")}, {}
    for name in ("left", "top", "right", "bottom", "feathering"):
        b.either(node, name, inputs, params)
    nid = b.add(node, "PadImage", inputs=inputs, params=params)
    return [f"{nid}.image", f"{nid}.mask"]


@converts("ImageCompositeMasked", spec=ComfyType(
    {"destination": ("IMAGE",), "source": ("IMAGE",), "x": _margin(1), "y": _margin(1),
     "resize_source": ("BOOLEAN", {"default": False})},
    optional={"mask": ("MASK",)}, outputs=("IMAGE",), category="image"))
def image_composite_masked(node: ComfyNode, b: Builder) -> list:
    """Pastes the source onto the destination at (x, y) through an optional mask."""
    inputs = {"destination": b.link(node, "destination"), "source": b.link(node, "source"),
              "mask": b.link(node, "mask", optional=True)}
    params: dict = {}
    for name in ("x", "y", "resize_source"):
        b.either(node, name, inputs, params)
    nid = b.add(node, "Composite", inputs=inputs, params=params)
    return [f"{nid}.image"]


# --------------------------------------------------------------------------- masks

@converts("InvertMask", spec=ComfyType({"mask": ("MASK",)}, outputs=("MASK",), category="mask"))
def invert_mask(node: ComfyNode, b: Builder) -> list:
    """ComfyUI: 1 - mask."""
    nid = b.add(node, "MaskInvert", inputs={"mask": b.link(node, "mask")})
    return [f"{nid}.mask"]


@converts("GrowMask", spec=ComfyType(
    {"mask": ("MASK",), "expand": ("INT", {"default": 0, "min": -MAX_RESOLUTION, "max": MAX_RESOLUTION, "step": 1}),
     "tapered_corners": ("BOOLEAN", {"default": True})}, outputs=("MASK",), category="mask"))
def grow_mask(node: ComfyNode, b: Builder) -> list:
    """Grows (or with a negative expand shrinks) a mask: a 3x3 cross (tapered corners) or square, |expand| times."""
    inputs, params = {"mask": b.link(node, "mask")}, {}
    b.either(node, "expand", inputs, params, to="pixels")
    tapered = b.value(node, "tapered_corners")
    if tapered is not None and not isinstance(tapered, bool):
        b.problem(node, "tapered_corners", "must be true or false")
    elif tapered is not None:
        params["shape"] = "diamond" if tapered else "square"
    nid = b.add(node, "MaskGrow", inputs=inputs, params=params)
    return [f"{nid}.mask"]


@converts("FeatherMask", spec=ComfyType({"mask": ("MASK",), "left": _margin(1), "top": _margin(1),
                                         "right": _margin(1), "bottom": _margin(1)},
                                        outputs=("MASK",), category="mask"))
def feather_mask(node: ComfyNode, b: Builder) -> list:
    """Fades a mask towards its edges with linear ramps, indexed as ComfyUI's FeatherMask indexes them."""
    inputs, params = {"mask": b.link(node, "mask")}, {"ramp": "comfyui"}
    for name in ("left", "top", "right", "bottom"):
        b.either(node, name, inputs, params)
    nid = b.add(node, "MaskFeather", inputs=inputs, params=params)
    return [f"{nid}.mask"]
