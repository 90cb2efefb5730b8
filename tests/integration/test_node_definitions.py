"""/object_info lists the pack's thirteen nodes, each input with a tooltip, all under one category root."""
import pytest

PREFIX = "LoRATrainer_"
DISPLAY_NAMES = {
    "Load Image Dataset from Folder", "Load Image and Text Dataset from Folder", "Make Training Dataset",
    "Resolution Bucket", "Save Training Dataset", "Load Training Dataset", "Train LoRA", "Save LoRA Weights",
    "Load LoRA Model", "Plot Loss Graph", "Load Video Dataset from Folder", "Load Video and Text Dataset from Folder",
    "Sample Video Clips",
}


@pytest.fixture(scope="module")
def our_nodes(comfy):
    return {name: info for name, info in comfy.object_info().items() if name.startswith(PREFIX)}


def test_all_nodes_are_listed(our_nodes):
    assert {info["display_name"] for info in our_nodes.values()} == DISPLAY_NAMES, sorted(our_nodes)
    assert len(our_nodes) == len(DISPLAY_NAMES)


def test_every_input_has_a_tooltip(our_nodes):
    missing = []
    for name, info in our_nodes.items():
        for kind in ("required", "optional"):
            for input_name, entry in info["input"].get(kind, {}).items():
                options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                if not str(options.get("tooltip", "")).strip():
                    missing.append(f"{name}.{input_name}")
    assert not missing, f"inputs without a tooltip: {missing}"


def test_categories_share_one_root(our_nodes):
    roots = {info["category"].split("/")[0] for info in our_nodes.values()}
    assert len(roots) == 1, roots


def test_core_training_nodes_still_load_beside_ours(comfy):
    info = comfy.object_info()
    for core in ("TrainLoraNode", "LoraModelLoader", "LossGraphNode", "LoraLoader", "SaveTrainingDataset"):
        assert core in info, f"core node {core} is missing with the pack installed"
