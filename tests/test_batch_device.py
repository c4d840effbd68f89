"""Jobs sampled as one batch on the device (``nodegraph batch --batch-size K``): the same draws and (within float
rounding) the same latents and images as the jobs run one by one, one UNet call per step for the group."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nodegraph.api import Engine
from nodegraph.batch import Batch, run_batch
from nodegraph.batch.group import batch_role, form_groups
from nodegraph.batch.jobs import Job
from nodegraph.nodes import denoise
from nodegraph.nodes.conditioning import concat_conditionings, encode_prompt
from nodegraph.nodes.latent import encode_image

from .batch_helpers import DATA, pixels, torch_threads

STEPS = 3
# A batched UNet call rounds differently from single ones (other matrix blockings): over 4 steps with guidance 7.5,
# 16 seeds and euler / euler_a / dpmpp_2m, the largest difference measured was 2.8e-6 of the largest |latent|
# (CPU, float32, 1 and 2 threads). 1e-5 of it leaves room; any other draw would differ by about 1.
LATENT_RTOL = 1e-5


def close_latents(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= LATENT_RTOL * b.abs().max())


def text2img(folder: Path, checkpoint: Path, scheduler: str = "euler") -> Path:
    """64x64 text2img on a tiny checkpoint, with a second prompt node and a second sampler for the grouping rules."""
    path = folder / f"t2i_{scheduler}.json"
    path.write_text(json.dumps({"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(checkpoint)}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "a red fox"}},
        "neg": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "blurry"}},
        "empty": {"type": "EmptyLatent", "params": {"width": 64, "height": 64}},
        "sample": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                                 "negative": "neg.conditioning", "latent": "empty.latent"},
                   "params": {"seed": 1, "steps": STEPS, "scheduler": scheduler}},
        "dec": {"type": "VAEDecode", "inputs": {"vae": "ckpt.vae", "latent": "sample.latent"}},
        "save": {"type": "SaveImage", "inputs": {"image": "dec.image"}, "params": {"prefix": "fox"}}}}))
    return path


@contextlib.contextmanager
def unet_calls():
    """Counts UNet forward calls in this process (and the batch size of each)."""
    from diffusers import UNet2DConditionModel

    sizes: list[int] = []

    def hook(module, args, output):
        if isinstance(module, UNet2DConditionModel):
            sizes.append(int(args[0].shape[0]))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield sizes
    finally:
        handle.remove()


def records(out: Path) -> list[dict]:
    return sorted((json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()),
                  key=lambda r: r["index"])


def run(workflow: Path, sweep: dict, out: Path, batch_size: int):
    sweep_file = out.parent / f"{out.name}.sweep.json"
    sweep_file.write_text(json.dumps(sweep))
    with torch_threads(1):
        return run_batch(Batch(workflow=workflow, sweeps=[str(sweep_file)], out=out, progress=False, workers=1,
                               batch_size=batch_size, engine_options={"cache_dir": False}))


def assert_close_images(a: Path, b: Path) -> None:
    x, y = pixels(a).astype(int), pixels(b).astype(int)
    assert np.abs(x - y).max() <= 1


# ----------------------------------------------------------------------------- the shared loop, directly

def test_each_row_gets_exactly_its_own_runs_draws_and_the_same_latents(sd):
    """A list of seeds: the image's VAE sample and the initial noise of row i are bit-identical to those of a
    single run with seed i; euler_a's per-step draws too (else the latents would differ by far more)."""
    from PIL import Image

    model, clip, vae = sd
    photo = np.array(Image.open(DATA / "chelsea_128.png").convert("RGB").resize((64, 64)))
    image = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    latent = encode_image(vae, image, mode="sampler")  # the sampler draws its VAE sample
    seeds = [3, 11, 12, 40]
    count = len(seeds)
    batched_latent = type(latent)(**{**latent.__dict__, "samples": latent.samples.repeat(count, 1, 1, 1),
                                     "sample_std": latent.sample_std.repeat(count, 1, 1, 1)})
    prompts = [encode_prompt(clip, t) for t in ("a cat", "a dog", "a cat", "a boat")]
    settings = dict(steps=STEPS, guidance_scale=7.5, scheduler="euler_a", strength=0.7, partial=True,
                    draws=denoise.IMG2IMG)
    many = denoise.prepare(model, concat_conditionings(prompts), None, batched_latent, seed=seeds, **settings)
    with torch_threads(1):
        together = many.denoise(many.start_from_image())
        for i, (seed, prompt) in enumerate(zip(seeds, prompts)):
            one = denoise.prepare(model, prompt, None, latent, seed=seed, **settings)
            assert torch.equal(many.noise[i:i + 1], one.noise)  # bit-identical draws
            assert torch.equal(many.x0[i:i + 1], one.x0)
            alone = one.denoise(one.start_from_image())
            assert close_latents(together[i:i + 1], alone)
    # the rows really are different runs: another seed's latents are far away
    assert (together[0] - together[1]).abs().max() > 0.1


