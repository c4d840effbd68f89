"""LoadLoRA and ApplyLoRA: LoRA weights on the UNet and the text encoders (docs/design.md §4.12), via diffusers.

``LoadLoRA`` reads a LoRA file (``.safetensors`` only: pickles are refused) in either layout diffusers
reads:

- kohya / A1111: ``lora_unet_*`` (UNet), ``lora_te_*`` or ``lora_te1_*`` (text encoder), ``lora_te2_*`` (SDXL's
  second text encoder) names with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``;
- diffusers / PEFT: ``unet.*``, ``text_encoder.*``, ``text_encoder_2.*`` names with ``lora_A`` / ``lora_B`` (or
  diffusers' older ``lora.down`` / ``lora.up``), with the ranks and alphas of ``lora_adapter_metadata`` in the
  safetensors header when the file has it (else alpha = rank).

Which components it changes is read from the header at validation. ``ApplyLoRA`` (MODEL + CLIP + LORA, two
strengths, like ComfyUI's LoraLoader) returns a MODEL and a CLIP that use the LoRA; the ones it was given are
unchanged. A layer's output becomes ``W x + strength · (alpha / rank) · up(down(x))``.

The arithmetic is diffusers' own, done by PEFT as ``pipe.load_lora_weights(file)`` +
``set_adapters(names, weights)`` do it:

- ``lora_state_dict`` (kohya keys through ``lora_conversion_utils``, SDXL's sgm block names mapped with the
  UNet's config) gives diffusers' names and the kohya alphas;
- per module the state dict becomes PEFT's layout and a ``LoraConfig`` (rank, alpha, per-layer patterns)
  exactly as diffusers' ``load_lora_adapter`` (UNet) and ``load_lora_into_text_encoder`` prepare them, once,
  when ApplyLoRA runs;
- while a sampler runs with the MODEL (``LoraModelPatch``) or CLIPEncode with the CLIP (``LoraClipPatch``),
  PEFT's ``inject_adapter_in_model`` + ``set_peft_model_state_dict`` wrap the targeted layers (what both
  loaders call), diffusers' ``set_weights_and_activate_adapters`` sets each LoRA's strength (what
  ``set_adapters`` calls), and afterwards diffusers' ``recurse_remove_peft_layers`` puts the original layer
  objects back (what ``unload_lora_weights`` calls), even on error or interrupt. The module's lock is held
  meanwhile, so a run with the plain MODEL or CLIP waits and never sees the LoRA.

Why unfused adapters rather than ``fuse_lora``: fusing writes ``W + s · up·down`` into the shared weights and
``unfuse_lora`` subtracts the same product again, which does not give ``W`` back bit for bit (in float32
already, far more so in float16); it would need a copy of every touched weight per run. With unfused layers
the base weights are never written: restoring is putting the original modules back, exact by construction, at
any dtype. The cost is the low-rank product per layer and step (rank ≪ width, a few percent) and injecting
the layers once per run (PEFT builds them on the meta device and takes the LoRA's tensors, cast once to the
module's dtype and device when ApplyLoRA runs): about 0.2-0.4 s for a rank-32 LoRA on SD 1.5's 192 attention
and projection layers on two CPU cores.
The text encoders are injected with PEFT directly rather than through transformers' ``load_adapter``, which
does the same injection but logs a full load report on every call.

Several ApplyLoRA nodes on one MODEL / CLIP combine into one patch with one adapter each, as diffusers
loads several adapters and activates them together; a LoRA patch combines with an IP-Adapter patch. A LoRA
for another architecture (an SDXL LoRA on an SD 1.5 UNet) fails in ApplyLoRA, naming the layers that do not
fit, before any sampling step.
"""
from __future__ import annotations

from nodegraph.lazy import lazy

import contextlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

torch = lazy("torch")
from pydantic import Field

from nodegraph import node
from nodegraph.context import RunContext
from nodegraph.errors import NodeError
from nodegraph.sockets import CLIP, MODEL, Clip, InputPath, Model, SpaceRule, socket

