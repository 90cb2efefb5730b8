"""lora_core must run without ComfyUI: importing all of it loads no ComfyUI module."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "node_helpers")

SCRIPT = """
import importlib, json, pkgutil, sys
import lora_core
# __main__ modules run their program when imported; they are entry points, not library code.
names = [m.name for m in pkgutil.walk_packages(lora_core.__path__, "lora_core.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "modules": sorted(sys.modules)}))
"""


def test_importing_lora_core_loads_no_comfyui_module():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "lora_core.adapters.attach" in report["imported"] and "lora_core.adapters.lora" in report["imported"]
    loaded = [m for m in report["modules"] if m.split(".")[0] in FORBIDDEN or m.startswith("comfy")]
    assert loaded == []
