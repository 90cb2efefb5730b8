"""Key conventions of LoRA files, and conversion between them and our one internal form.

Internal form (ComfyUI's trainer output and what its loader reads for any model): dotted module
names under `diffusion_model.`, suffixes `lora_up.weight` / `lora_down.weight` / `alpha`,
LyCORIS `hada_*` / `lokr_*` / `oft_blocks`, and `.diff` / `.diff_b` for plain deltas.

Readers for other producers, matched against the model's own module names and, when the caller
has them, `ModelKeys.aliases` (other names of the same layers: ComfyUI's key tables, given by the
glue; a value may be a `Slice` of a fused layer, e.g. diffusers `to_q` -> rows of Flux's `qkv`):
- kohya-ss / LyCORIS / OneTrainer: `lora_unet_<module with dots as underscores>.<suffix>` (also
  `lycoris_` and `lora_transformer_`). Underscores are ambiguous (`to_q` vs `to.q`), so names are
  compared in one normal form (wrappers stripped, dots as underscores) against the model's names.
- PEFT / diffusers: `<module>.lora_A.weight` (down) and `<module>.lora_B.weight` (up), optional
  `.default` adapter name and `base_model.model.` / `transformer.` / `unet.` prefixes; alpha from
  `<module>.alpha`, the file's metadata (`lora_alpha`, or diffusers' adapter metadata JSON with
  `alpha_pattern`), else alpha = rank (scale 1), as ComfyUI's loader does.
A key that matches no layer is an error naming the keys and the model the file seems made for.

kohya export (`to_kohya`): `lora_unet_` + the module's name in the model kohya-ss / musubi-tuner
build for that family (`names`, given by the glue from ComfyUI's tables: diffusers block names
for SD1.x/2.x, the model's own names for SDXL, Flux, Wan, Qwen-Image...), dots as underscores.
"""

from __future__ import annotations

import dataclasses
import json
import re

import torch
from torch import nn

from ..adapters.adapter_set import AdapterSet, split_key
from ..adapters.sliced import Slice
from ..errors import UserInputError

INTERNAL_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
_PEFT_SUFFIXES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight",
    "lora_B.default.weight": "lora_up.weight",
}
# Keys of the text-encoder part of kohya / diffusers files; the diffusion model's loaders skip them.
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1.", "te2.", "lora_te1_", "lora_te2_", "lora_te3_")


@dataclasses.dataclass
class KohyaNaming:
    """How kohya-ss / musubi-tuner name one model family's layers, as the glue found out."""

    family: str
    """e.g. "SD1.x", "SDXL", "Flux"."""
    names: dict[str, str] | None
    """Our module name -> the module's name in the model those tools build; None: no export."""
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    """The `ss_*` fields those tools write for the family (network module, base model version)."""
    reason: str = ""
    """Why a family has no kohya export (names is None)."""


