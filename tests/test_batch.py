"""nodegraph batch: sweeps, results.jsonl, resume, failures, exit codes, local workers and model affinity."""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nodegraph.batch import Batch, BatchInvalid, InProcessPool, Job, Results, SweepInvalid, dispatch, read_sweep, run_batch
from nodegraph.batch.dispatch import Affinity
from nodegraph.batch.sweep import combine

from .batch_helpers import batch_images, img2img_workflow, one_by_one, photo_folder, pixels, torch_threads
from .conftest import REPO


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ sweeps

def test_grid_is_every_combination_and_zip_goes_together(tmp_path):
    jobs, _ = read_sweep(write(tmp_path / "s.json", json.dumps(
        {"grid": {"sample.seed": [1, 2, 3], "pos.text": ["a", "b"]}})))
    assert jobs == [{"sample.seed": s, "pos.text": t} for s in (1, 2, 3) for t in ("a", "b")]
    jobs, _ = read_sweep(write(tmp_path / "z.yaml", "zip:\n  sample.seed: [1, 2]\n  pos.text: [a, b]\n"
                                                    "grid:\n  sample.steps: [2, 3]\nset:\n  sample.strength: 0.5\n"))
    assert jobs == [{"sample.strength": 0.5, "sample.seed": 1, "pos.text": "a", "sample.steps": 2},
                    {"sample.strength": 0.5, "sample.seed": 1, "pos.text": "a", "sample.steps": 3},
                    {"sample.strength": 0.5, "sample.seed": 2, "pos.text": "b", "sample.steps": 2},
                    {"sample.strength": 0.5, "sample.seed": 2, "pos.text": "b", "sample.steps": 3}]


def test_jsonl_csv_and_image_folders(tmp_path):
    jobs, _ = read_sweep(write(tmp_path / "s.jsonl", '{"sample.seed": 4}\n\n{"pos.text": "x", "sample.seed": 5}\n'))
    assert jobs == [{"sample.seed": 4}, {"pos.text": "x", "sample.seed": 5}]
    jobs, _ = read_sweep(write(tmp_path / "s.csv", "sample.seed,pos.text,sample.strength\n7,a cat,0.5\n8,\"b, c\",true\n"))
    assert jobs == [{"sample.seed": 7, "pos.text": "a cat", "sample.strength": 0.5},
                    {"sample.seed": 8, "pos.text": "b, c", "sample.strength": True}]  # cells parse as --set does
    folder = photo_folder(tmp_path / "photos")
    jobs, inputs = read_sweep(folder, bind="photo.path")
    assert jobs == [{"photo.path": str((folder / n).resolve())} for n in ("astronaut_96.png", "chelsea_128.png")]
    assert inputs == {"photo.path"}
    assert combine([jobs, [{"sample.seed": 1}, {"sample.seed": 2}]], ["photos", "seeds"]) == [
        {**j, "sample.seed": s} for j in jobs for s in (1, 2)]


@pytest.mark.parametrize("name, text, expected", [
    ("a.json", '{"zip": {"s.seed": [1, 2], "p.text": ["a"]}}', ["zip axes differ in length"]),
    ("b.json", '{"grid": {"seed": [1], "s.steps": 3}, "extra": 1}',
     ["unknown key 'extra'", "'seed' is not NODE.PARAM", "grid 's.steps': give a non-empty list"]),
    ("c.json", '{"grid": ', ["not valid JSON"]),
    ("d.jsonl", '{"s.seed": 1}\n[1, 2]\n{"s.seed": \n', ["d.jsonl:2: write one object", "d.jsonl:3: not JSON"]),
    ("e.csv", "s.seed,p.text\n1\n2,a\n", ["e.csv:2: 1 cells for 2 columns"]),
    ("f.csv", "", ["holds no jobs"]),
    ("g.txt", "s.seed=1", ["write it as .json, .yaml, .jsonl or .csv"]),
])
def test_bad_sweeps_name_the_file_and_every_problem(tmp_path, name, text, expected):
    with pytest.raises(SweepInvalid) as info:
        read_sweep(write(tmp_path / name, text))
    assert len(info.value.problems) == len(expected)
    for problem, words in zip(info.value.problems, expected):
        assert words in problem and name in problem


