"""The importer's mechanism: a ComfyUI API-format prompt in, a nodegraph workflow out.

A ComfyUI prompt maps node ids to ``{"class_type", "inputs", "_meta": {"title"}}``; an input is a literal or a
link ``[source id, output slot]``. Each ComfyUI type has one converter (``@converts``) that writes one or more
nodegraph nodes for it through a ``Builder`` and says which nodegraph output each of its ComfyUI output slots
is. The nodes keep their ComfyUI ids (helper nodes get ``<id>_<suffix>``) and titles. Every problem (a type with
no converter, a missing input, a value nodegraph cannot reproduce) is collected with the ComfyUI id and
class_type, and all are raised together as one ``WorkflowInvalid``.

``detect_format`` tells nodegraph workflows, API prompts and editor files apart; ``to_nodegraph`` imports either
ComfyUI format (the editor's through ``editor.editor_to_api``). The workflow reader calls it, so every place that
takes a workflow takes a ComfyUI one.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from nodegraph.errors import Issue, WorkflowInvalid
from nodegraph.workflow import FORMAT

NODEGRAPH, COMFY_API, COMFY_EDITOR = "nodegraph", "comfy-api", "comfy-editor"
CONVERTER_MODULES = ("nodegraph.comfy.models", "nodegraph.comfy.pixels")
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_-]")

Converter = Callable[["ComfyNode", "Builder"], list]
CONVERTERS: dict[str, Converter] = {}


@dataclass(frozen=True)
class ComfyType:
    """What ComfyUI's ``INPUT_TYPES`` / ``RETURN_TYPES`` say of one class_type: for ``/object_info`` and for the
    order of an editor-format node's ``widgets_values``.

    ``required`` / ``optional``: input name -> ComfyUI's spec tuple, e.g. ``("INT", {"default": 20, "min": 1})``,
    ``("MASK",)`` or ``(["nearest-exact", "bilinear"],)`` for a list of choices, in ComfyUI's order.
    ``files``: input name -> the folder its choices are the file names of (a models folder such as
    "checkpoints", or "input"), filled in by whoever knows the folders (the server)."""

    required: dict
    optional: dict = field(default_factory=dict)
    outputs: tuple = ()
    output_names: tuple = ()
    category: str = ""
    output_node: bool = False
    files: dict = field(default_factory=dict)


SPECS: dict[str, ComfyType] = {}


def converts(*class_types: str, spec: ComfyType):
    """Register the decorated function as the converter of these ComfyUI class_types, with ComfyUI's spec."""
    def register(fn: Converter) -> Converter:
        for class_type in class_types:
            CONVERTERS[class_type] = fn
            SPECS[class_type] = spec
        return fn
    return register


def _with_files(inputs: dict, files: dict, names: Callable[[str], list]) -> dict:
    return {k: (names(files[k]), *v[1:]) if k in files else v for k, v in inputs.items()}


def object_info(names: Callable[[str], list] | None = None) -> dict:
    """ComfyUI's ``/object_info`` entries for every class_type the importer converts. ``names(folder)``: the file
    names a file input offers (a models folder's models, or "input": the input folder's files); without it
    those lists are empty."""
    converters()
    info = {}
    for name, spec in sorted(SPECS.items()):
        required, optional = spec.required, spec.optional
        if names is not None and spec.files:
            required, optional = _with_files(required, spec.files, names), _with_files(optional, spec.files, names)
        info[name] = {
            "input": {"required": required, **({"optional": optional} if optional else {})},
            "input_order": {"required": list(spec.required), **({"optional": list(spec.optional)} if spec.optional
                                                                  else {})},
            "output": list(spec.outputs), "output_is_list": [False] * len(spec.outputs),
            "output_name": list(spec.output_names or spec.outputs), "name": name, "display_name": name,
            "description": (CONVERTERS[name].__doc__ or "").strip(), "python_module": "nodegraph.comfy",
            "category": spec.category, "output_node": spec.output_node, "deprecated": False,
            "experimental": False}
    return info


def converters() -> dict[str, Converter]:
    for module in CONVERTER_MODULES:
        importlib.import_module(module)
    return CONVERTERS


def is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


@dataclass
class ComfyNode:
    id: str
    class_type: str
    inputs: dict[str, Any]
    title: str | None = None


def _is_api(doc: Any) -> bool:
    # one node with a class_type is enough: a broken node (no class_type, or not an object) is then reported as
    # that node's problem rather than the whole prompt being taken for a nodegraph workflow
    return isinstance(doc, dict) and any(isinstance(v, dict) and "class_type" in v for v in doc.values())