def to_kohya(
    state_dict: dict[str, torch.Tensor], prefix: str = INTERNAL_PREFIX, names: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Internal keys -> kohya-ss names: `lora_unet_` + the module's name in kohya's model (from
    `names`; without names, our module name) with dots as underscores."""
    converted = {}
    missing: list[str] = []
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            raise UserInputError(
                f"Key '{key}' is not an internal LoRA key (prefix '{prefix}'); cannot export it with kohya-ss "
                "names. (Adapters on slices of fused layers, from a diffusers file, have no kohya-ss name: "
                "save without kohya_export.)"
            )
        parts = split_key(key[len(prefix):])
        if parts is None:
            raise UserInputError(f"Key '{key}' has no known LoRA suffix; cannot export it.")
        module, suffix = parts
        source = module if names is None else names.get(module)
        if source is None:
            missing.append(module)
            continue
        converted[f"{KOHYA_PREFIX}{source.replace('.', '_')}.{suffix}"] = tensor
    if missing:
        shown = ", ".join(sorted(set(missing))[:5])
        raise UserInputError(
            f"kohya-ss has no name for layers {shown} of this model, so they cannot be exported with "
            "kohya-ss names. Exclude them from the target layers, or save without kohya_export."
        )
    if len(converted) != len(state_dict):
        raise UserInputError("Two layers of this LoRA get the same kohya-ss name; save without kohya_export.")
    return converted


@dataclasses.dataclass
class ModelKeys:
    """The names a LoRA file may use for a model's layers."""

    module_names: list[str]
    """Dotted module names relative to the diffusion model."""
    aliases: dict[str, str | Slice] = dataclasses.field(default_factory=dict)
    """Other names (without tensor suffix) -> module name, or the Slice of a fused layer."""

    @classmethod
    def of(cls, module: nn.Module, aliases: dict[str, str | Slice] | None = None) -> "ModelKeys":
        return cls([name for name, _ in module.named_modules() if name], dict(aliases or {}))


@dataclasses.dataclass
class ReadKeys:
    tensors: dict[str, torch.Tensor]
    """Internal keys; tensors of slices of fused layers stay under their source names."""
    slices: dict[str, Slice]
    """Source module name -> Slice, for the keys above that are slices."""


def split_text_encoder(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the diffusion-model tensors, the text-encoder keys left out)."""
    kept = {k: v for k, v in state_dict.items() if not k.startswith(TEXT_ENCODER_PREFIXES)}
    return kept, [k for k in state_dict if k not in kept]


def to_internal(
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    module_names: list[str] | None = None,
    prefix: str = INTERNAL_PREFIX,
    source: str = "this LoRA file",
    aliases: dict[str, str | Slice] | None = None,
) -> dict[str, torch.Tensor]:
    """Any supported file's tensors -> internal keys (see `read_keys`; a file whose modules are
    slices of fused layers needs `read_keys`, which returns those too)."""
    keys = ModelKeys(module_names, dict(aliases or {})) if module_names is not None else None
    result = read_keys(state_dict, metadata, keys, prefix, source)
    if result.slices:
        raise UserInputError(
            f"{source} holds adapters for slices of fused layers ({', '.join(list(result.slices)[:3])}); "
            "read it with keys.read_keys / adapter_set_from_tensors."
        )
    return result.tensors


def read_keys(
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    model_keys: ModelKeys | None = None,
    prefix: str = INTERNAL_PREFIX,
    source: str = "this LoRA file",
) -> ReadKeys:
    """Internal keys for any supported file. Without model_keys, PEFT names are taken as they are
    and kohya names cannot be read (their underscores need the model's names)."""
    metadata = metadata or {}
    state_dict = lycoris_oft_to_comfy(state_dict, metadata)
    index = _NameIndex(model_keys, prefix) if model_keys is not None else None
    converted: dict[str, torch.Tensor] = {}
    slices: dict[str, Slice] = {}
    peft_ranks: dict[str, int] = {}
    unmatched: list[str] = []
    for key, tensor in state_dict.items():
        module, suffix = _split_any(key)
        if module is None:
            unmatched.append(key)
            continue
        target = index.find(module) if index is not None else _peft_name_without_model(module, prefix)
        if target is None:
            unmatched.append(key)
            continue
        peft = suffix in _PEFT_SUFFIXES
        suffix = _PEFT_SUFFIXES.get(suffix, suffix)
        if isinstance(target, tuple):  # (source name, Slice)
            name, where = target
            slices[name] = where
            out_key = f"{name}.{suffix}"
        else:
            name = target
            out_key = f"{prefix}{name}.{suffix}"
        if peft and suffix == "lora_down.weight":
            peft_ranks[name] = tensor.shape[0]
        converted[out_key] = tensor
    if unmatched:
        raise _unmatched_error(unmatched, state_dict, source, index is not None)
    for name, rank in peft_ranks.items():
        alpha_key = f"{name}.alpha" if name in slices else f"{prefix}{name}.alpha"
        if alpha_key not in converted:
            converted[alpha_key] = torch.tensor(float(_peft_alpha(name, rank, metadata)))
    return ReadKeys(converted, slices)


def adapter_set_from_tensors(
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str] | None,
    module: nn.Module,
    prefix: str = INTERNAL_PREFIX,
    aliases: dict[str, str | Slice] | None = None,
    source: str = "this LoRA file",
) -> AdapterSet:
    """An AdapterSet on `module` from a file's diffusion-model tensors in any supported format."""
    result = read_keys(state_dict, metadata, ModelKeys.of(module, aliases), prefix, source)
    return AdapterSet.from_state_dict(result.tensors, module, prefix=prefix, slices=result.slices)


