"""LoadControlNet, ApplyControlNet and InpaintControlImage: spatial control for every sampler (docs/design.md §4.14).

The arithmetic is diffusers' (StableDiffusion(XL)ControlNetPipeline / ...ControlNetInpaintPipeline and
MultiControlNetModel), done through the loop's hooks so that no sampler knows about ControlNets:

- ``ApplyControlNet`` returns a MODEL carrying a ``ControlNetPatch``; its hook runs the ControlNet in
  ``unet_kwargs`` on the step's scaled latents *before* an inpainting UNet's extra channels are appended
  (``Step.latent_input``), with the step's prompt embeddings (and SDXL's pooled embeds and time ids), and adds
  its down / mid residuals to the UNet's arguments; stacked ControlNets sum their residuals in the order they
  were applied, as MultiControlNetModel does;
- ``strength`` is diffusers' ``controlnet_conditioning_scale``; ``start`` / ``end`` are
  ``control_guidance_start`` / ``_end``: the ControlNet acts at step i of the run's n steps unless
  ``i / n < start`` or ``(i + 1) / n > end`` (diffusers' ``controlnet_keep``). A step where it does not act
  skips the ControlNet call, which is exact: diffusers adds residuals scaled by 0;
- guess mode (or a ControlNet with ``global_pool_conditions``) runs it on the conditional half only and
  gives the unconditional half zero residuals; ``sides`` "positive" does the same without guess mode's
  scaling of the residuals (ComfyUI's ControlNetApply, whose ControlNet sits on the positive prompt only);
- the control image is prepared as diffusers' ``prepare_control_image``: ``VaeImageProcessor`` without
  normalisation, resized to the sampled pixel size, one copy per latent, doubled under guidance (not in guess mode).

``InpaintControlImage`` is diffusers' documented ``make_inpaint_condition``: pixels where the mask is above 0.5
become -1, for inpainting ControlNets (control_v11p_sd15_inpaint).
"""
from __future__ import annotations

from nodegraph.lazy import lazy

import contextlib
import inspect
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

torch = lazy("torch")
from pydantic import Field

from nodegraph import node
from nodegraph.context import RunContext
from nodegraph.devices import resolve_dtype
from nodegraph.errors import NodeError
from nodegraph.sockets import IMAGE, MODEL, Image, InputPath, Mask, Model, SpaceRule, socket

from ._detection import _read_json
from ._files import files_identity, read_state_dict, safetensors_shapes, weights_file_problem, weights_folder_problem
from ._loading import LoadedOnce
from ._memory import MANAGER, compute_device
from ._pixels import check_image, check_mask
from .denoise import Hook, ModelPatch

log = logging.getLogger("nodegraph.controlnet")

CONTROL_NET = "CONTROL_NET"
ControlNet = socket(CONTROL_NET)

# a key only diffusers' layout has, and one only the original (ldm / ComfyUI) layout has
DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"
ORIGINAL_KEY = "input_hint_block.0.weight"
# the UNet settings a ControlNet must share with the UNet it steers (residual count, widths, added conditioning)
FIT_KEYS = ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type",
            "projection_class_embeddings_input_dim", "transformer_layers_per_block")


# ---------------------------------------------------------------------------------------------- loading

@dataclass(eq=False)
class ControlNetHandle:
    """CONTROL_NET: a loaded diffusers ControlNetModel and where it came from. A single file without a config
    holds its weights (``state``) until ``module_for`` builds the module with the settings of the UNet it steers."""

    module: Any
    source: str
    state: Optional[dict] = None
    device: Any = "cpu"
    built: dict = field(default_factory=dict)  # the UNet's settings -> module, for a file without a config
    lock: Any = field(default_factory=threading.Lock)

    def module_for(self, unet):
        """The ControlNetModel to steer ``unet`` with (NodeError when it does not fit)."""
        if self.module is not None:
            problem = unet_fit_problem(self.module, unet)
            if problem:
                raise NodeError(problem)
            return self.module
        settings = controlnet_settings(unet)
        key = json.dumps(settings, sort_keys=True, default=str)
        with self.lock:
            if key not in self.built:
                self.built[key] = _build(settings, self.state, Path(self.source).name, "the model's UNet",
                                         self.device)
            return self.built[key]


