"""Keep every user-named folder inside its root.

Folder names come from the UI as text, so `..`, absolute paths and symlinks that point elsewhere
must never let a node read or write outside the folder ComfyUI gave it (input/, datasets/...).
The check runs on the resolved path, so it holds for symlinks anywhere along the way.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import UserInputError


def is_inside(root: Path, path: Path) -> bool:
    """True when `path`, with symlinks resolved, is `root` or lies below it."""
    real_root = Path(os.path.realpath(root))
    real_path = Path(os.path.realpath(path))
    return real_path == real_root or real_root in real_path.parents


def resolve_inside(root: str | os.PathLike, name: str, what: str = "folder") -> Path:
    """The path `root/name`, or a UserInputError when `name` could escape `root`.

    `what` names the parameter in messages ("folder", "dataset folder").
    """
    root_path = Path(root)
    text = str(name).strip()
    if not text:
        raise UserInputError(f"The {what} name is empty: pick a subfolder of {root_path}.")
    windows = PureWindowsPath(text)
    if PurePosixPath(text).is_absolute() or windows.is_absolute() or windows.drive:
        raise UserInputError(
            f"The {what} {text!r} is an absolute path: give a folder name relative to {root_path}, "
            f"e.g. 'my_dataset'."
        )
    parts = text.replace("\\", "/").split("/")
    if ".." in parts:
        raise UserInputError(
            f"The {what} {text!r} contains '..': give a folder name inside {root_path} without '..'."
        )
    target = root_path.joinpath(*[p for p in parts if p not in ("", ".")])
    if not is_inside(root_path, target):
        raise UserInputError(
            f"The {what} {text!r} resolves outside {root_path} (through a symlink): "
            f"move the files into {root_path} or point the symlink inside it."
        )
    return target