# ---- matching names ----------------------------------------------------------------------------
_WRAPPERS = ("base_model.model.", "transformer.", "unet.", "model.", INTERNAL_PREFIX)
_UNDERSCORE_WRAPPERS = ("lora_unet_", "lycoris_", "lora_transformer_", "lora_prior_unet_")


def normal_form(name: str) -> str:
    """A module name with file wrappers stripped and dots as underscores: kohya's flattening,
    applied to every naming scheme so they compare."""
    changed = True
    while changed:
        changed = False
        for wrapper in _UNDERSCORE_WRAPPERS + _WRAPPERS:
            if name.startswith(wrapper) and len(name) > len(wrapper):
                name = name[len(wrapper):]
                changed = True
    return name.replace(".", "_")


class _NameIndex:
    """Finds the layer a file's module name means: exact names first, then the normal form
    (only where it is unambiguous)."""

    def __init__(self, keys: ModelKeys, prefix: str) -> None:
        self.prefix = prefix
        self.known = set(keys.module_names)
        self.aliases = keys.aliases
        self.normal: dict[str, tuple[str, str | Slice] | None] = {}
        for name in keys.module_names:
            self._add(normal_form(name), name, name)
        for alias, target in keys.aliases.items():
            self._add(normal_form(alias), alias, target)

    def _add(self, normal: str, alias: str, target: str | Slice) -> None:
        if normal in self.normal:
            previous = self.normal[normal]
            if previous is not None and previous[1] != target:
                self.normal[normal] = None  # two layers flatten alike: only exact names may pick
            return
        self.normal[normal] = (alias, target)

    def _resolved(self, alias: str, target: str | Slice):
        return (alias, target) if isinstance(target, Slice) else target

    def find(self, module: str):
        """Module name, or (source name, Slice) for a slice of a fused layer, or None."""
        for candidate in _unwrapped(module, self.prefix):
            if candidate in self.known:
                return candidate
            if candidate in self.aliases:
                return self._resolved(candidate, self.aliases[candidate])
        hit = self.normal.get(normal_form(module))
        return self._resolved(*hit) if hit is not None else None


def _unwrapped(module: str, prefix: str) -> list[str]:
    """module, then module with each nesting of wrapper prefixes removed."""
    candidates = [module]
    stripped = module
    changed = True
    while changed:
        changed = False
        for wrapper in (prefix, *_WRAPPERS):
            if wrapper and stripped.startswith(wrapper):
                stripped = stripped[len(wrapper):]
                candidates.append(stripped)
                changed = True
    return candidates


def _peft_name_without_model(module: str, prefix: str) -> str | None:
    if module.startswith(_UNDERSCORE_WRAPPERS):
        return None
    return _unwrapped(module, prefix)[-1]


