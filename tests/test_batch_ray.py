"""nodegraph batch on a local Ray cluster: two actors, tiny models, photos through the object store."""
from __future__ import annotations

import json

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from nodegraph.batch import Batch, run_batch  # noqa: E402
from nodegraph.batch.ray_pool import RayPool  # noqa: E402
from nodegraph.context import InterruptFlag  # noqa: E402

from .batch_helpers import batch_images, img2img_workflow, one_by_one, photo_folder  # noqa: E402


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    """2 photos x 4 seeds = 8 jobs, and the 8 images of running them one by one."""
    folder = tmp_path_factory.mktemp("ray")
    workflow = img2img_workflow(folder, tiny.sd15)
    photos = photo_folder(folder / "photos")
    seeds = folder / "seeds.json"
    seeds.write_text(json.dumps({"grid": {"sample.seed": [1, 2, 3, 4]}}))
    jobs = [{"photo.path": str((photos / p).resolve()), "sample.seed": s}
            for p in ("astronaut_96.png", "chelsea_128.png") for s in (1, 2, 3, 4)]
    return workflow, photos, seeds, one_by_one(workflow, jobs, folder / "reference")


def batch(setup, out, **options) -> Batch:
    workflow, photos, seeds, _ = setup
    return Batch(workflow=workflow, sweeps=[str(photos), str(seeds)], bind="photo.path", out=out, ray=True,
                 progress=False, engine_options={"cache_dir": False}, **options)


def pool() -> RayPool:
    return RayPool({"cache_dir": False}, workers=2, threads=1)


def records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_eight_jobs_on_two_actors_match_one_by_one_runs(ray_cluster, setup, tmp_path):
    actors = pool()
    try:
        summary = run_batch(batch(setup, tmp_path / "out"), pool=actors)  # files sent back to the driver
    finally:
        actors.close()
    # as the CLI does it: the batch makes its own pool (on the Ray this process started) and closes it
    shared = run_batch(batch(setup, tmp_path / "shared", shared_out=True, workers=2, threads=1))
    assert (summary.done, summary.failed, summary.exit_code) == (8, 0, 0) and shared.done == 8
    assert {r["worker"] for r in records(tmp_path / "out")} == {"ray-0", "ray-1"}
    reference = setup[3]
    assert all(np.array_equal(a, b) for a, b in zip(batch_images(tmp_path / "out"), reference))
    assert all(np.array_equal(a, b) for a, b in zip(batch_images(tmp_path / "shared"), reference))


def test_killing_an_actor_mid_sweep_still_completes_every_job(ray_cluster, setup, tmp_path):
    actors, killed = pool(), []

    def kill_the_other(job, record):
        if not killed:  # the other actor is running a job now (or loading for it): that job must run again
            victim = "ray-1" if record["worker"] == "ray-0" else "ray-0"
            killed.append((victim, len(records(tmp_path / "out"))))
            ray.kill(actors.actors[victim])

    try:
        summary = run_batch(batch(setup, tmp_path / "out"), pool=actors, on_outcome=kill_the_other)
    finally:
        actors.close()
    assert (summary.done, summary.failed, summary.exit_code) == (8, 0, 0)
    victim, seen = killed[0]
    got = records(tmp_path / "out")
    assert sorted(r["index"] for r in got) == list(range(8))
    # nothing more from the dead actor but what it had finished as it was killed (two jobs in flight at most)
    assert sum(r["worker"] == victim for r in got[seen:]) <= 2
    assert any(r["attempts"] == 2 for r in got)  # its job was retried on the other
    assert all(np.array_equal(a, b) for a, b in zip(batch_images(tmp_path / "out"), setup[3]))


def test_resume_after_an_interrupt_runs_only_the_missing_jobs(ray_cluster, setup, tmp_path):
    actors, flag = pool(), InterruptFlag()
    out = tmp_path / "out"
    try:
        first = run_batch(batch(setup, out), pool=actors, interrupt=flag,
                          on_outcome=lambda j, r: flag.set() if len(records(out)) >= 3 else None)
        assert first.interrupted and first.exit_code == 130
        done_first = {r["key"] for r in records(out)}
        flag.clear()
        second = run_batch(batch(setup, out, resume=True), pool=actors, interrupt=flag)
    finally:
        actors.close()
    assert 3 <= len(done_first) < 8
    assert (second.skipped, second.done, second.exit_code) == (len(done_first), 8 - len(done_first), 0)
    got = records(out)
    assert len(got) == 8 and len({r["key"] for r in got}) == 8  # no job ran twice
    assert all(np.array_equal(a, b) for a, b in zip(batch_images(out), setup[3]))


def test_more_workers_than_the_cluster_can_hold_is_an_error_not_a_hang(ray_cluster, setup, tmp_path):
    """Each actor takes one CPU (one GPU where there are GPUs): a third actor on 2 CPUs would wait forever."""
    import threading

    from nodegraph.errors import NodegraphError

    seen = []

    def make():
        try:
            seen.append(RayPool({"cache_dir": False}, workers=3, threads=1))
        except NodegraphError as exc:
            seen.append(exc)

    thread = threading.Thread(target=make, daemon=True)
    thread.start()
    thread.join(90)
    assert not thread.is_alive(), "the pool waited for an actor the cluster has no room for"
    assert isinstance(seen[0], NodegraphError) and "--workers 3" in str(seen[0]) and "2 CPUs" in str(seen[0])
