"""The workflow file format (DESIGN §3): a pydantic model, loading, saving, a builder."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import Issue, WorkflowInvalid

FORMAT = "nodegraph/1"
NODE_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
LINK_PATTERN = r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_]+$"
PNG_WORKFLOW_KEY = "nodegraph.workflow"


class NodeSpec(BaseModel):
    """One node of a workflow: its type, links into it and literal params."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="Node type name, e.g. 'MaskBlur' (see `nodegraph nodes`).")
    inputs: dict[str, str] = Field(default_factory=dict, description="Links: input name -> '<node id>.<output name>'.")
    params: dict[str, Any] = Field(default_factory=dict, description="Literal values: param name -> JSON value.")
    title: str | None = Field(default=None, description="A human-readable label; ignored by the engine.")


class GroupSpec(BaseModel):
    """A reusable group of nodes with declared inputs and outputs (see docs/workflows.md).

    Inside the group, links to its inputs are written ``in.<input name>``; ``in.iteration``
    is the repetition number, from 1. An instance is a node of type ``group:<name>`` with
    an optional ``repeat`` param; each repetition's ``feedback`` outputs feed the named
    inputs of the next.
    """

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    inputs: dict[str, str] = Field(default_factory=dict, description="Input name -> type (IMAGE, INT, ...).")
    outputs: dict[str, str] = Field(default_factory=dict, description="Output name -> '<inner node id>.<output>'.")
    feedback: dict[str, str] = Field(default_factory=dict,
                                     description="Output name -> the input it feeds in the next repetition.")
    nodes: dict[str, NodeSpec] = Field(default_factory=dict)


class Workflow(BaseModel):
    """A whole workflow file."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["nodegraph/1"] = FORMAT
    description: str = ""
    groups: dict[str, GroupSpec] = Field(default_factory=dict)
    nodes: dict[str, NodeSpec] = Field(default_factory=dict)
    # Where relative paths in params resolve; not part of the file.
    base_dir: Path | None = Field(default=None, exclude=True)

    def to_json(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
        if not data["groups"]:
            del data["groups"]
        specs = [*data["nodes"].values(), *(n for g in data.get("groups", {}).values() for n in g["nodes"].values())]
        for spec in specs:
            for key in ("inputs", "params"):
                if not spec.get(key):
                    spec.pop(key, None)
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the workflow as JSON, atomically."""
        return write_text_atomic(Path(path), self.to_json())

    def with_overrides(self, overrides: dict[str, Any]) -> "Workflow":
        """A copy with ``{"node.param": value}`` set as literal params (links to them dropped).

        ``"group:NAME/INNER.param"`` sets a param of node INNER inside group NAME, for every
        instance and repetition of the group.
        """
        copy = self.model_copy(deep=True)
        problems = []
        for target, value in overrides.items():
            node_id, dot, name = target.partition(".")
            nodes, shown = copy.nodes, node_id
            if node_id.startswith("group:") and "/" in node_id:
                group_name, _, node_id = node_id[len("group:"):].partition("/")
                group = copy.groups.get(group_name)
                nodes = group.nodes if group is not None else {}
            if not dot or not name:
                problems.append(Issue("bad_override", f"--set '{target}': write NODE.PARAM=VALUE"))
            elif node_id not in nodes:
                problems.append(Issue("bad_override", f"--set '{target}': no node '{shown}' in the workflow"))
            else:
                spec = nodes[node_id]
                spec.inputs.pop(name, None)
                spec.params[name] = os.fspath(value) if isinstance(value, os.PathLike) else value
        if problems:
            raise WorkflowInvalid(problems)
        return copy


def write_text_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def parse_workflow(data: Any, base_dir: Path | None = None) -> Workflow:
    """Check the file's structure (not node types) and build a Workflow."""
    try:
        workflow = Workflow.model_validate(data)
    except ValidationError as exc:
        raise WorkflowInvalid([_structure_issue(err) for err in exc.errors()]) from None
    inner_ids = [i for group in workflow.groups.values() for i in group.nodes]
    bad_ids = [node_id for node_id in [*workflow.nodes, *inner_ids, *workflow.groups] if not _is_node_id(node_id)]
    if bad_ids:
        raise WorkflowInvalid(
            [Issue("bad_node_id", "node ids may only use letters, digits, '_' and '-'", node_id=i) for i in bad_ids]
        )
    workflow.base_dir = base_dir
    return workflow


