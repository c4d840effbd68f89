"""ComfyUI's image, mask and latent-scaling types, imported and run through the Engine, against ComfyUI's
arithmetic written out here from its source (nodes.py, comfy_extras/nodes_mask.py, comfy/utils.py), in
ComfyUI's own layouts: IMAGE (B, H, W, C), MASK (B, H, W)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from nodegraph.api import Engine
from nodegraph.comfy import import_api, object_info
from nodegraph.comfy.convert import CONVERTERS, SPECS, Builder, ComfyNode, ComfyType, converters
from nodegraph.errors import WorkflowInvalid
from tests.imaging import DATA, photo_array, random_masks

PIXEL_TYPES = ("LoadImage", "LoadImageMask", "SaveImage", "PreviewImage", "ImageScale", "ImageScaleBy",
               "ImagePadForOutpaint", "GrowMask", "FeatherMask", "InvertMask", "ImageCompositeMasked",
               "LatentUpscale", "LatentUpscaleBy")


# --------------------------------------------------------------------------- ComfyUI's arithmetic, written out

def comfy_load_image(path) -> tuple[torch.Tensor, torch.Tensor]:
    """nodes.LoadImage for a single-frame 8-bit file: (1, H, W, 3) and (1, h, w)."""
    frame = ImageOps.exif_transpose(Image.open(path))
    image = torch.from_numpy(np.array(frame.convert("RGB")).astype(np.float32) / 255.0)[None]
    if "A" in frame.getbands():
        mask = 1.0 - torch.from_numpy(np.array(frame.getchannel("A")).astype(np.float32) / 255.0)
    elif frame.mode == "P" and "transparency" in frame.info:
        mask = 1.0 - torch.from_numpy(np.array(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0)
    else:
        mask = torch.zeros((64, 64), dtype=torch.float32)
    return image, mask[None]


def comfy_load_image_mask(path, channel: str) -> torch.Tensor:
    frame = ImageOps.exif_transpose(Image.open(path))
    if frame.getbands() != ("R", "G", "B", "A"):
        frame = frame.convert("RGBA")
    band = channel[0].upper()
    mask = torch.from_numpy(np.array(frame.getchannel(band)).astype(np.float32) / 255.0)
    return (1.0 - mask if band == "A" else mask)[None]


def comfy_levels(image: torch.Tensor) -> np.ndarray:
    """SaveImage's 8-bit levels of one (H, W, 3) image."""
    return np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)


def comfy_lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    out = []
    for item in samples:
        pil = Image.fromarray(np.clip(255.0 * item.movedim(0, -1).numpy(), 0, 255).astype(np.uint8))
        out.append(torch.from_numpy(np.array(pil.resize((width, height), Image.Resampling.LANCZOS))
                                    .astype(np.float32) / 255.0).movedim(-1, 0))
    return torch.stack(out)


def torch_linear_source(old: int, new: int) -> np.ndarray:
    """Where torch's bilinear interpolation (align_corners off) samples each of ``new`` outputs, in float64."""
    src = (np.arange(new) + 0.5) * (old / new) - 0.5
    return np.minimum(np.maximum(src, 0.0), old - 1)


