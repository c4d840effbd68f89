"""Tiny randomly initialised IP-Adapter components, built offline for tests and benchmarks.

- ``build_image_encoder``: a ``CLIPVisionModelWithProjection`` (transformers layout, safetensors) at a toy
  size, optionally with a ``preprocessor_config.json`` (real IP-Adapter encoder folders such as
  h94/IP-Adapter ``models/image_encoder`` have none: then the 224 px default from the encoder's
  ``image_size`` applies, as in diffusers' ``load_ip_adapter``);
- ``build_ip_adapter``: a random IP-Adapter state dict in the original layout that diffusers'
  ``load_ip_adapter`` reads (``image_proj.*`` + ``ip_adapter.{n}.to_k_ip/to_v_ip.weight``), shaped to fit
  a given UNet and image encoder, saved as ``.safetensors``. ``kind="plain"`` is the ``ip-adapter_sd15``
  style (a linear projection of the pooled, projected image embedding into 4 tokens); ``kind="plus"`` the
  ``ip-adapter-plus`` style (a perceiver resampler over the encoder's penultimate hidden states, 4 layers
  as diffusers expects, queries = tokens).

The ``ip_adapter`` keys are numbered like the original attention-processor list: ``1, 3, 5, ...`` for the
cross-attention layers in the order of ``unet.attn_processors`` (self-attention layers take the even
numbers and have no weights).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=3,
    image_size=32,
    patch_size=8,
    projection_dim=24,  # differs from hidden_size, so a plain/plus mix-up of widths shows
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def build_image_encoder(folder: Path, seed: int = 0, preprocessor: bool = True, **overrides) -> Path:
    """A tiny CLIP vision encoder with projection, saved in the transformers layout (safetensors).

    ``preprocessor``: also write a ``preprocessor_config.json`` (resize the short side to 36, centre-crop
    32, CLIP's mean/std) so that it differs from the default made from ``image_size``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = CLIPVisionConfig(**{**TINY_VISION, **overrides})
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    if preprocessor:
        size = config.image_size
        settings = {
            "crop_size": {"height": size, "width": size},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": size + size // 8},
        }
        (folder / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))
    return folder


def cross_attention_layers(unet) -> list[tuple[str, int]]:
    """(processor name, hidden size) of each cross-attention layer, in ``unet.attn_processors`` order."""
    layers = []
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attention = unet.get_submodule(name[: -len(".processor")])
            layers.append((name, attention.to_k.out_features))
    return layers


def _linear(generator, out_features: int, in_features: int, bias: bool = True) -> dict:
    bound = 1 / math.sqrt(in_features)
    weight = (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound
    if not bias:
        return {"weight": weight}
    return {"weight": weight, "bias": (torch.rand(out_features, generator=generator) * 2 - 1) * bound}


def _norm(generator, width: int) -> dict:
    return {"weight": 1 + 0.1 * torch.randn(width, generator=generator),
            "bias": 0.1 * torch.randn(width, generator=generator)}


def _prefixed(prefix: str, tensors: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def ip_adapter_state_dict(unet, encoder_config, kind: str = "plain", seed: int = 0, tokens: int = 4,
                          cross_attention_dim: int | None = None) -> dict[str, torch.Tensor]:
    """A random IP-Adapter in the original flat layout (``image_proj.*``, ``ip_adapter.*``).

    ``cross_attention_dim`` overrides the token width (to make an adapter that does not fit the UNet)."""
    g = torch.Generator().manual_seed(seed)
    cross = cross_attention_dim or unet.config.cross_attention_dim
    state: dict[str, torch.Tensor] = {}
    if kind == "plain":
        # ImageProjection: Linear(projection_dim -> 4 * cross) then LayerNorm(cross); always 4 tokens
        state.update(_prefixed("image_proj.proj", _linear(g, 4 * cross, encoder_config.projection_dim)))
        state.update(_prefixed("image_proj.norm", _norm(g, cross)))
    elif kind == "plus":
        # the original Resampler: latents, proj_in, 4 x (PerceiverAttention, FeedForward), proj_out, norm_out
        width, heads, ffn = 32, 1, 4  # diffusers reads heads as to_q rows // 64 and expects ffn_ratio 4
        inner = 64 * heads
        state["image_proj.latents"] = torch.randn(1, tokens, width, generator=g) / width**0.5
        state.update(_prefixed("image_proj.proj_in", _linear(g, width, encoder_config.hidden_size)))
        state.update(_prefixed("image_proj.proj_out", _linear(g, cross, width)))
        state.update(_prefixed("image_proj.norm_out", _norm(g, cross)))
        for i in range(4):
            layer = f"image_proj.layers.{i}"
            state.update(_prefixed(f"{layer}.0.norm1", _norm(g, width)))
            state.update(_prefixed(f"{layer}.0.norm2", _norm(g, width)))
            state.update(_prefixed(f"{layer}.0.to_q", _linear(g, inner, width, bias=False)))
            state.update(_prefixed(f"{layer}.0.to_kv", _linear(g, 2 * inner, width, bias=False)))
            state.update(_prefixed(f"{layer}.0.to_out", _linear(g, width, inner, bias=False)))
            state.update(_prefixed(f"{layer}.1.0", _norm(g, width)))
            state.update(_prefixed(f"{layer}.1.1", _linear(g, width * ffn, width, bias=False)))
            state.update(_prefixed(f"{layer}.1.3", _linear(g, width, width * ffn, bias=False)))
    else:
        raise ValueError(f"unknown IP-Adapter kind {kind!r}")
    for j, (_, hidden) in enumerate(cross_attention_layers(unet)):
        key_id = 2 * j + 1
        # larger than nn.Linear's init so that the image prompt visibly moves the tiny UNet
        for name in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{key_id}.{name}.weight"] = torch.randn(hidden, cross, generator=g) / math.sqrt(cross)
    return {k: v.contiguous() for k, v in state.items()}


def build_ip_adapter(path: Path, unet, encoder_config, kind: str = "plain", seed: int = 0,
                     dtype: torch.dtype = torch.float32, **kwargs) -> Path:
    """Save ``ip_adapter_state_dict(...)`` as a ``.safetensors`` file at ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = ip_adapter_state_dict(unet, encoder_config, kind, seed, **kwargs)
    save_file({k: v.to(dtype) for k, v in state.items()}, str(path))
    return path


@dataclass(frozen=True)
class TinyIPAdapters:
    encoder: Path          # CLIP vision encoder folder with a preprocessor_config.json
    encoder_default: Path  # the same weights, no preprocessor_config.json (CLIP's default at image_size)
    plain: Path            # ip-adapter_sd15-style .safetensors fitting the UNet
    plus: Path             # ip-adapter-plus-style .safetensors fitting the UNet


def build_tiny_ipadapters(root: Path, unet, seed: int = 0) -> TinyIPAdapters:
    """Encoders and a plain and a plus adapter for ``unet`` under ``root`` (written afresh)."""
    root = Path(root)
    encoder = build_image_encoder(root / "image_encoder", seed=seed)
    encoder_default = build_image_encoder(root / "image_encoder_default", seed=seed, preprocessor=False)
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig.from_pretrained(str(encoder))
    plain = build_ip_adapter(root / "ip-adapter.safetensors", unet, config, "plain", seed=seed + 1)
    plus = build_ip_adapter(root / "ip-adapter-plus.safetensors", unet, config, "plus", seed=seed + 2)
    return TinyIPAdapters(encoder, encoder_default, plain, plus)
