"""Declaring nodes: a typed function plus the ``@node`` decorator.

    @node("MaskBlur", version=1, category="mask", outputs={"mask": MASK})
    def mask_blur(mask: Mask, radius: Annotated[float, Field(ge=0)] = 4.0) -> torch.Tensor:
        \"\"\"Gaussian-blur a mask.\"\"\"

Parameters annotated with a socket type (``Image``, ``Mask``, ``socket("X")``) are
linked-only inputs; every other parameter is a param: its annotation, default and
``Field`` bounds become a pydantic validator, and it may be literal or linked. A
parameter annotated ``RunContext`` receives the run context. The node returns a
dict keyed by output name, a tuple in the declared order, or the bare value when
it has exactly one output.
"""
from __future__ import annotations

import enum
import inspect
import json
import math
import sys
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterable, Literal, Union

from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from .context import RunContext
from .errors import NodeDefinitionError, short_repr
from .sockets import (ANY, BOOLEAN, FLOAT, INT, STRING, InputPath, Randomizable, Socket, SpaceRule,  # noqa: F401
                      output_problem)

INT64 = (-(2**63), 2**63 - 1)
MAX_PARAM_DEPTH = 32


class InputChanged(NodeDefinitionError):
    """A node changed an input tensor in place: it may be a cached result that other nodes receive too."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


class ParamProblem(ValueError):
    """A param value that passed its type but is still unusable (NaN, out of 64 bits, nested too deeply)."""

# Every NodeDef the decorator has made, by defining module; registries pick them
# up by module name, so a module imported once can fill any number of registries.
DEFINED: dict[str, list["NodeDef"]] = {}

CheckFn = Callable[[dict], Iterable[tuple[str, str]]]


@dataclass
class InputSpec:
    """One declared input of a node: a socket (link only) or a param."""

    name: str
    type_name: str
    is_socket: bool
    required: bool
    default: Any = None
    annotation: Any = None
    description: str | None = None
    adapter: TypeAdapter | None = None  # params only
    path: InputPath | None = None  # params that name a file or folder
    allow_nonfinite: bool = False  # Field(allow_inf_nan=True): NaN and infinities accepted
    randomizable: bool = False  # accepts "random", resolved once per run

    @property
    def kind(self) -> str:
        return "input" if self.is_socket else "param"

    def validate(self, value: Any) -> Any:
        """Validate a param value strictly ("3" is not the int 3) with JSON's rules ("left" names an enum value).

        Raises pydantic's ValidationError, or ParamProblem for a value no node can use: NaN or an infinity
        (unless the param allows them), an integer beyond 64 bits, a value nested too deeply."""
        if self.randomizable and value == "random":
            return value
        if type(value) is str:
            if self.path is None and not value.isascii():  # a path's own check names it as a path (bad_file)
                problem = text_problem(value)
                if problem:
                    raise ParamProblem(problem)
        elif type(value) is not bool:  # before the bounds, which NaN would fail with a puzzling message
            problem = number_problem(value, self.allow_nonfinite)
            if problem:
                raise ParamProblem(problem)
        try:
            valid = self.adapter.validate_python(value, strict=True)  # the fast path for plain values
        except ValidationError:
            try:
                text = json.dumps(value, allow_nan=True)
            except RecursionError:
                raise ParamProblem(f"is nested more than {MAX_PARAM_DEPTH} levels deep") from None
            valid = self.adapter.validate_json(text, strict=True)
        return valid

    def json_schema(self) -> dict:
        schema = self.adapter.json_schema() if self.adapter is not None else {}
        if not self.required:
            schema = {**schema, "default": _jsonable(self.default)}
        return schema


@dataclass
class NodeDef:
    """Everything the engine knows about a node type."""

    type_name: str
    version: int
    category: str
    description: str
    doc: str
    fn: Callable[..., Any]
    inputs: dict[str, InputSpec]
    outputs: dict[str, str]
    cacheable: bool = True
    output: bool = False
    check: CheckFn | None = None
    ctx_arg: str | None = None
    origin: str = "builtin"
    reference: str | None = None
    space: "SpaceRule | None" = None  # which of its sockets share one latent space (followed at validation)
    code: str = ""  # fingerprint of the code that computes its results (keys.code_fingerprint)

    def call(self, kwargs: dict[str, Any], ctx: RunContext | None) -> dict[str, Any]:
        """Run the node function, name its results and check them against the declared outputs."""
        versions = _input_versions(kwargs, self.inputs)
        if self.ctx_arg:
            kwargs = {**kwargs, self.ctx_arg: ctx}
        try:
            result = self.fn(**kwargs)
        except Exception:  # a node that changed an input and then failed still changed it
            _check_unchanged(versions)
            raise
        _check_unchanged(versions)
        outputs = self.name_outputs(result)
        for name, type_name in self.outputs.items():
            problem = output_problem(type_name, outputs[name])
            if problem:
                raise NodeDefinitionError(f"returned output '{name}' as {problem}; the node declares it {type_name}")
        return outputs

    def name_outputs(self, result: Any) -> dict[str, Any]:
        names = list(self.outputs)
        if isinstance(result, dict) and set(result) == set(names) and (len(names) != 1 or _is_output_dict(result, names)):
            return dict(result)
        if len(names) == 1:
            return {names[0]: result}
        if not names:
            return {}
        if isinstance(result, (tuple, list)) and len(result) == len(names):
            return dict(zip(names, result))
        got = (f"a dict with keys {sorted(map(str, result))}" if isinstance(result, dict)
               else f"{len(result)} values" if isinstance(result, (tuple, list)) else f"a {type(result).__name__}")
        raise NodeDefinitionError(f"returned {got}; it declares the outputs {names}: return a dict with those keys "
                                  f"or a tuple of {len(names)} values")

    def to_dict(self) -> dict:
        """The public description used by `nodegraph nodes --json` and the docs."""
        return {
            "type": self.type_name,
            "version": self.version,
            "category": self.category,
            "description": self.description,
            "output_node": self.output,
            "cacheable": self.cacheable,
            "origin": self.origin,
            "reference": self.reference,
            "inputs": {
                s.name: {"type": s.type_name, "required": s.required, "description": s.description}
                for s in self.inputs.values() if s.is_socket
            },
            "params": {
                s.name: {
                    "type": s.type_name,
                    "required": s.required,
                    **({"default": _jsonable(s.default)} if not s.required else {}),
                    "description": s.description,
                    "schema": s.adapter.json_schema(),
                    **({"models_folder": s.path.folder} if s.path is not None and s.path.folder else {}),
                }
                for s in self.inputs.values() if not s.is_socket
            },
            "outputs": dict(self.outputs),
        }


def _input_versions(kwargs: dict[str, Any], inputs: dict[str, InputSpec]) -> list[tuple[str, Any, int]]:
    """Each input tensor (a latent's samples too) with its version counter, which any in-place change raises."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    found = []
    for name, value in kwargs.items():
        spec = inputs.get(name)
        latent = spec is not None and spec.type_name == "LATENT"
        tensor = getattr(value, "samples", None) if latent else value
        if isinstance(tensor, torch.Tensor) and not tensor.is_inference():  # inference tensors keep no count
            found.append((name, tensor, tensor._version))
    return found


def _check_unchanged(versions: list[tuple[str, Any, int]]) -> None:
    changed = [name for name, tensor, version in versions if tensor._version != version]
    if changed:
        names = ", ".join(f"'{n}'" for n in changed)
        raise InputChanged(f"changed its input {names} in place; an input may be a cached result that other nodes "
                           f"receive too: work on a copy (e.g. {changed[0]}.clone())", changed)


def number_problem(value: Any, allow_nonfinite: bool = False) -> str | None:
    """Why a validated value cannot be used: a non-finite float, an integer beyond 64 bits, deep nesting, text
    with a lone surrogate."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is str:
            if not item.isascii() and (problem := text_problem(item)):
                return problem
        elif kind is float:
            if not allow_nonfinite and not math.isfinite(item):
                return "must be a finite number (not NaN or infinity)"
        elif kind is int:
            if not INT64[0] <= item <= INT64[1]:
                return f"{short_repr(item)} does not fit in 64 bits; give a number from -2**63 to 2**63 - 1"
        elif kind in (list, tuple, dict):
            if depth >= MAX_PARAM_DEPTH:
                return f"is nested more than {MAX_PARAM_DEPTH} levels deep"
            stack.extend((v, depth + 1) for v in (item.values() if kind is dict else item))
    return None


def text_problem(text: str) -> str | None:
    """A lone surrogate ("\\ud800", which JSON and Python allow in a string) is no character: no file name, prompt
    or JSON reader can take it, and pydantic's own message about it blames the JSON."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"holds a lone surrogate ({text[exc.start]!r}) at character {exc.start}, which is not a character; "
                "write the text as valid Unicode")
    return None


