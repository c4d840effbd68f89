"""Loading a checkpoint into MODEL / CLIP / VAE handles: once per process, dtype and device, shared by every
node that uses it. Diffusers folders load component by component (safetensors only); single files load tensor
by tensor into the target dtype and through diffusers' own converters."""
from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any, Callable

from nodegraph.devices import resolve_dtype
from nodegraph.lazy import lazy

from ._detection import CheckpointInfo, _read_json
from ._files import files_identity, read_state_dict
from ._handles import ClipHandle, ModelHandle, VaeHandle
from ._memory import MANAGER
from ._shipped_configs import load_clip_tokenizer

torch = lazy("torch")


class LoadedOnce:
    """Loaded models: one load per process, shared by every node that asks. Kept by where they come from
    (``slot``: paths, dtype, device) with the content they were loaded from (``identity``): when the files
    change, the next request loads them again and the old model is let go."""

    every: "weakref.WeakSet[LoadedOnce]" = weakref.WeakSet()  # every loader's, for release_all_loaded

    def __init__(self) -> None:
        self._items: dict[tuple, tuple[tuple, Any]] = {}
        self.lock = threading.RLock()
        LoadedOnce.every.add(self)

    def get(self, slot: tuple, identity: tuple, load: Callable[[], Any]) -> Any:
        with self.lock:
            held = self._items.get(slot)
            if held is None or held[0] != identity:
                self._items.pop(slot, None)  # free the stale model before loading the new one
                self._items[slot] = (identity, load())
            return self._items[slot][1]

    def clear(self) -> None:
        with self.lock:
            self._items.clear()


_LOADED = LoadedOnce()  # (identity, dtype, device) -> (MODEL, CLIP, VAE) handles


def release_all_loaded() -> None:
    """Forget every loaded model of every loader (checkpoints, VAEs, LoRAs, IP-Adapters, ...): they go once
    nothing else holds them, and the next load reads the files again."""
    for loaded in list(LoadedOnce.every):
        loaded.clear()


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
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    common = dict(torch_dtype=dtype, use_safetensors=True, local_files_only=True)
    components = {
        "unet": UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", **common),
        "vae": AutoencoderKL.from_pretrained(str(folder), subfolder="vae", **common),
        "scheduler_config": _read_json(folder / "scheduler" / "scheduler_config.json"),
        "pipeline_config": _pipeline_config(folder),
    }
    if (folder / "text_encoder").is_dir():
        components["text_encoder"] = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", **common)
        components["tokenizer"] = load_clip_tokenizer(folder, "tokenizer")
    if (folder / "text_encoder_2").is_dir():
        components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            str(folder), subfolder="text_encoder_2", **common)
        components["tokenizer_2"] = load_clip_tokenizer(folder, "tokenizer_2")
    return components


def _pipeline_config(folder: Path) -> dict:
    index = folder / "model_index.json"
    return _read_json(index) if index.is_file() else {}


def _load_file(info: CheckpointInfo, dtype: torch.dtype) -> dict:
    """The components of a single file, through the same diffusers converters the pipelines' ``from_single_file``
    uses, from a state dict converted to ``dtype`` tensor by tensor as it is read (``read_state_dict``): the
    models take over its tensors, so the peak memory is the model in ``dtype`` and not the file's copy too.
    The file is read while diffusers is imported (the first load of a process: seconds of imports that hold
    the other core idle otherwise)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="read-checkpoint") as pool:
        reading = pool.submit(read_state_dict, info.path, dtype)
        from diffusers import pipelines
        from diffusers.loaders.single_file import load_single_file_sub_model
        checkpoint = reading.result()
    index = _pipeline_config(info.config_dir)
    components = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        library, class_name = index.get(name) or (None, None)
        if library is None or not (info.config_dir / name).is_dir() or (name == "vae" and not info.has_vae):
            continue
        components[name] = load_single_file_sub_model(
            library_name=library, class_name=class_name, name=name, checkpoint=checkpoint, pipelines=pipelines,
            is_pipeline_module=hasattr(pipelines, library), cached_model_config_path=str(info.config_dir),
            torch_dtype=dtype, local_files_only=True)
    del checkpoint
    for name in ("tokenizer", "tokenizer_2"):
        if (info.config_dir / name).is_dir():
            components[name] = load_clip_tokenizer(info.config_dir, name)
    components["scheduler_config"] = _read_json(info.config_dir / "scheduler" / "scheduler_config.json")
    components["pipeline_config"] = index
    return components


def _wrap(info: CheckpointInfo, c: dict, device: torch.device) -> tuple[ModelHandle, ClipHandle, VaeHandle]:
    source = info.hub_id or str(info.path)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if c.get(name) is not None:  # with a memory budget they stay on the CPU until a node uses them
            c[name].to("cpu" if MANAGER.offloads else device).eval().requires_grad_(False)
    vae = VaeHandle(c.get("vae"), info.family, source)
    model = ModelHandle(c["unet"], dict(c["scheduler_config"]), info.family, source,
                        vae.scale_factor if vae.vae is not None else 8)
    # diffusers' SDXL pipelines default force_zeros_for_empty_prompt to True; the refiner's config sets False
    zeros = info.family_kind.text_time and bool(c.get("pipeline_config", {}).get("force_zeros_for_empty_prompt", True))
    clip = ClipHandle(c.get("tokenizer"), c.get("text_encoder"), info.family, source,
                      tokenizer_2=c.get("tokenizer_2"), text_encoder_2=c.get("text_encoder_2"),
                      force_zeros_for_empty_prompt=zeros)
    return model, clip, vae


def load_vae(path: Path, config_dir: Path, family_name: str, dtype=None, device="cpu") -> VaeHandle:
    """A VAE on its own: a diffusers folder (``config.json`` + weights), or one ``.safetensors`` in the original
    layout (``encoder.down.*``, with or without ``first_stage_model.``) or in diffusers' (``encoder.down_blocks.*``),
    described by ``config_dir/vae`` (or ``config_dir`` itself). Loaded once per content, dtype and device."""
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    vae_config = config_dir / "vae" if (config_dir / "vae" / "config.json").is_file() else config_dir

    def load() -> VaeHandle:
        from diffusers import AutoencoderKL

        if path.is_dir():
            vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True,
                                                local_files_only=True)
        else:
            state = read_state_dict(path, dtype)
            state = {k.removeprefix("first_stage_model."): v for k, v in state.items()}
            vae = AutoencoderKL.from_single_file(state, config=str(vae_config), torch_dtype=dtype,
                                                 local_files_only=True)
        vae.to("cpu" if MANAGER.offloads else device).eval().requires_grad_(False)
        return VaeHandle(vae, family_name, str(path))

    identity = files_identity([path, vae_config])
    return _LOADED.get((tuple(p for p, _ in identity), str(dtype), str(device), "vae"), identity, load)