def slerp_rows(a: np.ndarray, b: np.ndarray, r: np.ndarray) -> np.ndarray:
    """bislerp's slerp in float64: a, b (N, C), r (N,)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ua = np.where(na[:, None] == 0, 0.0, a / na[:, None])
        ub = np.where(nb[:, None] == 0, 0.0, b / nb[:, None])
        dot = (ua * ub).sum(1)
        omega = np.arccos(np.clip(dot, -1, 1))
        so = np.sin(omega)
        out = (np.sin((1 - r) * omega) / so)[:, None] * ua + (np.sin(r * omega) / so)[:, None] * ub
    out *= (na * (1 - r) + nb * r)[:, None]
    same, opposite = dot > 1 - 1e-5, dot < 1e-5 - 1
    out[same] = a[same]
    out[opposite] = (a * (1 - r[:, None]) + b * r[:, None])[opposite]
    return out


def comfy_bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """comfy.utils.bislerp in float64 numpy: slerp between the two bilinear taps, along the width then the height."""
    x = samples.double().numpy()
    n, c, h, w = x.shape
    for axis, old, new in ((3, w, width), (2, h, height)):
        src = torch_linear_source(old, new)
        i1 = np.floor(src).astype(int)
        i2 = np.minimum(i1 + 1, old - 1)
        r = src - i1
        a, b = np.take(x, i1, axis=axis), np.take(x, i2, axis=axis)
        shape = list(a.shape)
        rr = np.broadcast_to(r.reshape([1] * axis + [-1] + [1] * (3 - axis)), shape)
        flat = lambda t: np.moveaxis(t, 1, -1).reshape(-1, c)
        out = slerp_rows(flat(a), flat(b), flat(rr)[:, 0])
        x = np.moveaxis(out.reshape(shape[0], *shape[2:], c), -1, 1)
    return torch.from_numpy(x).float()


def comfy_common_upscale(samples: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    if crop == "center":
        old_w, old_h = samples.shape[-1], samples.shape[-2]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        samples = samples.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)
    if method == "bislerp":
        return comfy_bislerp(samples, width, height)
    if method == "lanczos":
        return comfy_lanczos(samples, width, height)
    return F.interpolate(samples, size=(height, width), mode=method)


def comfy_image_scale(image: torch.Tensor, method: str, width: int, height: int, crop: str) -> torch.Tensor:
    if width == 0 and height == 0:
        return image
    samples = image.movedim(-1, 1)
    if width == 0:
        width = max(1, round(samples.shape[3] * height / samples.shape[2]))
    elif height == 0:
        height = max(1, round(samples.shape[2] * width / samples.shape[3]))
    return comfy_common_upscale(samples, width, height, method, crop).movedim(1, -1)


def comfy_pad(image: torch.Tensor, left: int, top: int, right: int, bottom: int, feathering: int):
    d1, d2, d3, d4 = image.shape
    new = torch.ones((d1, d2 + top + bottom, d3 + left + right, d4), dtype=torch.float32) * 0.5
    new[:, top:top + d2, left:left + d3, :] = image
    mask = torch.ones((d2 + top + bottom, d3 + left + right), dtype=torch.float32)
    t = torch.zeros((d2, d3), dtype=torch.float32)
    if feathering > 0 and feathering * 2 < d2 and feathering * 2 < d3:
        for i in range(d2):
            for j in range(d3):
                d = min(i if top != 0 else d2, d2 - i if bottom != 0 else d2,
                        j if left != 0 else d3, d3 - j if right != 0 else d3)
                if d < feathering:
                    v = (feathering - d) / feathering
                    t[i, j] = v * v
    mask[top:top + d2, left:left + d3] = t
    return new, mask[None]


def comfy_grow(mask: torch.Tensor, expand: int, tapered: bool) -> torch.Tensor:
    """scipy.ndimage.grey_dilation / grey_erosion (mode "reflect": the edge pixel repeats) with a 3x3 cross or
    square footprint, |expand| times."""
    c = 0 if tapered else 1
    footprint = np.array([[c, 1, c], [1, 1, 1], [c, 1, c]], bool)
    out = []
    for m in mask.numpy():
        for _ in range(abs(expand)):
            padded = np.pad(m, 1, mode="symmetric")
            h, w = m.shape
            shifted = [padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3) if footprint[dy, dx]]
            m = np.max(shifted, axis=0) if expand > 0 else np.min(shifted, axis=0)
        out.append(torch.from_numpy(np.ascontiguousarray(m)))
    return torch.stack(out)


def comfy_feather(mask: torch.Tensor, left: int, top: int, right: int, bottom: int) -> torch.Tensor:
    out = mask.reshape((-1, mask.shape[-2], mask.shape[-1])).clone()
    left, right = min(left, out.shape[-1]), min(right, out.shape[-1])
    top, bottom = min(top, out.shape[-2]), min(bottom, out.shape[-2])
    for x in range(left):
        out[:, :, x] *= (x + 1.0) / left
    for x in range(right):
        out[:, :, -x] *= (x + 1) / right
    for y in range(top):
        out[:, y, :] *= (y + 1) / top
    for y in range(bottom):
        out[:, -y, :] *= (y + 1) / bottom
    return out


def to_batch(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] > n:
        return t[:n]
    return t.repeat(math.ceil(n / t.shape[0]), *[1] * (t.ndim - 1))[:n]


def comfy_composite(destination, source, x, y, resize_source, mask=None):
    """ImageCompositeMasked: nodes_mask.composite with multiplier 1, on (B, C, H, W)."""
    destination, source = destination.clone().movedim(-1, 1), source.movedim(-1, 1)
    if resize_source:
        source = F.interpolate(source, size=destination.shape[-2:], mode="bilinear")
    source = to_batch(source, destination.shape[0])
    x = max(-source.shape[-1], min(x, destination.shape[-1]))
    y = max(-source.shape[-2], min(y, destination.shape[-2]))
    right, bottom = x + source.shape[-1], y + source.shape[-2]
    if mask is None:
        mask = torch.ones_like(source)
    else:
        mask = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]), size=source.shape[-2:], mode="bilinear")
        mask = to_batch(mask, source.shape[0])
    vw, vh = destination.shape[-1] - x + min(0, x), destination.shape[-2] - y + min(0, y)
    mask = mask[:, :, :vh, :vw]
    blended = mask * source[..., :vh, :vw] + (torch.ones_like(mask) - mask) * destination[..., y:bottom, x:right]
    destination[..., y:bottom, x:right] = blended
    return destination.movedim(1, -1)


# --------------------------------------------------------------------------- nodegraph <-> ComfyUI layouts

def comfy_image(t: torch.Tensor) -> torch.Tensor:
    return t.movedim(1, -1)


def comfy_mask(t: torch.Tensor) -> torch.Tensor:
    return t[:, 0]


def run(prompt: dict, tmp_path, *targets: str, **kwargs) -> dict:
    workflow = import_api(prompt)
    result = Engine(cache_dir=False).run(workflow, out_dir=tmp_path / "out", temp_dir=tmp_path / "temp",
                                         targets=list(targets) or None, **kwargs)
    assert result.ok, result.to_dict()
    return result.outputs


def load(path) -> dict:
    return {"class_type": "LoadImage", "inputs": {"image": str(path)}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Test files: an odd-sized RGBA PNG, LA and palette-with-transparency PNGs, an EXIF-rotated JPEG."""
    root = tmp_path_factory.mktemp("comfy_pixels")
    rgb = photo_array("chelsea_128.png")[:77, :93]
    alpha = random_masks(77, 93, 1, seed=3, soft=True)[0]
    paths = {"rgb": DATA / "chelsea_128.png", "jpeg": DATA / "rocket_128.jpg"}
    paths["rgba"] = root / "rgba.png"
    Image.fromarray(np.dstack([rgb, 255 - alpha])).save(paths["rgba"])
    paths["la"] = root / "la.png"
    Image.fromarray(np.dstack([rgb[..., 1], alpha])).convert("LA").save(paths["la"])
    paths["palette"] = root / "palette.png"
    pal = Image.fromarray(rgb).quantize(16)
    pal.info["transparency"] = 3
    pal.save(paths["palette"], transparency=3)
    paths["exif"] = root / "exif.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rgb).save(paths["exif"], exif=exif, quality=95)
    return paths


