"""The ComfyUI importer: formats (API, editor, PNG), the loader / conditioning / latent / sampler types, the
problems it reports, and the imported samplers on tiny models against diffusers and ComfyUI's arithmetic."""
from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nodegraph.api import Engine
from nodegraph.comfy import COMFY_API, COMFY_EDITOR, NODEGRAPH, detect_format, import_api, to_nodegraph
from nodegraph.comfy.convert import converters
from nodegraph.comfy.editor import editor_to_api
from nodegraph.comfy.models import denoise_steps
from nodegraph.errors import WorkflowInvalid

from .conftest import REPO

DATA = REPO / "tests" / "data" / "comfy"
PIXEL_TYPES = pytest.mark.skipif(not {"LoadImage", "SaveImage"} <= set(converters()),
                                 reason="needs the LoadImage / SaveImage converters (nodegraph/comfy/pixels.py)")


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def problems(prompt) -> list:
    with pytest.raises(WorkflowInvalid) as caught:
        to_nodegraph(prompt)
    return caught.value.issues


def txt2img(**sampler) -> dict:
    """ComfyUI's default graph (API format) without its SaveImage; KSampler inputs overridden by ``sampler``."""
    prompt = load("txt2img_api.json")
    del prompt["9"]
    prompt["3"]["inputs"].update(sampler)
    return prompt


# ---------------------------------------------------------------------------------------------- formats

def test_the_formats_are_told_apart():
    api = load("txt2img_api.json")
    editor = load("txt2img_editor.json")
    assert detect_format(api) == COMFY_API
    assert detect_format({"prompt": api, "client_id": "abc"}) == COMFY_API  # the body of POST /prompt
    assert detect_format(editor) == COMFY_EDITOR
    native = json.loads((REPO / "workflows" / "outpaint_telea.json").read_text())
    assert detect_format(native) == NODEGRAPH
    # a nodegraph workflow without "format" is still nodegraph's (its reader says what is missing), and so is
    # one whose nodes is an object even with a links key
    assert detect_format({"nodes": {"a": {"type": "LoadImage"}}, "links": []}) == NODEGRAPH
    assert detect_format({"nodes": native["nodes"]}) == NODEGRAPH
    assert detect_format([1, 2]) == NODEGRAPH and detect_format({}) == NODEGRAPH


def test_api_import_keeps_ids_and_titles_and_reads_well():
    workflow = to_nodegraph(txt2img())
    nodes = workflow["nodes"]
    assert workflow["format"] == "nodegraph/1"
    assert list(nodes) == ["3", "4", "5", "6", "7", "8"]  # ComfyUI's ids, in its order
    assert nodes["4"] == {"type": "LoadCheckpoint", "title": "Load Checkpoint",
                          "params": {"path": "tiny-sd15.safetensors"}}
    assert nodes["3"]["type"] == "Sampler" and "title" not in nodes["3"]  # a title equal to the type is dropped
    assert nodes["3"]["inputs"] == {"model": "4.model", "positive": "6.conditioning", "negative": "7.conditioning",
                                    "latent": "5.latent"}
    assert nodes["3"]["params"] == {"seed": 156680208, "guidance_scale": 8, "steps": 3, "scheduler": "euler_linspace"}
    assert nodes["5"]["params"] == {"width": 64, "height": 64, "batch": 1}
    assert nodes["8"]["inputs"] == {"vae": "4.vae", "latent": "3.latent"}
    wrapped = to_nodegraph({"prompt": txt2img(), "extra_data": {}})
    assert wrapped["nodes"] == nodes


def test_editor_format_gives_the_api_prompt():
    """ComfyUI's default graph saved by the editor imports to exactly what its API export imports to."""
    prompt = editor_to_api(load("txt2img_editor.json"))
    expected = load("txt2img_api.json")
    if "SaveImage" not in converters():  # its widgets need its spec (the pixel types)
        expected["9"]["inputs"] = {"images": ["8", 0]}
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in expected.items()}


def test_editor_bypass_mute_reroute_primitive_and_notes():
    prompt = editor_to_api(load("inpaint_editor.json"))
    assert "2" not in prompt  # the bypassed LoraLoader: its inputs pass through
    assert prompt["9"]["inputs"]["model"] == ["1", 0]
    assert prompt["3"]["inputs"]["clip"] == ["1", 1]
    assert prompt["8"]["inputs"]["vae"] == ["1", 2]  # through the Reroute
    assert not {"7", "10", "13", "14"} & set(prompt)  # reroute, primitive, muted preview, note
    assert prompt["9"]["inputs"]["seed"] == 42  # the primitive's value, from the target's widgets
    assert {k: v for k, v in prompt["9"]["inputs"].items() if not isinstance(v, list)} == {
        "seed": 42, "steps": 3, "cfg": 7.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1}
    assert prompt["4"]["_meta"] == {"title": "Positive prompt"}
    assert prompt["3"]["inputs"]["stop_at_clip_layer"] == -2
    assert prompt["8"]["inputs"]["grow_mask_by"] == 6


def test_editor_link_objects_and_a_bypassed_node_picking_its_input_by_type():
    editor = load("txt2img_editor.json")
    editor["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link))
                       for link in editor["links"]]
    # a bypassed CLIPSetLastLayer between the checkpoint's CLIP and the positive prompt
    editor["nodes"].append({"id": 20, "type": "CLIPSetLastLayer", "mode": 4, "widgets_values": [-2],
                            "inputs": [{"name": "clip", "type": "CLIP", "link": 30}],
                            "outputs": [{"name": "CLIP", "type": "CLIP", "links": [3]}]})
    editor["links"] = [l for l in editor["links"] if l["id"] != 3] + [
        {"id": 30, "origin_id": 4, "origin_slot": 1, "target_id": 20, "target_slot": 0, "type": "CLIP"},
        {"id": 3, "origin_id": 20, "origin_slot": 0, "target_id": 6, "target_slot": 0, "type": "CLIP"}]
    prompt = editor_to_api(editor)
    assert "20" not in prompt and prompt["6"]["inputs"]["clip"] == ["4", 1]
    editor["nodes"] = [n for n in editor["nodes"] if n["type"] != "SaveImage"]
    assert to_nodegraph(editor)["nodes"]["6"]["params"].get("clip_skip") is None  # bypassed: no clip skip
    editor["nodes"][-1]["mode"] = 0  # the same node not bypassed
    assert to_nodegraph(editor)["nodes"]["6"]["params"]["clip_skip"] == 1


