"""The diffusers config folders shipped in ``nodes/configs/``: configs and tokenizer settings, no weights, one
folder per Stable Diffusion model, so a single-file checkpoint (original LDM / SGM layout) loads with no
config folder of its own and no network. ``configs/README.md`` lists where every value comes from.

The CLIP BPE files (``vocab.json``, ``merges.txt``, identical for every family) are shipped once, in
``configs/clip_tokenizer/``; the ``tokenizer/`` and ``tokenizer_2/`` folders of the families hold only their
``tokenizer_config.json`` and ``special_tokens_map.json`` (the pad token differs: ``<|endoftext|>`` for
CLIP ViT-L, ``!`` for OpenCLIP). Load them with :func:`load_clip_tokenizer`, never with a bare
``CLIPTokenizer.from_pretrained(folder, subfolder=...)``: transformers 5 builds a 3-token tokenizer without a
word of warning from a folder that has no ``vocab.json``. For diffusers' ``from_single_file(path,
config=folder)`` pass the tokenizers in (``tokenizer=``, ``tokenizer_2=``), for the same reason.
"""
from __future__ import annotations

from pathlib import Path

from nodegraph.errors import NodeError

from ._families import FAMILIES

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
CLIP_TOKENIZER_DIR = CONFIGS_DIR / "clip_tokenizer"
CLIP_VOCAB_SIZE = 49408  # 48,894 merges + 512 byte symbols + <|startoftext|> (49406) and <|endoftext|> (49407)

# The hub repo whose published configs each folder carries.
SHIPPED_REPOS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd1-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sd2-base": "stabilityai/stable-diffusion-2-1-base",
    "sd2-inpainting": "stabilityai/stable-diffusion-2-inpainting",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-inpainting": "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
    "sdxl-refiner": "stabilityai/stable-diffusion-xl-refiner-1.0",
}

# (family name, 9-channel inpainting UNet) -> folder, as each family in nodes/_families.py names it
SHIPPED_CONFIGS = {(f.name, inpainting): f.shipped_configs(inpainting) for f in FAMILIES for inpainting in (False, True)
                   if f.shipped_configs(inpainting)}


def shipped_config_dir(family: str, inpainting: bool = False, *, v_prediction: bool = True) -> Path | None:
    """The shipped config folder for a detected family, or None when none is shipped (an inpainting refiner).

    ``v_prediction`` only matters for SD 2.x text-to-image, whose 768-v and 512-base checkpoints have the same
    tensors: True (diffusers' choice for every SD 2.x single file) gives ``sd2`` (2.1 768-v), False gives
    ``sd2-base`` (2.1 512, epsilon). SD 2 inpainting is always epsilon."""
    name = SHIPPED_CONFIGS.get((family, bool(inpainting)))
    if name == "sd2" and not v_prediction:
        name = "sd2-base"
    return CONFIGS_DIR / name if name else None


def load_clip_tokenizer(config_dir: str | Path, subfolder: str = "tokenizer", **kwargs):
    """The ``CLIPTokenizer`` of ``config_dir/subfolder``: its own settings (pad token, max length), the vocabulary
    from the folder when it has one (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``), else the shared
    ``clip_tokenizer/`` BPE files. Works for any diffusers folder, shipped or not. Raises NodeError unless the
    result has CLIP's 49,408 tokens (a folder without BPE files otherwise gives a useless tokenizer)."""
    from transformers import CLIPTokenizer

    folder = Path(config_dir) / subfolder
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "vocab.json").is_file():
        raise NodeError(f"{folder} is not a tokenizer folder (no tokenizer_config.json or vocab.json)")
    shared = not (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file()
    if shared:
        kwargs.setdefault("vocab_file", str(CLIP_TOKENIZER_DIR / "vocab.json"))
        kwargs.setdefault("merges_file", str(CLIP_TOKENIZER_DIR / "merges.txt"))
    tokenizer = CLIPTokenizer.from_pretrained(str(config_dir), subfolder=subfolder, local_files_only=True, **kwargs)
    if shared and len(tokenizer) != CLIP_VOCAB_SIZE:  # a folder's own (small, test) vocabulary is its business
        raise NodeError(f"the tokenizer in {folder} has {len(tokenizer)} tokens, not CLIP's {CLIP_VOCAB_SIZE}: its "
                        "vocab.json / merges.txt are missing or not CLIP's")
    return tokenizer
