"""The ComfyUI V3 extension: the list of our nodes."""

from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .dataset_nodes import NODES as DATASET_NODES
from .job_nodes import NODES as JOB_NODES
from .lora_nodes import NODES as LORA_NODES
from .training_nodes import NODES as TRAINING_NODES
from .video_nodes import NODES as VIDEO_NODES


class LoraTrainerExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*DATASET_NODES, *VIDEO_NODES, *TRAINING_NODES, *JOB_NODES, *LORA_NODES]


async def comfy_entrypoint() -> LoraTrainerExtension:
    return LoraTrainerExtension()
