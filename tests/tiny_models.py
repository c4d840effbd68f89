"""Tiny randomly initialised Stable Diffusion 1.x checkpoints, built offline for tests and benchmarks.

Everything is made here from code: a UNet (4- or 9-channel input), a VAE that downsamples by 8 like the
real one (4 blocks, 3 downsamples), a small CLIP text encoder and a CLIPTokenizer made from a small local
byte-level vocab/merges with ``model_max_length=77``. Two layouts are written:

- the diffusers folder layout (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``), weights as safetensors;
- the original single-file layout (``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.transformer.*`` keys in one ``.safetensors``), plus a weightless config folder
  beside it (``<stem>.config/``) that diffusers' ``from_single_file(config=...)`` reads offline.

``sd15_configs()`` gives the real SD 1.5 architecture (UNet 320/640/1280/1280, 768-wide text encoder)
for the CPU benchmark; the weights are random there too.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

# SD 1.5's scheduler_config.json (PNDM), which every scheduler by name is built from.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.18215,
)

TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=3,
    max_position_embeddings=77,
    projection_dim=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

SD15_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def sd15_configs() -> dict:
    """The real SD 1.5 architecture (random weights): configs for `build_single_file(..., configs=)`."""
    return {"unet": SD15_UNET, "vae": SD15_VAE, "text": SD15_TEXT}


def tiny_configs() -> dict:
    return {"unet": TINY_UNET, "vae": TINY_VAE, "text": TINY_TEXT}


# ---------------------------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable character per byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


# A handful of merges so that BPE really merges (the rest of a word falls back to single bytes).
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("c", "a"), ("s", "t"), ("l", "e</w>"),
           ("o", "n</w>"), ("i", "n"), ("e", "r</w>"), ("o", "f</w>")]


def write_tokenizer(folder: Path) -> Path:
    """Write a small CLIP vocab.json / merges.txt and save a CLIPTokenizer (max length 77) made from them."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in _MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as raw:
        raw = Path(raw)
        (raw / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (raw / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES), encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(str(raw), model_max_length=77)
    tokenizer.save_pretrained(str(folder))
    return folder


def vocab_size() -> int:
    return 2 * 256 + len(_MERGES) + 2


# ---------------------------------------------------------------------------------------------- components

def make_components(in_channels: int = 4, seed: int = 0, configs: dict | None = None) -> dict:
    """Randomly initialised UNet, VAE and text encoder (deterministic in ``seed``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = configs or tiny_configs()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**configs["unet"], "in_channels": in_channels})
    vae = AutoencoderKL(**configs["vae"])
    eos = vocab_size() - 1  # the tiny tokenizer's ids; the SD 1.5-sized encoder keeps CLIP's real 49408 rows
    rows = vocab_size() if configs["text"]["hidden_size"] < 768 else 49408
    text_config = CLIPTextConfig(vocab_size=rows, bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos,
                                 **configs["text"])
    text_encoder = CLIPTextModel(text_config)
    for module in (unet, vae, text_encoder):
        module.eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def _write_common(folder: Path, components: dict, with_weights: bool) -> None:
    from diffusers import PNDMScheduler

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder"):
        module = components[name]
        if with_weights:
            module.save_pretrained(str(folder / name), safe_serialization=True)
        else:
            sub = folder / name
            sub.mkdir(parents=True, exist_ok=True)
            if hasattr(module, "save_config"):
                module.save_config(str(sub))
            else:  # transformers model: config.json only
                module.config.save_pretrained(str(sub))
    write_tokenizer(folder / "tokenizer")
    PNDMScheduler.from_config(SD15_SCHEDULER).save_config(str(folder / "scheduler"))
    pipeline = "StableDiffusionInpaintPipeline" if components["unet"].config.in_channels == 9 else "StableDiffusionPipeline"
    model_index = {
        "_class_name": pipeline,
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))


def build_diffusers_folder(folder: Path, in_channels: int = 4, seed: int = 0, configs: dict | None = None) -> Path:
    """A complete diffusers-layout checkpoint folder."""
    _write_common(Path(folder), make_components(in_channels, seed, configs), with_weights=True)
    return Path(folder)


def build_single_file(path: Path, in_channels: int = 4, seed: int = 0, configs: dict | None = None,
                      dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """An original-layout single-file ``.safetensors`` and its weightless config folder ``<stem>.config/``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    components = make_components(in_channels, seed, configs)
    state = to_original_layout(components)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(path))
    config_dir = path.with_suffix(".config")
    _write_common(config_dir, components, with_weights=False)
    return path, config_dir


