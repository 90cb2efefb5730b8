"""Key conventions of LoRA files, and conversion between them and our one internal form.

Internal form (ComfyUI's trainer output and what its loader reads for any model): dotted module
names under `diffusion_model.`, suffixes `lora_up.weight` / `lora_down.weight` / `alpha`,
LyCORIS `hada_*` / `lokr_*` / `oft_blocks`, and `.diff` / `.diff_b` for plain deltas.

Readers for other producers:
- kohya-ss and LyCORIS: `lora_unet_<module with dots as underscores>.<suffix>` (LyCORIS via
  SimpleTuner also `lycoris_...`). Underscores are ambiguous (`to_q` vs `to.q`), so mapping back
  needs the model's module names.
- PEFT / diffusers: `<module>.lora_A.weight` (down) and `<module>.lora_B.weight` (up), optional
  `.default` adapter name and `base_model.model.` / `transformer.` / `unet.` prefixes; alpha from
  `<module>.alpha`, the file's metadata (`lora_alpha`, or diffusers' adapter metadata JSON with
  `alpha_pattern`), else alpha = rank (scale 1), as ComfyUI's loader does.
"""

from __future__ import annotations

import json

import torch

from ..adapters.adapter_set import split_key
from ..errors import UserInputError

INTERNAL_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
_KOHYA_PREFIXES = (KOHYA_PREFIX, "lycoris_")
_PEFT_SUFFIXES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight",
    "lora_B.default.weight": "lora_up.weight",
}
_PEFT_PREFIXES = ("base_model.model.", "transformer.", "unet.", "model.", INTERNAL_PREFIX)


def to_kohya(state_dict: dict[str, torch.Tensor], prefix: str = INTERNAL_PREFIX) -> dict[str, torch.Tensor]:
    """Internal keys -> kohya-ss names, which ComfyUI's `model_lora_keys_unet` maps back for the
    model's own module names, and which A1111-style UIs read."""
    converted = {}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            raise UserInputError(f"Key '{key}' is not an internal LoRA key (prefix '{prefix}'); cannot export it.")
        parts = split_key(key[len(prefix):])
        if parts is None:
            raise UserInputError(f"Key '{key}' has no known LoRA suffix; cannot export it.")
        module, suffix = parts
        converted[f"{KOHYA_PREFIX}{module.replace('.', '_')}.{suffix}"] = tensor
    return converted


def to_internal(
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    module_names: list[str] | None = None,
    prefix: str = INTERNAL_PREFIX,
    source: str = "this LoRA file",
) -> dict[str, torch.Tensor]:
    """Any supported file's tensors -> internal keys. module_names (dotted, relative to the
    diffusion model) are needed for kohya / LyCORIS names and to find PEFT modules under
    wrapper prefixes; without them, PEFT names are taken as they are."""
    metadata = metadata or {}
    underscored = {name.replace(".", "_"): name for name in module_names} if module_names is not None else None
    known = set(module_names) if module_names is not None else None
    converted: dict[str, torch.Tensor] = {}
    peft_ranks: dict[str, int] = {}
    unmatched: list[str] = []
    for key, tensor in state_dict.items():
        module, suffix = _split_any(key)
        if module is None:
            unmatched.append(key)
            continue
        name = _module_name(module, underscored, known, prefix)
        if name is None:
            unmatched.append(key)
            continue
        if suffix in _PEFT_SUFFIXES:
            suffix = _PEFT_SUFFIXES[suffix]
            if suffix == "lora_down.weight":
                peft_ranks[name] = tensor.shape[0]
        converted[f"{prefix}{name}.{suffix}"] = tensor
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        hint = (
            "The names do not match this model's layers: the LoRA was made for another model or "
            "uses another naming scheme (e.g. diffusers block names); ComfyUI's core LoraLoader "
            "knows more naming schemes."
        )
        if underscored is None and any(k.startswith(_KOHYA_PREFIXES) for k in unmatched):
            hint = "kohya-ss / LyCORIS names can only be read together with the model they are for."
        raise UserInputError(f"Cannot read LoRA keys {shown} in {source}. {hint}")
    for name, rank in peft_ranks.items():
        alpha_key = f"{prefix}{name}.alpha"
        if alpha_key not in converted:
            converted[alpha_key] = torch.tensor(float(_peft_alpha(name, rank, metadata)))
    return converted


def _split_any(key: str) -> tuple[str | None, str]:
    for suffix in sorted(_PEFT_SUFFIXES, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    parts = split_key(key)
    return parts if parts is not None else (None, "")


def _module_name(module: str, underscored: dict[str, str] | None, known: set[str] | None, prefix: str) -> str | None:
    for kohya in _KOHYA_PREFIXES:
        if module.startswith(kohya):
            return underscored.get(module[len(kohya):]) if underscored is not None else None
    candidates = [module]
    stripped = module
    changed = True
    while changed:  # wrapper prefixes may nest: base_model.model.transformer.<module>
        changed = False
        for wrapper in (prefix, *_PEFT_PREFIXES):
            if stripped.startswith(wrapper):
                stripped = stripped[len(wrapper):]
                candidates.append(stripped)
                changed = True
    if known is None:
        return stripped
    for candidate in candidates:
        if candidate in known:
            return candidate
    return None


def _peft_alpha(name: str, rank: int, metadata: dict[str, str]) -> float:
    """PEFT keeps alpha in its adapter config; files carry it in metadata, if at all."""
    configs = [metadata]
    for value in metadata.values():
        if isinstance(value, str) and value.startswith("{"):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                configs.append(parsed)
    for config in configs:
        pattern = config.get("alpha_pattern")
        if isinstance(pattern, dict):
            for key, value in pattern.items():
                if name == key or name.endswith("." + key):
                    return float(value)
    for config in configs:
        for field in ("lora_alpha", "alpha"):
            if field in config:
                try:
                    return float(config[field])
                except (TypeError, ValueError):
                    continue
    return float(rank)
