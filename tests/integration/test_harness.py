"""The harness itself: the tiny SD1.5 checkpoint loads in core nodes, the pack is served, templates are listed."""
import json
from pathlib import Path

from comfy_server import PACK_LINK_NAME, REPO_ROOT
from it_helpers import core_sampling_prompt
from workflow_api import convert

EXAMPLES = sorted((REPO_ROOT / "example_workflows").glob("*.json"))


def test_tiny_checkpoint_is_sd15_and_samples(comfy):
    result = comfy.run_ok(core_sampling_prompt())
    saved = result.outputs["5"]["latents"][0]
    assert (comfy.output_dir / saved["subfolder"] / saved["filename"]).exists()
    assert "model_type EPS" in comfy.log_text()  # detected as an SD1.5-style eps model (logged at first load)


def test_pack_imported_without_errors(comfy):
    log = comfy.log_text()
    assert f"(IMPORT FAILED): {comfy.base_dir / 'custom_nodes' / PACK_LINK_NAME}" not in log, log[-6000:]


def test_example_workflows_are_listed_as_templates(comfy):
    templates = comfy.get_json("/workflow_templates")
    assert sorted(templates.get(PACK_LINK_NAME, [])) == sorted(p.stem for p in EXAMPLES)
    first = EXAMPLES[0]
    served = comfy.get_json(f"/api/workflow_templates/{PACK_LINK_NAME}/{first.name}")
    assert served == json.loads(first.read_text())


def test_every_example_converts_against_the_live_node_definitions(comfy):
    object_info = comfy.object_info()
    assert EXAMPLES, "example_workflows/ is empty"
    for path in EXAMPLES:
        prompt = convert(json.loads(Path(path).read_text()), object_info)
        assert prompt, path.name
