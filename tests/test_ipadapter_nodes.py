"""LoadIPAdapter / ApplyIPAdapter: the shared UNet is untouched outside patched runs, workflows, bad input."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nodegraph.api import Engine
from nodegraph.errors import Interrupted, NodeError, NodeFailed, WorkflowInvalid
from nodegraph.nodes import denoise
from nodegraph.nodes.conditioning import encode_prompt
from nodegraph.nodes.io import load_image_file
from nodegraph.nodes.ipadapter import apply_ip_adapter, inspect_adapter, load_ip_adapter, unet_fit_problem
from nodegraph.nodes.latent import empty_latent
from nodegraph.nodes.outpaint import square_slices
from tests.tiny_ipadapter import TINY_VISION, build_image_encoder, build_ip_adapter, build_tiny_ipadapters
from tests.tiny_models import TINY_UNET

DATA = Path(__file__).parent / "data"
PHOTO = DATA / "chelsea_128.png"


@pytest.fixture(scope="module")
def sd1_ip(tiny, sd, tmp_path_factory):
    """The session's tiny SD 1.x checkpoint with IP-Adapters that fit its UNet."""
    return tiny.sd15, sd, build_tiny_ipadapters(tmp_path_factory.mktemp("ipadapter-nodes"), sd[0].unet)


@pytest.fixture(scope="module")
def slices():
    return square_slices(load_image_file(PHOTO)[0], 2, 3, "grid")


def sample(model, clip, seed=1, progress=None):
    return denoise.sample(model, encode_prompt(clip, "a cat"), None, empty_latent(64, 64), seed=seed, steps=3,
                          guidance_scale=4.0, scheduler="dpmpp_2m_karras", strength=1.0, progress=progress)


def unet_state(unet):
    return ({name: id(proc) for name, proc in unet.attn_processors.items()}, unet.encoder_hid_proj,
            unet.config.encoder_hid_dim_type, dict(unet.config).get("encoder_hid_dim_type"),
            sorted(unet.state_dict()))


# ---------------------------------------------------------------------------------------------- restore

@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_the_unpatched_model_is_unchanged_by_a_patched_run(sd1_ip, slices, kind):
    _, (model, clip, _), adapters = sd1_ip
    before_state = unet_state(model.unet)
    before = sample(model, clip)
    patched = apply_ip_adapter(model, load_ip_adapter(getattr(adapters, kind), adapters.encoder), slices, 1.0)
    assert model.patches == () and len(patched.patches) == 1 and patched.unet is model.unet
    assert unet_state(model.unet) == before_state  # applying builds the modules but installs nothing
    with_ip = sample(patched, clip)
    assert unet_state(model.unet) == before_state  # the same processor objects, no encoder_hid_proj, same config
    after = sample(model, clip)
    assert torch.equal(before, after)
    assert (with_ip - before).abs().max() > 1e-2


def test_the_unet_is_restored_when_a_patched_run_is_interrupted(sd1_ip, slices):
    _, (model, clip, _), adapters = sd1_ip
    before_state = unet_state(model.unet)
    patched = apply_ip_adapter(model, load_ip_adapter(adapters.plus, adapters.encoder), slices, 1.0)
    seen = []

    def stop_at_two(step, total):
        seen.append(model.unet.config.encoder_hid_dim_type)
        if step == 2:
            raise Interrupted()

    with pytest.raises(Interrupted):
        sample(patched, clip, progress=stop_at_two)
    assert seen == ["ip_image_proj"] * 2  # installed while sampling
    assert unet_state(model.unet) == before_state


def test_scale_zero_samples_like_the_plain_model_and_scale_matters(sd1_ip, slices):
    _, (model, clip, _), adapters = sd1_ip
    adapter = load_ip_adapter(adapters.plain, adapters.encoder)
    plain = sample(model, clip)
    off = sample(apply_ip_adapter(model, adapter, slices, 0.0), clip)
    assert (off - plain).abs().max() < 1e-5
    weak, strong = (sample(apply_ip_adapter(model, adapter, slices, s), clip) for s in (0.1, 1.0))
    assert 1e-4 < (weak - plain).abs().max() < (strong - plain).abs().max()


def test_every_slice_counts_and_their_order_does_not(sd1_ip, slices):
    """The UNet attends to the tokens of all the images together (attention is order-free over keys)."""
    _, (model, clip, _), adapters = sd1_ip
    adapter = load_ip_adapter(adapters.plain, adapters.encoder)
    six = sample(apply_ip_adapter(model, adapter, slices, 1.0), clip)
    reordered = sample(apply_ip_adapter(model, adapter, slices.flip(0), 1.0), clip)
    five = sample(apply_ip_adapter(model, adapter, slices[:5], 1.0), clip)
    assert (six - reordered).abs().max() < 1e-4
    assert (six - five).abs().max() > 1e-3


