"""Jobs sampled as one batch on the device (``--batch-size K``).

Jobs of a sweep whose overrides differ only in one sampler's ``seed`` and in the ``text`` of CLIPEncode nodes
that feed only that sampler share everything upstream of it. Up to K of them form a group: each job's inputs
to the sampler are made (the shared ones once, from the cache), the prompts' conditionings are concatenated,
and the sampler runs once on a batch of K rows, one seed per row (its draws are exactly those of the row's own
run). Row i's latent and its manifest facts are then put in the memory cache under the key job i's own
sampler has, and each job runs as usual: its sampler is served from the cache, and what comes after it
(VAEDecode, SaveImage, ...) runs per job, so every job writes its own files, manifest and workflow.

Whatever cannot be batched runs alone: a job whose inputs fail (it reports its own error when it runs),
or a group whose values do not fit one batch (latents of batch > 1, prompts of different lengths).
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .jobs import Job
from .task import Task, run_task

# The node types whose node function takes a list of seeds (nodes.denoise.prepare), and the prompt param of the
# nodes whose outputs a group concatenates.
SAMPLERS = frozenset({"Sampler", "LatentBlendSampler", "DifferentialSampler"})
PROMPTS = {"CLIPEncode": "text"}


@dataclass
class GroupTask:
    """The tasks of jobs sampled together and the sampler node they share."""

    tasks: list[Task]
    sampler: str

    @property
    def inputs(self) -> dict[str, str]:
        """Input images (the same for every job of a group: they differ only in seed and prompt)."""
        return self.tasks[0].inputs


def batch_role(graph, overrides: dict[str, Any]) -> tuple[str, str] | None:
    """(sampler node id, what the job shares with its group) when the job may join a group, else None.

    Jobs with the same answer differ only in that sampler's seed and the texts of prompts feeding it alone."""
    varying, rest, sampler, prompts = [], {}, None, []
    for name, value in overrides.items():
        node_id, _, param = name.partition(".")
        node = graph.nodes.get(node_id)
        kind = node.definition.type_name if node is not None else None
        if kind in SAMPLERS and param == "seed" and isinstance(value, int) and not isinstance(value, bool):
            if sampler not in (None, node_id):
                return None  # two samplers' seeds vary: one batch cannot hold both
            sampler = node_id
        elif PROMPTS.get(kind) == param and isinstance(value, str):
            prompts.append(node_id)
        else:
            rest[name] = value
            continue
        varying.append(name)
    if not varying:
        return None
    users: dict[str, set[str]] = {p: set() for p in prompts}
    for node_id, node in graph.nodes.items():
        for input_name, (src, _) in node.links.items():
            if src in users:
                users[src].add(node_id if node.definition.type_name in SAMPLERS and input_name in
                               ("positive", "negative") else "")
    for prompt in prompts:
        if len(users[prompt]) != 1 or "" in users[prompt]:
            return None  # a prompt used elsewhere (or not by a sampler) is not only the sampler's input
        sampler = sampler or next(iter(users[prompt]))
        if next(iter(users[prompt])) != sampler:
            return None
    if sampler is None or sampler not in graph.nodes:
        return None
    shared = json.dumps([sampler, sorted(varying), sorted(rest.items())], default=repr, sort_keys=True)
    return sampler, shared


def form_groups(jobs: list[Job], roles: dict[str, tuple[str, str] | None], size: int) -> list[Job]:
    """The jobs in order, those with the same role gathered into group jobs of at most ``size`` members."""
    if size <= 1:
        return list(jobs)
    buckets: dict[tuple, list[Job]] = {}
    for job in jobs:
        if roles.get(job.key) is not None:
            buckets.setdefault(roles[job.key], []).append(job)
    out, placed = [], set()
    for job in jobs:
        if job.key in placed:
            continue
        role = roles.get(job.key)
        if role is None:
            out.append(job)
            continue
        bucket = buckets[role]
        chunk = bucket[:size]
        del bucket[:size]
        placed.update(j.key for j in chunk)
        if len(chunk) == 1:
            out.append(chunk[0])
        else:
            out.append(replace(chunk[0], key="group:" + chunk[0].key, overrides={}, members=tuple(chunk),
                               sampler=role[0]))
    return out


