"""Jobs of a batch: their keys, their folders, and ``results.jsonl`` (one line per finished job, which
``--resume`` reads back).

A job's key hashes the workflow's content (its file's bytes and folder, as ``Engine.compile`` does) with the
job's overrides, so a changed workflow or a changed override is a new job that resume does not skip.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = "results.jsonl"


@dataclass
class Job:
    index: int  # position in the sweep, from 0
    overrides: dict[str, Any]
    key: str
    models: tuple[str, ...] = ()  # model files it loads: jobs sharing them go to the worker holding them
    inputs: dict[str, str] = field(default_factory=dict)  # override key -> input image path (object store)
    role: tuple[str, str] | None = None  # (sampler, what it shares) when it may be sampled with others (group.py)
    members: tuple["Job", ...] = ()  # a group of jobs sampled as one batch: its jobs
    sampler: str | None = None  # a group's shared sampler node

    @property
    def name(self) -> str:
        """The job's folder under the batch's output folder."""
        return f"{self.index:05d}-{self.key[:10]}"


def job_key(workflow_digest: str, overrides: dict[str, Any]) -> str:
    """The workflow's content digest with the overrides, in a canonical order."""
    text = json.dumps(sorted(overrides.items()), default=repr, sort_keys=True)
    return hashlib.sha256(f"{workflow_digest}|{text}".encode()).hexdigest()


def workflow_digest(path: Path, base: dict[str, Any]) -> str:
    """The content of a workflow file and its folder (relative paths resolve there), with the overrides every
    job shares (``--set``)."""
    digest = hashlib.sha256(path.read_bytes())
    digest.update(f"|{path.resolve().parent}|{json.dumps(sorted(base.items()), default=repr)}".encode())
    return digest.hexdigest()


class Results:
    """``results.jsonl``: appended one whole line at a time and flushed, so a kill loses at most the line
    being written; a truncated last line is cut off when the file is opened again."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / RESULTS
        self._handle = None

    def read(self) -> dict[str, dict]:
        """The last record of every job key (lines that do not parse are skipped)."""
        records: dict[str, dict] = {}
        try:
            lines = self.path.read_bytes().split(b"\n")
        except FileNotFoundError:
            return records
        for line in lines:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                continue
            if isinstance(record, dict) and isinstance(record.get("key"), str):
                records[record["key"]] = record
        return records

    def done(self) -> dict[str, dict]:
        return {key: r for key, r in self.read().items() if r.get("status") == "done"}

    def append(self, record: dict) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _cut_partial_line(self.path)
            self._handle = open(self.path, "ab")
        self._handle.write((json.dumps(record, default=str) + "\n").encode())
        self._handle.flush()  # in the system's hands: a killed process loses nothing written

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _cut_partial_line(path: Path) -> None:
    """Drop a last line without its newline (a write cut by a kill) so the next line starts clean."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
