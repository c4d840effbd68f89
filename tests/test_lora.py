"""LoRA: LoadLoRA / ApplyLoRA against diffusers' pipelines with ``load_lora_weights`` on tiny random models (fp32, CPU).

Our side: the session's shared tiny checkpoints, LoadLoRA's loader, ApplyLoRA's patches and the shared sampler.
diffusers' side: a fresh pipeline loaded from the same folder, the same LoRA file given to ``load_lora_weights``
and its strengths to ``set_adapters``. Same seed, same initial noise; final latents must agree within 1e-4.
The LoRA files (tests/tiny_lora.py) hold one set of random weights in both layouts, kohya and diffusers.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from nodegraph.api import Engine
from nodegraph.errors import Interrupted, NodeError, NodeFailed
from nodegraph.nodes import denoise
from nodegraph.nodes._handles import ClipPatch
from nodegraph.nodes.conditioning import encode_prompt
from nodegraph.nodes.ipadapter import apply_ip_adapter, load_ip_adapter
from nodegraph.nodes.latent import empty_latent
from nodegraph.nodes.lora import LoraClipPatch, LoraModelPatch, apply_lora, inspect_lora, load_lora
from tests.test_diffusion_parity import assert_close, diffusers_scheduler
from tests.overlap import overlapping
from tests.tiny_lora import make_lora, write_diffusers, write_kohya

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a stone castle on a hill"
SCHEDULER = "euler"


@pytest.fixture(scope="module")
def sd_loras(sd, tmp_path_factory):
    """Two random LoRAs for the tiny SD 1.x UNet and text encoder; the first in both layouts, the second
    in the diffusers layout without metadata (alpha = rank)."""
    model, clip, _ = sd
    root = tmp_path_factory.mktemp("lora-sd1")
    first = make_lora(model.unet, {"text_encoder": clip.text_encoder}, seed=0)
    second = make_lora(model.unet, {"text_encoder": clip.text_encoder}, rank=2, seed=1, scale=0.2)
    return {"diffusers": write_diffusers(first, root / "first.safetensors"),
            "kohya": write_kohya(first, root / "first_kohya.safetensors"),
            "second": write_diffusers(second, root / "second.safetensors", metadata=False),
            "unet_only": write_diffusers({**first, "parts": {"unet": first["parts"]["unet"]}}, root / "unet.safetensors")}


@pytest.fixture(scope="module")
def xl_loras(xl, tmp_path_factory):
    """A random LoRA for the tiny SDXL UNet and both text encoders, in both layouts (kohya: sgm block names)."""
    model, clip, _ = xl
    root = tmp_path_factory.mktemp("lora-sdxl")
    lora = make_lora(model.unet, {"text_encoder": clip.text_encoder, "text_encoder_2": clip.text_encoder_2}, seed=2)
    return {"diffusers": write_diffusers(lora, root / "xl.safetensors"),
            "kohya": write_kohya(lora, root / "xl_kohya.safetensors", model.unet, sgm=True)}


def sample(model, clip, seed=3, progress=None):
    return denoise.sample(model, encode_prompt(clip, PROMPT), None, empty_latent(64, 64), seed=seed, steps=3,
                          guidance_scale=4.0, scheduler=SCHEDULER, strength=1.0, progress=progress)


def reference(folder: Path, handles, loras: list[tuple[Path, float, float]], sdxl: bool = False):
    """diffusers on fresh modules from ``folder``: each LoRA loaded as an adapter and activated with
    {"unet": strength_model, "text_encoder(_2)": strength_clip}; the final latents for PROMPT."""
    import diffusers

    model = handles[0]
    cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    extra = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(str(folder), **extra)
    pipe.scheduler = diffusers_scheduler(SCHEDULER, model.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    names, weights = [], []
    for i, (path, strength_model, strength_clip) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
        names.append(f"lora{i}")
        weights.append({"unet": strength_model, "text_encoder": strength_clip, "text_encoder_2": strength_clip})
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=4.0, height=64, width=64, output_type="latent",
                generator=torch.Generator("cpu").manual_seed(3)).images


def module_state(module) -> dict:
    """Everything restoring must give back: the layer objects, the weight tensors (values and storage) and the
    module's own attributes."""
    return {"modules": [(name, type(m), id(m)) for name, m in module.named_modules()],
            "tensors": {k: (v.clone(), v.data_ptr()) for k, v in module.state_dict().items()},
            "attributes": sorted(vars(module))}


