"""lora_core: LoRA-family adapter training in plain torch.

Nothing here imports ComfyUI; the node glue under `nodes/` adapts ComfyUI's objects to the small
interfaces defined here (`Denoiser`, module trees, state dicts), so the whole core is tested
without ComfyUI.
"""

from .errors import TrainingStopped, UserInputError

__all__ = ["UserInputError", "TrainingStopped"]