def detect_format(doc: Any) -> str:
    """NODEGRAPH for a nodegraph workflow; COMFY_API for a ComfyUI API-format prompt, bare or as the body of
    ComfyUI's POST /prompt (``{"prompt": {...}}``); COMFY_EDITOR for the file ComfyUI's editor saves (a
    ``nodes`` list and ``links``; a nodegraph workflow's ``nodes`` is an object). Anything else is NODEGRAPH,
    so that the workflow reader reports what is wrong with it."""
    if not isinstance(doc, dict) or "format" in doc:
        return NODEGRAPH
    if isinstance(doc.get("nodes"), list) and isinstance(doc.get("links"), list):
        return COMFY_EDITOR
    if "nodes" not in doc and (_is_api(doc) or _is_api(doc.get("prompt"))):
        return COMFY_API
    return NODEGRAPH


def to_nodegraph(doc: Any) -> Any:
    """A nodegraph workflow (dict) for a ComfyUI document of either format; a nodegraph one as it is.

    Raises WorkflowInvalid with every problem (each naming the ComfyUI id and class_type)."""
    kind = detect_format(doc)
    if kind == COMFY_EDITOR:
        from .editor import editor_to_api

        return import_api(editor_to_api(doc), "imported from a ComfyUI editor-format workflow")
    if kind == COMFY_API:
        return import_api(doc["prompt"] if _is_api(doc.get("prompt")) else doc)
    return doc


@dataclass
class Builder:
    """What converters write through: nodegraph nodes, links resolved to nodegraph outputs, problems."""

    prompt: dict[str, ComfyNode]
    nodes: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, list] = field(default_factory=dict)  # ComfyUI id -> nodegraph reference per output slot
    problems: list[Issue] = field(default_factory=list)
    # what a ComfyUI value carries beyond its nodegraph output, per (ComfyUI id, output slot): a LATENT's
    # noise mask, a CLIP's last layer, a MODEL's differential-diffusion patch; the nodes that use it read it
    facts: dict[tuple[str, int], dict] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # nodegraph id -> the ComfyUI id that wrote it

    def problem(self, node: ComfyNode, input_name: str | None, message: str, code: str = "comfy_import") -> None:
        value = node.inputs.get(input_name) if input_name else None
        self.problems.append(Issue(code, message, node_id=node.id, node_type=node.class_type, field=input_name,
                                   kind="input" if input_name else None, value=value,
                                   has_value=input_name in node.inputs and not is_link(value)))

    def tag(self, node: ComfyNode, slot: int, **facts: Any) -> None:
        """Record facts about output ``slot`` of ``node`` (see ``facts``)."""
        self.facts.setdefault((node.id, slot), {}).update(facts)

    def source_facts(self, node: ComfyNode, name: str) -> dict:
        """The facts recorded for the output that input ``name`` links to ({} for a value or no facts)."""
        value = node.inputs.get(name)
        return dict(self.facts.get((str(value[0]), value[1]), {})) if is_link(value) else {}

    def node_id(self, node: ComfyNode, suffix: str | None = None) -> str:
        base = _UNSAFE_ID.sub("_", node.id)
        return base if suffix is None else f"{base}_{suffix}"

    def add(self, node: ComfyNode, type_name: str, *, suffix: str | None = None, inputs: dict | None = None,
            params: dict | None = None, title: str | None = None) -> str:
        """Write a nodegraph node for ``node``; its id is the ComfyUI id (``<id>_<suffix>`` for helper nodes).
        ``inputs`` values that are None (a missing link, already reported) are left out."""
        nid = self.node_id(node, suffix)
        other = self.owners.setdefault(nid, node.id)
        if other != node.id:  # "12:5" and "12_5", say: one would silently replace the other
            self.problem(node, None, f"its nodegraph id '{nid}' is also that of node '{other}' (nodegraph ids use "
                                     "only letters, digits, '_' and '-'); give one of them another id")
            return nid
        spec: dict[str, Any] = {"type": type_name}
        title = title if title is not None else (node.title if suffix is None else None)
        if title:
            spec["title"] = title
        links = {k: v for k, v in (inputs or {}).items() if v is not None}
        if links:
            spec["inputs"] = links
        if params:
            spec["params"] = dict(params)
        self.nodes[nid] = spec
        return nid

    def link(self, node: ComfyNode, name: str, optional: bool = False) -> str | None:
        """The nodegraph reference ("<id>.<output>") for the ComfyUI input ``name``, which must be a link."""
        value = node.inputs.get(name)
        if value is None:
            if not optional:
                self.problem(node, name, "is missing: link it to another node's output")
            return None
        if not is_link(value):
            self.problem(node, name, "must be a link to another node's output, not a value")
            return None
        source, slot = str(value[0]), value[1]
        if source not in self.prompt:
            self.problem(node, name, f"links to node '{source}', which is not in the prompt")
            return None
        refs = self.outputs.get(source)
        if refs is None:  # the source failed to convert: already reported
            return None
        if not 0 <= slot < len(refs) or refs[slot] is None:
            self.problem(node, name, f"links to output {slot} of node '{source}' "
                                     f"({self.prompt[source].class_type}), which has no such output")
            return None
        return refs[slot]

    def value(self, node: ComfyNode, name: str, default: Any = ...) -> Any:
        """The literal value of the ComfyUI input ``name`` (``default`` when it is absent)."""
        value = node.inputs.get(name, default)
        if value is ...:
            self.problem(node, name, "is missing")
            return None
        if value is None and name in node.inputs:  # ComfyUI refuses it; a default would run something else
            self.problem(node, name, "is null; give a value")
            return None
        if is_link(value):
            self.problem(node, name, "is linked; this importer takes a value here")
            return None
        return value

    def either(self, node: ComfyNode, name: str, inputs: dict, params: dict, to: str | None = None,
               default: Any = ..., convert: Callable[[Any], Any] | None = None) -> None:
        """Put the ComfyUI input ``name`` into nodegraph ``inputs`` (a link) or ``params`` (a value, after
        ``convert``) under the name ``to``; nodegraph takes any param either way."""
        to = to or name
        raw = node.inputs.get(name, default)
        if is_link(raw):
            inputs[to] = self.link(node, name)
            return
        value = self.value(node, name, default)
        if value is None:
            return
        params[to] = convert(value) if convert else value


