"""Model folders (docs/models.md): names found under models roots in ComfyUI's layout, roots from --models,
$NODEGRAPH_MODELS, Engine(models=...) and a model paths file (ComfyUI's extra_model_paths.yaml format),
missing names with the closest ones, `nodegraph models`, and cache keys that follow the named file."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from nodegraph.api import Engine
from nodegraph.errors import NodegraphError
from nodegraph.model_folders import ModelRoots, name_parts, read_model_paths

from .test_hardening_input import cli, write


def wf(**nodes):
    return {"format": "nodegraph/1", "nodes": nodes}


def reading(name):
    """A workflow whose StubReadModel names ``name`` (a number in a text file)."""
    return wf(r={"type": "StubReadModel", "params": {"path": name}}, o={"type": "StubSink", "inputs": {"a": "r.x"}})


def put(path, text="1"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def comfy(tmp_path):
    """A models root in ComfyUI's layout, with the placeholder files ComfyUI ships."""
    root = tmp_path / "ComfyUI" / "models"
    put(root / "checkpoints" / "dreamshaper_8.safetensors", "8")
    put(root / "checkpoints" / "sdxl" / "juggernaut.safetensors", "11")
    put(root / "checkpoints" / "put_checkpoints_here", "")
    put(root / "loras" / "detail.safetensors", "2")
    (root / "vae").mkdir()
    return root


def resolved(engine, workflow, node="r", param="path"):
    return engine.compile(workflow).nodes[node].params[param]


# ---------------------------------------------------------------------------------------------- resolution

def test_names_resolve_in_a_comfyui_layout_at_the_top_and_in_subfolders(stub_registry, comfy, tmp_path):
    engine = Engine(registry=stub_registry, cache_dir=False, models=[comfy])
    top = resolved(engine, reading("dreamshaper_8.safetensors"))
    assert top == str(comfy / "checkpoints" / "dreamshaper_8.safetensors")
    sub = resolved(engine, reading("sdxl/juggernaut.safetensors"))
    assert sub == str(comfy / "checkpoints" / "sdxl" / "juggernaut.safetensors")
    result = engine.run(reading("sdxl/juggernaut.safetensors"), targets=["r"], out_dir=tmp_path / "out")
    assert result.outputs["r"]["x"].tolist() == [11.0, 11.0]  # the node was given the file itself


def test_a_real_path_wins_over_a_name(stub_registry, comfy, tmp_path):
    # A path that exists (relative to the workflow's folder, or absolute) is used even when a models root has
    # the same name: a workflow that ships or names its own files means the same whatever roots are set up.
    here = tmp_path / "project"
    local = put(here / "dreamshaper_8.safetensors", "5")
    workflow = write(here, reading("dreamshaper_8.safetensors"))
    engine = Engine(registry=stub_registry, cache_dir=False, models=[comfy])
    assert resolved(engine, workflow) == str(local)
    absolute = comfy / "loras" / "detail.safetensors"
    assert resolved(engine, reading(str(absolute))) == str(absolute)
    local.unlink()  # gone from the workflow's folder: now the name finds the root's file
    assert resolved(Engine(registry=stub_registry, cache_dir=False, models=[comfy]), workflow) == \
        str(comfy / "checkpoints" / "dreamshaper_8.safetensors")


def test_the_first_root_wins_and_diffusers_folders_are_checkpoints(tmp_path, comfy):
    other = tmp_path / "other"
    put(other / "checkpoints" / "dreamshaper_8.safetensors", "other")
    put(other / "diffusers" / "sd15" / "model_index.json", "{}")
    roots = ModelRoots.gather([comfy, other], config=False, environ={})
    assert roots.find("checkpoints", "dreamshaper_8.safetensors") == comfy / "checkpoints" / "dreamshaper_8.safetensors"
    assert roots.find("checkpoints", "sd15") == other / "diffusers" / "sd15"
    assert roots.find("loras", "sd15") is None and roots.find("vae", "dreamshaper_8.safetensors") is None
    entries = roots.entries("checkpoints")
    assert [(e.name, e.shadowed) for e in entries if e.name == "dreamshaper_8.safetensors"] == [
        ("dreamshaper_8.safetensors", False), ("dreamshaper_8.safetensors", True)]


