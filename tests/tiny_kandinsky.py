"""Tiny randomly initialised Kandinsky 2.2 components, built offline for tests and benchmarks.

Built with the configs diffusers' own tests use (tests/pipelines/kandinsky2_2/test_kandinsky_prior.py,
test_kandinsky.py, test_kandinsky_inpaint.py): a PriorTransformer of 32-wide embeddings, CLIP text and
vision encoders with projection, a UNet with ``addition_embed_type="image"`` that predicts mean and variance
(8 output channels), and a two-block MoVQ (``VQModel``, spatial norm, spatial factor 2). The CLIP tokenizer
is made here from a small byte-level vocabulary (``tests.tiny_models.write_tokenizer``) instead of being
fetched; the text encoder's vocabulary and special ids follow it. Three diffusers folders are written:
``prior/`` (prior, text_encoder, tokenizer, image_encoder, image_processor, scheduler), ``decoder/`` and
``decoder_inpaint/`` (unet, movq, scheduler), the layouts of the kandinsky-community repos.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.tiny_models import vocab_size, write_tokenizer

WIDTH = 32  # text_embedder_hidden_size in diffusers' tests: the image embedding's width

# the decoder scheduler diffusers' tests use (the published decoders ship a DDPMScheduler config)
DECODER_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                         thresholding=False)
PRIOR_SCHEDULER = dict(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                       clip_sample=True, clip_sample_range=10.0)

UNET = dict(out_channels=8, addition_embed_type="image",
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
            encoder_hid_dim=WIDTH, encoder_hid_dim_type="image_proj", cross_attention_dim=32, attention_head_dim=4,
            resnet_time_scale_shift="scale_shift", class_embed_type=None)

MOVQ = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
            in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
            num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
            vq_embed_dim=4)


def prior_components() -> dict:
    from diffusers import PriorTransformer, UnCLIPScheduler
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    torch.manual_seed(0)
    eos = vocab_size() - 1
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos, hidden_size=WIDTH, projection_dim=WIDTH,
        intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
        vocab_size=vocab_size()))
    torch.manual_seed(0)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=WIDTH, num_layers=1)
    # zero clip_std would make post_process_latents return zeros (diffusers' tests set it to one too)
    prior.clip_std = torch.nn.Parameter(torch.ones(prior.clip_std.shape))
    torch.manual_seed(0)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=WIDTH, image_size=224, projection_dim=WIDTH, intermediate_size=37, num_attention_heads=4,
        num_channels=3, num_hidden_layers=5, patch_size=14))
    image_processor = CLIPImageProcessor(crop_size=224, do_center_crop=True, do_normalize=True, do_resize=True,
                                         image_mean=[0.48145466, 0.4578275, 0.40821073],
                                         image_std=[0.26862954, 0.26130258, 0.27577711], resample=3, size=224)
    return {"prior": prior.eval(), "text_encoder": text_encoder.eval(), "image_encoder": image_encoder.eval(),
            "image_processor": image_processor, "scheduler": UnCLIPScheduler(**PRIOR_SCHEDULER)}


def decoder_components(in_channels: int = 4) -> dict:
    from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=in_channels, **UNET)
    torch.manual_seed(0)
    movq = VQModel(**MOVQ)
    return {"unet": unet.eval(), "movq": movq.eval(), "scheduler": DDIMScheduler(**DECODER_SCHEDULER)}


def _save(folder: Path, components: dict, index: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in components.items():
        if hasattr(module, "save_pretrained") and not hasattr(module, "set_timesteps"):
            module.save_pretrained(str(folder / name), **({} if name == "image_processor" else
                                                         {"safe_serialization": True}))
        else:  # a scheduler
            module.save_config(str(folder / name))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def write_prior(folder: Path, with_image_encoder: bool = True) -> Path:
    components = prior_components()
    index = {"_class_name": "KandinskyV22PriorPipeline", "prior": ["diffusers", "PriorTransformer"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "UnCLIPScheduler"],
             "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
             "image_processor": ["transformers", "CLIPImageProcessor"]}
    if not with_image_encoder:
        components.pop("image_encoder")
        index.pop("image_encoder")
    _save(folder, components, index)
    write_tokenizer(folder / "tokenizer")
    return folder


def write_decoder(folder: Path, in_channels: int = 4) -> Path:
    kind = "KandinskyV22InpaintPipeline" if in_channels == 9 else "KandinskyV22Pipeline"
    index = {"_class_name": kind, "unet": ["diffusers", "UNet2DConditionModel"], "movq": ["diffusers", "VQModel"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    return _save(folder, decoder_components(in_channels), index)


@dataclass
class TinyKandinsky:
    root: Path
    prior: Path
    decoder: Path
    decoder_inpaint: Path
    prior_without_image_encoder: Path


_BUILT: TinyKandinsky | None = None
_LOCK = threading.Lock()


def build_tiny_kandinsky(root: Path | None = None) -> TinyKandinsky:
    """The tiny Kandinsky 2.2 folders, built once per process (in a temporary folder unless ``root`` is given)."""
    global _BUILT
    with _LOCK:
        if _BUILT is not None and root is None:
            return _BUILT
        base = Path(root) if root else Path(tempfile.mkdtemp(prefix="tiny-kandinsky-"))
        built = TinyKandinsky(base, write_prior(base / "prior"), write_decoder(base / "decoder"),
                              write_decoder(base / "decoder_inpaint", 9),
                              write_prior(base / "prior_no_image_encoder", with_image_encoder=False))
        if root is None:
            _BUILT = built
        return built


def remove(built: TinyKandinsky) -> None:
    shutil.rmtree(built.root, ignore_errors=True)