# --------------------------------------------------------------------------- files

@pytest.mark.parametrize("name", ["rgb", "jpeg", "rgba", "la", "palette", "exif"])
def test_load_image_is_comfyui(files, tmp_path, name):
    out = run({"1": load(files[name])}, tmp_path, "1")["1"]
    image, mask = comfy_load_image(files[name])
    assert torch.equal(comfy_image(out["image"]), image)
    assert torch.equal(comfy_mask(out["mask"]), mask)
    if name in ("rgb", "jpeg", "exif"):
        assert mask.shape == (1, 64, 64)  # ComfyUI's mask for a file without alpha
    else:
        assert mask.shape[1:] == image.shape[1:3] and 0 < mask.mean() < 1
    if name == "exif":
        assert image.shape[1:3] == (93, 77)  # turned upright


@pytest.mark.parametrize("name", ["rgb", "rgba", "la", "palette", "exif"])
@pytest.mark.parametrize("channel", ["alpha", "red", "green", "blue"])
def test_load_image_mask_is_comfyui(files, tmp_path, name, channel):
    prompt = {"7": {"class_type": "LoadImageMask", "inputs": {"image": str(files[name]), "channel": channel}},
              "8": {"class_type": "InvertMask", "inputs": {"mask": ["7", 0]}}}
    out = run(prompt, tmp_path, "8")["8"]["mask"]
    expected = comfy_load_image_mask(files[name], channel)
    assert torch.equal(comfy_mask(out), 1.0 - expected)


