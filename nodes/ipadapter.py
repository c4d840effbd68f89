"""LoadIPAdapter and ApplyIPAdapter: an image prompt for the samplers (docs/design.md §4.10), via diffusers.

``LoadIPAdapter`` reads an IP-Adapter in its usual single-file layout (``image_proj.*`` and
``ip_adapter.{n}.to_k_ip/to_v_ip.weight`` keys, ``.safetensors`` only: pickles are refused) and a CLIP
vision encoder folder (``CLIPVisionModelWithProjection``, transformers layout). The image processor is
``CLIPImageProcessor`` from the folder's ``preprocessor_config.json``; without one (h94/IP-Adapter's
``image_encoder`` folders have none) it is ``CLIPImageProcessor(size=image_size, crop_size=image_size)``
with the encoder's ``image_size`` (224 for the real ones), which is what diffusers' ``load_ip_adapter``
makes. Widths are read from the safetensors header and ``config.json`` at validation, so an adapter that
does not fit its image encoder is reported before anything loads.

``ApplyIPAdapter`` makes a MODEL that samples with the image prompt; the MODEL it was given is unchanged.
The arithmetic is diffusers' (``load_ip_adapter`` + ``set_ip_adapter_scale`` + ``ip_adapter_image``):

- the adapter's weights become diffusers modules through diffusers' own converters
  (``UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers`` /
  ``_convert_ip_adapter_attn_to_diffusers``): an image projection and ``IPAdapterAttnProcessor2_0``
  cross-attention processors with ``scale``, built once per UNet and adapter and shared by every
  ApplyIPAdapter that uses them (each sets its own scale when applied);
- those are installed on the shared UNet only while a sampler runs with this MODEL (``IPAdapterPatch.applied``)
  and the UNet's own processors and ``encoder_hid_proj`` are put back afterwards, even on error or interrupt;
- the images are encoded once, when the node runs: each image of the IMAGE batch goes to 8 bits and
  through the image processor like a PIL image given to diffusers; plain adapters take the encoder's
  ``image_embeds``, the others (plus, full face) its penultimate hidden states. Several images of one
  adapter are stacked: ``(1, n_images, ...)``, and the UNet attends to all of their tokens together;
- the unconditional side of guidance gets diffusers' negative image prompt: zeros for plain adapters,
  the hidden states of an all-zero (already normalised) pixel tensor for the others;
- chaining two ApplyIPAdapter nodes gives one MODEL with both adapters, as diffusers loads a list of
  adapters (one processor per layer holding both, each with its own scale and images).

Dimension problems (an SDXL adapter on an SD 1.5 UNet, a ViT-bigG adapter with a ViT-H encoder) are
errors that name both widths: adapter vs encoder at validation, adapter vs UNet when ApplyIPAdapter runs,
before any sampling step. FaceID adapters (which need insightface embeddings) are not supported.
"""
from __future__ import annotations

from nodegraph.lazy import lazy

import contextlib
import json
import logging
import threading
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

torch = lazy("torch")
from pydantic import Field

from nodegraph.devices import resolve_dtype
from nodegraph.context import RunContext
from nodegraph.errors import NodeError
from nodegraph import node
from nodegraph.sockets import MODEL, Image, InputPath, Model, SpaceRule, socket

from ._files import files_identity, safetensors_shapes, weights_file_problem, weights_folder_problem
from ._loading import LoadedOnce
from ._pixels import check_image, to_pil
from ._memory import MANAGER, compute_device, on_device
from .denoise import Hook, ModelPatch, unet_lock

log = logging.getLogger("nodegraph.ipadapter")

IP_ADAPTER = "IP_ADAPTER"
IPAdapter = socket(IP_ADAPTER)

# diffusers' names for the kinds its converter knows, by the image_proj key that identifies them
KIND_NAMES = {"plain": "IP-Adapter", "plus": "IP-Adapter Plus", "full": "IP-Adapter Full Face"}
# what CLIPVisionConfig() assumes when config.json leaves a value out
VISION_DEFAULTS = {"hidden_size": 768, "projection_dim": 512, "image_size": 224}


# ---------------------------------------------------------------------------------------------- inspection