def test_a_name_never_leaves_the_folders(tmp_path, comfy):
    put(comfy / "secret.safetensors")
    roots = ModelRoots.gather([comfy], config=False, environ={})
    for name in ("../secret.safetensors", "sdxl/../../secret.safetensors", str(comfy / "secret.safetensors"), "~/x",
                 ""):
        assert roots.find("checkpoints", name) is None
    assert name_parts("sdxl/juggernaut.safetensors") == ("sdxl", "juggernaut.safetensors")
    assert name_parts("../x") is None and name_parts("/x") is None


# ---------------------------------------------------------------------------------------------- missing names

def test_a_missing_name_lists_the_closest_names_across_roots(stub_registry, comfy, tmp_path):
    other = tmp_path / "other"
    put(other / "checkpoints" / "dreamshaper_7.safetensors")
    engine = Engine(registry=stub_registry, cache_dir=False, models=[comfy, other])
    (issue,) = engine.validate(reading("dreamshaper_6.safetensors"))
    assert (issue.code, issue.node_id, issue.node_type, issue.field) == ("missing_model", "r", "StubReadModel", "path")
    assert "dreamshaper_8.safetensors, dreamshaper_7.safetensors" in issue.message
    assert "checkpoints/ or diffusers/" in issue.message and str(comfy) in issue.message
    (issue,) = engine.validate(reading("juggernaut.safetensors"))  # the same file name, in a subfolder
    assert "did you mean sdxl/juggernaut.safetensors?" in issue.message
    (issue,) = engine.validate(reading("put_checkpoints_here2"))  # ComfyUI's placeholder is no model
    assert "did you mean" not in issue.message and "`nodegraph models checkpoints` for the 3 found" in issue.message
    (issue,) = engine.validate(reading("../elsewhere/model.safetensors"))  # a path, not a name
    assert issue.code == "missing_file"


def test_without_roots_a_missing_name_says_how_to_set_one_up(stub_registry):
    (issue,) = Engine(registry=stub_registry, cache_dir=False).validate(reading("dreamshaper_8.safetensors"))
    assert issue.code == "missing_model" and "--models DIR" in issue.message and "$NODEGRAPH_MODELS" in issue.message


def test_a_checkpoint_name_is_a_missing_model_and_a_hub_id_still_passes(comfy):
    engine = Engine(cache_dir=False, models=[comfy])

    def issues(path):
        return engine.validate(wf(ckpt={"type": "LoadCheckpoint", "params": {"path": path}}), targets=["ckpt"])

    (issue,) = issues("dreamshaper_9.safetensors")
    assert issue.code == "missing_model" and "dreamshaper_8.safetensors" in issue.message
    assert issues("someone/some-model") == []  # a hub id, fetched by the node: not looked up as a missing name


# ---------------------------------------------------------------------------------------------- where roots come from

def test_models_option_and_environment_variable(comfy, tmp_path):
    other = tmp_path / "other"
    put(other / "checkpoints" / "only_here.safetensors", "3")
    workflow = write(tmp_path, reading("only_here.safetensors"))
    assert cli("validate", str(workflow)).returncode == 2
    done = cli("validate", str(workflow), "--models", str(comfy), "--models", str(other))
    assert done.returncode == 0, done.stderr
    env = {"NODEGRAPH_MODELS": os.pathsep.join([str(comfy), str(other)])}
    done = cli("run", str(workflow), "--target", "r", "--out", str(tmp_path / "out"), "--json", env=env)
    assert done.returncode == 0 and json.loads(done.stdout)["ok"], done.stderr
    roots = ModelRoots.gather([tmp_path / "first"], config=False, environ=env)
    assert [(r.path, r.origin) for r in roots.roots] == [
        (tmp_path / "first", "--models"), (comfy, "$NODEGRAPH_MODELS"), (other, "$NODEGRAPH_MODELS")]


