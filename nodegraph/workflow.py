"""The workflow file format (docs/workflows.md): a pydantic model, lenient loading, saving, a builder.

Loading reports every problem of a file at once: a node with a structural mistake (an
unknown key, a bad id, a duplicate key) is reported and left out, and the rest of the
workflow is still validated, so one mistake does not hide the others.
"""
from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from .atomic import write_text_atomic
from .errors import Issue, WorkflowInvalid, short_repr

FORMAT = "nodegraph/1"
FORMAT_VERSION = 1
NODE_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
LINK_PATTERN = r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_]+$"
PNG_WORKFLOW_KEY = "nodegraph.workflow"
_NODE_ID = re.compile(r"[A-Za-z0-9_-]+")
TOP_KEYS = ("$schema", "format", "description", "groups", "nodes")
LONGEST_INT = 100  # digits; longer integer literals are reported, never converted


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

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_url: str | None = Field(default=None, alias="$schema", description="Editors add it; ignored.")
    format: Literal["nodegraph/1"] = FORMAT
    description: str = ""
    groups: dict[str, GroupSpec] = Field(default_factory=dict)
    nodes: dict[str, NodeSpec] = Field(default_factory=dict)
    # Where relative paths in params resolve; not part of the file.
    base_dir: Path | None = Field(default=None, exclude=True)
    # Problems found while reading the file, reported with the rest by validation.
    _problems: list[Issue] = PrivateAttr(default_factory=list)
    _broken: set[str] = PrivateAttr(default_factory=set)  # ids of nodes left out for structural mistakes

    @property
    def problems(self) -> list[Issue]:
        return self._problems

    @property
    def broken(self) -> set[str]:
        return self._broken

    def to_json(self) -> str:
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=False)
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

    def with_overrides(self, overrides: dict[str, Any], strict: bool = True) -> "Workflow":
        """A copy with ``{"node.param": value}`` set as literal params (links to them dropped).

        ``"group:NAME/INNER.param"`` sets a param of node INNER inside group NAME, for every
        instance and repetition of the group. A bad override raises WorkflowInvalid, or with
        ``strict=False`` joins the copy's ``problems`` (reported by validation with the rest).
        An override of a node left out for a structural mistake is dropped: that mistake is reported.
        """
        import os

        copy = self.model_copy(deep=True)
        copy._problems, copy._broken = list(self._problems), set(self._broken)
        problems = []
        for target, value in overrides.items():
            node_id, dot, name = target.partition(".")
            nodes, shown = copy.nodes, node_id
            if node_id.startswith("group:") and "/" in node_id:
                group_name, _, node_id = node_id[len("group:"):].partition("/")
                group = copy.groups.get(group_name)
                nodes = group.nodes if group is not None else {}
            if not dot or not name:
                problems.append(Issue("bad_override", f"--set {short_repr(target)}: write NODE.PARAM=VALUE"))
            elif node_id in self._broken or f"group:{shown[len('group:'):].partition('/')[0]}" in self._broken:
                continue
            elif node_id not in nodes:
                problems.append(Issue("bad_override", f"--set {short_repr(target)}: no node '{shown}' in the workflow"))
            else:
                spec = nodes[node_id]
                spec.inputs.pop(name, None)
                spec.params[name] = os.fspath(value) if isinstance(value, os.PathLike) else value
        if problems and strict:
            raise WorkflowInvalid(problems)
        copy._problems.extend(problems)
        return copy


def is_node_id(text: str) -> bool:
    return isinstance(text, str) and _NODE_ID.fullmatch(text) is not None


def shown_id(text: str) -> str:
    """A bad node id as it can be shown: control characters (a trailing newline, say) escaped."""
    shown = text if text.isprintable() else repr(text)[1:-1]
    return shown if len(shown) <= 60 else shown[:57] + "..."


# ---------------------------------------------------------------------------------------------- reading

class _Object(dict):
    """A JSON object as parsed; remembers keys given twice (json would silently keep the last)."""

    duplicates: tuple = ()


