"""The ``nodegraph serve`` command line (the CLI adds these to its own shared options)."""
from __future__ import annotations

import argparse
from pathlib import Path

SERVED_MAX_NODES = 1000  # a prompt sent by someone else (ComfyUI workflows have tens of nodes)


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1", metavar="ADDRESS", help="address to bind (default 127.0.0.1: "
                   "this machine only)")
    p.add_argument("--port", type=int, default=8188, help="port (default 8188, as ComfyUI)")
    p.add_argument("--input", default="input", metavar="DIR", help="folder prompts read images from and uploads go "
                   "to (default ./input)")
    p.add_argument("--output", default="output", metavar="DIR", help="folder prompts write to (default ./output)")
    p.add_argument("--temp", metavar="DIR", help="folder for previews (default: temp/ beside the output folder)")
    p.add_argument("--allow-download", action="store_true", help="let prompts name hub models (default: refused)")
    p.add_argument("--max-queue", type=int, default=100, metavar="N", help="most prompts waiting (default 100)")
    p.add_argument("--max-history", type=int, default=10_000, metavar="N", help="finished prompts kept for "
                   "/history (default 10000, as ComfyUI)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS", help="run prompts on Ray actors, "
                   "one per GPU: 'auto' joins the running cluster, no address starts a local one (pip install "
                   "'nodegraph[ray]'; docs/server.md)")
    p.add_argument("--workers", type=int, metavar="N", help="with --ray: actors (default one per GPU, else one)")
    p.add_argument("--max-upload", type=int, default=100 * 1024**2, metavar="BYTES",
                   help="largest request body (default 100 MiB)")


def run(args: argparse.Namespace) -> tuple[int, None]:
    from .app import ServerConfig, serve

    config = ServerConfig(
        listen=args.listen, port=args.port, models=[Path(m) for m in args.models], input=Path(args.input),
        output=Path(args.output), temp=Path(args.temp) if args.temp else None,
        cache_dir=args.cache_dir, cache_size=args.cache_size, allow_download=args.allow_download,
        max_queue=args.max_queue, max_upload=args.max_upload, max_history=args.max_history, plugin_dirs=args.plugins,
        model_paths=Path(args.model_paths) if args.model_paths else None,
        max_nodes=args.max_nodes or SERVED_MAX_NODES, max_pixels=args.max_pixels or 2**25,
        ray=args.ray is not None, ray_address=args.ray or None, workers=args.workers)
    serve(config)
    return 0, None  # the CLI's (exit status, --json document)
