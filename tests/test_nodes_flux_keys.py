"""ComfyUI's key tables through the glue, on a tiny Flux built with ComfyUI's own classes: the
aliases (diffusers `to_q` -> rows of the fused `qkv`), the kohya-ss naming of the family, and a
diffusers-named Flux LoRA applied in bypass equal to ComfyUI's merged loader.

Like test_nodes_comfy_glue.py: needs COMFYUI_ROOT (and COMFYUI_PYTHON, default its venv); the checks
run in a child process so ComfyUI's modules never enter this test process.
"""


import pytest
from comfy_child import run_checks


CHECKS = r'''
import importlib.util, json, sys
from pathlib import Path
from types import SimpleNamespace
comfy_root, pack_root, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
sys.path.insert(0, comfy_root)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.model_management as mm, comfy.ops, comfy.sd
import folder_paths
from comfy.ldm.flux.model import Flux
for name in ("loras",):
    (work / name).mkdir(parents=True, exist_ok=True)
    folder_paths.folder_names_and_paths[name] = ([str(work / name)], folder_paths.supported_pt_extensions)
spec = importlib.util.spec_from_file_location("lora_trainer_pack", Path(pack_root) / "__init__.py",
                                              submodule_search_locations=[pack_root])
pack = importlib.util.module_from_spec(spec); sys.modules["lora_trainer_pack"] = pack; spec.loader.exec_module(pack)
from lora_trainer_pack.nodes import comfy_glue as glue
from lora_trainer_pack.nodes.lora_nodes import LoadLoRAModel
from lora_trainer_pack.lora_core.adapters import AdapterSpec
from lora_trainer_pack.lora_core.adapters.sliced import Slice, SlicedAdapter
from lora_trainer_pack.lora_core.lorafile.lora_model import LoraModel
from lora_trainer_pack.lora_core.lorafile.resume import resume_point
from lora_trainer_pack.lora_core.training.loop import TrainConfig

torch.manual_seed(0)
flux = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=16, context_in_dim=32, hidden_size=128,
            mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
            qkv_bias=True, guidance_embed=False, txt_ids_dims=[], operations=comfy.ops.disable_weight_init)
with torch.no_grad():
    for name, p in flux.named_parameters():
        p.copy_(torch.randn(p.shape) / (p[0].numel() ** 0.5 if p.ndim > 1 else 10.0))
results = {}
model = comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in flux.state_dict().items()})
results["model"] = glue.base_model_name(model)
aliases = glue.lora_key_aliases(model)
results["to_q"] = repr(aliases.get("transformer.transformer_blocks.0.attn.to_q"))
results["single_to_k"] = repr(aliases.get("transformer.single_transformer_blocks.0.attn.to_k"))
naming = glue.kohya_naming(model)
results["kohya"] = [naming.family, naming.names.get("double_blocks.0.img_attn.qkv"), naming.metadata]

g = torch.Generator().manual_seed(1)
lora = {}
for name in ["transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_k",
             "transformer.transformer_blocks.0.attn.to_v", "transformer.transformer_blocks.0.attn.add_v_proj",
             "transformer.single_transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.proj_mlp",
             "transformer.transformer_blocks.0.ff.net.0.proj"]:
    target = aliases[name]
    out = target.size if isinstance(target, Slice) else model.model.diffusion_model.get_submodule(target).out_features
    lora[f"{name}.lora_A.weight"] = torch.randn(4, 128, generator=g) * 0.1
    lora[f"{name}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.1
    lora[f"{name}.alpha"] = torch.tensor(2.0)
results["lora_modules"] = len(lora) // 3

x = torch.randn(1, 16, 8, 8); t = torch.tensor([0.5]); ctx = torch.randn(1, 4, 32); y = torch.randn(1, 16)
def run(patcher):
    mm.load_models_gpu([patcher]); patcher.pre_run()
    try:
        with torch.inference_mode():
            return patcher.model.diffusion_model(x, t, ctx, y=y)
    finally:
        patcher.cleanup()
base = run(model)
merged = run(glue.apply_merged(model, lora, 1.0))
bypass = run(LoadLoRAModel.execute(model, 1.0, True, lora=LoraModel(lora)).args[0])
results["lora_changes"] = (merged - base).abs().max().item()
results["bypass_vs_merged"] = (bypass - merged).abs().max().item()

config = TrainConfig(steps=1, training_dtype="fp32", adapter=AdapterSpec(rank=4, alpha=2.0))
module = model.model.diffusion_model
point = resume_point(dict(lora), {}, SimpleNamespace(module=module, key_prefix="diffusion_model."), config, "diffusers flux",
                     aliases=aliases)
sliced = {n: a for n, a in point.adapter_set.adapter_items() if isinstance(a, SlicedAdapter)}
results["sliced_layers"] = sorted(sliced)
written = point.adapter_set.to_state_dict()
results["written_slice_keys"] = sorted(k for k in written if k.startswith("transformer."))[:3]
print("RESULTS " + json.dumps(results))
'''


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_checks(tmp_path_factory, "flux_keys", CHECKS)


def test_flux_aliases_are_slices_of_the_fused_layers(results):
    assert results["model"] == "FluxSchnell"
    assert results["to_q"] == "Slice(module='double_blocks.0.img_attn.qkv', offset=0, size=128)"
    assert results["single_to_k"] == "Slice(module='single_blocks.0.linear1', offset=128, size=128)"


def test_flux_kohya_names_are_the_bfl_names_sd_scripts_uses(results):
    family, qkv_name, fields = results["kohya"]
    assert family == "Flux" and qkv_name == "double_blocks.0.img_attn.qkv"
    assert fields == {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"}


def test_diffusers_flux_lora_in_bypass_equals_comfyui_merged(results):
    assert results["lora_modules"] == 7
    assert results["lora_changes"] > 1e-2
    assert results["bypass_vs_merged"] < 1e-4


def test_diffusers_flux_lora_resumes_with_slices_kept_under_their_names(results):
    assert results["sliced_layers"] == ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv",
                                        "single_blocks.0.linear1"]
    assert results["written_slice_keys"][0].startswith("transformer.single_transformer_blocks.0.attn.to_q.")
