"""/object_info lists each of the pack's nodes, each input with a tooltip, all under one category root."""
import pytest

PREFIX = "LoRATrainer_"
DISPLAY_NAMES = {
    "Load Image Dataset from Folder", "Load Image and Text Dataset from Folder", "Load Edit Pairs from Folder",
    "Make Training Dataset",
    "Resolution Bucket", "Save Training Dataset", "Load Training Dataset", "Train LoRA", "Save LoRA Weights",
    "Load LoRA Model", "Plot Loss Graph", "LoRA Training Settings", "LoRA Memory Settings",
    "Export Training Job", "Load Video Dataset from Folder", "Load Video and Text Dataset from Folder",
    "Sample Video Clips", "LoRA Sample Settings",
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


def test_train_lora_shows_only_the_everyday_widgets(our_nodes):
    """The default canvas of comfyui-frontend-package 1.49.6 draws `advanced` inputs too, so Train LoRA
    keeps at most a dozen widgets and its knobs sit on the two settings nodes."""
    from workflow_api import widget_inputs

    train = our_nodes[PREFIX + "TrainLoRA"]
    widgets = [name for name, _ in widget_inputs(train)]
    assert len(widgets) <= 12, widgets
    assert {"steps", "learning_rate", "rank", "seed", "existing_lora"} <= set(widgets), widgets
    optional = train["input"].get("optional", {})
    assert optional["settings"][0] == our_nodes[PREFIX + "TrainingSettings"]["output"][0]
    assert optional["memory"][0] == our_nodes[PREFIX + "MemorySettings"]["output"][0]
    flagged = [name for kind in ("required", "optional") for name, entry in train["input"].get(kind, {}).items()
               if len(entry) > 1 and isinstance(entry[1], dict) and entry[1].get("advanced")]
    assert not flagged, f"inputs marked advanced still show on the canvas: {flagged}"
