"""``/upload/image`` and ``/upload/mask`` as ComfyUI answers them: multipart ``image``, ``type`` (input by
default), ``subfolder``, ``overwrite``; a name already taken by other bytes becomes ``name (1).ext``. A mask
upload puts the uploaded image's alpha into the original's (ComfyUI's mask editor). Files are written
atomically: a failed upload leaves nothing half-written."""
from __future__ import annotations

import errno
import io
import json
import warnings
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..atomic import write_bytes_atomic
from ..limits import Limits
from .folders import Folders, OutsideFolder, inside


def _bad(text: str, status: int = 400) -> web.Response:
    return web.Response(status=status, text=text)


async def _target(post, folders: Folders, data: bytes) -> tuple[Path, dict] | web.Response:
    """Where an upload goes, and ComfyUI's answer for it (or the error response)."""
    image = post.get("image")
    if not isinstance(image, web.FileField) or not image.filename:
        return _bad("the form needs a file in the field 'image'")
    kind = post.get("type") or "input"
    folder = folders.of(kind, "input")
    if folder is None:
        return _bad(f"type '{kind}' must be input, output or temp")
    subfolder = post.get("subfolder", "") or ""
    name = Path(image.filename.replace("\\", "/")).name
    if not name:  # "." or a bare "/": that would name the folder itself
        return _bad(f"'{image.filename}' is not a file name")
    try:
        target = inside(folder, subfolder, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        inside(folder, subfolder, name)  # again: the folder made may not be a link out
        if post.get("overwrite") not in ("true", "1"):
            stem, suffix, i = target.stem, target.suffix, 1
            while target.exists() and target.read_bytes() != data:  # the same bytes again: keep the name
                target = target.with_name(f"{stem} ({i}){suffix}")
                i += 1
    except OutsideFolder as exc:
        return _bad(str(exc))
    except OSError as exc:  # a name too long, a subfolder that is a file
        return _bad(f"cannot store '{Path(subfolder, name)}' in the {kind} folder: {exc.strerror or exc}")
    return target, {"name": target.name, "subfolder": subfolder, "type": kind}


async def _form(request: web.Request):
    """The multipart form, or a 400 response for a body that is not one."""
    try:
        return await request.post()
    except (ValueError, HttpProcessingError) as exc:  # no boundary, broken part headers
        return _bad(f"the body is not a multipart form: {getattr(exc, 'message', None) or exc}")


def _store(target: Path, data: bytes, answer: dict) -> web.Response:
    try:
        write_bytes_atomic(target, data)
    except OSError as exc:  # a name too long or taken by a folder or a FIFO (the client's), a full disk (the server's)
        return _bad(f"cannot write '{answer['name']}' in the {answer['type']} folder: {exc.strerror or exc}",
                    400 if exc.errno in (errno.ENAMETOOLONG, errno.EISDIR, errno.EEXIST) else 500)
    return web.json_response(answer)


async def upload_image(request: web.Request, folders: Folders) -> web.Response:
    post = await _form(request)
    if isinstance(post, web.Response):
        return post
    image = post.get("image")
    data = image.file.read() if isinstance(image, web.FileField) else b""
    found = await _target(post, folders, data)
    if isinstance(found, web.Response):
        return found
    target, answer = found
    return _store(target, data, answer)


async def upload_mask(request: web.Request, folders: Folders, limits: Limits) -> web.Response:
    from PIL import Image, UnidentifiedImageError
    from PIL.PngImagePlugin import PngInfo

    post = await _form(request)
    if isinstance(post, web.Response):
        return post
    try:
        ref = json.loads(post.get("original_ref") or "")
        original = inside(folders.of(ref.get("type"), "output") or folders.output, ref.get("subfolder", ""),
                          ref["filename"])
    except OutsideFolder as exc:  # first: it is a ValueError too
        return _bad(str(exc))
    except (ValueError, KeyError, TypeError, AttributeError):
        return _bad("original_ref must be JSON with the original's filename (and subfolder, type)")
    try:
        found = original.is_file()
    except OSError:  # a name too long for the file system
        found = False
    if not found:
        return _bad(f"no original image '{ref['filename']}'", 404)
    image = post.get("image")
    if not isinstance(image, web.FileField):
        return _bad("the form needs a file in the field 'image'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the server's own limit applies
            with Image.open(original) as base, Image.open(image.file) as mask:
                for which, picture in (("the original", base), ("the mask", mask)):  # from the header, not decoded
                    problem = limits.pixels_problem(*picture.size)
                    if problem:
                        return _bad(f"{which}: {problem}")
                info = PngInfo()
                for key, value in (base.text if hasattr(base, "text") else {}).items():
                    info.add_text(key, value)
                composed = base.convert("RGBA")
                composed.putalpha(mask.convert("RGBA").getchannel("A"))
    except Image.DecompressionBombError as exc:
        return _bad(f"cannot combine the mask with the original: {exc}")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return _bad(f"cannot combine the mask with the original: {exc} (the mask must be an image of the same size)")
    buffer = io.BytesIO()
    composed.save(buffer, format="PNG", compress_level=4, pnginfo=info)
    found = await _target(post, folders, buffer.getvalue())
    if isinstance(found, web.Response):
        return found
    target, answer = found
    return _store(target, buffer.getvalue(), answer)