def test_a_bypassed_node_passes_the_input_comfyui_picks_even_when_it_is_not_linked():
    """ComfyUI's frontend picks the input a bypassed node passes on by type alone (the same slot if its type
    fits, else the first of that type); when the pick is not linked the target's input is left out, not
    taken from a later input of the same type."""
    def bypassed(inputs):
        editor = load("txt2img_editor.json")
        editor["nodes"].append({"id": 20, "type": "ImageCompositeMasked", "mode": 4, "inputs": inputs,
                                "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [9]}]})
        editor["links"] = [l for l in editor["links"] if l[0] != 9] + [  # VAEDecode -> 20 -> SaveImage
            [30, 8, 0, 20, next(k for k, i in enumerate(inputs) if i["link"] == 30), "IMAGE"],
            [9, 20, 0, 9, 0, "IMAGE"]]
        return editor_to_api(editor)["9"]["inputs"].get("images")

    image, mask = {"name": "source", "type": "IMAGE"}, {"name": "mask", "type": "MASK", "link": None}
    assert bypassed([{"name": "destination", "type": "IMAGE", "link": 30}, {**image, "link": None}, mask]) == ["8", 0]
    assert bypassed([{"name": "destination", "type": "IMAGE", "link": None}, {**image, "link": 30}, mask]) is None
    # the same slot holds another type: the first IMAGE input is the pick, linked or not
    latent = {"name": "samples", "type": "LATENT", "link": None}
    assert bypassed([latent, {"name": "a", "type": "IMAGE", "link": None}, {**image, "link": 30}]) is None
    assert bypassed([latent, {"name": "a", "type": "IMAGE", "link": 30}, {**image, "link": None}]) == ["8", 0]


def test_png_prompt_chunk_is_preferred_and_the_workflow_chunk_is_read_without_it(tmp_path):
    from PIL import Image, PngImagePlugin

    from nodegraph.workflow import load_comfy_document

    doc = load_comfy_document(DATA / "img2img_comfyui.png")
    assert doc == load("img2img_api.json")
    editor = load("txt2img_editor.json")
    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", json.dumps(editor))
    Image.new("RGB", (32, 32)).save(tmp_path / "editor_only.png", pnginfo=info)
    assert load_comfy_document(tmp_path / "editor_only.png") == editor
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(txt2img()))
    info.add_text("workflow", json.dumps({"nodes": [], "links": [], "version": 0.4}))
    Image.new("RGB", (32, 32)).save(tmp_path / "both.png", pnginfo=info)
    from nodegraph.api import Engine

    workflow = Engine(cache_dir=False).load(tmp_path / "both.png")
    assert set(workflow.nodes) == {"3", "4", "5", "6", "7", "8"}
    assert workflow.nodes["3"].type == "Sampler"


# ---------------------------------------------------------------------------------------------- problems

def test_unknown_types_are_all_listed_with_id_and_class_type():
    prompt = txt2img()
    prompt["20"] = {"class_type": "IPAdapterAdvanced", "inputs": {"model": ["4", 0]}}
    prompt["21"] = {"class_type": "UltimateSDUpscale", "inputs": {"image": ["8", 0]}}
    prompt["3"]["inputs"]["sampler_name"] = "dpmpp_3m_sde"
    found = problems(prompt)
    unknown = sorted((i.node_id, i.node_type) for i in found if i.code == "comfy_unknown_type")
    assert unknown == [("20", "IPAdapterAdvanced"), ("21", "UltimateSDUpscale")]
    assert any(i.node_id == "3" and i.field == "sampler_name" for i in found)  # reported in the same go
    assert all("20" in str(i) or "21" in str(i) or "'3'" in str(i) for i in found)


@pytest.mark.parametrize("sampler,scheduler,field", [("dpmpp_3m_sde", "normal", "sampler_name"),
                                                     ("lcm", "karras", "sampler_name"),
                                                     ("euler", "ddim_uniform", "scheduler"),
                                                     ("euler", "beta", "scheduler"),
                                                     ("euler_ancestral", "karras", "scheduler"),
                                                     ("ddim", "exponential", "scheduler")])
def test_unmapped_sampler_and_scheduler_names_name_node_input_and_value(sampler, scheduler, field):
    (issue,) = problems(txt2img(sampler_name=sampler, scheduler=scheduler))
    assert (issue.node_id, issue.node_type, issue.field) == ("3", "KSampler", field)
    assert issue.value == (sampler if field == "sampler_name" else scheduler)
    text = str(issue)
    assert "'3' (KSampler)" in text and field in text and repr(issue.value) in text


def test_a_bad_sampler_name_is_reported_also_when_the_scheduler_is_missing():
    prompt = txt2img(sampler_name="dpmpp_3m_sde")
    del prompt["3"]["inputs"]["scheduler"]
    assert {(i.field, i.value if i.has_value else None) for i in problems(prompt)} == {
        ("sampler_name", "dpmpp_3m_sde"), ("scheduler", None)}


def test_missing_links_cycles_and_bad_values_are_reported_together():
    prompt = txt2img(denoise=0)
    del prompt["6"]["inputs"]["clip"]
    prompt["8"]["inputs"]["samples"] = ["99", 0]
    prompt["10"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -20}}
    prompt["7"]["inputs"]["text"] = "embedding:EasyNegative, blurry"
    found = {(i.node_id, i.field) for i in problems(prompt)}
    assert {("6", "clip"), ("8", "samples"), ("3", "denoise"), ("10", "stop_at_clip_layer"), ("7", "text")} <= found


def test_ksampler_advanced_leftover_noise_that_comfyui_drops_is_refused():
    prompt = txt2img()
    inputs = prompt["3"]["inputs"]
    prompt["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **{k: inputs[k] for k in ("model", "positive", "negative", "latent_image", "steps", "cfg", "sampler_name",
                                  "scheduler")}, "noise_seed": 1, "add_noise": "enable", "start_at_step": 0,
        "end_at_step": 2, "return_with_leftover_noise": "disable"}}
    (issue,) = problems(prompt)
    assert issue.field == "return_with_leftover_noise" and issue.node_type == "KSamplerAdvanced"


# ---------------------------------------------------------------------------------------------- each type

def one(prompt: dict, cid: str) -> dict:
    return import_api(prompt)["nodes"][cid]


def test_sampler_and_scheduler_table():
    from nodegraph.nodes.schedulers import SCHEDULER_NAMES

    cases = {("euler", "normal"): "euler_linspace", ("euler_ancestral", "simple"): "euler_a_trailing",
             ("heun", "karras"): "heun_karras", ("dpm_2", "exponential"): "dpm_2_exponential",
             ("lms", "karras"): "lms_karras", ("dpmpp_2m", "karras"): "dpmpp_2m_karras",
             ("dpmpp_2m_sde", "sgm_uniform"): "dpmpp_2m_sde_trailing", ("dpmpp_sde", "normal"): "dpmpp_sde_linspace",
             ("ddim", "normal"): "ddim_linspace", ("uni_pc", "karras"): "unipc_karras", ("uni_pc_bh2", "simple"): "unipc_trailing"}
    for (sampler, schedule), expected in cases.items():
        assert expected in SCHEDULER_NAMES
        assert one(txt2img(sampler_name=sampler, scheduler=schedule), "3")["params"]["scheduler"] == expected


