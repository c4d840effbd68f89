"""The server's folders (input, output, temp) and the one rule for reaching into them from a request:
a relative subfolder and a plain file name, and what they name (symlinks followed) stays inside."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


class OutsideFolder(ValueError):
    """A name that would leave its folder."""


@dataclass(frozen=True)
class Folders:
    input: Path
    output: Path
    temp: Path

    def of(self, kind: str | None, default: str = "output") -> Path | None:
        """The folder a request's ``type`` names (None: no such type)."""
        return {"input": self.input, "output": self.output, "temp": self.temp}.get(kind or default)

    def create(self) -> None:
        for folder in (self.input, self.output, self.temp):
            folder.mkdir(parents=True, exist_ok=True)


def inside(root: Path, subfolder: str, filename: str = "") -> Path:
    """``root/subfolder/filename``, refused (OutsideFolder) when absolute, going up, or leading outside ``root``
    through a link."""
    for part in (subfolder, filename):
        text = (part or "").replace("\\", "/")
        if "\0" in text or text.startswith(("/", "~")) or ".." in PurePosixPath(text).parts or ":" in text[:2]:
            raise OutsideFolder(f"'{part}' must be a name inside the folder")
    if filename and "/" in filename.replace("\\", "/"):
        raise OutsideFolder(f"'{filename}' must be a file name, not a path")
    path = Path(root) / (subfolder or "") / filename
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real != real_root and real_root not in real.parents:
        raise OutsideFolder(f"'{Path(subfolder or '', filename)}' leads outside the folder")
    return path
