"""One job as a worker runs it: a picklable Task in, a plain-dict outcome out, on the worker's Engine."""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Task:
    key: str
    workflow: str  # the workflow file (or a ComfyUI file), read where the worker runs
    overrides: dict[str, Any]
    out_dir: str | None  # the job's (partial) folder; None: send the files back instead
    device: str = "auto"
    dtype: str = "float32"
    inputs: dict[str, str] = field(default_factory=dict)  # override key -> input image path


def make_engine(options: dict[str, Any]):
    """A worker's Engine; ``options`` are Engine keyword arguments (picklable: paths, sizes, flags)."""
    from ..api import Engine

    return Engine(**options)


def run_task(engine, task: Task, worker: str, interrupt=None, files: dict[str, bytes] | None = None) -> dict:
    """Run one job; never raises for the job's own failure (the outcome says ``failed`` and why).

    ``files``: input images sent as bytes (a Ray object store): written to a local folder first and the
    override pointed there."""
    from ..errors import Interrupted, NodegraphError, NodeFailed, WorkflowInvalid

    if not isinstance(task, Task):  # jobs sampled as one batch (group.GroupTask)
        from .group import run_group

        return run_group(engine, task, worker, interrupt, files)
    overrides = dict(task.overrides)
    scratch = Path(tempfile.mkdtemp(prefix="nodegraph-job-"))
    try:
        for key, data in (files or {}).items():
            local = scratch / "inputs" / Path(task.inputs[key]).name
            local.parent.mkdir(exist_ok=True)
            local.write_bytes(data)
            overrides[key] = str(local)
        out = Path(task.out_dir) if task.out_dir else scratch / "out"
        start = time.perf_counter()
        outcome: dict[str, Any] = {"worker": worker}
        try:
            result = engine.run(task.workflow, overrides=overrides, out_dir=out, device=task.device,
                                dtype=task.dtype, interrupt=interrupt)
            outcome.update(status="done", manifest=result.info, warnings=result.warnings)
        except Interrupted:
            outcome.update(status="interrupted", error="interrupted")
            result = None
        except (NodeFailed, WorkflowInvalid, NodegraphError) as exc:
            outcome.update(status="failed", error=str(exc))
            result = getattr(exc, "result", None)
        except Exception as exc:  # a bug in a node or plugin: recorded for this job, the batch goes on
            outcome.update(status="failed", error=f"internal error: {type(exc).__name__}: {exc}")
            result = None
        outcome["seconds"] = round(time.perf_counter() - start, 4)
        if result is not None:  # how many nodes ran and how many came from a cache (shared or not)
            statuses = list(result.status.values())
            outcome["nodes"] = {s: statuses.count(s) for s in sorted(set(statuses))}
        written = [Path(f) for f in (result.files if result is not None else [])]
        outcome["files"] = [str(f.relative_to(out)) for f in written if f.is_relative_to(out)]
        if task.out_dir is None and outcome["status"] == "done":
            outcome["data"] = {name: (out / name).read_bytes() for name in outcome["files"]}
        return outcome
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
