"""The package as users install it: nodegraph.nodes inside nodegraph, nothing named nodes in site-packages."""
import os
import shutil
import subprocess
import sys
import zipfile

from .conftest import REPO


def test_the_wheel_installs_the_node_library_as_nodegraph_nodes(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    for name in ("nodegraph", "nodes"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(source)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("nodegraph-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert "nodes" not in tops and "nodegraph" in tops
    assert "nodegraph/nodes/sampling.py" in names and "nodegraph/nodes/__init__.py" in names
    # the server with its status page, and the ComfyUI importer it converts prompts with
    assert {"nodegraph/server/app.py", "nodegraph/server/page/index.html", "nodegraph/server/page/app.js",
            "nodegraph/comfy/convert.py"} <= set(names)


def test_import_works_beside_a_nodes_py(tmp_path):
    (tmp_path / "nodes.py").write_text("raise ImportError('the folder\\'s own nodes.py')\n")
    code = ("import nodegraph, nodegraph.nodes.mask\n"
            "from nodegraph import node, IMAGE, MASK, Image, Mask, RunContext, NodeError, socket\n"
            "from nodegraph.plugins import default_registry\n"
            "print(nodegraph.__version__, 'MaskBlur' in default_registry().types, callable(node))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1:] == ["True", "True"]
