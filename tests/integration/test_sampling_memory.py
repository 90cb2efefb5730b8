"""Peak memory of a Train LoRA run that samples: the larger of training and sampling, not their sum.

Runs in a child process in ComfyUI's Python on the tiny SD1.5 checkpoint (CPU), calling the node's
own run_training with and without sample prompts, and drawing the samples alone in a training
session; peaks come from the profiler's allocation events (what a GPU's allocator would count).
Sampling is set to a larger image than training, so both peaks matter and a sum would show.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

from comfy_server import CHECKPOINT, REPO_ROOT, build_fixture_models, comfy_python

CHILD = r'''
import importlib.util, json, sys
from pathlib import Path
comfy_root, pack_root, checkpoint, work = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
sys.path.insert(0, comfy_root)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.sd, folder_paths
for name in ("loras",):
    (work / name).mkdir(parents=True, exist_ok=True)
    folder_paths.folder_names_and_paths[name] = ([str(work / name)], folder_paths.supported_pt_extensions)
folder_paths.set_output_directory(str(work / "output"))
spec = importlib.util.spec_from_file_location("lora_trainer_pack", Path(pack_root) / "__init__.py",
                                              submodule_search_locations=[pack_root])
pack = importlib.util.module_from_spec(spec); sys.modules["lora_trainer_pack"] = pack; spec.loader.exec_module(pack)
from lora_trainer_pack.nodes import comfy_glue as glue, training_nodes as tn
from lora_trainer_pack.nodes.lists import single
from lora_trainer_pack.nodes.sampling_glue import TrainingSamples, sample_request
from lora_trainer_pack.nodes.training_settings import merged_values
from lora_trainer_pack.lora_core.training.loop import TrainingData
from lora_trainer_pack.lora_core.training.sampling import SampleSchedule
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

def peak_of(run):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop(); stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size; peak = max(peak, live)
    return peak

torch.manual_seed(0)
model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)
with torch.no_grad():  # as ComfyUI runs nodes: no autograd graph behind the conditioning
    caption = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks toy"))
    prompt = clip.encode_from_tokens_scheduled(clip.tokenize("sks toy on grass"))
data = TrainingData(latents=[torch.randn(4, 8, 8) for _ in range(4)], conds=[caption])
values = merged_values(tn.TrainLoRA.define_schema().inputs, {"steps": 4, "batch_size": 2, "rank": 4, "alpha": 4.0,
                       "sample_every_steps": 2, "training_dtype": "fp32", "lora_dtype": "fp32"}, single)
values["sample_settings"].update(steps=3, width=192, height=192)  # latents 24x24 against training's 8x8
config = tn.train_config(values, False)
request = sample_request([prompt], [], vae, values["sample_settings"], [None])

def sampling_alone():
    samples = TrainingSamples(request, SampleSchedule(), (4, 8, 8), work / "alone", "alone")
    with glue.training_session(model, False) as denoiser, torch.no_grad():
        samples.draw(denoiser.patcher, 0)

results = {}
sampling_alone()  # warm-up: first-call caches (sigmas, attention backends) are not what is measured
results["train"] = peak_of(lambda: tn.run_training(model, data, config, values))
results["sample"] = peak_of(sampling_alone)
results["train_and_sample"] = peak_of(lambda: tn.run_training(model, data, config, values,
                                                               tn.SampleSink(request, None, None)))
output = tn.run_training(model, data, config, values, tn.SampleSink(request, None, None))
lora = output.args[0]
results["lora_bytes"] = sum(t.numel() * t.element_size() for t in lora.values())
results["grid"] = list(output.args[3].shape)
print("RESULTS " + json.dumps(results))
'''


@pytest.fixture(scope="module")
def peaks(tmp_path_factory):
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        pytest.skip("COMFYUI_ROOT is not set: this check needs a ComfyUI checkout")
    python = comfy_python(Path(root))
    fixture = build_fixture_models(Path(root), python)
    work = tmp_path_factory.mktemp("sampling_memory")
    script = work / "child.py"
    script.write_text(CHILD)
    done = subprocess.run([python, str(script), root, str(REPO_ROOT), str(fixture / "checkpoints" / CHECKPOINT),
                           str(work)], capture_output=True, text=True, timeout=1800, cwd=root)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stdout[-4000:] + done.stderr[-8000:]
    return json.loads(lines[-1][len("RESULTS "):])


def test_a_run_that_samples_peaks_at_the_larger_of_training_and_sampling(peaks):
    train, sample, both = peaks["train"], peaks["sample"], peaks["train_and_sample"]
    print(f"peak allocations: training {train / 2**20:.1f} MiB, sampling alone {sample / 2**20:.1f} MiB, "
          f"training with sampling {both / 2**20:.1f} MiB")
    assert sample > 0.3 * train and train > 0.3 * sample, peaks  # both matter: a sum would show
    # Between steps the adapters and the optimizer's state stay (AdamW: two moments): 3x the LoRA.
    resident = 3 * peaks["lora_bytes"]
    assert both <= max(train, sample + resident) * 1.05, peaks
    assert both < train + 0.5 * sample, peaks
    assert peaks["grid"] == [1, 2 * 192, 192, 3]  # rows at steps 2 and 4, one prompt
