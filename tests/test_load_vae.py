"""LoadVAE, and checkpoints that come without a VAE."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nodegraph.api import Engine
from nodegraph.errors import NodeFailed
from nodegraph.nodes.models import inspect_checkpoint, load_vae
from nodegraph.nodes._shipped_configs import CONFIGS_DIR

from .full_size_models import random_components
from .tiny_models import _vae_to_original


def same(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


@pytest.mark.parametrize("layout", ["original", "original-prefixed", "diffusers"])
def test_a_vae_file_in_either_layout_loads_to_its_weights(sd, tiny, tmp_path, layout):
    reference = sd[2].vae
    state = reference.state_dict()
    if layout.startswith("original"):
        state = {k.removeprefix("first_stage_model."): v for k, v in _vae_to_original(state, reference.config).items()}
        if layout == "original-prefixed":
            state = {"first_stage_model." + k: v for k, v in state.items()}
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    handle = load_vae(path, tiny.sd15_file_config, "sd1")
    assert same(handle.vae, reference) and handle.scaling_factor == reference.config.scaling_factor


@pytest.mark.parametrize("family, scaling", [("sd1", 0.18215), ("sdxl", 0.13025)])
def test_a_full_size_vae_file_loads_with_the_shipped_config(tmp_path, family, scaling):
    reference = random_components(family)["vae"]
    state = {k.removeprefix("first_stage_model."): v for k, v in
             _vae_to_original(reference.state_dict(), reference.config).items()}
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    handle = load_vae(path, CONFIGS_DIR / family, family, torch.float16)
    assert same(handle.vae, reference) and handle.scaling_factor == scaling


def test_a_checkpoint_without_a_vae_asks_for_load_vae(tiny, tmp_path):
    path = tmp_path / "novae.safetensors"
    save_file({k: v for k, v in load_file(str(tiny.sd15_file)).items() if not k.startswith("first_stage_model.")},
              str(path))
    shutil.copytree(tiny.sd15_file_config, tmp_path / "novae.config")
    assert not inspect_checkpoint(str(path)).has_vae
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v for k, v in load_file(str(tiny.sd15_file)).items() if k.startswith("first_stage_model.")},
              str(vae_file))
    workflow = {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(path)}},
        "vae": {"type": "LoadVAE", "params": {"path": str(vae_file), "config": str(tiny.sd15_file_config)}},
        "empty": {"type": "EmptyLatent", "params": {"width": 32, "height": 32}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "a cat"}},
        "s": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                            "latent": "empty.latent"}, "params": {"steps": 2}},
        "dec": {"type": "VAEDecode", "inputs": {"vae": "ckpt.vae", "latent": "s.latent"}},
        "dec2": {"type": "VAEDecode", "inputs": {"vae": "vae.vae", "latent": "s.latent"}}}}
    engine = Engine(cache_dir=False)
    with pytest.raises(NodeFailed, match="has no VAE weights.*LoadVAE") as info:
        engine.run(workflow, targets=["dec"], out_dir=tmp_path)
    assert info.value.node_id == "dec"
    image = engine.run(workflow, targets=["dec2"], out_dir=tmp_path).outputs["dec2"]["image"]
    assert image.shape == (1, 3, 32, 32)