def assert_same_state(before: dict, module):
    after = module_state(module)
    assert after["modules"] == before["modules"] and after["attributes"] == before["attributes"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, (value, pointer) in before["tensors"].items():
        assert torch.equal(after["tensors"][key][0], value) and after["tensors"][key][1] == pointer, key


# ---------------------------------------------------------------------------------------------- files

def test_the_header_says_layout_and_components(sd_loras, xl_loras):
    assert inspect_lora(sd_loras["kohya"]).format == "kohya"
    assert inspect_lora(sd_loras["kohya"]).layers == {"unet": 48, "text_encoder": 12}
    assert inspect_lora(sd_loras["diffusers"]).format == "diffusers"
    assert inspect_lora(sd_loras["diffusers"]).layers == {"unet": 48, "text_encoder": 12}
    assert inspect_lora(sd_loras["unet_only"]).layers == {"unet": 48}
    xl = inspect_lora(xl_loras["kohya"])
    assert xl.layers == inspect_lora(xl_loras["diffusers"]).layers and set(xl.layers) == {
        "unet", "text_encoder", "text_encoder_2"}
    handle = load_lora(sd_loras["diffusers"])
    assert load_lora(sd_loras["diffusers"]) is handle  # loaded once
    assert handle.metadata["unet.lora_alpha"] == 2.0 and handle.metadata["text_encoder.r"] == 4


def test_validation_refuses_pickles_and_files_that_are_not_loras(tmp_path, sd_loras):
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "checkpoint.safetensors"))
    save_file({"lora_unet_down_blocks_0_attn.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "half.safetensors"))
    (tmp_path / "style.ckpt").write_bytes(b"not a pickle")
    expected = {"checkpoint.safetensors": "is not a LoRA in a layout diffusers reads",
                "loha.safetensors": "LyCORIS LoHa / LoKr and DoRA are not",
                "half.safetensors": "without their lora_down / lora_up pair",
                "style.ckpt": "is a pickle LoRA file, which can run arbitrary code"}
    nodes = {f"l{i}": {"type": "LoadLoRA", "params": {"path": str(tmp_path / name)}} for i, name in enumerate(expected)}
    nodes["good"] = {"type": "LoadLoRA", "params": {"path": str(sd_loras["kohya"])}}
    issues = Engine().validate({"format": "nodegraph/1", "nodes": nodes})
    found = {issue.node_id: issue.message for issue in issues if issue.field == "path"}
    assert "good" not in found
    for i, (name, words) in enumerate(expected.items()):
        assert found[f"l{i}"] and words in found[f"l{i}"], (name, found.get(f"l{i}"))


# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_sd1_unet_and_text_encoder_lora_match_diffusers(tiny, sd, sd_loras, layout):
    model, clip, _ = sd
    patched_model, patched_clip = apply_lora(model, clip, load_lora(sd_loras[layout]), 0.8, 0.6)
    assert patched_model.unet is model.unet and patched_clip.text_encoder is clip.text_encoder
    ours = sample(patched_model, patched_clip)
    assert_close(ours, reference(tiny.sd15, sd, [(sd_loras[layout], 0.8, 0.6)]))
    assert (ours - sample(model, clip)).abs().max() > 1e-2  # the LoRA matters
    # the text encoder's part alone: our embeddings are diffusers' (same layers, same strength)
    only_clip = apply_lora(model, clip, load_lora(sd_loras[layout]), 0.0, 0.6)
    assert only_clip[0] is model
    assert_close(sample(*only_clip), reference(tiny.sd15, sd, [(sd_loras[layout], 0.0, 0.6)]))


def test_sd1_lora_matches_diffusers_fused_into_the_weights(tiny, sd, sd_loras):
    """diffusers' other way: fuse_lora(lora_scale) writes W + s · (alpha / rank) · up·down into the weights; the
    sums round differently from the unfused layers, so equal within the tolerance, not bit for bit."""
    import diffusers

    model, clip, _ = sd
    ours = sample(*apply_lora(model, clip, load_lora(sd_loras["kohya"]), 0.8, 0.8))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny.sd15), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = diffusers_scheduler(SCHEDULER, model.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(sd_loras["kohya"]))
    pipe.fuse_lora(lora_scale=0.8)
    ref = pipe(PROMPT, num_inference_steps=3, guidance_scale=4.0, height=64, width=64, output_type="latent",
               generator=torch.Generator("cpu").manual_seed(3)).images
    assert_close(ours, ref)


def test_kohya_and_diffusers_layouts_of_one_lora_give_one_image(sd, sd_loras):
    model, clip, _ = sd
    kohya = sample(*apply_lora(model, clip, load_lora(sd_loras["kohya"]), 0.8, 0.6))
    ours = sample(*apply_lora(model, clip, load_lora(sd_loras["diffusers"]), 0.8, 0.6))
    assert torch.equal(kohya, ours)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_sdxl_unet_and_both_text_encoders_lora_match_diffusers(tiny_xl, xl, xl_loras, layout):
    model, clip, _ = xl
    patched = apply_lora(model, clip, load_lora(xl_loras[layout]), 0.7, 0.9)
    assert set(patched[1].patches[0].entries) == {"text_encoder", "text_encoder_2"}
    ours = sample(*patched)
    assert_close(ours, reference(tiny_xl.base, xl, [(xl_loras[layout], 0.7, 0.9)], sdxl=True))
    assert (ours - sample(model, clip)).abs().max() > 1e-2


def test_two_stacked_loras_match_diffusers_with_both_adapters(tiny, sd, sd_loras):
    model, clip, _ = sd
    patched = apply_lora(model, clip, load_lora(sd_loras["kohya"]), 0.7, 0.5)
    patched = apply_lora(*patched, load_lora(sd_loras["second"]), -0.4, 0.9)
    assert [type(p) for p in patched[0].patches] == [LoraModelPatch] and len(patched[0].patches[0].entries) == 2
    assert [type(p) for p in patched[1].patches] == [LoraClipPatch]
    ours = sample(*patched)
    ref = reference(tiny.sd15, sd, [(sd_loras["kohya"], 0.7, 0.5), (sd_loras["second"], -0.4, 0.9)])
    assert_close(ours, ref)


def test_strength_zero_is_no_lora(sd, sd_loras):
    model, clip, _ = sd
    same_model, same_clip = apply_lora(model, clip, load_lora(sd_loras["kohya"]), 0.0, 0.0)
    assert same_model is model and same_clip is clip
    unet_only = apply_lora(model, clip, load_lora(sd_loras["unet_only"]), 0.5, 1.0)
    assert unet_only[1] is clip  # no text encoder layers: the CLIP is left as it is
    assert torch.equal(sample(same_model, same_clip), sample(model, clip))


def test_lora_combines_with_an_ip_adapter(tiny, sd, sd_loras, tmp_path):
    """An IP-Adapter and a LoRA on one MODEL = diffusers with load_ip_adapter + load_lora_weights, in either order."""
    import diffusers
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from tests.test_ipadapter_parity import pil_list
    from tests.tiny_ipadapter import build_tiny_ipadapters

    model, clip, _ = sd
    adapters = build_tiny_ipadapters(tmp_path, model.unet)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    adapter, lora = load_ip_adapter(adapters.plain, adapters.encoder), load_lora(sd_loras["diffusers"])
    lora_first = apply_lora(model, clip, lora, 0.8, 0.8)
    lora_first = (apply_ip_adapter(lora_first[0], adapter, images, 0.6), lora_first[1])
    ip_first = apply_lora(apply_ip_adapter(model, adapter, images, 0.6), clip, lora, 0.8, 0.8)
    ours = sample(*lora_first)
    assert torch.equal(sample(*ip_first), ours)

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(tiny.sd15), safety_checker=None, requires_safety_checker=False,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(str(adapters.encoder)),
        feature_extractor=CLIPImageProcessor.from_pretrained(str(adapters.encoder)))
    pipe.scheduler = diffusers_scheduler(SCHEDULER, model.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(adapters.plain.parent), subfolder="", weight_name=adapters.plain.name,
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.6)
    pipe.load_lora_weights(str(sd_loras["diffusers"]), adapter_name="lora")
    pipe.set_adapters(["lora"], adapter_weights=[0.8])
    ref = pipe(PROMPT, ip_adapter_image=[pil_list(images)], num_inference_steps=3, guidance_scale=4.0, height=64,
               width=64, output_type="latent", generator=torch.Generator("cpu").manual_seed(3)).images
    assert_close(ours, ref)


