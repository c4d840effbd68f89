"""ComfyUI's editor format (the ``nodes`` + ``links`` file the UI saves) -> its API format.

The editor keeps a node's values positionally in ``widgets_values``, in the order of the type's widget
inputs (``ComfyType``: INT, FLOAT, STRING, BOOLEAN and choice lists), with one extra value after a seed
(``control_after_generate``) and, for an image upload widget, one after the required widgets (the upload
button, which the editor appends to them: LoadImageMask saves ["m.png", "red", "image"]). Links are
``[id, origin id, origin slot, target id, target slot, type]`` (or objects with those names). As ComfyUI's own export does: muted nodes
(mode 2) are left out, bypassed ones (mode 4) pass their input of the output's type through, Reroute nodes
are followed to their source, and a PrimitiveNode's value is already in its targets' widgets_values.
"""
from __future__ import annotations

from typing import Any

from nodegraph.errors import Issue, WorkflowInvalid

from .convert import SPECS, converters

MUTED, BYPASSED = 2, 4
UI_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
LINK_FIELDS = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def is_editor(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("nodes"), list) and isinstance(doc.get("links"), list)


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _is_slot(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _links(raw: list, problems: list[Issue]) -> dict[int, dict]:
    links = {}
    for item in raw:
        link = None
        if isinstance(item, list) and len(item) >= 5:
            link = dict(zip(LINK_FIELDS, item))
        elif isinstance(item, dict) and all(k in item for k in LINK_FIELDS[:5]):
            link = item
        if link is None or not (_is_id(link["id"]) and _is_id(link["origin_id"]) and _is_id(link["target_id"])
                                and _is_slot(link["origin_slot"]) and _is_slot(link["target_slot"])):
            problems.append(Issue("comfy_import", f"links: {str(item)[:80]} is not a link "
                                                  "([id, origin, slot, target, slot, type])"))
            continue
        links[link["id"]] = link
    return links


def _fits(a: Any, b: Any) -> bool:
    """Whether slot types ``a`` and ``b`` connect, as litegraph's isValidConnection says: "*", "" or none
    fits anything; otherwise the same name, or a common one of comma-separated lists, case ignored."""
    if a in ("", "*", None, 0) or b in ("", "*", None, 0) or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    return bool(set(a.split(",")) & set(b.split(",")))


def _bypass_input(node: dict, inputs: list[dict], slot: int, kind: Any) -> dict | None:
    """The input a bypassed node passes on for its output ``slot`` to an input of type ``kind``, picked as
    ComfyUI's frontend picks it (ExecutableNodeDTO): the input at the same slot if its type fits, else the
    first of exactly that type, else the first that fits. The pick stands even when it is not linked."""
    outputs = node.get("outputs")
    output = outputs[slot] if isinstance(outputs, list) and slot < len(outputs) else None
    out_type = output.get("type") if isinstance(output, dict) else None
    kind = out_type if kind is None else kind  # a link saved without its type
    if kind in ("*", ""):
        return inputs[slot] if slot < len(inputs) else (inputs[0] if inputs else None)
    fits = [i for i in inputs if _fits(i.get("type"), out_type) and _fits(i.get("type"), kind)]
    if slot < len(inputs) and any(i is inputs[slot] for i in fits):
        return inputs[slot]
    return next((i for i in inputs if i.get("type") == kind), fits[0] if fits else None)


def _is_widget(spec: tuple) -> bool:
    return bool(spec) and (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES)


def _widget_names(spec) -> list[tuple[str, int]]:
    """(input name, extra values after it) for each widget input, in ComfyUI's order."""
    names: list[list] = []
    for inputs in (spec.required, spec.optional):
        upload = 0
        for name, entry in inputs.items():
            if _is_widget(entry):
                options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                names.append([name, int(bool(options.get("control_after_generate")))])
                upload += int(bool(options.get("image_upload")))
        if inputs is spec.required and upload and names:
            names[-1][1] += upload  # the editor adds the upload button as one more required input, after the others
    return [(name, extra) for name, extra in names]


def _nested_graphs(doc: dict) -> dict[str, str]:
    """Node types that are graphs of the file itself, not node classes: a subgraph's type is its id (its
    definition in ``definitions.subgraphs``), a group node's "workflow>name" (in ``extra.groupNodes``)."""
    found = {}
    definitions = doc.get("definitions")
    subgraphs = definitions.get("subgraphs") if isinstance(definitions, dict) else None
    for graph in subgraphs if isinstance(subgraphs, list) else ():
        if isinstance(graph, dict) and isinstance(graph.get("id"), str):
            found[graph["id"]] = f"subgraph '{graph.get('name') or graph['id']}'"
    extra = doc.get("extra")
    groups = extra.get("groupNodes") if isinstance(extra, dict) else None
    for name in groups if isinstance(groups, dict) else ():
        for separator in (">", "/"):  # ComfyUI's current and earlier spelling
            found[f"workflow{separator}{name}"] = f"group node '{name}'"
    return found


def editor_to_api(doc: dict) -> dict:
    """An API-format prompt for an editor-format workflow; structural problems raise WorkflowInvalid."""
    converters()  # the specs say the widget order
    problems: list[Issue] = []
    links = _links(doc["links"], problems)
    nodes = {}  # by the id as text: the editor keeps nodes in an object keyed by id, where 4 and "4" are one key
    for raw in doc["nodes"]:
        if isinstance(raw, dict) and _is_id(raw.get("id")) and isinstance(raw.get("type"), str):
            if str(raw["id"]) in nodes:
                problems.append(Issue("comfy_import", f"nodes: more than one node has id {raw['id']!r} "
                                                      "(give each node its own id)", node_id=str(raw["id"])))
            nodes[str(raw["id"])] = raw
        else:
            problems.append(Issue("comfy_import", f"nodes: {str(raw)[:80]} is not a node (it needs id and type)"))

    def inputs_of(raw: dict) -> list[dict]:
        entries = raw.get("inputs")
        return [i for i in entries if isinstance(i, dict)] if isinstance(entries, list) else []

    def source(link_id: Any) -> list | None:
        """[origin id, slot] after following reroutes and bypassed nodes; None for no source. A loop, not
        recursion: a line of reroutes may be longer than Python's recursion limit."""
        seen = set()
        while True:
            link = links.get(link_id) if _is_id(link_id) else None
            if link is None or link_id in seen:
                return None
            seen.add(link_id)
            origin = nodes.get(str(link["origin_id"]))
            if origin is None or origin.get("mode") == MUTED or origin["type"] == "PrimitiveNode":
                return None
            if origin["type"] != "Reroute" and origin.get("mode") != BYPASSED:
                return [str(origin["id"]), link["origin_slot"]]
            if origin["type"] == "Reroute":
                linked = [i for i in inputs_of(origin) if i.get("link") is not None]
                if not linked:
                    return None
                link_id = linked[0]["link"]
                continue
            passed = _bypass_input(origin, inputs_of(origin), link["origin_slot"], link.get("type"))
            if passed is None or passed.get("link") is None:  # ComfyUI then leaves the input out
                return None
            link_id = passed["link"]

    nested = _nested_graphs(doc)
    prompt = {}
    for nid, raw in nodes.items():
        if raw["type"] in UI_ONLY or raw.get("mode") in (MUTED, BYPASSED):
            continue
        if raw["type"] in nested:
            problems.append(Issue("comfy_import", f"is the {nested[raw['type']]}, which this importer does not "
                                                  "expand; save the workflow with ComfyUI's Export (API), which "
                                                  "flattens it", node_id=str(nid), node_type=raw["type"]))
            continue
        inputs: dict[str, Any] = {}
        spec = SPECS.get(raw["type"])
        values = raw.get("widgets_values")
        if spec is not None and isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k in dict(_widget_names(spec))})
        elif spec is not None and isinstance(values, list):
            position = 0
            for name, extra in _widget_names(spec):
                if position < len(values):
                    inputs[name] = values[position]
                position += 1 + extra
        for slot in inputs_of(raw):
            if slot.get("link") is not None and isinstance(slot.get("name"), str):
                linked = source(slot["link"])
                if linked is not None:
                    inputs[slot.get("name")] = linked
        entry = {"class_type": raw["type"], "inputs": inputs}
        if isinstance(raw.get("title"), str):
            entry["_meta"] = {"title": raw["title"]}
        prompt[str(nid)] = entry
    if problems:
        raise WorkflowInvalid(problems)
    return prompt
