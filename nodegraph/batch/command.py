"""`nodegraph batch WORKFLOW --sweep SWEEP [--out DIR] [--resume] [--workers N] [--ray [ADDRESS]]`.

Exit status: 0 every job done, 1 a job failed (the others still ran), 2 a bad sweep, workflow or usage
(nothing ran), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("batch", help="run a workflow once per job of a sweep (docs/batch.md)")
    p.add_argument("workflow")
    p.add_argument("--sweep", action="append", required=True, metavar="SWEEP",
                   help="a .json/.yaml file of grid or zip axes, a .jsonl or .csv file of one job per line, or a "
                   "folder of images (with --bind); repeated sweeps combine as their product")
    p.add_argument("--bind", metavar="NODE.PARAM", help="the param a folder sweep's images go to, e.g. load.path")
    p.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE", help="override for every job")
    p.add_argument("--out", default="output", metavar="DIR", help="one folder per job, and results.jsonl "
                   "(default: ./output)")
    p.add_argument("--resume", action="store_true", help="skip the jobs results.jsonl records as done")
    p.add_argument("--workers", type=int, metavar="N", help="workers, each holding its models (default: one per "
                   "visible GPU, else one)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads per worker (default: the cores shared "
                   "out)")
    p.add_argument("--batch-size", type=int, default=1, metavar="K", help="sample up to K jobs that differ only "
                   "in a sampler's seed and prompt texts as one batch on the device (default 1: job by job)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help="run on a pool of Ray actors: 'auto' "
                   "joins a running cluster, ray://HOST:PORT a remote one, none starts a local one")
    p.add_argument("--shared-out", action="store_true", help="with --ray: actors write into --out themselves "
                   "(a folder every node sees) instead of sending the files back")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto; each worker its own GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--cache-dir", metavar="DIR", help="disk cache folder, which workers may share (a shared "
                   "folder for a cluster)")
    p.add_argument("--cache-size", metavar="SIZE", help="disk cache limit, e.g. 10GiB")
    p.add_argument("--no-cache", action="store_true", help="no disk cache")
    p.add_argument("--models", action="append", default=[], metavar="DIR", help="a models root (repeatable)")
    p.add_argument("--model-paths", metavar="FILE", help="model paths file (extra_model_paths.yaml format)")
    p.add_argument("--plugins", action="append", default=[], metavar="DIR", help="a folder of plugin modules")
    p.add_argument("--json", action="store_true", help="print one machine-readable summary")


def run_command(args: argparse.Namespace, flag) -> tuple[int, dict]:
    from ..cli import UsageError, parse_set
    from .runner import Batch, run_batch

    for name in ("workers", "threads", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.shared_out and args.ray is None:
        raise UsageError("--shared-out goes with --ray")
    options = {"cache_dir": False if args.no_cache else args.cache_dir, "cache_size": args.cache_size,
               "models": [str(Path(m).resolve()) for m in args.models],
               "model_paths": str(Path(args.model_paths).resolve()) if args.model_paths else None,
               "plugin_dirs": [str(Path(p).resolve()) for p in args.plugins] or None}
    batch = Batch(workflow=Path(args.workflow), sweeps=args.sweep, out=Path(args.out), bind=args.bind,
                  base=parse_set(args.set), resume=args.resume, workers=args.workers, threads=args.threads,
                  ray=args.ray is not None, ray_address=args.ray or None, shared_out=args.shared_out,
                  batch_size=args.batch_size,                  device=args.device, dtype=args.dtype, engine_options=options, progress=not args.json)
    summary = run_batch(batch, interrupt=flag)
    line = (f"{summary.total} jobs: {summary.done} done, {summary.failed} failed, {summary.skipped} done before"
            f"{', interrupted' if summary.interrupted else ''} ({summary.seconds:.1f}s); {batch.out / 'results.jsonl'}")
    print(line, file=sys.stderr)
    return summary.exit_code, {"total": summary.total, "done": summary.done, "failed": summary.failed,
                               "skipped": summary.skipped, "interrupted": summary.interrupted,
                               "seconds": round(summary.seconds, 3), "results": str(batch.out / "results.jsonl")}
