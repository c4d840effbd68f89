"""Tiny randomly initialised Stable Diffusion XL checkpoints, built offline for tests and benchmarks.

The components have SDXL's structure at toy sizes:

- ``text_encoder``: a ``CLIPTextModel`` (32 wide) and ``text_encoder_2``: a ``CLIPTextModelWithProjection``
  (48 wide, projection 40) whose pooled, projected output is SDXL's ``text_embeds``; the UNet's
  ``cross_attention_dim`` is their concatenated width (80);
- tokenizers from the small local byte-level vocab (``model_max_length=77``); the second pads with ``!``
  like SDXL's OpenCLIP tokenizer;
- a UNet with ``addition_embed_type="text_time"``, ``addition_time_embed_dim=8`` and
  ``projection_class_embeddings_input_dim = 6 * 8 + 40`` (six time ids plus the pooled embedding);
  4 input channels, or 9 for the inpainting variant;
- a VAE that downsamples by 8 with SDXL's ``scaling_factor=0.13025`` and ``force_upcast=True``;
- SDXL base's scheduler config (Euler, ``timestep_spacing="leading"``).

``build_tiny_sdxl(root, in_channels)`` writes the diffusers folder layout;
``build_tiny_sdxl_refiner(root)`` a refiner (second encoder only, aesthetic-score conditioning);
``build_sdxl_single_file(path, ...)`` the original (SGM) single-file layout: ``model.diffusion_model.*``,
``first_stage_model.*``, ``conditioner.embedders.0.transformer.*`` (CLIP) and
``conditioner.embedders.1.model.*`` (OpenCLIP: fused ``in_proj`` attention, transposed ``text_projection``),
with a weightless config folder ``<stem>.config/`` beside it.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.tiny_models import TINY_VAE, _unet_to_original, _vae_to_original, vocab_size, write_tokenizer

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TEXT_1 = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
              max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# ten layers so the single-file key diffusers looks for (``...resblocks.9...``) exists
TEXT_2 = dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_hidden_layers=10,
              max_position_embeddings=77, projection_dim=40, hidden_act="gelu", layer_norm_eps=1e-5)
TIME_EMBED_DIM = 8

TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=TEXT_1["hidden_size"] + TEXT_2["hidden_size"],
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_2["projection_dim"],
    norm_num_groups=8,
)

TINY_SDXL_VAE = {**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}


def _text_config(cls_config, settings: dict):
    eos = vocab_size() - 1
    return cls_config(vocab_size=vocab_size(), bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos, **settings)


def make_sdxl_components(in_channels: int = 4, seed: int = 0, refiner: bool = False) -> dict:
    """Randomly initialised SDXL UNet, VAE and text encoder(s), deterministic in ``seed``.

    ``refiner``: no first text encoder, the UNet conditioned on the second encoder alone (48 wide) and
    five time ids (original size, crop, aesthetic score) as in stable-diffusion-xl-refiner-1.0."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet_config = {**TINY_SDXL_UNET, "in_channels": in_channels}
    if refiner:
        unet_config.update(cross_attention_dim=TEXT_2["hidden_size"],
                           projection_class_embeddings_input_dim=5 * TIME_EMBED_DIM + TEXT_2["projection_dim"])
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(**TINY_SDXL_VAE)
    text_encoder = None if refiner else CLIPTextModel(_text_config(CLIPTextConfig, TEXT_1))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(CLIPTextConfig, TEXT_2))
    components = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for module in components.values():
        if module is not None:
            module.eval()
    return components


def write_tokenizer_2(folder: Path) -> Path:
    """The second tokenizer: same vocab, padded with ``!`` (id 0) like SDXL's OpenCLIP tokenizer."""
    from transformers import CLIPTokenizer

    write_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token="!")
    tokenizer.save_pretrained(str(folder))
    return Path(folder)


