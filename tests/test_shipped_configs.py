"""The diffusers config folders shipped in nodes/configs/ (nodes/_shipped_configs.py), which single-file
checkpoints load with when they bring no config folder: every component builds from them with the published
parameter count, the tokenizers give CLIP's ids, the original single-file layouts convert into them tensor for
tensor through diffusers' own converters, the loader accepts each for a matching file, and the wheel carries
them. Cheap: models are built on the meta device (no weights, no memory), nothing is downloaded."""
import gzip
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nodegraph.nodes._shipped_configs import (CLIP_TOKENIZER_DIR, CLIP_VOCAB_SIZE, CONFIGS_DIR, SHIPPED_CONFIGS,
                                              SHIPPED_REPOS, load_clip_tokenizer, shipped_config_dir)

from .conftest import REPO

LAYOUTS = Path(__file__).parent / "data" / "ldm_layouts"

# Parameter counts. Each one is also what the reference implementation of the original model gives
# (tests/data/ldm_layouts/README.md: ldm / sgm / open_clip built from the official yaml), and
# test_original_layouts_convert_into_the_shipped_configs checks the configs against those layouts tensor by tensor.
UNET_SD1 = 859_520_964  # diffusers' own ModelMixin.num_parameters docstring (stable-diffusion-v1-5 unet)
UNET_SD2 = 865_910_724  # ldm UNetModel of Stability-AI/stablediffusion, v2-inference(-v).yaml
UNET_SDXL = 2_567_463_684  # sgm UNetModel, sd_xl_base.yaml; the 1680 UNet tensors of sd_xl_base_1.0.safetensors
UNET_REFINER = 2_259_526_660  # sgm UNetModel, sd_xl_refiner.yaml (1220 tensors)
INPAINT_EXTRA = 5 * 320 * 3 * 3  # conv_in reads 9 channels instead of 4: mask + masked-image latents
VAE = 83_653_863  # ldm / sgm Encoder + Decoder + quant convs, the same in every yaml above (248 tensors)
CLIP_L = 123_060_480  # CLIP ViT-L/14 text model (196 tensors); SD 1.5 total 859,520,964 + 83,653,863 + this
# open_clip ViT-H-14 text tower (354,032,641) less the 24th layer (12,596,224), text_projection (1,048,576) and
# logit_scale (1): diffusers' SD 2 text encoder is the 23-layer CLIPTextModel (SD 2 reads the penultimate layer)
OPENCLIP_H_SD2 = 340_387_840
OPENCLIP_BIGG = 694_659_840  # open_clip ViT-bigG-14 text tower with text_projection (694,659,841 less logit_scale)

