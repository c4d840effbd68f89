"""A submitted prompt: ComfyUI API format or a nodegraph workflow, validated in full before it is queued,
with every problem reported in ComfyUI's ``node_errors`` shape."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..batch.runner import _models as model_files
from ..errors import Issue, NodegraphError, WorkflowInvalid
from ..workflow import read_workflow

# nodegraph's issue codes -> ComfyUI's error types, where ComfyUI has one for the same mistake
COMFY_TYPES = {
    "missing_input": "required_input_missing",
    "missing_model": "value_not_in_list",
    "missing_file": "value_not_in_list",
    "invalid_param": "value_not_valid",
    "type_mismatch": "return_type_mismatch",
    "unknown_type": "invalid_prompt",
    "comfy_unknown_type": "invalid_prompt",
    "no_output": "prompt_no_outputs",
}


@dataclass
class Prompt:
    """A validated prompt, ready to queue: ComfyUI's queue item is (number, prompt_id, prompt, extra_data,
    outputs_to_execute)."""

    number: float
    prompt_id: str
    prompt: dict  # as submitted
    extra_data: dict
    workflow: Any  # the nodegraph Workflow that runs
    targets: list[str] | None
    outputs: list[str]  # ids of the output nodes as the client knows them
    comfy: bool  # submitted in ComfyUI's API format
    class_types: dict[str, str] = field(default_factory=dict)  # client's node id -> its type
    models: tuple[str, ...] = ()  # the model files it loads (a Ray actor holding them takes it first)

    def item(self) -> list:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]

    def client_id(self, node_id: str | None) -> str | None:
        """The node id the client knows for a nodegraph node id (an importer's helper node '<id>_<x>' is
        reported as its ComfyUI node)."""
        if node_id is None or not self.comfy or node_id in self.prompt:
            return node_id
        base = node_id.rsplit("_", 1)[0]
        return base if base in self.prompt else node_id


class PromptRejected(Exception):
    """A prompt that cannot be queued; ``body`` is ComfyUI's 400 answer."""

    def __init__(self, body: dict):
        super().__init__(body["error"]["message"])
        self.body = body


def error_body(kind: str, message: str, details: str = "", node_errors: dict | None = None) -> dict:
    return {"error": {"type": kind, "message": message, "details": details, "extra_info": {}},
            "node_errors": node_errors or {}}


def prepare(engine, doc: Any, number: float, prompt_id: str, extra_data: dict, input_dir: Path,
            targets: list | None = None) -> Prompt:
    """Convert and validate (Engine.compile) a submitted prompt; raises PromptRejected with every problem."""
    from ..comfy import COMFY_API, detect_format, import_api

    if not isinstance(doc, dict) or not doc:
        raise PromptRejected(error_body("invalid_prompt", "the prompt must be a JSON object: a ComfyUI API-format "
                                        "workflow or a nodegraph workflow"))
    comfy = detect_format(doc) == COMFY_API
    count = len(doc) if comfy else len(doc.get("nodes") or ()) if isinstance(doc.get("nodes"), (dict, list)) else 0
    limit = engine.limits.max_nodes
    if count > limit:  # before converting them all (groups are counted again once expanded)
        raise PromptRejected(error_body("too_many_nodes", f"the prompt has {count:,} nodes, more than this server's "
                                        f"limit of {limit:,}", "raise the limit with --max-nodes"))
    class_types = ({str(k): v.get("class_type") for k, v in doc.items() if isinstance(v, dict)} if comfy
                   else {str(k): v.get("type") for k, v in (doc.get("nodes") or {}).items() if isinstance(v, dict)}
                   if isinstance(doc.get("nodes"), dict) else {})
    targets = [str(t) for t in targets] if targets else None
    try:
        native = import_api(doc) if comfy else doc
        # relative file params start at the input folder (the confinement keeps them inside it)
        workflow = read_workflow(native, base_dir=input_dir)
        graph = engine.compile(workflow, targets=targets)
    except WorkflowInvalid as exc:
        raise PromptRejected(_invalid(exc.issues, class_types, _readers(doc, comfy),
                                      _output_ids(engine, doc, comfy, class_types))) from None
    except NodegraphError as exc:
        raise PromptRejected(error_body("invalid_prompt", str(exc))) from None
    prompt = Prompt(number, prompt_id, doc, extra_data, workflow, targets, [], comfy, class_types)
    prompt.outputs = list(dict.fromkeys(prompt.client_id(n) for n in graph.outputs))
    prompt.models = model_files(graph)
    return prompt


def _readers(doc: dict, comfy: bool) -> dict[str, set[str]]:
    """Node id -> the ids of the nodes that link to it, in the prompt as submitted."""
    from ..comfy.convert import is_link

    readers: dict[str, set[str]] = {}
    nodes = doc.items() if comfy else (doc.get("nodes") or {}).items() if isinstance(doc.get("nodes"), dict) else ()
    for node_id, spec in nodes:
        values = (spec.get("inputs") or {}).values() if isinstance(spec, dict) and isinstance(spec.get("inputs"),
                                                                                                dict) else ()
        for value in values:
            source = str(value[0]) if comfy and is_link(value) else (
                value.split(".", 1)[0] if not comfy and isinstance(value, str) else None)
            if source is not None:
                readers.setdefault(source, set()).add(str(node_id))
    return readers


def _output_ids(engine, doc: dict, comfy: bool, class_types: dict[str, str]) -> set[str]:
    """The ids of the prompt's output nodes (SaveImage and the like)."""
    from ..comfy.convert import SPECS

    def is_output(kind) -> bool:
        if not isinstance(kind, str):  # a malformed type (a list, say), reported by validation
            return False
        if comfy and kind in SPECS:
            return SPECS[kind].output_node
        definition = engine.registry.types.get(kind)
        return bool(definition is not None and definition.output)

    return {node_id for node_id, kind in class_types.items() if is_output(kind)}


def _dependent_outputs(node_id: str, readers: dict[str, set[str]], outputs: set[str]) -> list[str]:
    """ComfyUI's dependent_outputs: the output nodes that need ``node_id`` (itself, if it is one)."""
    seen, todo = {node_id}, [node_id]
    while todo:
        for reader in readers.get(todo.pop(), ()):
            if reader not in seen:
                seen.add(reader)
                todo.append(reader)
    return sorted(seen & outputs)


def _invalid(issues: list[Issue], class_types: dict[str, str], readers: dict[str, set[str]] | None = None,
             outputs: set[str] | None = None) -> dict:
    """ComfyUI's answer to a prompt that failed validation, every issue in it."""
    node_errors: dict[str, dict] = {}
    general = []
    for issue in issues:
        if issue.node_id is None:
            general.append(issue)
            continue
        node_id = issue.node_id if issue.node_id in class_types else issue.node_id.rsplit("_", 1)[0]
        if node_id not in class_types:
            node_id = issue.node_id
        entry = node_errors.setdefault(node_id, {
            "errors": [], "dependent_outputs": _dependent_outputs(node_id, readers or {}, outputs or set()),
            "class_type": class_types.get(node_id, issue.node_type)})
        entry["errors"].append({
            "type": COMFY_TYPES.get(issue.code, issue.code), "message": issue.message, "details": str(issue),
            "extra_info": {"input_name": issue.field, **({"received_value": issue.value} if issue.has_value else {})}})
    if len(general) == 1 and not node_errors and general[0].code == "no_output":
        return error_body("prompt_no_outputs", "Prompt has no outputs", general[0].message)
    details = "; ".join(str(i) for i in issues)
    return error_body("prompt_outputs_failed_validation", "Prompt outputs failed validation", details, node_errors)
