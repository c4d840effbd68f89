"""Model families as objects: each kind of checkpoint says what it is and how it is told apart.

A family owns its names, which text encoders it has, how it is recognised in a single file (by
tensor names) and in a diffusers folder (by configs), where its configs come from, and the
conditioning its UNet takes besides the prompt embeddings (SDXL's pooled embedding and time ids).
The loaders, encoders and samplers ask the family instead of testing family names, so a new
family is one more entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nodegraph.errors import NodeError

# the single-file key whose shape gives the UNet's input channels (4, or 9 for inpainting)
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass(frozen=True)
class Family:
    name: str  # stable identifier: "sd1", "sd2", "sdxl", "sdxl_refiner"
    title: str  # "Stable Diffusion 1.x"
    label: str  # "SD 1.x"
    encoders: tuple[str, ...]  # text encoder subfolders, in diffusers' order
    in_file: Callable[[set[str]], bool]  # whether a single file's tensor names are this family's
    configs: tuple[str | None, str | None]  # shipped config folders (nodes/configs/): (normal, inpainting)
    text_time: bool = False  # SDXL: the UNet also takes the pooled text embedding and micro-conditioning time ids
    time_ids: int = 0  # 6 (original size, crop, target size) or 5 (original size, crop, aesthetic score)
    # Where a CONDITIONING's embeddings go: None, the UNet's encoder_hidden_states (cross-attention on the prompt);
    # a name, that key of added_cond_kwargs, with no encoder_hidden_states (Kandinsky 2.2's "image_embeds")
    embeds_as: str | None = None
    space: str = "Stable Diffusion"  # the latent space its VAE makes (SD 1.x/2.x and SDXL's VAEs share one)
    scaled_latents: bool = True  # latents are multiplied by the VAE's scaling_factor (MoVQ latents are not)
    # an inpainting UNet's extra input channels after the latents, in order: "mask" (1 = repaint), "keep_mask"
    # (1 = keep, Kandinsky 2.2's), "masked_image" (the masked image's latents)
    inpaint_channels: tuple[str, str] = ("mask", "masked_image")
    # Kandinsky 2.2's inpainting: the image is masked in latent space (latents * keep) and the latent mask's
    # repaint area grows by one latent pixel (diffusers' prepare_mask); SD masks the pixels before the encode
    latent_space_masking: bool = False

    def label_for(self, inpainting: bool) -> str:
        """Short name of a checkpoint kind: "SD 1.x", "SDXL", "SDXL inpainting", ..."""
        return self.label + (" inpainting" if inpainting else "")

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return tuple(e.replace("text_encoder", "tokenizer") for e in self.encoders)

    def shipped_configs(self, inpainting: bool) -> str | None:
        """The name of the config folder shipped for this family in nodes/configs/ (None: none is)."""
        return self.configs[1 if inpainting else 0]

    def upcast_vae_draws(self) -> bool:
        """Whether diffusers' pipelines draw VAE samples in float32 (the SDXL pipelines upcast the VAE)."""
        return self.text_time


def _has(prefix: str) -> Callable[[set[str]], bool]:
    return lambda keys: any(k.startswith(prefix) for k in keys)


SD1 = Family("sd1", "Stable Diffusion 1.x", "SD 1.x", ("text_encoder",), _has("cond_stage_model.transformer."),
             ("sd1", "sd1-inpainting"))
SD2 = Family("sd2", "Stable Diffusion 2.x", "SD 2.x", ("text_encoder",),
             lambda keys: "cond_stage_model.model.token_embedding.weight" in keys,
             ("sd2", "sd2-inpainting"))
SDXL = Family("sdxl", "Stable Diffusion XL", "SDXL", ("text_encoder", "text_encoder_2"),
              _has("conditioner.embedders.1.model."),
              ("sdxl", "sdxl-inpainting"),
              text_time=True, time_ids=6)
SDXL_REFINER = Family("sdxl_refiner", "Stable Diffusion XL refiner", "SDXL refiner", ("text_encoder_2",),
                      _has("conditioner.embedders.0.model."), ("sdxl-refiner", None),
                      text_time=True, time_ids=5)

