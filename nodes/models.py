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

import logging
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field

from nodegraph import node
from nodegraph.context import RunContext
from nodegraph.devices import resolve_dtype
from nodegraph.errors import NodeError
from nodegraph.sockets import CLIP, MODEL, VAE, InputPath, SpaceRule

from ._families import SD_SPACE

from ._detection import (CheckpointInfo, _cached_snapshot, inspect_checkpoint, inspect_file,  # noqa: F401
                         looks_like_hub_id, path_problem)
from ._handles import ClipHandle, ModelHandle, VaeHandle  # noqa: F401
from ._files import weights_file_problem
from ._loading import clear_loaded_models, load_checkpoint, load_vae  # noqa: F401

log = logging.getLogger("nodegraph.models")


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


@node("LoadCheckpoint", version=1, space=SpaceRule(("model", "clip", "vae"), SD_SPACE), category="loaders", outputs={"model": MODEL, "clip": CLIP, "vae": VAE},
      check=_check_load, reference="diffusers from_pretrained / from_single_file")
def load_checkpoint_node(
    path: Annotated[str, InputPath(kind="any", must_exist=False, folder="checkpoints", remote=looks_like_hub_id,
                                   implies=_implied_by_checkpoint),
                    Field(description="a name in the models folders' checkpoints/, a diffusers folder, a single-file "
                                      ".safetensors, or a hub id 'owner/name' (local cache)")],
    ctx: RunContext,
    config: Optional[Annotated[str, InputPath(kind="dir", must_exist=False, implies=_implied_by_config),
                               Field(description="single files only: diffusers config folder or hub id; default: the "
                                                 "sidecar '<stem>.config/' folder, then the configs shipped for "
                                                 "the detected family")]] = None,
    dtype: Annotated[Literal["auto", "float32", "float16", "bfloat16"],
                     Field(description="weights' dtype; auto follows the run's --dtype")] = "auto",
):
    """Load a Stable Diffusion 1.x/2.x/XL checkpoint: model (UNet + scheduler config), clip, vae.

    Accepts a name found in the models folders, a diffusers folder, a single-file .safetensors in the original
    layout (LDM for SD 1.x/2.x, SGM for SDXL; fp32 or fp16, pruned or EMA-only), or a hub id found in the
    local Hugging Face cache. Detects the family from the tensor names and shapes (SD 1.x / 2.x and its
    v-prediction kind, SDXL with its two text encoders, the SDXL refiner) and whether the UNet is an
    inpainting one (9 input channels), e.g. "SDXL inpainting", and reports it in the run info. A single
    file loads offline with the configs and CLIP tokenizer shipped with nodegraph, tensor by tensor into
    the target dtype. A file without VAE weights gives a vae output that says to use LoadVAE.
    Pickle files (.ckpt/.bin/.pt) are refused. One load per checkpoint, dtype and device per process;
    dtype "auto" follows the run's --dtype."""
    info = inspect_checkpoint(path, config or None, ctx.workflow_dir)
    torch_dtype = resolve_dtype(dtype, auto=ctx.dtype)
    model, clip, vae = load_checkpoint(info, torch_dtype, ctx.device)
    ctx.record("models", {
        "source": model.source, "family": info.family, "kind": info.label, "inpainting": info.inpainting,
        "dtype": str(torch_dtype).removeprefix("torch."), "description": info.describe(),
    })
    log.info("LoadCheckpoint: %s", info.describe())
    return {"model": model, "clip": clip, "vae": vae}


def _check_vae(params: dict):
    path = params.get("path")
    if isinstance(path, str) and Path(path).is_file():
        problem = weights_file_problem(path, "VAE", "give a .safetensors file or a diffusers vae folder")
        if problem:
            yield "path", problem


@node("LoadVAE", version=1, space=SpaceRule(("vae",), SD_SPACE), category="loaders", outputs={"vae": VAE}, check=_check_vae,
      reference="diffusers AutoencoderKL.from_single_file / from_pretrained")
def load_vae_node(
    path: Annotated[str, InputPath(kind="any", folder="vae"),
                    Field(description="a name in the models folders' vae/, a VAE .safetensors (original or diffusers "
                                      "layout) or a diffusers vae folder")],
    ctx: RunContext,
    family: Annotated[Literal["sd1", "sd2", "sdxl"], Field(description="whose VAE configuration it has (scaling "
                                                                       "factor, float16 upcast): SDXL's for SDXL "
                                                                       "VAEs")] = "sd1",
    config: Optional[Annotated[str, InputPath(kind="dir"), Field(description="a diffusers folder (or its vae/) "
                                                                             "describing the VAE; default: the "
                                                                             "configs shipped for family")]] = None,
    dtype: Annotated[Literal["auto", "float32", "float16", "bfloat16"],
                     Field(description="weights' dtype; auto follows the run's --dtype")] = "auto",
):
    """Load a VAE on its own, e.g. an fp16-fixed SDXL VAE or a fine-tuned SD VAE, to use instead of the checkpoint's.

    A single `.safetensors` in the original layout (`encoder.down.*`, with or without `first_stage_model.`) or in
    diffusers' layout, or a diffusers vae folder; converted by diffusers' own `from_single_file`. Pickles are
    refused. Link its vae output into VAEEncode / VAEDecode / InpaintModelConditioning."""
    from ._shipped_configs import CONFIGS_DIR

    torch_dtype = resolve_dtype(dtype, auto=ctx.dtype)
    config_dir = Path(config) if config else CONFIGS_DIR / family
    vae = load_vae(Path(path), config_dir, family, torch_dtype, ctx.device)
    ctx.record("models", {"source": str(path), "kind": f"VAE ({family})", "dtype": str(torch_dtype).removeprefix("torch.")})
    return vae
