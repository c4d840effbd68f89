"""Validating, listing and printing the schema import no heavy library; a run imports what its nodes use."""
import json
import os
import subprocess
import sys

from .conftest import REPO

HEAVY = ("torch", "diffusers", "transformers", "numpy", "cv2", "PIL", "networkx", "httpx2", "httpx", "tqdm")


def loaded_after(args, cwd=None):
    """The heavy top-level modules a fresh process holds after `nodegraph ARGS`, and its exit code."""
    code = (f"import sys\nfrom nodegraph.cli import main\ncode = main({args!r})\n"
            f"print('LOADED', sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})), code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    line = next(l for l in done.stdout.splitlines() if l.startswith("LOADED"))
    loaded, exit_code = line[len("LOADED "):].rsplit(" ", 1)
    return json.loads(loaded.replace("'", '"')), int(exit_code)


def test_validate_nodes_and_schema_import_no_heavy_library(tiny, tmp_path):
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps({"format": "nodegraph/1", "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "params": {"path": str(tiny.sd15_file),
                                                      "config": str(tiny.sd15_file_config)}},
        "folder": {"type": "LoadCheckpoint", "params": {"path": str(tiny.sd15)}},
        "hub": {"type": "LoadCheckpoint", "params": {"path": "tiny-org/not-in-the-cache"}},  # looked up in the cache
        "photo": {"type": "LoadImage", "params": {"path": str(REPO / "tests" / "data" / "chelsea_128.png")}},
        "pos": {"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "a cat"}},
        "enc": {"type": "VAEEncode", "inputs": {"vae": "ckpt.vae", "image": "photo.image"}},
        "sample": {"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                                 "latent": "enc.latent"}, "params": {"seed": 1, "strength": 0.5}},
        "dec": {"type": "VAEDecode", "inputs": {"vae": "ckpt.vae", "latent": "sample.latent"}},
        "save": {"type": "SaveImage", "inputs": {"image": "dec.image"}}}}))
    assert loaded_after(["validate", str(workflow)]) == ([], 0)
    assert loaded_after(["nodes"]) == ([], 0)
    assert loaded_after(["schema"]) == ([], 0)


def test_a_run_imports_what_its_nodes_use(tmp_path):
    loaded, code = loaded_after(["run", str(REPO / "workflows" / "outpaint_telea.json"), "--out", str(tmp_path),
                                 "--no-cache", "--device", "cpu"])
    assert code == 0
    assert {"torch", "cv2", "PIL", "numpy"} <= set(loaded)  # the image nodes' libraries
    assert not {"diffusers", "transformers", "networkx"} & set(loaded)  # no model node ran


def test_validating_and_importing_a_comfyui_workflow_import_no_heavy_library(tmp_path):
    """The importer is as light as the validator: ComfyUI's API and editor formats need no torch to check."""
    comfy = REPO / "tests" / "data" / "comfy"
    prompt = json.loads((comfy / "txt2img_api.json").read_text())
    del prompt["9"]  # SaveImage: its converter belongs to the pixel types
    prompt["12"] = {"class_type": "DifferentialDiffusion", "inputs": {"model": ["4", 0]}}
    prompt["3"]["inputs"]["model"] = ["12", 0]
    api = tmp_path / "api.json"
    api.write_text(json.dumps(prompt))
    loaded, code = loaded_after(["validate", str(api)])
    assert loaded == [] and code == 2  # the checkpoint is not there and nothing is saved: said without torch
    loaded, code = loaded_after(["import", str(comfy / "txt2img_editor.json"), "-o", str(tmp_path / "out.json")])
    assert loaded == []
