"""Node groups with `repeat`: expanded into plain nodes before validation.

An instance `expand` of a group repeated 3 times becomes the nodes
`expand[1]/<inner id>`, `expand[2]/<inner id>`, `expand[3]/<inner id>`; repetition
k + 1 takes the `feedback` outputs of repetition k as its inputs. A link to
`expand.<output>` from outside reads the last repetition. Because cache keys are
content, the first k repetitions of a longer run reuse those of a shorter one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import Issue
from .workflow import GroupSpec, NodeSpec, Workflow

GROUP_PREFIX = "group:"
GROUP_INPUT = "in"  # inside a group, "in.<name>" links to the group's input <name>
ITERATION = "iteration"
REPEAT = "repeat"
MAX_REPEAT = 1000
_FLAT_ID = re.compile(r"^(?P<instance>[A-Za-z0-9_-]+)\[(?P<k>\d+)\]/(?P<inner>.+)$")


@dataclass(frozen=True)
class Origin:
    """Where a flattened node came from."""

    instance: str
    group: str
    iteration: int
    inner: str


def flat_id(instance: str, iteration: int, inner: str) -> str:
    return f"{instance}[{iteration}]/{inner}"


def parse_flat_id(node_id: str) -> tuple[str, int, str] | None:
    match = _FLAT_ID.match(node_id)
    return (match["instance"], int(match["k"]), match["inner"]) if match else None


def expand_groups(workflow: Workflow, max_nodes: int | None = None
                  ) -> tuple[dict[str, NodeSpec], dict[str, Origin], set[str], list[Issue]]:
    """Plain nodes for the whole workflow, where each flattened node came from, the ids of
    group instances (a link still naming one is a mistake already reported), and problems.

    With more than ``max_nodes`` nodes after expansion nothing is expanded: the problem names the
    instances that make the most nodes (counted before any is made)."""
    if not workflow.groups and not any(s.type.startswith(GROUP_PREFIX) for s in workflow.nodes.values()):
        if max_nodes is not None and len(workflow.nodes) > max_nodes:
            return {}, {}, set(workflow.nodes), [_too_many(len(workflow.nodes), max_nodes, [])]
        return workflow.nodes, {}, set(), []
    issues: list[Issue] = []
    broken_groups = {b[len(GROUP_PREFIX):] for b in workflow.broken if b.startswith(GROUP_PREFIX)}
    for name, group in workflow.groups.items():
        if name in broken_groups:
            continue
        found = _check_group(name, group)
        if found:
            broken_groups.add(name)
            issues.extend(found)
    last: dict[str, tuple[str, GroupSpec, int]] = {}  # instance id -> (group name, group, repeat)
    for node_id, spec in workflow.nodes.items():
        if spec.type.startswith(GROUP_PREFIX) and spec.type[len(GROUP_PREFIX):] not in broken_groups:
            resolved = _check_instance(node_id, spec, workflow, issues)
            if resolved is not None:
                last[node_id] = resolved

    if max_nodes is not None:
        sizes = {i: repeat * len(group.nodes) for i, (_, group, repeat) in last.items()}
        total = sum(sizes.values()) + sum(1 for s in workflow.nodes.values() if not s.type.startswith(GROUP_PREFIX))
        if total > max_nodes:
            biggest = sorted(sizes, key=sizes.get, reverse=True)[:3]
            instances = set(workflow.nodes)
            return {}, {}, instances, [*issues, _too_many(total, max_nodes, [(i, sizes[i]) for i in biggest])]
    flat: dict[str, NodeSpec] = {}
    origins: dict[str, Origin] = {}
    for node_id, spec in workflow.nodes.items():
        if node_id in last:
            group_name, group, repeat = last[node_id]
            given = _outside_links(node_id, spec.inputs, last, issues)
            for k in range(1, repeat + 1):
                for inner_id, inner in group.nodes.items():
                    new_id = flat_id(node_id, k, inner_id)
                    flat[new_id] = _instantiate(node_id, given, spec.params, group, k, inner)
                    origins[new_id] = Origin(node_id, group_name, k, inner_id)
        elif not spec.type.startswith(GROUP_PREFIX):
            flat[node_id] = spec.model_copy(update={"inputs": _outside_links(node_id, spec.inputs, last, issues)})
    instances = {i for i, s in workflow.nodes.items() if s.type.startswith(GROUP_PREFIX)}
    return flat, origins, instances, issues


def _too_many(total: int, limit: int, biggest: list[tuple[str, int]]) -> Issue:
    by = "; ".join(f"'{i}' makes {n:,}" for i, n in biggest)
    return Issue("too_many_nodes", f"the workflow expands to {total:,} nodes, over the limit of {limit:,}"
                 + (f" ({by})" if by else "") + "; lower 'repeat', or raise the limit (--max-nodes, or "
                 "Engine(limits=Limits(max_nodes=...)))")


def flat_params_owner(data: dict, origin: Origin | None, node_id: str, name: str) -> tuple[dict, str]:
    """Where a flattened node's param is written in the workflow as a JSON dict: (node spec, param name).

    A plain node's own spec; for a node from a group, the group's inner node, or the group instance when
    the inner node takes the param from the group's input."""
    if origin is None:
        return data["nodes"][node_id], name
    spec = data["groups"][origin.group]["nodes"][origin.inner]
    source, _, port = spec.get("inputs", {}).get(name, "").partition(".")
    if source == GROUP_INPUT:  # the value is a literal on the group instance
        return data["nodes"][origin.instance], port
    return spec, name