def controlnet_settings(unet) -> dict:
    """A ControlNet config for ``unet``: its settings that ControlNetModel takes, on 4-channel latents (what
    diffusers' ControlNetModel.from_unet copies)."""
    from diffusers import ControlNetModel

    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    settings = {k: v for k, v in dict(unet.config).items() if k in accepted}
    settings["in_channels"] = int(unet.config.out_channels)
    return settings


def _build(settings: dict, state: dict, name: str, config_name: str, device):
    """A ControlNetModel from a config and weights in either layout."""
    from diffusers import ControlNetModel

    dtype = next(iter(state.values())).dtype
    module = ControlNetModel.from_config(settings)
    if _layout(state) == "the original":  # (ComfyUI's files) through diffusers' own converter
        from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

        plain = {k.removeprefix("control_model."): v for k, v in state.items()}
        converted = convert_controlnet_checkpoint(plain, dict(module.config))
        for layer, old in (("linear_1", "0"), ("linear_2", "2")):  # SDXL's added embedding, which it leaves out
            for kind in ("weight", "bias"):
                if f"label_emb.0.{old}.{kind}" in plain and getattr(module, "add_embedding", None) is not None:
                    converted[f"add_embedding.{layer}.{kind}"] = plain[f"label_emb.0.{old}.{kind}"]
        state = converted
    try:
        module.load_state_dict(state, assign=True)  # shares the tensors read: one copy in memory
    except RuntimeError as exc:
        raise NodeError(f"the ControlNet '{name}' does not fit {config_name} (a ControlNet for another model family, "
                        f"e.g. SD 1.5 vs SDXL?): {str(exc)[:300]}") from None
    return module.to(dtype).to("cpu" if MANAGER.offloads else device).eval().requires_grad_(False)


def _config_beside(path: Path) -> Path | None:
    """A diffusers-layout single file's config: ``<name>.json`` or ``config.json`` in its folder."""
    for candidate in (path.with_suffix(".json"), path.parent / "config.json"):
        if candidate.is_file():
            return candidate
    return None


def controlnet_path_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be loaded as a ControlNet (None: it can), from names, headers and configs only."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            return f"ControlNet folder '{p}' has no config.json (a diffusers ControlNetModel folder is expected)"
        return weights_folder_problem(p, "ControlNet folder", "e.g. with diffusers' save_pretrained")
    problem = weights_file_problem(p, "ControlNet", "give a .safetensors file or a diffusers ControlNet folder")
    if problem:
        return problem
    try:
        keys = safetensors_shapes(p)
    except NodeError as exc:
        return str(exc)
    if _layout(keys) is None:
        return f"'{p.name}' holds no ControlNet weights (neither '{DIFFUSERS_KEY}' nor '{ORIGINAL_KEY}')"
    return None


def _layout(keys) -> str | None:
    if any(k.endswith(DIFFUSERS_KEY) for k in keys):
        return "diffusers'"
    if any(k.endswith(ORIGINAL_KEY) for k in keys):
        return "the original"
    return None


_LOADED = LoadedOnce()  # (paths, dtype, device) -> ControlNetHandle


def load_controlnet(path: str | Path, dtype=None, device="cpu") -> ControlNetHandle:
    """Load (once per content, dtype and device; float32 by default) a diffusers ControlNetModel from a folder or a
    .safetensors (diffusers' or the original layout); a file without a config beside it takes the settings of the
    UNet it is applied to."""
    p = Path(path)
    problem = controlnet_path_problem(p)
    if problem:
        raise NodeError(problem)
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    config = None if p.is_dir() else _config_beside(p)

    def load() -> ControlNetHandle:
        from diffusers import ControlNetModel

        if p.is_dir():
            module = ControlNetModel.from_pretrained(str(p), torch_dtype=dtype, use_safetensors=True,
                                                     local_files_only=True)
            return ControlNetHandle(module.to("cpu" if MANAGER.offloads else device).eval().requires_grad_(False),
                                    str(p))
        state = read_state_dict(p, dtype)
        if config is None:  # built when applied, with the settings of the UNet it steers
            return ControlNetHandle(None, str(p), state, device)
        return ControlNetHandle(_build(_read_json(config), state, p.name, f"its config '{config.name}'", device), str(p))

    identity = files_identity([p] if config is None else [p, config])
    return _LOADED.get((tuple(q for q, _ in identity), str(dtype), str(device)), identity, load)


