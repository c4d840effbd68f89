"""JSON Schema of workflow files, with every registered node type spelled out,
so an editor can complete and check node types, input and param names and values."""
from __future__ import annotations

from .groups import GROUP_PREFIX
from .registry import Registry
from .workflow import FORMAT, LINK_PATTERN, NODE_ID_PATTERN


def workflow_schema(registry: Registry) -> dict:
    defs: dict = {"link": {"type": "string", "pattern": LINK_PATTERN, "description": "'<node id>.<output name>'"}}
    branches = []
    for definition in registry.sorted_types():
        name = definition.type_name
        inputs, params = {}, {}
        for spec in definition.inputs.values():
            if spec.path is None:  # a file param must be literal: its content goes into the cache key
                inputs[spec.name] = {"$ref": "#/$defs/link", "description": f"{spec.type_name}"
                                     + (f": {spec.description}" if spec.description else "")}
            if not spec.is_socket:
                schema = spec.adapter.json_schema(ref_template=f"#/$defs/{name}__{{model}}")
                for key, sub in schema.pop("$defs", {}).items():
                    defs[f"{name}__{key}"] = sub
                if spec.randomizable:
                    schema = {"anyOf": [schema, {"const": "random", "description": "a new value each run"}]}
                if not spec.required:
                    schema["default"] = spec.json_schema().get("default")
                params[spec.name] = schema
        required_inputs = [s.name for s in definition.inputs.values() if s.required and s.is_socket]
        then: dict = {
            "description": definition.description,
            "properties": {
                "inputs": {"type": "object", "properties": inputs, "additionalProperties": False},
                "params": {"type": "object", "properties": params, "additionalProperties": False},
            },
        }
        if required_inputs:
            then["required"] = ["inputs"]
            then["properties"]["inputs"]["required"] = required_inputs
        # a required param is given in params, or linked
        required_params = [p.name for p in definition.inputs.values() if p.required and not p.is_socket]
        if required_params:
            then["allOf"] = [{"anyOf": [
                {"required": ["params"], "properties": {"params": {"required": [name]}}},
                *([{"required": ["inputs"], "properties": {"inputs": {"required": [name]}}}]
                  if name in inputs else []),
            ]} for name in required_params]
        defs[f"node_{name}"] = then
        branches.append({"if": {"properties": {"type": {"const": name}}, "required": ["type"]},
                         "then": {"$ref": f"#/$defs/node_{name}"}})
    defs["node"] = {
        "type": "object",
        "required": ["type"],
        "additionalProperties": False,
        "properties": {
            "type": {"anyOf": [
                {"enum": [d.type_name for d in registry.sorted_types()], "description": "node type"},
                {"type": "string", "pattern": f"^{GROUP_PREFIX}[A-Za-z0-9_-]+$",
                 "description": "an instance of a group of this workflow; params may include 'repeat'"},
            ]},
            "title": {"type": "string"},
            "inputs": {"type": "object", "additionalProperties": {"$ref": "#/$defs/link"}},
            "params": {"type": "object"},
        },
        "allOf": branches,
    }
    defs["group"] = {
        "type": "object",
        "description": "A reusable group of nodes; inside it, 'in.<input>' links to its inputs and "
                       "'in.iteration' is the repetition number, from 1.",
        "required": ["nodes"],
        "additionalProperties": False,
        "properties": {
            "description": {"type": "string"},
            "inputs": {"type": "object", "additionalProperties": {"type": "string"},
                       "description": "input name -> type (IMAGE, MASK, INT, ...)"},
            "outputs": {"type": "object", "additionalProperties": {"$ref": "#/$defs/link"},
                        "description": "output name -> '<inner node id>.<output>'"},
            "feedback": {"type": "object", "additionalProperties": {"type": "string"},
                         "description": "output name -> the input it feeds in the next repetition"},
            "nodes": {"type": "object", "propertyNames": {"pattern": NODE_ID_PATTERN},
                      "additionalProperties": {"$ref": "#/$defs/node"}},
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "nodegraph workflow",
        "type": "object",
        "required": ["format", "nodes"],
        "additionalProperties": False,
        "properties": {
            "$schema": {"type": "string", "description": "where an editor finds this schema; ignored"},
            "format": {"const": FORMAT},
            "description": {"type": "string"},
            "groups": {
                "type": "object",
                "propertyNames": {"pattern": NODE_ID_PATTERN},
                "additionalProperties": {"$ref": "#/$defs/group"},
            },
            "nodes": {
                "type": "object",
                "propertyNames": {"pattern": NODE_ID_PATTERN},
                "additionalProperties": {"$ref": "#/$defs/node"},
            },
        },
        "$defs": defs,
    }
