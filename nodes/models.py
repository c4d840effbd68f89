"""LoadCheckpoint and the MODEL / CLIP / VAE handles it makes.

A checkpoint is one of

- a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``); its components are loaded one by one, safetensors only;
- a single-file ``.safetensors`` in the original Stable Diffusion layout, loaded through diffusers'
  ``from_single_file``. That needs a diffusers-style config folder (configs and tokenizer, no weights)
  describing the architecture; diffusers would fetch one from the hub. Here it comes, in this order,
  from the ``config`` param (a folder or a hub id in the local cache), from a sidecar folder
  ``<file stem>.config/`` beside the file, or from the local Hugging Face cache copy of the repo
  diffusers itself would use for the detected family (``stable-diffusion-v1-5/stable-diffusion-v1-5``
  and the like). Nothing is fetched for a single file; when none is found the error says how to get one;
- a hub id ``owner/name``: a diffusers repo found in the local Hugging Face cache, downloaded (weights
  in safetensors only) when it is missing and the hub can be reached.

Pickle checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are refused: unpickling can run code.

Each checkpoint is loaded once per process (per dtype and device) and the handles are shared by every
node that uses it. Family detection reads only configs and the safetensors header, so path and family
problems are reported at validation, before any weights load:

- SD 1.x / 2.x: one ``CLIPTextModel`` (768 / 1024 wide);
- SDXL: a UNet with ``addition_embed_type="text_time"`` and two text encoders, ``CLIPTextModel`` and
  ``CLIPTextModelWithProjection`` (single files: ``conditioner.embedders.0/1.*``); the SDXL refiner has
  the second encoder only and aesthetic-score time ids;
- any of them with a 9-channel UNet is the inpainting variant ("SDXL inpainting").
"""
from __future__ import annotations

from nodegraph.lazy import lazy

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

torch = lazy("torch")
from pydantic import Field

from nodegraph.devices import resolve_dtype
from nodegraph.context import RunContext
from nodegraph.errors import NodeError
from nodegraph import node
from nodegraph.sockets import CLIP, MODEL, VAE, InputPath

from ._loading import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, LoadedOnce, files_identity, read_state_dict,
                       safetensors_shapes, weights_file_problem, weights_folder_problem)

log = logging.getLogger("nodegraph.models")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL",
                "sdxl_refiner": "Stable Diffusion XL refiner"}
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner"}
SDXL_FAMILIES = ("sdxl", "sdxl_refiner")
# The repos diffusers' from_single_file takes configs from, by detected family (looked up in the local cache only).
DEFAULT_CONFIG_REPOS = {
    ("sd1", False): "stable-diffusion-v1-5/stable-diffusion-v1-5",
    ("sd1", True): "stable-diffusion-v1-5/stable-diffusion-inpainting",
    ("sd2", False): "stabilityai/stable-diffusion-2-1",
    ("sd2", True): "stabilityai/stable-diffusion-2-inpainting",
    ("sdxl", False): "stabilityai/stable-diffusion-xl-base-1.0",
    ("sdxl", True): "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
    ("sdxl_refiner", False): "stabilityai/stable-diffusion-xl-refiner-1.0",
}
HUB_WEIGHT_PATTERNS = [
    "model_index.json", "scheduler/*", "tokenizer/*", "text_encoder/config.json", "text_encoder/model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors", "tokenizer_2/*", "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
]


def family_label(family: str, inpainting: bool) -> str:
    """Short name of a checkpoint kind: "SD 1.x", "SDXL", "SDXL inpainting", ..."""
    return FAMILY_LABELS.get(family, family) + (" inpainting" if inpainting else "")


# ---------------------------------------------------------------------------------------------- handles