def test_a_seed_list_must_match_the_latent_batch(sd):
    from nodegraph.errors import NodeError
    from nodegraph.nodes.latent import empty_latent

    with pytest.raises(NodeError, match="3 seeds for a latent batch of 2"):
        denoise.prepare(sd[0], encode_prompt(sd[1], "a"), None, empty_latent(64, 64, 2), seed=[1, 2, 3],
                        steps=2, guidance_scale=7.5, scheduler="euler", strength=1.0, partial=False,
                        draws=denoise.TEXT2IMG)


# ----------------------------------------------------------------------------- nodegraph batch --batch-size

@pytest.fixture(scope="module")
def fox(tiny, tmp_path_factory):
    return text2img(tmp_path_factory.mktemp("device_batch"), tiny.sd15)


@pytest.mark.parametrize("sweep", [
    {"grid": {"sample.seed": [5, 6, 7, 8]}},
    {"zip": {"sample.seed": [5, 5, 9, 10], "pos.text": ["a red fox", "a blue bird", "a castle", "a red fox"]}},
], ids=["seeds", "prompts"])
def test_k_jobs_batched_match_k_single_runs(fox, tmp_path, sweep):
    single, batched = tmp_path / "single", tmp_path / "batched"
    with unet_calls() as alone:
        assert run(fox, sweep, single, 1).exit_code == 0
    with unet_calls() as together:
        assert run(fox, sweep, batched, 4).exit_code == 0
    assert alone == [2] * (4 * STEPS)  # one call per step and job, [uncond, cond]
    assert together == [8] * STEPS  # one call per step for the whole group: the batching is real
    for one, many in zip(records(single), records(batched)):
        assert (many["overrides"], many["status"], many["job"]) == (one["overrides"], "done", one["job"])
        assert many["files"] == [f"{many['job']}/fox_00001.png"]  # its own folder and file
        assert_close_images(single / one["files"][0], batched / many["files"][0])
        facts = many["manifest"]["samplers"]["sample"]
        assert facts["seed"] == many["overrides"]["sample.seed"] and facts["batch"]["size"] == 4
        assert many["batch"]["index"] == facts["batch"]["index"] and "batch" not in one
        # the PNG's embedded workflow reruns this job: its own seed and prompt
        from PIL import Image

        embedded = json.loads(Image.open(batched / many["files"][0]).text["nodegraph.workflow"])["nodes"]
        assert embedded["sample"]["params"]["seed"] == many["overrides"]["sample.seed"]
        if "pos.text" in many["overrides"]:
            assert embedded["pos"]["params"]["text"] == many["overrides"]["pos.text"]
    images = [pixels(batched / r["files"][0]) for r in records(batched)]
    assert not np.array_equal(images[0], images[1])


def test_latents_of_a_batched_job_match_its_single_run(fox):
    """The sampler's latents themselves (not only 8-bit images), from the engine's cache after the batch."""
    from nodegraph.batch.group import GroupTask, sample_together
    from nodegraph.batch.task import Task
    from nodegraph.executor import stable_keys

    seeds = [21, 22, 23, 24]
    tasks = [Task(f"k{s}", str(fox), {"sample.seed": s}, None, "cpu") for s in seeds]
    engine = Engine(cache_dir=False)
    with torch_threads(1):
        rows = sample_together(engine, tasks, "sample", None, fox.parent / "scratch")
        assert [row for row, _ in rows.values()] == [0, 1, 2, 3]
        for i, task in enumerate(tasks):
            key = stable_keys(engine.compile(fox, task.overrides), torch.device("cpu"), torch.float32)["sample"]
            assert rows[i][1] == key
            batched = engine.memory.get(key)["latent"].samples
            alone = Engine(cache_dir=False).run(fox, task.overrides, targets=["sample"], device="cpu",
                                                out_dir=fox.parent / "o").outputs["sample"]["latent"].samples
            assert batched.shape == alone.shape == (1, 4, 8, 8)
            assert close_latents(batched, alone)
    assert GroupTask(tasks, "sample").inputs == {}


# ----------------------------------------------------------------------------- grouping rules

