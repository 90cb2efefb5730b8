"""The files users keep: LoRA safetensors, their key names, resume state and the LORA_MODEL value.

Entry points: `files.save_lora` / `files.load_lora` / `files.save_kohya_lora`, `keys.to_internal` /
`keys.to_kohya`, `resume.save_checkpoint` / `resume.resume_from_file`, `lora_model.as_lora_model`.
"""