# ---------------------------------------------------------------------------------------------- restoring

def test_the_plain_model_is_the_same_before_during_and_after(sd, sd_loras):
    model, clip, _ = sd
    unet, encoder = module_state(model.unet), module_state(clip.text_encoder)
    plain = sample(model, clip)
    lora_model, lora_clip = apply_lora(model, clip, load_lora(sd_loras["kohya"]), 1.0, 1.0)

    during = {}

    def look(step, total):  # inside the LoRA run: the layers are wrapped, the weights themselves untouched
        if step == 1:
            during["wrapped"] = type(model.unet.down_blocks[0].attentions[0].proj_in).__module__
            during["weight"] = model.unet.down_blocks[0].attentions[0].proj_in.base_layer.weight.data_ptr()

    sample(lora_model, lora_clip, progress=look)
    assert during["wrapped"].startswith("peft.")
    assert during["weight"] == unet["tensors"]["down_blocks.0.attentions.0.proj_in.weight"][1]
    assert_same_state(unet, model.unet)
    assert_same_state(encoder, clip.text_encoder)
    assert torch.equal(sample(model, clip), plain)


def test_sdxl_encoders_first_used_with_the_lora_encode_as_before_after_it(tiny_xl, xl, xl_loras):
    """transformers sets up its hidden-state capture on an encoder's first use; when that happens with the LoRA
    in place, it must stay set up (once) after the LoRA is gone. Fresh encoders, so the LoRA run is the first."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from nodegraph.nodes._handles import ClipHandle

    model, clip, _ = xl
    fresh = ClipHandle(clip.tokenizer, CLIPTextModel.from_pretrained(str(tiny_xl.base), subfolder="text_encoder"),
                       clip.family, clip.source, tokenizer_2=clip.tokenizer_2,
                       text_encoder_2=CLIPTextModelWithProjection.from_pretrained(str(tiny_xl.base),
                                                                                  subfolder="text_encoder_2"),
                       force_zeros_for_empty_prompt=True)
    lora_clip = apply_lora(model, fresh, load_lora(xl_loras["diffusers"]), 0.0, 1.0)[1]
    assert (encode_prompt(lora_clip, PROMPT).embeds - encode_prompt(clip, PROMPT).embeds).abs().max() > 1e-3
    after = encode_prompt(fresh, PROMPT)
    assert torch.equal(after.embeds, encode_prompt(clip, PROMPT).embeds)
    assert torch.equal(after.pooled, encode_prompt(clip, PROMPT).pooled)


def test_restored_after_an_error_or_an_interrupt(sd, sd_loras):
    model, clip, _ = sd
    unet, encoder = module_state(model.unet), module_state(clip.text_encoder)
    lora_model, lora_clip = apply_lora(model, clip, load_lora(sd_loras["diffusers"]), 1.0, 1.0)

    def interrupt(step, total):
        raise Interrupted()

    with pytest.raises(Interrupted):
        sample(lora_model, lora_clip, progress=interrupt)
    assert_same_state(unet, model.unet)

    class Failing(ClipPatch):  # fails while the LoRA is on the text encoder
        def applied(self, clip):
            raise RuntimeError("boom")

    broken = lora_clip.with_patches((*lora_clip.patches, Failing()))
    with pytest.raises(RuntimeError, match="boom"):
        encode_prompt(broken, PROMPT)
    assert_same_state(encoder, clip.text_encoder)
    assert torch.equal(encode_prompt(clip, PROMPT).embeds, encode_prompt(clip, PROMPT).embeds)


def test_concurrent_runs_with_and_without_the_lora_match_runs_alone(sd, sd_loras):
    """One thread samples with the LoRA MODEL and CLIP while another samples with the plain ones."""
    model, clip, _ = sd
    lora_model, lora_clip = apply_lora(model, clip, load_lora(sd_loras["kohya"]), 1.0, 1.0)
    expected_plain, expected_lora = sample(model, clip), sample(lora_model, lora_clip)
    assert (expected_plain - expected_lora).abs().max() > 1e-2

    lora, plain = overlapping(lambda progress: sample(lora_model, lora_clip, progress=progress),
                              lambda: sample(model, clip))
    assert torch.equal(plain, expected_plain)
    assert torch.equal(lora, expected_lora)


def test_concurrent_encodes_with_and_without_the_lora_match_encodes_alone(sd, sd_loras):
    """CLIPEncode holds the text encoder's lock while the LoRA is on it: a plain encode waits."""
    model, clip, _ = sd
    lora_clip = apply_lora(model, clip, load_lora(sd_loras["kohya"]), 0.0, 1.0)[1]
    expected_plain, expected_lora = encode_prompt(clip, PROMPT).embeds, encode_prompt(lora_clip, PROMPT).embeds
    assert (expected_plain - expected_lora).abs().max() > 1e-3
    installed, plain_done = threading.Event(), threading.Event()

    class Pause(ClipPatch):  # after the LoRA patch: holds the encode with the LoRA in place
        def applied(self, clip):
            installed.set()
            plain_done.wait(timeout=1.0)
            return super().applied(clip)

    paused = lora_clip.with_patches((*lora_clip.patches, Pause()))
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("lora", encode_prompt(paused, PROMPT).embeds))
    first.start()
    assert installed.wait(timeout=60)
    results["plain"] = encode_prompt(clip, PROMPT).embeds
    plain_done.set()
    first.join(timeout=60)
    assert torch.equal(results["plain"], expected_plain) and torch.equal(results["lora"], expected_lora)