_NODE_ID = re.compile(NODE_ID_PATTERN)


def _is_node_id(text: str) -> bool:
    return _NODE_ID.match(text) is not None


def _structure_issue(err: dict) -> Issue:
    loc = [str(part) for part in err.get("loc", ())]
    if len(loc) >= 2 and loc[0] == "nodes":
        node_id = loc[1]
        field = ".".join(loc[2:]) or None
        return Issue("bad_structure", f"{err['msg']}", node_id=node_id, field=field)
    where = ".".join(loc) or "the file"
    return Issue("bad_structure", f"{where}: {err['msg']}")


def load_workflow(path: str | Path) -> Workflow:
    """Load a workflow file, or the workflow embedded in a PNG that SaveImage wrote."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise WorkflowInvalid([Issue("unreadable_file", f"cannot read workflow file '{path}': {exc.strerror or exc}")]) from None
    if raw.startswith(b"\x89PNG"):
        text = _png_workflow_text(path)
    else:
        text = raw.decode("utf-8", errors="replace")
    return loads_workflow(text, base_dir=path.resolve().parent, source=str(path))


def loads_workflow(text: str, base_dir: Path | None = None, source: str = "<string>") -> Workflow:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowInvalid(
            [Issue("bad_json", f"{source}: line {exc.lineno}, column {exc.colno}: {exc.msg}; fix the JSON syntax there")]
        ) from None
    return parse_workflow(data, base_dir=base_dir)


def _png_workflow_text(path: Path) -> str:
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = image.info.get(PNG_WORKFLOW_KEY)
    except Exception as exc:  # PIL raises many kinds for broken files
        raise WorkflowInvalid([Issue("unreadable_file", f"cannot read PNG '{path}': {exc}")]) from None
    if not text:
        raise WorkflowInvalid(
            [Issue("no_workflow", f"'{path}' has no embedded workflow ('{PNG_WORKFLOW_KEY}' text chunk); "
                   "only images saved by SaveImage carry one")]
        )
    return text


class WorkflowBuilder:
    """Make a workflow in Python:

        b = WorkflowBuilder("blur a mask")
        img = b.add("LoadImage", id="load", path="photo.png")
        blur = b.add("MaskBlur", mask=img["mask"], radius=4)
        b.add("SaveImage", image=...)
        b.save("wf.json")

    Keyword arguments that are outputs of earlier nodes (``img["mask"]``) become
    links; everything else is a literal param.
    """

    def __init__(self, description: str = ""):
        self.workflow = Workflow(description=description)
        self._counter = 0

    def add(self, type_name: str, id: str | None = None, title: str | None = None, **fields: Any) -> "NodeRef":
        if id is None:
            self._counter += 1
            id = f"{type_name.lower()}{self._counter}"
            while id in self.workflow.nodes:
                self._counter += 1
                id = f"{type_name.lower()}{self._counter}"
        if id in self.workflow.nodes:
            raise ValueError(f"node id '{id}' is already used")
        inputs = {k: str(v) for k, v in fields.items() if isinstance(v, OutputRef)}
        params = {k: v for k, v in fields.items() if not isinstance(v, OutputRef)}
        self.workflow.nodes[id] = NodeSpec(type=type_name, inputs=inputs, params=params, title=title)
        return NodeRef(id)

    def build(self) -> Workflow:
        return self.workflow.model_copy(deep=True)

    def save(self, path: str | Path) -> Path:
        return self.workflow.save(path)


class OutputRef(str):
    """A link target, written '<node id>.<output>'."""


class NodeRef(str):
    """The id of a node added by the builder; index it by output name to link."""

    def __getitem__(self, output: str) -> OutputRef:  # type: ignore[override]
        return OutputRef(f"{self}.{output}")
