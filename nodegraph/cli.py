"""`nodegraph run | validate | nodes | schema | models | cache` (docs/design.md §3.2).

Exit status: 0 success, 1 a node failed at run time, 2 invalid workflow or usage,
130 interrupted (Ctrl-C or SIGTERM). User errors print one line each, never a traceback
(unless --debug). With --json, exactly one JSON document goes to stdout whatever
happens; everything else (progress, warnings, what nodes print) goes to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import signal
import sys
import threading
import warnings
from typing import Any, Iterator

from .context import InterruptFlag

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting, so --json can still answer, and takes
    no abbreviations (``--js`` must not silently mean ``--json``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def parse_set(items: list[str]) -> dict[str, Any]:
    """NODE.PARAM=VALUE pairs; values parse as JSON where they can, else stay strings."""
    from .errors import short_repr

    overrides: dict[str, Any] = {}
    for item in items:
        target, eq, text = item.partition("=")
        if not eq or "." not in target:
            raise UsageError(f"--set {short_repr(item)}: write NODE.PARAM=VALUE, e.g. --set sampler.seed=7")
        try:
            overrides[target] = json.loads(text)
        except json.JSONDecodeError:
            overrides[target] = text
        except (ValueError, RecursionError):  # an integer of thousands of digits, nesting past Python's limit
            raise UsageError(f"--set {short_repr(target)}: the value is too long or too deeply nested to be a "
                             "param") from None
    return overrides


def split_set(items: list[str]) -> tuple[dict[str, Any], list]:
    """--set values, and a bad_override issue for each that is not NODE.PARAM=VALUE, to report with the
    workflow's own problems rather than alone."""
    from .errors import Issue, short_repr

    good = [item for item in items if "=" in item and "." in item.partition("=")[0]]
    bad = [Issue("bad_override", f"--set {short_repr(item)}: write NODE.PARAM=VALUE, e.g. --set sampler.seed=7")
           for item in items if item not in good]
    return parse_set(good), bad


def _with_bad_overrides(engine, args, overrides: dict, bad: list) -> tuple[int, dict] | None:
    """With malformed --set values: every problem at once (theirs and the workflow's), exit 2."""
    from .errors import WorkflowInvalid

    if not bad:
        return None
    try:
        engine.compile(args.workflow, overrides, getattr(args, "target", None) or None)
    except WorkflowInvalid as exc:
        return _invalid(WorkflowInvalid([*bad, *exc.issues]))
    return _invalid(WorkflowInvalid(bad))


def _folder_name(text: str) -> str:
    # an empty path would silently name the current folder (a shell variable that is not set, say)
    if not text:
        raise argparse.ArgumentTypeError("an empty path names no folder; give a models root, e.g. ~/ComfyUI/models")
    return text