A1111 = """
# an A1111 install used in place (ComfyUI's extra_model_paths.yaml format)
a111:
    base_path: webui/
    checkpoints: models/Stable-diffusion
    vae: models/VAE
    loras: |
        models/Lora
        models/LyCORIS
    controlnet: models/ControlNet
    embeddings: embeddings
comfyui:
    base_path: ~/nowhere-{tag}/ComfyUI
    is_default: true
    checkpoints: models/checkpoints/
"""


@pytest.fixture
def a1111(tmp_path):
    """An A1111 tree and a model paths file beside it that points at it with a relative base_path."""
    webui = tmp_path / "config" / "webui"
    put(webui / "models" / "Stable-diffusion" / "v1-5-pruned.safetensors", "15")
    put(webui / "models" / "Lora" / "style.safetensors")
    put(webui / "models" / "LyCORIS" / "loha.safetensors")
    (webui / "models" / "VAE").mkdir(parents=True)
    return write(tmp_path / "config", A1111.format(tag=tmp_path.name), "model_paths.yaml")


def test_the_model_paths_file_uses_an_a1111_install_in_place(a1111, tmp_path):
    roots = read_model_paths(a1111)
    assert [r.origin.rsplit(" ", 1)[-1] for r in roots] == ["[comfyui]", "[a111]"]  # is_default comes first
    webui = a1111.parent / "webui"
    models = webui / "models"
    assert roots[1].path == webui and roots[1].folders["loras"] == (models / "Lora", models / "LyCORIS")
    found = ModelRoots(roots)
    assert found.find("checkpoints", "v1-5-pruned.safetensors") == models / "Stable-diffusion" / "v1-5-pruned.safetensors"
    assert found.find("loras", "loha.safetensors") == models / "LyCORIS" / "loha.safetensors"
    assert any("ControlNet" in p and "does not exist" in p for p in found.problems())
    workflow = write(tmp_path, reading("v1-5-pruned.safetensors"))
    for how in (["--model-paths", str(a1111)], []):
        env = {} if how else {"NODEGRAPH_MODEL_PATHS": str(a1111)}
        done = cli("run", str(workflow), "--target", "r", "--out", str(tmp_path / "out"), "--json", *how, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["nodes"]["r"]["status"] == "ran"


def test_the_user_s_model_paths_file_is_read_by_default(a1111, monkeypatch, stub_registry):
    import platformdirs

    monkeypatch.delenv("NODEGRAPH_MODEL_PATHS")
    monkeypatch.setattr(platformdirs, "user_config_dir", lambda name: str(a1111.parent))
    engine = Engine(registry=stub_registry, cache_dir=False)
    assert engine.models.config == a1111
    assert resolved(engine, reading("v1-5-pruned.safetensors")).endswith("Stable-diffusion/v1-5-pruned.safetensors")
    assert Engine(registry=stub_registry, cache_dir=False, model_paths=False).models.roots == ()


@pytest.mark.parametrize("text, words", [("a111: [unclosed", "not valid YAML at line 1"),
                                         ("- a list", "must map section names"),
                                         ("a111:\n  checkpoints: 3\n", "'checkpoints' must be a path")])
def test_a_broken_model_paths_file_is_a_usage_error(tmp_path, text, words):
    file = write(tmp_path, text, "model_paths.yaml")
    with pytest.raises(NodegraphError, match=words):
        Engine(cache_dir=False, model_paths=file)
    workflow = write(tmp_path, reading("x.safetensors"))
    done = cli("validate", str(workflow), "--model-paths", str(file))
    assert done.returncode == 2 and str(file) in done.stderr and "Traceback" not in done.stderr
    done = cli("validate", str(workflow), "--json", env={"NODEGRAPH_MODEL_PATHS": str(tmp_path / "none.yaml")})
    assert done.returncode == 2 and "no model paths file" in json.loads(done.stdout)["error"]


# ---------------------------------------------------------------------------------------------- nodegraph models

def test_nodegraph_models_lists_names_roots_and_problems(comfy, tmp_path):
    put(comfy / "diffusers" / "sd15" / "model_index.json", "{}")
    put(comfy / "diffusers" / "sd15" / "unet" / "config.json", "{}")
    put(comfy / "checkpoints" / "single.safetensors", "1234")
    put(comfy / "checkpoints" / "single.config" / "model_index.json", "{}")  # a single file's sidecar: no model
    missing = tmp_path / "not-there"
    done = cli("models", "--models", str(comfy), "--models", str(missing))
    assert done.returncode == 0, done.stderr
    assert "dreamshaper_8.safetensors" in done.stdout and "sdxl/juggernaut.safetensors" in done.stdout
    assert f"{missing} (--models) does not exist" in done.stderr
    done = cli("models", "--json", "--models", str(comfy), "--models", str(missing))
    document = json.loads(done.stdout)  # one document
    names = {f: [e["name"] for e in entries] for f, entries in document["folders"].items()}
    assert names["checkpoints"] == ["dreamshaper_8.safetensors", "sdxl/juggernaut.safetensors", "single.safetensors"]
    assert names["diffusers"] == ["sd15"] and names["loras"] == ["detail.safetensors"] and names["vae"] == []
    single = next(e for e in document["folders"]["checkpoints"] if e["name"] == "single.safetensors")
    assert single["size"] == 4 and single["root"] == str(comfy)
    assert [r["path"] for r in document["roots"]] == [str(comfy), str(missing)]
    assert any(str(missing) in p for p in document["problems"])
    done = cli("models", "loras", "--json", "--models", str(comfy))
    assert list(json.loads(done.stdout)["folders"]) == ["loras"]
    done = cli("models", "lora", "--models", str(comfy))
    assert done.returncode == 2 and "did you mean loras" in done.stderr


def test_an_empty_models_option_is_a_usage_error_not_the_current_folder(tmp_path):
    # the current folder is a models root by layout: an empty --models must not quietly make it one
    put(tmp_path / "checkpoints" / "here.safetensors")
    workflow = write(tmp_path, reading("here.safetensors"))
    for command in (["validate", str(workflow)], ["models"]):
        done = cli(*command, "--models", "", cwd=tmp_path, env={"NODEGRAPH_MODEL_PATHS": "off"})
        assert done.returncode == 2, done.stdout
        assert "--models" in done.stderr and "empty" in done.stderr


def test_a_models_root_that_is_a_file_is_reported_as_no_folder(tmp_path, a1111):
    model = put(tmp_path / "model.safetensors")
    done = cli("models", "--models", str(model), env={"NODEGRAPH_MODEL_PATHS": "off"})
    assert done.returncode == 0, done.stderr
    assert f"models root {model} (--models) is a file, not a folder" in done.stderr
    assert "does not exist" not in done.stderr
    put(a1111.parent / "webui" / "models" / "ControlNet")  # a file where the section names a folder
    problems = ModelRoots(read_model_paths(a1111)).problems()
    assert any("ControlNet" in p and p.endswith("is a file, not a folder") for p in problems), problems


# ---------------------------------------------------------------------------------------------- keys and a real model

def test_the_cache_key_follows_the_named_file_s_content(stub_registry, calls, comfy, tmp_path):
    def run():
        engine = Engine(registry=stub_registry, cache_dir=tmp_path / "cache", models=[comfy])
        return engine.run(reading("dreamshaper_8.safetensors"), targets=["r"], out_dir=tmp_path / "out")

    assert run().status["r"] == "ran"
    assert run().status["r"] == "cached"
    put(comfy / "checkpoints" / "dreamshaper_8.safetensors", "9")
    again = run()
    assert again.status["r"] == "ran" and again.outputs["r"]["x"].tolist() == [9.0, 9.0]


def test_the_engine_runs_a_checkpoint_named_by_name(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    file = shutil.copy(tiny.sd15_file, root / "checkpoints" / tiny.sd15_file.name)
    shutil.copytree(tiny.sd15_file_config, root / "checkpoints" / tiny.sd15_file_config.name)
    workflow = wf(ckpt={"type": "LoadCheckpoint", "params": {"path": tiny.sd15_file.name}},
                  pos={"type": "CLIPEncode", "inputs": {"clip": "ckpt.clip"}, "params": {"text": "a cat"}},
                  empty={"type": "EmptyLatent", "params": {"width": 32, "height": 32}},
                  s={"type": "Sampler", "inputs": {"model": "ckpt.model", "positive": "pos.conditioning",
                                                   "latent": "empty.latent"}, "params": {"seed": 3, "steps": 2}})

    def run():
        return Engine(cache_dir=tmp_path / "cache", models=[root]).run(workflow, targets=["s"])

    first = run()
    assert first.status["s"] == "ran" and first.info["models"]["ckpt"]["source"] == str(file)
    assert run().status["s"] == "cached"
    weights = load_file(str(file))
    name = next(k for k in weights if k.startswith("model.diffusion_model.out.") and k.endswith("bias"))
    weights[name] = weights[name] + 0.5
    save_file(weights, str(file))
    edited = run()
    assert edited.status["ckpt"] == "ran" and edited.status["s"] == "ran"
    assert not torch.equal(edited.outputs["s"]["latent"].samples, first.outputs["s"]["latent"].samples)


# ---------------------------------------------------------------------------------------------- served mode

UPSCALER_PLUGIN = '''
from pathlib import Path
from typing import Annotated

import torch

from nodegraph import node
from nodegraph.sockets import InputPath


@node("ReadUpscaler", category="test", outputs={"x": "NUMBER"}, output=True)
def read_upscaler(path: Annotated[str, InputPath(kind="file", folder="upscale_models")]) -> torch.Tensor:
    """A number read from a file named in the models folder upscale_models/."""
    return torch.full((2,), float(Path(path).read_text().strip()))
'''


def test_a_served_name_in_any_models_folder_a_plugin_declares_is_allowed(tmp_path, comfy):
    """Plugins may name any folder of ComfyUI's layout (docs/plugins.md); a served workflow naming a model found
    there reads it, and a link out of the models root is still refused."""
    from nodegraph.confine import Confinement
    from nodegraph.plugins import load_plugin_dirs
    from nodegraph.registry import Registry

    plugins = tmp_path / "plugins"
    put(plugins / "upscaler.py", UPSCALER_PLUGIN)
    registry = Registry()
    registry.load_builtins()
    load_plugin_dirs(registry, [plugins])
    assert not registry.problems, registry.problems
    put(comfy / "upscale_models" / "4x_ultrasharp.pth", "4")
    section = tmp_path / "webui" / "models" / "ESRGAN"
    put(section / "2x_esrgan.pth", "2")
    config = put(tmp_path / "model_paths.yaml", f"webui:\n    base_path: {tmp_path / 'webui'}\n"
                                                 "    upscale_models: models/ESRGAN\n")
    put(tmp_path / "secret.txt", "7")
    os.symlink(tmp_path / "secret.txt", comfy / "upscale_models" / "leak.pth")
    inputs = tmp_path / "input"
    inputs.mkdir()
    models = ModelRoots.gather([comfy], config, environ={})
    engine = Engine(registry=registry, cache_dir=False, models=models,
                    confine=Confinement.for_server(inputs, models))
    for name, value in (("4x_ultrasharp.pth", 4.0), ("2x_esrgan.pth", 2.0)):
        workflow = wf(r={"type": "ReadUpscaler", "params": {"path": name}})
        assert engine.validate(workflow) == []
        assert engine.run(workflow).outputs["r"]["x"].tolist() == [value, value]
    (issue,) = engine.validate(wf(r={"type": "ReadUpscaler", "params": {"path": "leak.pth"}}))
    assert issue.code == "confined_path"


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm here")
def test_models_on_the_dev_shm_ram_disk_are_read(stub_registry, tmp_path):
    """/dev/shm is a tmpfs of ordinary files, where models are often copied to load fast: a models root or a
    path there is read like any other, while the devices under /dev are still refused."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        root = put(Path(shm) / "models" / "checkpoints" / "fast.safetensors", "3").parents[1]
        engine = Engine(registry=stub_registry, cache_dir=False, models=[root])
        assert engine.validate(reading("fast.safetensors")) == []
        result = engine.run(reading(str(root / "checkpoints" / "fast.safetensors")), targets=["r"],
                            out_dir=tmp_path / "out")
        assert result.outputs["r"]["x"].tolist() == [3.0, 3.0]
    (issue,) = engine.validate(reading("/dev/zero"))
    assert issue.code == "bad_file" and "/dev" in issue.message