# ---------------------------------------------------------------------------------------------- errors

def test_a_lora_for_another_family_fails_before_sampling(sd, xl, sd_loras, xl_loras):
    with pytest.raises(NodeError) as error:
        apply_lora(sd[0], sd[1], load_lora(xl_loras["diffusers"]), 1.0, 1.0)
    message = str(error.value)
    assert "xl.safetensors does not fit the model's UNet" in message and "made for SDXL" in message
    assert "other sizes" in message or "do not exist" in message
    with pytest.raises(NodeError, match="made for SDXL"):  # its UNet part alone is left out: the CLIP side fails
        apply_lora(sd[0], sd[1], load_lora(xl_loras["kohya"]), 0.0, 1.0)
    with pytest.raises(NodeError, match="does not fit the model's UNet"):
        apply_lora(xl[0], xl[1], load_lora(sd_loras["kohya"]), 1.0, 0.0)


# ---------------------------------------------------------------------------------------------- workflow

def test_workflow_runs_records_and_reruns_only_what_changed(tiny, sd_loras, tmp_path):
    workflow = REPO / "workflows" / "txt2img_lora.json"
    nodes = json.loads(workflow.read_text())["nodes"]
    assert {"LoadLoRA", "ApplyLoRA"} <= {n["type"] for n in nodes.values()}
    overrides = {"ckpt.path": str(tiny.sd15), "lora.path": str(sd_loras["kohya"]), "empty.width": 64,
                 "empty.height": 64, "sample.steps": 2}
    engine = Engine()
    first = engine.run(workflow, overrides=overrides, out_dir=tmp_path)
    assert set(first.status.values()) == {"ran"} and len(first.files) == 1
    assert first.info["loras"]["lora"]["format"] == "kohya"
    assert first.info["loras"]["apply"] == {"lora": str(sd_loras["kohya"]), "strength_model": 0.8,
                                            "strength_clip": 0.8, "applied": ["unet", "text_encoder"]}
    again = engine.run(workflow, overrides={**overrides, "apply.strength_clip": 0.3}, out_dir=tmp_path)
    assert again.status["ckpt"] == again.status["lora"] == "cached" and again.status["apply"] == "ran"
    assert again.info["loras"]["apply"]["strength_clip"] == 0.3