def run_group(engine, group: GroupTask, worker: str, interrupt=None, files: dict[str, bytes] | None = None) -> dict:
    """Sample the group's jobs as one batch, then run each; ``{"outcomes": [one per task]}``."""
    from ..errors import Interrupted

    scratch = Path(tempfile.mkdtemp(prefix="nodegraph-group-"))
    try:
        tasks = [_local_inputs(task, files, scratch) for task in group.tasks]
        start = time.perf_counter()
        try:
            rows = sample_together(engine, tasks, group.sampler, interrupt, scratch / "upstream")
        except Interrupted:
            return {"outcomes": [{"status": "interrupted", "error": "interrupted", "worker": worker}
                                 for _ in tasks]}
        except Exception:  # noqa: BLE001 - nothing batched: each job runs alone and reports for itself
            rows = {}
        shared = round(time.perf_counter() - start, 4)
        outcomes = []
        for i, task in enumerate(tasks):
            row = rows.get(i)
            served = row is not None and row[1] in engine.memory  # else (evicted) its sampler runs alone
            outcome = run_task(engine, task, worker, interrupt)
            if served:
                outcome["batch"] = {"size": len(rows), "index": row[0], "seconds": shared}
            outcomes.append(outcome)
        return {"outcomes": outcomes}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _local_inputs(task: Task, files: dict[str, bytes] | None, scratch: Path) -> Task:
    """Input images sent as bytes (Ray) written once to a local folder, the overrides pointed there."""
    if not files:
        return task
    overrides = dict(task.overrides)
    for key, data in files.items():
        local = scratch / "inputs" / key.replace("/", "_") / Path(task.inputs[key]).name
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(data)
        overrides[key] = str(local)
    return replace(task, overrides=overrides, inputs={})


def sample_together(engine, tasks: list[Task], sampler: str, interrupt, scratch: Path) -> dict[int, tuple[int, str]]:
    """Run ``sampler`` once for the tasks' rows and cache each row under its job's key; for each task batched,
    its row and that key (none when fewer than two could be batched)."""
    from ..context import InterruptFlag, RunConfig, RunContext, RunRecord
    from ..devices import resolve_device, resolve_dtype
    from ..errors import Interrupted
    from ..executor import stable_keys
    from ..nodes.conditioning import PromptEmbeds, concat_conditionings
    from ..nodes.latent import Latents

    device, dtype = resolve_device(tasks[0].device), resolve_dtype(tasks[0].dtype)
    rows, graphs, keys, values = [], [], [], []
    made: dict[tuple, dict] = {}  # the sampler's inputs by their keys: jobs differing only in seed share them
    for i, task in enumerate(tasks):
        graph = engine.compile(task.workflow, task.overrides)
        node_keys = stable_keys(graph, device, dtype)
        key = node_keys.get(sampler)
        if key is None or engine.memory.get(key) is not None:
            continue  # drawn at random, or made already: the job runs as it is
        sources = sorted({src for src, _ in graph.nodes[sampler].links.values()})
        inputs = tuple(node_keys.get(src) for src in sources)
        if None in inputs or inputs not in made:
            try:
                result = engine.run(task.workflow, task.overrides, out_dir=scratch, targets=sources, device=device,
                                    dtype=dtype, interrupt=interrupt)
            except Interrupted:
                raise
            except Exception:  # noqa: BLE001 - this job runs alone and reports its own failure
                continue
            made[inputs] = result.outputs
        rows.append(i)
        graphs.append(graph)
        keys.append((key, node_keys))
        values.append(made[inputs])
    if len(rows) < 2:
        return {}
    node = graphs[0].nodes[sampler]
    definition = node.definition
    kwargs = dict(node.params)
    count = len(rows)
    for name, (src, output) in node.links.items():
        items = [v[src][output] for v in values]
        if len({node_keys.get(src) for _, node_keys in keys}) == 1 and None not in {k.get(src) for _, k in keys}:
            value = items[0]  # the same node output for every job
            if isinstance(value, Latents):
                if value.samples.shape[0] != 1:
                    return {}  # a row per seed: latents of batch > 1 are sampled job by job
                value = _rows(value, lambda t: t.repeat(count, *([1] * (t.ndim - 1))))
        elif all(isinstance(v, PromptEmbeds) and v.batch == 1 for v in items):
            value = concat_conditionings(items)
        else:
            return {}
        if not definition.inputs[name].is_socket:
            value = definition.inputs[name].validate(value)
        kwargs[name] = value
    default = definition.inputs["seed"].default
    seeds = [g.nodes[sampler].params.get("seed", default) for g in graphs]
    kwargs["seed"] = seeds
    record = RunRecord()
    config = RunConfig(device=device, dtype=dtype, out_dir=scratch, interrupt=interrupt or InterruptFlag(),
                       limits=engine.limits)
    outputs = definition.call(kwargs, RunContext(config, record, sampler, definition.type_name))
    facts = record.recorded.get(sampler, {})
    for row, ((key, _), seed) in enumerate(zip(keys, seeds)):
        mine = {name: (_rows(v, lambda t: t[row:row + 1].clone() if t.shape[0] == count else t)
                       if isinstance(v, Latents) else v)
                for name, v in outputs.items()}
        own = copy.deepcopy(facts)
        if isinstance(own.get("samplers"), dict):
            own["samplers"].update(seed=seed, batch={"size": count, "index": row})
        engine.memory.put(key, mine)
        engine.facts.remember(key, own)
    return {task: (row, key) for row, (task, (key, _)) in enumerate(zip(rows, keys))}


def _rows(latent, pick):
    """A LATENT with ``pick`` applied to each of its batched tensors."""
    import torch

    return replace(latent, **{f.name: pick(getattr(latent, f.name)) for f in fields(latent)
                              if isinstance(getattr(latent, f.name), torch.Tensor)})
