"""ComfyUI nodes of the LoRA Trainer pack.

Importing this package imports nothing from ComfyUI; `extension.py` does, and only ComfyUI (via
the root `__init__.py`) loads it. Pure helpers (`lists.py`) stay importable in plain tests.
"""
