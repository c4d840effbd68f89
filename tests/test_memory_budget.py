"""The model memory manager's decisions, checked through its accounting.

This machine has no GPU: moving a module to "cpu" changes nothing physically, so these tests check what
the manager decides (what is on the device, what leaves, in which order, never more than the budget) and
that its decisions never change results. tests/test_gpu.py checks the real moves on a GPU.
"""
import pytest
import torch

from nodegraph.api import Engine
from nodegraph.nodes._memory import MANAGER, ModelManager, module_bytes


@pytest.fixture
def manager():
    yield ModelManager()


@pytest.fixture
def process_manager():
    """The process's manager, restored afterwards (other tests expect the default)."""
    saved = (MANAGER.mode, MANAGER.budget, MANAGER.compile, MANAGER.channels_last)
    yield MANAGER
    MANAGER.configure(saved[0], saved[1], compile=saved[2], channels_last=saved[3])
    MANAGER.reset_accounting()


def layer(width):
    return torch.nn.Linear(width, width, bias=False)


def test_least_recently_used_leave_first_and_the_budget_holds(manager):
    a, b, c = layer(32), layer(32), layer(32)
    size = module_bytes(a)
    manager.configure("normal", budget=2 * size)
    for name, module in (("a", a), ("b", b), ("a", a), ("c", c)):
        with manager.use("cpu", (name, module)):
            pass
    assert manager.accounting.peak <= 2 * size
    assert ("b", "out", size) in manager.accounting.moves and ("a", "out", size) not in manager.accounting.moves


def test_low_mode_keeps_only_what_is_in_use(manager):
    a, b = layer(16), layer(16)
    manager.configure("low")
    with manager.use("cpu", ("a", a)):
        assert manager.accounting.on_device == module_bytes(a)
    assert manager.accounting.on_device == 0
    with manager.use("cpu", ("a", a), ("b", b)):
        assert manager.accounting.on_device == module_bytes(a) + module_bytes(b)


def test_a_module_in_use_is_never_moved_away(manager):
    a, b = layer(32), layer(32)
    manager.configure("normal", budget=module_bytes(a))
    with manager.use("cpu", ("a", a)):
        with manager.use("cpu", ("b", b)):  # another thread's node, say: a is pinned, the budget gives way
            assert manager.accounting.over_budget == 1
    assert ("a", "out", module_bytes(a)) not in manager.accounting.moves


def test_a_workflow_under_a_small_budget_gives_the_same_latents(tiny, process_manager, tmp_path):
    from nodegraph.nodes.models import clear_loaded_models, inspect_checkpoint, load_checkpoint

    workflow = {"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(tiny.sd15)}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "a cat"}},
        "empty": {"type": "EmptyLatent", "params": {"width": 32, "height": 32}},
        "s": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                            "latent": "empty.latent"}, "params": {"seed": 5, "steps": 3}},
        "dec": {"type": "VAEDecode", "inputs": {"vae": "ckpt.vae", "latent": "s.latent"}}}}
    free = Engine(cache_dir=False, vram="high").run(workflow, targets=["dec", "s"], out_dir=tmp_path)
    model, clip, vae = load_checkpoint(inspect_checkpoint(str(tiny.sd15)))
    sizes = {"unet": module_bytes(model.unet), "text_encoder": module_bytes(clip.text_encoder),
             "vae": module_bytes(vae.vae)}
    budget = max(sizes.values())  # room for one model at a time
    del model, clip, vae
    clear_loaded_models()
    import gc

    gc.collect()
    process_manager.unload_all()  # models other tests still hold leave too: the accounting starts from empty
    process_manager.reset_accounting()
    assert process_manager.accounting.on_device == 0
    tight = Engine(cache_dir=False, vram="normal", vram_budget=budget).run(workflow, targets=["dec", "s"],
                                                                           out_dir=tmp_path)
    clear_loaded_models()
    accounting = process_manager.accounting
    assert accounting.peak <= budget and accounting.over_budget == 0
    assert [name for name, way, _ in accounting.moves if way == "in"] == ["text_encoder", "unet", "vae"]
    assert {name for name, way, _ in accounting.moves if way == "out"} == {"text_encoder", "unet"}
    assert torch.equal(free.outputs["s"]["latent"].samples, tight.outputs["s"]["latent"].samples)
    assert torch.equal(free.outputs["dec"]["image"], tight.outputs["dec"]["image"])


def test_unload_all_sends_away_what_is_not_in_use_and_deleted_modules_free_their_share(manager):
    a, b = layer(16), layer(16)
    manager.configure("normal", budget=10 * module_bytes(a))
    with manager.use("cpu", ("a", a)):
        pass
    with manager.use("cpu", ("b", b)):
        manager.unload_all()  # b is in use: it stays
        assert manager.accounting.on_device == module_bytes(b)
    assert ("a", "out", module_bytes(a)) in manager.accounting.moves
    del b
    import gc

    gc.collect()
    with manager.use("cpu", ("c", layer(16))):
        assert manager.accounting.on_device == module_bytes(a)  # b's bytes were freed with it


def test_sequentially_offloaded_models_compute_on_their_hook_s_device(tiny):
    """Under sequential offload the weights wait on the meta device between calls: inputs must go to the device
    accelerate's hooks bring each layer to, not to the weights' device. (On a GPU that is CUDA; here the hooks
    are told to compute on the CPU, which exercises the same path.)"""
    from accelerate import cpu_offload

    from nodegraph.nodes import denoise
    from nodegraph.nodes._detection import inspect_checkpoint
    from nodegraph.nodes._loading import load_checkpoint
    from nodegraph.nodes.conditioning import encode_prompt
    from nodegraph.nodes.latent import decode_latents, empty_latent
    from nodegraph.nodes.models import clear_loaded_models

    def generate(model, clip, vae):
        latents = denoise.sample(model, encode_prompt(clip, "a red house"), None, empty_latent(64, 64), seed=3,
                                 steps=2, guidance_scale=5.0, scheduler="euler", strength=1.0)
        return decode_latents(vae, latents)

    reference = generate(*load_checkpoint(inspect_checkpoint(str(tiny.sd15))))
    clear_loaded_models()  # fresh modules: the offload hooks stay on them
    try:
        model, clip, vae = load_checkpoint(inspect_checkpoint(str(tiny.sd15)))
        for module in (model.unet, clip.text_encoder, vae.vae):
            cpu_offload(module, execution_device="cpu")
            MANAGER._sequential.add(module)
        assert model.unet.device.type == "meta"
        assert torch.allclose(generate(model, clip, vae), reference, atol=1e-5)
    finally:
        clear_loaded_models()


def test_compile_and_channels_last_reach_unet_and_controlnet_once(manager):
    """What --compile / --channels-last prepare when a module first comes to a GPU. The CPU is never prepared,
    so the GPU device is named directly, and a spy stands in for torch.compile (tests/test_gpu.py runs it)."""
    manager.configure("high", compile=True, channels_last=True)
    modules = {name: torch.nn.Conv2d(4, 4, 3) for name in ("unet", "controlnet", "vae")}
    compiled = []
    for name, module in modules.items():
        module.compile = lambda name=name: compiled.append(name)  # spy in place of a GPU compile
        manager._names[module] = name
    for _ in range(2):
        for module in modules.values():
            manager._prepare_denoiser(module, "cuda:0")
    manager._prepare_denoiser(torch.nn.Conv2d(4, 4, 3), "cpu")
    assert compiled == ["unet", "controlnet"]
    assert [m.weight.is_contiguous(memory_format=torch.channels_last) for m in modules.values()] == [True, True, False]