def test_denoise_follows_comfyui_step_convention():
    """ComfyUI: int(steps / denoise) steps in the schedule, the last `steps` of them run."""
    for steps in range(1, 41):
        for hundredths in range(1, 101):
            denoise = hundredths / 100
            total, strength = denoise_steps(steps, denoise)
            comfy_total = int(steps / denoise)
            if comfy_total <= steps:
                assert (total, strength) == (steps, 1.0)
                continue
            assert total == comfy_total and 0 < strength <= 1
            run = min(int(total * strength), total)  # diffusers' img2img step count
            assert run == steps, (steps, denoise)
    node = one(txt2img(steps=10, denoise=0.4), "3")
    assert node["params"]["steps"] == 25 and int(25 * node["params"]["strength"]) == 10


def test_clip_set_last_layer_and_lora_loader():
    prompt = txt2img()
    prompt["10"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -2}}
    prompt["11"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["10", 0],
                                                           "lora_name": "detail.safetensors", "strength_model": 0.7,
                                                           "strength_clip": 0.3}}
    prompt["6"]["inputs"]["clip"] = ["11", 1]
    prompt["3"]["inputs"]["model"] = ["11", 0]
    nodes = import_api(prompt)["nodes"]
    assert "10" not in nodes  # CLIPSetLastLayer has no node: it is CLIPEncode's clip_skip
    assert nodes["6"]["params"]["clip_skip"] == 1 and "clip_skip" not in nodes["7"]["params"]
    assert nodes["11_file"] == {"type": "LoadLoRA", "params": {"path": "detail.safetensors"}}
    assert nodes["11"] == {"type": "ApplyLoRA", "inputs": {"model": "4.model", "clip": "4.clip", "lora": "11_file.lora"},
                           "params": {"strength_model": 0.7, "strength_clip": 0.3}}
    assert nodes["6"]["inputs"]["clip"] == "11.clip" and nodes["3"]["inputs"]["model"] == "11.model"


def test_loaders_vae_and_clip_vision():
    prompt = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}},
              "2": {"class_type": "VAELoader", "inputs": {"vae_name": "vae-ft-mse-840000-ema-pruned.safetensors"}},
              "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vit_h.safetensors"}}}
    nodes = import_api(prompt)["nodes"]
    assert nodes["1"] == {"type": "LoadVAE", "params": {"path": "sdxl_vae.safetensors", "family": "sdxl"}}
    assert nodes["2"]["params"]["family"] == "sd1"
    assert "3" not in nodes
    (issue,) = problems({"1": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}})
    assert issue.field == "vae_name"


def inpaint_prompt(latent_type: str, **extra) -> dict:
    """A prompt sampling a photo latent through ``latent_type`` with a mask (node 11 is the image, 12 the mask)."""
    prompt = txt2img()
    prompt["11"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 2]}}  # an IMAGE
    prompt["12"] = {"class_type": "DummyMask", "inputs": {}}
    if latent_type == "VAEEncodeForInpaint":
        prompt["13"] = {"class_type": latent_type, "inputs": {"pixels": ["11", 0], "vae": ["4", 2],
                                                              "mask": ["12", 0], "grow_mask_by": 4}}
    elif latent_type == "SetLatentNoiseMask":
        prompt["14"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
        prompt["13"] = {"class_type": latent_type, "inputs": {"samples": ["14", 0], "mask": ["12", 0]}}
    else:
        prompt["13"] = {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2], "pixels": ["11", 0], "mask": ["12", 0],
            "noise_mask": True}}
        prompt["3"]["inputs"].update(positive=["13", 0], negative=["13", 1])
    prompt["3"]["inputs"]["latent_image"] = ["13", 2 if latent_type == "InpaintModelConditioning" else 0]
    prompt.update(extra)
    return prompt


def convert_with_mask(prompt: dict) -> dict:
    """Import with node 12 standing for any MASK output (InvertMask of a mask literal is not needed here)."""
    from nodegraph.comfy import convert

    def dummy(node, b):
        return [f"{b.add(node, 'MaskShape', params={'width': 64, 'height': 64})}.mask"]

    convert.CONVERTERS["DummyMask"] = dummy
    try:
        return import_api(prompt)["nodes"]
    finally:
        del convert.CONVERTERS["DummyMask"]


def test_vae_encode_for_inpaint_and_set_latent_noise_mask_make_a_latent_blend_sampler():
    nodes = convert_with_mask(inpaint_prompt("VAEEncodeForInpaint"))
    assert nodes["13"] == {"type": "VAEEncodeForInpaint", "inputs": {"vae": "4.vae", "image": "11.image",
                                                                     "mask": "12.mask"}, "params": {"grow_mask_by": 4}}
    assert nodes["3"]["type"] == "LatentBlendSampler"
    assert nodes["3"]["inputs"]["latent"] == "13.latent" and nodes["3"]["inputs"]["mask"] == "13.mask"
    nodes = convert_with_mask(inpaint_prompt("SetLatentNoiseMask"))
    assert "13" not in nodes and nodes["14"]["type"] == "VAEEncode"
    assert nodes["3"]["type"] == "LatentBlendSampler"
    assert nodes["3"]["inputs"]["latent"] == "14.latent" and nodes["3"]["inputs"]["mask"] == "12.mask"


def test_inpaint_model_conditioning_and_differential_diffusion():
    nodes = convert_with_mask(inpaint_prompt("InpaintModelConditioning"))
    assert nodes["13"]["type"] == "InpaintModelConditioning"
    assert nodes["3"]["type"] == "LatentBlendSampler"  # noise_mask: blended (with the channels on a 9-channel UNet)
    assert nodes["3"]["inputs"]["positive"] == "6.conditioning" and nodes["3"]["inputs"]["latent"] == "13.latent"
    assert nodes["3"]["inputs"]["mask"] == "12.mask"
    prompt = inpaint_prompt("InpaintModelConditioning")
    prompt["13"]["inputs"]["noise_mask"] = False
    assert convert_with_mask(prompt)["3"]["type"] == "Sampler"  # the inpainting UNet's channels only
    for latent_type, change_map in (("InpaintModelConditioning", "12.mask"), ("SetLatentNoiseMask", "12.mask"),
                                    ("VAEEncodeForInpaint", "13.mask")):
        prompt = inpaint_prompt(latent_type, **{"20": {"class_type": "DifferentialDiffusion",
                                                       "inputs": {"model": ["4", 0]}}})
        prompt["3"]["inputs"]["model"] = ["20", 0]
        nodes = convert_with_mask(prompt)
        assert "20" not in nodes
        assert nodes["3"]["type"] == "DifferentialSampler"
        assert nodes["3"]["inputs"]["change_map"] == change_map and nodes["3"]["inputs"]["model"] == "4.model"
    prompt["20"]["inputs"]["strength"] = 0.5
    with pytest.raises(WorkflowInvalid, match="strength"):
        convert_with_mask(prompt)