@dataclass(eq=False)
class ModelHandle:
    """MODEL: the denoising UNet, the checkpoint's scheduler config and what samplers must know about it."""

    unet: Any
    scheduler_config: dict
    family: str  # "sd1" | "sd2" | "sdxl" | "sdxl_refiner"
    source: str
    vae_scale_factor: int = 8
    patches: tuple = ()  # nodes.denoise.ModelPatch objects applied around each sampler run

    def with_patch(self, patch) -> "ModelHandle":
        """A new MODEL that applies ``patch`` while sampling; this one is unchanged."""
        return replace(self, patches=(*self.patches, patch))

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def inpainting(self) -> bool:
        return self.in_channels == 9

    @property
    def is_sdxl(self) -> bool:
        return self.family in SDXL_FAMILIES

    @property
    def label(self) -> str:
        return family_label(self.family, self.inpainting)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def describe(self) -> str:
        kind = "inpainting UNet (9 input channels)" if self.inpainting else f"UNet ({self.in_channels} input channels)"
        return f"{FAMILY_NAMES.get(self.family, self.family)} ({self.label}) {kind} from {self.source}"


@dataclass(eq=False)
class ClipHandle:
    """CLIP: tokenizer + text encoder. Remembers the empty prompt's embedding (the default negative).

    SDXL has two: ``text_encoder`` (CLIP ViT-L) and ``text_encoder_2`` (OpenCLIP bigG with projection,
    which also gives the pooled embedding); the refiner has only the second (``text_encoder`` None)."""

    tokenizer: Any
    text_encoder: Any
    family: str
    source: str
    memo: dict = field(default_factory=dict, repr=False)  # the empty prompt's conditioning, per dtype/device
    # SDXL's second encoder (OpenCLIP bigG, which also gives the pooled embedding); None for SD 1.x/2.x
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    # SDXL pipelines' config: with no negative prompt the negative embeddings are zeros, not the encoded ""
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_sdxl(self) -> bool:
        return self.family in SDXL_FAMILIES

    @property
    def encoders(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs in use, in diffusers' order."""
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(t, e) for t, e in pairs if e is not None]

    @property
    def device(self) -> torch.device:
        return self.encoders[0][1].device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoders[-1][1].dtype


@dataclass(eq=False)
class VaeHandle:
    """VAE: the autoencoder with its spatial factor (8) and latent scaling factor."""

    vae: Any
    family: str
    source: str
    memo: dict = field(default_factory=dict, repr=False)  # the float32 copy for force_upcast

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float | None:
        return getattr(self.vae.config, "shift_factor", None)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def force_upcast(self) -> bool:
        """SDXL's VAE overflows in float16; diffusers runs it in float32 then (``config.force_upcast``)."""
        return bool(getattr(self.vae.config, "force_upcast", False))

    def compute_module(self):
        """The autoencoder to run: a float32 copy (made once) when the VAE is float16 and its config says
        force_upcast, as diffusers' SDXL pipelines upcast it; else the VAE itself. A copy rather than
        ``vae.to(float32)`` and back, so nodes sharing the handle never see it change."""
        if not (self.force_upcast and self.vae.dtype == torch.float16):
            return self.vae
        with _LOADED.lock:
            if "float32" not in self.memo:
                import copy

                self.memo["float32"] = copy.deepcopy(self.vae).to(torch.float32)
            return self.memo["float32"]


# ---------------------------------------------------------------------------------------------- inspection