def test_image_embeds_are_computed_once_and_the_inputs_are_not_modified(sd1_ip, slices):
    _, (model, _, _), adapters = sd1_ip
    adapter = load_ip_adapter(adapters.plus, adapters.encoder)
    original = slices.clone()
    patch = apply_ip_adapter(model, adapter, slices, 0.5).patches[0]
    assert torch.equal(slices, original)
    entry = patch.entries[0]
    assert entry.positive.shape == (1, 6, 17, TINY_VISION["hidden_size"])  # 4x4 patches + CLS, penultimate layer
    assert entry.negative.abs().max() > 0  # plus: the encoder's hidden states of a zero image, not zeros
    plain_entry = apply_ip_adapter(model, load_ip_adapter(adapters.plain, adapters.encoder), slices, 0.5).patches[0]
    assert plain_entry.entries[0].positive.shape == (1, 6, TINY_VISION["projection_dim"])
    assert torch.count_nonzero(plain_entry.entries[0].negative) == 0  # plain: zeros, as diffusers


def test_adapter_modules_are_built_once_per_unet_and_shared(sd1_ip, slices):
    """Each expansion of the panorama workflow applies the same adapter to new slices: one set of modules."""
    _, (model, _, _), adapters = sd1_ip
    adapter = load_ip_adapter(adapters.plain, adapters.encoder)
    a = apply_ip_adapter(model, adapter, slices[:2], 0.1).patches[0]
    b = apply_ip_adapter(model, adapter, slices[2:], 0.9).patches[0]
    assert a.projection is b.projection and a.processors == b.processors
    assert a.scales == [0.1] and b.scales == [0.9]
    assert not torch.equal(a.entries[0].positive, b.entries[0].positive)


# ---------------------------------------------------------------------------------------------- workflows

def workflow(sd1_ip, scale=0.1) -> dict:
    folder, _, adapters = sd1_ip
    return {
        "format": "nodegraph/1",
        "nodes": {
            "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(folder)}},
            "photo": {"type": "LoadImage", "params": {"path": str(PHOTO)}},
            "slices": {"type": "SliceForIPAdapter", "inputs": {"image": "photo.image"}},
            "ipa": {"type": "LoadIPAdapter", "params": {"path": str(adapters.plus), "image_encoder": str(adapters.encoder)}},
            "apply": {"type": "ApplyIPAdapter", "inputs": {"model": "ckpt.model", "adapter": "ipa.adapter",
                                                           "image": "slices.images"}, "params": {"scale": scale}},
            "prompt": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "a cat"}},
            "empty": {"type": "EmptyLatent", "params": {"width": 64, "height": 64}},
            "with_ip": {"type": "Sampler", "inputs": {"model": "apply.model", "positive": "prompt.conditioning",
                                                      "latent": "empty.latent"},
                        "params": {"seed": 1, "steps": 3, "guidance_scale": 4.0, "scheduler": "dpmpp_2m_karras"}},
            "plain": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "prompt.conditioning",
                                                    "latent": "empty.latent"},
                      "params": {"seed": 1, "steps": 3, "guidance_scale": 4.0, "scheduler": "dpmpp_2m_karras"}},
        },
    }


def test_workflow_patched_and_plain_samplers_side_by_side(sd1_ip, slices, tmp_path):
    _, (model, clip, _), adapters = sd1_ip
    engine = Engine(cache_dir=tmp_path / "cache")
    targets = ["plain", "with_ip"]
    first = engine.run(workflow(sd1_ip), targets=targets, out_dir=tmp_path)
    assert set(first.status.values()) == {"ran"}
    plain = first.outputs["plain"]["latent"].samples
    with_ip = first.outputs["with_ip"]["latent"].samples
    assert torch.equal(plain, sample(model, clip))  # the plain sampler saw no adapter
    direct = sample(apply_ip_adapter(model, load_ip_adapter(adapters.plus, adapters.encoder), slices, 0.1), clip)
    assert torch.allclose(with_ip, direct, atol=1e-6, rtol=0)
    # another scale reruns only ApplyIPAdapter and its sampler; the adapter and the plain branch are cached
    second = engine.run(workflow(sd1_ip, scale=0.7), targets=targets, out_dir=tmp_path)
    assert second.ran() == {"apply", "with_ip"}
    assert second.status["ipa"] == "cached" and second.status["plain"] == "cached"
    assert not torch.equal(second.outputs["with_ip"]["latent"].samples, with_ip)
    # adapters and patched models stay in memory; a new engine takes the sampled latents from the disk cache
    fresh = Engine(cache_dir=tmp_path / "cache").run(workflow(sd1_ip), targets=targets, out_dir=tmp_path)
    assert fresh.status["with_ip"] == "cached" and fresh.status["apply"] == "skipped" and not fresh.ran()
    assert torch.equal(fresh.outputs["with_ip"]["latent"].samples, with_ip)


def issues_of(spec: dict) -> dict:
    with pytest.raises(WorkflowInvalid) as err:
        Engine().compile(spec)
    return {(i.node_id, i.field): i.message for i in err.value.issues}


def with_params(sd1_ip, **params) -> dict:
    spec = workflow(sd1_ip)
    spec["nodes"]["ipa"]["params"].update(params)
    return spec