@dataclass(frozen=True)
class AdapterInfo:
    """What an IP-Adapter file is, from its safetensors header alone."""

    path: Path
    kind: str  # "plain" | "plus" | "full"
    image_embed_dim: int  # the width it takes from the image encoder
    cross_attention_dim: int  # the width of the image tokens it makes (the UNet's cross_attention_dim)
    num_tokens: int
    layers: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]  # key id -> (to_k_ip shape, to_v_ip shape)

    @property
    def uses_hidden_states(self) -> bool:
        """Plain adapters take the pooled, projected ``image_embeds``; the others the penultimate hidden states."""
        return self.kind != "plain"

    @property
    def encoder_width_name(self) -> str:
        return "hidden_size" if self.uses_hidden_states else "projection_dim"

    def describe(self) -> str:
        return (f"{KIND_NAMES[self.kind]} ({self.num_tokens} image tokens, {self.cross_attention_dim} wide, "
                f"{len(self.layers)} cross-attention layers) from {self.path.name}")


@dataclass(frozen=True)
class EncoderInfo:
    """What a CLIP vision encoder folder is, from its config.json alone."""

    path: Path
    hidden_size: int
    projection_dim: int
    image_size: int

    def width_for(self, adapter: AdapterInfo) -> int:
        return self.hidden_size if adapter.uses_hidden_states else self.projection_dim


def adapter_path_problem(path: str) -> str | None:
    """A reason the file cannot be an IP-Adapter, found from its name (None: looks fine)."""
    return weights_file_problem(path, "IP-Adapter file", "use the adapter's .safetensors file (h94/IP-Adapter "
                                "ships both) or convert it with safetensors")


def inspect_adapter(path: str | Path) -> AdapterInfo:
    """Kind and widths of an IP-Adapter file (diffusers' converter's rules), without loading weights."""
    path = Path(path)
    problem = adapter_path_problem(str(path))
    if problem:
        raise NodeError(problem)
    shapes = safetensors_shapes(path)
    proj = {k[len("image_proj."):]: s for k, s in shapes.items() if k.startswith("image_proj.")}
    ip = {k[len("ip_adapter."):]: s for k, s in shapes.items() if k.startswith("ip_adapter.")}
    if not proj or not ip:
        raise NodeError(f"{path.name} is not an IP-Adapter: it needs 'image_proj.*' and 'ip_adapter.*' weights "
                        f"(found {len(proj)} and {len(ip)})")
    faceid = "perceiver_resampler.proj_in.weight" in proj or ("norm.weight" in proj and "proj.weight" not in proj)
    if faceid or any("lora" in k for k in ip):
        raise NodeError(f"{path.name} is an IP-Adapter FaceID, which takes insightface face embeddings rather than "
                        "CLIP image embeddings; it is not supported here")
    try:
        if "proj.weight" in proj:
            kind, embed, cross = "plain", proj["proj.weight"][1], proj["norm.weight"][0]
            tokens = proj["proj.weight"][0] // cross
        elif "proj.3.weight" in proj:
            kind, embed, cross, tokens = "full", proj["proj.0.weight"][1], proj["proj.3.weight"][0], 257
        elif "latents" in proj:
            kind, embed, cross = "plus", proj["proj_in.weight"][1], proj["proj_out.weight"][0]
            tokens = proj["latents"][1]
        else:
            raise KeyError("image_proj.proj.weight / image_proj.latents")
    except (KeyError, IndexError) as exc:
        raise NodeError(f"{path.name}: unknown IP-Adapter image projection (missing {exc}); supported are "
                        "IP-Adapter, IP-Adapter Plus and Full Face in the original layout") from None
    layers = {}
    for key, shape in ip.items():
        head, _, rest = key.partition(".")
        if rest == "to_k_ip.weight" and head.isdigit():
            layers[int(head)] = (shape, ip.get(f"{head}.to_v_ip.weight", ()))
    if not layers:
        raise NodeError(f"{path.name} has no 'ip_adapter.<n>.to_k_ip.weight' cross-attention weights")
    return AdapterInfo(path, kind, int(embed), int(cross), int(tokens), dict(sorted(layers.items())))


def encoder_folder_problem(folder: str | Path) -> str | None:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return (f"folder '{folder}' is not a CLIP vision image encoder: it has no config.json (give the "
                "adapter's image_encoder folder, e.g. h94/IP-Adapter models/image_encoder)")
    return weights_folder_problem(folder, "image encoder folder",
                                  "CLIPVisionModelWithProjection.from_pretrained(folder).save_pretrained(folder)")


