"""Random LoRA files for the tiny models, written offline in both layouts diffusers reads.

One set of random ``down`` / ``up`` matrices (rank ``rank``, the same ``alpha`` for every layer) is written twice:

- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` and ``text_encoder(_2).text_model.<module>...``
  (the names real files have), with diffusers' ``lora_adapter_metadata`` (rank, alpha, target module names) in
  the safetensors header, as ``save_lora_weights`` writes it;
- kohya / A1111: ``lora_unet_<module with _>`` (SD 1.x: diffusers' module names; SDXL: the sgm names of the
  original UNet, ``input_blocks_4_1_...``), ``lora_te_`` / ``lora_te1_`` / ``lora_te2_text_model_...``, each with
  ``.lora_down.weight``, ``.lora_up.weight`` and a scalar ``.alpha``.

Both give the same LoRA, so they must give the same images. The layers are every Transformer2DModel
projection (attention q/k/v/out, feed-forward, proj_in/proj_out: 1x1 convolutions in SD 1.x, linear in
SDXL) and every text encoder attention projection, as kohya's trainer chooses them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny_models import _unet_to_original

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _targets(module, suffixes) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in module.named_modules()
            if name.endswith(tuple("." + s for s in suffixes)) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def random_layers(module, suffixes, rank: int, generator: torch.Generator, scale: float) -> dict:
    """Module name -> (down, up): down (rank, in[, 1, 1]), up (out, rank[, 1, 1]), random."""
    layers = {}
    for name, m in _targets(module, suffixes):
        conv = isinstance(m, torch.nn.Conv2d)
        fan_in, fan_out = (m.in_channels, m.out_channels) if conv else (m.in_features, m.out_features)
        down = torch.randn(rank, fan_in, generator=generator) * scale
        up = torch.randn(fan_out, rank, generator=generator) * scale
        layers[name] = (down[..., None, None], up[..., None, None]) if conv else (down, up)
    return layers


def make_lora(unet, text_encoders: dict, rank: int = 4, alpha: float = 2.0, seed: int = 0,
              scale: float = 0.3) -> dict:
    """Random LoRA layers: {"unet": {...}, "text_encoder": {...}, "text_encoder_2": {...}} (module -> down, up)
    plus the rank and alpha."""
    generator = torch.Generator().manual_seed(seed)
    parts = {"unet": random_layers(unet, UNET_TARGETS, rank, generator, scale)} if unet is not None else {}
    for component, encoder in text_encoders.items():
        parts[component] = random_layers(encoder, TEXT_TARGETS, rank, generator, scale)
    return {"parts": parts, "rank": rank, "alpha": alpha}


def _text_name(name: str) -> str:
    """A text encoder module name as LoRA files spell it: with transformers 4's ``text_model.`` level."""
    return name if name.startswith("text_model.") else "text_model." + name


def write_diffusers(lora: dict, path: Path, metadata: bool = True) -> Path:
    """The diffusers / PEFT layout (``unet.*.lora_A.weight``), with ``lora_adapter_metadata`` when asked."""
    from safetensors.torch import save_file

    tensors, config = {}, {}
    for component, layers in lora["parts"].items():
        for name, (down, up) in layers.items():
            key = f"{component}.{_text_name(name) if component != 'unet' else name}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
        targets = UNET_TARGETS if component == "unet" else TEXT_TARGETS
        config.update({f"{component}.r": lora["rank"], f"{component}.lora_alpha": lora["alpha"],
                       f"{component}.target_modules": list(targets)})
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(config)} if metadata else None
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=header)
    return path


def kohya_unet_name(name: str, unet, sgm: bool) -> str:
    """``lora_unet_`` + the module name with ``_`` for ``.``; SDXL's kohya files name the original (sgm) UNet's
    modules (``input_blocks.4.1...``), SD 1.x's diffusers' own."""
    if sgm:
        name = next(iter(_unet_to_original({name + ".weight": None}, unet.config))).removesuffix(".weight")
        name = name.removeprefix("model.diffusion_model.")
    return "lora_unet_" + name.replace(".", "_")


def write_kohya(lora: dict, path: Path, unet=None, sgm: bool = False) -> Path:
    """The kohya / A1111 layout: ``lora_unet_*`` / ``lora_te_*`` (``lora_te1_`` / ``lora_te2_`` for SDXL)."""
    from safetensors.torch import save_file

    prefixes = {"text_encoder": "lora_te1_" if "text_encoder_2" in lora["parts"] else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    tensors = {}
    for component, layers in lora["parts"].items():
        for name, (down, up) in layers.items():
            if component == "unet":
                key = kohya_unet_name(name, unet, sgm)
            else:
                key = prefixes[component] + _text_name(name).replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = torch.tensor(float(lora["alpha"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