def test_missing_image_encoder_folder_fails_validation(sd1_ip, tmp_path):
    found = issues_of(with_params(sd1_ip, image_encoder=str(tmp_path / "no" / "image_encoder")))
    assert "no such folder" in found[("ipa", "image_encoder")]
    empty = tmp_path / "empty_encoder"
    empty.mkdir()
    assert "no config.json" in issues_of(with_params(sd1_ip, image_encoder=str(empty)))[("ipa", "image_encoder")]
    pickled = tmp_path / "pickled_encoder"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert "pickle" in issues_of(with_params(sd1_ip, image_encoder=str(pickled)))[("ipa", "image_encoder")]


def test_pickled_or_foreign_adapter_files_fail_validation(sd1_ip, tmp_path):
    folder = sd1_ip[0]
    for name in ("ip-adapter_sd15.bin", "ip-adapter.pt"):
        (tmp_path / name).write_bytes(b"\x80\x04")
        assert "pickle" in issues_of(with_params(sd1_ip, path=str(tmp_path / name)))[("ipa", "path")]
    unet_weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert "not an IP-Adapter" in issues_of(with_params(sd1_ip, path=str(unet_weights)))[("ipa", "path")]
    with pytest.raises(NodeError, match="pickle"):
        load_ip_adapter(tmp_path / "ip-adapter.pt", sd1_ip[2].encoder)


def test_adapter_not_fitting_the_image_encoder_fails_validation(sd1_ip, tmp_path):
    wide = build_image_encoder(tmp_path / "wide_encoder", projection_dim=40, hidden_size=48)
    found = issues_of(with_params(sd1_ip, image_encoder=str(wide)))
    message = found[("ipa", "path")]
    assert "32" in message and "48" in message and "hidden_size" in message  # plus: hidden states
    _, _, adapters = sd1_ip
    with pytest.raises(NodeError, match=r"24-wide image embeddings .* gives 40 \(projection_dim"):
        load_ip_adapter(adapters.plain, wide)


def test_adapter_for_another_unet_fails_before_any_sampling_step(sd1_ip, tmp_path):
    _, (model, _, _), adapters = sd1_ip
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig(**TINY_VISION)
    wrong = build_ip_adapter(tmp_path / "sdxl-like.safetensors", model.unet, config, "plain", cross_attention_dim=80)
    spec = with_params(sd1_ip, path=str(wrong))
    events = []
    with pytest.raises(NodeFailed) as err:
        Engine().run(spec, targets=["with_ip"], out_dir=tmp_path, progress=events.append)
    assert err.value.node_id == "apply"
    assert "cross_attention_dim 80" in str(err.value) and "cross_attention_dim 32" in str(err.value)
    assert not [e for e in events if e.node_id == "with_ip"]


def test_adapter_with_other_layers_does_not_fit(sd1_ip, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig

    _, (model, _, _), _ = sd1_ip
    deeper = UNet2DConditionModel(**{**TINY_UNET, "layers_per_block": 2})  # more cross-attention layers, same width
    path = build_ip_adapter(tmp_path / "deeper.safetensors", deeper, CLIPVisionConfig(**TINY_VISION), "plain")
    problem = unet_fit_problem(inspect_adapter(path), model.unet)
    assert "6 cross-attention layers" in problem and "has 4" in problem
    wider = UNet2DConditionModel(**{**TINY_UNET, "block_out_channels": (32, 96)})
    path = build_ip_adapter(tmp_path / "wider.safetensors", wider, CLIPVisionConfig(**TINY_VISION), "plain")
    problem = unet_fit_problem(inspect_adapter(path), model.unet)
    assert "(96, 32)" in problem and "(64, 32)" in problem


def test_two_engine_runs_at_once_one_with_an_ip_adapter(sd1_ip, tmp_path):
    """One Engine, two threads: an IP-Adapter workflow and a plain one sampling the same UNet at the same
    time give what they give one after the other (the plain run never sees the patch)."""
    spec = workflow(sd1_ip)
    alone = {t: Engine(cache_dir=False).run(spec, targets=[t], out_dir=tmp_path).outputs[t]["latent"].samples
             for t in ("plain", "with_ip")}
    engine = Engine(cache_dir=False)
    engine.run(spec, targets=["apply", "prompt", "empty"], out_dir=tmp_path)  # load once, then sample in parallel
    results, errors = {}, []

    def run(target):
        try:
            for _ in range(2):
                spec_i = workflow(sd1_ip)
                spec_i["nodes"][target]["params"]["steps"] = 4  # not cached: both threads really sample
                results[target] = engine.run(spec_i, targets=[target], out_dir=tmp_path)
        except BaseException as exc:  # reported below
            errors.append(exc)

    import threading

    threads = [threading.Thread(target=run, args=(t,)) for t in ("plain", "with_ip")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for target in ("plain", "with_ip"):
        expected = Engine(cache_dir=False).run({**spec, "nodes": {**spec["nodes"], target: {
            **spec["nodes"][target], "params": {**spec["nodes"][target]["params"], "steps": 4}}}},
            targets=[target], out_dir=tmp_path).outputs[target]["latent"].samples
        assert torch.equal(results[target].outputs[target]["latent"].samples, expected), target
    assert not torch.equal(alone["plain"], alone["with_ip"])
