"""The diffusion workflows in workflows/, run by the engine on the tiny models; caching and bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nodegraph.api import Engine
from nodegraph.errors import NodeFailed, WorkflowInvalid

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
CHAIN = WORKFLOWS / "txt2img_inpaint_img2img.json"


def tiny_overrides(name: str, tiny) -> dict:
    """Point the workflow at a tiny model and shrink sizes and steps."""
    small = {"resize.width": 64, "resize.height": 64, "mask.width": 64, "mask.height": 64}
    return {
        "txt2img_inpaint_img2img.json": {"ckpt.path": str(tiny.sd15), "empty.width": 64, "empty.height": 64,
                                         "t2i.steps": 2, "inpaint.steps": 2, "i2i.steps": 3},
        "inpaint_base_model.json": {"ckpt.path": str(tiny.sd15), **small, "inpaint.steps": 2},
        "inpaint_model.json": {"ckpt.path": str(tiny.sd15_inpaint), **small, "inpaint.steps": 2},
        "inpaint_crop.json": {"ckpt.path": str(tiny.sd15), "crop.width": 64, "crop.height": 64, "crop.padding": 8,
                              "inpaint.steps": 2},
        "differential_inpaint.json": {"ckpt.path": str(tiny.sd15), **small, "change.radius": 4.0, "diff.steps": 3},
    }[name]


def saved(result) -> np.ndarray:
    assert len(result.files) == 1
    return np.asarray(Image.open(result.files[0]).convert("RGB"), dtype=np.float32) / 255.0


def values(engine, workflow, overrides, node_ids):
    """Outputs of intermediate nodes (run as targets; cached from the run before)."""
    return engine.run(workflow, overrides=overrides, targets=list(node_ids), out_dir="unused").outputs


@pytest.mark.parametrize("name", ["inpaint_base_model.json", "inpaint_model.json", "differential_inpaint.json"])
def test_photo_workflows_keep_the_photograph_outside_the_mask(name, tiny, tmp_path):
    engine = Engine()
    overrides = tiny_overrides(name, tiny)
    result = engine.run(WORKFLOWS / name, overrides=overrides, out_dir=tmp_path)
    assert set(result.status.values()) == {"ran"}
    out = saved(result)
    assert out.shape == (64, 64, 3)
    mask_node = "change" if name.startswith("differential") else "feather"
    got = values(engine, WORKFLOWS / name, overrides, ["resize", mask_node])
    photo = got["resize"]["image"][0].permute(1, 2, 0).numpy()
    keep = got[mask_node]["mask"][0, 0].numpy() == 0
    assert keep.sum() > 500 and (~keep).sum() > 100
    assert np.abs(out[keep] - photo[keep]).max() <= 1 / 255 + 1e-6  # 8-bit PNG rounding only
    assert np.abs(out[~keep] - photo[~keep]).mean() > 0.01  # the masked area was repainted


def test_crop_workflow_inpaints_at_processing_size_and_pastes_back(tiny, tmp_path):
    engine = Engine()
    overrides = tiny_overrides("inpaint_crop.json", tiny)
    result = engine.run(WORKFLOWS / "inpaint_crop.json", overrides=overrides, out_dir=tmp_path)
    assert set(result.status.values()) == {"ran"}
    out = saved(result)
    got = values(engine, WORKFLOWS / "inpaint_crop.json", overrides, ["photo", "feather", "crop", "decode"])
    assert tuple(got["decode"]["image"].shape[-2:]) == (64, 64)  # the crop went through the model at 64x64
    photo = got["photo"]["image"][0].permute(1, 2, 0).numpy()
    assert out.shape == photo.shape  # pasted back into the full photograph
    keep = got["feather"]["mask"][0, 0].numpy() == 0
    assert np.abs(out[keep] - photo[keep]).max() <= 1 / 255 + 1e-6
    assert np.abs(out[~keep] - photo[~keep]).mean() > 0.01


def test_chain_stays_in_latent_space_and_reruns_only_what_changed(tiny, tmp_path):
    nodes = json.loads(CHAIN.read_text())["nodes"]
    types = [n["type"] for n in nodes.values()]
    assert types.count("VAEDecode") == 1 and "VAEEncode" not in types  # latents go sampler to sampler
    assert nodes["inpaint"]["inputs"]["latent"] == "t2i.latent" and nodes["i2i"]["inputs"]["latent"] == "inpaint.latent"

    engine = Engine()
    base = tiny_overrides("txt2img_inpaint_img2img.json", tiny)
    first = engine.run(CHAIN, overrides=base, out_dir=tmp_path / "1")
    assert set(first.status.values()) == {"ran"}

    strength = engine.run(CHAIN, overrides={**base, "i2i.strength": 0.7}, out_dir=tmp_path / "2")
    assert strength.ran() == {"i2i", "decode", "save"}
    assert strength.status["inpaint"] == "cached" and strength.status["castle"] == "cached"
    assert strength.status["t2i"] == "skipped"  # not even needed: the inpaint latent came from the cache

    seed = engine.run(CHAIN, overrides={**base, "i2i.strength": 0.7, "i2i.seed": 12}, out_dir=tmp_path / "3")
    assert seed.ran() == {"i2i", "decode", "save"}
    assert not {"castle", "waterfall", "t2i", "inpaint", "ckpt"} & seed.ran()
    assert not np.array_equal(saved(seed), saved(strength))


def test_chain_from_the_single_file_checkpoint_gives_the_same_image(tiny, tmp_path):
    engine = Engine()
    base = tiny_overrides("txt2img_inpaint_img2img.json", tiny)
    folder = engine.run(CHAIN, overrides=base, out_dir=tmp_path / "folder")
    single = engine.run(CHAIN, overrides={**base, "ckpt.path": str(tiny.sd15_file)}, out_dir=tmp_path / "file")
    assert single.status["ckpt"] == "ran" and single.status["t2i"] == "ran"
    assert np.array_equal(saved(folder), saved(single))


def test_cli_runs_a_workflow_with_set(tiny, tmp_path):
    sets = [f"--set={k}={json.dumps(v) if not isinstance(v, str) else v}"
            for k, v in tiny_overrides("inpaint_model.json", tiny).items()]
    proc = subprocess.run([sys.executable, "-m", "nodegraph.cli", "run", str(WORKFLOWS / "inpaint_model.json"), *sets,
                           "--out", str(tmp_path), "--no-cache", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["ok"] and len(report["files"]) == 1 and Path(report["files"][0]).is_file()


# ---------------------------------------------------------------------------------------------- bad input

def issues_of(overrides, tiny, workflow=CHAIN):
    with pytest.raises(WorkflowInvalid) as err:
        Engine().compile(workflow, overrides={**tiny_overrides(workflow.name, tiny), **overrides})
    return {(i.node_id, i.field): i.message for i in err.value.issues}


def test_bad_params_are_reported_together_before_anything_loads(tiny, tmp_path):
    found = issues_of({"empty.width": 65, "t2i.steps": 0, "inpaint.strength": 0.0, "i2i.strength": 1.5,
                       "i2i.scheduler": "karras_magic"}, tiny)
    assert "multiple of 8" in found[("empty", "width")]
    assert ("t2i", "steps") in found
    assert ("inpaint", "strength") in found and ("i2i", "strength") in found
    assert "dpmpp_2m_karras" in found[("i2i", "scheduler")]  # the known names are listed


def test_bad_checkpoint_paths_fail_validation(tiny, tmp_path):
    missing = issues_of({"ckpt.path": str(tmp_path / "nowhere" / "model.safetensors")}, tiny)
    assert "no such file or folder" in missing[("ckpt", "path")]  # an absolute path is a path, never a name
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("hello")
    assert "not a diffusers model" in issues_of({"ckpt.path": str(tmp_path / "not-a-model")}, tiny)[("ckpt", "path")]
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04")
    assert "pickle" in issues_of({"ckpt.path": str(tmp_path / "old.ckpt")}, tiny)[("ckpt", "path")]


def test_family_mismatch_fails_before_any_step(tiny, tmp_path):
    events = []
    with pytest.raises(NodeFailed) as err:
        Engine().run(WORKFLOWS / "inpaint_base_model.json", out_dir=tmp_path, progress=events.append,
                     overrides={**tiny_overrides("inpaint_base_model.json", tiny), "ckpt.path": str(tiny.sd15_inpaint)})
    assert err.value.node_id == "inpaint" and "InpaintModelConditioning" in str(err.value)
    assert not [e for e in events if e.node_id == "inpaint"]
    with pytest.raises(NodeFailed) as err:
        Engine().run(WORKFLOWS / "inpaint_model.json", out_dir=tmp_path,
                     overrides={**tiny_overrides("inpaint_model.json", tiny), "ckpt.path": str(tiny.sd15)})
    assert err.value.node_id == "inpaint" and "LatentBlendSampler" in str(err.value)


def test_latents_and_conditioning_come_back_from_the_disk_cache(tiny, tmp_path):
    """A new engine (as in a new process) reuses stored latents and embeddings; only models reload."""
    base = tiny_overrides("txt2img_inpaint_img2img.json", tiny)
    first = Engine(cache_dir=tmp_path / "cache").run(CHAIN, overrides=base, out_dir=tmp_path / "1")
    later = Engine(cache_dir=tmp_path / "cache").run(CHAIN, overrides={**base, "i2i.seed": 99}, out_dir=tmp_path / "2")
    assert later.ran() == {"ckpt", "i2i", "decode", "save"}  # model handles are memory-only
    assert later.status["inpaint"] == "cached" and later.status["castle"] == "cached"
    assert later.status["t2i"] == "skipped"
    same = Engine(cache_dir=tmp_path / "cache").run(CHAIN, overrides=base, out_dir=tmp_path / "3")
    assert "i2i" not in same.ran()
    assert np.array_equal(saved(same), saved(first))


def test_manifest_names_seeds_and_model_when_results_come_from_the_cache(tiny, tmp_path):
    """Only SaveImage reruns here, and the checkpoint is not even loaded; the PNG's manifest still
    names the sampler's seed and the model, as recorded when they ran."""
    workflow = WORKFLOWS / "inpaint_base_model.json"
    overrides = {**tiny_overrides("inpaint_base_model.json", tiny), "inpaint.seed": 5}
    Engine(cache_dir=tmp_path / "cache").run(workflow, overrides=overrides, out_dir=tmp_path / "1")
    later = Engine(cache_dir=tmp_path / "cache").run(workflow, overrides=overrides, out_dir=tmp_path / "2")
    assert later.ran() == {"save"} and later.status["ckpt"] == "skipped"
    with Image.open(later.files[0]) as image:
        manifest = json.loads(image.info["nodegraph.manifest"])
    assert manifest["info"]["samplers"]["inpaint"]["seed"] == 5
    assert manifest["info"]["models"]["ckpt"]["source"].endswith(Path(str(tiny.sd15)).name)
