"""A tiny random ControlNet shaped like a tiny UNet, for tests and benchmarks."""
from __future__ import annotations

import torch


def random_controlnet(unet, seed):
    """A ControlNet shaped like ``unet`` (4 latent channels) whose zero convolutions are random."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    if cn.config.in_channels != unet.config.out_channels:  # an inpainting UNet's ControlNet still sees 4 channels
        cn = ControlNetModel.from_config({**cn.config, "in_channels": unet.config.out_channels})
    zero_initialised = [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for layer in zero_initialised:
            for p in layer.parameters():
                p.normal_(0, 0.2)
    return cn
