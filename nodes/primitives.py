"""Primitive value nodes: one literal, linked into any number of params (a shared seed, say)."""
from __future__ import annotations

from typing import Literal

from nodegraph.errors import NodeError
from nodegraph.node import node
from nodegraph.sockets import BOOLEAN, FLOAT, INT, STRING


@node("Int", category="primitive", outputs={"value": INT})
def int_value(value: int) -> int:
    """An integer, to link into params of several nodes (e.g. one seed for every sampler)."""
    return value


@node("Float", category="primitive", outputs={"value": FLOAT})
def float_value(value: float) -> float:
    """A floating-point number, to link into params of several nodes."""
    return value


@node("String", category="primitive", outputs={"value": STRING})
def string_value(value: str) -> str:
    """A string, to link into params of several nodes (a prompt shared by two encoders, say)."""
    return value


@node("Boolean", category="primitive", outputs={"value": BOOLEAN})
def boolean_value(value: bool) -> bool:
    """A true/false switch, to link into params of several nodes."""
    return value


@node("IntMath", category="primitive", outputs={"value": INT})
def int_math(a: int, b: int = 0, op: Literal["add", "subtract", "multiply", "floordiv", "min", "max"] = "add") -> int:
    """Integer arithmetic on two values: a + b, a - b, a * b, a // b, min or max.

    Useful to derive sizes from a loaded image, e.g. the pixels that make it square:
    `a` = the target side, `b` = the image's width, `op` = subtract."""
    if op == "floordiv" and b == 0:
        raise NodeError("floordiv by b = 0; give a non-zero b")
    return {
        "add": a + b, "subtract": a - b, "multiply": a * b, "floordiv": a // b if b else 0,
        "min": min(a, b), "max": max(a, b),
    }[op]