def inspect_encoder(folder: str | Path) -> EncoderInfo:
    folder = Path(folder)
    problem = encoder_folder_problem(folder)
    if problem:
        raise NodeError(problem)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NodeError(f"cannot read {folder / 'config.json'}: {exc}") from None
    vision = config.get("vision_config", config)  # a full CLIP config nests the vision part
    value = lambda k: int(vision.get(k, config.get(k, VISION_DEFAULTS[k])))  # noqa: E731
    return EncoderInfo(folder, value("hidden_size"), value("projection_dim"), value("image_size"))


def encoder_fit_problem(adapter: AdapterInfo, encoder: EncoderInfo) -> str | None:
    width = encoder.width_for(adapter)
    if adapter.image_embed_dim == width:
        return None
    what = "penultimate hidden states" if adapter.uses_hidden_states else "image embeddings (image_embeds)"
    return (f"{adapter.path.name} ({KIND_NAMES[adapter.kind]}) takes {adapter.image_embed_dim}-wide {what} but the "
            f"image encoder in {encoder.path} gives {width} ({adapter.encoder_width_name} in its config.json); "
            "use the image encoder the adapter was trained with (ViT-H for most h94/IP-Adapter files, "
            "ViT-bigG for ip-adapter_sdxl.safetensors)")


def unet_cross_attention_layers(unet) -> list[tuple[str, int]]:
    """(processor name, hidden size) of the cross-attention layers, as diffusers' converter numbers them."""
    blocks = list(unet.config.block_out_channels)
    layers = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = blocks[::-1][int(name[len("up_blocks.")])]
        else:
            hidden = blocks[int(name[len("down_blocks.")])]
        layers.append((name, hidden))
    return layers


def unet_fit_problem(adapter: AdapterInfo, unet) -> str | None:
    """Why the adapter cannot drive this UNet (None: it fits)."""
    cross = unet.config.cross_attention_dim
    if adapter.cross_attention_dim != cross:
        return (f"{adapter.path.name} makes {adapter.cross_attention_dim}-wide image tokens (cross_attention_dim "
                f"{adapter.cross_attention_dim}) but the model's UNet has cross_attention_dim {cross}: the adapter is "
                "for another model family (SD 1.x adapters are 768 wide, SD 2.x 1024, SDXL 2048); load the one "
                "made for this checkpoint")
    if getattr(unet, "encoder_hid_proj", None) is not None:
        return ("the model's UNet already has an encoder_hid_proj (a text projection or an IP-Adapter loaded by other "
                "means); ApplyIPAdapter needs a plain UNet")
    layers = unet_cross_attention_layers(unet)
    if len(layers) != len(adapter.layers):
        return (f"{adapter.path.name} has weights for {len(adapter.layers)} cross-attention layers but the model's "
                f"UNet has {len(layers)}: the adapter is for another UNet architecture")
    for j, (name, hidden) in enumerate(layers):
        key_id = 2 * j + 1
        want = (hidden, cross)
        k_shape, v_shape = adapter.layers.get(key_id, (None, None))
        if k_shape is None:
            return (f"{adapter.path.name} has no ip_adapter.{key_id}.to_k_ip.weight for the UNet's cross-attention "
                    f"layer {name.removesuffix('.processor')}; the adapter is for another UNet architecture")
        if tuple(k_shape) != want or tuple(v_shape) != want:
            return (f"{adapter.path.name}: ip_adapter.{key_id}.to_k_ip/to_v_ip are {tuple(k_shape)}/{tuple(v_shape)} "
                    f"but the UNet's layer {name.removesuffix('.processor')} needs {want} (hidden size {hidden}, "
                    f"cross_attention_dim {cross})")
    return None


# ---------------------------------------------------------------------------------------------- the handle