def build_parser() -> argparse.ArgumentParser:
    from .versions import version

    parser = _Parser(prog="nodegraph", description="Run and check diffusion node-graph workflows.")
    parser.add_argument("--version", action="version", version=f"nodegraph {version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    def plugins(p: argparse.ArgumentParser) -> None:
        p.add_argument("--plugins", action="append", default=[], metavar="DIR",
                       help="a folder of plugin modules (repeatable; also $NODEGRAPH_PLUGINS)")

    def cache_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cache-dir", metavar="DIR", help="disk cache folder (default: $NODEGRAPH_CACHE_DIR, else the "
                       "user's cache folder)")
        p.add_argument("--cache-size", metavar="SIZE", help="disk cache limit, e.g. 10GiB (default; also "
                       "$NODEGRAPH_CACHE_SIZE); least recently used results go first")

    def models(p: argparse.ArgumentParser) -> None:
        p.add_argument("--models", action="append", default=[], metavar="DIR", type=_folder_name,
                       help="a models root in ComfyUI's layout (checkpoints/, vae/, ...), searched for names in file "
                       "params (repeatable; also $NODEGRAPH_MODELS)")
        p.add_argument("--model-paths", metavar="FILE", help="model paths file (ComfyUI's extra_model_paths.yaml "
                       "format; default: $NODEGRAPH_MODEL_PATHS, else model_paths.yaml in the user's config folder)")

    def limits(p: argparse.ArgumentParser, max_nodes: int = 100_000) -> None:
        p.add_argument("--max-nodes", type=int, metavar="N", help=f"most nodes after group expansion (default "
                                                                  f"{max_nodes})")
        p.add_argument("--max-pixels", type=int, metavar="N", help="most pixels (width x height x batch) a node may "
                       "decode or create (default 33554432)")

    run = sub.add_parser("run", help="run a workflow (JSON, or a PNG saved by SaveImage)")
    run.add_argument("workflow")
    run.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE", help="override a param")
    run.add_argument("--out", default="output", metavar="DIR", help="folder for output files (default: ./output)")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    run.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    cache_options(run)
    run.add_argument("--no-cache", action="store_true", help="no disk cache for this run")
    run.add_argument("--target", action="append", default=[], metavar="NODE", help="run only this node and its inputs")
    run.add_argument("--json", action="store_true", help="print one machine-readable result")
    run.add_argument("--vram", choices=["auto", "high", "normal", "low", "sequential"], help="how models share the "
                     "GPU: auto (default: normal within 90%% of it), high (all stay), normal (least recently used "
                     "leave past the budget), low (only the one in use), sequential (layer by layer)")
    run.add_argument("--vram-budget", metavar="SIZE", help="GPU memory the models may take, e.g. 12GiB")
    run.add_argument("--compile", action="store_true", help="torch.compile each UNet and ControlNet once (GPU)")
    run.add_argument("--channels-last", action="store_true", help="UNets and ControlNets in the channels-last format (GPU)")
    limits(run)
    models(run)
    plugins(run)

    validate = sub.add_parser("validate", help="check a workflow; every error at once")
    validate.add_argument("workflow")
    validate.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE")
    validate.add_argument("--json", action="store_true")
    limits(validate)
    models(validate)
    plugins(validate)

    nodes = sub.add_parser("nodes", help="list node types with their inputs, params and outputs")
    nodes.add_argument("type", nargs="?", help="show only this node type")
    fmt = nodes.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--markdown", action="store_true", help="the node reference (docs/nodes.md)")
    plugins(nodes)

    schema = sub.add_parser("schema", help="print the JSON Schema of workflow files")
    plugins(schema)

    listing = sub.add_parser("models", help="list the models found in the models roots, per folder")
    listing.add_argument("folder", nargs="?", help="show only this folder (checkpoints, vae, loras, ...)")
    listing.add_argument("--json", action="store_true")
    models(listing)
    plugins(listing)

    serve = sub.add_parser("serve", help="serve ComfyUI's HTTP and websocket API (docs/server.md)")
    from .server.options import SERVED_MAX_NODES, add_options as serve_options
    serve_options(serve)
    cache_options(serve)
    limits(serve, max_nodes=SERVED_MAX_NODES)
    models(serve)
    plugins(serve)

    imports = sub.add_parser("import", help="convert a ComfyUI workflow (API or editor JSON, or a ComfyUI PNG) "
                                            "into a nodegraph workflow")
    imports.add_argument("source")
    imports.add_argument("-o", "--output", default="-", metavar="OUT.json", help="where to write it (default: "
                         "print it)")
    imports.add_argument("--json", action="store_true")

    cache = sub.add_parser("cache", help="the disk cache: info, prune (to its limit) or clear")
    cache.add_argument("action", choices=["info", "prune", "clear"])
    cache_options(cache)
    cache.add_argument("--json", action="store_true")

    from .batch.command import add_parser as add_batch_parser  # nodegraph batch (docs/batch.md)

    add_batch_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    flag = InterruptFlag()
    with _json_stdout(as_json) as emit, _whole_stdout(), _one_line_warnings(), _stop_on_signals(flag):
        code, document = _main(argv, flag)
        failed = _WholeWrites.failure()
        if failed is not None and code == EXIT_OK:  # a print that failed where its error was caught
            code = _error(f"cannot write to standard output: {failed.strerror or failed}", EXIT_FAILED)[0]
        if as_json:  # a listing is a list; every other answer says ok and exit
            try:
                emit(document if isinstance(document, list) else {"ok": code == EXIT_OK, "exit": code,
                                                                    **(document or {})})
            except OSError as exc:  # a full disk or a closed pipe: the document is cut, never a success
                code = _error(f"cannot write to standard output: {exc.strerror or exc}", code or EXIT_FAILED)[0]
    return code


def _main(argv: list[str], flag: "InterruptFlag") -> tuple[int, dict | None]:
    from .errors import NodegraphError

    debug = "--debug" in argv
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help and --version print and exit 0
            return int(exc.code or 0), None
        if args.command is None:
            parser.print_help()
            return EXIT_OK, None
        answer = _dispatch(args, flag)
        if sys.stdout is not None:  # None: started with stdout closed, where print() writes nothing
            sys.stdout.flush()  # what stdout could not take (a full disk) shows here, not lost at exit
        return answer
    except UsageError as exc:
        return _error(f"{exc}", EXIT_INVALID)
    except KeyboardInterrupt as exc:
        return _error(str(exc) or "interrupted", EXIT_INTERRUPTED)
    except NodegraphError as exc:
        if debug:
            raise
        return _error(str(exc), EXIT_INVALID)
    except SystemExit as exc:  # plugin code (a check, say) calling sys.exit(): not a success
        return _error(f"sys.exit({exc.code!r}) was called by plugin code while working; fix or remove it",
                      EXIT_FAILED)
    except Exception as exc:  # a bug, not a user error: the traceback helps whoever reports it
        if isinstance(exc, OSError) and _WholeWrites.failure() is not None:
            return _error(f"cannot write to standard output: {exc.strerror or exc}", EXIT_FAILED)
        if debug:
            raise
        import traceback

        traceback.print_exc(file=sys.stderr)
        return _error(f"internal error: {type(exc).__name__}: {exc}", EXIT_FAILED)


def _error(message: str, code: int) -> tuple[int, dict]:
    print(f"nodegraph: {message}", file=sys.stderr)
    return code, {"error": message}


def _registry(args):
    from .plugins import default_registry

    registry = default_registry(args.plugins)
    fatal = [p for p in registry.problems if p.fatal]
    for problem in registry.problems:
        if not problem.fatal:
            print(f"nodegraph: warning: {problem}", file=sys.stderr)
    if fatal:
        raise UsageError("; ".join(str(p) for p in fatal))
    return registry


def _dispatch(args: argparse.Namespace, flag) -> tuple[int, dict | None]:
    if args.command == "cache":
        return _cache(args)
    if args.command == "serve":
        from .server.options import run as serve
        return serve(args)
    if args.command == "import":
        return _import(args)
    registry = _registry(args)
    if args.command == "batch":
        from .batch.command import run_command

        return run_command(args, flag)
    if args.command == "nodes":
        return _nodes(registry, args)
    if args.command == "schema":
        from .schema import workflow_schema

        print(json.dumps(workflow_schema(registry), indent=2))
        return EXIT_OK, None
    if args.command == "validate":
        return _validate(registry, args)
    if args.command == "models":
        return _models(registry, args)
    return _run(registry, args, flag)


def _nodes(registry, args) -> tuple[int, dict | None]:
    from .docs import nodes_markdown, nodes_text

    definitions = registry.sorted_types()
    if args.type:
        definitions = [d for d in definitions if d.type_name == args.type]
        if not definitions:
            import difflib

            close = difflib.get_close_matches(args.type, list(registry.types), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; run `nodegraph nodes` for the list"
            raise UsageError(f"no node type '{args.type}'{hint}")
    if args.json:
        return EXIT_OK, [d.to_dict() for d in definitions]
    print(nodes_markdown(registry) if args.markdown else nodes_text(definitions), end="")
    return EXIT_OK, None


def _limits(args):
    from .limits import Limits

    given = {k: v for k, v in (("max_nodes", args.max_nodes), ("max_pixels", args.max_pixels)) if v is not None}
    for name, value in given.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    return Limits(**given)


def _invalid(exc) -> tuple[int, dict]:
    print(str(exc), file=sys.stderr)
    return EXIT_INVALID, {"errors": [i.to_dict() for i in exc.issues]}


def _validate(registry, args) -> tuple[int, dict | None]:
    from .api import Engine
    from .errors import WorkflowInvalid

    engine = Engine(registry=registry, cache_dir=False, limits=_limits(args), models=_model_roots(args))
    overrides, bad = split_set(args.set)
    answer = _with_bad_overrides(engine, args, overrides, bad)
    if answer is not None:
        return answer
    try:
        graph = engine.compile(args.workflow, overrides)
    except WorkflowInvalid as exc:
        return _invalid(exc)
    if not args.json:
        print(f"{args.workflow}: valid ({len(graph.nodes)} nodes, outputs: {', '.join(graph.outputs)})")
    return EXIT_OK, {"nodes": len(graph.nodes), "outputs": graph.outputs}


def _import(args) -> tuple[int, dict | None]:
    """ComfyUI workflow in, readable nodegraph workflow out (written whole or not at all)."""
    from pathlib import Path

    from .atomic import write_text_atomic
    from .comfy import NODEGRAPH, detect_format, to_nodegraph
    from .errors import WorkflowInvalid
    from .workflow import load_comfy_document

    try:
        doc = load_comfy_document(args.source)
        if detect_format(doc) == NODEGRAPH:
            raise UsageError(f"{args.source} is not a ComfyUI workflow (API format, editor format or a ComfyUI "
                             "PNG); nodegraph workflows need no import")
        text = json.dumps(to_nodegraph(doc), indent=2) + "\n"
    except WorkflowInvalid as exc:
        return _invalid(exc)
    if args.output == "-":
        if not args.json:
            sys.stdout.write(text)
        return EXIT_OK, {"workflow": json.loads(text)}
    import stat

    target = Path(args.output)
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        return _error(f"cannot write {args.output}: {exc.strerror or exc}", EXIT_FAILED)
    if mode is not None and stat.S_ISDIR(mode):
        raise UsageError(f"-o {args.output} is a folder; name the file to write")
    try:
        if mode is not None and not stat.S_ISREG(mode):
            # a pipe or a device (/dev/stdout, /dev/null): written to; replacing it with a file would break it
            with open(target, "w", encoding="utf-8") as handle:
                handle.write(text)
        else:
            write_text_atomic(target, text)
    except OSError as exc:
        return _error(f"cannot write {args.output}: {exc.strerror or exc}", EXIT_FAILED)
    if not args.json:
        print(f"{args.output}: written from {args.source}", file=sys.stderr)
    return EXIT_OK, {"output": args.output}


def _model_roots(args, warn: bool = True):
    from .model_folders import ModelRoots

    if warn:  # a --models root that is a file (a model given as the root, say) would otherwise go unnoticed
        for problem in ModelRoots.gather(args.models, config=False, environ={}).problems():
            print(f"nodegraph: warning: {problem}", file=sys.stderr)
    return ModelRoots.gather(args.models, args.model_paths)


def _models(registry, args) -> tuple[int, dict | None]:
    from .model_folders import FOLDERS

    roots = _model_roots(args, warn=False)  # listed below, and in --json
    declared = {s.path.folder for d in registry.types.values() for s in d.inputs.values()
                if s.path is not None and s.path.folder}
    folders = [*FOLDERS, *sorted(declared - set(FOLDERS))]
    if args.folder:
        if args.folder not in folders:
            import difflib

            close = difflib.get_close_matches(args.folder, folders, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"the folders are {', '.join(folders)}"
            raise UsageError(f"no models folder '{args.folder}'; {hint}")
        folders = [args.folder]
    listing = roots.listing(folders)
    problems = roots.problems()
    if not args.json:
        for folder, entries in listing.items():
            print(f"{folder}/")
            width = max((len(e.name) for e in entries), default=0)
            for e in entries:
                note = "  (shadowed by an earlier root)" if e.shadowed else ""
                print(f"  {e.name:<{width}}  {_size(e.size):>10}  {e.root.path}{note}")
            if not entries:
                print("  (none)")
        print("roots, in search order:")
        for root in roots.roots:
            print(f"  {root.path}  ({root.origin})")
            for folder, places in (root.folders or {}).items():
                print(f"    {folder}: {', '.join(str(p) for p in places)}")
        if not roots.roots:
            print("  (none: give --models DIR, set $NODEGRAPH_MODELS or write a model_paths.yaml; docs/models.md)")
        for problem in problems:
            print(f"nodegraph: warning: {problem}", file=sys.stderr)
    return EXIT_OK, {"folders": {f: [e.to_dict() for e in entries] for f, entries in listing.items()},
                     "roots": roots.to_dict(), "model_paths": str(roots.config) if roots.config else None,
                     "problems": problems}


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _disk_cache_choice(args):
    if getattr(args, "no_cache", False):
        return False
    return args.cache_dir  # None: the default folder


def _run(registry, args, flag) -> tuple[int, dict | None]:
    from .api import Engine
    from .errors import Interrupted, NodeFailed, WorkflowInvalid

    overrides, bad = split_set(args.set)
    engine = Engine(registry=registry, cache_dir=_disk_cache_choice(args), cache_size=args.cache_size,
                    limits=_limits(args), models=_model_roots(args), vram=args.vram, vram_budget=args.vram_budget,
                    compile=args.compile, channels_last=args.channels_last)
    answer = _with_bad_overrides(engine, args, overrides, bad)
    if answer is not None:
        return answer
    bars = ProgressBars(enabled=not args.json)
    try:
        flag.running = True  # from now on a first Ctrl-C stops at the next step instead of at once
        result = engine.run(args.workflow, overrides=overrides, out_dir=args.out, targets=args.target or None,
                            device=args.device, dtype=args.dtype, progress=bars, interrupt=flag)
    except WorkflowInvalid as exc:
        return _invalid(exc)
    except NodeFailed as exc:
        if args.debug:
            raise
        return _failure(exc.result, str(exc), EXIT_FAILED)
    except (Interrupted, KeyboardInterrupt) as exc:
        return _failure(getattr(exc, "result", None), f"{exc or 'interrupted'}; nothing half-written was kept",
                        EXIT_INTERRUPTED)
    finally:
        bars.close()
    if not args.json:
        counts = {s: sum(1 for v in result.status.values() if v == s) for s in ("ran", "cached", "skipped")}
        print(f"done in {result.seconds:.2f}s: {counts['ran']} ran, {counts['cached']} cached, "
              f"{counts['skipped']} not needed", file=sys.stderr)
        for path in result.files:
            print(path)
    return EXIT_OK, result.to_dict()


def _failure(result, message: str, code: int) -> tuple[int, dict]:
    print(f"nodegraph: {message}", file=sys.stderr)
    body = result.to_dict() if result is not None else {}
    return code, {**body, "ok": False, "error": message}


def _cache(args) -> tuple[int, dict | None]:
    from .cache import DiskCache, default_cache_dir, default_cache_size, parse_size

    folder = args.cache_dir or default_cache_dir()
    if folder is None:
        raise UsageError("the disk cache is off ($NODEGRAPH_CACHE_DIR=off); name a folder with --cache-dir")
    cache = DiskCache(folder, parse_size(args.cache_size) if args.cache_size else default_cache_size())
    if args.action == "prune":
        removed = cache.prune()
        print(f"removed {removed:,} bytes", file=sys.stderr)
    elif args.action == "clear":
        removed = cache.clear()
        print(f"removed {removed:,} files", file=sys.stderr)
    info = cache.info()
    if not args.json:
        print(f"{info['folder']}: {info['entries']:,} results, {info['bytes']:,} bytes of {info['limit_bytes']:,}")
    return EXIT_OK, {"cache": info}


@contextlib.contextmanager
def _json_stdout(enabled: bool) -> Iterator:
    """With --json, file descriptor 1 points at stderr while the command works (so prints from nodes, plugins
    and libraries cannot corrupt the document), and ``emit`` writes the one document to the real stdout."""
    if not enabled:
        yield lambda document: None
        return
    if sys.stdout is None:  # started with stdout closed: there is nowhere to put the document

        def closed(document):
            raise OSError(errno.EBADF, "it is closed")

        yield closed
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield lambda document: _write_all(saved, (json.dumps(document, indent=2, default=str) + "\n").encode())
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _write_all(fd: int, data: bytes) -> None:
    """os.write may take part of the data (a disk filling up); the rest is written, or its error raised."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _WholeWrites(io.RawIOBase):
    """File descriptor 1 under sys.stdout while a command works. Python's own stdout takes a partial write
    (a disk filling up) as done and drops the rest, so a cut listing would exit 0; here every write is whole
    or raises, and the first failure is kept (later writes are dropped, as the command already failed)."""

    current: "_WholeWrites | None" = None

    def __init__(self, fd: int):
        super().__init__()
        self.fd, self.failed = fd, None

    @classmethod
    def failure(cls) -> OSError | None:
        return cls.current.failed if cls.current is not None else None

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, data) -> int:
        if self.failed is None:
            try:
                _write_all(self.fd, bytes(data))
            except OSError as exc:
                self.failed = exc
                raise
        return len(data)


@contextlib.contextmanager
def _whole_stdout() -> Iterator[None]:
    stream = sys.stdout
    try:
        fd = stream.fileno() if stream is sys.__stdout__ else None
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is None:  # stdout already replaced (a test's capture, a caller's redirection): left as it is
        yield
        return
    stream.flush()
    raw = _WholeWrites.current = _WholeWrites(fd)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(raw), encoding=stream.encoding, errors=stream.errors,
                                  line_buffering=stream.line_buffering)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sys.stdout.flush()
        sys.stdout, _WholeWrites.current = stream, None


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings as one line each ("nodegraph: warning: node 'pos' (CLIPEncode): ..."), not Python's
    file:line report with a source line."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"nodegraph: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


@contextlib.contextmanager
def _stop_on_signals(flag) -> Iterator[None]:
    """Ctrl-C or SIGTERM while starting up: stop at once (one line). While a workflow runs, the first stops
    at the next node or sampler step; a second stops at once (and if the node swallows that, the run still
    stops after it: the flag stays set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if flag.is_set() or not flag.running:
            flag.set()
            flag.raised += 1
            raise KeyboardInterrupt("interrupted" if signum == signal.SIGINT else "stopped by SIGTERM")
        flag.set()
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\nnodegraph: {name}: stopping after the current step (Ctrl-C again to stop at once)", file=sys.stderr)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    # A file-size limit (ulimit -f) must fail the write that crosses it, not kill the process: the disk
    # cache then warns and the run goes on.
    if hasattr(signal, "SIGXFSZ"):
        previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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


def entry() -> None:
    """The console script: Ctrl-C while starting up is one line, not a traceback."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("nodegraph: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":  # python -m nodegraph.cli: run the imported module, whose UsageError others raise
    from nodegraph.cli import entry as _entry

    _entry()
