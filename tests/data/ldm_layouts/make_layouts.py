"""Regenerates the <name>.json.gz files here: key -> shape of a full original-layout checkpoint (UNet, VAE,
text encoders), from the reference implementations built on the meta device with the official inference yaml.
Not part of the tests; it needs what the tests do not (run it by hand in a separate environment):

    pip install torch open_clip_torch einops omegaconf transformers
    python make_layouts.py sd1 <runwayml/stable-diffusion checkout> configs/stable-diffusion/v1-inference.yaml sd1.json.gz
    python make_layouts.py sd2 <Stability-AI/stablediffusion checkout> configs/stable-diffusion/v2-inference-v.yaml sd2.json.gz
    python make_layouts.py sdxl <Stability-AI/generative-models checkout> configs/inference/sd_xl_base.yaml sdxl.json.gz
    python make_layouts.py sdxl-refiner <Stability-AI/generative-models checkout> configs/inference/sd_xl_refiner.yaml sdxl-refiner.json.gz
"""
import gzip
import json
import math
import os
import sys
import types

import torch
from omegaconf import OmegaConf

name, src, yaml_path, out = sys.argv[1:5]
sys.path.insert(0, src)
for pkg in ("sgm", "sgm.modules", "sgm.modules.diffusionmodules"):  # skip the package __init__s (training imports)
    if os.path.isdir(os.path.join(src, *pkg.split("."))):
        module = types.ModuleType(pkg)
        module.__path__ = [os.path.join(src, *pkg.split("."))]
        sys.modules[pkg] = module
cfg = OmegaConf.load(os.path.join(src, yaml_path)).model.params
shapes = {}


def add(prefix, module):
    for key, value in module.state_dict().items():
        shapes[prefix + key] = list(value.shape)


def add_clip_l(prefix, module):
    # the checkpoints were saved from transformers 4's CLIPTextModel, which nests everything under text_model.
    for key, value in module.state_dict().items():
        shapes[prefix + ("" if key.startswith("text_model.") else "text_model.") + key] = list(value.shape)


def instantiate(target, params):
    module, cls = target.rsplit(".", 1)
    return getattr(__import__(module, fromlist=[cls]), cls)(**params)


def clip_l():  # FrozenCLIPEmbedder: transformers' CLIPTextModel of openai/clip-vit-large-patch14
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"))


def open_clip_text(arch):  # FrozenOpenCLIPEmbedder(2): the open_clip model with its visual tower deleted
    import open_clip

    model = open_clip.create_model(arch, pretrained=None, device="meta")
    del model.visual
    return model


with torch.device("meta"):
    unet_cfg = cfg.get("unet_config") or cfg.get("network_config")
    params = OmegaConf.to_container(unet_cfg.params)
    params["use_checkpoint"] = False
    params.pop("spatial_transformer_attn_type", None)  # xformers or not: no weights
    add("model.diffusion_model.", instantiate(unet_cfg.target, params))

    if os.path.isdir(os.path.join(src, "sgm")):
        from sgm.modules.diffusionmodules.model import Decoder, Encoder
    else:
        from ldm.modules.diffusionmodules.model import Decoder, Encoder
    ddconfig = OmegaConf.to_container(cfg.first_stage_config.params.ddconfig)
    embed_dim = cfg.first_stage_config.params.embed_dim
    add("first_stage_model.encoder.", Encoder(**ddconfig))
    add("first_stage_model.decoder.", Decoder(**ddconfig))
    z = ddconfig["z_channels"]
    add("first_stage_model.quant_conv.", torch.nn.Conv2d(2 * z, 2 * embed_dim, 1))
    add("first_stage_model.post_quant_conv.", torch.nn.Conv2d(embed_dim, z, 1))

    if "cond_stage_config" in cfg:
        if cfg.cond_stage_config.target.endswith("FrozenCLIPEmbedder"):
            add_clip_l("cond_stage_model.transformer.", clip_l())
        else:  # FrozenOpenCLIPEmbedder, whose default arch is ViT-H-14
            add("cond_stage_model.model.", open_clip_text(cfg.cond_stage_config.params.get("arch", "ViT-H-14")))
    else:
        index = 0
        for embedder in cfg.conditioner_config.params.emb_models:
            kind = embedder.target.rsplit(".", 1)[1]
            if kind == "FrozenCLIPEmbedder":
                add_clip_l(f"conditioner.embedders.{index}.transformer.", clip_l())
            elif kind == "FrozenOpenCLIPEmbedder2":
                add(f"conditioner.embedders.{index}.model.", open_clip_text(embedder.params.arch))
            else:
                continue  # size / crop / aesthetic-score embedders hold no weights
            index += 1

# position_ids: a buffer old transformers saved and new ones do not; diffusers' converters skip it either way
shapes = {k: v for k, v in sorted(shapes.items()) if not k.endswith("position_ids")}
print(name, len(shapes), "tensors,", sum(math.prod(s) for s in shapes.values()), "numbers")
with open(out, "wb") as f:  # mtime 0: the same input gives the same bytes
    f.write(gzip.compress(json.dumps(shapes, separators=(",", ":")).encode(), mtime=0))