# Kandinsky 2.2: a prior turns text (or images) into CLIP image embeddings, which condition the decoder UNet
# through added_cond_kwargs; the decoder's latents are MoVQ's, unscaled. Diffusers folders only (no single file).
KANDINSKY22 = Family("kandinsky22", "Kandinsky 2.2", "Kandinsky 2.2", (), lambda keys: False, (None, None),
                     embeds_as="image_embeds", space="Kandinsky 2.2 MoVQ", scaled_latents=False,
                     inpaint_channels=("masked_image", "keep_mask"), latent_space_masking=True)

# in the order single files are tested: an SDXL base file also has conditioner.embedders.0.* keys
FAMILIES: tuple[Family, ...] = (SDXL, SDXL_REFINER, SD2, SD1)
_BY_NAME = {f.name: f for f in (*FAMILIES, KANDINSKY22)}
FAMILY_NAMES = tuple(_BY_NAME)


def family(name: str) -> Family:
    """The family called ``name`` (its ``name`` attribute)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise NodeError(f"unknown model family '{name}'; known: {', '.join(_BY_NAME)}") from None


def family_of_file(keys: set[str], file_name: str) -> Family:
    """The family of a single-file checkpoint from its tensor names (original LDM / SGM layouts)."""
    if UNET_IN not in keys:
        raise NodeError(f"{file_name} is not a Stable Diffusion 1.x/2.x/XL single-file checkpoint (no "
                        "model.diffusion_model.* UNet weights); give a full checkpoint or a diffusers folder")
    found = next((f for f in FAMILIES if f.in_file(keys)), None)
    if found is None:
        raise NodeError(f"{file_name} has no text encoder weights (cond_stage_model.*, conditioner.*); it is not a "
                        "full Stable Diffusion checkpoint")
    if found is SDXL_REFINER and "model.diffusion_model.label_emb.0.0.weight" not in keys:
        # OpenCLIP under conditioner.embedders.0 without SDXL's added embedding: SD 2.x saved in the SGM layout
        raise NodeError(f"{file_name} is an SD 2.x checkpoint saved in the SGM layout (conditioner.embedders.0.model.*),"
                        " which is not supported; save it in the original layout (cond_stage_model.*)")
    if found is SDXL and not _has("conditioner.embedders.0.transformer.")(keys):
        raise NodeError(f"{file_name} looks like SDXL but lacks the first text encoder "
                        "(conditioner.embedders.0.transformer.*); it is not a full SDXL checkpoint")
    return found


SD_SPACE = "Stable Diffusion"


def space_mismatch(given: str | None, wanted: str, what: str) -> str | None:
    """The message for a latent of space ``given`` where ``wanted`` is needed (None: they match, or the latent is
    empty and fits any). ``what`` names where the latent goes ("the model", "this VAE")."""
    if given is None or given == wanted:
        return None
    return (f"the latent is in the {given} latent space but {what} works in the {wanted} latent space: decode to "
            "pixels and re-encode with the matching VAE")


def takes_image_embeds(unet) -> bool:
    """Whether a UNet is conditioned on image embeddings instead of text (``addition_embed_type="image"``)."""
    return getattr(unet.config, "addition_embed_type", None) == "image"


def time_id_count(unet_config: dict, pooled_dim: int) -> int:
    """How many micro-conditioning numbers a text_time UNet's added embedding takes (6 or 5), from its config."""
    per_id = int(unet_config.get("addition_time_embed_dim") or 0)
    total = int(unet_config.get("projection_class_embeddings_input_dim") or 0)
    if per_id <= 0 or (total - pooled_dim) % per_id:
        return 0
    return (total - pooled_dim) // per_id