def _is_output_dict(result: dict, names: list[str]) -> bool:
    # A single-output node whose value is itself a dict keyed by that name is ambiguous;
    # treat it as already named only when the key maps to a non-dict.
    return not isinstance(result[names[0]], dict)


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def node(
    type_name: str,
    *,
    version: int = 1,
    category: str = "misc",
    outputs: dict[str, str] | None = None,
    cacheable: bool = True,
    output: bool = False,
    check: CheckFn | None = None,
    reference: str | None = None,
    space: "SpaceRule | None" = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a function as node type ``type_name`` (CamelCase, stable forever).

    ``outputs`` maps output names to socket/scalar type names, in order.
    ``cacheable=False`` makes it rerun every time (and everything after it).
    ``output=True`` marks an output node (SaveImage and the like): running a
    workflow runs its output nodes and what they need.
    ``check(params)`` may yield ``(field, message)`` for cross-field problems; it
    gets every param known before the run (literals and defaults): a param fed by a
    link is absent, so a check that needs it must skip.
    ``reference`` names the independent implementation the node matches.
    ``space`` (a ``SpaceRule``) names the sockets that share one latent space, so that validation can
    report a latent linked into a model of another space before anything runs.
    """
    if not type_name[:1].isupper() or not type_name.replace("_", "").isalnum():
        raise NodeDefinitionError(f"node type names are CamelCase identifiers, got {type_name!r}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        definition = build_node_def(fn, type_name, version, category, outputs or {}, cacheable, output, check, reference,
                                    space)
        DEFINED.setdefault(fn.__module__, []).append(definition)
        fn.node_def = definition  # type: ignore[attr-defined]
        return fn

    return decorate


def build_node_def(fn, type_name, version, category, outputs, cacheable, output, check, reference,
                   space=None) -> NodeDef:
    doc = inspect.getdoc(fn) or ""
    description = doc.strip().splitlines()[0] if doc.strip() else ""
    if not description:
        raise NodeDefinitionError(f"node type {type_name}: the function needs a docstring (its first line is the description)")
    if inspect.iscoroutinefunction(fn) or inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        # its call would hand on an un-run coroutine or generator as the output, and cache it
        kind = "an async" if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn) else "a generator"
        raise NodeDefinitionError(f"node type {type_name}: the function is {kind} function; a node must be a plain "
                                  "function that returns its outputs")
    hints = _param_hints(fn)
    signature = inspect.signature(fn)
    inputs: dict[str, InputSpec] = {}
    ctx_arg = None
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise NodeDefinitionError(f"node type {type_name}: *args/**kwargs are not allowed ({name})")
        annotation = hints.get(name, Any)
        if annotation is RunContext:
            ctx_arg = name
            continue
        inputs[name] = _input_spec(type_name, name, annotation, parameter.default)
    return NodeDef(
        type_name=type_name,
        version=version,
        category=category,
        description=description,
        doc=doc,
        fn=fn,
        inputs=inputs,
        outputs=dict(outputs),
        cacheable=cacheable,
        output=output,
        check=check,
        ctx_arg=ctx_arg,
        reference=reference,
        space=space,
    )


class _Params:
    """A function's parameter annotations without its return annotation, for typing.get_type_hints: the
    return type is documentation only, and evaluating it could import a heavy library (torch.Tensor)."""

    def __init__(self, fn: Callable[..., Any]):
        self.__annotations__ = {k: v for k, v in getattr(fn, "__annotations__", {}).items() if k != "return"}
        self.__globals__ = getattr(fn, "__globals__", {})


def _param_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    return typing.get_type_hints(_Params(inspect.unwrap(fn)), include_extras=True)


def _input_spec(type_name: str, name: str, annotation: Any, default: Any) -> InputSpec:
    has_default = default is not inspect.Parameter.empty
    base, optional = _strip_optional(annotation)
    socket_marker, description, path = _markers(base)
    if socket_marker is not None:
        if has_default and default is not None:
            raise NodeDefinitionError(f"node type {type_name}: socket input '{name}' may only default to None")
        return InputSpec(
            name=name,
            type_name=socket_marker.type_name,
            is_socket=True,
            required=not has_default,
            default=None,
            annotation=annotation,
            description=description,
        )
    try:
        adapter = TypeAdapter(annotation)
    except Exception as exc:  # pydantic raises several types for unsupported annotations
        # pydantic's first sentence names the type; the rest advises on model_config, which a node does not have
        reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise NodeDefinitionError(f"node type {type_name}: param '{name}' has an unsupported type: {reason} "
                                  "(a param is a JSON value; a link-only value of a type of your own is an input "
                                  "annotated socket(NAME, cls))") from exc
    metadata = _all_metadata(annotation)
    spec = InputSpec(
        name=name,
        type_name=_scalar_type_name(base),
        is_socket=False,
        required=not has_default,
        default=default if has_default else None,
        annotation=annotation,
        description=description,
        adapter=adapter,
        path=path,
        allow_nonfinite=any(getattr(m, "allow_inf_nan", None) is True for m in metadata),
        randomizable=any(isinstance(m, Randomizable) for m in metadata),
    )
    # A workflow that leaves the param out gets the default unchecked, so check it once here (None, the common
    # "not given" of `x: int = None`, the node handles itself).
    if has_default and default is not None:
        try:
            spec.validate(default)
        except (ValidationError, ValueError, TypeError) as exc:  # TypeError: a default JSON cannot write
            reason = "; ".join(e["msg"] for e in exc.errors()) if isinstance(exc, ValidationError) else str(exc)
            raise NodeDefinitionError(f"node type {type_name}: param '{name}' has the default {short_repr(default)}, "
                                      f"which its own type rejects: {reason}") from None
    return spec


def _all_metadata(annotation: Any) -> list:
    """Every Annotated marker and Field constraint in an annotation, through Optional and nesting."""
    found, stack = [], [annotation]
    while stack:
        current = stack.pop()
        if typing.get_origin(current) is Annotated:
            for meta in current.__metadata__:
                found.append(meta)
                found.extend(getattr(meta, "metadata", ()) if isinstance(meta, FieldInfo) else ())
            stack.append(typing.get_args(current)[0])
        elif typing.get_origin(current) in (Union, types.UnionType):
            stack.extend(typing.get_args(current))
    return found


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(annotation)):
            return args[0], True
    return annotation, False


def _markers(annotation: Any) -> tuple[Socket | None, str | None, InputPath | None]:
    socket_marker = description = path = None
    if typing.get_origin(annotation) is Annotated:
        for meta in annotation.__metadata__:
            if isinstance(meta, Socket):
                socket_marker = meta
            elif isinstance(meta, InputPath):
                path = meta
            elif isinstance(meta, FieldInfo) and meta.description:
                description = meta.description
    return socket_marker, description, path


def _scalar_type_name(annotation: Any) -> str:
    base = annotation
    while typing.get_origin(base) is Annotated:
        base = typing.get_args(base)[0]
    if base is bool:
        return BOOLEAN
    if base is int:
        return INT
    if base is float:
        return FLOAT
    if base is str:
        return STRING
    if typing.get_origin(base) is Literal:
        values = typing.get_args(base)
        if all(isinstance(v, str) for v in values):
            return STRING
        if all(isinstance(v, bool) for v in values):
            return BOOLEAN
        if all(isinstance(v, int) for v in values):
            return INT
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return STRING if all(isinstance(m.value, str) for m in base) else ANY
    if typing.get_origin(base) in (list, tuple):
        return "LIST"
    return ANY
