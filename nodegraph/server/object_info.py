"""``/object_info``: every nodegraph node type in ComfyUI's input-spec format, plus the ComfyUI types the
importer converts (their own ComfyUI specs)."""
from __future__ import annotations

from pathlib import Path

from ..definitions import InputSpec, NodeDef

_SCALARS = {"integer": "INT", "number": "FLOAT", "boolean": "BOOLEAN", "string": "STRING"}
_BOUNDS = (("minimum", "min"), ("maximum", "max"), ("exclusiveMinimum", "min"), ("exclusiveMaximum", "max"),
           ("minLength", None), ("maxLength", None))


def _plain_schema(schema: dict) -> dict:
    """The non-null branch of an Optional, or the first concrete branch of a union ("random" | int)."""
    for branch in schema.get("anyOf", ()):
        if branch.get("type") not in (None, "null") or "enum" in branch:
            if branch.get("type") != "string" or "const" not in branch:
                return branch
    return schema


def input_spec(spec: InputSpec, choices: list[str] | None = None) -> list:
    """ComfyUI's ``[TYPE, {options}]`` (or ``[[choices], {options}]``) for one input."""
    if spec.is_socket:
        return [spec.type_name]
    schema = _plain_schema(spec.adapter.json_schema() if spec.adapter is not None else {})
    options: dict = {}
    if not spec.required and spec.default is not None and isinstance(spec.default, (int, float, str, bool)):
        options["default"] = spec.default
    if spec.description:
        options["tooltip"] = spec.description
    if choices is not None:
        return [choices, options]
    if "enum" in schema:
        return [list(schema["enum"]), options]
    kind = _SCALARS.get(schema.get("type"), "STRING" if spec.type_name in ("str", "STRING") else spec.type_name.upper())
    for key, option in _BOUNDS:
        if option and key in schema:
            options[option] = schema[key]
    if kind == "FLOAT" and "step" not in options:
        options["step"] = 0.01
    if kind == "INT" and spec.randomizable:
        options["control_after_generate"] = True
    return [kind, options]


def file_names(folder: str, models, input_dir: Path) -> list[str]:
    """The names a file input may take: the models in a models folder, or ("input") the input folder's files."""
    if folder == "input":
        if not input_dir.is_dir():
            return []
        return sorted(p.relative_to(input_dir).as_posix() for p in input_dir.rglob("*") if p.is_file())
    return sorted({entry.name for entry in models.entries(folder)})


def _path_choices(spec: InputSpec, models, input_dir: Path) -> list[str] | None:
    if spec.path is None:
        return None
    if spec.path.folder:
        return file_names(spec.path.folder, models, input_dir)
    if spec.path.kind == "file":
        return file_names("input", models, input_dir)
    return None


def node_info(definition: NodeDef, models, input_dir: Path) -> dict:
    required, optional = {}, {}
    for name, spec in definition.inputs.items():
        entry = input_spec(spec, _path_choices(spec, models, input_dir))
        (required if spec.required else optional)[name] = entry
    outputs = list(definition.outputs)
    return {
        "input": {"required": required, **({"optional": optional} if optional else {})},
        "input_order": {"required": list(required), **({"optional": list(optional)} if optional else {})},
        "output": [definition.outputs[o] for o in outputs], "output_is_list": [False] * len(outputs),
        "output_name": outputs, "name": definition.type_name, "display_name": definition.type_name,
        "description": definition.description, "python_module": f"nodegraph ({definition.origin})",
        "category": definition.category, "output_node": definition.output, "deprecated": False,
        "experimental": False,
    }


def object_info(registry, models, input_dir: Path) -> dict:
    """nodegraph's node types, then the importer's ComfyUI types (a ComfyUI name wins where both exist, since a
    ComfyUI client sends ComfyUI's inputs for it)."""
    from ..comfy import object_info as comfy_info

    info = {name: node_info(d, models, input_dir) for name, d in sorted(registry.types.items())}
    info.update(comfy_info(lambda folder: file_names(folder, models, input_dir)))
    return info
