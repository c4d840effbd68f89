"""Trivial nodes for engine tests: they count their calls and report progress.

Loaded as a plugin folder (tests/stub_plugins), in-process and by CLI subprocesses.
"""
from __future__ import annotations

import collections
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
from pydantic import Field

from nodegraph.context import RunContext
from nodegraph.errors import NodeError
from nodegraph.node import node
from nodegraph.sockets import InputPath, socket

NUMBER = "NUMBER"
Number = socket(NUMBER, torch.Tensor)
CALLS: collections.Counter = collections.Counter()
SUNK: list = []


@node("StubSource", category="stub", outputs={"x": NUMBER})
def stub_source(value: Annotated[float, Field(ge=-1000, le=1000)] = 1.0) -> torch.Tensor:
    """A number as a tensor."""
    CALLS["StubSource"] += 1
    return torch.full((2,), float(value))


@node("StubAdd", category="stub", outputs={"x": NUMBER})
def stub_add(a: Number, amount: Annotated[float, Field(ge=0)] = 1.0, b: Optional[Number] = None) -> torch.Tensor:
    """Add a number (and an optional second input)."""
    CALLS["StubAdd"] += 1
    return a + amount + (b if b is not None else 0)


@node("StubPair", category="stub", outputs={"low": NUMBER, "high": NUMBER})
def stub_pair(a: Number) -> tuple:
    """Two outputs."""
    CALLS["StubPair"] += 1
    return a - 1, a + 1


@node("StubSink", category="stub", outputs={"x": NUMBER}, output=True)
def stub_sink(a: Number) -> torch.Tensor:
    """An output node that keeps what it got."""
    CALLS["StubSink"] += 1
    SUNK.append(a)
    return a


@node("StubWrite", category="stub", output=True)
def stub_write(a: Number, name: str = "result.txt", *, ctx: RunContext) -> None:
    """An output node that writes a file atomically."""
    CALLS["StubWrite"] += 1
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=ctx.out_dir, prefix=".tmp-")
    with os.fdopen(fd, "w") as handle:
        handle.write(" ".join(str(v) for v in a.tolist()))
    os.replace(tmp, ctx.out_dir / name)
    ctx.record_file(ctx.out_dir / name)


@node("StubSteps", category="stub", outputs={"x": NUMBER})
def stub_steps(a: Number, steps: Annotated[int, Field(ge=1)] = 3, delay: float = 0.0, *, ctx: RunContext) -> torch.Tensor:
    """Reports progress step by step, like a sampler."""
    CALLS["StubSteps"] += 1
    for i in range(steps):
        time.sleep(delay)
        ctx.progress(i + 1, steps)
    return a * 2


@node("StubFail", category="stub", outputs={"x": NUMBER})
def stub_fail(a: Number, fail: bool = True) -> torch.Tensor:
    """Raises when asked to."""
    CALLS["StubFail"] += 1
    if fail:
        raise ValueError("stub failure as asked")
    return a


@node("StubUserError", category="stub", outputs={"x": NUMBER})
def stub_user_error(a: Number) -> torch.Tensor:
    """Raises a user-facing NodeError."""
    raise NodeError("the input is not usable; pick another")


@node("StubRandom", category="stub", outputs={"x": NUMBER}, cacheable=False)
def stub_random() -> torch.Tensor:
    """Never cached."""
    CALLS["StubRandom"] += 1
    return torch.rand(2)


@node("StubReadFile", category="stub", outputs={"x": NUMBER})
def stub_read_file(path: Annotated[str, InputPath(kind="file")]) -> torch.Tensor:
    """A number read from a text file."""
    CALLS["StubReadFile"] += 1
    return torch.full((2,), float(Path(path).read_text().strip()))


def _even(params: dict):
    if params.get("value", 0) % 2:
        yield "value", "must be even"


@node("StubEven", category="stub", outputs={"x": NUMBER}, check=_even)
def stub_even(value: int = 0) -> torch.Tensor:
    """A cross-field check at validation time."""
    return torch.full((2,), float(value))