def split_at_step_2(prompt: dict, seed: int) -> dict:
    """The prompt's KSampler ("3") as two KSamplerAdvanced: steps 0-2 with leftover noise ("3"), then 2-end
    without adding noise ("10"), ComfyUI's base/refiner hand-off with one model."""
    prompt = copy.deepcopy(prompt)
    inputs = prompt["3"]["inputs"]
    shared = {k: inputs[k] for k in ("model", "positive", "negative", "steps", "cfg", "sampler_name", "scheduler")}
    prompt["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **shared, "latent_image": ["5", 0], "noise_seed": seed, "add_noise": "enable", "start_at_step": 0,
        "end_at_step": 2, "return_with_leftover_noise": "enable"}}
    prompt["10"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **shared, "latent_image": ["3", 0], "noise_seed": seed, "add_noise": "disable", "start_at_step": 2,
        "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    return prompt


def test_ksampler_advanced_steps():
    nodes = import_api(split_at_step_2(txt2img(), seed=5))["nodes"]
    assert nodes["3"]["params"] == {"seed": 5, "guidance_scale": 8, "steps": 3, "scheduler": "euler_linspace",
                                    "end_step": 2}
    assert nodes["10"]["params"] == {"seed": 5, "guidance_scale": 8, "steps": 3, "scheduler": "euler_linspace",
                                     "start_step": 2, "add_noise": False}


# ---------------------------------------------------------------------------------------------- arithmetic

def comfy_vae_encode_for_inpaint_prep(pixels, mask, grow_mask_by):
    """ComfyUI's VAEEncodeForInpaint up to the encode, written out on its own layouts (IMAGE (B, H, W, C),
    MASK (B, H, W)), for sides already multiples of 8."""
    import torch

    mask = torch.nn.functional.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])),
                                           size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
    pixels = pixels.clone()
    if grow_mask_by == 0:
        mask_erosion = mask
    else:
        kernel_tensor = torch.ones((1, 1, grow_mask_by, grow_mask_by))
        padding = math.ceil((grow_mask_by - 1) / 2)
        mask_erosion = torch.clamp(torch.nn.functional.conv2d(mask.round(), kernel_tensor, padding=padding), 0, 1)
    m = (1.0 - mask.round()).squeeze(1)
    for i in range(3):
        pixels[:, :, :, i] -= 0.5
        pixels[:, :, :, i] *= m
        pixels[:, :, :, i] += 0.5
    return pixels, mask_erosion[:, :, :pixels.shape[1], :pixels.shape[2]].round()


@pytest.mark.parametrize("grow", [0, 1, 4, 6, 7])
@pytest.mark.parametrize("mask_size", [(48, 64), (24, 32)])
def test_vae_encode_for_inpaint_pixels_and_mask_match_comfyui(grow, mask_size):
    import torch

    from nodegraph.nodes.latent import grey_masked

    g = torch.Generator().manual_seed(grow)
    image = torch.rand(2, 3, 48, 64, generator=g)
    mask = (torch.rand(1, 1, *mask_size, generator=g) > 0.8).float()
    mask[..., 3:5, 5:9] = 0.4  # soft values round down; the bilinear resize makes more
    grey, grown = grey_masked(image, mask, grow)
    ref_pixels, ref_mask = comfy_vae_encode_for_inpaint_prep(image.permute(0, 2, 3, 1), mask[:, 0], grow)
    assert torch.equal(grey, ref_pixels.permute(0, 3, 1, 2))
    assert torch.equal(grown, ref_mask)
    assert grown.sum() >= mask.round().sum() * (48 * 64) / (mask_size[0] * mask_size[1]) * 0.5  # it grew, not shrank


@pytest.fixture(scope="module")
def models_root(tiny, tmp_path_factory):
    """A ComfyUI-style models root with the tiny single-file checkpoint in checkpoints/ (and its config)."""
    root = tmp_path_factory.mktemp("comfy-models")
    (root / "checkpoints").mkdir()
    shutil.copy(tiny.sd15_file, root / "checkpoints" / "tiny-sd15.safetensors")
    shutil.copytree(tiny.sd15_file_config, root / "checkpoints" / "tiny-sd15.config")
    shutil.copy(tiny.sd15_inpaint_file, root / "checkpoints" / "tiny-sd15-inpaint.safetensors")
    shutil.copytree(tiny.sd15_inpaint_file_config, root / "checkpoints" / "tiny-sd15-inpaint.config")
    return root


@pytest.fixture(scope="module")
def engine(models_root, tmp_path_factory):
    from nodegraph.api import Engine

    engine = Engine(cache_dir=False, models=[models_root])
    engine.out = tmp_path_factory.mktemp("comfy-out")  # targets write nothing there
    return engine


def run_latent(engine, prompt, node="3"):
    result = engine.run(prompt, targets=[node], device="cpu", out_dir=engine.out)
    return result.outputs[node]["latent"].samples


