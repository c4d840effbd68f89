"""On a CUDA GPU (`pytest -m gpu`; skipped without one): offloading really moves models and changes no result,
and float16 runs stay within the memory budget."""
import pytest
import torch

from nodegraph.api import Engine

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def workflow(path, size=64):
    return {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(path)}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "a cat"}},
        "empty": {"type": "EmptyLatent", "params": {"width": size, "height": size}},
        "s": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                            "latent": "empty.latent"}, "params": {"seed": 5, "steps": 4}},
        "dec": {"type": "VAEDecode", "inputs": {"vae": "ckpt.vae", "latent": "s.latent"}}}}


@pytest.fixture
def restore_manager():
    from nodegraph.nodes._memory import MANAGER

    saved = (MANAGER.mode, MANAGER.budget)
    yield MANAGER
    MANAGER.configure(*saved)


@pytest.mark.parametrize("mode", ["normal", "low", "sequential"])
def test_offloading_on_a_gpu_changes_no_result(tiny, tmp_path, mode, restore_manager):
    from nodegraph.nodes.models import clear_loaded_models

    reference = Engine(cache_dir=False, vram="high").run(workflow(tiny.sd15), targets=["dec"], device="cuda",
                                                         out_dir=tmp_path).outputs["dec"]["image"]
    clear_loaded_models()
    budget = 1 if mode == "normal" else None  # normal with no room: every model leaves after use
    ours = Engine(cache_dir=False, vram=mode, vram_budget=budget).run(workflow(tiny.sd15), targets=["dec"],
                                                                      device="cuda", out_dir=tmp_path)
    clear_loaded_models()
    assert torch.allclose(ours.outputs["dec"]["image"], reference, atol=1e-5)


def test_a_float16_full_size_sd15_run_stays_within_its_budget(tmp_path, restore_manager):
    from nodegraph.nodes.models import clear_loaded_models

    from .full_size_models import sd15_file

    path, _ = sd15_file(tmp_path / "sd15.safetensors")
    torch.cuda.reset_peak_memory_stats()
    budget = 2 * 1024**3  # the UNet alone is 1.7 GB in float16: the text encoder and VAE must leave for it
    Engine(cache_dir=False, vram="normal", vram_budget=budget).run(
        workflow(path, 512), targets=["dec"], device="cuda", dtype="float16", out_dir=tmp_path)
    clear_loaded_models()
    assert restore_manager.accounting.peak <= budget
    assert torch.cuda.max_memory_allocated() < budget + 1.5 * 1024**3  # models + 512x512 activations