def _model_index(in_channels: int, refiner: bool) -> dict:
    if refiner:
        name = "StableDiffusionXLImg2ImgPipeline"
    else:
        name = "StableDiffusionXLInpaintPipeline" if in_channels == 9 else "StableDiffusionXLPipeline"
    index = {
        "_class_name": name,
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "force_zeros_for_empty_prompt": not refiner,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if refiner or in_channels == 9 or name != "StableDiffusionXLPipeline":
        index["requires_aesthetics_score"] = refiner
    return index


def write_sdxl_folder(folder: Path, components: dict, with_weights: bool = True) -> Path:
    """Save components in the diffusers layout (``with_weights=False``: configs and tokenizers only)."""
    from diffusers import EulerDiscreteScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = components[name]
        if module is None:
            continue
        if with_weights:
            module.save_pretrained(str(folder / name), safe_serialization=True)
        elif hasattr(module, "save_config"):
            module.save_config(str(folder / name))
        else:
            module.config.save_pretrained(str(folder / name))
    refiner = components["text_encoder"] is None
    if not refiner:
        write_tokenizer(folder / "tokenizer")
    write_tokenizer_2(folder / "tokenizer_2")
    EulerDiscreteScheduler.from_config(SDXL_SCHEDULER).save_config(str(folder / "scheduler"))
    index = _model_index(components["unet"].config.in_channels, refiner)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def build_tiny_sdxl(root: Path, in_channels: int = 4, seed: int = 0) -> Path:
    """A complete tiny SDXL checkpoint (diffusers folder) at ``root``; 9 input channels for inpainting."""
    return write_sdxl_folder(Path(root), make_sdxl_components(in_channels, seed))


def build_tiny_sdxl_refiner(root: Path, seed: int = 2) -> Path:
    """A tiny SDXL refiner (second text encoder only, aesthetic-score time ids), diffusers folder."""
    return write_sdxl_folder(Path(root), make_sdxl_components(4, seed, refiner=True))


# ---------------------------------------------------------------------------------------------- single file

def _sdxl_unet_to_original(unet) -> dict:
    """SDXL UNet keys -> ``model.diffusion_model.*``: the SD layout plus the added embedding (``label_emb.0``)."""
    state = dict(unet.state_dict())
    added = {k: state.pop(k) for k in list(state) if k.startswith("add_embedding.")}
    out = _unet_to_original(state, unet.config)
    for key, value in added.items():
        layer = {"linear_1": "0", "linear_2": "2"}[key.split(".")[1]]
        out[f"model.diffusion_model.label_emb.0.{layer}.{key.split('.')[-1]}"] = value
    return out


def _open_clip_layout(encoder, prefix: str) -> dict:
    """CLIPTextModelWithProjection keys -> OpenCLIP's (the inverse of diffusers' convert_open_clip_checkpoint)."""
    sd = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {
        prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
        prefix + "text_projection": sd.pop("text_projection.weight").T.contiguous(),
    }
    sd.pop("embeddings.position_ids", None)
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(encoder.config.num_hidden_layers):
        block = f"encoder.layers.{i}."
        target = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{target}attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{block}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")])
            for old, new in names.items():
                out[f"{target}{new}.{kind}"] = sd.pop(f"{block}{old}.{kind}")
    if sd:
        raise KeyError(f"unconverted text encoder keys: {sorted(sd)}")
    return out


def to_sgm_layout(components: dict) -> dict:
    """One state dict in the original SDXL single-file layout (base, inpainting or refiner)."""
    state = _sdxl_unet_to_original(components["unet"])
    state.update(_vae_to_original(components["vae"].state_dict(), components["vae"].config))
    if components["text_encoder"] is not None:
        for key, value in components["text_encoder"].state_dict().items():
            key = key if key.startswith("text_model.") else "text_model." + key
            state["conditioner.embedders.0.transformer." + key] = value
        state.update(_open_clip_layout(components["text_encoder_2"], "conditioner.embedders.1.model."))
    else:
        state.update(_open_clip_layout(components["text_encoder_2"], "conditioner.embedders.0.model."))
    return state


def build_sdxl_single_file(path: Path, in_channels: int = 4, seed: int = 0, refiner: bool = False,
                           dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """An original-layout SDXL ``.safetensors`` and its weightless config folder ``<stem>.config/``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    components = make_sdxl_components(in_channels, seed, refiner=refiner)
    save_file({k: v.to(dtype).contiguous() for k, v in to_sgm_layout(components).items()}, str(path))
    config_dir = write_sdxl_folder(path.with_suffix(".config"), components, with_weights=False)
    return path, config_dir


# ---------------------------------------------------------------------------------------------- the set

@dataclass(frozen=True)
class TinySDXL:
    root: Path
    base: Path        # diffusers folder, 4-channel UNet
    inpaint: Path     # diffusers folder, 9-channel UNet
    refiner: Path     # diffusers folder, refiner
    base_file: Path   # single file of the same weights as ``base`` (config folder: ``<stem>.config/``)
    inpaint_file: Path  # single file of the same weights as ``inpaint``


_LOCK = threading.Lock()
_BUILT: dict[str, TinySDXL] = {}


def build_tiny_sdxl_set(root: Path | None = None) -> TinySDXL:
    """Build (once per process) the tiny SDXL checkpoints under ``root`` (a fresh temp dir by default)."""
    with _LOCK:
        key = str(root)
        if key not in _BUILT:
            base = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="nodegraph-tiny-sdxl-"))
            if base.exists() and root is not None:
                shutil.rmtree(base)
            base.mkdir(parents=True, exist_ok=True)
            _BUILT[key] = TinySDXL(
                base,
                build_tiny_sdxl(base / "tiny-sdxl", 4, seed=0),
                build_tiny_sdxl(base / "tiny-sdxl-inpaint", 9, seed=1),
                build_tiny_sdxl_refiner(base / "tiny-sdxl-refiner"),
                build_sdxl_single_file(base / "single" / "tiny-sdxl.safetensors", 4, seed=0)[0],
                build_sdxl_single_file(base / "single" / "tiny-sdxl-inpaint.safetensors", 9, seed=1)[0],
            )
        return _BUILT[key]