@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is, found from configs and the safetensors header alone (no weights)."""

    kind: str  # "folder" | "file"
    path: Path  # the folder or the file
    family: str
    in_channels: int
    config_dir: Path | None = None  # single files: the diffusers config folder used
    hub_id: str | None = None

    @property
    def inpainting(self) -> bool:
        return self.in_channels == 9

    @property
    def label(self) -> str:
        return family_label(self.family, self.inpainting)

    def describe(self) -> str:
        unet = "inpainting UNet (9 input channels)" if self.inpainting else "UNet (4 input channels)"
        origin = f"hub id {self.hub_id}" if self.hub_id else f"{self.kind} {self.path}"
        return f"{FAMILY_NAMES.get(self.family, self.family)} ({self.label}) {unet}, {origin}"


def looks_like_hub_id(value: str) -> bool:
    return bool(HUB_ID.match(value)) and not value.lower().endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)


def path_problem(path: str) -> str | None:
    """A reason the path cannot be a checkpoint, found without loading anything (None: looks fine)."""
    p = Path(path).expanduser()
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return weights_file_problem(p, "checkpoint", "convert it to .safetensors (e.g. load it once in a trusted "
                                    "environment and save with safetensors) or use the model's diffusers folder")
    if p.is_dir():
        if not (p / "model_index.json").is_file() and not (p / "unet" / "config.json").is_file():
            return (f"folder '{p}' is not a diffusers model: it has no model_index.json or unet/config.json; "
                    "give a diffusers model folder, a single .safetensors checkpoint file, or a hub id 'owner/name'")
        return None
    if p.is_file():
        return weights_file_problem(p, "checkpoint", "give a .safetensors file or a diffusers folder")
    if p.is_absolute() or not looks_like_hub_id(path):
        return (f"no such checkpoint file or folder '{path}' (relative paths start at the workflow file's folder), "
                "and it is not a hub id 'owner/name' either")
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NodeError(f"cannot read {path}: {exc}") from None


def _family_from_unet_config(config: dict, where: Path) -> str:
    """SD 1.x or 2.x from a UNet config without SDXL's added conditioning."""
    cross = config.get("cross_attention_dim")
    if cross == 768:
        return "sd1"
    if cross == 1024:
        return "sd2"
    # Tiny test models and unusual widths: SD 1.x layout unless the text encoder says OpenCLIP.
    return "sd1"


def sdxl_time_id_count(unet_config: dict, pooled_dim: int) -> int:
    """How many micro-conditioning numbers the UNet's added embedding takes: 6 (original size, crop, target
    size; SDXL base and inpainting) or 5 (original size, crop, aesthetic score; the refiner)."""
    per_id = int(unet_config.get("addition_time_embed_dim") or 0)
    total = int(unet_config.get("projection_class_embeddings_input_dim") or 0)
    if per_id <= 0 or (total - pooled_dim) % per_id:
        return 0
    return (total - pooled_dim) // per_id


def _sdxl_family(folder: Path, unet_config: dict, where: Path) -> str:
    """SDXL base/inpainting or refiner from the text encoder configs next to a text_time UNet; mismatches
    between the encoders and the UNet are reported here, before any weights load."""
    name = FAMILY_NAMES["sdxl"]
    second = folder / "text_encoder_2" / "config.json"
    if not second.is_file():
        raise NodeError(f"{where} has a {name} UNet (added text/time conditioning) but no text_encoder_2/config.json; "
                        "an SDXL checkpoint needs its second text encoder (CLIPTextModelWithProjection)")
    enc2 = _read_json(second)
    first = folder / "text_encoder" / "config.json"
    enc1 = _read_json(first) if first.is_file() else None
    family = "sdxl" if enc1 is not None else "sdxl_refiner"
    width = int(enc2.get("hidden_size", 0)) + (int(enc1.get("hidden_size", 0)) if enc1 else 0)
    cross = unet_config.get("cross_attention_dim")
    if cross != width:
        parts = (f"text_encoder ({enc1.get('hidden_size')}) + text_encoder_2 ({enc2.get('hidden_size')})" if enc1
                 else f"text_encoder_2 ({enc2.get('hidden_size')})")
        raise NodeError(f"{where}: the UNet's cross_attention_dim is {cross} but {parts} give {width}; the text "
                        "encoders do not belong to this UNet")
    count = sdxl_time_id_count(unet_config, int(enc2.get("projection_dim", 0)))
    if count not in (5, 6):
        raise NodeError(f"{where}: the UNet's added embedding takes {unet_config.get('projection_class_embeddings_input_dim')}"
                        f" inputs, which is not 6 (or 5 for a refiner) time ids of {unet_config.get('addition_time_embed_dim')}"
                        f" plus the pooled text embedding of {enc2.get('projection_dim')}; the config is inconsistent")
    if enc1 is None and count != 5:
        raise NodeError(f"{where} has no text_encoder/ (like the SDXL refiner) but its UNet takes {count} time ids, "
                        "not the refiner's 5; the folder is incomplete")
    return family


