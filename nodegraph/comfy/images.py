"""Workflows carried by image files other than PNG (whose text chunks the workflow reader reads itself).

ComfyUI's SaveAnimatedWEBP writes no text chunks: it keeps the workflow in the WebP's EXIF, each entry an
ASCII tag of the first directory holding ``<key>:<json>`` (the API-format prompt in 0x0110, the editor
workflow in 0x010F), and ComfyUI's frontend reads every such tag back the same way. Other image formats
(JPEG, GIF, ...) carry no workflow that ComfyUI or nodegraph writes.
"""
from __future__ import annotations

import struct
from pathlib import Path

from nodegraph.errors import Issue, WorkflowInvalid

CARRIERS = ("only PNG images saved by SaveImage, SaveMask or PreviewImage (or by ComfyUI) and WebP images saved "
            "by ComfyUI's SaveAnimatedWEBP carry one")
# file signatures of images that hold no workflow: read as JSON, they gave "fix the JSON syntax"
OTHER_IMAGES = ((b"\xff\xd8\xff", "a JPEG image"), (b"GIF87a", "a GIF image"), (b"GIF89a", "a GIF image"),
                (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"))


def image_workflow_text(raw: bytes, path: str | Path) -> str | None:
    """The workflow text a WebP that ComfyUI wrote carries (its prompt, else its editor workflow); None for bytes
    that are no image of these kinds (a JSON file, say). Raises WorkflowInvalid for a WebP without a workflow
    and for other images, which carry none."""
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        entries = _exif_entries(_riff_chunk(raw, b"EXIF"), path)
        text = next((entries[key] for key in ("prompt", "workflow") if entries.get(key)), None)
        if text is None:
            raise WorkflowInvalid([Issue("no_workflow", f"'{path}' has no embedded workflow (ComfyUI's 'prompt' "
                                                        f"or 'workflow' EXIF entry); {CARRIERS}")])
        return text
    kind = next((kind for magic, kind in OTHER_IMAGES if raw.startswith(magic)), None)
    if raw[:2] == b"BM" and raw[6:10] == b"\0\0\0\0":  # a BMP's reserved fields: not just text starting "BM"
        kind = "a BMP image"
    if kind is not None:
        raise WorkflowInvalid([Issue("no_workflow", f"'{path}' is {kind}, which carries no workflow; {CARRIERS}")])
    return None


def _riff_chunk(raw: bytes, fourcc: bytes) -> bytes | None:
    offset = 12
    while offset + 8 <= len(raw):
        name, size = raw[offset:offset + 4], struct.unpack("<I", raw[offset + 4:offset + 8])[0]
        if name == fourcc:
            return raw[offset + 8:offset + 8 + size]
        offset += 8 + size + (size & 1)  # chunks are padded to an even size
    return None


def _exif_entries(data: bytes | None, path: str | Path) -> dict[str, str]:
    """``key: value`` of each ``<key>:<value>`` text tag of the EXIF's first directory."""
    if not data:
        return {}
    from PIL import Image

    try:
        exif = Image.Exif()
        exif.load(data)  # takes the "Exif\0\0" prefix too
        values = list(exif.values())
    except Exception as exc:  # Pillow raises many kinds for a broken directory
        raise WorkflowInvalid([Issue("unreadable_file", f"cannot read the EXIF of WebP '{path}': {exc}")]) from None
    entries = {}
    for value in values:
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if isinstance(value, str) and ":" in value:
            key, _, text = value.partition(":")
            entries.setdefault(key, text.rstrip("\0"))
    return entries
