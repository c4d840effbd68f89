"""Model folders: the names a file param may give, found under models roots in ComfyUI's layout (docs/models.md).

A root is a folder in ComfyUI's layout (``checkpoints/``, ``vae/``, ``loras/``, ...), or a section of a model
paths file (ComfyUI's ``extra_model_paths.yaml`` format) that says where each folder is, so an existing ComfyUI
or A1111 install is used in place. Roots come from ``--models`` / ``Engine(models=...)``, then
``$NODEGRAPH_MODELS``, then the model paths file; the first root that has a name wins.

``ModelRoots`` is pure given its roots: ``find`` only joins a name (relative, without ``..``) to each root's
folder and looks whether it is there, so it never reaches outside the folders; a confined (served) mode can
rely on that.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping

from .errors import NodegraphError

# The folders of ComfyUI's models root that built-in nodes search (A1111's names in docs/models.md).
FOLDERS = ("checkpoints", "diffusers", "vae", "loras", "controlnet", "clip_vision", "ipadapter")
# A param's folder -> the other folders it searches too: a diffusers model folder is a checkpoint.
ALSO_SEARCHED = {"checkpoints": ("diffusers",)}
# Files listed as models (ComfyUI's list, plus .gguf); a folder holding model_index.json or config.json is one model.
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl", ".gguf")
MODEL_FOLDER_MARKERS = ("model_index.json", "config.json")
MAX_LISTED = 100_000  # entries walked per folder when listing
MODELS_ENV = "NODEGRAPH_MODELS"
MODEL_PATHS_ENV = "NODEGRAPH_MODEL_PATHS"
MODEL_PATHS_FILE = "model_paths.yaml"
OFF = ("", "off", "none", "0", "false", "no")


@dataclass(frozen=True)
class Root:
    """One models root: ``path`` with ComfyUI's layout (``folders`` None), or a model paths section whose
    ``folders`` map a folder name to its places (``path`` is then the section's base_path)."""

    path: Path
    origin: str  # where it was named: "--models", "$NODEGRAPH_MODELS", "<file> [section]", ...
    folders: Mapping[str, tuple[Path, ...]] | None = None

    def dirs(self, folder: str) -> tuple[Path, ...]:
        if self.folders is None:
            return (self.path / folder,)
        return self.folders.get(folder, ())


@dataclass(frozen=True)
class Entry:
    """A model found in a folder: its name (what a param gives), where it is, its size in bytes."""

    folder: str
    name: str
    root: Root
    path: Path
    size: int
    shadowed: bool = False  # an earlier root has the same name, so this one is never used

    def to_dict(self) -> dict:
        return {"name": self.name, "root": str(self.root.path), "path": str(self.path), "size": self.size,
                **({"shadowed": True} if self.shadowed else {})}


def name_parts(name: str) -> tuple[str, ...] | None:
    """The parts of a model name ("sdxl/juggernaut.safetensors"), or None for what is no name: empty,
    absolute, starting with ~, or going up with "..". Names use "/" on every system."""
    if not name or name.startswith("~") or "\0" in name:
        return None
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path.parts


def searched_folders(folder: str) -> tuple[str, ...]:
    return (folder, *ALSO_SEARCHED.get(folder, ()))


class ModelRoots:
    """The models roots, in search order, and what is found in their folders."""

    def __init__(self, roots: Iterable[Root] = (), config: Path | None = None):
        self.roots = tuple(roots)
        self.config = config  # the model paths file read, if any

    @classmethod
    def gather(cls, roots: Iterable[str | Path] = (), config: str | Path | bool | None = None,
               environ: Mapping[str, str] | None = None, origin: str = "--models") -> "ModelRoots":
        """``roots`` first (``origin`` says where they were named), then ``$NODEGRAPH_MODELS`` (os.pathsep
        between roots), then the sections of the model paths file: ``config``, else ``$NODEGRAPH_MODEL_PATHS``,
        else ``model_paths.yaml`` in the user's config folder if there is one; ``config=False`` or
        ``$NODEGRAPH_MODEL_PATHS=off`` reads none. Raises NodegraphError for a file that is named but missing
        or malformed."""
        environ = os.environ if environ is None else environ
        found = [Root(_absolute(r), origin) for r in roots]
        found += [Root(_absolute(part), f"${MODELS_ENV}")
                  for part in environ.get(MODELS_ENV, "").split(os.pathsep) if part.strip()]
        file = model_paths_file(config, environ)
        if file is not None:
            found += read_model_paths(file)
        return cls(found, file)

    def searched(self, folder: str) -> list[tuple[Root, Path]]:
        """Every place a name of ``folder`` is looked for, in order: root by root, each root's ``folder``
        and then its ALSO_SEARCHED folders."""
        return [(root, place) for root in self.roots for f in searched_folders(folder) for place in root.dirs(f)]

    def find(self, folder: str, name: str) -> Path | None:
        """The file or folder ``name`` is in the first place that has it (None: in none, or not a name)."""
        parts = name_parts(name)
        if parts is None:
            return None
        for _, place in self.searched(folder):
            candidate = place.joinpath(*parts)
            if candidate.exists():
                return candidate
        return None

    def entries(self, folder: str, also: bool = True) -> list[Entry]:
        """The models that names of ``folder`` find (with ``also``, in its ALSO_SEARCHED folders too), in search
        order; a name an earlier place has too is marked shadowed."""
        places = self.searched(folder) if also else [(r, p) for r in self.roots for p in r.dirs(folder)]
        found, seen = [], set()
        for root, place in places:
            for name, path, size in _models_in(place):
                found.append(Entry(folder, name, root, path, size, shadowed=name in seen))
                seen.add(name)
        return found

    def listing(self, folders: Iterable[str] = FOLDERS) -> dict[str, list[Entry]]:
        """Per folder, the models found in it (diffusers/ is listed on its own, not under checkpoints/)."""
        return {folder: self.entries(folder, also=False) for folder in folders}

    def closest(self, folder: str, name: str, n: int = 5) -> list[str]:
        """The names in ``folder`` closest to ``name``: the same file name in another subfolder first, then
        difflib's close matches (case and the model suffix ignored)."""
        names = list(dict.fromkeys(e.name for e in self.entries(folder)))
        base = PurePosixPath(name).name.lower()
        same = [candidate for candidate in names if PurePosixPath(candidate).name.lower() == base]
        plain = {_plain(candidate): candidate for candidate in reversed(names)}  # the first of equals wins
        close = difflib.get_close_matches(_plain(name), list(plain), n=n, cutoff=0.6)
        return list(dict.fromkeys(same + [plain[m] for m in close]))[:n]

    def missing(self, folder: str, name: str, path: Path | None = None) -> str:
        """What to tell a user whose ``name`` is in no root (nor a file at ``path``): where it was looked for,
        the closest names, what to do."""
        where = " or ".join(f"{f}/" for f in searched_folders(folder))
        at = f" at {path}" if path is not None else ""
        if not self.roots:
            return (f"no such file or folder{at}, and no models root is set up to look for it in {where}; give "
                    f"a path, or a models root with --models DIR, ${MODELS_ENV} or a {MODEL_PATHS_FILE} "
                    "(docs/models.md)")
        roots = ", ".join(str(r.path) for r in self.roots[:4]) + (", ..." if len(self.roots) > 4 else "")
        text = f"no model of that name in {where} of the models roots ({roots})" + (f", nor a file{at}" if at else "")
        close = self.closest(folder, name)
        if close:
            return f"{text}; did you mean {', '.join(close)}?"
        count = len({e.name for e in self.entries(folder)})
        if count:
            return f"{text}; no name there is close: run `nodegraph models {folder}` for the {count} found"
        return f"{text}; those folders hold no models: put the file there, or check the roots with `nodegraph models`"

    def problems(self) -> list[str]:
        """What looks wrong with the roots: one that does not exist, a section's folder that does not, a root
        with none of the known folders."""
        found = []
        for root in self.roots:
            if root.folders is None:
                if not root.path.is_dir():
                    found.append(f"models root {root.path} ({root.origin}) {_not_a_folder(root.path)}")
                elif not any((root.path / f).is_dir() for f in FOLDERS):
                    hint = " (did you mean its models/ folder?)" if (root.path / "models").is_dir() else ""
                    found.append(f"models root {root.path} ({root.origin}) has none of the folders "
                                 f"{', '.join(FOLDERS)}{hint}")
                continue
            for folder, places in root.folders.items():
                found += [f"{folder} folder {place} ({root.origin}) {_not_a_folder(place)}" for place in places
                          if not place.is_dir()]
        return found

    def to_dict(self) -> list[dict]:
        return [{"path": str(r.path), "origin": r.origin,
                 "folders": None if r.folders is None else {f: [str(p) for p in ps] for f, ps in r.folders.items()}}
                for r in self.roots]


def _not_a_folder(path: Path) -> str:
    """What is wrong with a root or folder that is no folder: "does not exist" would send a user whose path
    names a file (a model file given as the root, say) looking for something that is there."""
    return "is a file, not a folder" if path.exists() else "does not exist"


def _plain(name: str) -> str:
    """A name as compared for closeness: lower case, without a model suffix."""
    name = name.lower()
    suffix = next((s for s in MODEL_SUFFIXES if name.endswith(s)), "")
    return name[:len(name) - len(suffix)]


def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _models_in(place: Path) -> list[tuple[str, Path, int]]:
    """(name, path, size) of every model below ``place``: files with a model suffix, and folders holding a
    model_index.json or config.json (one model each, not walked into). Hidden entries and a single file's
    config sidecar (``<stem>.config/`` beside ``<stem>.safetensors``) are left out; symlinks are followed."""
    found: list[tuple[str, Path, int]] = []
    stack, seen, walked = [(place, "")], set(), 0
    while stack and walked < MAX_LISTED:
        current, prefix = stack.pop()
        try:
            info = os.stat(current)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(current) as it:
                items = list(it)
        except OSError:
            continue  # missing or unreadable: problems() says so for a root's folders
        names = {item.name for item in items}
        for item in items:
            walked += 1
            if item.name.startswith("."):
                continue
            name, path = prefix + item.name, Path(item.path)
            try:
                if item.is_dir():
                    stem = item.name.removesuffix(".config")
                    if stem != item.name and any(stem + s in names for s in MODEL_SUFFIXES):
                        continue
                    if any((path / marker).is_file() for marker in MODEL_FOLDER_MARKERS):
                        found.append((name, path, _folder_size(path)))
                    else:
                        stack.append((path, name + "/"))
                elif item.name.lower().endswith(MODEL_SUFFIXES) and item.is_file():
                    found.append((name, path, item.stat().st_size))
            except OSError:
                continue
    return sorted(found, key=lambda e: e[0])


def _folder_size(folder: Path) -> int:
    total = 0
    for current, _, files in os.walk(folder):
        for file in files:
            try:
                total += os.stat(os.path.join(current, file)).st_size
            except OSError:
                pass
    return total


def model_paths_file(config: str | Path | bool | None = None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The model paths file to read: ``config``, else ``$NODEGRAPH_MODEL_PATHS`` ("off": none), else the
    user's config folder's model_paths.yaml when it exists. A file named but missing is an error."""
    environ = os.environ if environ is None else environ
    if config is False:
        return None
    named, how = config, "--model-paths"
    if config is None or config is True:
        named, how = environ.get(MODEL_PATHS_ENV), f"${MODEL_PATHS_ENV}"
    if named is not None:
        if str(named).strip().lower() in OFF:
            return None
        path = _absolute(named)
        if not path.is_file():
            raise NodegraphError(f"{how}: no model paths file '{path}'; give an existing file (docs/models.md "
                                 f"shows the format) or set {MODEL_PATHS_ENV}=off")
        return path
    import platformdirs

    default = Path(platformdirs.user_config_dir("nodegraph")) / MODEL_PATHS_FILE
    return default if default.is_file() else None


def read_model_paths(file: Path) -> list[Root]:
    """The roots a model paths file names, in ComfyUI's extra_model_paths.yaml format: each section has an
    optional ``base_path`` (``~`` and $VARS expanded; relative to the file's folder) and folder entries, each
    one path or several on separate lines, relative to base_path (or to the file's folder without one).
    Sections with ``is_default: true`` come first. Raises NodegraphError naming the file and the mistake."""
    import yaml

    def bad(what: str) -> NodegraphError:
        return NodegraphError(f"model paths file {file}: {what} (docs/models.md shows the format)")

    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise bad(f"not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise bad(f"cannot be read: {exc}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise bad("must map section names to their base_path and folders")
    here = file.parent
    first, rest = [], []
    for section, conf in data.items():
        if conf is None:
            continue
        if not isinstance(conf, dict):
            raise bad(f"section '{section}' must map base_path and folder names to paths")
        conf = dict(conf)
        base = conf.pop("base_path", None)
        is_default = conf.pop("is_default", False)
        if base is not None and not isinstance(base, str):
            raise bad(f"section '{section}': base_path must be a path")
        base_path = here / _expand(base) if base else None
        folders = {}
        for folder, value in conf.items():
            lines = value.splitlines() if isinstance(value, str) else value
            if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
                raise bad(f"section '{section}': '{folder}' must be a path, or several on separate lines")
            folders[str(folder)] = tuple(Path(os.path.normpath((base_path or here) / _expand(line.strip())))
                                         for line in lines if line.strip())
        root = Root(Path(os.path.normpath(base_path or here)), f"{file} [{section}]", folders)
        (first if is_default is True else rest).append(root)
    return first + rest


def _expand(text: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(text)))
