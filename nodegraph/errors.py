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
                label += f" = {_short_repr(self.value)}"
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


def _short_repr(value: object) -> str:
    text = value if isinstance(value, (int, float, bool)) or value is None else repr(value)
    text = str(text)
    return text if len(text) <= 60 else text[:57] + "..."


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
    """A plugin failed to load or clashed with another; names the plugin."""


class NodeDefinitionError(NodegraphError):
    """A node function is declared wrongly (a programming error in a node library)."""