def roles(engine, workflow, jobs):
    return [batch_role(engine.compile(workflow, o), o) for o in jobs]


def test_grouping_rules(fox):
    engine = Engine(cache_dir=False)
    seeds = roles(engine, fox, [{"sample.seed": s} for s in range(3)])
    assert seeds[0] is not None and seeds[0] == seeds[1] == seeds[2] and seeds[0][0] == "sample"
    # another param differing (steps) is another group; jobs varying nothing batchable are in none
    other = roles(engine, fox, [{"sample.seed": 1, "sample.steps": 2}, {"sample.seed": 2, "sample.steps": 2}])
    assert other[0] == other[1] != seeds[0]
    assert roles(engine, fox, [{"sample.steps": 2}, {"sample.guidance_scale": 3.0}]) == [None, None]
    # prompts of the sampler group with seeds; a seed of "random" does not
    assert roles(engine, fox, [{"pos.text": "x", "sample.seed": 1}])[0][0] == "sample"
    assert roles(engine, fox, [{"sample.seed": "random"}]) == [None]


def test_a_prompt_feeding_more_than_the_sampler_is_not_batched(tmp_path, tiny):
    data = json.loads(text2img(tmp_path, tiny.sd15).read_text())
    data["nodes"]["sample2"] = {**data["nodes"]["sample"], "inputs": {**data["nodes"]["sample"]["inputs"]}}
    data["nodes"]["dec2"] = {"type": "VAEDecode", "inputs": {"vae": "ckpt.vae", "latent": "sample2.latent"}}
    data["nodes"]["save2"] = {"type": "SaveImage", "inputs": {"image": "dec2.image"}, "params": {"prefix": "b"}}
    path = tmp_path / "two.json"
    path.write_text(json.dumps(data))
    engine = Engine(cache_dir=False)
    assert roles(engine, path, [{"pos.text": "x"}]) == [None]  # pos feeds both samplers
    assert roles(engine, path, [{"sample.seed": 1, "sample2.seed": 2}]) == [None]  # two samplers vary
    assert roles(engine, path, [{"sample2.seed": 4}])[0][0] == "sample2"


def test_a_group_never_exceeds_k_and_keeps_the_order():
    jobs = [Job(i, {"s.seed": i}, f"k{i}") for i in range(7)] + [Job(7, {"s.steps": 2}, "k7")]
    role = ("s", "shared")
    units = form_groups(jobs, {j.key: (role if j.index < 7 else None) for j in jobs}, 3)
    assert [[m.index for m in u.members] or [u.index] for u in units] == [[0, 1, 2], [3, 4, 5], [6], [7]]
    assert all(u.sampler == "s" for u in units[:2]) and not units[2].members
    assert form_groups(jobs, {j.key: role for j in jobs}, 1) == jobs  # --batch-size 1: nothing changes


def test_a_failing_job_inside_a_group_is_recorded_and_the_rest_are_batched(fox, tmp_path, monkeypatch):
    import nodegraph.nodes.conditioning as conditioning
    from nodegraph.errors import NodeError

    def encode(clip, text, *args, **kwargs):
        if text == "boom":
            raise NodeError("this prompt cannot be encoded")
        return encode_prompt(clip, text, *args, **kwargs)

    monkeypatch.setattr(conditioning, "encode_prompt", encode)
    sweep = {"zip": {"sample.seed": [1, 2, 3], "pos.text": ["a fox", "boom", "a cat"]}}
    with unet_calls() as calls:
        summary = run(fox, sweep, tmp_path / "out", 4)
    assert (summary.done, summary.failed, summary.exit_code) == (2, 1, 1)
    got = records(tmp_path / "out")
    assert got[1]["status"] == "failed" and got[1]["files"] == [] and "batch" not in got[1]
    assert "node 'pos' (CLIPEncode)" in got[1]["error"] and "cannot be encoded" in got[1]["error"]
    assert not (tmp_path / "out" / got[1]["job"]).exists()
    assert [got[0]["batch"]["index"], got[2]["batch"]["index"]] == [0, 1]
    assert calls == [4] * STEPS  # the two good jobs in one call per step
    reference = tmp_path / "ref"
    assert run(fox, {"zip": {"sample.seed": [1, 3], "pos.text": ["a fox", "a cat"]}}, reference, 1).exit_code == 0
    for mine, ref in zip([got[0], got[2]], records(reference)):
        assert_close_images(tmp_path / "out" / mine["files"][0], reference / ref["files"][0])


# ----------------------------------------------------------------------------- worker processes and Ray actors