# ---------------------------------------------------------------------------------------------- key layout

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _unet_to_original(sd: dict, config) -> dict:
    """diffusers UNet2DConditionModel keys -> the original LDM ``model.diffusion_model.*`` keys.

    The inverse of diffusers' ``convert_ldm_unet_checkpoint`` for SD 1.x/2.x layouts."""
    n = config.layers_per_block
    out = {}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}

    def resnet(rest: str) -> str:
        for new, old in _RESNET:
            if rest.startswith(new + "."):
                return old + rest[len(new):]
        raise KeyError(rest)

    for key, value in sd.items():
        parts = key.split(".")
        head2 = ".".join(parts[:2])
        if head2 in fixed:
            new = fixed[head2] + "." + ".".join(parts[2:])
        elif parts[0] in fixed:
            new = fixed[parts[0]] + "." + ".".join(parts[1:])
        elif parts[0] == "down_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                new = f"input_blocks.{1 + b * (n + 1) + n}.0.op." + ".".join(parts[5:])
            else:
                j = int(parts[3])
                rest = ".".join(parts[4:])
                idx = 1 + b * (n + 1) + j
                new = f"input_blocks.{idx}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
        elif parts[0] == "mid_block":
            j, rest = int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{resnet(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            u, kind = int(parts[1]), parts[2]
            has_attention = "CrossAttn" in config.up_block_types[u]
            if kind == "upsamplers":
                new = f"output_blocks.{u * (n + 1) + n}.{2 if has_attention else 1}.conv." + ".".join(parts[5:])
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                idx = u * (n + 1) + j
                new = f"output_blocks.{idx}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        else:
            raise KeyError(f"unexpected UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_original(sd: dict, config) -> dict:
    """diffusers AutoencoderKL keys -> the original ``first_stage_model.*`` keys (attention as 1x1 convs)."""
    levels = len(config.block_out_channels)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            new = key
        elif parts[1] in ("conv_in", "conv_out"):
            new = key
        elif parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[2]}"
        elif parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2])
            block = i if parts[1] == "down_blocks" else levels - 1 - i
            name = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{name}.{block}.block.{parts[4]}.{rest}"
            else:
                sampler = "downsample" if name == "down" else "upsample"
                new = f"{side}.{name}.{block}.{sampler}.conv.{parts[-1]}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.mid.block_{int(parts[3]) + 1}.{rest}"
            else:
                sub = ".".join(parts[4:-1])
                new = f"{side}.mid.attn_1.{attn[sub]}.{parts[-1]}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        else:
            raise KeyError(f"unexpected VAE key {key}")
        out["first_stage_model." + new] = value
    return out


def to_original_layout(components: dict) -> dict:
    """One state dict in the original Stable Diffusion single-file layout."""
    state = {}
    state.update(_unet_to_original(components["unet"].state_dict(), components["unet"].config))
    state.update(_vae_to_original(components["vae"].state_dict(), components["vae"].config))
    for key, value in components["text_encoder"].state_dict().items():
        # the original files keep transformers' historical ``text_model.`` level
        key = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + key] = value
    return state


# ---------------------------------------------------------------------------------------------- the set

@dataclass(frozen=True)
class TinyModels:
    root: Path
    sd15: Path                # diffusers folder, 4-channel UNet
    sd15_inpaint: Path        # diffusers folder, 9-channel UNet
    sd15_file: Path           # single file, 4-channel
    sd15_file_config: Path
    sd15_inpaint_file: Path   # single file, 9-channel
    sd15_inpaint_file_config: Path


_LOCK = threading.Lock()
_BUILT: dict[str, TinyModels] = {}


def build_tiny_models(root: Path | None = None) -> TinyModels:
    """Build (once per process) the four tiny checkpoints under ``root`` (a fresh temp dir by default)."""
    with _LOCK:
        key = str(root)
        if key not in _BUILT:
            base = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="nodegraph-tiny-"))
            if base.exists() and root is not None:
                shutil.rmtree(base)
            base.mkdir(parents=True, exist_ok=True)
            sd15 = build_diffusers_folder(base / "tiny-sd15", in_channels=4, seed=0)
            sd15_inpaint = build_diffusers_folder(base / "tiny-sd15-inpaint", in_channels=9, seed=1)
            file4, cfg4 = build_single_file(base / "single" / "tiny-sd15.safetensors", in_channels=4, seed=0)
            file9, cfg9 = build_single_file(base / "single" / "tiny-sd15-inpaint.safetensors", in_channels=9, seed=1)
            _BUILT[key] = TinyModels(base, sd15, sd15_inpaint, file4, cfg4, file9, cfg9)
        return _BUILT[key]