def diffusers_pipe(engine, cls_name, scheduler_cls, **overrides):
    import diffusers

    from nodegraph.nodes.models import inspect_checkpoint, load_checkpoint

    path = engine.models.find("checkpoints", "tiny-sd15.safetensors")
    model, clip, vae = load_checkpoint(inspect_checkpoint(str(path)))
    scheduler = getattr(diffusers, scheduler_cls).from_config(model.scheduler_config, **overrides)
    pipe = getattr(diffusers, cls_name)(vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer,
                                        unet=model.unet, scheduler=scheduler, safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, vae


POSITIVE = "beautiful scenery nature glass bottle landscape, purple galaxy bottle,"


@pytest.mark.parametrize("sampler,schedule,cls,overrides", [
    ("euler", "normal", "EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    ("dpmpp_2m", "karras", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    ("euler_ancestral", "simple", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
])
def test_ksampler_matches_the_diffusers_pipeline_with_the_mapped_scheduler(engine, sampler, schedule, cls, overrides):
    """KSampler(denoise 1) on ComfyUI's default graph = StableDiffusionPipeline with the mapped scheduler and the
    noise ComfyUI's prepare_noise draws (torch.manual_seed(seed); randn on the CPU)."""
    import torch

    ours = run_latent(engine, txt2img(sampler_name=sampler, scheduler=schedule, seed=7))
    pipe, _ = diffusers_pipe(engine, "StableDiffusionPipeline", cls, **overrides)
    generator = torch.manual_seed(7)
    noise = torch.randn((1, 4, 8, 8), generator=generator)
    ref = pipe(prompt=POSITIVE, negative_prompt="text, watermark", latents=noise, generator=generator,
               num_inference_steps=3, height=64, width=64, guidance_scale=8.0, output_type="latent").images
    assert (ours - ref).abs().max() <= 1e-4


def test_ksampler_denoise_runs_the_last_steps_of_the_longer_schedule(engine):
    """denoise 0.5, 2 steps: ComfyUI runs the last 2 of a 4-step schedule from the image noised to its third
    sigma; here that is the img2img pipeline with 4 steps and the last 2 run."""
    import torch
    import torch.nn.functional as F

    from nodegraph.nodes.latent import encode_pixels

    prompt = txt2img(denoise=0.5, steps=2, seed=3)
    prompt["11"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 2]}}
    prompt["12"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
    prompt["3"]["inputs"]["latent_image"] = ["12", 0]
    ours = run_latent(engine, prompt)
    image = engine.run(prompt, targets=["11"], device="cpu", out_dir=engine.out).outputs["11"]["image"]
    pipe, vae = diffusers_pipe(engine, "StableDiffusionImg2ImgPipeline", "EulerDiscreteScheduler",
                               timestep_spacing="linspace")
    x0 = encode_pixels(vae, image)
    generator = torch.manual_seed(3)
    ref = pipe(prompt=POSITIVE, negative_prompt="text, watermark", image=x0, strength=0.5, generator=generator,
               num_inference_steps=4, guidance_scale=8.0, output_type="latent").images
    assert (ours - ref).abs().max() <= 1e-4
    scheduler = pipe.scheduler
    scheduler.set_timesteps(4)
    assert scheduler.timesteps[-2:].tolist() == [t for t in scheduler.timesteps.tolist()[2:]]  # the last 2 of 4
    assert F.mse_loss(ours, x0) > 0  # something ran


def test_ksampler_advanced_split_equals_one_run(engine):
    """ComfyUI's base/refiner hand-off with one model: steps 0-2 with leftover noise, then 2-4 without adding
    noise, gives the single 4-step run (Euler is deterministic and stateless between steps)."""
    import torch

    full = txt2img(steps=4, seed=9)
    whole = run_latent(engine, full)
    split = split_at_step_2(full, seed=9)
    first = run_latent(engine, split, "3")
    second = run_latent(engine, split, "10")
    assert (second - whole).abs().max() <= 1e-5
    assert (first - whole).abs().max() > 0.1  # the first half alone is still noisy
    assert torch.isfinite(second).all()


def test_vae_encode_for_inpaint_node_encodes_the_greyed_image(engine, sd):
    """The node's latent is the VAE mean of ComfyUI's greyed pixels, its mask ComfyUI's grown noise mask."""
    import torch

    from nodegraph.nodes.latent import encode_pixels, vae_encode_for_inpaint_node
    from nodegraph.context import RunContext

    _, _, vae = sd
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=g)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 20:40, 10:30] = 1
    out = vae_encode_for_inpaint_node(vae, image, mask, 6, ctx=RunContext())
    ref_pixels, ref_mask = comfy_vae_encode_for_inpaint_prep(image.permute(0, 2, 3, 1), mask[:, 0], 6)
    assert torch.equal(out["mask"], ref_mask)
    expected = encode_pixels(vae, ref_pixels.permute(0, 3, 1, 2))
    assert (out["latent"].samples - expected).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------- CLI, engine

def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nodegraph.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                     "NODEGRAPH_CACHE_DIR": "off", "NODEGRAPH_MODEL_PATHS": "off"})


def test_cli_import_writes_a_readable_workflow_and_refuses_what_it_cannot(tmp_path):
    out = tmp_path / "workflow.json"
    done = cli("import", DATA / "txt2img_editor.json", "-o", out)
    if "SaveImage" not in converters():  # the editor's SaveImage needs the pixel types
        assert done.returncode == 2 and "'9' (SaveImage)" in done.stderr and not out.exists()
    else:
        assert done.returncode == 0, done.stderr
        assert json.loads(out.read_text())["nodes"]["3"]["type"] == "Sampler"
    api = tmp_path / "api.json"
    api.write_text(json.dumps(txt2img()))
    printed = cli("import", api)
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == to_nodegraph(txt2img())
    assert "\n  " in printed.stdout  # indented, for reading
    bad = copy.deepcopy(txt2img(scheduler="beta"))
    bad["30"] = {"class_type": "CustomThing", "inputs": {}}
    api.write_text(json.dumps(bad))
    out.unlink(missing_ok=True)
    refused = cli("import", api, "-o", out)
    assert refused.returncode == 2 and not out.exists()
    assert "node '30' (CustomThing)" in refused.stderr and "node '3' (KSampler): input 'scheduler'" in refused.stderr
    assert "Traceback" not in refused.stderr
    native = cli("import", REPO / "workflows" / "outpaint_telea.json")
    assert native.returncode == 2 and "not a ComfyUI workflow" in native.stderr


def test_validate_and_run_take_comfyui_files(tmp_path, models_root):
    api = tmp_path / "api.json"
    api.write_text(json.dumps(txt2img()))
    done = cli("validate", api, "--models", models_root, "--json")
    assert done.returncode == 2  # no output node without SaveImage, but the import itself went through
    errors = json.loads(done.stdout)["errors"]
    assert all(e.get("node_type") not in ("KSampler",) for e in errors)
    bad = txt2img(sampler_name="dpmpp_3m_sde")
    api.write_text(json.dumps(bad))
    done = cli("validate", api, "--models", models_root, "--json")
    assert done.returncode == 2
    (error,) = json.loads(done.stdout)["errors"]
    assert error["node_id"] == "3" and error["node_type"] == "KSampler" and error["field"] == "sampler_name"


# ---------------------------------------------------------------------------------------------- end to end