from ._files import files_identity, read_state_dict, safetensors_metadata, safetensors_shapes, weights_file_problem
from ._handles import ClipPatch, module_lock
from ._loading import LoadedOnce
from .denoise import ModelPatch

log = logging.getLogger("nodegraph.lora")

LORA = "LORA"
Lora = socket(LORA)

# the modules a LoRA can change, in diffusers' names, with the words used in messages
COMPONENTS = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig values, saved by save_lora_weights
# the text encoder layers whose ranks diffusers' load_lora_into_text_encoder reads
TEXT_ENCODER_LAYERS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


# ---------------------------------------------------------------------------------------------- inspection

@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file is, from its safetensors header alone."""

    path: Path
    format: str  # "kohya" | "diffusers"
    layers: dict[str, int]  # component ("unet", "text_encoder", "text_encoder_2") -> number of layers

    @property
    def name(self) -> str:
        return self.path.name

    def describe(self) -> str:
        parts = ", ".join(f"{n} {COMPONENTS[c]} layers" for c, n in self.layers.items())
        return f"{self.format} LoRA ({parts}) from {self.name}"


def lora_path_problem(path: str) -> str | None:
    """A reason the file cannot be a LoRA, found from its name (None: looks fine)."""
    return weights_file_problem(path, "LoRA file", "use the LoRA's .safetensors file or convert it with safetensors")


def _kohya_component(key: str) -> str | None:
    return next((c for prefix, c in KOHYA_PREFIXES.items() if key.startswith(prefix)), None)


def _diffusers_component(key: str) -> str | None:
    return next((c for c in COMPONENTS if key.startswith(c + ".")), None)


def inspect_lora(path: str | Path) -> LoraInfo:
    """Layout and touched components of a LoRA file, from its header; a NodeError says what does not fit."""
    path = Path(path)
    problem = lora_path_problem(str(path))
    if problem:
        raise NodeError(problem)
    keys = list(safetensors_shapes(path))
    if not keys:
        raise NodeError(f"{path.name} holds no tensors")
    kohya = [k for k in keys if _kohya_component(k)]
    ours = [k for k in keys if _diffusers_component(k)]
    if kohya and len(kohya) == len(keys):
        odd = [k for k in keys if not k.endswith(KOHYA_SUFFIXES)]
        if odd:
            raise NodeError(f"{path.name}: {len(odd)} of its tensors are not plain LoRA weights (e.g. '{odd[0]}'); "
                            "supported are .lora_down / .lora_up / .alpha (LyCORIS LoHa / LoKr and DoRA are not)")
        downs = [k for k in keys if k.endswith(".lora_down.weight")]
        names = {k.split(".")[0] for k in downs}
        names &= {k.split(".")[0] for k in keys if k.endswith(".lora_up.weight")}  # layers with both halves
        unpaired = [k for k in keys if k.split(".")[0] not in names]
        if unpaired:
            raise NodeError(f"{path.name}: LoRA layers without their lora_down / lora_up pair (e.g. '{unpaired[0]}')")
        fmt, component = "kohya", _kohya_component
    elif ours and len(ours) == len(keys):
        odd = [k for k in keys if "lora" not in k]
        if odd:
            raise NodeError(f"{path.name}: {len(odd)} of its tensors are not LoRA weights (e.g. '{odd[0]}'); a "
                            "diffusers LoRA has only lora_A / lora_B (or lora.down / lora.up) weights")
        downs = [k for k in keys if ".lora_A." in k or ".down." in k]
        fmt, component = "diffusers", _diffusers_component
    else:
        example = next((k for k in keys if not _kohya_component(k) and not _diffusers_component(k)), keys[0])
        raise NodeError(f"{path.name} is not a LoRA in a layout diffusers reads: its tensor names must all start "
                        "with lora_unet_ / lora_te_ / lora_te1_ / lora_te2_ (kohya, A1111) or all with unet. / "
                        f"text_encoder. / text_encoder_2. (diffusers, PEFT); found e.g. '{example}'")
    layers: dict[str, int] = {}
    for key in downs:
        layers[component(key)] = layers.get(component(key), 0) + 1
    if not layers:
        raise NodeError(f"{path.name} has no LoRA layers (no lora_down / lora_A weights)")
    return LoraInfo(path, fmt, {c: layers[c] for c in COMPONENTS if c in layers})


# ---------------------------------------------------------------------------------------------- the handle

@dataclass(eq=False)
class LoraHandle:
    """LORA: a LoRA file's tensors as stored (on the CPU) and diffusers' adapter metadata if it has some."""

    info: LoraInfo
    state_dict: dict
    metadata: Optional[dict]  # diffusers' lora_adapter_metadata: LoraConfig values keyed "<component>.<field>"

    @property
    def source(self) -> str:
        return str(self.info.path)


def _adapter_metadata(path: Path) -> Optional[dict]:
    raw = safetensors_metadata(path).get(METADATA_KEY)
    if not raw:
        return None
    try:
        metadata = json.loads(raw)
    except ValueError as exc:
        raise NodeError(f"{path.name}: its {METADATA_KEY} is not JSON ({exc})") from None
    if not isinstance(metadata, dict):
        raise NodeError(f"{path.name}: its {METADATA_KEY} is not a JSON object")
    return metadata


_LOADED = LoadedOnce()  # path -> LoraHandle, reloaded when the file changes


def clear_loaded_loras() -> None:
    """Forget loaded LoRA files (the next load reads them again)."""
    _LOADED.clear()


def load_lora(path: str | Path) -> LoraHandle:
    """Inspect and read (once per process and file content) a LoRA file."""
    info = inspect_lora(path)

    def load() -> LoraHandle:
        return LoraHandle(info, read_state_dict(info.path), _adapter_metadata(info.path))

    identity = files_identity([info.path])
    return _LOADED.get((identity[0][0],), identity, load)


# ---------------------------------------------------------------------------------------------- adapters

@dataclass(eq=False)
class Adapter:
    """One LoRA's layers for one module in PEFT's layout, with the LoraConfig diffusers makes for them."""

    config: Any  # peft.LoraConfig
    state_dict: dict  # "<module name>.lora_A.weight" / ".lora_B.weight" -> tensor, in the module's dtype and device

    def for_module(self, module) -> dict:
        """The tensors where the module is now: the memory manager may have moved it since ApplyLoRA ran (to the
        GPU for a run, back to the CPU after). Moved once per move, not at every run."""
        if module.device.type == "meta":
            raise NodeError("a LoRA cannot be used with --vram sequential (the model's weights stream layer by layer); "
                            "use --vram low instead")
        first = next(iter(self.state_dict.values()), None)
        if first is not None and (first.device, first.dtype) != (module.device, module.dtype):
            self.state_dict = _on(module, self.state_dict)
        return self.state_dict

    def deltas(self) -> dict[str, tuple[int, ...]]:
        """Module name -> the shape of the weight change ``up · down`` (the layer's weight shape)."""
        shapes = {}
        for key, down in self.state_dict.items():
            if key.endswith(".lora_A.weight"):
                name = key.removesuffix(".lora_A.weight")
                up = self.state_dict.get(name + ".lora_B.weight")
                if up is not None:
                    shapes[name] = (int(up.shape[0]), *(int(d) for d in down.shape[1:]))
        return shapes


def _component_part(mapping: Optional[dict], component: str) -> Optional[dict]:
    """The entries of ``mapping`` under ``<component>.``, with that prefix removed (None when there are none)."""
    if not mapping:
        return None
    part = {k.removeprefix(component + "."): v for k, v in mapping.items() if k.split(".")[0] == component}
    return part or None


def diffusers_state_dict(lora: LoraHandle, sdxl: bool, unet_config=None) -> tuple[dict, Optional[dict]]:
    """diffusers' ``lora_state_dict``: kohya names converted to diffusers' (SDXL's sgm block names mapped with the
    UNet's config, as StableDiffusionXLPipeline.load_lora_weights does) and the kohya alphas; a diffusers file's
    names as they are."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        if sdxl:
            return StableDiffusionXLPipeline.lora_state_dict(dict(lora.state_dict), unet_config=unet_config)
        return StableDiffusionPipeline.lora_state_dict(dict(lora.state_dict))  # a copy: the converter pops
    except (ValueError, KeyError) as exc:
        raise NodeError(f"{lora.info.name}: diffusers cannot convert this LoRA ({exc})") from None


def _on(module, part: dict) -> dict:
    """The tensors in the module's dtype and on its device, as PEFT moves them when it loads them
    (``_move_adapter_to_device_of_base_layer``): done once here rather than at every run."""
    return {k: v.to(device=module.device, dtype=module.dtype) for k, v in part.items()}


def unet_adapter(state_dict: dict, alphas: Optional[dict], metadata: Optional[dict], unet) -> Optional[Adapter]:
    """The UNet's part, prepared as diffusers' ``UNet2DConditionModel.load_lora_adapter`` prepares it."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config

    part = _component_part(state_dict, "unet")
    if part is None:
        return None
    if "lora_A" not in next(iter(part)):
        part = convert_unet_state_dict_to_peft(part)
    ranks = {f"^{key}": value.shape[1] for key, value in part.items() if "lora_B" in key and value.ndim > 1}
    config = _create_lora_config(part, _component_part(alphas, "unet"), _component_part(metadata, "unet"), ranks)
    return Adapter(config, _on(unet, part))


def text_encoder_adapter(state_dict: dict, alphas: Optional[dict], metadata: Optional[dict], encoder,
                         component: str) -> Optional[Adapter]:
    """A text encoder's part, prepared as diffusers' ``load_lora_into_text_encoder`` prepares it."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config

    part = _component_part(state_dict, component)
    if part is None:
        return None
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(encoder, "text_model"):  # transformers 5's CLIPTextModel has no text_model level
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
    ranks = {f"{name}.lora_B.weight": part[f"{name}.lora_B.weight"].shape[1]
             for name, _ in encoder.named_modules()
             if name.endswith(TEXT_ENCODER_LAYERS) and f"{name}.lora_B.weight" in part}
    config = _create_lora_config(part, _component_part(alphas, component), _component_part(metadata, component),
                                 ranks, is_unet=False)
    return Adapter(config, _on(encoder, part))


def fit_problem(adapter: Adapter, module, lora_name: str, where: str, hint: str) -> str | None:
    """Why the adapter's layers do not fit ``module`` (None: every layer exists with the LoRA's weight shape)."""
    with module_lock(module):  # another run may have its own LoRA layers in place right now
        weights = {name: tuple(m.weight.shape) for name, m in module.named_modules()
                   if isinstance(getattr(m, "weight", None), torch.Tensor)}
    deltas = adapter.deltas()
    missing = [name for name in deltas if name not in weights]
    wrong = [name for name in deltas if name in weights and weights[name] != deltas[name]]
    if not missing and not wrong:
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} of its {len(deltas)} {where} layers do not exist there (e.g. '{missing[0]}')")
    if wrong:
        name = wrong[0]
        parts.append(f"{len(wrong)} have other sizes (e.g. '{name}': the LoRA changes a {deltas[name]} weight, the "
                     f"model's is {weights[name]})")
    return f"{lora_name} does not fit the model's {where}: {' and '.join(parts)}. {hint}"


# ---------------------------------------------------------------------------------------------- the patches

@contextlib.contextmanager
def adapters_installed(module, entries: Sequence[tuple[Adapter, float]]):
    """``module`` with PEFT LoRA layers for ``entries`` (adapter, strength), all active, for the length of the
    block; then the original layer objects are put back and PEFT's ``peft_config`` removed, even on error. The
    caller holds the module's lock."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from diffusers.utils.peft_utils import recurse_remove_peft_layers, set_weights_and_activate_adapters

    names = [f"lora_{i}" for i in range(len(entries))]
    try:
        for name, (adapter, _) in zip(names, entries):
            state_dict = adapter.for_module(module)
            inject_adapter_in_model(adapter.config, module, adapter_name=name, low_cpu_mem_usage=True,
                                    state_dict=state_dict)
            set_peft_model_state_dict(module, state_dict, adapter_name=name, low_cpu_mem_usage=True)
        set_weights_and_activate_adapters(module, names, [float(strength) for _, strength in entries])
        yield module
    finally:
        recurse_remove_peft_layers(module)
        module.__dict__.pop("peft_config", None)  # the one attribute PEFT adds to the module itself


