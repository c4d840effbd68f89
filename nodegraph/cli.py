"""`nodegraph run | validate | nodes | schema` (DESIGN §4).

Exit status: 0 success, 1 a node failed at run time, 2 invalid workflow or usage,
130 interrupted. User errors print one line each, never a traceback (unless --debug).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from typing import Any, Iterator

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    pass


def parse_set(items: list[str]) -> dict[str, Any]:
    """NODE.PARAM=VALUE pairs; values parse as JSON where they can, else stay strings."""
    overrides: dict[str, Any] = {}
    for item in items:
        target, eq, text = item.partition("=")
        if not eq or "." not in target:
            raise UsageError(f"--set '{item}': write NODE.PARAM=VALUE, e.g. --set sampler.seed=7")
        try:
            overrides[target] = json.loads(text)
        except json.JSONDecodeError:
            overrides[target] = text
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodegraph", description="Run and check diffusion node-graph workflows.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def plugins(p: argparse.ArgumentParser) -> None:
        p.add_argument("--plugins", action="append", default=[], metavar="DIR",
                       help="a folder of plugin modules (repeatable; also $NODEGRAPH_PLUGINS)")

    run = sub.add_parser("run", help="run a workflow (JSON, or a PNG saved by SaveImage)")
    run.add_argument("workflow")
    run.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE", help="override a param")
    run.add_argument("--out", default="output", metavar="DIR", help="folder for output files (default: ./output)")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    run.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    cache = run.add_mutually_exclusive_group()
    cache.add_argument("--cache-dir", metavar="DIR", help="persistent cache folder (also $NODEGRAPH_CACHE_DIR)")
    cache.add_argument("--no-cache", action="store_true", help="no disk cache, even if $NODEGRAPH_CACHE_DIR is set")
    run.add_argument("--target", action="append", default=[], metavar="NODE", help="run only this node and its inputs")
    run.add_argument("--json", action="store_true", help="print one machine-readable result")
    plugins(run)

    validate = sub.add_parser("validate", help="check a workflow; every error at once")
    validate.add_argument("workflow")
    validate.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE")
    validate.add_argument("--json", action="store_true")
    plugins(validate)

    nodes = sub.add_parser("nodes", help="list node types with their inputs, params and outputs")
    fmt = nodes.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--markdown", action="store_true", help="the node reference (docs/nodes.md)")
    plugins(nodes)

    schema = sub.add_parser("schema", help="print the JSON Schema of workflow files")
    plugins(schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        return _dispatch(args)
    except UsageError as exc:
        print(f"nodegraph: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as exc:
        from .errors import NodegraphError

        if args.debug or not isinstance(exc, NodegraphError):
            raise
        print(f"nodegraph: {exc}", file=sys.stderr)
        return EXIT_INVALID


def _dispatch(args: argparse.Namespace) -> int:
    from .registry import default_registry

    registry = default_registry(args.plugins)
    for problem in registry.problems:
        print(f"nodegraph: warning: {problem}", file=sys.stderr)
    if args.command == "nodes":
        return _nodes(registry, args)
    if args.command == "schema":
        from .schema import workflow_schema

        print(json.dumps(workflow_schema(registry), indent=2))
        return EXIT_OK
    if args.command == "validate":
        return _validate(registry, args)
    return _run(registry, args)


def _nodes(registry, args) -> int:
    if args.json:
        print(json.dumps([d.to_dict() for d in registry.sorted_types()], indent=2))
    elif args.markdown:
        from .docs import nodes_markdown

        print(nodes_markdown(registry), end="")
    else:
        from .docs import nodes_text

        print(nodes_text(registry), end="")
    return EXIT_OK


def _print_invalid(exc, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"ok": False, "exit": EXIT_INVALID, "errors": [i.to_dict() for i in exc.issues]}, indent=2))
    else:
        print(str(exc), file=sys.stderr)
    return EXIT_INVALID


def _validate(registry, args) -> int:
    from .api import Engine
    from .errors import WorkflowInvalid

    engine = Engine(registry=registry)
    try:
        graph = engine.compile(args.workflow, parse_set(args.set))
    except WorkflowInvalid as exc:
        return _print_invalid(exc, args.json)
    if args.json:
        print(json.dumps({"ok": True, "exit": EXIT_OK, "nodes": len(graph.nodes), "outputs": graph.outputs}))
    else:
        print(f"{args.workflow}: valid ({len(graph.nodes)} nodes, outputs: {', '.join(graph.outputs)})")
    return EXIT_OK


def _run(registry, args) -> int:
    from .api import Engine
    from .context import InterruptFlag
    from .errors import Interrupted, NodeFailed, WorkflowInvalid

    engine = Engine(registry=registry, cache_dir="" if args.no_cache else args.cache_dir)  # "": no disk cache
    flag = InterruptFlag()
    bars = ProgressBars(enabled=not args.json)
    try:
        with _interrupt_on_sigint(flag):
            result = engine.run(args.workflow, overrides=parse_set(args.set), out_dir=args.out,
                                targets=args.target or None, device=args.device, dtype=args.dtype,
                                progress=bars, interrupt=flag)
    except WorkflowInvalid as exc:
        return _print_invalid(exc, args.json)
    except NodeFailed as exc:
        if args.debug:
            raise
        return _report_failure(exc.result, str(exc), EXIT_FAILED, args.json)
    except Interrupted as exc:
        return _report_failure(exc.result, f"{exc}; nothing half-written was kept", EXIT_INTERRUPTED, args.json)
    finally:
        bars.close()
    if args.json:
        print(json.dumps({**result.to_dict(), "exit": EXIT_OK}, indent=2))
    else:
        counts = {s: sum(1 for v in result.status.values() if v == s) for s in ("ran", "cached", "skipped")}
        print(f"done in {result.seconds:.2f}s: {counts['ran']} ran, {counts['cached']} cached, "
              f"{counts['skipped']} not needed", file=sys.stderr)
        for path in result.files:
            print(path)
    return EXIT_OK


def _report_failure(result, message: str, code: int, as_json: bool) -> int:
    if as_json:
        body = result.to_dict() if result is not None else {}
        print(json.dumps({**body, "ok": False, "exit": code, "error": message}, indent=2))
    else:
        print(f"nodegraph: {message}", file=sys.stderr)
    return code


@contextlib.contextmanager
def _interrupt_on_sigint(flag) -> Iterator[None]:
    """First Ctrl-C: stop at the next node or sampler step. Second: stop now."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        print("\nnodegraph: stopping after the current step (Ctrl-C again to stop at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class ProgressBars:
    """One progress bar per reporting node (a sampler), with steps/s, on stderr."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(event.node_id)
        if bar is None or bar.total != event.total:
            if bar is not None:
                bar.close()
            bar = self.bars[event.node_id] = tqdm(total=event.total, desc=f"{event.node_id} ({event.node_type})",
                                                  unit="step", file=sys.stderr, leave=True)
        bar.update(event.step - bar.n)
        if event.step >= event.total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


if __name__ == "__main__":
    sys.exit(main())