def test_save_and_preview_write_comfyui_levels(files, tmp_path):
    prompt = {"1": load(files["rgba"]),
              "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bicubic",
                                                           "width": 61, "height": 50, "crop": "disabled"}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "sub/cat"}},
              "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    run(prompt, tmp_path)
    image, _ = comfy_load_image(files["rgba"])
    expected = comfy_levels(comfy_image_scale(image, "bicubic", 61, 50, "disabled")[0])
    saved = sorted((tmp_path / "out" / "sub").glob("cat_*.png"))
    previews = sorted((tmp_path / "temp").rglob("*.png"))
    assert len(saved) == 1 and len(previews) == 1
    for path in saved + previews:
        assert np.array_equal(np.asarray(Image.open(path)), expected)
    # truncation, not rounding: some level differs from round(255 * x)
    rounded = np.round(np.clip(255.0 * comfy_image_scale(image, "bicubic", 61, 50, "disabled")[0].numpy(), 0, 255))
    assert (rounded != expected).any()


# --------------------------------------------------------------------------- scaling

@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"])
@pytest.mark.parametrize("width,height,crop", [(61, 50, "disabled"), (0, 45, "disabled"), (51, 0, "center"),
                                               (200, 90, "center"), (40, 77, "center"), (0, 0, "center")])
def test_image_scale_is_comfyui(files, tmp_path, method, width, height, crop):
    prompt = {"1": load(files["rgba"]),
              "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": method,
                                                           "width": width, "height": height, "crop": crop}}}
    out = run(prompt, tmp_path, "2")["2"]["image"]
    image, _ = comfy_load_image(files["rgba"])
    expected = comfy_image_scale(image, method, width, height, crop)
    assert torch.equal(comfy_image(out), expected)
    if (width, height) == (0, 0):
        assert torch.equal(comfy_image(out), image)


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"])
@pytest.mark.parametrize("scale_by", [0.37, 1.0, 1.55])
def test_image_scale_by_is_comfyui(files, tmp_path, method, scale_by):
    prompt = {"1": load(files["jpeg"]),
              "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": method,
                                                             "scale_by": scale_by}}}
    out = run(prompt, tmp_path, "2")["2"]["image"]
    image, _ = comfy_load_image(files["jpeg"])
    samples = image.movedim(-1, 1)
    width, height = round(samples.shape[3] * scale_by), round(samples.shape[2] * scale_by)
    expected = comfy_common_upscale(samples, width, height, method, "disabled").movedim(1, -1)
    assert out.shape[-2:] == (height, width)
    assert torch.equal(comfy_image(out), expected)