class LoraModelPatch(ModelPatch):
    """One or more LoRAs on a UNet, installed only around a sampler run."""

    def __init__(self, unet, entries: Sequence[tuple[Adapter, float]]):
        self.unet, self.entries = unet, tuple(entries)

    def applied(self, unet):
        if unet is not self.unet:
            raise NodeError("the LoRA was applied to another model's UNet; link ApplyLoRA's model output straight "
                            "to the sampler")
        return adapters_installed(unet, self.entries)


class LoraClipPatch(ClipPatch):
    """One or more LoRAs on the text encoder(s) of a CLIP, installed only around an encode."""

    def __init__(self, entries: dict[str, Sequence[tuple[Adapter, float]]]):
        self.entries = {component: tuple(e) for component, e in entries.items()}  # "text_encoder(_2)" -> entries

    @contextlib.contextmanager
    def applied(self, clip):
        with contextlib.ExitStack() as stack:
            for component, entries in self.entries.items():
                stack.enter_context(adapters_installed(getattr(clip, component), entries))
            yield clip


def _family_hint(lora: LoraInfo, label: str) -> str:
    made_for = "SDXL (it has layers for a second text encoder)" if "text_encoder_2" in lora.layers else \
        "another model family"
    return f"It looks made for {made_for}; load a LoRA made for this {label} checkpoint."