def _folder_family(folder: Path, unet_config: dict, where: Path) -> str:
    if unet_config.get("addition_embed_type") == "text_time":
        return _sdxl_family(folder, unet_config, where)
    if unet_config.get("addition_embed_type"):
        raise NodeError(f"{where}: UNet addition_embed_type '{unet_config['addition_embed_type']}' is not a Stable "
                        "Diffusion 1.x/2.x/XL model")
    return _family_from_unet_config(unet_config, where)


_COMPONENT_DIRS = ("unet", "vae", "text_encoder", "text_encoder_2")


def inspect_folder(folder: Path, hub_id: str | None = None) -> CheckpointInfo:
    problem = path_problem(str(folder))
    if problem:
        raise NodeError(problem)
    unet_config = _read_json(folder / "unet" / "config.json")
    for name in _COMPONENT_DIRS:
        sub = folder / name
        problem = weights_folder_problem(sub, "component folder", "diffusers: pipe.save_pretrained(folder, "
                                         "safe_serialization=True)") if sub.is_dir() else None
        if problem:
            raise NodeError(problem)
    family = _folder_family(folder, unet_config, folder)
    return CheckpointInfo("folder", folder, family, int(unet_config.get("in_channels", 4)), hub_id=hub_id)


def inspect_file(path: Path, config: str | None = None) -> CheckpointInfo:
    problem = path_problem(str(path))
    if problem:
        raise NodeError(problem)
    shapes = safetensors_shapes(path)
    keys = set(shapes)
    if "model.diffusion_model.input_blocks.0.0.weight" not in shapes:
        raise NodeError(f"{path.name} is not a Stable Diffusion 1.x/2.x/XL single-file checkpoint (no "
                        "model.diffusion_model.* UNet weights); give a full checkpoint or a diffusers folder")
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        if not any(k.startswith("conditioner.embedders.0.transformer.") for k in keys):
            raise NodeError(f"{path.name} looks like SDXL but lacks the first text encoder "
                            "(conditioner.embedders.0.transformer.*); it is not a full SDXL checkpoint")
        family = "sdxl"
    elif any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        family = "sdxl_refiner"
    elif "cond_stage_model.model.token_embedding.weight" in keys:
        family = "sd2"
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
        family = "sd1"
    else:
        raise NodeError(f"{path.name} has no text encoder weights (cond_stage_model.*); it is not a full SD checkpoint")
    in_channels = int(shapes["model.diffusion_model.input_blocks.0.0.weight"][1])
    config_dir = _config_for_file(path, family, in_channels, config)
    unet_config = _read_json(config_dir / "unet" / "config.json")
    if int(unet_config.get("in_channels", 4)) != in_channels:
        raise NodeError(f"config folder {config_dir} describes a UNet with {unet_config.get('in_channels')} input "
                        f"channels but {path.name} has {in_channels}; give the config of the matching model "
                        "(an inpainting checkpoint needs an inpainting config)")
    config_family = _folder_family(config_dir, unet_config, config_dir)
    if config_family != family:
        raise NodeError(f"config folder {config_dir} is for {FAMILY_NAMES[config_family]} but {path.name} is "
                        f"{FAMILY_NAMES[family]}; give the config of the matching model")
    return CheckpointInfo("file", path, family, in_channels, config_dir=config_dir)