def unet_fit_problem(controlnet, unet) -> str | None:
    """Why this ControlNet cannot steer this UNet (None: it can): its residuals must match the UNet's blocks."""
    cn, un = controlnet.config, unet.config
    if int(cn.in_channels) != int(un.out_channels):
        return (f"the ControlNet takes {cn.in_channels}-channel latents but the model's latents have "
                f"{un.out_channels} channels")
    for key in FIT_KEYS:
        a, b = getattr(cn, key, None), getattr(un, key, None)
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            a, b = (list(a) if isinstance(a, (list, tuple)) else a), (list(b) if isinstance(b, (list, tuple)) else b)
        if a != b:
            return (f"the ControlNet does not fit the model's UNet: its {key} is {a} but the UNet's is {b} (a "
                    "ControlNet for another model family, e.g. SD 1.5 vs SDXL?)")
    return None


# ---------------------------------------------------------------------------------------------- the patch

@dataclass(eq=False)
class ControlEntry:
    """One ControlNet of a patch with its control image and settings."""

    module: Any  # a diffusers ControlNetModel
    image: torch.Tensor  # (B, 3, H, W), [0, 1] (or -1 for masked pixels from InpaintControlImage)
    strength: float
    start: float
    end: float
    guess_mode: bool
    positive_only: bool = False


def keep(i: int, total: int, start: float, end: float) -> float:
    """diffusers' controlnet_keep: 1 when the ControlNet acts at step i of total, else 0."""
    return 1.0 - float(i / total < start or (i + 1) / total > end)


def prepare_control_image(image: torch.Tensor, height: int, width: int, batch: int, guide: bool, cond_only: bool,
                          device, dtype) -> torch.Tensor:
    """diffusers' prepare_control_image: VaeImageProcessor (no normalisation) at the sampled size, one copy per
    latent, [uncond, cond] copies under guidance unless it steers the conditional half only (guess mode)."""
    from diffusers.image_processor import VaeImageProcessor

    h, w = image.shape[-2:]
    if abs(w * height - h * width) > 0.02 * w * height:  # resizing would stretch it: a mistake, not a wish
        raise NodeError(f"the control image is {w}x{h} but the sampled image is {width}x{height}: a different "
                        "aspect ratio; crop or resize the control image to the sampled size")
    processor = VaeImageProcessor(do_convert_rgb=True, do_normalize=False)
    image = processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
    if image.shape[0] not in (1, batch):
        raise NodeError(f"the control image batch has {image.shape[0]} images but the latent batch has {batch}: "
                        "give one control image, or one per latent")
    image = image.repeat_interleave(batch if image.shape[0] == 1 else 1, dim=0).to(device=device, dtype=dtype)
    return torch.cat([image] * 2) if guide and not cond_only else image


class ControlNetPatch(ModelPatch):
    """One ControlNet and its control image on a MODEL; each ApplyControlNet adds one, and their residuals sum."""

    def __init__(self, entry: ControlEntry, vae_scale_factor: int):
        self.entry, self.vae_scale_factor = entry, vae_scale_factor

    @contextlib.contextmanager
    def applied(self, unet):
        # on the UNet's device for the run, within the memory budget like the models nodes run
        with MANAGER.use(compute_device(unet), ("controlnet", self.entry.module)):
            yield unet

    def hooks(self, run) -> list:
        entry = self.entry
        module = entry.module
        guess = bool(entry.guess_mode or getattr(module.config, "global_pool_conditions", False))
        height, width = (s * self.vae_scale_factor for s in run.x0.shape[-2:])
        half = guess or entry.positive_only
        image = prepare_control_image(entry.image, height, width, run.x0.shape[0], run.guide, half,
                                      compute_device(run.unet), module.dtype)
        return [ControlNetResiduals(module, image, entry.strength, entry.start, entry.end, guess, half)]