@pytest.fixture
def latent_source(tiny, monkeypatch):
    """A test-only ComfyUI type "TestLatent" converted to LoadCheckpoint + LoadImage + VAEEncode on the tiny SD
    model, so that the latent types get real latents through import_api."""
    def convert(node: ComfyNode, b: Builder) -> list:
        ckpt = b.add(node, "LoadCheckpoint", suffix="ckpt", params={"path": str(tiny.sd15)})
        img = b.add(node, "LoadImage", suffix="image", params={"path": node.inputs["image"]})
        nid = b.add(node, "VAEEncode", inputs={"vae": f"{ckpt}.vae", "image": f"{img}.image"})
        return [f"{nid}.latent"]

    converters()
    monkeypatch.setitem(CONVERTERS, "TestLatent", convert)
    monkeypatch.setitem(SPECS, "TestLatent", ComfyType({"image": ("STRING",)}, outputs=("LATENT",)))
    return {"class_type": "TestLatent", "inputs": {"image": str(DATA / "astronaut_96.png")}}


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"])
def test_latent_upscale_is_comfyui(latent_source, tmp_path, method):
    sizes = [(200, 136, "disabled"), (0, 100, "center"), (72, 0, "center"), (8, 40, "disabled"), (0, 0, "disabled")]
    prompt = {"1": latent_source}
    for i, (width, height, crop) in enumerate(sizes):
        prompt[f"u{i}"] = {"class_type": "LatentUpscale", "inputs": {"samples": ["1", 0], "upscale_method": method,
                                                                     "width": width, "height": height, "crop": crop}}
    outputs = run(prompt, tmp_path, "1", *(f"u{i}" for i in range(len(sizes))))
    samples = outputs["1"]["latent"].samples
    assert samples.shape == (1, 4, 12, 12)
    for i, (width, height, crop) in enumerate(sizes):
        out = outputs[f"u{i}"]["latent"].samples
        if width == 0 and height == 0:
            assert torch.equal(out, samples)
            continue
        # LatentUpscale's sizes: pixel sides at least 64, a 0 side from the aspect, then // 8
        if width == 0:
            height = max(64, height)
            width = max(64, round(samples.shape[-1] * height / samples.shape[-2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(samples.shape[-2] * width / samples.shape[-1]))
        else:
            width, height = max(64, width), max(64, height)
        expected = comfy_common_upscale(samples, width // 8, height // 8, method, crop)
        assert out.shape == expected.shape
        if method == "bislerp":  # the reference slerps in float64; nodegraph in float32 as ComfyUI
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(out, expected)


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"])
def test_latent_upscale_by_is_comfyui(latent_source, tmp_path, method):
    prompt = {"1": latent_source,
              "2": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["1", 0], "upscale_method": method,
                                                                "scale_by": 1.37}},
              "3": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["1", 0], "upscale_method": method,
                                                                "scale_by": 0.6}}}
    outputs = run(prompt, tmp_path, "1", "2", "3")
    samples = outputs["1"]["latent"].samples
    for nid, scale in (("2", 1.37), ("3", 0.6)):
        out = outputs[nid]["latent"].samples
        expected = comfy_common_upscale(samples, round(12 * scale), round(12 * scale), method, "disabled")
        assert out.shape == (1, 4, round(12 * scale), round(12 * scale))
        if method == "bislerp":
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(out, expected)


def test_bislerp_keeps_vector_lengths_between_neighbours():
    """bislerp on two pixels: the middle vector is the slerp of its neighbours, not their linear mean."""
    from nodegraph.nodes.scale import bislerp

    a, b = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0, 0.0])
    samples = torch.stack([a, b]).T.reshape(1, 4, 1, 2)
    out = bislerp(samples, 4, 1)[0, :, 0].T  # 4 positions along the width
    expected = comfy_bislerp(samples, 4, 1)[0, :, 0].T
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    middle = out[1]  # a quarter of the way from a to b: between a and b on the arc
    assert abs(float(middle.norm()) - 1.25) < 1e-5 and middle[0] > middle[1] > 0


# --------------------------------------------------------------------------- padding and compositing

@pytest.mark.parametrize("left,top,right,bottom,feathering", [
    (8, 0, 16, 0, 10), (0, 24, 0, 8, 40), (5, 3, 7, 9, 0), (16, 16, 16, 16, 12),
    (3, 0, 0, 0, 30),   # feathering larger than the pad
    (8, 8, 8, 8, 40)])  # feathering too large for the image: the old image's mask stays 0
def test_image_pad_for_outpaint_is_comfyui(files, tmp_path, left, top, right, bottom, feathering):
    prompt = {"1": load(files["rgba"]),
              "2": {"class_type": "ImagePadForOutpaint", "inputs": {
                  "image": ["1", 0], "left": left, "top": top, "right": right, "bottom": bottom,
                  "feathering": feathering}}}
    out = run(prompt, tmp_path, "2")["2"]
    image, _ = comfy_load_image(files["rgba"])
    expected_image, expected_mask = comfy_pad(image, left, top, right, bottom, feathering)
    assert torch.equal(comfy_image(out["image"]), expected_image)
    assert torch.equal(comfy_mask(out["mask"]), expected_mask)
    feathered = 0 < feathering and 2 * feathering < min(image.shape[1:3])
    assert bool((expected_mask[0, top:top + 77, left:left + 93] > 0).any()) == feathered


@pytest.mark.parametrize("x,y,resize_source,with_mask", [
    (0, 0, False, False), (13, 7, False, True), (60, 40, False, True), (200, 5, False, True),
    (5, 3, True, True), (3, 70, False, False)])
