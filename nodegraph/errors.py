"""The one error hierarchy of the engine.

Every error a user can cause names who (node id and type), what (input or param)
and what to do; the CLI prints these without a traceback.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class NodegraphError(Exception):
    """Base class of every error the engine raises on purpose."""


@dataclass(frozen=True)
class Issue:
    """One validation problem: where it is, a stable code, and what to do."""

    code: str
    message: str
    node_id: str | None = None
    node_type: str | None = None
    field: str | None = None
    kind: str | None = None  # "input" or "param", when field is set
    value: object = None
    has_value: bool = False

    def __str__(self) -> str:
        where = []
        if self.node_id is not None:
            where.append(f"node '{self.node_id}'" + (f" ({self.node_type})" if self.node_type else ""))
        if self.field is not None:
            label = f"{self.kind} '{self.field}'" if self.kind else f"'{self.field}'"
            if self.has_value:
                label += f" = {short_repr(self.value)}"
            where.append(label)
        return ": ".join(where + [self.message])

    def to_dict(self) -> dict:
        return {
            "code": self.code,
            "node_id": self.node_id,
            "node_type": self.node_type,
            "field": self.field,
            "message": self.message,
            "text": str(self),
        }


def short_repr(value: object, limit: int = 60) -> str:
    """A value for a message: never huge, never an error itself (a 5,000-digit integer, a deep list)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    try:
        text = str(value) if isinstance(value, (int, float, bool)) or value is None else repr(value)
    except (RecursionError, ValueError):
        return f"<{type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


class WorkflowInvalid(NodegraphError):
    """A workflow failed validation; `issues` lists every problem found."""

    def __init__(self, issues: list[Issue]):
        self.issues = list(issues)
        count = len(self.issues)
        lines = [f"workflow is invalid ({count} problem{'s' if count != 1 else ''}):"]
        lines += [f"  - {issue}" for issue in self.issues]
        super().__init__("\n".join(lines))


class NodeError(NodegraphError):
    """Raised by node code for a user-facing failure (bad file, wrong model, ...).

    The executor adds the node id and type; the message should say what to do.
    """


@dataclass
class NodeFailed(NodegraphError):
    """A node raised while running; wraps the original exception."""

    node_id: str
    node_type: str
    cause: BaseException
    result: object = field(default=None, repr=False)  # the partial RunResult

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        if isinstance(self.cause, NodeError):
            detail = str(self.cause)
        else:
            detail = f"{type(self.cause).__name__}: {self.cause}"
        return f"node '{self.node_id}' ({self.node_type}) failed: {detail}"


class Interrupted(NodegraphError):
    """The run was interrupted (Ctrl-C) between nodes or between sampler steps."""

    def __init__(self, message: str = "interrupted", result: object = None):
        self.result = result
        super().__init__(message)


class PluginError(NodegraphError):
    """A plugin failed to load or clashed with another; names the plugin. ``fatal``: it tried to end the
    process (sys.exit or another BaseException while loading), so nothing should run."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


class NodeDefinitionError(NodegraphError):
    """A node function is declared wrongly (a programming error in a node library)."""