class _LongInt:
    """An integer literal too long to convert (Python refuses past 4,300 digits; no param needs 100)."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def parse_json(text: str, source: str = "<string>") -> tuple[Any, list[Issue]]:
    """JSON, and the problems a plain parse would hide: duplicate keys and overlong integers, with where
    they are (never guessed at)."""
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> _Object:
        obj = _Object(items)
        if len(obj) != len(items):
            seen: set[str] = set()
            obj.duplicates = tuple(sorted({k for k, _ in items if k in seen or seen.add(k)}))
            found.append("duplicate")
        return obj

    def integer(digits: str) -> int | _LongInt:
        if len(digits) > LONGEST_INT:
            found.append("long")
            return _LongInt(digits)
        return int(digits)

    try:
        data = json.loads(text, object_pairs_hook=pairs, parse_int=integer)
    except RecursionError:
        raise WorkflowInvalid([Issue("bad_json", f"{source}: the JSON is nested too deeply to read; a workflow "
                                     "needs only a few levels")]) from None
    except json.JSONDecodeError as exc:
        raise WorkflowInvalid(
            [Issue("bad_json", f"{source}: line {exc.lineno}, column {exc.colno}: {exc.msg}; fix the JSON syntax there")]
        ) from None
    except ValueError as exc:
        raise WorkflowInvalid([Issue("bad_json", f"{source}: {exc}")]) from None
    return data, (_marked_problems(data) if found else [])


def _marked_problems(data: Any) -> list[Issue]:
    """Where the duplicate keys and overlong integers of a parsed document are (run only when there are some)."""
    issues = []
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for key in getattr(value, "duplicates", ()):
                issues.append(_located("duplicate_key", path + (key,), f"the key {short_repr(key)} is given "
                                       "twice in one JSON object; keep one (JSON readers disagree on which wins)"))
            stack.extend((v, path + (k,)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, path + (i,)) for i, v in enumerate(value))
        elif isinstance(value, _LongInt):
            issues.append(_located("invalid_param", path, f"an integer of {value.digits} digits is far out of "
                                   "range; give a number that fits in 64 bits"))
    return issues


def _located(code: str, path: tuple, message: str) -> Issue:
    """An issue at a JSON path, naming the node and field where the path is inside one."""
    parts = [str(p) for p in path]
    if len(parts) >= 2 and parts[0] == "nodes":
        field = parts[3] if len(parts) >= 4 and parts[2] in ("params", "inputs") else ".".join(parts[2:]) or None
        kind = {"params": "param", "inputs": "input"}.get(parts[2]) if len(parts) >= 4 else None
        return Issue(code, message, node_id=parts[1], field=field, kind=kind)
    if len(parts) >= 2 and parts[0] == "groups":
        return Issue(code, message, node_id=f"group:{parts[1]}", node_type="group", field=".".join(parts[2:]) or None)
    return Issue(code, f"{'.'.join(parts) or 'the file'}: {message}")


def _structure_issue(err: dict, node_id: str | None = None, prefix: tuple = ()) -> Issue:
    loc = [*prefix, *(str(part) for part in err.get("loc", ()))]
    message = err["msg"]
    if err.get("type") == "extra_forbidden":
        message = "is not a key of a node; a node has type, inputs, params and title"
    if node_id is not None:
        return Issue("bad_structure", message, node_id=node_id, field=".".join(loc) or None)
    return Issue("bad_structure", f"{'.'.join(loc) or 'the file'}: {message}")


def read_workflow(data: Any, base_dir: Path | None = None, found: list[Issue] | None = None) -> Workflow:
    """A Workflow from parsed JSON, keeping every well-formed node; the problems of the others are in
    ``workflow.problems`` (validation reports them with the rest). A file that is not a workflow at all,
    or of a newer format, raises WorkflowInvalid. A ComfyUI workflow (API or editor format) is imported first
    (nodegraph.comfy); its problems raise WorkflowInvalid, each naming the ComfyUI id and class_type."""
    if isinstance(data, dict) and "format" not in data:
        from .comfy import NODEGRAPH, detect_format, to_nodegraph

        if detect_format(data) != NODEGRAPH:
            data = to_nodegraph(data)
    if not isinstance(data, dict):
        raise WorkflowInvalid([Issue("bad_structure", "a workflow is a JSON object with \"format\" and \"nodes\"; "
                                     f"this holds a {type(data).__name__}")])
    issues: list[Issue] = list(found or [])
    broken: set[str] = {i.node_id for i in issues if i.node_id}
    fmt = data.get("format")
    if fmt != FORMAT:
        newer = re.fullmatch(r"nodegraph/(\d+)", fmt) if isinstance(fmt, str) else None
        if newer and int(newer[1]) > FORMAT_VERSION:
            from .versions import version

            raise WorkflowInvalid([Issue("newer_format", f"the workflow is format '{fmt}', newer than this nodegraph "
                                         f"({version()}) reads ('{FORMAT}'); upgrade nodegraph")])
        issues.append(Issue("bad_format", "a workflow needs \"format\": \"nodegraph/1\"" if fmt is None else
                            f"format {short_repr(fmt)} is not one nodegraph reads; write \"format\": \"{FORMAT}\""))
    for key in data:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; the keys are {', '.join(TOP_KEYS)}"
            issues.append(Issue("bad_structure", f"unknown key {short_repr(key)} at the top of the workflow{hint}"))
    if "nodes" not in data:
        issues.append(Issue("bad_structure", "a workflow needs \"nodes\": {node id: {\"type\": ..., ...}}"))
    description = data.get("description", "")
    if not isinstance(description, str):
        issues.append(Issue("bad_structure", "description must be a string"))
        description = ""
    schema_url = data.get("$schema")
    if schema_url is not None and not isinstance(schema_url, str):
        issues.append(Issue("bad_structure", "$schema must be a string (the schema's address)"))
    nodes = _read_nodes(data.get("nodes", {}), "nodes", issues, broken)
    groups: dict[str, GroupSpec] = {}
    raw_groups = data.get("groups", {})
    if not isinstance(raw_groups, dict):
        issues.append(Issue("bad_structure", "groups must be an object: {group name: {...}}"))
        raw_groups = {}
    for name, raw in raw_groups.items():
        where = f"group:{name}"
        if not is_node_id(name):
            issues.append(Issue("bad_node_id", "group names may only use letters, digits, '_' and '-'",
                                node_id=shown_id(name)))
            continue
        if where in broken:
            continue
        if isinstance(raw, dict) and "nodes" not in raw:
            issues.append(Issue("bad_structure", "a group needs \"nodes\"", node_id=where, node_type="group",
                                field="nodes"))
            broken.add(where)
            continue
        raw_nodes = raw.get("nodes", {}) if isinstance(raw, dict) else {}
        inner_issues: list[Issue] = []
        inner = _read_nodes(raw_nodes, f"group '{name}'", inner_issues, set())
        for issue in inner_issues:
            field = ".".join(part for part in ("nodes", issue.node_id, issue.field) if part)
            issues.append(Issue(issue.code, issue.message, node_id=where, node_type="group", field=field))
        try:
            groups[name] = GroupSpec.model_validate({**raw, "nodes": {}} if isinstance(raw, dict) else raw)
            groups[name].nodes = inner
        except ValidationError as exc:
            issues.extend(Issue("bad_structure", e["msg"], node_id=where, node_type="group",
                                field=".".join(str(p) for p in e["loc"]) or None) for e in exc.errors())
        if inner_issues:
            broken.add(where)
    workflow = Workflow.model_construct(schema_url=schema_url if isinstance(schema_url, str) else None,
                                        format=FORMAT, description=description, groups=groups, nodes=nodes,
                                        base_dir=base_dir)
    workflow._problems, workflow._broken = issues, broken
    return workflow


def _read_nodes(raw: Any, where: str, issues: list[Issue], broken: set[str]) -> dict[str, NodeSpec]:
    if not isinstance(raw, dict):
        issues.append(Issue("bad_structure", f"nodes of {where} must be an object: {{node id: {{\"type\": ...}}}}"))
        return {}
    nodes = {}
    for node_id, spec in raw.items():
        if not is_node_id(node_id):
            issues.append(Issue("bad_node_id", "node ids may only use letters, digits, '_' and '-'",
                                node_id=shown_id(node_id)))
            broken.add(node_id)
            continue
        if node_id in broken:
            continue
        try:
            nodes[node_id] = NodeSpec.model_validate(spec)
        except ValidationError as exc:
            issues.extend(_structure_issue(err, node_id) for err in exc.errors())
            broken.add(node_id)
    return nodes


def parse_workflow(data: Any, base_dir: Path | None = None) -> Workflow:
    """Read a workflow and raise WorkflowInvalid if its structure has any problem (node types are not checked)."""
    workflow = read_workflow(data, base_dir)
    if workflow.problems:
        raise WorkflowInvalid(workflow.problems)
    return workflow


def read_workflow_file(path: str | Path) -> bytes:
    """The bytes of a workflow file, read once; only a regular file is read (a FIFO or a device would block
    or never end)."""
    from .files import check_path, open_regular

    path = Path(path)
    problem = check_path(path, "file")
    if problem is not None:
        raise WorkflowInvalid([Issue("unreadable_file", f"cannot read workflow file: {problem.message}")])
    try:
        with open_regular(path) as handle:
            return handle.read()
    except OSError as exc:
        raise WorkflowInvalid([Issue("unreadable_file", f"cannot read workflow file {short_repr(str(path), 200)}"
                                     f": {exc.strerror or exc}")]) from None


def load_workflow(path: str | Path, strict: bool = True, raw: bytes | None = None) -> Workflow:
    """Load a workflow file, or the workflow embedded in a PNG that SaveImage wrote (or in ComfyUI's PNG or WebP). ``strict=False`` keeps
    structural problems in ``workflow.problems`` instead of raising them; ``raw`` is the file's bytes if
    they were read already."""
    path = Path(path)
    raw = read_workflow_file(path) if raw is None else raw
    text = _workflow_text(raw, path)
    return loads_workflow(text, base_dir=path.resolve().parent, source=str(path), strict=strict)


def load_comfy_document(path: str | Path) -> Any:
    """The parsed JSON of a workflow file, or of the workflow text in a PNG (ours or ComfyUI's) or ComfyUI's WebP."""
    path = Path(path)
    text = _workflow_text(read_workflow_file(path), path)
    data, found = parse_json(text, str(path))
    if found:
        raise WorkflowInvalid(found)
    return data


def loads_workflow(text: str, base_dir: Path | None = None, source: str = "<string>", strict: bool = True) -> Workflow:
    data, found = parse_json(text, source)
    workflow = read_workflow(data, base_dir, found)
    if strict and workflow.problems:
        raise WorkflowInvalid(workflow.problems)
    return workflow


def _workflow_text(raw: bytes, path: Path) -> str:
    """The workflow text of a file: a JSON file's own, or the one a PNG or a ComfyUI WebP carries."""
    if raw.startswith(b"\x89PNG"):
        return _png_workflow_text(raw, path)
    from .comfy.images import image_workflow_text

    text = image_workflow_text(raw, path)
    return _utf8_text(raw, path) if text is None else text


def _utf8_text(raw: bytes, path: Path) -> str:
    """A workflow file's text. JSON files are UTF-8 (a leading byte order mark is allowed); other bytes are
    refused where they are, never replaced: a name or prompt would silently change."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if exc.start == 0 and raw[:2] not in (b"\xff\xfe", b"\xfe\xff"):  # not text at all
            raise WorkflowInvalid([Issue("bad_json", f"{path} is not a workflow: a workflow is a JSON file, or a PNG "
                                         "saved by SaveImage, SaveMask, PreviewImage or ComfyUI, or ComfyUI's "
                                         "WebP")]) from None
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        utf16 = "the file is UTF-16; " if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise WorkflowInvalid([Issue("bad_json", f"{path}: line {line}, column {column}: byte 0x{raw[exc.start]:02x} "
                                     f"is not UTF-8 text; {utf16}save it as UTF-8")]) from None


def _png_workflow_text(raw: bytes, path: Path) -> str:
    import io

    from PIL import PngImagePlugin

    try:
        # the PNG reader itself rather than Image.open: only the text chunks are read, so Pillow's
        # decompression-bomb guard on the pixel count (which refuses ComfyUI's 16384 x 16384) does not apply
        with PngImagePlugin.PngImageFile(io.BytesIO(raw)) as image:
            # ours, else ComfyUI's: its API-format prompt, else its editor-format workflow
            text = next((image.info[key] for key in (PNG_WORKFLOW_KEY, "prompt", "workflow")
                         if isinstance(image.info.get(key), str) and image.info[key]), None)
    except Exception as exc:  # PIL raises many kinds for broken files
        raise WorkflowInvalid([Issue("unreadable_file", f"cannot read PNG '{path}': {exc}")]) from None
    if not text:
        raise WorkflowInvalid(
            [Issue("no_workflow", f"'{path}' has no embedded workflow ('{PNG_WORKFLOW_KEY}' text chunk, or "
                   "ComfyUI's 'prompt' / 'workflow'); only images saved by SaveImage, SaveMask or PreviewImage "
                   "(or ComfyUI) carry one")]
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
