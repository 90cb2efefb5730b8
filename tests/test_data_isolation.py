"""The dataset pipeline stays plain Python + torch: importing it loads nothing from ComfyUI."""

import subprocess
import sys


def test_importing_lora_core_data_loads_no_comfyui_module():
    code = (
        "import sys, lora_core.data\n"
        "banned = {'comfy', 'comfy_api', 'comfy_extras', 'folder_paths', 'server', 'nodes', 'node_helpers'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
