"""Edit pairs in a real ComfyUI, in-process, on tiny edit models built with ComfyUI's own classes.

    cd $COMFYUI_ROOT && venv/bin/python edit_pairs_check.py PACK_ROOT WORK_DIR FAMILY [FAMILY ...]

FAMILY: qwen_edit, qwen_edit_plus (two controls per target), kontext. Prints `RESULTS {json}`.
Run by test_edit_pairs.py (a child process keeps ComfyUI's modules out of the pytest process).

Models: `comfy.supported_models.QwenImage` / `Flux` with small dimensions -> `get_model()` ->
ModelPatcher (Kontext is a Flux model: ComfyUI has no separate class; the reference latents make it
an edit model). VAEs: a Wan 2.1 VAE of width 8 (Qwen-Image's kind, 5-D latents) and a Flux-layout
16-channel AutoencoderKL, both through `comfy.sd.VAE`. Text encoders cannot be tiny (Qwen2.5-VL 7B
and T5-XXL have fixed sizes), so a stand-in CLIP uses ComfyUI's real tokenizers (Qwen's sees the
control images as image tokens) and a seeded embedding table of the model's context width.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

pack_root, work = Path(sys.argv[1]), Path(sys.argv[2])
families = sys.argv[3:]
sys.path.insert(0, ".")
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import torch  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

torch.set_num_threads(2)
for name in ("loras", "checkpoints"):
    (work / name).mkdir(parents=True, exist_ok=True)
    folder_paths.folder_names_and_paths[name] = ([str(work / name)], folder_paths.supported_pt_extensions)
(work / "datasets").mkdir(parents=True, exist_ok=True)
folder_paths.folder_names_and_paths["datasets"] = ([str(work / "datasets")], set())
folder_paths.set_output_directory(str(work / "output"))
folder_paths.set_input_directory(str(work / "input"))

spec = importlib.util.spec_from_file_location("lora_trainer_pack", pack_root / "__init__.py",
                                              submodule_search_locations=[str(pack_root)])
pack = importlib.util.module_from_spec(spec)
sys.modules["lora_trainer_pack"] = pack
spec.loader.exec_module(pack)
from lora_trainer_pack.lora_core.adapters import AdapterSpec  # noqa: E402
from lora_trainer_pack.lora_core.adapters.attach import AdapterSet, attach_bypass  # noqa: E402
from lora_trainer_pack.lora_core.adapters.targets import TargetSpec  # noqa: E402
from lora_trainer_pack.lora_core.errors import UserInputError  # noqa: E402
from lora_trainer_pack.lora_core.memory.autograd_safety import AutogradSafety  # noqa: E402
from lora_trainer_pack.lora_core.memory.checkpointing import GradientCheckpointing  # noqa: E402
from lora_trainer_pack.nodes import comfy_glue as glue  # noqa: E402
from lora_trainer_pack.nodes.dataset_nodes import (LoadEditPairsDataset, LoadTrainingDataset,  # noqa: E402
                                                   MakeTrainingDataset, ResolutionBucket, SaveTrainingDataset)
from lora_trainer_pack.nodes.lists import training_samples  # noqa: E402
from lora_trainer_pack.nodes.training_nodes import TrainLoRA  # noqa: E402

SIZE = 32          # pixels: latents of 4x4, 2x2 patches of Flux / Qwen
CONTEXT = 32       # text width of the tiny models


# ---- tiny models -----------------------------------------------------------------------------------

def init_weights(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight") or name.endswith("scale"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def patcher_of(config) -> comfy.model_patcher.ModelPatcher:
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights(model.diffusion_model, 7)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=torch.device("cpu"))


def tiny_qwen():
    return patcher_of(comfy.supported_models.QwenImage({
        "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
        "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": CONTEXT,
        "axes_dims_rope": (4, 6, 6)}))


def tiny_flux():
    return patcher_of(comfy.supported_models.Flux({
        "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "patch_size": 2,
        "vec_in_dim": 16, "context_in_dim": CONTEXT, "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2,
        "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True,
        "txt_ids_dims": []}))


def tiny_sd15():
    return patcher_of(comfy.supported_models.SD15({
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1],
        "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
        "transformer_depth_middle": 1, "context_dim": CONTEXT, "num_heads": 2, "num_head_channels": -1,
        "use_spatial_transformer": True, "use_linear_in_transformer": False, "legacy": False,
        "adm_in_channels": None, "use_temporal_resblock": False, "use_temporal_attention": False}))


def tiny_wan_vae():
    from comfy.ldm.wan.vae import WanVAE
    vae = WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True])
    init_weights(vae, 3)
    sd = vae.state_dict()
    if "decoder.head.0.gamma" not in sd:
        raise RuntimeError("Wan VAE layout changed")
    return comfy.sd.VAE(sd=sd)


def tiny_flux_vae():
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=16)
    init_weights(vae, 3)
    return comfy.sd.VAE(sd=vae.state_dict())


class StandInClip:
    """A CLIP with ComfyUI's real tokenizer and a seeded embedding table of the tiny model's width.

    Image tokens (Qwen2.5-VL's <|image_pad|> carrying the picture) embed the picture's mean colour, so the
    prompt's conditioning depends on the control images as Qwen-Image-Edit's does.
    """

    def __init__(self, tokenizer, pooled: int | None):
        self.tokenizer = tokenizer
        self.pooled = pooled
        g = torch.Generator().manual_seed(11)
        self.table = torch.randn(4096, CONTEXT, generator=g) * 0.5
        self.image_proj = torch.randn(3, CONTEXT, generator=g)

    def tokenize(self, text, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, **kwargs)

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        rows = []
        for key in sorted(tokens):
            for batch in tokens[key]:
                for item in batch:
                    token = item[0]
                    if isinstance(token, dict):
                        rows.append(token["data"][..., :3].mean(dim=(0, 1, 2)) @ self.image_proj)
                    else:
                        rows.append(self.table[int(token) % len(self.table)])
        context = torch.stack(rows).unsqueeze(0)
        extra = {} if self.pooled is None else {"pooled_output": context.mean(1)[:, :self.pooled].repeat(1, 1)}
        return [[context, extra]]


def qwen_clip():
    import comfy.text_encoders.qwen_image as q
    return StandInClip(q.QwenImageTokenizer(), None)


def flux_clip():
    import comfy.text_encoders.flux as f
    return StandInClip(f.FluxTokenizer(), 16)


# ---- data --------------------------------------------------------------------------------------------

def write_pairs(folder: Path, controls_per_target: int, seed: int = 0) -> None:
    """Targets and their controls: the target is the control with its colours swapped (a learnable edit)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        control = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
        Image.fromarray(control[..., ::-1].copy()).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text("swap the colours")
        names = ["control"] if controls_per_target == 1 else [f"control_{k + 1}" for k in range(controls_per_target)]
        for k, name in enumerate(names):
            Image.fromarray(np.roll(control, k * 3, axis=0)).save(folder / f"p{i}_{name}.png")


def train_widgets(**overrides) -> dict:
    values = {i.id: [i.default] for i in TrainLoRA.define_schema().inputs if getattr(i, "default", None) is not None}
    values.update(steps=[2], training_dtype=["fp32"], lora_dtype=["fp32"], learning_rate=[1e-3], rank=[4],
                  alpha=[4.0], seed=[3], checkpoint_prefix=[f"checkpoints/edit"])
    values.update({k: [v] for k, v in overrides.items()})
    return values


def refs_of(cond) -> list:
    return cond[0][1]["reference_latents"]


# ---- the checks --------------------------------------------------------------------------------------

FAMILIES = {
    "qwen_edit": ("Qwen-Image-Edit", tiny_qwen, tiny_wan_vae, qwen_clip, 1),
    "qwen_edit_plus": ("Qwen-Image-Edit-2509 / 2511", tiny_qwen, tiny_wan_vae, qwen_clip, 2),
    "kontext": ("Flux.1 Kontext", tiny_flux, tiny_flux_vae, flux_clip, 1),
}


def check_family(key: str) -> dict:
    label, make_model, make_vae, make_clip, n_controls = FAMILIES[key]
    out: dict = {}
    folder = f"pairs_{key}"
    write_pairs(work / "input" / folder, n_controls)
    model, vae, clip = make_model(), make_vae(), make_clip()
    images, controls, texts = LoadEditPairsDataset.execute(
        folder, False, "none", SIZE, SIZE, "", "", "error", n_controls).args
    out["pairs"] = [len(images), [tuple(c.shape) for c in controls]]
    latents, conds = MakeTrainingDataset.execute(images, [vae], [clip], texts, controls, [label],
                                                 ["match_target"]).args
    out["latent_shape"] = list(latents[0]["samples"].shape)
    out["ref_shapes"] = [list(r.shape) for r in refs_of(conds[0])]
    out["texts_differ_by_control"] = bool((conds[0][0][0].shape != conds[1][0][0].shape)
                                          or (conds[0][0][0] - conds[1][0][0]).abs().max() > 0)

    # Save / Load Training Dataset keep each sample's reference latents.
    SaveTrainingDataset.execute(latents, conds, [f"ds_{key}"], overwrite=[True])
    loaded_latents, loaded_conds, _ = LoadTrainingDataset.execute(f"ds_{key}").args
    out["saved_refs_equal"] = all(
        len(refs_of(a)) == len(refs_of(b)) and all(torch.equal(x, y) for x, y in zip(refs_of(a), refs_of(b)))
        for a, b in zip(conds, loaded_conds))

    # Resolution Bucket keeps controls with their images.
    bucketed = ResolutionBucket.execute([SIZE], step=[16], images=images, controls=controls)
    out["bucket_controls"] = [tuple(c.shape) for c in bucketed.args[4]]

    # The reference latents reach the model: the first step's loss changes when only the controls change.
    first = TrainLoRA.execute([model], loaded_latents, loaded_conds, **train_widgets(steps=1)).args[1]["loss"][0]
    other_controls = [torch.flip(c, dims=[1]) for c in controls]
    _, other_conds = MakeTrainingDataset.execute(images, [vae], [clip], texts, other_controls, [label],
                                                 ["match_target"]).args
    other = TrainLoRA.execute([model], latents, other_conds, **train_widgets(steps=1)).args[1]["loss"][0]
    out["loss_same_controls"], out["loss_other_controls"] = first, other

    # Train (batch 2: samples of one shape run together) and load the LoRA in ComfyUI's core loader.
    lora, loss_map, steps = TrainLoRA.execute([model], latents, conds, **train_widgets(steps=3, batch_size=2)).args[:3]
    out["trained_steps"], out["loss"] = steps, loss_map["loss"]
    out["unloaded_keys"], out["patched"] = core_loader_check(model, lora)

    # Every block recomputed in backward (checkpoint_policy all_blocks), batch 2: still trains.
    try:
        out["all_blocks_loss"] = TrainLoRA.execute([model], latents, conds, **train_widgets(
            steps=2, batch_size=2, checkpoint_policy="all_blocks")).args[1]["loss"]
    except Exception as err:  # reported, so the other checks still run
        out["all_blocks_loss"] = f"{type(err).__name__}: {str(err)[:300]}"
    out["grad"] = gradient_check(model, latents, conds)                       # Train LoRA's default preset
    out["grad_attention_mlp"] = gradient_check(model, latents, conds, "attention_mlp")
    out["mixed_batch"] = mixed_reference_batch(model, latents, conds)
    out["errors"] = error_checks(model, latents, conds, images, controls, vae, clip, texts, label)
    return out


def core_loader_check(model, lora) -> tuple[list[str], int]:
    """ComfyUI's own LoRA path (what LoraLoader runs): every key must land on a model weight."""
    warnings: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            if "lora key not loaded" in record.getMessage():
                warnings.append(record.getMessage())

    handler = Catch()
    logging.getLogger().addHandler(handler)
    try:
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        patches = comfy.lora.load_lora(dict(lora), key_map)
        patched, _ = comfy.sd.load_lora_for_models(model, None, dict(lora), 1.0, 0)
    finally:
        logging.getLogger().removeHandler(handler)
    return warnings, len(patches)


def gradient_check(model, latents, conds, preset: str = "all") -> dict:
    """One step's LoRA gradient along a random direction: autograd through our training path (fp32,
    checkpointing off and every block recomputed) against float64 central finite differences of the same
    loss, computed with the same model conditioning (reference latents included) on a float64 copy."""
    samples, sample_conds = training_samples(latents, conds)
    x0_raw = torch.stack(samples[:2]).float()
    result = {}
    with glue.training_session(model, offloading=False) as denoiser:
        from lora_trainer_pack.lora_core.training.objectives import Objective, ObjectiveConfig
        objective = Objective(ObjectiveConfig())
        module = denoiser.module
        g = torch.Generator().manual_seed(5)
        adapters = AdapterSet.create(module, AdapterSpec(rank=2, alpha=2.0), TargetSpec(preset=preset), g)
        with torch.no_grad():   # non-zero up matrices so every adapter has a gradient of its own
            for p in adapters.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in adapters.parameters()]
        x0 = denoiser.prepare_latents(x0_raw)
        t = torch.tensor([0.3, 0.7])
        noise = torch.randn(x0.shape, generator=g)

        def engine_grad(checkpoint: bool) -> float:
            adapters.zero_grad(set_to_none=True)
            with attach_bypass(module, adapters):
                stack = GradientCheckpointing(module, 1) if checkpoint else None
                if stack is not None:
                    stack.__enter__()
                try:
                    with AutogradSafety(getattr(denoiser, "autograd_reference_ops", None)):  # as the loop runs it
                        loss = objective.loss_at(denoiser, x0, sample_conds[:2], t, noise).sum()
                        loss.backward()
                finally:
                    if stack is not None:
                        stack.__exit__(None, None, None)
            result["without_grad"] = sorted(n for n, p in adapters.named_parameters() if p.grad is None)
            return sum((p.grad.double() * d).sum() for p, d in zip(adapters.parameters(), direction)
                       if p.grad is not None).item()

        result["autograd"] = engine_grad(False)
        try:
            result["autograd_checkpointed"] = engine_grad(True)
        except Exception as err:  # reported, so the other checks still run
            result["autograd_checkpointed"] = f"{type(err).__name__}: {str(err)[:200]}"


        # The same loss in float64, through the model's own conditioning (ref_latents from extra_conds).
        sigma = denoiser.sigma_at(t, tuple(x0.shape))   # as the objective asks (Flux: resolution shift)
        x_t = denoiser.add_noise(x0, noise, sigma)
        c_skip, c_out = denoiser.output_coefficients(sigma)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        target = ((x0 - c_skip.view(shape) * x_t) / c_out.view(shape)).double()
        kwargs_per_sample = [denoiser._model_conds(c, x_t[i:i + 1]) for i, c in enumerate(sample_conds[:2])]
        import comfy.samplers
        base = denoiser.base
        module64 = module.double()
        adapters64 = adapters.double()
        try:
            def loss64() -> float:
                total = 0.0
                with torch.no_grad(), attach_bypass(module64, adapters64):
                    for i in range(2):
                        kw = comfy.samplers.cond_cat([{k: v.process_cond(batch_size=1, area=None)
                                                       for k, v in kwargs_per_sample[i].items()}])
                        kw = {k: ([e.double() for e in v] if isinstance(v, list) else
                                  v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                              for k, v in kw.items()}
                        context = kw.pop("c_crossattn")
                        xc = base.model_sampling.calculate_input(sigma[i:i + 1].double(), x_t[i:i + 1].double())
                        timestep = base.model_sampling.timestep(sigma[i:i + 1]).double()
                        output = module64(xc, timestep, context=context, transformer_options={}, **kw)
                        total += ((output - target[i:i + 1]) ** 2).mean().item()
                return total

            params = list(adapters64.parameters())
            eps = 1e-4
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(eps * d)
                plus = loss64()
                for p, d in zip(params, direction):
                    p.sub_(2 * eps * d)
                minus = loss64()
                for p, d in zip(params, direction):
                    p.add_(eps * d)
            result["finite_difference"] = (plus - minus) / (2 * eps)
        finally:
            module.float()
            adapters.float()
    a, f = result["autograd"], result["finite_difference"]
    result["relative_error"] = abs(a - f) / max(abs(f), 1e-12)
    if isinstance(result["autograd_checkpointed"], float):
        result["checkpoint_difference"] = abs(result["autograd_checkpointed"] - a) / max(abs(a), 1e-12)
    return result


def mixed_reference_batch(model, latents, conds) -> dict:
    """Two samples whose reference latents differ in size share a batch: they run one at a time inside it
    (ComfyUI's CONDList cannot concatenate them) and give what each gives alone; equal sizes run as one."""
    samples, sample_conds = training_samples(latents, conds)
    first, second = sample_conds[0], sample_conds[1]
    ref = refs_of(second)[0]
    bigger = torch.randn(ref.shape[:-2] + (ref.shape[-2] + 2, ref.shape[-1] + 2), generator=torch.Generator().manual_seed(9))
    resized = [[second[0][0], {**second[0][1], "reference_latents": [bigger]}]]
    with glue.training_session(model, offloading=False) as denoiser:
        x = denoiser.prepare_latents(torch.stack(samples[:2]).float())
        sigma = denoiser.sigma_at(torch.tensor([0.4, 0.6]))
        with torch.no_grad():
            together = denoiser.denoise(x, sigma, [first, resized])
            alone = torch.cat([denoiser.denoise(x[:1], sigma[:1], [first]), denoiser.denoise(x[1:], sigma[1:], [resized])])
            same_size_groups = len(glue._concat_groups([denoiser._model_conds(c, x[:1]) for c in (first, second)]))
            mixed_groups = len(glue._concat_groups([denoiser._model_conds(c, x[:1]) for c in (first, resized)]))
    return {"max_difference": (together - alone).abs().max().item(), "same_size_groups": same_size_groups,
            "mixed_groups": mixed_groups}


def error_checks(model, latents, conds, images, controls, vae, clip, texts, label) -> dict:
    messages = {}

    def message(call) -> str:
        try:
            call()
        except UserInputError as err:
            return str(err)
        return "no error"

    sd15 = tiny_sd15()
    messages["model_of_other_family"] = message(
        lambda: TrainLoRA.execute([sd15], latents, conds, **train_widgets(steps=1)))
    # A hand-made reference-latent dataset (as ReferenceLatent makes it) on a model that reads none.
    bare = [[[c[0][0], {k: v for k, v in c[0][1].items() if k != "lora_trainer_edit_model"}]] for c in conds]
    sd_latents = [{"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)} for _ in bare]
    messages["model_without_references"] = message(
        lambda: TrainLoRA.execute([sd15], sd_latents, bare, **train_widgets(steps=1)))
    too_many = [torch.cat([c] * 4) for c in controls]
    messages["too_many_controls"] = message(
        lambda: MakeTrainingDataset.execute(images, [vae], [clip], texts, too_many, [label], ["match_target"]))
    import comfy.sd1_clip
    sd_clip = StandInClip(comfy.sd1_clip.SD1Tokenizer(), None)
    messages["wrong_text_encoder"] = message(
        lambda: MakeTrainingDataset.execute(images, [vae], [sd_clip], texts, controls, [label], ["match_target"]))
    return messages


def run_example(name: str, substitutes: dict, overrides: dict):
    """Run an example workflow file in-process, as ComfyUI's executor would (list semantics included).

    `substitutes` gives the outputs of the model loader nodes (the tiny models; real Qwen-Image-Edit files
    cannot be made tiny enough to pass ComfyUI's detection, and its 7B text encoder has a fixed size);
    `overrides` the test-size widget values per node type. Returns {node type: its outputs}.
    """
    sys.path.insert(0, str(pack_root / "tests" / "integration"))
    from workflow_api import widget_inputs
    from lora_trainer_pack.nodes.dataset_nodes import NODES as DATASET_NODES
    from lora_trainer_pack.nodes.lora_nodes import NODES as LORA_NODES
    from lora_trainer_pack.nodes.training_nodes import NODES as TRAINING_NODES
    from lora_trainer_pack.nodes.training_settings import NODES as SETTINGS_NODES

    classes = {cls.GET_SCHEMA().node_id: cls for cls in (*DATASET_NODES, *LORA_NODES, *TRAINING_NODES,
                                                          *SETTINGS_NODES)}
    workflow = json.loads((pack_root / "example_workflows" / f"{name}.json").read_text())
    links = {link[0]: link for link in workflow["links"]}
    done: dict[int, tuple[tuple, list[bool]]] = {}
    by_type = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["order"]):
        if node["type"] in ("MarkdownNote", "Note"):
            continue
        if node["type"] in substitutes:
            done[node["id"]] = (substitutes[node["type"]], [False] * len(substitutes[node["type"]]))
            continue
        cls = classes[node["type"]]
        schema = cls.GET_SCHEMA()
        values, position = {}, 0
        for input_name, width in widget_inputs(cls.GET_NODE_INFO_V1()):
            values[input_name] = node["widgets_values"][position]
            position += width
        values.update(overrides.get(node["type"], {}))
        as_list = bool(schema.is_input_list)
        kwargs = {k: [v] if as_list else v for k, v in values.items()}
        for entry in node["inputs"]:
            if entry.get("link") is None:
                continue
            _, source, slot, *_ = links[entry["link"]]
            value, is_list = done[source][0][slot], done[source][1][slot]
            if is_list and not as_list:
                raise NotImplementedError(f"{node['type']} maps over a list input; not needed by the examples")
            kwargs[entry["name"]] = value if (is_list or not as_list) else [value]
        result = cls.execute(**kwargs)
        flags = [bool(getattr(o, "is_output_list", False)) for o in schema.outputs]
        done[node["id"]] = (result.args, flags)
        by_type[node["type"]] = result
    return by_type


def check_example() -> dict:
    """lora_09_edit_pairs as shipped, test sizes only, on the tiny Qwen-Image-Edit model."""
    write_pairs(work / "input" / "example_pairs", 1, seed=4)
    model, vae, clip = tiny_qwen(), tiny_wan_vae(), qwen_clip()
    ran = run_example("lora_09_edit_pairs",
                      {"UNETLoader": (model,), "CLIPLoader": (clip,), "VAELoader": (vae,)},
                      {"LoRATrainer_LoadEditPairsDataset": {"folder": "example_pairs", "width": SIZE, "height": SIZE},
                       "LoRATrainer_MakeTrainingDataset": {"control_resize": "match_target"},
                       "LoRATrainer_TrainLoRA": {"steps": 2}})
    saved = [p for p in (work / "loras").rglob("my_edit_lora*.safetensors")]
    out = {"nodes": sorted(ran), "saved": [p.name for p in saved]}
    if saved:
        tensors = comfy.utils.load_torch_file(str(saved[0]), safe_load=True)
        out["unloaded_keys"], out["patched"] = core_loader_check(model, tensors)
    return out


results = {}
for family in families:
    with torch.inference_mode():   # as ComfyUI runs every node
        results[family] = check_family(family) if family != "example" else check_example()
print("RESULTS " + json.dumps(results, default=str))
