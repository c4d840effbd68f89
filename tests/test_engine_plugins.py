"""Plugins: an installed entry-point package, folders, a broken plugin, a name clash."""
import json
import os
import subprocess
import sys
import textwrap
import zipfile

from nodegraph.plugins import load_plugin_dirs
from nodegraph.registry import Registry

from .conftest import REPO

PLUGIN_SOURCE = '''
"""A throwaway plugin: one node and a socket type of its own."""
from typing import Annotated
from pydantic import Field
from nodegraph import node
from nodegraph.sockets import socket, IMAGE, Image

WORD = "WORD"

@node("DemoShout", version=2, category="demo", outputs={"word": WORD})
def shout(text: str = "hi", times: Annotated[int, Field(ge=1, le=5)] = 2) -> str:
    """Repeat a word loudly."""
    return (text.upper() + "!") * times

@node("DemoPrint", category="demo", outputs={"word": WORD}, output=True)
def print_word(word: socket(WORD, str)) -> str:
    """Print a word."""
    print("DEMO:", word)
    return word
'''


def build_wheel(tmp_path):
    """A real wheel of a package declaring a `nodegraph.nodes` entry point."""
    name, version = "nodegraph_demo_plugin", "0.1"
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": PLUGIN_SOURCE,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist_info}/entry_points.txt": f"[nodegraph.nodes]\ndemo = {name}\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist_info}/RECORD"])
    wheel = tmp_path / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def cli(*args, env_extra=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "nodegraph.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_installed_entry_point_plugin_runs_in_a_workflow(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(target), str(build_wheel(tmp_path))], check=True, timeout=120)
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps({"format": "nodegraph/1", "nodes": {
        "shout": {"type": "DemoShout", "params": {"text": "hey", "times": 3}},
        "print": {"type": "DemoPrint", "inputs": {"word": "shout.word"}}}}))
    env = {"PYTHONPATH": os.pathsep.join([str(target), str(REPO)])}
    done = cli("run", str(workflow), "--json", env_extra=env)
    assert done.returncode == 0, done.stderr
    assert "DEMO: HEY!HEY!HEY!" in done.stderr  # with --json, what nodes print goes to stderr
    assert json.loads(done.stdout)["nodes"]["print"]["status"] == "ran"
    listed = json.loads(cli("nodes", "--json", env_extra=env).stdout)
    demo = next(d for d in listed if d["type"] == "DemoShout")
    assert demo["version"] == 2 and demo["origin"].startswith("plugin 'demo'")
    assert demo["params"]["times"]["schema"]["maximum"] == 5
    bad = cli("validate", str(workflow), "--set", "shout.times=9", env_extra=env)
    assert bad.returncode == 2 and "node 'shout' (DemoShout): param 'times' = 9" in bad.stderr