def param_owner(workflow: Workflow, origin: Origin | None, node_id: str, name: str) -> tuple:
    """Where a flattened node's literal param is written, as a key: every repetition of a group shares its
    inner node's literals (and an instance's literals are shared by its repetitions)."""
    if origin is None:
        return ("node", node_id, name)
    inner = workflow.groups[origin.group].nodes[origin.inner]
    source, _, port = inner.inputs.get(name, "").partition(".")
    if source == GROUP_INPUT:
        return ("instance", origin.instance, port)
    return ("group", origin.group, origin.inner, name)


def _check_group(name: str, group: GroupSpec) -> list[Issue]:
    where = {"node_id": f"{GROUP_PREFIX}{name}", "node_type": "group"}
    issues = []
    if ITERATION in group.inputs:
        issues.append(Issue("bad_group", f"'in.{ITERATION}' is the repetition number, so an input of that name could "
                            "never be read; rename the input", field=f"inputs.{ITERATION}", **where))
    for out, target in group.outputs.items():
        inner, dot, _ = target.partition(".")
        if not dot or inner not in group.nodes:
            issues.append(Issue("bad_group", f"output '{out}' = '{target}' must name '<inner node id>.<output>' "
                                "of a node inside the group", field=f"outputs.{out}", **where))
    for out, into in group.feedback.items():
        if out not in group.outputs:
            issues.append(Issue("unknown_group_output", f"feedback from '{out}', which is not an output of the "
                                f"group (outputs: {', '.join(group.outputs) or 'none'})", field=f"feedback.{out}", **where))
        if into not in group.inputs:
            issues.append(Issue("bad_group", f"feedback into '{into}', which is not an input of the group "
                                f"(inputs: {', '.join(group.inputs) or 'none'})", field=f"feedback.{out}", **where))
    for inner_id, spec in group.nodes.items():
        if inner_id == GROUP_INPUT:
            issues.append(Issue("bad_group", f"'{GROUP_INPUT}' is reserved for links to the group's inputs; "
                                "rename this node", node_id=f"{GROUP_PREFIX}{name}", node_type="group", field=inner_id))
        if spec.type.startswith(GROUP_PREFIX):
            issues.append(Issue("bad_group", "groups cannot contain group instances", field=f"nodes.{inner_id}", **where))
        for field, link in spec.inputs.items():
            source, dot, port = link.partition(".")
            if source == GROUP_INPUT and port not in group.inputs and port != ITERATION:
                issues.append(Issue("bad_group", f"node '{inner_id}' input '{field}' links to 'in.{port}', which is "
                                    f"not an input of the group (inputs: {', '.join(group.inputs) or 'none'})",
                                    field=f"nodes.{inner_id}.{field}", **where))
            elif source == GROUP_INPUT and field in spec.params:
                # expansion puts the group input's value in its place: the literal would be dropped unseen
                issues.append(Issue("link_and_literal", f"node '{inner_id}' param '{field}' is given both as a link "
                                    f"('{link}') and a literal; keep one", field=f"nodes.{inner_id}.{field}", **where))
    return issues