def _nodes(prompt: dict, problems: list[Issue]) -> dict[str, ComfyNode]:
    found = {}
    for cid, raw in prompt.items():
        cid = str(cid)
        if not isinstance(raw, dict) or not isinstance(raw.get("class_type"), str):
            problems.append(Issue("comfy_import", "is not a ComfyUI node (it needs class_type and inputs)",
                                  node_id=cid))
            continue
        inputs = raw.get("inputs", {})
        if not isinstance(inputs, dict):
            problems.append(Issue("comfy_import", "inputs must be an object", node_id=cid,
                                  node_type=raw["class_type"]))
            continue
        meta = raw.get("_meta")
        title = meta.get("title") if isinstance(meta, dict) and isinstance(meta.get("title"), str) else None
        found[cid] = ComfyNode(cid, raw["class_type"], inputs, title if title != raw["class_type"] else None)
    return found


def _order(nodes: dict[str, ComfyNode], problems: list[Issue]) -> list[ComfyNode]:
    """Sources before the nodes that link to them; a cycle is reported and its nodes left out. Walked with an
    explicit stack: a generated workflow's chain may be deeper than Python's recursion limit."""
    order, state = [], {}

    def sources(cid: str):
        return iter([str(value[0]) for value in nodes[cid].inputs.values() if is_link(value)])

    for root in nodes:
        if state.get(root):
            continue
        state[root], path, stack = "open", [root], [sources(root)]
        while stack:
            cid = next(stack[-1], None)
            if cid is None:  # every source of path[-1] is placed
                stack.pop()
                state[path[-1]] = "done"
                order.append(nodes[path.pop()])
            elif cid in nodes and state.get(cid) == "open":
                problems.append(Issue("comfy_import", f"is in a cycle of links ({' -> '.join(path + [cid])})",
                                      node_id=cid, node_type=nodes[cid].class_type))
            elif cid in nodes and state.get(cid) is None:
                state[cid] = "open"
                path.append(cid)
                stack.append(sources(cid))
    return order


def import_api(prompt: dict, description: str | None = None) -> dict:
    """A nodegraph workflow (a dict, format nodegraph/1) for a ComfyUI API-format prompt.

    Raises WorkflowInvalid with every problem found (each naming the ComfyUI id and class_type)."""
    problems: list[Issue] = []
    nodes = _nodes(prompt, problems)
    table = converters()
    unknown = [n for n in nodes.values() if n.class_type not in table]
    for n in unknown:
        problems.append(Issue("comfy_unknown_type", f"ComfyUI node type '{n.class_type}' has no nodegraph "
                                                    f"counterpart (a custom node?)", node_id=n.id,
                              node_type=n.class_type))
    builder = Builder(nodes)
    for n in _order(nodes, problems):
        if n.class_type not in table:
            continue
        before = len(builder.problems)
        refs = table[n.class_type](n, builder)
        builder.outputs[n.id] = None if len(builder.problems) > before and refs is None else list(refs or [])
    problems += builder.problems
    if problems:
        raise WorkflowInvalid(problems)
    # in the prompt's order, each helper node just before its ComfyUI node
    place = {builder.node_id(n): i for i, n in enumerate(nodes.values())}
    ordered = sorted(builder.nodes, key=lambda nid: (place.get(nid, place.get(nid.rsplit("_", 1)[0], len(place))),
                                                     nid in place))
    return {"format": FORMAT, "description": description or "imported from a ComfyUI API-format workflow",
            "nodes": {nid: builder.nodes[nid] for nid in ordered}}