def _cond_half(value):
    return value.chunk(2)[1] if isinstance(value, torch.Tensor) else value


class ControlNetResiduals(Hook):
    """Runs a ControlNet at each step and adds its residuals to the UNet's arguments."""

    def __init__(self, module, image: torch.Tensor, strength: float, start: float, end: float, guess: bool,
                 cond_only: bool):
        self.module, self.image, self.strength, self.start, self.end = module, image, strength, start, end
        self.guess, self.cond_only = guess, cond_only  # cond_only: guess mode, or sides "positive"

    def unet_kwargs(self, step) -> None:
        scale = self.strength * keep(step.index, step.total, self.start, self.end)
        if scale == 0:
            return  # diffusers adds residuals scaled by 0: the UNet's result is the same without them
        sample = step.latent_input if step.latent_input is not None else step.model_input
        hidden = step.kwargs["encoder_hidden_states"]
        added = step.kwargs.get("added_cond_kwargs") or {}
        added = {k: added[k] for k in ("text_embeds", "time_ids") if k in added}
        half = self.cond_only and step.guide
        if half:  # only the conditional half; the unconditional half gets zero residuals below
            sample, hidden = sample.chunk(2)[1], hidden.chunk(2)[1]
            added = {k: _cond_half(v) for k, v in added.items()}
        dtype = self.module.dtype
        down, mid = self.module(sample.to(dtype), step.timestep, encoder_hidden_states=hidden.to(dtype),
                                controlnet_cond=self.image, conditioning_scale=scale, guess_mode=self.guess,
                                added_cond_kwargs={k: v.to(dtype) for k, v in added.items()} or None,
                                return_dict=False)
        unet_dtype = step.model_input.dtype
        down, mid = [d.to(unet_dtype) for d in down], mid.to(unet_dtype)
        if half:
            down, mid = _zero_pad(down, mid)
        earlier = step.kwargs.get("down_block_additional_residuals")
        if earlier is not None:  # another ControlNet before this one: sum, as MultiControlNetModel does
            down = [a + b for a, b in zip(earlier, down)]
            mid = step.kwargs["mid_block_additional_residual"] + mid
        step.kwargs["down_block_additional_residuals"] = down
        step.kwargs["mid_block_additional_residual"] = mid


def _zero_pad(down, mid):
    return [torch.cat([torch.zeros_like(d), d]) for d in down], torch.cat([torch.zeros_like(mid), mid])


def apply_controlnet(model, controlnet: ControlNetHandle, image: torch.Tensor, strength: float = 1.0,
                     start: float = 0.0, end: float = 1.0, guess_mode: bool = False, sides: str = "both"):
    """A copy of the MODEL handle whose samplers are steered by ``controlnet`` seeing ``image``; ``sides``
    "positive" leaves the unconditional half of guidance alone (ComfyUI's ControlNetApply)."""
    image = check_image(image, "image")
    module = controlnet.module_for(model.unet)
    if start > end:
        raise NodeError(f"start {start} is after end {end}: the ControlNet would act at no step")
    entry = ControlEntry(module, image, float(strength), float(start), float(end), bool(guess_mode),
                         sides == "positive")
    return model.with_patch(ControlNetPatch(entry, getattr(model, "vae_scale_factor", 8)))


def inpaint_control_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """diffusers' make_inpaint_condition: the image with every pixel whose mask is above 0.5 set to -1."""
    image, mask = check_image(image, "image"), check_mask(mask, "mask")
    if image.shape[-2:] != mask.shape[-2:]:
        raise NodeError(f"image is {image.shape[-1]}x{image.shape[-2]} but mask is {mask.shape[-1]}x{mask.shape[-2]}; "
                        "they must be the same size")
    if mask.shape[0] not in (1, image.shape[0]) and image.shape[0] != 1:
        raise NodeError(f"image batch {image.shape[0]} and mask batch {mask.shape[0]} differ")
    return torch.where(mask > 0.5, torch.full_like(image, -1.0), image)