def prepare(tmp_path: Path, name: str) -> Path:
    """The data workflow copied beside the input images it names (ComfyUI's input folder)."""
    import numpy as np
    from PIL import Image

    shutil.copy(DATA / name, tmp_path / name)
    g = np.random.default_rng(1)
    rgba = (np.kron(g.random((4, 4, 4)), np.ones((16, 16, 1))) * 255).astype(np.uint8)
    rgba[..., 3] = 255
    rgba[16:48, 16:48, 3] = 0  # ComfyUI's LoadImage mask: the transparent square is repainted
    Image.fromarray(rgba).save(tmp_path / "inpaint_source.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "img2img_source.png")
    return tmp_path / name


@PIXEL_TYPES
@pytest.mark.parametrize("name", ["txt2img_api.json", "txt2img_editor.json", "inpaint_editor.json",
                                  "img2img_comfyui.png"])
def test_data_workflows_run_end_to_end(tmp_path, engine, name):
    import numpy as np
    from PIL import Image

    source = prepare(tmp_path, name)
    result = engine.run(source, out_dir=tmp_path / "out", device="cpu")
    assert set(result.status.values()) <= {"ran", "cached", "skipped"}  # the same graph may have run before
    pngs = sorted((tmp_path / "out").rglob("*.png"))
    assert len(pngs) == 1
    pixels = np.asarray(Image.open(pngs[0]))
    assert pixels.shape[:2] == (64, 64) and pixels.std() > 0
    workflow = engine.load(source)
    sampler = {"txt2img_api.json": "3", "txt2img_editor.json": "3", "inpaint_editor.json": "9",
               "img2img_comfyui.png": "6"}[name]
    expected = {"inpaint_editor.json": "LatentBlendSampler"}.get(name, "Sampler")
    assert workflow.nodes[sampler].type == expected


@PIXEL_TYPES
def test_an_outpainting_workflow_runs_end_to_end(tmp_path, engine):
    """ComfyUI's outpainting example shape: pad the photo, VAEEncodeForInpaint, an inpainting checkpoint, weighted
    prompts."""
    import numpy as np
    from PIL import Image

    source = prepare(tmp_path, "outpaint_api.json")
    workflow = engine.load(source)
    assert workflow.nodes["5"].params["syntax"] == "comfy" and workflow.nodes["3"].type == "PadImage"
    result = engine.run(source, out_dir=tmp_path / "out", device="cpu")
    (png,) = sorted((tmp_path / "out").rglob("*.png"))
    pixels = np.asarray(Image.open(png))
    assert pixels.shape[:2] == (64, 96) and pixels[:, 64:].std() > 0
    assert result.status["7"] == "ran"
    # the inpainting UNet's extra channels, as ComfyUI's concat_cond makes them from a VAEEncodeForInpaint latent:
    # the noise mask resized bilinearly to the latent and rounded, and the latent itself as the masked image
    encoded = engine.run(source, targets=["4"], out_dir=tmp_path / "out", device="cpu").outputs["4"]
    latent, noise_mask = encoded["latent"], encoded["mask"]
    import torch

    expected = torch.nn.functional.interpolate(noise_mask, size=(8, 12), mode="bilinear").round()
    assert torch.equal(latent.inpaint_mask, expected) and latent.masked_image_latents is latent.samples
    assert expected[..., 8:].min() == 1 and expected[..., :6].max() == 0  # the new strip is repainted


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "ddim",
                                     "uni_pc", "uni_pc_bh2", "lms", "dpmpp_sde"])
@pytest.mark.parametrize("schedule", ["normal", "karras", "simple"])
def test_every_mapped_sampler_runs(engine, sampler, schedule):
    """Each mapped sampler and schedule gives finite latents on the tiny model (img2img at denoise 0.7 too), or
    says which package its diffusers scheduler needs."""
    import torch

    from nodegraph.errors import NodeFailed

    if sampler in ("euler_ancestral", "ddim") and schedule == "karras":
        return  # refused at import (tested above)
    prompt = txt2img(sampler_name=sampler, scheduler=schedule, steps=4)
    try:
        latent = run_latent(engine, prompt)
    except NodeFailed as exc:
        assert sampler in ("lms", "dpmpp_sde") and "pip install" in str(exc)
        return
    assert torch.isfinite(latent).all()


def test_damaged_editor_files_are_problems_never_crashes():
    base = load("txt2img_editor.json")
    damaged = []
    for mutate in (lambda d: d["links"].append([[1], 4, 0, 3, 0, "MODEL"]),
                   lambda d: d["links"].append([99, 4, "x", 3, 0, "MODEL"]),
                   lambda d: d["links"].append("nonsense"),
                   lambda d: d["nodes"].append({"id": [1], "type": "KSampler"}),
                   lambda d: d["nodes"][0].update(inputs="clip"),
                   lambda d: d["nodes"][3].update(widgets_values=None),
                   lambda d: d["nodes"][3].update(widgets_values={"seed": 5, "bogus": 1}),
                   lambda d: d["nodes"][3]["inputs"].append({"name": ["x"], "link": 1})):
        doc = copy.deepcopy(base)
        mutate(doc)
        damaged.append(doc)
    for doc in damaged:
        try:
            to_nodegraph(doc)
        except WorkflowInvalid as exc:
            assert exc.issues


@pytest.mark.parametrize("junk", [[1, 2, 3], {"a": 1}, None, "x", -1, 1e309, True])
def test_junk_values_in_every_type_are_problems_never_crashes(junk):
    from nodegraph.comfy.convert import SPECS

    for class_type, spec in sorted(SPECS.items()):
        prompt = txt2img()
        prompt["50"] = {"class_type": class_type, "inputs": {name: junk for name in {**spec.required, **spec.optional}}}
        try:
            workflow = to_nodegraph(prompt)
        except WorkflowInvalid as exc:
            assert all(i.node_id for i in exc.issues)
        else:
            assert "format" in workflow


def test_a_second_ksampler_on_a_masked_latent_keeps_the_mask():
    """ComfyUI's KSampler returns its latent with the noise mask it was given (``out = latent.copy()``), so a
    refining pass after an inpainting pass repaints only the mask too."""
    for latent_type, mask in (("VAEEncodeForInpaint", "13.mask"), ("SetLatentNoiseMask", "12.mask")):
        prompt = inpaint_prompt(latent_type)
        prompt["30"] = {"class_type": "KSampler", "inputs": {**prompt["3"]["inputs"], "latent_image": ["3", 0],
                                                             "denoise": 0.5}}
        nodes = convert_with_mask(prompt)
        assert nodes["30"]["type"] == "LatentBlendSampler"
        assert nodes["30"]["inputs"]["latent"] == "3.latent" and nodes["30"]["inputs"]["mask"] == mask
    prompt = txt2img()  # without a mask the second pass stays a plain Sampler
    prompt["30"] = {"class_type": "KSampler", "inputs": {**prompt["3"]["inputs"], "latent_image": ["3", 0]}}
    assert to_nodegraph(prompt)["nodes"]["30"]["type"] == "Sampler"


@pytest.mark.parametrize("inputs", [{"denoise": 5e-324}, {"denoise": 1e-310}, {"denoise": 0.001, "steps": 10**400}])
def test_a_denoise_whose_schedule_cannot_be_run_names_ksampler_and_denoise(inputs):
    issues = problems(txt2img(**inputs))
    assert [(i.node_id, i.node_type, i.field) for i in issues] == [("3", "KSampler", "denoise")]
    assert "steps" in issues[0].message


def test_a_denoise_beyond_nodegraph_s_step_bound_is_reported_on_denoise():
    """20 steps at denoise 0.01 is ComfyUI's 2000-step schedule: more than nodegraph's samplers take, which the
    user is told about denoise, the value they set, not about a steps param they never wrote."""
    issues = problems(txt2img(steps=20, denoise=0.01))
    assert [(i.node_id, i.node_type, i.field) for i in issues] == [("3", "KSampler", "denoise")]
    assert "2000" in issues[0].message