def test_image_composite_masked_is_comfyui(files, tmp_path, x, y, resize_source, with_mask):
    prompt = {"1": load(files["jpeg"]), "2": load(files["rgba"]),
              "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear",
                                                           "width": 45, "height": 31, "crop": "disabled"}},
              "4": {"class_type": "ImageCompositeMasked", "inputs": {
                  "destination": ["1", 0], "source": ["3", 0], "x": x, "y": y, "resize_source": resize_source}}}
    if with_mask:
        prompt["4"]["inputs"]["mask"] = ["2", 1]  # the 77 x 93 alpha mask, stretched to the source
    out = run(prompt, tmp_path, "4")["4"]["image"]
    destination, _ = comfy_load_image(files["jpeg"])
    source_full, alpha = comfy_load_image(files["rgba"])
    source = comfy_image_scale(source_full, "bilinear", 45, 31, "disabled")
    expected = comfy_composite(destination, source, x, y, resize_source, alpha if with_mask else None)
    assert torch.equal(comfy_image(out), expected)
    assert not torch.equal(expected, destination) or x >= destination.shape[2]


def test_composite_with_comfyui_empty_mask_keeps_destination(files, tmp_path):
    """LoadImage of a file without alpha gives ComfyUI's 64x64 zeros; as a composite mask it keeps the destination."""
    prompt = {"1": load(files["jpeg"]), "2": load(files["rgb"]),
              "3": {"class_type": "ImageCompositeMasked", "inputs": {
                  "destination": ["1", 0], "source": ["2", 0], "x": 4, "y": 4, "resize_source": False,
                  "mask": ["2", 1]}}}
    out = run(prompt, tmp_path, "3", "1")
    assert torch.equal(out["3"]["image"], out["1"]["image"])


# --------------------------------------------------------------------------- masks

@pytest.mark.parametrize("expand", [3, -2, 1, -1, 7, 0])
@pytest.mark.parametrize("tapered", [True, False])
def test_grow_mask_is_comfyui(files, tmp_path, expand, tapered):
    prompt = {"1": load(files["rgba"]),
              "2": {"class_type": "GrowMask", "inputs": {"mask": ["1", 1], "expand": expand,
                                                         "tapered_corners": tapered}}}
    out = run(prompt, tmp_path, "2")["2"]["mask"]
    _, mask = comfy_load_image(files["rgba"])
    assert torch.equal(comfy_mask(out), comfy_grow(mask, expand, tapered))


def test_grow_mask_hard_edges_touch_the_border(tmp_path):
    """A hard mask touching the image's edges: grows and shrinks as scipy's reflected border does."""
    path = tmp_path / "edge.png"
    alpha = np.full((37, 45), 255, np.uint8)
    alpha[:9, :] = 0
    alpha[20:, 30:] = 0
    Image.fromarray(np.dstack([photo_array()[:37, :45], alpha])).save(path)
    for expand in (4, -4):
        prompt = {"1": load(path), "2": {"class_type": "GrowMask", "inputs": {
            "mask": ["1", 1], "expand": expand, "tapered_corners": True}}}
        out = run(prompt, tmp_path, "2")["2"]["mask"]
        _, mask = comfy_load_image(path)
        expected = comfy_grow(mask, expand, True)
        assert torch.equal(comfy_mask(out), expected) and not torch.equal(expected, mask)


@pytest.mark.parametrize("left,top,right,bottom", [(5, 0, 0, 0), (0, 0, 7, 0), (3, 4, 6, 9), (200, 1, 93, 80),
                                                   (0, 0, 0, 0), (1, 1, 1, 1)])
def test_feather_mask_is_comfyui(files, tmp_path, left, top, right, bottom):
    prompt = {"1": load(files["rgba"]),
              "2": {"class_type": "InvertMask", "inputs": {"mask": ["1", 1]}},
              "3": {"class_type": "FeatherMask", "inputs": {"mask": ["2", 0], "left": left, "top": top,
                                                            "right": right, "bottom": bottom}}}
    out = run(prompt, tmp_path, "3")["3"]["mask"]
    _, mask = comfy_load_image(files["rgba"])
    assert torch.equal(comfy_mask(out), comfy_feather(1.0 - mask, left, top, right, bottom))


