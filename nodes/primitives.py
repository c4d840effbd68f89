"""Primitive value nodes: one literal, linked into any number of params (a shared seed, say)."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from nodegraph.errors import NodeError
from nodegraph import node
from nodegraph.sockets import BOOLEAN, FLOAT, INT, STRING, Randomizable


@node("Int", category="primitive", reference="a literal value", outputs={"value": INT})
def int_value(value: Annotated[int, Field(description="the number")]) -> int:
    """An integer, to link into params of several nodes (e.g. one seed for every sampler)."""
    return value


@node("Seed", category="primitive", outputs={"seed": INT},
      reference="ComfyUI's seed widget with control_after_generate 'randomize'")
def seed_value(
    seed: Annotated[Union[int, Literal["random"]], Field(ge=0, le=2**63 - 1, description="a seed, or \"random\" "
                                                         "for a new one each run"), Randomizable()] = "random",
) -> int:
    """A seed to link into samplers: a fixed number, or "random" for a new one drawn once per run.

    A drawn seed is part of the cache key (what it feeds reruns), shown in the run's info under
    "random" and written into the workflow saved with the images, so rerunning a saved image
    reproduces it."""
    return seed


@node("Float", category="primitive", reference="a literal value", outputs={"value": FLOAT})
def float_value(value: Annotated[float, Field(description="the number")]) -> float:
    """A floating-point number, to link into params of several nodes."""
    return value


@node("String", category="primitive", reference="a literal value", outputs={"value": STRING})
def string_value(value: Annotated[str, Field(description="the text")]) -> str:
    """A string, to link into params of several nodes (a prompt shared by two encoders, say)."""
    return value


@node("Boolean", category="primitive", reference="a literal value", outputs={"value": BOOLEAN})
def boolean_value(value: Annotated[bool, Field(description="true or false")]) -> bool:
    """A true/false switch, to link into params of several nodes."""
    return value


@node("IntMath", category="primitive", outputs={"value": INT}, reference="Python's integer operators")
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