# ---------------------------------------------------------------------------------------------- nodes

def _check_load(params: dict):
    path = params.get("path")
    if isinstance(path, str) and Path(path).exists():
        problem = controlnet_path_problem(path)
        if problem:
            yield "path", problem


@node("LoadControlNet", version=1, category="loaders", outputs={"control_net": CONTROL_NET}, check=_check_load,
      reference="diffusers ControlNetModel.from_pretrained")
def load_controlnet_node(
    path: Annotated[str, InputPath(kind="any", folder="controlnet"),
                    Field(description="a name in the models folders' controlnet/, a diffusers ControlNet folder, or "
                                      "a .safetensors (diffusers' or the original layout; its config.json beside "
                                      "it, else the model's settings are used)")],
    ctx: RunContext,
    dtype: Annotated[Literal["auto", "float32", "float16", "bfloat16"],
                     Field(description="weights' dtype; auto follows the run's --dtype")] = "auto",
):
    """Load a ControlNet (SD 1.x or SDXL) in diffusers' layout.

    A diffusers folder (config.json + .safetensors) or one .safetensors, in diffusers' layout or the original one
    (ComfyUI's, converted by diffusers' own converter). A single file's config is its config.json (or NAME.json)
    beside it; without one it takes the settings of the UNet it is applied to. Pickles are refused at validation.
    Whether it fits the model is checked by ApplyControlNet."""
    torch_dtype = resolve_dtype(dtype, auto=ctx.dtype)
    handle = load_controlnet(path, torch_dtype, ctx.device)
    ctx.record("models", {"source": handle.source, "kind": "ControlNet",
                          "dtype": str(torch_dtype).removeprefix("torch.")})
    return handle


def _check_apply(params: dict):
    start, end = params.get("start", 0.0), params.get("end", 1.0)
    if isinstance(start, (int, float)) and isinstance(end, (int, float)) and start > end:
        yield "start", f"start {start} is after end {end}: the ControlNet would act at no step"


@node("ApplyControlNet", version=1, space=SpaceRule(("model",)), category="conditioning", outputs={"model": MODEL}, check=_check_apply,
      reference="diffusers StableDiffusion(XL)ControlNet(Inpaint)Pipeline, MultiControlNetModel")
def apply_controlnet_node(
    model: Model,
    control_net: ControlNet,
    image: Image,
    strength: Annotated[float, Field(ge=0, le=10, description="controlnet_conditioning_scale")] = 1.0,
    start: Annotated[float, Field(ge=0, le=1, description="fraction of the run's steps before the ControlNet "
                                                          "acts (control_guidance_start)")] = 0.0,
    end: Annotated[float, Field(ge=0, le=1, description="fraction of the run's steps after which it stops "
                                                        "(control_guidance_end)")] = 1.0,
    guess_mode: Annotated[bool, Field(description="run it on the conditional half only (diffusers' guess_mode)")] = False,
    sides: Annotated[Literal["both", "positive"],
                     Field(description="which halves of guidance it steers: both (diffusers), or the positive "
                                       "prompt's only (ComfyUI's ControlNetApply)")] = "both",
):
    """Steer the model with a ControlNet and its control image: a new MODEL for any sampler.

    The control image is resized to the sampled size. Chain several ApplyControlNet nodes to stack ControlNets:
    their residuals add up (MultiControlNetModel). The input MODEL is unchanged. A ControlNet made for another
    model family fails here, before any sampling step."""
    return apply_controlnet(model, control_net, image, strength, start, end, guess_mode, sides)


@node("InpaintControlImage", version=1, category="image", outputs={"image": IMAGE},
      reference="diffusers make_inpaint_condition (ControlNet inpaint docs)")
def inpaint_control_image_node(image: Image, mask: Mask):
    """The control image of an inpainting ControlNet: the image with the masked pixels (mask > 0.5) set to -1.

    Its values leave the IMAGE range on purpose: link it only into ApplyControlNet's image."""
    return inpaint_control_image(image, mask)