SD = dict(scheduler_kind="epsilon", force_upcast=None, scaling_factor=None)
FOLDERS = {
    "sd1": dict(SD, unet=UNET_SD1, text_encoder=CLIP_L, scheduler="PNDMScheduler", in_channels=4, cross=768,
                layout="sd1", diffusers_type="v1", family="sd1"),
    "sd1-inpainting": dict(SD, unet=UNET_SD1 + INPAINT_EXTRA, text_encoder=CLIP_L, scheduler="DDIMScheduler",
                           in_channels=9, cross=768, layout="sd1", diffusers_type="inpainting", family="sd1"),
    "sd2": dict(SD, unet=UNET_SD2, text_encoder=OPENCLIP_H_SD2, scheduler="DDIMScheduler", in_channels=4,
                cross=1024, layout="sd2", diffusers_type="v2", family="sd2", scheduler_kind="v_prediction"),
    "sd2-base": dict(SD, unet=UNET_SD2, text_encoder=OPENCLIP_H_SD2, scheduler="PNDMScheduler", in_channels=4,
                     cross=1024, layout="sd2", diffusers_type="v2", family="sd2"),
    "sd2-inpainting": dict(SD, unet=UNET_SD2 + INPAINT_EXTRA, text_encoder=OPENCLIP_H_SD2,
                           scheduler="PNDMScheduler", in_channels=9, cross=1024, layout="sd2",
                           diffusers_type="inpainting_v2", family="sd2"),
    "sdxl": dict(unet=UNET_SDXL, text_encoder=CLIP_L, text_encoder_2=OPENCLIP_BIGG,
                 scheduler="EulerDiscreteScheduler", scheduler_kind="epsilon", in_channels=4, cross=2048,
                 time_ids=6, force_zeros=True, force_upcast=True, scaling_factor=0.13025, layout="sdxl",
                 diffusers_type="xl_base", family="sdxl"),
    # its repo ships the fp16-fix VAE, which needs no float32 upcast
    "sdxl-inpainting": dict(unet=UNET_SDXL + INPAINT_EXTRA, text_encoder=CLIP_L, text_encoder_2=OPENCLIP_BIGG,
                            scheduler="EulerDiscreteScheduler", scheduler_kind="epsilon", in_channels=9,
                            cross=2048, time_ids=6, force_zeros=True, force_upcast=True, scaling_factor=0.13025,
                            layout="sdxl", diffusers_type="xl_inpaint", family="sdxl"),
    "sdxl-refiner": dict(unet=UNET_REFINER, text_encoder_2=OPENCLIP_BIGG, scheduler="EulerDiscreteScheduler",
                         scheduler_kind="epsilon", in_channels=4, cross=1280, time_ids=5, force_zeros=False,
                         force_upcast=True, scaling_factor=0.13025, layout="sdxl-refiner",
                         diffusers_type="xl_refiner", family="sdxl_refiner"),
}
ENCODERS = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}


def _index(folder: str) -> dict:
    return json.loads((CONFIGS_DIR / folder / "model_index.json").read_text())


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_unet_vae(folder: str):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config = UNet2DConditionModel.load_config(CONFIGS_DIR / folder, subfolder="unet")
    vae_config = AutoencoderKL.load_config(CONFIGS_DIR / folder, subfolder="vae")
    with init_empty_weights():
        return (UNet2DConditionModel.from_config(unet_config), unet_config,
                AutoencoderKL.from_config(vae_config), vae_config)


def _meta_text_encoder(folder: str, name: str):
    import torch
    import transformers

    config = transformers.CLIPTextConfig.from_pretrained(CONFIGS_DIR / folder / name)
    with torch.device("meta"):
        return getattr(transformers, ENCODERS[name])(config)