def test_feather_linear_ramps_are_symmetric():
    """MaskFeather's own "linear" ramps: column k from either edge gets (k + 1) / width."""
    from nodegraph.nodes.mask import feather_mask

    out = feather_mask(torch.ones(1, 1, 6, 9), left=3, right=3, top=2, bottom=2)[0, 0]
    ramp_x = torch.tensor([1 / 3, 2 / 3, 1, 1, 1, 1, 1, 2 / 3, 1 / 3])
    ramp_y = torch.tensor([1 / 2, 1, 1, 1, 1, 1 / 2])
    torch.testing.assert_close(out, ramp_y[:, None] * ramp_x[None, :])
    comfy = feather_mask(torch.ones(1, 1, 6, 9), right=3, ramp="comfyui")[0, 0, 0]
    torch.testing.assert_close(comfy, torch.tensor([1 / 3, 1, 1, 1, 1, 1, 1, 1, 2 / 3]))


def test_invert_mask_is_comfyui(files, tmp_path):
    prompt = {"1": load(files["palette"]), "2": {"class_type": "InvertMask", "inputs": {"mask": ["1", 1]}}}
    out = run(prompt, tmp_path, "2")["2"]["mask"]
    _, mask = comfy_load_image(files["palette"])
    assert torch.equal(comfy_mask(out), 1.0 - mask)


# --------------------------------------------------------------------------- specs and problems

def minimal_inputs(class_type: str) -> dict:
    """Every required input of the spec: links to a stand-in source for sockets, the default (or first choice)
    for widgets."""
    inputs = {}
    for name, spec in SPECS[class_type].required.items():
        if isinstance(spec[0], list):
            inputs[name] = spec[0][0] if spec[0] else "photo.png"
        elif len(spec) > 1 and "default" in spec[1]:
            inputs[name] = spec[1]["default"]
        else:
            inputs[name] = ["src", {"IMAGE": 0, "MASK": 1, "LATENT": 2}[spec[0]]]
    return inputs


def test_specs_are_comfyui_and_every_required_input_is_used():
    converters()
    for class_type in PIXEL_TYPES:
        assert class_type in SPECS and class_type in CONVERTERS
    spec = SPECS["ImageScale"]
    assert list(spec.required) == ["image", "upscale_method", "width", "height", "crop"]
    assert spec.required["upscale_method"] == (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],)
    assert spec.required["width"] == ("INT", {"default": 512, "min": 0, "max": 16384, "step": 1})
    assert SPECS["LatentUpscale"].required["width"][1]["step"] == 8
    assert SPECS["LatentUpscale"].required["upscale_method"][0][-1] == "bislerp"
    assert SPECS["LatentUpscaleBy"].required["scale_by"][1]["default"] == 1.5
    assert SPECS["ImageScaleBy"].required["scale_by"][1]["default"] == 1.0
    assert SPECS["ImagePadForOutpaint"].required["feathering"][1]["default"] == 40
    assert list(SPECS["ImagePadForOutpaint"].required) == ["image", "left", "top", "right", "bottom", "feathering"]
    assert SPECS["GrowMask"].required["tapered_corners"] == ("BOOLEAN", {"default": True})
    assert SPECS["GrowMask"].required["expand"][1]["min"] == -16384
    assert list(SPECS["ImageCompositeMasked"].required) == ["destination", "source", "x", "y", "resize_source"]
    assert SPECS["ImageCompositeMasked"].optional == {"mask": ("MASK",)}
    assert SPECS["SaveImage"].output_node and SPECS["SaveImage"].required["filename_prefix"][1]["default"] == "ComfyUI"
    assert SPECS["LoadImageMask"].required["channel"] == (["alpha", "red", "green", "blue"],)
    info = object_info()
    assert info["ImagePadForOutpaint"]["output"] == ["IMAGE", "MASK"]
    assert info["LoadImage"]["output"] == ["IMAGE", "MASK"] and info["PreviewImage"]["output_node"]

    for class_type in PIXEL_TYPES:
        inputs = minimal_inputs(class_type)
        builder, refs = convert(class_type, inputs)
        assert builder.problems == [], (class_type, builder.problems)
        assert len(refs) == len(SPECS[class_type].outputs), class_type
        written = str(builder.nodes)
        for name, value in inputs.items():  # every input reaches the nodegraph nodes
            if isinstance(value, list):
                assert f"s.{['image', 'mask', 'latent'][value[1]]}" in written, (class_type, name)
            else:  # another value writes other nodes
                other, _ = convert(class_type, {**inputs, name: other_value(SPECS[class_type].required[name])})
                assert other.problems == [] and str(other.nodes) != written, (class_type, name)
        for name in SPECS[class_type].required:  # a missing required input is a problem naming it
            partial, _ = convert(class_type, {k: v for k, v in inputs.items() if k != name})
            assert any(p.field == name for p in partial.problems), (class_type, name)