@pytest.mark.parametrize("where", ["processes", "ray"])
def test_groups_run_on_worker_processes_and_ray_actors(tiny, tmp_path, where):
    """Photos sent through Ray's object store are written once per group; each job's files come back."""
    from .batch_helpers import img2img_workflow, one_by_one, photo_folder

    options = {"workers": 2, "threads": 1}
    if where == "ray":
        ray = pytest.importorskip("ray")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        options["ray"] = True
    try:
        workflow = img2img_workflow(tmp_path, tiny.sd15)
        photos = photo_folder(tmp_path / "photos")
        seeds = tmp_path / "seeds.json"
        seeds.write_text(json.dumps({"grid": {"sample.seed": [1, 2, 3, 4]}}))
        summary = run_batch(Batch(workflow=workflow, sweeps=[str(photos), str(seeds)], bind="photo.path",
                                  out=tmp_path / "out", progress=False, batch_size=4,
                                  engine_options={"cache_dir": False}, **options))
    finally:
        if where == "ray":
            ray.shutdown()
    assert (summary.done, summary.exit_code) == (8, 0)
    got = records(tmp_path / "out")
    assert all(r["batch"]["size"] == 4 for r in got)
    assert {r["worker"] for r in got} <= {"local-0", "local-1", "ray-0", "ray-1"}
    jobs = [{"photo.path": r["overrides"]["photo.path"], "sample.seed": r["overrides"]["sample.seed"]} for r in got]
    reference = one_by_one(workflow, jobs, tmp_path / "reference")
    for r, image in zip(got, reference):
        assert np.abs(pixels(tmp_path / "out" / r["files"][0]).astype(int) - image.astype(int)).max() <= 1


def test_cli_batch_size(fox, tmp_path):
    import subprocess
    import sys

    sweep = tmp_path / "seeds.json"
    sweep.write_text(json.dumps({"grid": {"sample.seed": [1, 2, 3]}}))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "nodegraph.cli", "batch", str(fox), "--sweep", str(sweep),
                               "--no-cache", "--threads", "1", *map(str, args)], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent)

    bad = cli("--out", tmp_path / "bad", "--batch-size", "0")
    assert bad.returncode == 2 and "--batch-size must be at least 1" in bad.stderr
    good = cli("--out", tmp_path / "out", "--batch-size", "2", "--json")
    assert good.returncode == 0 and json.loads(good.stdout)["done"] == 3
    assert [r.get("batch", {}).get("size") for r in records(tmp_path / "out")] == [2, 2, None]  # 2 + 1 alone


def test_without_room_in_the_memory_cache_jobs_say_they_were_not_batched(fox, tmp_path):
    """The rows live in the memory cache until their jobs run: with no room there each job samples alone, and
    its record does not claim a batch."""
    sweep = tmp_path / "seeds.json"
    sweep.write_text(json.dumps({"grid": {"sample.seed": [5, 6]}}))
    with torch_threads(1), unet_calls() as calls:
        summary = run_batch(Batch(workflow=fox, sweeps=[str(sweep)], out=tmp_path / "out", progress=False, workers=1,
                                  batch_size=2, engine_options={"cache_dir": False, "memory_budget": 0}))
    assert summary.done == 2
    for r in records(tmp_path / "out"):
        assert "batch" not in r and "batch" not in r["manifest"]["samplers"]["sample"]
    assert calls == [4] * STEPS + [2] * (2 * STEPS)  # the batch was made, then each job sampled alone


def test_sdxl_rows_get_their_own_pooled_embeds_and_draws(xl):
    """SDXL: concatenated conditionings carry each prompt's pooled embedding; rows match their single runs."""
    from nodegraph.nodes.latent import empty_latent

    model, clip, _ = xl
    prompts = [encode_prompt(clip, t) for t in ("a cat", "a lighthouse at night")]
    seeds = [7, 8]
    settings = dict(steps=2, guidance_scale=5.0, scheduler="euler_a", strength=1.0, partial=False,
                    draws=denoise.TEXT2IMG)
    together = concat_conditionings(prompts)
    assert torch.equal(together.pooled[1:], prompts[1].pooled)
    many = denoise.prepare(model, together, None, empty_latent(64, 64, 2), seed=seeds, **settings)
    with torch_threads(1):
        out = many.denoise(many.start_from_noise())
        for i, (seed, prompt) in enumerate(zip(seeds, prompts)):
            one = denoise.prepare(model, prompt, None, empty_latent(64, 64), seed=seed, **settings)
            assert torch.equal(many.noise[i:i + 1], one.noise)
            assert close_latents(out[i:i + 1], one.denoise(one.start_from_noise()))