def _config_for_file(path: Path, family: str, in_channels: int, config: str | None) -> Path:
    """The diffusers config folder for a single file: the param, the sidecar, or the local hub cache."""
    if config:
        folder = Path(config).expanduser()
        if folder.is_dir():
            return _checked_config_dir(folder, family)
        if looks_like_hub_id(config):
            cached = _cached_snapshot(config)
            if cached is None:
                raise NodeError(f"config '{config}' is neither a folder nor a repo in the local Hugging Face cache; "
                                f"download its configs with `huggingface-cli download {config} --include '*.json' "
                                "'*.txt'` or give a local diffusers config folder")
            return _checked_config_dir(cached, family)
        raise NodeError(f"config folder '{config}' does not exist")
    sidecar = path.with_suffix(".config")
    if sidecar.is_dir():
        return _checked_config_dir(sidecar, family)
    repo = DEFAULT_CONFIG_REPOS.get((family, in_channels == 9))
    cached = _cached_snapshot(repo) if repo else None
    if cached is not None:
        return _checked_config_dir(cached, family)
    raise NodeError(
        f"{path.name} is a single-file {FAMILY_NAMES[family]} checkpoint and loading it needs a diffusers config "
        f"folder (configs + tokenizer, no weights), which is not fetched from the hub here. Either set the "
        f"LoadCheckpoint param 'config' to such a folder, put one beside the file as '{sidecar.name}/', or "
        f"download {repo}'s configs into the Hugging Face cache: "
        f"`huggingface-cli download {repo} --include '*.json' '*.txt'`")