@dataclass(eq=False)
class IPAdapterHandle:
    """IP_ADAPTER: adapter weights (original layout, split like diffusers does) + image encoder + processor."""

    info: AdapterInfo
    encoder_info: EncoderInfo
    state_dict: dict  # {"image_proj": {...}, "ip_adapter": {...}}, prefixes removed
    image_encoder: Any  # CLIPVisionModelWithProjection
    image_processor: Any  # CLIPImageProcessor

    @property
    def source(self) -> str:
        return str(self.info.path)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) embeds of an IMAGE batch for this adapter: ``(1, n_images, ...)`` each.

        diffusers' ``encode_image`` + ``prepare_ip_adapter_image_embeds`` for one adapter given a list of
        PIL images: the batch goes to 8-bit PIL images and through the image processor."""
        encoder = self.image_encoder
        pils = [to_pil(image) for image in images]
        pixels = self.image_processor(pils, return_tensors="pt").pixel_values
        pixels = pixels.to(device=compute_device(encoder), dtype=encoder.dtype)
        with torch.inference_mode():
            if self.info.uses_hidden_states:
                positive = encoder(pixels, output_hidden_states=True).hidden_states[-2]
                negative = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
            else:
                positive = encoder(pixels).image_embeds
                negative = torch.zeros_like(positive)
        return positive[None].clone(), negative[None].clone()  # clone: normal tensors outside inference mode


def _image_processor(folder: Path, image_size: int):
    try:  # transformers 5: the PIL backend, which is what CLIPImageProcessor is without torchvision
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as processor_class
    if (folder / "preprocessor_config.json").is_file():
        return processor_class.from_pretrained(str(folder), local_files_only=True)
    return processor_class(size=image_size, crop_size=image_size)  # diffusers load_ip_adapter's default


def _read_state_dict(path: Path) -> dict:
    """The file's tensors split into image_proj / ip_adapter without their prefixes (diffusers' layout)."""
    from safetensors import safe_open

    state: dict = {"image_proj": {}, "ip_adapter": {}}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for key in handle.keys():
            group, _, rest = key.partition(".")
            if group in state:
                state[group][rest] = handle.get_tensor(key)
    return state


_LOADED = LoadedOnce()  # (identity, dtype, device) -> IPAdapterHandle


def clear_loaded_adapters() -> None:
    """Forget loaded adapters and the modules built from them (the next load reads the files again)."""
    _LOADED.clear()
    with _MODULES_LOCK:
        _MODULES.clear()


def _identity(path: Path, folder: Path) -> tuple:
    return files_identity([path, folder])


def load_ip_adapter(path: str | Path, image_encoder: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> IPAdapterHandle:
    """Inspect, check and load (once per process, dtype and device; float32 by default) an adapter and its
    image encoder."""
    dtype = resolve_dtype(dtype)
    info, encoder_info = inspect_adapter(path), inspect_encoder(image_encoder)
    problem = encoder_fit_problem(info, encoder_info)
    if problem:
        raise NodeError(problem)
    device = torch.device(device)

    def load() -> IPAdapterHandle:
        from transformers import CLIPVisionModelWithProjection

        encoder = CLIPVisionModelWithProjection.from_pretrained(
            str(encoder_info.path), dtype=dtype, use_safetensors=True, local_files_only=True)
        encoder.to("cpu" if MANAGER.offloads else device).eval().requires_grad_(False)
        processor = _image_processor(encoder_info.path, encoder_info.image_size)
        return IPAdapterHandle(info, encoder_info, _read_state_dict(info.path), encoder, processor)

    identity = _identity(info.path, encoder_info.path)
    return _LOADED.get((tuple(p for p, _ in identity), str(dtype), str(device)), identity, load)


# ---------------------------------------------------------------------------------------------- the patch

@dataclass(eq=False)
class AdapterImages:
    """One adapter of a patch: its weights, scale and encoded images."""

    adapter: IPAdapterHandle
    scale: float
    positive: torch.Tensor  # (1, n_images, ...) image embeds
    negative: torch.Tensor  # the unconditional side's


_MODULES: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()  # unet -> {adapters: modules}
_MODULES_LOCK = threading.Lock()


def _low_cpu_mem_usage() -> bool:
    """diffusers' default (no random init of the new modules) when accelerate is there to provide it."""
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def adapter_modules(unet, adapters: tuple[IPAdapterHandle, ...]) -> tuple[dict, Any]:
    """diffusers' IP attention processors (cross-attention layers only) and image projection for ``adapters``
    on ``unet``, made by diffusers' converters from the UNet as it is (unpatched).

    Built once per UNet and adapter list and shared by every patch that uses them (the panorama workflow applies
    one adapter to new slices at each expansion); the scales are set by each patch when it is applied."""
    # unet_lock: another thread's sampler may have its patch installed right now; build from the plain UNet
    with unet_lock(unet), _MODULES_LOCK:
        built = _MODULES.setdefault(unet, {})
        if adapters not in built:
            from diffusers.models.attention_processor import (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0,
                                                              IPAdapterXFormersAttnProcessor)
            from diffusers.models.embeddings import MultiIPAdapterImageProjection

            states = [a.state_dict for a in adapters]
            low_memory = _low_cpu_mem_usage()
            ip_classes = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)
            converted = unet._convert_ip_adapter_attn_to_diffusers(states, low_cpu_mem_usage=low_memory)
            # self-attention layers keep the UNet's own processors
            processors = {name: proc for name, proc in converted.items() if isinstance(proc, ip_classes)}
            for proc in processors.values():
                proc.to(device=compute_device(unet), dtype=unet.dtype).requires_grad_(False)
            layers = [unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=low_memory)
                      for state in states]
            projection = MultiIPAdapterImageProjection(layers).to(device=compute_device(unet), dtype=unet.dtype)
            built[adapters] = (processors, projection.eval().requires_grad_(False))
        return built[adapters]