def test_every_family_has_a_folder_and_it_is_the_repo_diffusers_would_fetch():
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

    shipped = sorted(p.name for p in CONFIGS_DIR.iterdir() if (p / "model_index.json").is_file())
    assert shipped == sorted(FOLDERS) == sorted(SHIPPED_REPOS)
    for folder, facts in FOLDERS.items():
        if folder != "sd2-base":  # diffusers sends every SD 2.x text-to-image file to the 768-v repo
            repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[facts["diffusers_type"]]["pretrained_model_name_or_path"]
            assert repo == SHIPPED_REPOS[folder]
    for (family, inpainting), folder in SHIPPED_CONFIGS.items():
        assert FOLDERS[folder]["family"] == family and (FOLDERS[folder]["in_channels"] == 9) == inpainting
        assert shipped_config_dir(family, inpainting) == CONFIGS_DIR / folder
    assert shipped_config_dir("sd2", v_prediction=False) == CONFIGS_DIR / "sd2-base"
    assert shipped_config_dir("sd2", True, v_prediction=False) == CONFIGS_DIR / "sd2-inpainting"
    assert shipped_config_dir("sdxl_refiner", True) is None


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_each_folder_holds_every_config_its_model_index_names_and_no_weights(folder):
    root = CONFIGS_DIR / folder
    files = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json", "text_encoder_2":
             "config.json", "scheduler": "scheduler_config.json", "feature_extractor": "preprocessor_config.json",
             "tokenizer": "tokenizer_config.json", "tokenizer_2": "tokenizer_config.json"}
    for name, value in _index(folder).items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        if value[0] is None or name == "safety_checker":  # optional, and its weights are another model
            assert not (root / name).exists(), name
            continue
        assert (root / name / files[name]).is_file(), f"{folder}/{name}"
        if name.startswith("tokenizer"):
            assert (root / name / "special_tokens_map.json").is_file()
    assert not [p for p in root.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth")]
    for path in root.rglob("*.json"):
        json.loads(path.read_text())  # every file parses


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_every_component_builds_with_the_published_parameter_count(folder):
    import diffusers
    from diffusers import DiffusionPipeline

    facts, index = FOLDERS[folder], _index(folder)
    unet, unet_config, vae, vae_config = _meta_unet_vae(folder)
    assert _count(unet) == facts["unet"]
    assert _count(vae) == VAE
    assert unet_config["in_channels"] == facts["in_channels"] and unet_config["cross_attention_dim"] == facts["cross"]
    assert vae_config.get("force_upcast") == facts["force_upcast"]
    assert vae_config.get("scaling_factor") == facts["scaling_factor"]
    assert vae.config.scaling_factor == (facts["scaling_factor"] or 0.18215)  # diffusers' default: SD 1.x / 2.x

    for name, cls in ENCODERS.items():
        assert (name in facts) == (index.get(name, [None])[0] is not None)
        if name in facts:
            assert index[name] == ["transformers", cls]
            assert _count(_meta_text_encoder(folder, name)) == facts[name]

    library, scheduler_class = index["scheduler"]
    assert (library, scheduler_class) == ("diffusers", facts["scheduler"])
    scheduler_type = getattr(diffusers, scheduler_class)
    scheduler = scheduler_type.from_config(scheduler_type.load_config(CONFIGS_DIR / folder, subfolder="scheduler"))
    assert scheduler.config.prediction_type == facts["scheduler_kind"]
    assert scheduler.config.num_train_timesteps == 1000
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.beta_schedule == "scaled_linear"

    pipeline = getattr(diffusers, index["_class_name"])
    assert issubclass(pipeline, DiffusionPipeline)
    expected, _ = pipeline._get_signature_keys(pipeline)
    assert {k for k, v in index.items() if isinstance(v, list)} <= set(expected)


@pytest.mark.parametrize("folder", [f for f in sorted(FOLDERS) if f.startswith("sdxl")])
def test_sdxl_added_conditioning_and_pipeline_settings(folder):
    facts, index = FOLDERS[folder], _index(folder)
    unet = json.loads((CONFIGS_DIR / folder / "unet" / "config.json").read_text())
    pooled = json.loads((CONFIGS_DIR / folder / "text_encoder_2" / "config.json").read_text())["projection_dim"]
    assert unet["addition_embed_type"] == "text_time" and unet["addition_time_embed_dim"] == 256
    assert unet["projection_class_embeddings_input_dim"] == pooled + facts["time_ids"] * 256
    assert index["force_zeros_for_empty_prompt"] is facts["force_zeros"]
    assert index.get("requires_aesthetics_score", False) is (facts["time_ids"] == 5)


def test_sd2_is_the_openclip_h_text_encoder_and_v_prediction_768():
    for folder in ("sd2", "sd2-base", "sd2-inpainting"):
        encoder = json.loads((CONFIGS_DIR / folder / "text_encoder" / "config.json").read_text())
        assert (encoder["num_hidden_layers"], encoder["hidden_size"], encoder["hidden_act"]) == (23, 1024, "gelu")
        unet = json.loads((CONFIGS_DIR / folder / "unet" / "config.json").read_text())
        assert unet["attention_head_dim"] == [5, 10, 20, 20] and unet["use_linear_projection"] is True
    assert json.loads((CONFIGS_DIR / "sd2" / "unet" / "config.json").read_text())["sample_size"] == 96  # 768 px
    assert json.loads((CONFIGS_DIR / "sd2-base" / "unet" / "config.json").read_text())["sample_size"] == 64


TOKENIZERS = [(folder, name) for folder in sorted(FOLDERS) for name in ("tokenizer", "tokenizer_2")
              if (CONFIGS_DIR / folder / name).is_dir()]


@pytest.mark.parametrize("folder, name", TOKENIZERS)
def test_tokenizers_give_clip_ids(folder, name):
    tokenizer = load_clip_tokenizer(CONFIGS_DIR / folder, name)
    assert len(tokenizer) == CLIP_VOCAB_SIZE and tokenizer.model_max_length == 77
    # OpenAI CLIP's clip/simple_tokenizer.py with its bpe_simple_vocab_16e6.txt.gz gives the ids between BOS and EOS
    ids = tokenizer("a photograph of an astronaut riding a horse").input_ids
    assert ids == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    # apple/ml-stable-diffusion swift/StableDiffusionTests/StableDiffusionTests.swift, testBPETokenizer
    assert tokenizer("a photo of an astronaut riding a horse on mars").input_ids == [
        49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
    # CLIP ViT-L pads with <|endoftext|>; the OpenCLIP encoders (SD 2.x, SDXL's second) with "!" (id 0)
    openclip = folder.startswith("sd2") or name == "tokenizer_2"
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == (("!", 0) if openclip else ("<|endoftext|>", 49407))
    padded = tokenizer("a horse", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[:4] == [49406, 320, 4558, 49407] and set(padded[4:]) == {tokenizer.pad_token_id}


def test_the_tokenizer_files_are_shipped_once_with_their_licence():
    assert sorted(p.name for p in CLIP_TOKENIZER_DIR.iterdir()) == ["LICENSE", "merges.txt", "vocab.json"]
    assert "MIT License" in (CLIP_TOKENIZER_DIR / "LICENSE").read_text() and "OpenAI" in (
        CLIP_TOKENIZER_DIR / "LICENSE").read_text()
    assert len(json.loads((CLIP_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))) == CLIP_VOCAB_SIZE
    merges = (CLIP_TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48_894  # 49,152 - 256 bytes - 2 specials
    assert not [p for p in CONFIGS_DIR.rglob("*") if p.name in ("vocab.json", "merges.txt")
                and p.parent != CLIP_TOKENIZER_DIR]


def test_a_folder_that_is_no_tokenizer_is_refused(tmp_path):
    from nodegraph.errors import NodeError

    with pytest.raises(NodeError, match="not a tokenizer folder"):
        load_clip_tokenizer(tmp_path, "tokenizer_2")


def test_a_tokenizer_folder_with_its_own_vocabulary_keeps_it(tmp_path):
    """A folder saved by transformers (vocab.json + merges.txt, or transformers 5's tokenizer.json) loads as it is."""
    load_clip_tokenizer(CONFIGS_DIR / "sdxl", "tokenizer_2").save_pretrained(tmp_path / "tokenizer_2")
    saved = {p.name for p in (tmp_path / "tokenizer_2").iterdir()}
    assert "vocab.json" in saved or "tokenizer.json" in saved
    tokenizer = load_clip_tokenizer(tmp_path, "tokenizer_2")
    assert tokenizer("a horse").input_ids == [49406, 320, 4558, 49407] and tokenizer.pad_token_id == 0


def _layout(folder: str) -> dict:
    """A meta-device state dict in the original single-file layout of the folder's model."""
    import torch

    shapes = json.loads(gzip.decompress((LAYOUTS / f"{FOLDERS[folder]['layout']}.json.gz").read_bytes()))
    shapes["model.diffusion_model.input_blocks.0.0.weight"][1] = FOLDERS[folder]["in_channels"]
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def _fits(converted: dict, model) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert [k for k in want if want[k] != got[k]] == []


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_original_layouts_convert_into_the_shipped_configs(folder):
    """diffusers' single-file detection and converters (what from_single_file and the loader run) take the original
    checkpoint layout into models built from the folder without a missing, extra or misshapen tensor."""
    from diffusers.loaders import single_file_utils as sf

    checkpoint = _layout(folder)
    assert sf.infer_diffusers_model_type(checkpoint) == FOLDERS[folder]["diffusers_type"]
    unet, unet_config, vae, vae_config = _meta_unet_vae(folder)
    _fits(sf.convert_ldm_unet_checkpoint(dict(checkpoint), unet_config), unet)
    _fits(sf.convert_ldm_vae_checkpoint(dict(checkpoint), vae_config), vae)
    keys = sf.CHECKPOINT_KEY_NAMES
    for name in ENCODERS:
        if name not in FOLDERS[folder]:
            continue
        model = _meta_text_encoder(folder, name)
        width = model.config.hidden_size
        # the branches of create_diffusers_clip_model_from_ldm, in its order
        if sf.is_clip_model(checkpoint) or (sf.is_clip_sdxl_model(checkpoint)
                                            and checkpoint[keys["clip_sdxl"]].shape[-1] == width):
            converted = sf.convert_ldm_clip_checkpoint(checkpoint)
        elif sf.is_open_clip_model(checkpoint):
            converted = sf.convert_open_clip_checkpoint(model, checkpoint, prefix="cond_stage_model.model.")
        elif sf.is_open_clip_sdxl_model(checkpoint) and checkpoint[keys["open_clip_sdxl"]].shape[-1] == width:
            converted = sf.convert_open_clip_checkpoint(model, checkpoint, prefix="conditioner.embedders.1.model.")
        else:
            assert sf.is_open_clip_sdxl_refiner_model(checkpoint)
            converted = sf.convert_open_clip_checkpoint(model, checkpoint, prefix="conditioner.embedders.0.model.")
        if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        _fits(converted, model)


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_the_loader_takes_each_folder_for_a_matching_single_file(folder, tmp_path):
    """LoadCheckpoint's inspection (safetensors header + config folder) accepts the folder for a file of its family."""
    import torch
    from safetensors.torch import save_file

    from nodegraph.nodes.models import inspect_checkpoint

    facts = FOLDERS[folder]
    markers = {"sd1": ["cond_stage_model.transformer.text_model.final_layer_norm.weight"],
               "sd2": ["cond_stage_model.model.token_embedding.weight"],
               "sdxl": ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                        "conditioner.embedders.1.model.token_embedding.weight"],
               "sdxl_refiner": ["conditioner.embedders.0.model.token_embedding.weight"]}[facts["family"]]
    tensors = {key: torch.zeros(1) for key in markers}
    width = 384 if facts["family"] == "sdxl_refiner" else 320  # the UNets' model_channels
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(width, facts["in_channels"], 1, 1)
    if facts["family"].startswith("sdxl"):
        tensors["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(1)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    info = inspect_checkpoint(str(path), str(CONFIGS_DIR / folder))
    assert (info.family, info.inpainting, info.config_dir) == (facts["family"], facts["in_channels"] == 9,
                                                               CONFIGS_DIR / folder)


def test_the_wheel_carries_the_config_folders(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    for name in ("nodegraph", "nodes"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(source)], timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "absent from the `packages` configuration" not in done.stderr  # data folders not taken for packages
    (wheel,) = tmp_path.glob("nodegraph-*.whl")
    shipped = {"nodegraph/nodes/" + p.relative_to(REPO / "nodes").as_posix()
               for p in CONFIGS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    names = set(zipfile.ZipFile(wheel).namelist())
    assert shipped <= names
    assert {"nodegraph/nodes/configs/clip_tokenizer/vocab.json", "nodegraph/nodes/configs/sdxl-refiner/unet/config.json",
            "nodegraph/nodes/configs/sd1/tokenizer/tokenizer_config.json", "nodegraph/nodes/_shipped_configs.py"} <= names
