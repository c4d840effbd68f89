"""Converters of ComfyUI image and mask types (ComfyUI pixel arithmetic reproduced exactly)."""
from .convert import Builder, ComfyNode, ComfyType, converts


@converts("InvertMask", spec=ComfyType({"mask": ("MASK",)}, outputs=("MASK",), category="mask"))
def invert_mask(node: ComfyNode, b: Builder) -> list:
    """ComfyUI: 1 - mask."""
    nid = b.add(node, "MaskInvert", inputs={"mask": b.link(node, "mask")})
    return [f"{nid}.mask"]