def test_a_lora_is_found_by_name_in_the_models_folder(tiny, sd_loras, tmp_path):
    import shutil

    (tmp_path / "loras").mkdir()
    shutil.copy(sd_loras["kohya"], tmp_path / "loras" / "style.safetensors")
    overrides = {"ckpt.path": str(tiny.sd15), "lora.path": "style.safetensors", "empty.width": 64,
                 "empty.height": 64, "sample.steps": 2}
    done = Engine(cache_dir=False, models=[tmp_path]).run(REPO / "workflows" / "txt2img_lora.json",
                                                           overrides=overrides, out_dir=tmp_path / "out")
    assert done.info["loras"]["lora"]["source"] == str(tmp_path / "loras" / "style.safetensors")


def test_workflow_with_a_lora_of_another_family_fails_at_apply_before_sampling(tiny, xl_loras, tmp_path):
    events = []
    overrides = {"ckpt.path": str(tiny.sd15), "lora.path": str(xl_loras["kohya"]), "empty.width": 64,
                 "empty.height": 64, "sample.steps": 2}
    with pytest.raises(NodeFailed) as error:
        Engine().run(REPO / "workflows" / "txt2img_lora.json", overrides=overrides, out_dir=tmp_path,
                     progress=events.append)
    assert error.value.node_id == "apply" and "does not fit the model's UNet" in str(error.value)
    assert not [e for e in events if e.node_id == "sample"]


def test_the_lora_follows_its_module_when_the_memory_manager_moves_it(sd, sd_loras):
    """ApplyLoRA prepares the tensors where the module is; the memory manager may move the module before the run
    (to the GPU, or in another dtype). Here a copy of the text encoder changes dtype after ApplyLoRA (what a move
    to another device does, on a machine without one): the install follows it and the encode runs."""
    import copy

    from nodegraph.nodes.lora import adapters_installed

    model, clip, _ = sd
    _, patched = apply_lora(model, clip, load_lora(sd_loras["diffusers"]), 0.0, 1.0)
    (adapter, _), = patched.patches[0].entries["text_encoder"]
    encoder = copy.deepcopy(clip.text_encoder).to(torch.float64)
    ids = torch.tensor([[0, 1, 2]])
    with adapters_installed(encoder, [(adapter, 1.0)]):
        out = encoder(ids).last_hidden_state
    assert out.dtype == torch.float64
    assert {v.dtype for v in adapter.state_dict.values()} == {torch.float64}