@pytest.mark.parametrize("denoise", [1, 0.5])
def test_a_steps_that_is_no_number_is_reported_on_steps_not_denoise(denoise):
    workflow = to_nodegraph(txt2img(steps=[1], denoise=denoise))  # the denoise is fine: no importer problem
    issues = [i for i in Engine().validate(workflow) if i.node_id == "3"]
    assert [(i.field, i.message) for i in issues] == [("steps", "Input should be a valid integer")]


@pytest.mark.parametrize("as_text", ["links", "nodes"])
def test_editor_node_ids_match_whether_written_as_numbers_or_strings(as_text):
    """The editor looks nodes up by id as object keys, so 4 and "4" are the same node; files written by other
    tools mix them."""
    editor = load("txt2img_editor.json")
    expected = editor_to_api(copy.deepcopy(editor))
    if as_text == "links":
        for link in editor["links"]:
            link[1], link[3] = str(link[1]), str(link[3])
    else:
        for node in editor["nodes"]:
            node["id"] = str(node["id"])
    assert editor_to_api(editor) == expected


@pytest.mark.parametrize("same_id", [7, "7"])
def test_editor_duplicate_node_ids_are_a_problem_not_a_silent_pick(same_id):
    """Two nodes with one id: which one the links meant cannot be told, so neither prompt is taken silently."""
    editor = load("txt2img_editor.json")
    copy_of_7 = copy.deepcopy(next(n for n in editor["nodes"] if n["id"] == 7))
    copy_of_7["id"] = same_id
    copy_of_7["widgets_values"] = ["a different prompt"]
    editor["nodes"].append(copy_of_7)
    with pytest.raises(WorkflowInvalid) as caught:
        editor_to_api(editor)
    assert [(i.node_id, "more than one node" in i.message) for i in caught.value.issues] == [("7", True)]


@PIXEL_TYPES
def test_a_refining_pass_after_inpainting_changes_only_the_mask(tmp_path, engine):
    """The inpainting example with a second KSampler (denoise 0.5) on the first one's latent: as in ComfyUI, the
    latent still carries its noise mask, so outside the mask the second pass returns its input unchanged."""
    import torch
    import torch.nn.functional as F

    prompt = editor_to_api(json.loads(prepare(tmp_path, "inpaint_editor.json").read_text()))
    prompt["20"] = {"class_type": "KSampler", "inputs": {**prompt["9"]["inputs"], "latent_image": ["9", 0],
                                                         "seed": 7, "denoise": 0.5}}
    prompt["11"]["inputs"]["samples"] = ["20", 0]
    source = tmp_path / "refine_api.json"
    source.write_text(json.dumps(prompt))
    outputs = engine.run(source, targets=["8", "9", "20"], out_dir=tmp_path / "out", device="cpu").outputs
    first, second = outputs["9"]["latent"].samples, outputs["20"]["latent"].samples
    keep = F.interpolate(outputs["8"]["mask"], size=first.shape[-2:], mode="nearest") < 0.5
    assert keep.any() and (~keep).any()
    assert torch.equal(torch.where(keep, second, 0), torch.where(keep, first, 0))
    assert not torch.allclose(second, first)


@PIXEL_TYPES
def test_editor_upload_button_value_follows_the_required_widgets():
    """ComfyUI's editor appends the upload button to the required inputs, so LoadImageMask saves the channel
    before the button's value; files saved before the button was stored lack it."""
    for values in (["m.png", "red", "image"], ["m.png", "red"]):
        doc = {"nodes": [{"id": 2, "type": "LoadImageMask", "mode": 0, "widgets_values": values,
                          "outputs": [{"name": "MASK", "type": "MASK", "links": [1]}]},
                         {"id": 3, "type": "InvertMask", "mode": 0, "inputs": [{"name": "mask", "type": "MASK",
                                                                                 "link": 1}]}],
               "links": [[1, 2, 0, 3, 0, "MASK"]]}
        assert editor_to_api(doc)["2"]["inputs"] == {"image": "m.png", "channel": "red"}
        assert to_nodegraph(doc)["nodes"]["2_channel"]["params"] == {"channel": "red"}
    load_image = {"nodes": [{"id": 6, "type": "LoadImage", "mode": 0, "widgets_values": ["photo.png", "image"]}],
                  "links": []}
    assert editor_to_api(load_image)["6"]["inputs"] == {"image": "photo.png"}


def test_cli_import_into_a_folder_or_a_pipe_never_replaces_it(tmp_path):
    """-o naming a folder is a usage error; a pipe or a device (/dev/stdout, /dev/null) is written to, never
    replaced by a file (as root, replacing /dev/null would break the whole system)."""
    import os
    import stat

    api = tmp_path / "api.json"
    api.write_text(json.dumps(txt2img()))
    folder = tmp_path / "out"
    folder.mkdir()
    done = cli("import", api, "-o", folder)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "folder" in done.stderr
    assert folder.is_dir() and not any(folder.iterdir())
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # a reader is there, so the writer does not wait
    try:
        done = cli("import", api, "-o", pipe)
        assert done.returncode == 0, done.stderr
        assert stat.S_ISFIFO(os.stat(pipe).st_mode)
        received = b""
        while chunk := os.read(reader, 65536):
            received += chunk
    finally:
        os.close(reader)
    assert json.loads(received) == to_nodegraph(txt2img())


