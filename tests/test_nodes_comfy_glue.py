"""The ComfyUI glue against a real ComfyUI: denoiser == ComfyUI's sampling path, training leaves the
caller's model untouched, bypass LoRAs stack and match ComfyUI's merged loader, paths stay inside.

Needs a ComfyUI checkout (COMFYUI_ROOT) and its interpreter (COMFYUI_PYTHON, default
$COMFYUI_ROOT/venv/bin/python); skipped otherwise. The checks run in a child process on a tiny
random SD1.5-shaped UNet built in memory, so ComfyUI's modules never enter this test process
(other tests assert that lora_core imports no ComfyUI module).
"""


import pytest
from comfy_child import run_checks


CHECKS = r'''
import importlib.util, json, os, sys, tempfile
from pathlib import Path
comfy_root, pack_root, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
sys.path.insert(0, comfy_root)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.model_management as mm, comfy.ops, comfy.sd, comfy.samplers, comfy.sampler_helpers
import folder_paths
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
for name in ("loras", "checkpoints"):
    (work / name).mkdir(parents=True, exist_ok=True)
    folder_paths.folder_names_and_paths[name] = ([str(work / name)], folder_paths.supported_pt_extensions)
folder_paths.set_output_directory(str(work / "output"))
spec = importlib.util.spec_from_file_location("lora_trainer_pack", Path(pack_root) / "__init__.py",
                                              submodule_search_locations=[pack_root])
pack = importlib.util.module_from_spec(spec); sys.modules["lora_trainer_pack"] = pack; spec.loader.exec_module(pack)
from lora_trainer_pack.nodes import comfy_glue as glue
from lora_trainer_pack.nodes.lora_nodes import LoadLoRAModel, write_lora
from lora_trainer_pack.lora_core.adapters import AdapterSpec
from lora_trainer_pack.lora_core.errors import UserInputError
from lora_trainer_pack.lora_core.lorafile.lora_model import LoraModel
from lora_trainer_pack.lora_core.training.loop import TrainConfig, TrainingData, train

torch.manual_seed(0)
unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                 channel_mult=(1,), transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
                 context_dim=768, num_heads=8, use_spatial_transformer=True, use_linear_in_transformer=False,
                 legacy=False, operations=comfy.ops.disable_weight_init)
with torch.no_grad():
    for name, p in unet.named_parameters():
        p.copy_(torch.ones_like(p) if p.ndim == 1 and name.endswith("weight") else torch.zeros_like(p) if p.ndim == 1
                else torch.randn(p.shape) / p[0].numel() ** 0.5)
results = {}
with torch.inference_mode():
    model = comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in unet.state_dict().items()})
    results["model"] = glue.base_model_name(model)
    conds = [[[torch.randn(1, 77, 768), {}]], [[torch.randn(1, 231, 768), {}]]]
    x = torch.randn(2, 4, 8, 8); sigma = torch.tensor([2.0, 0.5])

    def reference(patcher, i):
        c = comfy.sampler_helpers.convert_cond(conds[i])
        c = comfy.samplers.encode_model_conds(patcher.model.extra_conds, c, x[i:i + 1], patcher.load_device,
                                              "positive", latent_image=torch.zeros_like(x[i:i + 1]))
        return comfy.samplers.calc_cond_batch(patcher.model, [c], x[i:i + 1], sigma[i:i + 1], patcher.model_options)[0]

    def hooks(patcher):
        return sum(len(m._forward_hooks) for m in patcher.model.diffusion_model.modules())

    with glue.training_session(model, offloading=False) as d:
        ours = d.denoise(x, sigma, conds)
        results["denoise_vs_comfy"] = max((ours[i:i + 1] - reference(d.patcher, i)).abs().max().item() for i in range(2))
        results["in_training"] = mm.in_training
        results["grad_enabled"] = torch.is_grad_enabled()
        s = d.sigma_at(torch.tensor([0.2, 0.8]))
        c_skip, c_out = d.output_coefficients(s)
        x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        x_t = d.add_noise(x0, noise, s)
        results["eps_identity"] = max((c_skip - 1).abs().max().item(), (c_out + s).abs().max().item(),
                                      (x_t - x0 - s.view(2, 1, 1, 1) * noise).abs().max().item())
        data = TrainingData([torch.randn(4, 8, 8), torch.randn(4, 8, 8)], conds)
        trained = train(d, data, TrainConfig(steps=2, learning_rate=1e-2, training_dtype="fp32",
                                            adapter=AdapterSpec(rank=4, alpha=4.0)))
        results["trained_up_norm"] = sum(v.norm().item() for k, v in trained.adapter_set.to_state_dict().items()
                                         if k.endswith("lora_up.weight"))
        results["hooks_after_train"] = hooks(d.patcher)
    results["in_training_after"] = mm.in_training

    def run(patcher):
        mm.load_models_gpu([patcher])
        patcher.pre_run()
        try:
            return reference(patcher, 0), hooks(patcher)
        finally:
            patcher.cleanup()

    lora = LoraModel(trained.adapter_set.to_state_dict(), {}, None)
    path = write_lora(lora, "glue/a", 2)
    name = path.relative_to(work / "loras").as_posix()
    base, base_hooks = run(model)
    a, a_hooks = run(LoadLoRAModel.execute(model, 1.0, True, lora=lora).args[0])
    stacked = LoadLoRAModel.execute(LoadLoRAModel.execute(model, 1.0, True, lora=lora).args[0], -1.0, True,
                                    lora_name=name).args[0]
    ab, ab_hooks = run(stacked)
    merged, _ = run(LoadLoRAModel.execute(model, 1.0, False, lora_name=name).args[0])
    again, again_hooks = run(model)
    results.update(lora_changes=(a - base).abs().max().item(), stacked_cancels=(ab - base).abs().max().item(),
                   bypass_vs_merged=(a - merged).abs().max().item(), base_unchanged=(again - base).abs().max().item(),
                   hooks=[base_hooks, a_hooks, ab_hooks, again_hooks], file=name)

refused = []
for call in (lambda: glue.lora_save_folder("../escape"), lambda: glue.output_image_path("../escape"),
             lambda: glue.lora_path("../../etc/passwd")):
    try:
        call()
    except UserInputError:
        refused.append(True)
results["refused"] = refused
print("RESULTS " + json.dumps(results))
'''


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_checks(tmp_path_factory, "glue", CHECKS, fall_back_to_this_python=True)


def test_denoiser_matches_comfyui_sampling_path(results):
    assert results["model"] == "SD15"
    assert results["denoise_vs_comfy"] < 1e-4          # two captions of 77 and 231 tokens in one batch
    assert results["eps_identity"] < 1e-5


def test_training_session_sets_and_resets_comfyui_state(results):
    assert results["in_training"] is True and results["grad_enabled"] is True
    assert results["in_training_after"] is False
    assert results["trained_up_norm"] > 0               # gradients reach the adapters through ComfyUI's model
    assert results["hooks_after_train"] == 0


def test_bypass_loras_stack_match_merged_and_never_leak(results):
    assert results["lora_changes"] > 1e-3
    assert results["stacked_cancels"] < 1e-4            # +1 and -1 of the same LoRA, two bypass injections
    assert results["bypass_vs_merged"] < 1e-4           # our hooks == ComfyUI's own merged loader
    assert results["base_unchanged"] == 0.0
    assert results["hooks"][0] == 0 and results["hooks"][2] == 2 * results["hooks"][1] and results["hooks"][3] == 0


def test_paths_leading_outside_are_refused(results):
    assert results["refused"] == [True, True, True]
