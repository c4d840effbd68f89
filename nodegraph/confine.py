"""Confinement of file params, for workflows that other people submit (``nodegraph serve``).

One rule, applied by validation to every file param a node declares (``InputPath``): the value is a
relative path without "..", and the file it resolves to (symlinks followed) lies inside one of the
folders the operator allowed: the input folder and the models roots. Values that no file matches
and that a node would fetch itself (hub ids) are refused unless downloads are allowed. The CLI run
by a user on their own files applies none of this.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from .files import FileProblem
from .model_folders import FOLDERS, ModelRoots, searched_folders


@dataclass(frozen=True)
class Confinement:
    """``read``: the folders file params may resolve into. ``allow_download``: hub ids may pass."""

    read: tuple[Path, ...]
    allow_download: bool = False

    @classmethod
    def for_server(cls, input_dir: str | Path, models: ModelRoots, allow_download: bool = False) -> "Confinement":
        places = {Path(input_dir)}
        for folder in FOLDERS:
            places.update(place for _, place in models.searched(folder))
            for extra in searched_folders(folder):
                places.update(p for root in models.roots for p in root.dirs(extra))
        # a node may name any folder of the layout (a plugin's upscale_models/, say): every folder of a root in
        # ComfyUI's layout, and every folder a model paths section lists
        for root in models.roots:
            places.update((root.path,) if root.folders is None else (p for ps in root.folders.values() for p in ps))
        return cls(tuple(sorted(Path(os.path.realpath(p)) for p in places)), allow_download)

    def value_problem(self, value: str) -> FileProblem | None:
        """An absolute path, a home-relative one or one going up with ".." is refused outright."""
        text = value.replace("\\", "/")
        if PurePosixPath(text).is_absolute() or PureWindowsPath(value).drive or value.startswith("~"):
            return FileProblem("confined_path", "absolute paths are refused by this server; give a name in the "
                                                "input folder or the models folders")
        if ".." in PurePosixPath(text).parts:
            return FileProblem("confined_path", "'..' is refused by this server; give a name in the input folder "
                                                "or the models folders")
        return None

    def resolved_problem(self, resolved: str) -> FileProblem | None:
        """The file (symlinks followed) must lie inside an allowed folder."""
        real = Path(os.path.realpath(resolved))
        if any(real == root or root in real.parents for root in self.read):
            return None
        return FileProblem("confined_path", "leads outside the input and models folders (through a symbolic link); "
                                            "this server reads only files inside them")

    def remote_problem(self, value: str) -> FileProblem | None:
        if self.allow_download:
            return None
        return FileProblem("download_refused", f"'{value}' is not in the models folders, and this server downloads "
                                               "nothing (start it with --allow-download to fetch hub models)")
