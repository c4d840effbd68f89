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
from nodegraph import node
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
def stub_write(a: Number, name: str = "result.txt", head: int = 0, *, ctx: RunContext) -> None:
    """An output node that writes a file atomically (only the first ``head`` values if given)."""
    CALLS["StubWrite"] += 1
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=ctx.out_dir, prefix=".tmp-")
    with os.fdopen(fd, "w") as handle:
        handle.write(" ".join(str(v) for v in (a[:head] if head else a).tolist()))
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


@node("StubReadModel", category="stub", outputs={"x": NUMBER})
def stub_read_model(path: Annotated[str, InputPath(kind="file", folder="checkpoints")]) -> torch.Tensor:
    """A number read from a text file named by path or by its name in the models folder checkpoints/."""
    CALLS["StubReadModel"] += 1
    return torch.full((2,), float(Path(path).read_text().strip()))


def _even(params: dict):
    if params.get("value", 0) % 2:
        yield "value", "must be even"


@node("StubEven", category="stub", outputs={"x": NUMBER}, check=_even)
def stub_even(value: int = 0) -> torch.Tensor:
    """A cross-field check at validation time."""
    return torch.full((2,), float(value))


@node("StubMisbehave", category="stub", outputs={"x": NUMBER})
def stub_misbehave(how: str = "exit", a: Optional[Number] = None) -> object:
    """Misbehaves as asked: calls sys.exit, raises KeyboardInterrupt or a BaseException, prints to stdout,
    or returns the wrong thing."""
    import sys

    if how == "exit":
        sys.exit(0)
    if how == "keyboard":
        raise KeyboardInterrupt
    if how == "base":
        raise GeneratorExit("stub")
    if how == "print":
        print("STUB SAYS HELLO")
        return torch.zeros(2)
    if how == "string":
        return "not a tensor"
    return None


@node("StubTwoOut", category="stub", outputs={"low": NUMBER, "high": NUMBER})
def stub_two_out(a: Number) -> dict:
    """Returns a dict with the wrong output names."""
    return {"low": a, "top": a}


@node("StubRecord", category="stub", outputs={"x": NUMBER})
def stub_record(value: float = 1.0, *, ctx: RunContext) -> torch.Tensor:
    """Records a manifest fact, like a sampler records its seed."""
    CALLS["StubRecord"] += 1
    ctx.record("seeds", int(value))
    return torch.full((2,), float(value))


@node("StubRewrite", category="stub", outputs={"x": NUMBER})
def stub_rewrite(path: Annotated[str, InputPath(kind="file")], then: str = "") -> torch.Tensor:
    """Reads a number from a file, then writes ``then`` into it (a file changed while the run reads it)."""
    CALLS["StubRewrite"] += 1
    value = float(Path(path).read_text().strip())
    if then:
        Path(path).write_text(then)
    return torch.full((2,), value)


@node("StubStubborn", category="stub", outputs={"x": NUMBER})
def stub_stubborn(a: Number, seconds: float = 5.0) -> torch.Tensor:
    """A long node that swallows a Ctrl-C (as C code or a careless library may) and finishes anyway."""
    Path(os.environ.get("STUB_STARTED", os.devnull)).write_text("started")
    end = time.time() + seconds
    while time.time() < end:
        try:
            time.sleep(0.05)
        except KeyboardInterrupt:
            pass
    return a


@node("StubBig", category="stub", outputs={"x": NUMBER})
def stub_big(size: Annotated[int, Field(ge=1, le=10_000_000)] = 1000) -> torch.Tensor:
    """A tensor of ``size`` floats."""
    CALLS["StubBig"] += 1
    return torch.arange(size, dtype=torch.float32)


@node("StubReadFolder", category="stub", outputs={"x": NUMBER})
def stub_read_folder(folder: Annotated[str, InputPath(kind="dir")]) -> torch.Tensor:
    """The number of files in a folder."""
    return torch.full((2,), float(len(list(Path(folder).iterdir()))))


@node("StubWarn", category="stub", outputs={"x": NUMBER})
def stub_warn(*, ctx: RunContext) -> torch.Tensor:
    """Warns, as CLIPEncode does for a truncated prompt."""
    ctx.warn("careful now")
    return torch.zeros(2)


@node("StubSparse", category="stub", outputs={"x": NUMBER})
def stub_sparse(a: Number) -> torch.Tensor:
    """A sparse tensor, which safetensors cannot store."""
    return a.to_sparse()


@node("StubAnyFloat", category="stub", outputs={"x": NUMBER})
def stub_any_float(value: Annotated[float, Field(allow_inf_nan=True)] = 0.0) -> torch.Tensor:
    """A float param that accepts NaN and infinities."""
    CALLS["StubAnyFloat"] += 1
    return torch.full((2,), value)


@node("StubRewriteOther", category="stub", outputs={"x": NUMBER})
def stub_rewrite_other(path: Annotated[str, InputPath(kind="file")], target: str, text: str = "9") -> torch.Tensor:
    """Reads its own file and writes ``text`` into another file (one a later node reads)."""
    Path(target).write_text(text)
    return torch.full((2,), float(Path(path).read_text().strip()))


@node("StubReadAfter", category="stub", outputs={"x": NUMBER})
def stub_read_after(path: Annotated[str, InputPath(kind="file")], after: Optional[Number] = None) -> torch.Tensor:
    """A number read from a file, after the node linked to ``after`` ran."""
    CALLS["StubReadAfter"] += 1
    return torch.full((2,), float(Path(path).read_text().strip()))


WEAK: list = []


@node("StubTracked", category="stub", outputs={"x": NUMBER})
def stub_tracked(size: int = 1000) -> torch.Tensor:
    """A tensor whose lifetime the tests follow through a weak reference."""
    import weakref

    value = torch.zeros(size)
    WEAK.append(weakref.ref(value))
    return value


@node("StubAlive", category="stub", outputs={"x": NUMBER})
def stub_alive(a: Number) -> torch.Tensor:
    """Records whether StubTracked's last tensor is still alive when this node runs."""
    SUNK.append(("alive", WEAK[-1]() is not None))
    return a