def apply_lora(model, clip, lora: LoraHandle, strength_model: float = 1.0, strength_clip: float = 1.0):
    """(MODEL, CLIP) copies that sample / encode with ``lora`` at these strengths; the given ones are unchanged.

    A strength of 0, or a LoRA without layers for that side, leaves that side as it is. LoRA patches already
    on the MODEL / CLIP are combined with this one into one patch (one adapter each). Layers that do not fit
    the model are a NodeError here, before any sampling step."""
    info = lora.info
    hint = _family_hint(info, model.label)
    state_dict, alphas = diffusers_state_dict(lora, model.is_sdxl, model.unet.config)
    if strength_model and "unet" in info.layers:
        adapter = unet_adapter(state_dict, alphas, lora.metadata, model.unet)
        if adapter is not None:
            problem = fit_problem(adapter, model.unet, info.name, "UNet", hint)
            if problem:
                raise NodeError(problem)
            earlier = [e for p in model.patches if isinstance(p, LoraModelPatch) for e in p.entries]
            others = tuple(p for p in model.patches if not isinstance(p, LoraModelPatch))
            model = replace(model, patches=others).with_patch(
                LoraModelPatch(model.unet, [*earlier, (adapter, float(strength_model))]))
    text = [c for c in ("text_encoder", "text_encoder_2") if c in info.layers]
    if strength_clip and text:
        entries: dict[str, list] = {}
        for p in clip.patches:
            if isinstance(p, LoraClipPatch):
                for component, earlier in p.entries.items():
                    entries.setdefault(component, []).extend(earlier)
        for component in text:
            encoder = getattr(clip, component, None)
            if encoder is None:
                raise NodeError(f"{info.name} has layers for a {COMPONENTS[component]} ({component}) but this "
                                f"{clip.kind.label} CLIP has none. {hint}")
            adapter = text_encoder_adapter(state_dict, alphas, lora.metadata, encoder, component)
            if adapter is None:
                continue
            problem = fit_problem(adapter, encoder, info.name, COMPONENTS[component], hint)
            if problem:
                raise NodeError(problem)
            entries.setdefault(component, []).append((adapter, float(strength_clip)))
        if entries:
            others = tuple(p for p in clip.patches if not isinstance(p, LoraClipPatch))
            clip = clip.with_patches((*others, LoraClipPatch(entries)))
    return model, clip


