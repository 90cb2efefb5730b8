"""Write a file so that readers see the old file or the complete new one, never half of either.

The bytes go to a hidden temporary name in the same folder (so the rename cannot cross file
systems) and `os.replace` puts them in place; a failure or a cancel (any BaseException) removes
the temporary file and leaves the previous file untouched. Plain `open()` is used rather than
safetensors' `save_file`, which creates files readable by their owner only.
"""

from __future__ import annotations

import os
from pathlib import Path


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    finished = False
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        finished = True
    finally:
        if not finished and temporary.exists():
            temporary.unlink()
    return path