def write_plugins(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return folder


GOOD = '''
from nodegraph import node
from nodegraph.sockets import INT

@node("{name}", category="t", outputs={{"value": INT}})
def f(value: int = 1) -> int:
    """A test node."""
    return value
'''


def test_broken_plugin_is_reported_by_name_and_others_load(tmp_path):
    folder = write_plugins(tmp_path / "plugins", {
        "broken.py": "import not_a_module_anywhere\n",
        "good.py": GOOD.format(name="GoodNodeA"),
        "goodpkg/__init__.py": "from .impl import *\n",
        "goodpkg/impl.py": GOOD.format(name="GoodNodeB"),
    })
    registry = Registry()
    load_plugin_dirs(registry, [folder])
    assert "GoodNodeA" in registry and "GoodNodeB" in registry
    (problem,) = registry.problems
    assert "plugin 'broken'" in str(problem) and "No module named 'not_a_module_anywhere'" in str(problem)


def test_name_clash_names_both_origins_and_fails_validation(tmp_path):
    folder = write_plugins(tmp_path / "clash", {
        "first_plugin.py": GOOD.format(name="ClashNode"),
        "second_plugin.py": GOOD.format(name="ClashNode"),
    })
    registry = Registry()
    load_plugin_dirs(registry, [folder])
    (problem,) = registry.problems
    assert "'ClashNode'" in str(problem) and "first_plugin" in str(problem) and "second_plugin" in str(problem)
    from nodegraph.api import Engine

    issues = Engine(registry=registry).validate({"format": "nodegraph/1", "nodes": {"c": {"type": "ClashNode"}}},
                                                targets=["c"])
    assert [i.code for i in issues] == ["ambiguous_type"]


def test_plugin_folder_from_environment_and_missing_folder_warning(tmp_path):
    folder = write_plugins(tmp_path / "envplugins", {"envplug.py": GOOD.format(name="EnvNode")})
    done = cli("nodes", "--plugins", str(tmp_path / "nowhere"), env_extra={"NODEGRAPH_PLUGINS": str(folder)})
    assert done.returncode == 0
    assert "EnvNode v1" in done.stdout and "plugin 'envplug'" in done.stdout
    assert "plugin folder" in done.stderr and "nowhere" in done.stderr


def test_same_file_name_in_two_folders_loads_both(tmp_path):
    first = write_plugins(tmp_path / "a", {"util.py": GOOD.format(name="FromFolderA")})
    second = write_plugins(tmp_path / "b", {"util.py": GOOD.format(name="FromFolderB")})
    registry = Registry()
    load_plugin_dirs(registry, [first, second])
    assert "FromFolderA" in registry and "FromFolderB" in registry and not registry.problems


def test_entry_points_are_looked_up_again_only_when_a_folder_on_sys_path_changes(tmp_path, monkeypatch):
    import nodegraph.plugins as plugins

    lookups = []
    real = plugins.entry_points
    monkeypatch.setattr(plugins, "entry_points", lambda **kw: lookups.append(kw) or real(**kw))
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    plugins._FOUND.clear()
    assert "DemoShout" not in plugins.default_registry().types
    plugins.default_registry()
    assert len(lookups) == 1  # the second registry reused the first lookup
    with zipfile.ZipFile(build_wheel(tmp_path)) as wheel:  # "installed" into a folder already on sys.path
        wheel.extractall(site)
    try:
        assert "DemoShout" in plugins.default_registry().types and len(lookups) == 2
    finally:
        sys.modules.pop("nodegraph_demo_plugin", None)


BROKEN_DEFINITIONS = {
    "bad_default.py": '''
        from typing import Annotated
        from pydantic import Field
        from nodegraph import node
        from nodegraph.sockets import INT

        @node("BadDefault", outputs={"value": INT})
        def bad_default(times: Annotated[int, Field(ge=1, le=5)] = 0) -> int:
            """A default outside its own bounds."""
            return times
    ''',
    "async_node.py": '''
        from nodegraph import node
        from nodegraph.sockets import ANY

        @node("AsyncNode", outputs={"value": ANY})
        async def async_node() -> int:
            """A coroutine function."""
            return 1
    ''',
    "generator_node.py": '''
        from nodegraph import node
        from nodegraph.sockets import ANY

        @node("GeneratorNode", outputs={"value": ANY})
        def generator_node():
            """A generator function."""
            yield 1
    ''',
    "unsupported.py": '''
        from nodegraph import node
        from nodegraph.sockets import INT

        class Thing:
            pass

        @node("Unsupported", outputs={"value": INT})
        def unsupported(thing: Thing) -> int:
            """A param of a type that is no JSON value."""
            return 1
    ''',
}


def test_node_definitions_the_engine_cannot_honour_are_reported_when_the_plugin_loads(tmp_path):
    # A default the bounds reject would reach the node unchecked whenever a workflow leaves the param out;
    # a coroutine or generator function would hand an un-run coroutine or generator on as its output.
    folder = write_plugins(tmp_path / "plugins", {**BROKEN_DEFINITIONS, "good.py": GOOD.format(name="StillLoads")})
    registry = Registry()
    load_plugin_dirs(registry, [folder])
    assert "StillLoads" in registry
    assert not {"BadDefault", "AsyncNode", "GeneratorNode", "Unsupported"} & set(registry.types)
    problems = sorted(str(p) for p in registry.problems)
    assert len(problems) == 4
    assert "plugin 'async_node'" in problems[0] and "AsyncNode" in problems[0] and "async" in problems[0]
    assert ("plugin 'bad_default'" in problems[1] and "param 'times'" in problems[1] and "default 0" in problems[1]
            and "greater than or equal to 1" in problems[1])
    assert "plugin 'generator_node'" in problems[2] and "generator" in problems[2]
    # pydantic's advice on model_config does not apply to a node function: one line that says what to do
    assert "param 'thing' has an unsupported type" in problems[3] and "socket(NAME, cls)" in problems[3]
    assert "\n" not in problems[3] and "arbitrary_types_allowed" not in problems[3]


def test_lone_surrogate_in_a_param_is_named_as_such(tmp_path):
    folder = write_plugins(tmp_path / "plugins", {"choice.py": '''
        from typing import Literal
        from nodegraph import node
        from nodegraph.sockets import STRING

        @node("Choice", outputs={"value": STRING}, output=True)
        def choice(mode: Literal["a", "b"] = "a", count: int = 1) -> str:
            """Pick one."""
            return mode
    '''})
    workflow = tmp_path / "wf.json"
    workflow.write_text('{"format": "nodegraph/1", "nodes": {"c": {"type": "Choice", '
                        '"params": {"mode": "\\ud800", "count": "\\udfff"}}}}')
    done = cli("validate", str(workflow), "--plugins", str(folder))
    assert done.returncode == 2
    assert "Invalid JSON" not in done.stderr and "hex escape" not in done.stderr
    for param, surrogate in (("mode", "\\ud800"), ("count", "\\udfff")):
        assert f"param '{param}' = '{surrogate}': holds a lone surrogate ('{surrogate}')" in done.stderr, done.stderr


def test_a_file_given_as_a_folder_is_named_as_a_file(tmp_path):
    folder = write_plugins(tmp_path / "plugins", {"node.py": GOOD.format(name="FileFlagNode")})
    workflow = tmp_path / "wf.json"
    workflow.write_text('{"format": "nodegraph/1", "nodes": {"n": {"type": "FileFlagNode"}}}')
    plugin_file, model_file = folder / "node.py", tmp_path / "model.safetensors"
    model_file.write_bytes(b"x")
    runs = {"run": ["--target", "n", "--no-cache"], "validate": []}
    for command, extra in runs.items():
        done = cli(command, str(workflow), *extra, "--plugins", str(plugin_file), "--models", str(model_file),
                   cwd=tmp_path)
        assert f"plugin folder '{plugin_file}' is a file, not a folder" in done.stderr, done.stderr
        assert "does not exist" not in done.stderr
        assert f"models root {model_file} (--models) is a file, not a folder" in done.stderr, (command, done.stderr)


def test_a_node_that_changes_its_input_in_place_fails_and_the_cached_value_is_not_served_again(tmp_path):
    folder = write_plugins(tmp_path / "plugins", {"mutate.py": '''
        import torch
        from nodegraph import node
        from nodegraph.sockets import FLOAT, IMAGE, Image

        @node("HalfGrey", outputs={"image": IMAGE})
        def half_grey() -> torch.Tensor:
            """A grey image."""
            return torch.full((1, 3, 8, 8), 0.5)

        @node("Blackout", outputs={"image": IMAGE})
        def blackout(image: Image) -> torch.Tensor:
            """Darkens its input in place, which it must not."""
            return image.mul_(0)

        @node("Mean", outputs={"value": FLOAT}, output=True)
        def mean(image: Image) -> float:
            """The mean value."""
            return float(image.mean())
    '''})
    from nodegraph.api import Engine
    from nodegraph.errors import NodeFailed

    registry = Registry()
    registry.load_builtins()
    load_plugin_dirs(registry, [folder])
    engine = Engine(registry=registry, cache_dir=False)
    source = {"grey": {"type": "HalfGrey"}}
    darken = {"dark": {"type": "Blackout", "inputs": {"image": "grey.image"}},
              "m": {"type": "Mean", "inputs": {"image": "dark.image"}}}
    try:
        engine.run({"format": "nodegraph/1", "nodes": {**source, **darken}})
    except NodeFailed as exc:
        assert "node 'dark' (Blackout)" in str(exc) and "changed its input 'image' in place" in str(exc)
    else:
        raise AssertionError("a node that changed its input in place ran without complaint")
    mean = {"m": {"type": "Mean", "inputs": {"image": "grey.image"}}}
    again = engine.run({"format": "nodegraph/1", "nodes": {**source, **mean}})
    assert again.outputs["m"]["value"] == 0.5


def test_a_plugin_that_failed_to_load_loads_cleanly_once_it_works(tmp_path, monkeypatch):
    # a missing dependency installed, a setting fixed: the next registry in the same process must not see the
    # nodes the failed import had declared before it raised as a second plugin of the same names
    folder = write_plugins(tmp_path / "plugins", {"flaky.py": GOOD.format(name="FlakyNode") + '''
import os
if os.environ.get("FLAKY_PLUGIN_FAILS"):
    raise RuntimeError("not ready")
'''})
    monkeypatch.setenv("FLAKY_PLUGIN_FAILS", "1")
    first = Registry()
    load_plugin_dirs(first, [folder])
    assert "FlakyNode" not in first and "not ready" in str(first.problems[0])
    monkeypatch.delenv("FLAKY_PLUGIN_FAILS")
    second = Registry()
    load_plugin_dirs(second, [folder])
    assert "FlakyNode" in second and not second.problems, [str(p) for p in second.problems]


def test_registries_built_in_two_threads_at_once_both_get_every_node_of_a_plugin(tmp_path):
    # Engine() in two threads at once: the second must not take the plugin while the first is still running it
    import threading
    import time

    folder = write_plugins(tmp_path / "plugins", {"slow.py": GOOD.format(name="SlowFirst") + '''
import time
time.sleep(1.0)
''' + GOOD.format(name="SlowSecond").replace("def f(", "def g(")})
    found = {}

    def load(i):
        registry = Registry()
        load_plugin_dirs(registry, [folder])
        found[i] = {t for t in registry.types if t.startswith("Slow")}

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    threads[0].start()
    time.sleep(0.2)
    threads[1].start()
    for thread in threads:
        thread.join()
    assert found == {0: {"SlowFirst", "SlowSecond"}, 1: {"SlowFirst", "SlowSecond"}}


def test_an_empty_plugin_folder_name_runs_nothing_from_the_current_folder(tmp_path):
    # `--plugins "$DIR"` with DIR unset: "" must not mean ".", where every script would be run as a plugin
    (tmp_path / "script.py").write_text("open('ran', 'w').close()\n")
    done = cli("nodes", "--plugins", "", cwd=tmp_path)
    assert done.returncode == 0 and not (tmp_path / "ran").exists()
    assert "plugin folder" in done.stderr and "empty" in done.stderr
