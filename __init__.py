"""LoRA Trainer for ComfyUI: registers the nodes, nothing else.

Outside ComfyUI (tests, `python -m lora_core.demo`) there is no `comfy_api` to import, so the
package imports cleanly and registers nothing. Only the V3 `comfy_entrypoint` is exposed: a
module that also defined NODE_CLASS_MAPPINGS would be loaded the V1 way instead.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes.extension import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
else:
    __all__ = []
