"""Train a job folder without a browser: `python headless.py JOB --comfyui /path/to/ComfyUI`.

On N GPUs of one machine: `torchrun --nproc-per-node N headless.py JOB --comfyui ...`; see README,
"Bigger runs". The runner itself is `nodes/headless.py`; this script only finds the pack's package.

The pack's folder name is not a fixed Python name (`comfyui-lora-trainer` in custom_nodes has
hyphens), and its modules import each other relatively, so they must be loaded as submodules of
one package. Run as a script (or `python -m headless` from the pack's folder) this file registers
the folder as the package `comfyui_lora_trainer` without running its `__init__` (which would
register ComfyUI nodes); run as `python -m <folder>.headless` it uses the package Python made.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

PACKAGE = "comfyui_lora_trainer"


def _package_name() -> str:
    if __package__:  # python -m <pack folder>.headless
        return __package__
    if PACKAGE not in sys.modules:
        here = Path(__file__).resolve().parent
        spec = importlib.util.spec_from_loader(PACKAGE, loader=None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [str(here)]
        sys.modules[PACKAGE] = package
    return PACKAGE


if __name__ == "__main__":
    runner = importlib.import_module(_package_name() + ".nodes.headless")
    sys.exit(runner.main())