def test_long_chains_import_without_exhausting_the_stack():
    """Depth is bounded by the node limit (100,000), not by Python's recursion limit: a generated workflow with a
    long chain (or a long line of reroutes) imports, and a cycle in one is still reported."""
    prompt = {"0": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    for i in range(1, 3000):
        prompt[str(i)] = {"class_type": "LatentUpscaleBy", "inputs": {
            "samples": [str(i - 1), 0], "upscale_method": "nearest-exact", "scale_by": 1.0}}
    prompt = dict(reversed(prompt.items()))  # the last node first: its sources are found by following links
    nodes = to_nodegraph(prompt)["nodes"]
    assert len(nodes) == 3000 and nodes["2999"]["inputs"] == {"latent": "2998.latent"}
    prompt["0"] = {"class_type": "LatentUpscaleBy", "inputs": {
        "samples": ["2999", 0], "upscale_method": "nearest-exact", "scale_by": 1.0}}
    assert any("cycle" in i.message for i in problems(prompt))

    editor_nodes = [{"id": 1, "type": "EmptyLatentImage", "mode": 0, "widgets_values": [64, 64, 1]}]
    links = []
    for i in range(2, 2000):
        editor_nodes.append({"id": i, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": i}]})
        links.append([i, i - 1, 0, i, 0, "LATENT"])
    editor_nodes.append({"id": 5000, "type": "LatentUpscaleBy", "mode": 0, "widgets_values": ["nearest-exact", 1.0],
                         "inputs": [{"name": "samples", "type": "LATENT", "link": 5000}]})
    links.append([5000, 1999, 0, 5000, 0, "LATENT"])
    assert editor_to_api({"nodes": editor_nodes, "links": links})["5000"]["inputs"]["samples"] == ["1", 0]


def test_the_workflow_of_a_very_large_png_is_read(tmp_path):
    """Only the text chunks are read, never the pixels: a 16384 x 16384 PNG (ComfyUI's largest side), which
    Pillow's decompression-bomb guard refuses to decode, still gives its workflow."""
    import struct
    import zlib

    from nodegraph.workflow import load_comfy_document

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 16384, 16384, 8, 2, 0, 0, 0)
    png = tmp_path / "upscaled.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                    + chunk(b"tEXt", b"prompt\0" + json.dumps(txt2img()).encode())
                    + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    assert load_comfy_document(png) == txt2img()


def test_an_api_prompt_with_a_broken_node_is_still_read_as_one():
    """One node without class_type (a hand edit, a tool's bug) is reported as that node's problem, not as a
    nodegraph workflow missing "format" and "nodes"."""
    for wrap in (lambda p: p, lambda p: {"prompt": p, "client_id": "abc"}):
        prompt = txt2img()
        del prompt["5"]["class_type"]
        prompt["20"] = None
        assert detect_format(wrap(prompt)) == COMFY_API
        issues = problems(wrap(prompt))
        assert {(i.node_id, i.message) for i in issues if "not a ComfyUI node" in i.message} == {
            ("5", "is not a ComfyUI node (it needs class_type and inputs)"),
            ("20", "is not a ComfyUI node (it needs class_type and inputs)")}
        assert all(i.node_id for i in issues)


def test_editor_subgraphs_and_group_nodes_say_to_export_the_api_format():
    """A subgraph's node type is its id (a UUID) and a group node's is "workflow>name": neither is a custom
    node. ComfyUI's API export flattens both, so that is what the problem points to."""
    editor = load("txt2img_editor.json")
    uuid = "0f3b8c1e-5d2a-4c7b-9e61-2a4d8f0c7b13"
    editor["definitions"] = {"subgraphs": [{"id": uuid, "name": "Hires fix", "nodes": [], "links": []}]}
    editor["extra"]["groupNodes"] = {"Face fix": {"nodes": [], "links": []}}
    editor["nodes"] += [{"id": 30, "type": uuid, "mode": 0, "inputs": [], "outputs": []},
                        {"id": 31, "type": "workflow>Face fix", "mode": 0, "inputs": [], "outputs": []}]
    issues = {i.node_id: i for i in problems(editor)}
    assert "Hires fix" in issues["30"].message and "Export (API)" in issues["30"].message
    assert "Face fix" in issues["31"].message and "Export (API)" in issues["31"].message
    assert all("custom node" not in i.message for i in issues.values())


def test_a_null_value_is_a_problem_not_nodegraph_s_default():
    """ComfyUI refuses a null widget value ("Failed to convert an input value"); taking nodegraph's default
    instead (seed 0, 25 steps, a 512-pixel side) would run something the prompt never asked for."""
    prompt = txt2img(seed=None, steps=None, cfg=None, denoise=None)
    prompt["5"]["inputs"]["width"] = None
    issues = problems(prompt)
    assert sorted((i.node_id, i.node_type, i.field) for i in issues) == [
        ("3", "KSampler", "cfg"), ("3", "KSampler", "denoise"), ("3", "KSampler", "seed"), ("3", "KSampler", "steps"),
        ("5", "EmptyLatentImage", "width")]
    assert all("null" in i.message for i in issues)


def comfy_webp(path: Path, prompt: dict | None, workflow: dict | None) -> Path:
    """A WebP written as ComfyUI's SaveAnimatedWEBP writes it: the prompt and the editor workflow as
    "<key>:<json>" text tags of the EXIF (0x0110, then 0x010F counting down), two frames."""
    from PIL import Image

    frames = [Image.new("RGB", (32, 32), (i * 90, 40, 200)) for i in range(2)]
    metadata = frames[0].getexif()
    if prompt is not None:
        metadata[0x0110] = f"prompt:{json.dumps(prompt)}"
    if workflow is not None:
        metadata[0x010F] = f"workflow:{json.dumps(workflow)}"
    frames[0].save(path, save_all=True, duration=166, append_images=frames[1:], exif=metadata, lossless=True,
                   quality=80, method=4)
    return path


def test_a_comfyui_webp_gives_its_workflow_and_other_images_say_which_carry_one(tmp_path, models_root):
    from PIL import Image

    editor = load("txt2img_editor.json")
    both = comfy_webp(tmp_path / "ComfyUI_00001_.webp", txt2img(), editor)
    printed = cli("import", both)
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == to_nodegraph(txt2img())  # the prompt, as from a PNG
    workflow = Engine(cache_dir=False).load(comfy_webp(tmp_path / "editor.webp", None, editor))
    assert workflow.nodes["3"].type == "Sampler"
    bad = comfy_webp(tmp_path / "bad.webp", txt2img(sampler_name="dpmpp_3m_sde"), None)
    done = cli("validate", bad, "--models", models_root, "--json")
    assert done.returncode == 2
    (error,) = json.loads(done.stdout)["errors"]
    assert error["node_id"] == "3" and error["field"] == "sampler_name"
    plain_webp = tmp_path / "photo.webp"
    Image.new("RGB", (32, 32)).save(plain_webp)
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (32, 32)).save(photo)
    for image, words in ((plain_webp, "has no embedded workflow"), (photo, "is a JPEG image")):
        for command in ("run", "validate", "import"):
            done = cli(command, image)
            assert done.returncode == 2, done.stderr
            assert words in done.stderr and "WebP images saved by ComfyUI" in done.stderr, done.stderr
            assert "JSON syntax" not in done.stderr and "Traceback" not in done.stderr


def test_two_comfyui_ids_that_clean_up_to_one_nodegraph_id_are_a_problem_not_a_silent_merge():
    """Export (API) of a subgraph gives ids such as "12:5", which become "12_5"; a node already called "12_5"
    must not be replaced by it (its sampler would run on the other latent)."""
    prompt = txt2img()
    prompt["12:5"] = prompt.pop("5")
    prompt["12:5"]["inputs"]["width"] = 128
    prompt["3"]["inputs"]["latent_image"] = ["12:5", 0]
    assert to_nodegraph(prompt)["nodes"]["12_5"]["params"]["width"] == 128
    prompt["12_5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    (issue,) = problems(prompt)
    assert issue.node_id == "12_5" and issue.node_type == "EmptyLatentImage" and "node '12:5'" in issue.message
