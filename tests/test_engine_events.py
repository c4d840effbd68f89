"""Engine.run(events=...): the hook a server reports runs through (cached nodes, node starts and ends,
files written), and Engine(confine=...): file params kept inside the allowed folders."""
import pytest

from nodegraph.api import Engine
from nodegraph.confine import Confinement
from tests.test_engine_executor import chain


def test_events_name_cached_nodes_then_each_node_as_it_starts_and_ends(stub_registry, calls):
    engine = Engine(registry=stub_registry, cache_dir=False)
    seen = []
    engine.run(chain(), out_dir="unused", events=lambda kind, node, value: seen.append((kind, node, value)))
    assert seen[0] == ("cached", None, [])
    order = ["src", "add0", "add1", "add2", "add3", "sink"]
    assert seen[1:] == [e for n in order for e in (("start", n, None), ("done", n, []))]
    seen.clear()
    engine.run(chain(last=2.0), out_dir="unused", events=lambda kind, node, value: seen.append((kind, node, value)))
    assert seen[0] == ("cached", None, ["src", "add0", "add1", "add2"])
    assert [n for kind, n, _ in seen if kind == "start"] == ["add3", "sink"]


def test_confinement_refuses_paths_outside_and_hub_ids(stub_registry, tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir(), outside.mkdir()
    (inside / "a.txt").write_text("a")
    (outside / "b.txt").write_text("b")
    (inside / "link.txt").symlink_to(outside / "b.txt")
    confine = Confinement((inside.resolve(),))
    from nodegraph.validate import _resolve_path
    from nodegraph.model_folders import ModelRoots
    from nodegraph.sockets import InputPath
    from nodegraph.definitions import InputSpec

    spec = InputSpec("path", "str", False, True, path=InputPath(kind="file"))
    remote = InputSpec("path", "str", False, True, path=InputPath(kind="any", must_exist=False))
    resolve = lambda value, s=spec: _resolve_path(value, s, inside, ModelRoots(), confine)
    assert resolve("a.txt") == (str((inside / "a.txt").resolve()), None)
    for value in (str(outside / "b.txt"), "../out/b.txt", "link.txt", "~/x"):
        assert resolve(value)[1].code == "confined_path", value
    assert resolve("owner/model", remote)[1].code == "download_refused"
    allowed = Confinement((inside.resolve(),), allow_download=True)
    assert _resolve_path("owner/model", remote, inside, ModelRoots(), allowed) == ("owner/model", None)
    # without confinement (the CLI) the same paths still resolve
    assert _resolve_path(str(outside / "b.txt"), spec, inside, ModelRoots())[1] is None


def test_a_file_swapped_for_a_link_out_after_validation_is_refused_when_run_again(tmp_path):
    from PIL import Image

    from nodegraph.errors import WorkflowInvalid
    from nodegraph.workflow import read_workflow

    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir(), outside.mkdir()
    Image.new("RGB", (8, 8)).save(inside / "a.png")
    Image.new("RGB", (8, 8), "red").save(outside / "b.png")
    engine = Engine(cache_dir=False, confine=Confinement((inside.resolve(),)))
    doc = {"format": "nodegraph/1", "nodes": {"load": {"type": "LoadImage", "params": {"path": "a.png"}}}}
    engine.run(read_workflow(doc, base_dir=inside), targets=["load"], out_dir=tmp_path / "o")
    (inside / "a.png").unlink()
    (inside / "a.png").symlink_to(outside / "b.png")
    with pytest.raises(WorkflowInvalid) as caught:
        engine.run(read_workflow(doc, base_dir=inside), targets=["load"], out_dir=tmp_path / "o")
    assert caught.value.issues[0].code == "confined_path"
