"""Full-size (real architecture) SD 1.5 and SDXL checkpoints with random weights, built offline from the
config folders the package ships and written as single files in the original layouts (LDM, SGM).

Weights are made straight in float16 on empty modules (no float32 copy, no slow initialisation): the
values only have to be distinct, so that a tensor loaded into the wrong place is noticed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from nodegraph.nodes._shipped_configs import CONFIGS_DIR


def random_components(folder: str, dtype: torch.dtype = torch.float16, seed: int = 0) -> dict:
    """The UNet, VAE and text encoder(s) of a shipped config folder, with random weights in ``dtype``."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = CONFIGS_DIR / folder
    config = lambda name: json.loads((root / name / "config.json").read_text())  # noqa: E731
    with init_empty_weights():
        components = {"unet": UNet2DConditionModel.from_config(config("unet")),
                      "vae": AutoencoderKL.from_config(config("vae")), "text_encoder": None, "text_encoder_2": None}
        if (root / "text_encoder").is_dir():
            components["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(str(root / "text_encoder")))
        if (root / "text_encoder_2").is_dir():
            components["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(str(root / "text_encoder_2")))
    generator = torch.Generator().manual_seed(seed)
    for module in components.values():
        if module is None:
            continue
        module.to_empty(device="cpu").to(dtype)
        with torch.no_grad():
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.is_floating_point():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(dtype) * 0.02)
        module.eval()
    return components


def sd15_file(path: Path, other_saver: bool = False) -> tuple[Path, dict]:
    """SD 1.5 in the LDM layout. ``other_saver``: as an A1111/LDM trainer writes it: keys in another order, the
    text encoder's int64 ``position_ids``, EMA bookkeeping scalars, the noise schedule, and its own metadata."""
    from safetensors.torch import save_file

    from tests.tiny_models import to_original_layout

    components = random_components("sd1")
    state = to_original_layout(components)
    metadata = None
    if other_saver:
        state = dict(reversed(list(state.items())))
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
        state["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)
        metadata = {"format": "pt", "modelspec.architecture": "stable-diffusion-v1"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return Path(path), components


def sd15_inpaint_file(path: Path) -> tuple[Path, dict]:
    """SD 1.5 inpainting (a 9-channel UNet) in the LDM layout."""
    from safetensors.torch import save_file

    from tests.tiny_models import to_original_layout

    components = random_components("sd1-inpainting", seed=1)
    save_file({k: v.contiguous() for k, v in to_original_layout(components).items()}, str(path))
    return Path(path), components


def sd15_controlnet_folder(folder: Path, seed: int = 2) -> Path:
    """A ControlNet shaped like SD 1.5's (4-channel latents, as control_v11p_sd15_inpaint), random float16 weights,
    saved as a diffusers folder."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet_config = json.loads((CONFIGS_DIR / "sd1" / "unet" / "config.json").read_text())
    with init_empty_weights():
        controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_config(unet_config),
                                               load_weights_from_unet=False)
    controlnet.to_empty(device="cpu").to(torch.float16)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (*controlnet.parameters(), *controlnet.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator).to(torch.float16) * 0.02)
    controlnet.save_pretrained(str(folder))
    return Path(folder)


def sdxl_file(path: Path) -> tuple[Path, dict]:
    """SDXL base in the SGM layout."""
    from safetensors.torch import save_file

    from tests.tiny_sdxl import to_sgm_layout

    components = random_components("sdxl")
    save_file({k: v.contiguous() for k, v in to_sgm_layout(components).items()}, str(path))
    return Path(path), components