# ---------------------------------------------------------------------------------------------- nodes

def _check_load(params: dict):
    path = params.get("path")
    if isinstance(path, str) and Path(path).is_file():
        try:
            inspect_lora(path)
        except NodeError as exc:
            yield "path", str(exc)


@node("LoadLoRA", version=1, category="loaders", outputs={"lora": LORA}, check=_check_load,
      reference="diffusers StableDiffusionPipeline.lora_state_dict (kohya/A1111 and diffusers/PEFT LoRA files)")
def load_lora_node(
    path: Annotated[str, InputPath(kind="file", folder="loras"),
                    Field(description="LoRA weights, .safetensors: kohya/A1111 (lora_unet_*, lora_te*_*) or "
                                      "diffusers/PEFT (unet.*, text_encoder.*) names")],
    ctx: RunContext,
):
    """Load a LoRA (.safetensors) for ApplyLoRA.

    Reads kohya/A1111 files (lora_unet_ / lora_te_ / lora_te1_ / lora_te2_ with lora_down, lora_up and alpha)
    and diffusers/PEFT files (unet. / text_encoder. / text_encoder_2. with lora_A and lora_B). Which parts of
    the model it changes (UNet, text encoders) is read from the file's header at validation, and a file that
    is not a LoRA is reported then. Pickle files are refused."""
    handle = load_lora(path)
    ctx.record("loras", {"source": handle.source, "format": handle.info.format, "layers": dict(handle.info.layers),
                         "description": handle.info.describe()})
    log.info("LoadLoRA: %s", handle.info.describe())
    return handle