def _check_instance(node_id: str, spec: NodeSpec, workflow: Workflow, issues: list[Issue]):
    name = spec.type[len(GROUP_PREFIX):]
    group = workflow.groups.get(name)

    def issue(code: str, message: str, field: str | None = None, kind: str | None = None, **value) -> None:
        issues.append(Issue(code, message, node_id=node_id, node_type=spec.type, field=field, kind=kind,
                            value=value.get("value"), has_value="value" in value))

    if group is None:
        issue("unknown_group", f"no group '{name}' in the workflow's \"groups\" (groups: "
              f"{', '.join(workflow.groups) or 'none'})", field="type")
        return None
    repeat = spec.params.get(REPEAT, 1)
    ok = True
    if REPEAT in spec.inputs:
        issue("bad_repeat", "repeat must be a literal: it sets the workflow's shape before anything runs",
              field=REPEAT, kind="param")
        ok = False
    elif not isinstance(repeat, int) or isinstance(repeat, bool) or not 1 <= repeat <= MAX_REPEAT:
        issue("bad_repeat", f"must be a whole number from 1 to {MAX_REPEAT}", field=REPEAT, kind="param", value=repeat)
        ok = False
    for field in [*spec.inputs, *spec.params]:
        if field != REPEAT and field not in group.inputs:
            kind = "input" if field in spec.inputs else "param"
            issue(f"unknown_{kind}", f"group '{name}' has no input '{field}'; its inputs are "
                  f"{', '.join(group.inputs) or 'none'}", field=field, kind=kind)
        elif field in spec.inputs and field in spec.params:
            issue("link_and_literal", "given both as a link and a literal; keep one", field=field, kind="param")
    for field in group.inputs:
        if field not in spec.inputs and field not in spec.params:
            issue("missing_input", f"group input '{field}' ({group.inputs[field]}) is not given; link it or give "
                  "it in params", field=field, kind="input")
    return (name, group, repeat) if ok else None


def _outside_links(node_id: str, links: dict[str, str], last: dict, issues: list[Issue]) -> dict[str, str]:
    """Links to an instance's outputs read its last repetition."""
    rewritten = {}
    for field, link in links.items():
        source, dot, port = link.partition(".")
        if dot and source in last:
            _, group, repeat = last[source]
            target = group.outputs.get(port)
            if target is None:
                issues.append(Issue("unknown_group_output", f"group instance '{source}' has no output '{port}'; "
                                    f"its outputs are {', '.join(group.outputs) or 'none'}",
                                    node_id=node_id, field=field, kind="input"))
                rewritten[field] = link
                continue
            inner, _, out = target.partition(".")
            link = f"{flat_id(source, repeat, inner)}.{out}"
        rewritten[field] = link
    return rewritten


def _instantiate(instance: str, given: dict[str, str], literals: dict, group: GroupSpec, k: int,
                 inner: NodeSpec) -> NodeSpec:
    """Repetition k of one inner node: its links to the group's inputs made concrete."""
    fed_back = {into: out for out, into in group.feedback.items()}
    inputs: dict[str, str] = {}
    params = dict(inner.params)
    for field, link in inner.inputs.items():
        source, _, port = link.partition(".")
        if source != GROUP_INPUT:
            inputs[field] = f"{flat_id(instance, k, source)}.{port}"
        elif port == ITERATION:
            params[field] = k
        elif k > 1 and port in fed_back:
            target_inner, _, out = group.outputs[fed_back[port]].partition(".")
            inputs[field] = f"{flat_id(instance, k - 1, target_inner)}.{out}"
        elif port in given:
            inputs[field] = given[port]
        elif port in literals:
            params[field] = literals[port]
    return NodeSpec(type=inner.type, inputs=inputs, params=params, title=inner.title)
