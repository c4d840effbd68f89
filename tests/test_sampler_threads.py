"""Sampler runs on one shared UNet from two threads: a run with the plain MODEL never sees another run's
IP-Adapter patch (runs on one UNet take turns under ``denoise.unet_lock``)."""
from __future__ import annotations


import pytest
import torch

from nodegraph.nodes import denoise
from nodegraph.nodes.conditioning import encode_prompt
from nodegraph.nodes.io import load_image_file
from nodegraph.nodes.ipadapter import apply_ip_adapter, load_ip_adapter
from nodegraph.nodes.latent import empty_latent
from nodegraph.nodes.outpaint import square_slices
from tests.imaging import DATA
from tests.overlap import overlapping
from tests.tiny_ipadapter import build_tiny_ipadapters


@pytest.fixture(scope="module")
def models(sd, tmp_path_factory):
    """The session's tiny SD 1.x MODEL and a copy of it with an IP-Adapter: one UNet object under both."""
    model, clip, _ = sd
    adapters = build_tiny_ipadapters(tmp_path_factory.mktemp("ipadapter-threads"), model.unet)
    slices = square_slices(load_image_file(DATA / "chelsea_128.png")[0], 2, 3, "grid")
    patched = apply_ip_adapter(model, load_ip_adapter(adapters.plain, adapters.encoder), slices, 1.0)
    assert patched.unet is model.unet
    return model, patched, encode_prompt(clip, "a cat")


def run(model, positive, progress=None):
    return denoise.sample(model, positive, None, empty_latent(64, 64), seed=3, steps=3, guidance_scale=4.0,
                          scheduler="euler", strength=1.0, progress=progress)


def test_concurrent_runs_on_one_unet_match_runs_one_after_the_other(models):
    plain_model, ip_model, positive = models
    expected_plain, expected_ip = run(plain_model, positive), run(ip_model, positive)
    assert (expected_ip - expected_plain).abs().max() > 1e-2  # the adapter changes the result

    ip, plain = overlapping(lambda progress: run(ip_model, positive, progress=progress),
                            lambda: run(plain_model, positive))
    assert torch.equal(plain, expected_plain)
    assert torch.equal(ip, expected_ip)


def test_unet_lock_is_one_reentrant_lock_per_unet(models):
    plain_model, ip_model, _ = models
    lock = denoise.unet_lock(plain_model.unet)
    assert denoise.unet_lock(ip_model.unet) is lock
    with lock, denoise.unet_lock(plain_model.unet):  # re-entrant on one thread
        pass
    other = torch.nn.Linear(1, 1)
    assert denoise.unet_lock(other) is not lock
