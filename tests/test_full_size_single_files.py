"""Real-architecture single files load offline with the shipped configs, to the weights they were written from."""
import time

import pytest
import torch

from nodegraph.nodes.models import clear_loaded_models, inspect_checkpoint, load_checkpoint

from .full_size_models import sd15_file, sdxl_file


def assert_same_weights(loaded, components):
    model, clip, vae = loaded
    pairs = [(model.unet, components["unet"]), (vae.vae, components["vae"])]
    pairs += [(ours, components[name]) for name, ours in (("text_encoder", clip.text_encoder),
                                                           ("text_encoder_2", clip.text_encoder_2))
              if components[name] is not None]
    for ours, theirs in pairs:
        a, b = ours.state_dict(), theirs.state_dict()
        assert set(b) <= set(a)
        different = [k for k in b if b[k].is_floating_point() and not torch.equal(a[k], b[k].to(a[k].dtype))]
        assert different == []


@pytest.mark.parametrize("other_saver", [False, True])
def test_a_full_size_sd15_file_loads_offline_with_no_config(tmp_path, other_saver):
    path, components = sd15_file(tmp_path / "sd15.safetensors", other_saver)
    info = inspect_checkpoint(str(path))  # no config param, no sidecar folder, no hub
    assert (info.family, info.inpainting, info.config_dir.name) == ("sd1", False, "sd1")
    assert_same_weights(load_checkpoint(info, torch.float16), components)
    clear_loaded_models()


def test_a_full_size_sdxl_file_loads_offline_with_no_config(tmp_path):
    started = time.perf_counter()
    path, components = sdxl_file(tmp_path / "sdxl.safetensors")
    info = inspect_checkpoint(str(path))
    assert (info.family, info.config_dir.name) == ("sdxl", "sdxl")
    loaded = load_checkpoint(info, torch.float16)
    assert loaded[1].tokenizer_2.pad_token == "!" and len(loaded[1].tokenizer) == 49408
    assert_same_weights(loaded, components)
    clear_loaded_models()
    assert time.perf_counter() - started < 600
