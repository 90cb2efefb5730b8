"""Run a check script in ComfyUI's own Python (a child process) and read back its RESULTS line.

The glue checks need ComfyUI and its torch, which the CI interpreter lacks; each script prints
`RESULTS <json>` last, so the tests stay plain assertions on a dict.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_REASON = "COMFYUI_ROOT is not set: these checks need a ComfyUI checkout"


def comfy_root_and_python(fall_back_to_this_python: bool) -> tuple[str, str]:
    """COMFYUI_ROOT and its interpreter (COMFYUI_PYTHON, default its venv); skips without them."""
    root = os.environ.get("COMFYUI_ROOT")
    if not root or not (Path(root) / "main.py").exists():
        pytest.skip(SKIP_REASON)
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(root) / "venv" / "bin" / "python")
    if not Path(python).exists():
        if not fall_back_to_this_python:
            pytest.skip(f"no ComfyUI interpreter at {python} (set COMFYUI_PYTHON)")
        python = sys.executable
    return root, python


def run_checks(tmp_path_factory, name: str, script: str, fall_back_to_this_python: bool = False) -> dict:
    root, python = comfy_root_and_python(fall_back_to_this_python)
    work = tmp_path_factory.mktemp(name)
    path = work / "checks.py"
    path.write_text(script)
    done = subprocess.run([python, str(path), root, str(ROOT), str(work)], capture_output=True, text=True,
                          timeout=900, cwd=root)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS "):])