def _split_any(key: str) -> tuple[str | None, str]:
    for suffix in sorted(_PEFT_SUFFIXES, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    parts = split_key(key)
    return parts if parts is not None else (None, "")


def _unmatched_error(unmatched: list[str], state_dict: dict, source: str, had_model: bool) -> UserInputError:
    shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
    if not had_model and any(k.startswith(_UNDERSCORE_WRAPPERS) for k in unmatched):
        return UserInputError(
            f"Cannot read LoRA keys {shown} in {source}: kohya-ss / LyCORIS names can only be read "
            "together with the model they are for."
        )
    return UserInputError(
        f"Cannot read LoRA keys {shown} in {source}: they match no layer of this model. The file "
        f"seems to be made for {guess_model(unmatched, state_dict)}; pick a LoRA trained on this base "
        "model (ComfyUI's core LoraLoader also skips keys it cannot place, with a warning)."
    )


def guess_model(keys: list[str], state_dict: dict[str, torch.Tensor]) -> str:
    """A best guess, from layer names, at the model family a LoRA file was made for."""
    flat = [normal_form(_split_any(k)[0] or k) for k in keys]
    text = " ".join(flat)

    def has(pattern: str) -> bool:
        return re.search(pattern, text) is not None

    if all(k.startswith(TEXT_ENCODER_PREFIXES) for k in keys):
        return "a text encoder only (no diffusion-model layers)"
    if has(r"(down_blocks|up_blocks|input_blocks|output_blocks|mid_block|middle_block)_\d"):
        context = None
        for key, tensor in state_dict.items():
            if "attn2" in key and re.search(r"to_k[._](lora_down|lora_A|hada_w1_b)", key) and tensor.ndim >= 2:
                context = tensor.shape[1]
                break
        family = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(context, "an SD-family UNet")
        naming = "diffusers / kohya-ss SD1.x block names" if has(r"(down_blocks|up_blocks|mid_block)_") else "LDM names"
        return f"{family} ({naming})"
    if has(r"joint_blocks_\d"):
        return "SD3 (MMDiT)"
    if has(r"single_transformer_blocks_\d"):
        return "Flux (diffusers names)"
    if has(r"double_blocks_\d") or has(r"single_blocks_\d"):
        if has(r"img_mlp_fc1|img_attn_qkv_|txt_mod_linear"):
            return "HunyuanVideo"
        return "Flux (or another model with Flux-style double/single blocks)"
    if has(r"transformer_blocks_\d+_(img|txt)_(mod|mlp)"):
        return "Qwen-Image"
    if has(r"blocks_\d+_(self_attn|cross_attn|ffn)_"):
        return "Wan"
    if has(r"layers_\d+_(attention|feed_forward)_"):
        return "Lumina 2 / Z-Image"
    return "another model (names such as " + ", ".join(flat[:2]) + ")"


# ---- LyCORIS OFT constraint ---------------------------------------------------------------------
OFT_CONSTRAINT_KEY = "lora_trainer.oft_constraint"
OFT_CONSTRAINT_COMFY = "norm(Q) <= alpha (ComfyUI loader)"


def oft_alpha_is_per_channel(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Whether a file's OFT alpha is LyCORIS's constraint (||Q|| <= alpha * out_channels) rather
    than ComfyUI's (||Q|| <= alpha). Our files say so in their metadata (older ones carry our
    format version and mean ComfyUI's); LyCORIS's wrapper names keys `lycoris_`, and kohya-ss
    runs record `lycoris.kohya` as their network module."""
    if OFT_CONSTRAINT_KEY in metadata:
        return metadata[OFT_CONSTRAINT_KEY] != OFT_CONSTRAINT_COMFY
    if "lora_trainer.format_version" in metadata:
        return False
    if "lycoris" in metadata.get("ss_network_module", "").lower():
        return True
    return any(k.startswith("lycoris_") for k in state_dict)


def lycoris_oft_to_comfy(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """The file's tensors with LyCORIS OFT constraints rewritten as ComfyUI's (alpha * out
    channels), so every loader that reads ComfyUI's meaning gets the weights LyCORIS meant."""
    if not any(k.endswith(".oft_blocks") for k in state_dict) or not oft_alpha_is_per_channel(state_dict, metadata):
        return state_dict
    converted = dict(state_dict)
    for key, blocks in state_dict.items():
        if key.endswith(".oft_blocks") and blocks.dim() == 3:
            alpha_key = key[: -len("oft_blocks")] + "alpha"
            if alpha_key in converted:
                out_channels = blocks.shape[0] * blocks.shape[1]
                converted[alpha_key] = converted[alpha_key].float() * out_channels
    return converted


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
                # diffusers' pipelines prefix each field with the component: "unet.lora_alpha"
                for component in ("unet.", "transformer."):
                    fields = {k[len(component):]: v for k, v in parsed.items() if k.startswith(component)}
                    if fields:
                        configs.append(fields)
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