def _checked_config_dir(folder: Path, family: str = "sd1") -> Path:
    encoders = {"sdxl": ["text_encoder", "text_encoder_2"], "sdxl_refiner": ["text_encoder_2"]}.get(family, ["text_encoder"])
    needed = ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"]
    needed += [f"{e}/config.json" for e in encoders]
    missing = [n for n in needed if not (folder / n).is_file()]
    for tokenizer in (e.replace("text_encoder", "tokenizer") for e in encoders):
        if not (folder / tokenizer).is_dir():
            missing.append(f"{tokenizer}/")
    if missing:
        raise NodeError(f"config folder {folder} is missing {', '.join(missing)}; it must be a diffusers-style "
                        "model folder (weights not needed)")
    return folder


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache snapshot of ``repo_id``, without touching the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _hub_snapshot(repo_id: str) -> Path:
    """A hub repo from the local cache, else downloaded (safetensors weights only) when the hub is reachable."""
    cached = _cached_snapshot(repo_id)
    if cached is not None:
        return cached
    from huggingface_hub import constants, snapshot_download

    how = (f"get it on a machine with network with `huggingface-cli download {repo_id}` (the cache is "
           f"{constants.HF_HUB_CACHE}; copy it over or set HF_HUB_CACHE), or point 'path' at a local diffusers "
           "folder or .safetensors file")
    if constants.HF_HUB_OFFLINE:
        raise NodeError(f"model '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {how}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_WEIGHT_PATTERNS))
    except Exception as exc:  # connection errors come in many types (requests, httpx, hub errors)
        raise NodeError(f"model '{repo_id}' is not in the local Hugging Face cache and could not be downloaded "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {how}") from None


def inspect_checkpoint(path: str, config: str | None = None, workflow_dir: Path | None = None) -> CheckpointInfo:
    """Resolve ``path`` (folder, single file or hub id) and detect the family, without loading weights."""
    local = Path(path).expanduser()
    if not local.is_absolute() and workflow_dir is not None:  # the engine's rule: relative to the workflow
        local = workflow_dir / local
    problem = path_problem(str(local)) if local.exists() else path_problem(path)
    if local.is_dir():
        return inspect_folder(local)
    if local.is_file():
        return inspect_file(local, config)
    if problem:
        raise NodeError(problem)
    return inspect_folder(_hub_snapshot(path), hub_id=path)


# ---------------------------------------------------------------------------------------------- loading

_LOADED = LoadedOnce()  # (identity, dtype, device) -> (MODEL, CLIP, VAE) handles


def clear_loaded_models() -> None:
    """Forget every loaded checkpoint (the next LoadCheckpoint reloads from disk)."""
    _LOADED.clear()


def _identity(info: CheckpointInfo) -> tuple:
    """What makes two loads the same checkpoint: the content of its files and config folder."""
    if info.kind == "file":
        return files_identity([info.path, info.config_dir])
    return files_identity([info.path])


def load_checkpoint(info: CheckpointInfo, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> tuple[ModelHandle, ClipHandle, VaeHandle]:
    """Load (once per process, dtype and device; float32 by default) and wrap the components of an inspected
    checkpoint."""
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    def load():
        components = _load_folder(info.path, dtype) if info.kind == "folder" else _load_file(info, dtype)
        return _wrap(info, components, device)

    identity = _identity(info)
    return _LOADED.get((tuple(p for p, _ in identity), str(dtype), str(device)), identity, load)


def _load_folder(folder: Path, dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    common = dict(torch_dtype=dtype, use_safetensors=True, local_files_only=True)
    components = {
        "unet": UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", **common),
        "vae": AutoencoderKL.from_pretrained(str(folder), subfolder="vae", **common),
        "scheduler_config": _read_json(folder / "scheduler" / "scheduler_config.json"),
        "pipeline_config": _pipeline_config(folder),
    }
    if (folder / "text_encoder").is_dir():
        components["text_encoder"] = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", **common)
        components["tokenizer"] = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer",
                                                                local_files_only=True)
    if (folder / "text_encoder_2").is_dir():
        components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            str(folder), subfolder="text_encoder_2", **common)
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer_2",
                                                                  local_files_only=True)
    return components


def _pipeline_config(folder: Path) -> dict:
    index = folder / "model_index.json"
    return _read_json(index) if index.is_file() else {}


def _load_file(info: CheckpointInfo, dtype: torch.dtype) -> dict:
    """The components of a single file, through the same diffusers converters the pipelines' ``from_single_file``
    uses, from a state dict converted to ``dtype`` tensor by tensor as it is read (``read_state_dict``): the
    models take over its tensors, so the peak memory is the model in ``dtype`` and not the file's copy too."""
    from diffusers import pipelines
    from diffusers.loaders.single_file import load_single_file_sub_model
    from transformers import CLIPTokenizer

    checkpoint = read_state_dict(info.path, dtype)
    index = _pipeline_config(info.config_dir)
    components = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        library, class_name = index.get(name) or (None, None)
        if library is None or not (info.config_dir / name).is_dir():
            continue
        components[name] = load_single_file_sub_model(
            library_name=library, class_name=class_name, name=name, checkpoint=checkpoint, pipelines=pipelines,
            is_pipeline_module=hasattr(pipelines, library), cached_model_config_path=str(info.config_dir),
            torch_dtype=dtype, local_files_only=True)
    del checkpoint
    for name in ("tokenizer", "tokenizer_2"):
        if (info.config_dir / name).is_dir():
            components[name] = CLIPTokenizer.from_pretrained(str(info.config_dir), subfolder=name,
                                                             local_files_only=True)
    components["scheduler_config"] = _read_json(info.config_dir / "scheduler" / "scheduler_config.json")
    components["pipeline_config"] = index
    return components


def _wrap(info: CheckpointInfo, c: dict, device: torch.device) -> tuple[ModelHandle, ClipHandle, VaeHandle]:
    source = info.hub_id or str(info.path)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if c.get(name) is not None:
            c[name].to(device).eval().requires_grad_(False)
    vae = VaeHandle(c["vae"], info.family, source)
    model = ModelHandle(c["unet"], dict(c["scheduler_config"]), info.family, source, vae.scale_factor)
    # diffusers' SDXL pipelines default force_zeros_for_empty_prompt to True; the refiner's config sets False
    zeros = info.family in SDXL_FAMILIES and bool(c.get("pipeline_config", {}).get("force_zeros_for_empty_prompt", True))
    clip = ClipHandle(c.get("tokenizer"), c.get("text_encoder"), info.family, source,
                      tokenizer_2=c.get("tokenizer_2"), text_encoder_2=c.get("text_encoder_2"),
                      force_zeros_for_empty_prompt=zeros)
    return model, clip, vae


# ---------------------------------------------------------------------------------------------- node

def _implied_by_checkpoint(value: str) -> list[str]:
    """What LoadCheckpoint reads besides ``path``: a single file's config folder (the sidecar, or the local
    hub cache copy), or a hub id's local snapshot. Their content goes into the cache key, so an edited config
    or a new snapshot is never served a result made from the old one."""
    local = Path(value)
    if local.is_file():
        return [str(inspect_file(local).config_dir)]
    if not local.exists() and looks_like_hub_id(value):
        snapshot = _cached_snapshot(value)
        return [str(snapshot)] if snapshot is not None else []
    return []


def _implied_by_config(value: str) -> list[str]:
    """A config given as a hub id: its local snapshot (a folder given by path is hashed as it is)."""
    if not Path(value).exists() and looks_like_hub_id(value):
        snapshot = _cached_snapshot(value)
        return [str(snapshot)] if snapshot is not None else []
    return []


def _check_load(params: dict):
    path = params.get("path")
    if isinstance(path, str):
        problem = path_problem(path)
        if problem:
            yield "path", problem
            return
        if Path(path).expanduser().exists():  # local folder or file: family problems show before the run
            config = params.get("config")
            try:
                inspect_checkpoint(path, config if isinstance(config, str) and config else None)
            except NodeError as exc:
                yield "path", str(exc)
                return
    config = params.get("config")
    if isinstance(config, str) and config and not Path(config).expanduser().is_dir() and not looks_like_hub_id(config):
        yield "config", f"no such config folder '{config}' and not a hub id 'owner/name'"


@node("LoadCheckpoint", version=1, category="loaders", outputs={"model": MODEL, "clip": CLIP, "vae": VAE},
      check=_check_load, reference="diffusers from_pretrained / from_single_file")
def load_checkpoint_node(
    path: Annotated[str, InputPath(kind="any", must_exist=False, implies=_implied_by_checkpoint, folder="checkpoints", remote=looks_like_hub_id),
                    Field(description="diffusers folder, single-file .safetensors, or hub id 'owner/name' (local cache)")],
    ctx: RunContext,
    config: Optional[Annotated[str, InputPath(kind="dir", must_exist=False, implies=_implied_by_config),
                               Field(description="single files only: diffusers config folder or hub id; default: the "
                                                 "sidecar '<stem>.config/' folder, then the local hub cache")]] = None,
    dtype: Annotated[Literal["auto", "float32", "float16", "bfloat16"],
                     Field(description="weights' dtype; auto follows the run's --dtype")] = "auto",
):
    """Load a Stable Diffusion 1.x/2.x/XL checkpoint: model (UNet + scheduler config), clip, vae.

    Accepts a diffusers folder, a single-file .safetensors in the original layout, or a hub id found in
    the local Hugging Face cache. Detects the family (SD 1.x / 2.x, SDXL with its two text encoders, the
    SDXL refiner) and whether the UNet is an inpainting one (9 input channels), e.g. "SDXL inpainting",
    and reports it in the run info. Pickle files (.ckpt/.bin/.pt) are refused.
    One load per checkpoint, dtype and device per process; dtype "auto" follows the run's --dtype."""
    info = inspect_checkpoint(path, config or None, ctx.workflow_dir)
    torch_dtype = resolve_dtype(dtype, auto=ctx.dtype)
    model, clip, vae = load_checkpoint(info, torch_dtype, ctx.device)
    ctx.record("models", {
        "source": model.source, "family": info.family, "kind": info.label, "inpainting": info.inpainting,
        "dtype": str(torch_dtype).removeprefix("torch."), "description": info.describe(),
    })
    log.info("LoadCheckpoint: %s", info.describe())
    return {"model": model, "clip": clip, "vae": vae}