class IPAdapterPatch(ModelPatch):
    """One or more IP-Adapters on a UNet, installed only around a sampler run.

    ``applied`` swaps diffusers' IP modules in (with this patch's scales) and restores the UNet's own
    processors, ``encoder_hid_proj`` and config afterwards; its hook adds the image embeds at each step."""

    def __init__(self, unet, entries: list[AdapterImages]):
        self.unet, self.entries = unet, list(entries)
        self.processors, self.projection = adapter_modules(unet, tuple(e.adapter for e in self.entries))
        self.scales = [float(e.scale) for e in self.entries]

    @contextlib.contextmanager
    def applied(self, unet):
        if unet is not self.unet:
            raise NodeError("the IP-Adapter was applied to another model's UNet; link ApplyIPAdapter's model output "
                            "straight to the sampler")
        if unet.encoder_hid_proj is not None:
            raise NodeError("the UNet already has an encoder_hid_proj while sampling with an IP-Adapter; chain "
                            "ApplyIPAdapter nodes (they combine) rather than patching the UNet by other means")
        original = unet.attn_processors  # a fresh dict of the processor objects in use
        hid_type = unet.config.encoder_hid_dim_type
        for proc in self.processors.values():
            proc.scale = list(self.scales)  # what set_ip_adapter_scale does, per adapter
            proc.to(unet.device)  # the UNet may have moved since they were built (memory budget)
        self.projection.to(compute_device(unet))
        # processors first: an IP-Adapter Plus projection has attention layers of its own, which
        # set_attn_processor would otherwise count as the UNet's
        unet.set_attn_processor({**original, **self.processors})
        try:
            unet.encoder_hid_proj = self.projection
            unet.config.encoder_hid_dim_type = "ip_image_proj"  # as load_ip_adapter sets it (an attribute)
            yield unet
        finally:
            unet.encoder_hid_proj = None
            unet.config.encoder_hid_dim_type = hid_type
            unet.set_attn_processor(dict(original))

    def hooks(self, run) -> list:
        """The image embeds for the UNet's ``added_cond_kwargs["image_embeds"]``: one tensor per adapter,
        [negative, positive] under guidance, set at every step."""
        device, dtype = run.cond.encoder_hidden_states.device, run.cond.encoder_hidden_states.dtype
        batch, embeds = run.x0.shape[0], []
        for entry in self.entries:
            # num_images_per_prompt copies, as diffusers' prepare_ip_adapter_image_embeds makes them
            positive = torch.cat([entry.positive] * batch).to(device=device, dtype=dtype)
            if run.guide:
                negative = torch.cat([entry.negative] * batch).to(device=device, dtype=dtype)
                positive = torch.cat([negative, positive])
            embeds.append(positive)
        return [ImageEmbeds(embeds)]


class ImageEmbeds(Hook):
    """Adds the IP-Adapters' image embeds to each UNet call."""

    def __init__(self, embeds: list):
        self.embeds = embeds

    def unet_kwargs(self, step) -> None:
        step.add_cond("image_embeds", self.embeds)


def apply_ip_adapter(model, adapter: IPAdapterHandle, images: torch.Tensor, scale: float = 1.0):
    """A copy of the MODEL handle that samples with ``adapter`` fed ``images`` (an IMAGE batch) at ``scale``.

    An IP-Adapter patch already on the model is combined with this one into one patch (several adapters)."""
    images = check_image(images, "image")
    unet = model.unet
    problem = unet_fit_problem(adapter.info, unet)
    if problem:
        raise NodeError(problem)
    positive, negative = adapter.encode(images)
    entry = AdapterImages(adapter, float(scale), positive, negative)
    earlier = [p for p in model.patches if isinstance(p, IPAdapterPatch)]
    if not earlier:
        return model.with_patch(IPAdapterPatch(unet, [entry]))
    others = tuple(p for p in model.patches if not isinstance(p, IPAdapterPatch))
    entries = [e for p in earlier for e in p.entries] + [entry]
    return replace(model, patches=others).with_patch(IPAdapterPatch(unet, entries))


