"""Session fixtures for the integration tests: one ComfyUI server on a tiny random SD1.5 model.

Runs only when COMFYUI_ROOT points at a ComfyUI checkout; otherwise every test that asks for
`comfy` is skipped with the reason. Environment:
  COMFYUI_ROOT         the ComfyUI checkout (its main.py is started with --base-directory in a temp dir)
  COMFYUI_PYTHON       interpreter for ComfyUI (default: $COMFYUI_ROOT/venv/bin/python, else this one)
  COMFYUI_SERVER_ARGS  device flags for the server (default "--cpu"; "" lets ComfyUI pick the GPU)
  LORA_TRAINER_IT_CACHE  where the built model files are cached (default $TMPDIR/lora_trainer_it_cache)
"""
import os
import shlex
import time
from pathlib import Path

import pytest

from comfy_server import PACK_LINK_NAME, ComfyServer, build_fixture_models, comfy_python

SKIP_REASON = "COMFYUI_ROOT is not set: integration tests need a ComfyUI checkout (COMFYUI_ROOT=/path/to/ComfyUI)"


def comfy_root() -> Path | None:
    root = os.environ.get("COMFYUI_ROOT")
    return Path(root) if root else None


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    root = comfy_root()
    if root is None:
        pytest.skip(SKIP_REASON)
    if not (root / "main.py").exists():
        pytest.fail(f"COMFYUI_ROOT={root} has no main.py")
    python = comfy_python(root)
    started = time.monotonic()
    fixture_dir = build_fixture_models(root, python)
    built = time.monotonic()
    server = ComfyServer(root, tmp_path_factory.mktemp("comfy_base"), python,
                         extra_args=shlex.split(os.environ.get("COMFYUI_SERVER_ARGS", "--cpu")))
    server.prepare(fixture_dir)
    server.start()
    if f"(IMPORT FAILED): {server.base_dir / 'custom_nodes' / PACK_LINK_NAME}" in server.log_text():
        server.stop()
        pytest.fail(f"ComfyUI could not import the pack:\n{server.log_text()[-8000:]}")
    print(f"\n[integration] fixture models {built - started:.1f}s, server start {time.monotonic() - built:.1f}s, "
          f"base dir {server.base_dir}")
    yield server
    server.stop()