def family_of_configs(unet_config: dict, encoders: dict[str, dict], where: str) -> Family:
    """The family of a diffusers folder from its UNet config and its text encoders' configs (by subfolder);
    mismatches between the encoders and the UNet are reported here, before any weights load."""
    kind = unet_config.get("addition_embed_type")
    if kind not in (None, "text_time"):
        raise NodeError(f"{where}: UNet addition_embed_type '{kind}' is not a Stable Diffusion 1.x/2.x/XL model")
    if kind is None:
        # SD 2.x's OpenCLIP encoder is 1024 wide; tiny test models and unusual widths are SD 1.x layout
        return SD2 if unet_config.get("cross_attention_dim") == 1024 else SD1
    second = encoders.get("text_encoder_2")
    if second is None:
        raise NodeError(f"{where} has a {SDXL.title} UNet (added text/time conditioning) but no "
                        "text_encoder_2/config.json; an SDXL checkpoint needs its second text encoder "
                        "(CLIPTextModelWithProjection)")
    first = encoders.get("text_encoder")
    found = SDXL if first is not None else SDXL_REFINER
    width = int(second.get("hidden_size", 0)) + (int(first.get("hidden_size", 0)) if first else 0)
    cross = unet_config.get("cross_attention_dim")
    if cross != width:
        parts = (f"text_encoder ({first.get('hidden_size')}) + text_encoder_2 ({second.get('hidden_size')})" if first
                 else f"text_encoder_2 ({second.get('hidden_size')})")
        raise NodeError(f"{where}: the UNet's cross_attention_dim is {cross} but {parts} give {width}; the text "
                        "encoders do not belong to this UNet")
    count = time_id_count(unet_config, int(second.get("projection_dim", 0)))
    if count not in (5, 6):
        raise NodeError(f"{where}: the UNet's added embedding takes {unet_config.get('projection_class_embeddings_input_dim')}"
                        f" inputs, which is not 6 (or 5 for a refiner) time ids of {unet_config.get('addition_time_embed_dim')}"
                        f" plus the pooled text embedding of {second.get('projection_dim')}; the config is inconsistent")
    if found is SDXL_REFINER and count != found.time_ids:
        raise NodeError(f"{where} has no text_encoder/ (like the SDXL refiner) but its UNet takes {count} time ids, "
                        "not the refiner's 5; the folder is incomplete")
    return found


def takes_text_time(unet) -> bool:
    """Whether a UNet takes SDXL's pooled text embedding and time ids (``addition_embed_type="text_time"``)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def micro_conditioning(unet_config, pooled_dim: int, pixel_size: tuple[int, int] | None, size: dict,
                       negative_size: dict | None):
    """SDXL's added time ids, (positive, negative) tensors of (1, 5 or 6): diffusers' ``_get_add_time_ids``.

    Defaults as in the pipelines: original and target size = the sampled (height, width), crop (0, 0),
    aesthetic score 6.0 / 2.5. Unset negative values follow the positive ones (the refiner's negative crop
    defaults to (0, 0), as there)."""
    if pixel_size is None:
        raise NodeError("SDXL needs the sampled image size for its time ids")
    import torch

    config = dict(unet_config)
    count = time_id_count(config, pooled_dim)
    if count not in (SDXL.time_ids, SDXL_REFINER.time_ids):
        raise NodeError(f"the model's added embedding takes {config.get('projection_class_embeddings_input_dim')} "
                        f"inputs, which does not fit time ids of {config.get('addition_time_embed_dim')} plus the "
                        f"pooled embedding of {pooled_dim}: the conditioning does not come from this checkpoint's clip")
    neg = negative_size or {}
    original = tuple(size.get("original_size") or pixel_size)
    crop = tuple(size.get("crop") or (0, 0))
    neg_original = tuple(neg.get("original_size") or original)
    if count == SDXL.time_ids:
        target = tuple(size.get("target_size") or pixel_size)
        ids = original + crop + target
        neg_ids = neg_original + tuple(neg.get("crop") or crop) + tuple(neg.get("target_size") or target)
    else:
        ids = original + crop + (float(size.get("aesthetic_score", 6.0)),)
        neg_ids = neg_original + tuple(neg.get("crop") or (0, 0)) + (float(neg.get("aesthetic_score", 2.5)),)
    return torch.tensor([ids], dtype=torch.float32), torch.tensor([neg_ids], dtype=torch.float32)
