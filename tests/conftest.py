"""Shared test settings. Helpers live in `lora_core.toy` (import them from there: a second
conftest.py under tests/integration makes `from conftest import ...` ambiguous)."""

import torch

# The test models have a few thousand parameters: thread start-up costs more than it saves.
torch.set_num_threads(1)
