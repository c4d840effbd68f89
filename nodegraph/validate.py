"""Validation before anything runs: every problem in a workflow, found at once.

The result of a clean validation is a `Graph`: the node definitions, links and
validated literal params the executor needs, with no further checks to make
(linked scalars are checked when their values arrive).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import Issue, NodegraphError, WorkflowInvalid
from .files import check_path
from .groups import Origin, expand_groups, parse_flat_id
from .keys import canonical_params
from .confine import Confinement
from .limits import Limits, limits_in_force
from .model_folders import ModelRoots, name_parts
from .definitions import InputSpec, NodeDef, ParamProblem
from .registry import Registry
from .sockets import link_fits
from .workflow import NodeSpec, Workflow


_NO_PATHS: dict[str, str] = {}


@dataclass(slots=True)
class GraphNode:
    """A validated node: its definition, links and literal params."""

    node_id: str
    definition: NodeDef
    links: dict[str, tuple[str, str]]  # input name -> (source node id, output name)
    params: dict[str, Any]  # validated literal params (paths already resolved)
    canonical: str  # every literal param, defaults included, as validated values: part of the cache key
    paths: dict[str, str] = field(default_factory=dict)  # param -> resolved path it reads
    randomized: tuple[str, ...] = ()  # params given as "random": drawn once per run
    implied: dict[str, str] = field(default_factory=dict)  # "param+n" -> other files the param makes it read


@dataclass(eq=False)
class Graph:
    """A validated workflow as a DAG, ready to execute (and to execute again: what every run of it
    would compute the same way is kept in ``memo``)."""

    workflow: Workflow
    nodes: dict[str, GraphNode]  # group instances expanded into plain nodes
    origins: dict[str, Origin]  # flattened node id -> the group node it came from
    order: list[str]  # every node, in dependency order
    outputs: list[str]  # node ids of output nodes (or the requested targets)
    memo: dict = field(default_factory=dict, repr=False)


def validate(workflow: Workflow, registry: Registry, targets: list[str] | None = None,
             limits: Limits | None = None, models: ModelRoots | None = None) -> list[Issue]:
    """Every problem in the workflow (empty list: valid)."""
    try:
        build_graph(workflow, registry, targets, limits, models)
    except WorkflowInvalid as exc:
        return exc.issues
    return []


def build_graph(workflow: Workflow, registry: Registry, targets: list[str] | None = None,
                limits: Limits | None = None, models: ModelRoots | None = None,
                confine: Confinement | None = None) -> Graph:
    """Validate and compile; raises WorkflowInvalid with every issue found (those found while reading the
    file included). ``models``: the roots where file params' names are looked up (none: paths only).
    ``confine``: the folders file params must stay in (served mode; nodegraph.confine)."""
    limits = limits or Limits()
    with limits_in_force(limits):
        return _build_graph(workflow, registry, targets, limits, models or ModelRoots(), confine)


def _build_graph(workflow: Workflow, registry: Registry, targets: list[str] | None, limits: Limits,
                 models: ModelRoots, confine: Confinement | None = None) -> Graph:
    flat, origins, broken, issues = expand_groups(workflow, limits.max_nodes)
    issues = [*workflow.problems, *issues]
    broken = broken | workflow.broken
    base_dir = workflow.base_dir or Path.cwd()
    nodes: dict[str, GraphNode] = {}
    for node_id, spec in flat.items():
        definition = registry.get(spec.type)
        if definition is None:
            issues.append(Issue("unknown_type", _unknown_type_message(spec.type, registry), node_id=node_id, field="type"))
            continue
        if spec.type in registry.clashes:
            registered_by = " and ".join(registry.clashes[spec.type])
            issues.append(Issue("ambiguous_type", f"node type '{spec.type}' is registered by {registered_by}; "
                                "uninstall or rename one of them", node_id=node_id, node_type=spec.type, field="type"))
        compiled = _check_node(node_id, spec, definition, flat, broken, registry, base_dir, issues, models, confine)
        nodes[node_id] = compiled

    order = _topological_order(nodes)
    if order is None:
        order = []
        issues.extend(_cycle_issues(nodes, flat))
    issues.extend(_space_issues(nodes, order))
    left_out = bool(workflow.broken) or any(i.code in ("too_many_nodes", "bad_structure") for i in issues)
    outputs = _output_nodes(flat, nodes, targets, issues, left_out, workflow.broken,
                            _instance_outputs(workflow, origins))
    if issues:
        raise WorkflowInvalid(_once_per_group_node(issues) if origins else issues)
    return Graph(workflow=workflow, nodes=nodes, origins=origins, order=order, outputs=outputs)


def _space_issues(nodes: dict[str, GraphNode], order: list[str]) -> list[Issue]:
    """Latents linked across latent spaces (definitions' ``space`` rules, followed along links in order): a
    Kandinsky MoVQ latent into a Stable Diffusion sampler or VAE, or the reverse. Unmarked nodes pass no space
    on, so only links whose spaces are both known are judged."""
    made: dict[tuple[str, str], tuple[str, str]] = {}  # (node id, output) -> (space, the node that set it)
    issues: list[Issue] = []
    for node_id in order:
        node = nodes[node_id]
        rule = node.definition.space
        if rule is None:
            continue
        here = f"'{node_id}' ({node.definition.type_name})"
        found = (rule.fixed, here, "this node") if rule.fixed else None  # (space, set by, which socket)
        for name in rule.sockets:
            link = node.links.get(name)
            if link is None or link not in made:
                continue
            space, setter = made[link]
            if found is None:
                found = (space, setter, f"'{name}'")
            elif space != found[0]:
                issues.append(Issue(
                    "latent_space", f"'{link[0]}.{link[1]}' is in the {space} latent space (from {setter}) but "
                    f"{found[2]} is in the {found[0]} latent space (from {found[1]}): decode to pixels (VAEDecode "
                    "with the latent's own VAE) and re-encode with the other model's VAE",
                    node_id=node_id, node_type=node.definition.type_name, field=name, kind="input"))
        if found is not None:
            for output in node.definition.outputs:
                if output in rule.sockets:
                    made[(node_id, output)] = (found[0], found[1])
    return issues


def _once_per_group_node(issues: list[Issue]) -> list[Issue]:
    """A mistake inside a group repeats in every repetition: report the first only."""
    seen, kept = set(), []
    for issue in issues:
        parsed = parse_flat_id(issue.node_id) if issue.node_id else None
        key = (issue.code, issue.field, parsed[0], parsed[2]) if parsed else id(issue)
        if key not in seen:
            seen.add(key)
            kept.append(issue)
    return kept


def _unknown_type_message(type_name: str, registry: Registry) -> str:
    import difflib

    close = difflib.get_close_matches(type_name, list(registry.types), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run `nodegraph nodes` for the list (a plugin may be missing)"
    return f"unknown node type '{type_name}'{hint}"


def _check_node(node_id, spec, definition: NodeDef, all_nodes: dict[str, NodeSpec], reported: set[str],
                registry: Registry, base_dir: Path, issues: list[Issue], models: ModelRoots,
                confine: Confinement | None = None) -> GraphNode:
    def issue(code: str, message: str, field: str | None = None, kind: str | None = None, **value: Any) -> None:
        issues.append(Issue(code, message, node_id=node_id, node_type=spec.type, field=field, kind=kind,
                            value=value.get("value"), has_value="value" in value))

    links: dict[str, tuple[str, str]] = {}
    for name, target in spec.inputs.items():
        input_spec = definition.inputs.get(name)
        if input_spec is None:
            issue("unknown_input", f"'{definition.type_name}' has no input '{name}'; its inputs are "
                  f"{_names(definition.inputs)}", field=name, kind="input")
            continue
        source_id, dot, output = target.partition(".")
        if not dot or not source_id or not output:
            issue("bad_link", f"link '{target}' must be written '<node id>.<output name>'", field=name, kind="input")
            continue
        source = all_nodes.get(source_id)
        if source_id in reported:
            continue  # an invalid group instance, reported on itself
        if source is None:
            issue("missing_node", f"links to node '{source_id}', which is not in the workflow", field=name, kind="input")
            continue
        if input_spec.path is not None:
            issue("linked_path", "file params must be literal (give the path in params, or with --set): the file's "
                  "content goes into the cache key before anything runs", field=name, kind="param")
            continue
        links[name] = (source_id, output)
        source_def = registry.get(source.type)
        if source_def is None:
            continue  # reported on the source node itself
        output_type = source_def.outputs.get(output)
        if output_type is None:
            outs = ", ".join(source_def.outputs) or "none"
            issue("unknown_output", f"node '{source_id}' ({source.type}) has no output '{output}'; its outputs are: {outs}",
                  field=name, kind="input")
        elif not link_fits(output_type, input_spec.type_name):
            issue("type_mismatch", f"needs {input_spec.type_name} but '{target}' is {output_type}; link an output of "
                  f"type {input_spec.type_name}", field=name, kind="input")

    params: dict[str, Any] = {}
    paths: dict[str, str] = {}
    implied: dict[str, str] = {}
    randomized: list[str] = []
    for name, value in spec.params.items():
        input_spec = definition.inputs.get(name)
        if input_spec is None:
            issue("unknown_param", f"'{definition.type_name}' has no param '{name}'; its params are "
                  f"{_names({k: v for k, v in definition.inputs.items() if not v.is_socket})}", field=name, kind="param")
            continue
        if name in spec.inputs:
            issue("link_and_literal", f"given both as a link ('{spec.inputs[name]}') and a literal; keep one",
                  field=name, kind="param", value=value)
            continue
        if input_spec.is_socket:
            issue("literal_socket", f"{input_spec.type_name} values can only be linked ('<node id>.<output>'), "
                  "not given as a literal", field=name, kind="input", value=value)
            continue
        try:
            params[name] = input_spec.validate(value)
        except ValidationError as exc:
            reason = "; ".join(_pydantic_reason(e) for e in exc.errors())
            issue("invalid_param", reason, field=name, kind="param", value=value)
            continue
        except ParamProblem as exc:
            issue("invalid_param", str(exc), field=name, kind="param", value=value)
            continue
        except (TypeError, ValueError):  # not JSON at all (an object given through the Python API)
            issue("invalid_param", f"a {type(value).__name__} is not a JSON value; give a number, string, "
                  "boolean, list or object", field=name, kind="param", value=value)
            continue
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a plugin's own validator that fails in another way
            issue("check_failed", f"validating it raised {type(exc).__name__}: {exc} (in {definition.origin})",
                  field=name, kind="param", value=value)
            continue
        if input_spec.randomizable and params[name] == "random":
            randomized.append(name)
        if input_spec.path is not None and isinstance(params[name], str):
            resolved, problem = _resolve_path(params[name], input_spec, base_dir, models, confine)
            if problem is not None:
                issue(problem.code, f"{problem.message}; check the path (relative paths start at the workflow "
                      "file's folder)" if problem.code == "missing_file" else problem.message,
                      field=name, kind="param", value=value)
                del params[name]  # reported: the node's own check must not look at a path that resolved nowhere
            else:
                params[name] = paths[name] = resolved
                implied.update(_implied(name, resolved, input_spec))

    canonical = dict(params)
    for name, input_spec in definition.inputs.items():
        if input_spec.required and name not in spec.inputs and name not in spec.params:
            how = "link it" if input_spec.is_socket else "give it in params or link it"
            issue("missing_input", f"required {input_spec.kind} is missing; {how} ({input_spec.type_name})",
                  field=name, kind=input_spec.kind)
        elif not input_spec.is_socket and name not in canonical and name not in spec.inputs:
            canonical[name] = input_spec.default
            if input_spec.randomizable and input_spec.default == "random":
                randomized.append(name)

    if definition.check is not None:
        # Everything known before the run: literals and defaults; a param fed by a link (or drawn at
        # random when the run starts) is absent.
        known = {name: s.default for name, s in definition.inputs.items()
                 if not s.is_socket and not s.required and name not in spec.inputs}
        known.update({k: v for k, v in params.items() if k not in randomized})
        for name in [*randomized, *(n for n in spec.params if n not in params)]:
            known.pop(name, None)  # drawn when the run starts, or already reported as invalid
        try:
            found = list(definition.check(known))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a plugin's check that raises (even sys.exit) is that node's problem
            found = []
            issue("check_failed", f"the node type's validation check ({definition.origin}) raised "
                  f"{type(exc).__name__}: {exc}; this is a bug in that node type, report it to its authors")
        for field_name, message in found:
            kind = definition.inputs[field_name].kind if field_name in definition.inputs else None
            has = field_name in spec.params
            issue("invalid_param", message, field=field_name, kind=kind,
                  **({"value": spec.params[field_name]} if has else {}))
    # most nodes read no file: they share one empty mapping (never written to) rather than two new dicts each
    return GraphNode(node_id, definition, links, params, canonical_params(canonical), paths or _NO_PATHS,
                     tuple(randomized), implied or _NO_PATHS)


def _pydantic_reason(err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    return f"{loc}: {err['msg']}" if loc else err["msg"]


def _names(inputs: dict[str, InputSpec]) -> str:
    return ", ".join(inputs) if inputs else "none"


def _implied(name: str, resolved: str, spec: InputSpec) -> dict[str, str]:
    """The readable files a path param makes its node read besides itself (see InputPath.implies)."""
    if spec.path.implies is None:
        return {}
    try:
        extras = spec.path.implies(resolved)
    except (NodegraphError, OSError, ValueError):  # the node's own check reports what is wrong with the path
        return {}
    return {f"{name}+{i}": extra for i, extra in enumerate(extras) if check_path(extra, "any") is None}


def _resolve_path(value: str, spec: InputSpec, base_dir: Path, models: ModelRoots,
                  confine: Confinement | None = None):
    """(absolute path, None) for a readable file param, or (None, problem); the one place a file param is
    resolved (docs/models.md). In this order:

    1. a path that exists: absolute, or relative to the workflow file's folder. A real path wins over a name
       so that a workflow that names its own files means the same whatever models roots are set up;
    2. with ``spec.path.folder``, a name (relative, no "..") found in that folder of the models roots, the
       first root that has it winning;
    3. with ``must_exist=False``, a value the node fetches itself (a hub id, as ``spec.path.remote`` says)
       comes back as it is;
    4. else a problem: ``missing_model`` for a name, listing the closest names found, ``missing_file`` for
       a path (absolute, or going up with "..").

    With ``confine`` (served mode) absolute paths and ".." are refused, whatever is found must lie inside
    the allowed folders, and hub ids pass only when downloads are allowed."""
    from .files import FileProblem

    if "\0" in value:
        return None, FileProblem("bad_file", "a path cannot contain a NUL character")
    try:
        os.fsencode(value)
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON): no file system can name it
        return None, FileProblem("bad_file", "a path cannot contain a lone surrogate (a \\ud800-\\udfff escape "
                                             "that is not half of a pair); write the file name as it is")
    if confine is not None:
        problem = confine.value_problem(value)
        found = None
        if problem is None:
            found, problem = _resolve_path(value, spec, base_dir, models)
        if problem is None:  # resolved paths are absolute; a value found nowhere comes back as given
            problem = (confine.resolved_problem(found) if Path(found).is_absolute()
                       else confine.remote_problem(value))
        return (None, problem) if problem else (found, None)
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    problem = check_path(path, spec.path.kind)
    if problem is None:
        return str(path.resolve()), None
    if problem.code != "missing_file":
        return None, problem
    folder = spec.path.folder
    if folder is not None:
        found = models.find(folder, value)
        if found is not None:
            problem = check_path(found, spec.path.kind)
            return (str(found.resolve()), None) if problem is None else (None, problem)
    if not spec.path.must_exist and (spec.path.remote is None or spec.path.remote(value)):
        return value, None
    if folder is not None and name_parts(value) is not None:
        return None, FileProblem("missing_model", models.missing(folder, value, path))
    return None, problem


def _topological_order(nodes: dict[str, GraphNode]) -> list[str] | None:
    """Every node after the nodes it links from (Kahn's algorithm, iterative); None if the links form a cycle.
    Workflows are mostly written in order already: that is checked first, in one pass."""
    seen: set[str] = set()
    for node_id, node in nodes.items():
        for src, _ in node.links.values():
            if src not in seen and src in nodes:
                break
        else:
            seen.add(node_id)
            continue
        break
    else:
        return list(nodes)
    waiting: dict[str, int] = {}
    readers: dict[str, list[str]] = {}
    for node_id, node in nodes.items():
        sources = {src for src, _ in node.links.values() if src in nodes}
        waiting[node_id] = len(sources)
        for src in sources:
            readers.setdefault(src, []).append(node_id)
    order = [node_id for node_id, count in waiting.items() if count == 0]
    for node_id in order:  # the list grows while it is walked
        for reader in readers.get(node_id, ()):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                order.append(reader)
    return order if len(order) == len(nodes) else None


def _cycle_issues(nodes: dict[str, GraphNode], all_nodes: dict[str, NodeSpec]) -> list[Issue]:
    """One issue per cycle, naming the nodes on it (networkx is imported only for this rare case)."""
    import networkx as nx

    dag = nx.DiGraph()
    dag.add_nodes_from(nodes)
    dag.add_edges_from((src, node_id) for node_id, node in nodes.items() for src, _ in node.links.values()
                       if src in nodes)
    issues = []
    for component in nx.strongly_connected_components(dag):
        if len(component) > 1 or any(dag.has_edge(n, n) for n in component):
            members = sorted(component)
            cycle = nx.find_cycle(dag.subgraph(members))
            path = " -> ".join([edge[0] for edge in cycle] + [cycle[0][0]])
            first = members[0]
            issues.append(Issue("cycle", f"the links form a cycle: {path}; a workflow must be acyclic, remove one link",
                                node_id=first, node_type=all_nodes[first].type))
    return issues


def _instance_outputs(workflow: Workflow, origins: dict) -> dict[str, str]:
    """Group instance id -> the node its first output comes from in its last repetition (what a link to the
    instance reads), to name in place of the instance."""
    found: dict[str, str] = {}
    for node_id, origin in origins.items():  # repetitions in order: the last one wins
        outputs = workflow.groups[origin.group].outputs
        inner = next(iter(outputs.values()), "").partition(".")[0] or origin.inner
        found[origin.instance] = f"{origin.instance}[{origin.iteration}]/{inner}"
    return found


def _output_nodes(all_nodes: dict[str, NodeSpec], nodes: dict[str, GraphNode], targets: list[str] | None,
                  issues: list[Issue], some_left_out: bool = False, left_out_ids: set[str] = frozenset(),
                  instances: dict[str, str] | None = None) -> list[str]:
    if targets:
        missing = [t for t in targets if t not in all_nodes and t not in left_out_ids]
        for target in missing:
            inner = (instances or {}).get(target)
            message = (f"--target '{target}' is a group instance, which runs as the nodes of its repetitions; "
                       f"name one of them, e.g. '{inner}' (its output in the last repetition)" if inner else
                       f"--target '{target}' is not a node of the workflow")
            issues.append(Issue("unknown_target", message, node_id=target))
        return [t for t in targets if t in all_nodes]
    outputs = [node_id for node_id, n in nodes.items() if n.definition.output]
    # With an unknown type or a malformed node among the nodes, that node may well be the output node.
    if not outputs and not some_left_out and not any(i.code == "unknown_type" for i in issues):
        issues.append(Issue("no_output", "the workflow has no output node (SaveImage or the like), so nothing "
                            "would run; add one, or name a node with --target"))
    return outputs