def convert(class_type: str, inputs: dict):
    """Run one converter on a node whose links lead to a stand-in source with IMAGE, MASK and LATENT outputs."""
    builder = Builder({"src": ComfyNode("src", "LoadImage", {"image": "photo.png"}),
                       "n": ComfyNode("n", class_type, inputs)})
    builder.outputs["src"] = ["s.image", "s.mask", "s.latent"]
    return builder, CONVERTERS[class_type](builder.prompt["n"], builder)


def other_value(spec: tuple):
    """A valid value of a widget other than its default (or first choice)."""
    if isinstance(spec[0], list):
        return spec[0][1] if len(spec[0]) > 1 else "other.png"
    default = spec[1]["default"]
    if spec[0] == "BOOLEAN":
        return not default
    if spec[0] == "STRING":
        return default + "_other"
    return min(default + spec[1].get("step", 1) * 2, spec[1]["max"])


def test_import_problems_name_node_and_input(tmp_path):
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png [output]"}},
              "2": {"class_type": "LoadImageMask", "inputs": {"image": "m.png", "channel": "purple"}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "%date:yyyy%/x"}},
              "4": {"class_type": "GrowMask", "inputs": {"mask": ["2", 0], "expand": 2, "tapered_corners": ["5", 0]}},
              "5": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "lanczos",
                                                           "width": 10, "height": 10}}}
    with pytest.raises(WorkflowInvalid) as caught:
        import_api(prompt)
    found = {(i.node_id, i.field) for i in caught.value.issues}
    assert {("1", "image"), ("2", "channel"), ("3", "filename_prefix"), ("4", "tapered_corners"),
            ("5", "crop")} <= found


def test_image_name_with_input_annotation_and_bad_values_fail_validation(files, tmp_path):
    workflow = import_api({"1": {"class_type": "LoadImage", "inputs": {"image": f"{files['rgba']} [input]"}},
                           "2": {"class_type": "ImageScale", "inputs": {
                               "image": ["1", 0], "upscale_method": "bislerp", "width": 8, "height": 8,
                               "crop": "disabled"}}})
    assert workflow["nodes"]["1"]["params"]["path"] == str(files["rgba"])
    issues = Engine(cache_dir=False).validate(workflow, targets=["2"])
    assert [(i.node_id, i.field) for i in issues] == [("2", "method")]


def test_batches_follow_comfyui():
    """Batches, which single files cannot give: the source and mask take the destination's batch size; the pad
    mask is one for the batch; mask nodes work per item."""
    from nodegraph.nodes.composite import composite_node
    from nodegraph.nodes.mask import mask_feather, mask_grow
    from nodegraph.nodes.outpaint import pad_image_node

    g = torch.Generator().manual_seed(5)
    for dest_batch, src_batch, mask_batch in ((3, 2, 1), (1, 2, 2), (4, 1, 3)):
        destination = torch.rand(dest_batch, 3, 40, 52, generator=g)
        source = torch.rand(src_batch, 3, 21, 30, generator=g)
        mask = torch.rand(mask_batch, 1, 17, 11, generator=g)
        out = composite_node(destination, source, mask, x=35, y=9)
        expected = comfy_composite(comfy_image(destination), comfy_image(source), 35, 9, False, comfy_mask(mask))
        assert torch.equal(comfy_image(out), expected)
    images = torch.rand(2, 3, 33, 45, generator=g)
    out = pad_image_node(images, left=0, top=6, right=9, bottom=0, feathering=7)
    expected_image, expected_mask = comfy_pad(comfy_image(images), 0, 6, 9, 0, 7)
    assert torch.equal(comfy_image(out["image"]), expected_image) and torch.equal(comfy_mask(out["mask"]), expected_mask)
    masks = torch.rand(3, 1, 30, 41, generator=g)
    assert torch.equal(comfy_mask(mask_grow(masks, -2, "square")), comfy_grow(comfy_mask(masks), -2, False))
    assert torch.equal(comfy_mask(mask_feather(masks, 4, 3, 2, 5, "comfyui")), comfy_feather(comfy_mask(masks), 4, 3, 2, 5))