def test_sweeps_saved_with_a_byte_order_mark_read_as_without(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a BOM: the first column must still be sample.seed."""
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbfsample.seed,pos.text\r\n1,a dog\r\n2,a cat\r\n")
    assert read_sweep(tmp_path / "excel.csv")[0] == [{"sample.seed": 1, "pos.text": "a dog"},
                                                      {"sample.seed": 2, "pos.text": "a cat"}]
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf{"grid": {"sample.seed": [1, 2]}}')
    assert read_sweep(tmp_path / "bom.json")[0] == [{"sample.seed": 1}, {"sample.seed": 2}]
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"sample.seed": 3}\n')
    assert read_sweep(tmp_path / "bom.jsonl")[0] == [{"sample.seed": 3}]


def test_image_folders_need_bind_and_images(tmp_path):
    with pytest.raises(SweepInvalid, match="--bind NODE.PARAM"):
        read_sweep(photo_folder(tmp_path / "photos"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SweepInvalid, match="no images"):
        read_sweep(tmp_path / "empty", bind="photo.path")
    with pytest.raises(SweepInvalid, match="both set 'sample.seed'"):
        combine([[{"sample.seed": 1}], [{"sample.seed": 2}]], ["one", "two"])


# ------------------------------------------------------------------------------------- results.jsonl, keys

def test_results_lines_are_whole_and_a_cut_last_line_is_dropped(tmp_path):
    results = Results(tmp_path)
    results.append({"key": "a", "status": "done"})
    results.close()
    with open(results.path, "ab") as handle:
        handle.write(b'{"key": "b", "status": "do')  # killed mid-write
    assert set(Results(tmp_path).done()) == {"a"}
    again = Results(tmp_path)
    again.append({"key": "c", "status": "failed"})
    again.close()
    lines = results.path.read_text().splitlines()
    assert [json.loads(l)["key"] for l in lines] == ["a", "c"]
    assert set(Results(tmp_path).read()) == {"a", "c"} and set(Results(tmp_path).done()) == {"a"}


# ----------------------------------------------------------------------------- runs on the tiny checkpoint

@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    workflow = img2img_workflow(folder, tiny.sd15)
    sweep = write(folder / "sweep.json", json.dumps({"grid": {"sample.seed": [1, 2, 3, 4], "pos.text": ["a", "b"]}}))
    jobs = [{"sample.seed": s, "pos.text": t} for s in (1, 2, 3, 4) for t in ("a", "b")]
    reference = one_by_one(workflow, jobs, folder / "reference")
    return workflow, sweep, jobs, reference


def batch(workflow, sweep, out, **options) -> Batch:
    return Batch(workflow=workflow, sweeps=[str(sweep)], out=out, progress=False,
                 engine_options={"cache_dir": False}, **options)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def wait_for_records(process, out: Path, count: int, seconds: float = 240) -> None:
    """Until a running batch has recorded ``count`` jobs (or ended, or the time is up)."""
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        if (out / "results.jsonl").exists() and len(records(out)) >= count:
            return
        time.sleep(0.05)


def test_in_process_batch_matches_one_by_one_runs_and_records_every_job(setup, tmp_path):
    workflow, sweep, jobs, reference = setup
    with torch_threads(1):
        summary = run_batch(batch(workflow, sweep, tmp_path / "out", workers=1))
    assert (summary.total, summary.done, summary.failed, summary.exit_code) == (8, 8, 0, 0)
    got = records(tmp_path / "out")
    assert sorted(r["index"] for r in got) == list(range(8))
    for r in got:
        assert r["overrides"] == jobs[r["index"]] and r["status"] == "done" and r["worker"] == "local-0"
        assert r["seconds"] > 0 and r["files"] == [f"{r['job']}/cat_00001.png"]
        assert r["manifest"]["samplers"]["sample"]["seed"] == jobs[r["index"]]["sample.seed"]
    assert all(np.array_equal(a, b) for a, b in zip(batch_images(tmp_path / "out"), reference))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no partial folder left


def test_local_workers_give_the_same_images(setup, tmp_path):
    workflow, sweep, _, reference = setup
    summary = run_batch(batch(workflow, sweep, tmp_path / "out", workers=2, threads=1))
    assert (summary.done, summary.exit_code) == (8, 0)
    assert {r["worker"] for r in records(tmp_path / "out")} == {"local-0", "local-1"}  # both worked
    assert all(np.array_equal(a, b) for a, b in zip(batch_images(tmp_path / "out"), reference))


def test_workers_share_a_disk_cache_folder(setup, tmp_path):
    workflow, sweep, _, reference = setup
    cache = {"cache_dir": str(tmp_path / "cache")}
    first = run_batch(Batch(workflow=workflow, sweeps=[str(sweep)], out=tmp_path / "one", progress=False,
                            workers=2, threads=1, engine_options=cache))
    second = run_batch(Batch(workflow=workflow, sweeps=[str(sweep)], out=tmp_path / "two", progress=False,
                             workers=2, threads=1, engine_options=cache))  # new worker processes
    assert first.done == second.done == 8
    assert all(r["nodes"]["ran"] >= 3 for r in records(tmp_path / "one"))  # sampler, decoder, SaveImage at least
    # in new processes only SaveImage (it writes into its job's own folder) ran again: the decoded image came
    # from the shared disk cache, and nothing before it was needed
    assert all(r["nodes"] == {"ran": 1, "cached": 1, "skipped": 6} for r in records(tmp_path / "two"))
    assert all(np.array_equal(a, b) for a, b in zip(batch_images(tmp_path / "two"), reference))


def test_affinity_sends_each_checkpoint_to_the_worker_holding_it(tiny, setup, tmp_path):
    workflow, *_ = setup
    # the folder and the single file are two checkpoints, interleaved in the sweep; with two jobs each, neither
    # worker ever finds more jobs of the other's checkpoint waiting than workers holding it (no help needed)
    sweep = write(tmp_path / "s.json", json.dumps({"grid": {"sample.seed": [1, 2],
                                                           "ckpt.path": [str(tiny.sd15), str(tiny.sd15_file)]}}))
    summary = run_batch(batch(workflow, sweep, tmp_path / "out", workers=2, threads=1))
    assert summary.done == 4
    by_checkpoint: dict[str, set] = {}
    for r in records(tmp_path / "out"):
        by_checkpoint.setdefault(r["overrides"]["ckpt.path"], set()).add(r["worker"])
    assert sorted(map(len, by_checkpoint.values())) == [1, 1]  # each checkpoint loaded by one worker only
    assert by_checkpoint[str(tiny.sd15)] != by_checkpoint[str(tiny.sd15_file)]


def job(key: str, models: tuple = ()) -> Job:
    return Job(index=int(key[1:]), overrides={}, key=key, models=models)


def test_affinity_rules():
    x, y = ("x.ckpt",), ("y.ckpt",)
    queue = Affinity([job("j0", x), job("j1", x), job("j2", x), job("j3", y)], ["w0", "w1"])
    assert [(w, j.key) for w, j in queue.take(["w0", "w1"])] == [("w0", "j0"), ("w1", "j3")]  # spread out
    assert [(w, j.key) for w, j in queue.take(["w1"])] == [("w1", "j1")]  # 2 x-jobs wait for 1 x-worker: help
    assert [(w, j.key) for w, j in queue.take(["w0"])] == [("w0", "j2")]  # its own
    queue = Affinity([job("j0", x), job("j1", y)], ["w0", "w1"])
    queue.holds["w0"].add("y.ckpt")
    queue.holds["w1"].add("x.ckpt")
    assert [(w, j.key) for w, j in queue.take(["w0", "w1"])] == [("w0", "j1"), ("w1", "j0")]
    queue = Affinity([job("j0", x)], ["w0", "w1"])
    queue.holds["w0"].add("x.ckpt")
    assert queue.take(["w1"]) == []  # one x-job, and w0 will be free for it without loading anything


class FlakyPool:
    """A pool whose worker w1 dies: dispatch must retry its jobs on w0."""

    workers = ["w0", "w1"]

    def __init__(self):
        self.runs: list[tuple[str, str]] = []

    def submit(self, worker, task, job):
        future: cf.Future = cf.Future()
        self.runs.append((worker, job.key))
        if worker == "w1":
            future.set_exception(BrokenPipeError("worker died"))
        else:
            future.set_result({"status": "done", "worker": worker, "seconds": 0.0, "files": []})
        return future

    def lost(self, exc):
        return isinstance(exc, BrokenPipeError)


def test_a_dead_workers_job_runs_again_on_another():
    pool, outcomes = FlakyPool(), {}
    keys = ["j0", "j1", "j2", "j3"]
    assert dispatch(pool, [job(k) for k in keys], lambda j: None, lambda j, o: outcomes.setdefault(j.key, o))
    assert {k: (o["status"], o["worker"]) for k, o in outcomes.items()} == {k: ("done", "w0") for k in keys}
    # two jobs were in flight on w1 (two per worker) when it died: both ran again on w0
    assert sorted(k for w, k in pool.runs if w == "w1") == ["j1", "j3"]
    assert [outcomes[k]["attempts"] for k in keys] == [1, 2, 1, 2]


def test_a_failing_job_is_recorded_and_the_rest_go_on(setup, tmp_path):
    workflow, *_ = setup
    photos = photo_folder(tmp_path / "photos")
    (photos / "broken.png").write_bytes(b"not a png at all")
    summary = run_batch(Batch(workflow=workflow, sweeps=[str(photos)], bind="photo.path", out=tmp_path / "out",
                              progress=False, engine_options={"cache_dir": False}))
    assert (summary.done, summary.failed, summary.exit_code) == (2, 1, 1)
    got = {Path(r["overrides"]["photo.path"]).name: r for r in records(tmp_path / "out")}
    assert got["broken.png"]["status"] == "failed" and got["broken.png"]["files"] == []
    assert "node 'photo' (LoadImage)" in got["broken.png"]["error"]
    assert not (tmp_path / "out" / got["broken.png"]["job"]).exists()
    assert all(got[n]["status"] == "done" for n in ("astronaut_96.png", "chelsea_128.png"))
    # the photos went in: the two results differ
    assert not np.array_equal(*[pixels(tmp_path / "out" / got[n]["files"][0]) for n in ("astronaut_96.png",
                                                                                         "chelsea_128.png")])


def test_every_invalid_job_is_reported_before_anything_runs(setup, tmp_path):
    workflow, *_ = setup
    sweep = write(tmp_path / "s.jsonl", '{"sample.seed": 1}\n{"sample.steps": -2}\n{"sample.strength": 7, '
                                        '"nope.x": 1}\n{"sample.seed": 1}\n')
    with pytest.raises(BatchInvalid) as info:
        run_batch(batch(workflow, sweep, tmp_path / "out"))
    text = str(info.value)
    assert "job 1 (sample.steps=-2): node 'sample' (Sampler): param 'steps'" in text
    assert "job 2" in text and "param 'strength'" in text and "'nope'" in text
    assert "job 3 (sample.seed=1): the same as job 0" in text
    assert not (tmp_path / "out").exists()  # nothing ran


def test_resume_runs_only_the_missing_jobs_and_a_changed_workflow_reruns(setup, tmp_path):
    workflow, sweep, _, reference = setup
    copy = tmp_path / "img2img.json"
    copy.write_text(workflow.read_text())
    out = tmp_path / "out"
    from nodegraph.context import InterruptFlag

    flag = InterruptFlag()
    with torch_threads(1):
        first = run_batch(batch(copy, sweep, out), interrupt=flag, pool=InProcessPool({"cache_dir": False}, flag),
                          on_outcome=lambda j, r: flag.set() if len(records(out)) == 3 else None)
    assert first.interrupted and first.exit_code == 130 and first.done == 3
    with pytest.raises(Exception, match="pass --resume"):
        run_batch(batch(copy, sweep, out))
    with torch_threads(1):
        second = run_batch(batch(copy, sweep, out, resume=True))
    assert (second.skipped, second.done, second.exit_code) == (3, 5, 0)
    assert len(records(out)) == 8 and len({r["key"] for r in records(out)}) == 8  # nothing ran twice
    assert all(np.array_equal(a, b) for a, b in zip(batch_images(out), reference))
    assert run_batch(batch(copy, sweep, out, resume=True)).skipped == 8
    data = json.loads(copy.read_text())
    data["nodes"]["sample"]["params"]["strength"] = 0.5
    copy.write_text(json.dumps(data))
    changed = run_batch(batch(copy, sweep, out, resume=True))
    assert (changed.skipped, changed.done) == (0, 8)  # new keys: nothing of the old workflow counts


# -------------------------------------------------------------------------------------------------- CLI

def cli(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nodegraph.cli", "batch", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, **kwargs)


def test_cli_exit_codes_and_ctrl_c_then_resume(setup, tmp_path):
    workflow, *_ = setup
    bad = cli(workflow, "--sweep", write(tmp_path / "bad.json", '{"grid": {"sample.steps": [0, 2]}}'),
              "--out", tmp_path / "bad", "--no-cache")
    _, err = bad.communicate(timeout=300)
    assert bad.returncode == 2 and "job 0 (sample.steps=0): node 'sample' (Sampler): param 'steps'" in err
    assert "Traceback" not in err

    sweep = write(tmp_path / "many.json", json.dumps({"grid": {"sample.seed": list(range(40))}}))
    out = tmp_path / "out"
    run = cli(workflow, "--sweep", sweep, "--out", out, "--no-cache", "--threads", "1")
    wait_for_records(run, out, 2)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    done = records(out)
    assert 2 <= len(done) < 40
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the job cut short left nothing

    again = cli(workflow, "--sweep", sweep, "--out", out, "--no-cache", "--resume", "--json")
    report, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    summary = json.loads(report)
    assert summary["skipped"] == len(done) and summary["done"] == 40 - len(done) and summary["total"] == 40
    assert sorted(r["index"] for r in records(out)) == list(range(40))


def test_a_second_batch_into_a_folder_a_running_batch_uses_is_refused(setup, tmp_path):
    """Two batches in one folder would clear each other's running job folders and run every job twice."""
    workflow, *_ = setup
    sweep = write(tmp_path / "many.json", json.dumps({"grid": {"sample.seed": list(range(16))}}))
    out = tmp_path / "out"
    first = cli(workflow, "--sweep", sweep, "--out", out, "--no-cache", "--threads", "1", "--set", "sample.steps=100")
    try:
        wait_for_records(first, out, 2)
        second = cli(workflow, "--sweep", sweep, "--out", out, "--no-cache", "--threads", "1", "--resume",
                     "--set", "sample.steps=100")
        _, refused = second.communicate(timeout=300)
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2 and "another batch" in refused and "Traceback" not in refused, refused[-2000:]
    assert sorted(r["index"] for r in records(out)) == list(range(16))  # each job once, all done
    assert all(r["status"] == "done" for r in records(out))
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes in /proc")
def test_worker_processes_end_with_a_killed_batch(setup, tmp_path):
    """Left running, they would go on writing into job folders that a resumed batch has made anew."""
    workflow, *_ = setup
    sweep = write(tmp_path / "many.json", json.dumps({"grid": {"sample.seed": list(range(12))}}))
    out = tmp_path / "out"
    run = cli(workflow, "--sweep", sweep, "--out", out, "--no-cache", "--workers", "2", "--threads", "1",
              "--set", "sample.steps=200")
    workers = []
    try:
        wait_for_records(run, out, 1)
        workers = [pid for pid in children(run.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2
        run.kill()
        run.wait(timeout=60)  # (its pipes stay open while a worker lives)
        wait = time.time() + 20
        while time.time() < wait and any(Path(f"/proc/{pid}").exists() for pid in workers):
            time.sleep(0.1)
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert alive == []


def test_usage_errors_exit_2_before_anything_loads(setup, tmp_path, monkeypatch):
    from nodegraph.cli import main

    workflow, sweep, *_ = setup
    out = tmp_path / "out"
    assert main(["batch", str(workflow), "--sweep", str(sweep), "--out", str(out), "--shared-out"]) == 2
    assert main(["batch", str(workflow), "--sweep", str(sweep), "--out", str(out), "--workers", "0"]) == 2
    assert main(["batch", str(workflow), "--sweep", str(sweep), "--out", str(out), "--bind", "photo.path"]) == 2
    assert main(["batch", str(workflow), "--out", str(out)]) == 2  # --sweep is required
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    from nodegraph.batch.ray_pool import import_ray
    from nodegraph.errors import NodegraphError

    with pytest.raises(NodegraphError, match=r'pip install "nodegraph\[ray\]"'):
        import_ray()
    assert not out.exists()