@node("ApplyLoRA", version=1, space=SpaceRule(("model", "clip")), category="loaders", outputs={"model": MODEL, "clip": CLIP},
      reference="diffusers load_lora_weights + set_adapters(adapter_weights) (ComfyUI LoraLoader's two strengths)")
def apply_lora_node(
    model: Model,
    clip: Clip,
    lora: Lora,
    ctx: RunContext,
    strength_model: Annotated[float, Field(ge=-10, le=10, description="how strongly the LoRA changes the UNet "
                                                                      "(0: not at all)")] = 1.0,
    strength_clip: Annotated[float, Field(ge=-10, le=10, description="how strongly the LoRA changes the text "
                                                                     "encoder(s) (0: not at all)")] = 1.0,
):
    """Give the model and the clip a LoRA: a new MODEL and CLIP that sample and encode with it.

    Each changed layer computes W x + strength · (alpha / rank) · up(down(x)). The MODEL and CLIP given are
    unchanged: the LoRA is put on the shared UNet only while a sampler runs with the new MODEL, and on the
    text encoders only while CLIPEncode runs with the new CLIP. Chain ApplyLoRA nodes to stack LoRAs; they
    combine with an IP-Adapter on the same MODEL. A LoRA made for another model family fails here, naming
    the layers that do not fit, before any sampling step."""
    if not hasattr(clip, "tokenizer"):
        raise NodeError("input 'clip' is not a CLIP from LoadCheckpoint")
    new_model, new_clip = apply_lora(model, clip, lora, strength_model, strength_clip)
    ctx.record("loras", {
        "lora": lora.source, "strength_model": strength_model, "strength_clip": strength_clip,
        "applied": [c for c in lora.info.layers if (strength_model if c == "unet" else strength_clip)],
    })
    return {"model": new_model, "clip": new_clip}
