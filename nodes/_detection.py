"""What a checkpoint is, found from configs and safetensors headers alone (no weights): a diffusers folder,
a single file in the original layout (with the diffusers config folder that describes it), or a hub id."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from nodegraph.errors import NodeError

from ._families import SD2, UNET_IN, Family, family, family_of_configs, family_of_file
from ._files import read_tensor_values
from ._shipped_configs import shipped_config_dir
from ._files import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, safetensors_shapes, weights_file_problem,
                     weights_folder_problem)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_WEIGHT_PATTERNS = [
    "model_index.json", "scheduler/*", "tokenizer/*", "text_encoder/config.json", "text_encoder/model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors", "tokenizer_2/*", "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
]


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is, found from configs and the safetensors header alone (no weights)."""

    kind: str  # "folder" | "file"
    path: Path  # the folder or the file
    family: str  # a Family's name
    in_channels: int
    config_dir: Path | None = None  # single files: the diffusers config folder used
    hub_id: str | None = None
    has_vae: bool = True  # single files may come without one (first_stage_model.*): LoadVAE supplies it

    @property
    def inpainting(self) -> bool:
        return self.in_channels == 9

    @property
    def family_kind(self) -> Family:
        return family(self.family)

    @property
    def label(self) -> str:
        return self.family_kind.label_for(self.inpainting)

    def describe(self) -> str:
        unet = "inpainting UNet (9 input channels)" if self.inpainting else "UNet (4 input channels)"
        origin = f"hub id {self.hub_id}" if self.hub_id else f"{self.kind} {self.path}"
        return f"{self.family_kind.title} ({self.label}) {unet}, {origin}"


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


def _folder_family(folder: Path, unet_config: dict) -> Family:
    """The family of a diffusers (or config) folder from its configs."""
    encoders = {name: _read_json(folder / name / "config.json") for name in ("text_encoder", "text_encoder_2")
                if (folder / name / "config.json").is_file()}
    return family_of_configs(unet_config, encoders, str(folder))


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
    found = _folder_family(folder, unet_config)
    return CheckpointInfo("folder", folder, found.name, int(unet_config.get("in_channels", 4)), hub_id=hub_id)


def inspect_file(path: Path, config: str | None = None) -> CheckpointInfo:
    problem = path_problem(str(path))
    if problem:
        raise NodeError(problem)
    shapes = safetensors_shapes(path)
    found = family_of_file(set(shapes), path.name)
    in_channels = int(shapes[UNET_IN][1])
    v_prediction = found is SD2 and in_channels == 4 and sd2_v_prediction(path)
    config_dir = _config_for_file(path, found, in_channels, config, v_prediction)
    unet_config = _read_json(config_dir / "unet" / "config.json")
    if int(unet_config.get("in_channels", 4)) != in_channels:
        raise NodeError(f"config folder {config_dir} describes a UNet with {unet_config.get('in_channels')} input "
                        f"channels but {path.name} has {in_channels}; give the config of the matching model "
                        "(an inpainting checkpoint needs an inpainting config)")
    width = int(shapes[UNET_IN][0])
    if width != int((unet_config.get("block_out_channels") or [width])[0]):
        raise NodeError(f"{path.name}'s UNet is {width} channels wide but the config in {config_dir} describes "
                        f"{unet_config.get('block_out_channels')[0]}: it is not a standard {found.title} model; set "
                        f"the LoadCheckpoint param 'config' to its diffusers config folder, or put one beside the "
                        f"file as '{path.with_suffix('.config').name}/'")
    config_family = _folder_family(config_dir, unet_config)
    if config_family is not found:
        raise NodeError(f"config folder {config_dir} is for {config_family.title} but {path.name} is "
                        f"{found.title}; give the config of the matching model")
    has_vae = any(k.startswith("first_stage_model.") for k in shapes)
    return CheckpointInfo("file", path, found.name, in_channels, config_dir=config_dir, has_vae=has_vae)


def _config_for_file(path: Path, family: Family, in_channels: int, config: str | None,
                     v_prediction: bool = True) -> Path:
    """The diffusers config folder for a single file: the param, the sidecar, or the one shipped for its family
    (nodes/configs/): a file in the original layout loads with no folder of its own and no network."""
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
    shipped = shipped_config_dir(family.name, in_channels == 9, v_prediction=v_prediction)
    if shipped is None:
        raise NodeError(f"{path.name} is a single-file {family.label_for(in_channels == 9)} checkpoint, for which no "
                        f"configs are shipped; set the LoadCheckpoint param 'config' to its diffusers config folder, "
                        f"or put one beside the file as '{sidecar.name}/'")
    return shipped


# ComfyUI's test for SD 2.x v-prediction weights: a layer norm bias that training spreads wider
_V_PRED_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def sd2_v_prediction(path: Path) -> bool:
    """Whether an SD 2.x single file is the 768-v (v-prediction) kind rather than the 512 base (epsilon): their
    tensors are the same, so, as ComfyUI does, by the population standard deviation of one layer-norm bias
    (above 0.09 for v-prediction), read without torch. A file without that tensor counts as v-prediction,
    diffusers' choice for every SD 2.x file."""
    values = read_tensor_values(path, _V_PRED_PROBE)
    if not values:
        return True
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5 > 0.09


def _checked_config_dir(folder: Path, family: Family) -> Path:
    needed = ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"]
    needed += [f"{e}/config.json" for e in family.encoders]
    missing = [n for n in needed if not (folder / n).is_file()]
    for tokenizer in family.tokenizers:
        if not (folder / tokenizer).is_dir():
            missing.append(f"{tokenizer}/")
    if missing:
        raise NodeError(f"config folder {folder} is missing {', '.join(missing)}; it must be a diffusers-style "
                        "model folder (weights not needed)")
    return folder


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache snapshot of ``repo_id``, without touching the network.

    Read from the cache's documented layout (``models--<org>--<name>/refs/main`` names the snapshot) rather
    than through ``snapshot_download``, whose import costs validation a tenth of a second."""
    from huggingface_hub import constants

    if repo_id.count("/") != 1:
        return None
    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


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
