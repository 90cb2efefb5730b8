"""Write a whole folder or nothing.

Files are written into a hidden temporary folder beside the target, which is renamed into place
only when complete. An existing target is replaced only when the caller allows it and it is
recognised as replaceable (one of our datasets); it is moved aside first and deleted only after
the new folder is in place, so an interruption at any point leaves either the old or the new
folder, never a mix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

from ..errors import UserInputError


def write_folder(target: Path, write: Callable[[Path], None], overwrite: bool,
                 replaceable: Callable[[Path], bool], shown: str) -> Path:
    """Run `write(temporary_folder)` and move the result to `target`."""
    target = Path(target)
    _check_target(target, overwrite, replaceable, shown)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        write(partial)
        _check_target(target, overwrite, replaceable, shown)  # it may have appeared meanwhile
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            try:
                os.rename(partial, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _check_target(target: Path, overwrite: bool, replaceable: Callable[[Path], bool], shown: str) -> None:
    if not target.exists() and not target.is_symlink():
        return
    if not overwrite:
        raise UserInputError(
            f"{shown} already exists: choose another folder name, or turn on overwrite to replace it."
        )
    if target.is_symlink() or not target.is_dir() or not replaceable(target):
        raise UserInputError(
            f"{shown} exists and holds files other than a saved dataset's, so it is left alone even with "
            f"overwrite on: choose another folder name, or move those files out."
        )