# ---------------------------------------------------------------------------------------------- nodes

def _check_load(params: dict):
    path, folder = params.get("path"), params.get("image_encoder")
    info = encoder = None
    if isinstance(path, str) and Path(path).is_file():
        problem = adapter_path_problem(path)
        if problem:
            yield "path", problem
        else:
            try:
                info = inspect_adapter(path)
            except NodeError as exc:
                yield "path", str(exc)
    if isinstance(folder, str) and Path(folder).is_dir():
        try:
            encoder = inspect_encoder(folder)
        except NodeError as exc:
            yield "image_encoder", str(exc)
    if info is not None and encoder is not None:
        problem = encoder_fit_problem(info, encoder)
        if problem:
            yield "path", problem


@node("LoadIPAdapter", version=1, category="loaders", outputs={"adapter": IP_ADAPTER}, check=_check_load,
      reference="diffusers IPAdapterMixin.load_ip_adapter (weights + CLIPVisionModelWithProjection + CLIPImageProcessor)")
def load_ip_adapter_node(
    path: Annotated[str, InputPath(kind="file", folder="ipadapter"),
                    Field(description="IP-Adapter weights, .safetensors (image_proj.* and ip_adapter.* keys)")],
    image_encoder: Annotated[str, InputPath(kind="dir", folder="clip_vision"),
                             Field(description="CLIP vision encoder folder (CLIPVisionModelWithProjection, "
                                               "transformers layout, safetensors), e.g. models/image_encoder")],
    ctx: RunContext,
    dtype: Annotated[Literal["auto", "float32", "float16", "bfloat16"],
                     Field(description="weights' dtype; auto follows the run's --dtype")] = "auto",
):
    """Load an IP-Adapter (.safetensors) and the CLIP vision encoder it was trained with.

    Plain (ip-adapter_sd15 / ip-adapter_sdxl), Plus and Full Face adapters in the original layout.
    The image processor comes from the encoder folder's preprocessor_config.json, else it is CLIP's
    default at the encoder's image_size (224), as diffusers makes it. Pickle files are refused; an
    adapter whose widths do not fit the encoder is reported at validation. dtype "auto" follows --dtype."""
    torch_dtype = resolve_dtype(dtype, auto=ctx.dtype)
    handle = load_ip_adapter(path, image_encoder, torch_dtype, ctx.device)
    ctx.record("models", {
        "source": handle.source, "image_encoder": str(handle.encoder_info.path), "kind": handle.info.kind,
        "dtype": str(torch_dtype).removeprefix("torch."), "description": handle.info.describe(),
    })
    log.info("LoadIPAdapter: %s", handle.info.describe())
    return handle


@node("ApplyIPAdapter", version=1, space=SpaceRule(("model",)), category="conditioning", outputs={"model": MODEL},
      reference="diffusers load_ip_adapter + set_ip_adapter_scale + pipeline(ip_adapter_image=[images])")
def apply_ip_adapter_node(
    model: Model,
    adapter: IPAdapter,
    image: Image,
    ctx: RunContext,
    scale: Annotated[float, Field(ge=0, le=10, description="IP-Adapter scale (set_ip_adapter_scale); "
                                                           "the outpainting article uses 0.1")] = 1.0,
):
    """Give the model an image prompt: a new MODEL whose samplers see the images through the IP-Adapter.

    Every image of the batch (e.g. SliceForIPAdapter's squares) is one image prompt; the UNet attends
    to all of them together, as diffusers does for a list of images. The images are encoded once here.
    The input MODEL is unchanged: the adapter is installed on the shared UNet only while a sampler runs
    with this MODEL. Chain two ApplyIPAdapter nodes to use two adapters. An adapter made for another
    model family fails here, before any sampling step."""
    ctx.record("ip_adapters", {
        "adapter": adapter.source, "scale": scale, "images": int(image.shape[0]),
        "image_size": [int(image.shape[-1]), int(image.shape[-2])],
    })
    with on_device(ctx, ("image_encoder", adapter.image_encoder)):
        return apply_ip_adapter(model, adapter, image, scale)
