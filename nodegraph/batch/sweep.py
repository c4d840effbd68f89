"""Reading sweeps: what to vary across the jobs of a batch, as a list of override dicts.

A sweep is one of
- a JSON or YAML file of axes: ``{"grid": {"sample.seed": [1, 2], "pos.text": ["a", "b"]}}`` (every
  combination), ``{"zip": {...}}`` (the n-th values of every axis together; equal lengths), or both (each
  zipped row with every grid combination), plus optional ``"set": {...}`` given to every job;
- a JSONL file (one JSON object of overrides per line) or a CSV file (a header of NODE.PARAM columns, one
  job per row; cells parse as JSON where they can, else stay text, as ``--set``);
- a folder of input images bound to one param (``--bind load.path``): one job per image, by name.

Several sweeps combine as their product. Every problem in a sweep is reported at once.
"""
from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any

from ..errors import NodegraphError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class SweepInvalid(NodegraphError):
    """A sweep that cannot be read; ``problems`` holds every one, each naming the file and where."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def cell(text: str) -> Any:
    """A CSV cell as a param value: JSON where it parses (``7``, ``0.5``, ``true``), else the text."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError, RecursionError):
        return text


def read_sweep(path: str | Path, bind: str | None = None) -> tuple[list[dict[str, Any]], set[str]]:
    """The jobs of one sweep, as override dicts, and the override keys that name input images (which a
    Ray pool ships through its object store). Raises SweepInvalid listing every problem."""
    path = Path(path)
    problems: list[str] = []
    if path.is_dir():
        if not bind:
            raise SweepInvalid([f"sweep '{path}' is a folder of images: name the param they go to with "
                                "--bind NODE.PARAM, e.g. --bind load.path"])
        _check_key(bind, f"--bind {bind}", problems)
        images = sorted(p.resolve() for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            problems.append(f"sweep '{path}': no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder")
        if problems:
            raise SweepInvalid(problems)
        return [{bind: str(p)} for p in images], {bind}
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (as Excel writes one) is not part of the first key
    except OSError as exc:
        raise SweepInvalid([f"sweep '{path}': cannot read it ({exc.strerror or exc})"]) from None
    except UnicodeDecodeError:
        raise SweepInvalid([f"sweep '{path}': not UTF-8 text"]) from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        jobs = _jsonl(path, text, problems)
    elif suffix == ".csv":
        jobs = _csv(path, text, problems)
    elif suffix in (".json", ".yaml", ".yml"):
        jobs = _axes(path, text, suffix, problems)
    else:
        raise SweepInvalid([f"sweep '{path}': write it as .json, .yaml, .jsonl or .csv, or name a folder of images"])
    if not problems and not jobs:
        problems.append(f"sweep '{path}' holds no jobs")
    if problems:
        raise SweepInvalid(problems)
    return jobs, set()


def combine(sweeps: list[list[dict[str, Any]]], where: list[str]) -> list[dict[str, Any]]:
    """The product of several sweeps; two sweeps may not set the same param."""
    seen: dict[str, str] = {}
    problems = []
    for jobs, name in zip(sweeps, where):
        for key in sorted({k for job in jobs for k in job}):
            if key in seen and seen[key] != name:
                problems.append(f"sweeps '{seen[key]}' and '{name}' both set '{key}'; set it in one of them")
            seen.setdefault(key, name)
    if problems:
        raise SweepInvalid(problems)
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*sweeps)]


def _check_key(key: Any, where: str, problems: list[str]) -> bool:
    if not isinstance(key, str) or "." not in key.strip(".") :
        problems.append(f"{where}: {key!r} is not NODE.PARAM (e.g. sample.seed)")
        return False
    return True


def _jsonl(path: Path, text: str, problems: list[str]) -> list[dict]:
    jobs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except (json.JSONDecodeError, ValueError, RecursionError) as exc:
            problems.append(f"{path}:{number}: not JSON ({exc})")
            continue
        if not isinstance(job, dict):
            problems.append(f"{path}:{number}: write one object of overrides per line, "
                            '{"NODE.PARAM": value, ...}')
            continue
        if all([_check_key(k, f"{path}:{number}", problems) for k in job]):
            jobs.append(job)
    return jobs


def _csv(path: Path, text: str, problems: list[str]) -> list[dict]:
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    if not all([_check_key(h, f"{path}:1 (header)", problems) for h in header]):
        return []
    if len(set(header)) != len(header):
        problems.append(f"{path}:1 (header): a column is named twice")
    jobs = []
    for number, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            problems.append(f"{path}:{number}: {len(row)} cells for {len(header)} columns")
            continue
        jobs.append({h: cell(c) for h, c in zip(header, row)})
    return jobs


def _axes(path: Path, text: str, suffix: str, problems: list[str]) -> list[dict]:
    try:
        if suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # JSON and YAML parse errors of every kind: say where the file is wrong
        problems.append(f"sweep '{path}': not valid {suffix[1:].upper()} ({str(exc).splitlines()[0]})")
        return []
    if not isinstance(data, dict) or not ({"grid", "zip"} & set(data)):
        problems.append(f"sweep '{path}': write an object with \"grid\" and/or \"zip\" axes, e.g. "
                        '{"grid": {"sample.seed": [1, 2, 3]}}')
        return []
    for extra in sorted(set(data) - {"grid", "zip", "set"}):
        problems.append(f"sweep '{path}': unknown key '{extra}' (use grid, zip and set)")
    axes: dict[str, dict] = {}
    for part in ("grid", "zip", "set"):
        value = data.get(part, {})
        if not isinstance(value, dict):
            problems.append(f"sweep '{path}': \"{part}\" must map NODE.PARAM to values")
            continue
        for key, values in value.items():
            where = f"sweep '{path}': {part} '{key}'"
            if not _check_key(key, f"sweep '{path}': {part}", problems):
                continue
            if part != "set" and (not isinstance(values, list) or not values):
                problems.append(f"{where}: give a non-empty list of values")
                continue
            if any(key in axes.get(p, {}) for p in axes):
                problems.append(f"{where}: the param is already an axis; name it once")
                continue
            axes.setdefault(part, {})[key] = values
    zipped = axes.get("zip", {})
    lengths = {k: len(v) for k, v in zipped.items()}
    if len(set(lengths.values())) > 1:
        problems.append(f"sweep '{path}': zip axes differ in length ({', '.join(f'{k}: {n}' for k, n in lengths.items())})")
    if problems:
        return []
    rows = [dict(zip(zipped, values)) for values in zip(*zipped.values())] if zipped else [{}]
    grid = axes.get("grid", {})
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return [{**axes.get("set", {}), **row, **combo} for row in rows for combo in combos]
