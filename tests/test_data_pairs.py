"""Edit pairs on real files: both layouts, several controls, kohya folders, captions, every broken pairing."""

import pytest
import torch
from PIL import Image

from lora_core.data import CaptionOptions, ResizeSpec
from lora_core.data.pairs import (PairOptions, as_one_size, control_size, load_pair_folder, resize_control,
                                  scan_pairs)
from lora_core.errors import UserInputError


def _png(path, color=(10, 20, 30), size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _names(scan):
    return [(t.relative_path, [c.relative_path for c in cs]) for t, cs in zip(scan.targets.entries, scan.controls)]


def test_suffix_layout_pairs_each_target_with_its_control(tmp_path):
    for name in ["b.png", "b_control.jpg", "a10.png", "a10_control.png", "a2.png", "a2_control.png"]:
        _png(tmp_path / "pairs" / name)
    scan = scan_pairs(tmp_path, "pairs")
    assert _names(scan) == [("pairs/a2.png", ["pairs/a2_control.png"]), ("pairs/a10.png", ["pairs/a10_control.png"]),
                            ("pairs/b.png", ["pairs/b_control.jpg"])]
    assert scan.layouts == {"suffix"}


def test_control_folder_layout_musubi_and_ai_toolkit(tmp_path):
    _png(tmp_path / "p" / "cat.png")
    _png(tmp_path / "p" / "dog.jpg")
    _png(tmp_path / "p" / "control" / "cat.webp")          # other extension: still cat's
    _png(tmp_path / "p" / "control" / "dog.png")
    scan = scan_pairs(tmp_path, "p")
    assert _names(scan) == [("p/cat.png", ["p/control/cat.webp"]), ("p/dog.jpg", ["p/control/dog.png"])]
    assert scan.layouts == {"folder"}
    # musubi-tuner numbering in one control folder, and ai-toolkit control_N folders, in order
    _png(tmp_path / "q" / "cat.png")
    _png(tmp_path / "q" / "control" / "cat_1.png")
    _png(tmp_path / "q" / "control" / "cat_0.png")
    _png(tmp_path / "q" / "control_2" / "cat.png")
    scan = scan_pairs(tmp_path, "q", max_controls=3)
    assert _names(scan) == [("q/cat.png", ["q/control/cat_0.png", "q/control/cat_1.png", "q/control_2/cat.png"])]


def test_several_suffix_controls_come_unnumbered_first_then_by_number(tmp_path):
    for name in ["x.png", "x_control_10.png", "x_control_2.png", "x_control.png"]:
        _png(tmp_path / "s" / name)
    scan = scan_pairs(tmp_path, "s", max_controls=3)
    assert _names(scan) == [("s/x.png", ["s/x_control.png", "s/x_control_2.png", "s/x_control_10.png"])]


def test_a_target_named_like_a_numbered_control_keeps_its_own(tmp_path):
    _png(tmp_path / "n" / "shot.png")
    _png(tmp_path / "n" / "shot_2.png")
    _png(tmp_path / "n" / "control" / "shot.png")
    _png(tmp_path / "n" / "control" / "shot_2.png")
    scan = scan_pairs(tmp_path, "n")
    assert _names(scan) == [("n/shot.png", ["n/control/shot.png"]), ("n/shot_2.png", ["n/control/shot_2.png"])]


def test_kohya_folders_keep_their_repeats_and_their_own_control_folder(tmp_path):
    _png(tmp_path / "k" / "5_style" / "a.png")
    _png(tmp_path / "k" / "5_style" / "control" / "a.png")
    _png(tmp_path / "k" / "b.png")
    _png(tmp_path / "k" / "b_control.png")
    scan = scan_pairs(tmp_path, "k")
    assert _names(scan) == [("k/5_style/a.png", ["k/5_style/control/a.png"]), ("k/b.png", ["k/b_control.png"])]
    assert scan.targets.repeats == [5, 1]
    # recursive: the control folder's images are still controls, never targets
    assert _names(scan_pairs(tmp_path, "k", recursive=True)) == _names(scan)


def test_every_broken_pairing_is_named_in_one_message(tmp_path):
    for name in ["lonely.png", "ok.png", "ok_control.png", "ghost_control.png", "many.png", "many_control.png",
                 "many_control_2.png"]:
        _png(tmp_path / "b" / name)
    _png(tmp_path / "b" / "control" / "stray.png")
    with pytest.raises(UserInputError) as err:
        scan_pairs(tmp_path, "b")
    text = str(err.value)
    assert "b/lonely.png" in text and "no control image" in text
    assert "b/ghost_control.png" in text and "b/control/stray.png" in text and "no target image" in text
    assert "b/many.png (2)" in text and "max_controls = 1" in text
    assert "ok.png" not in text.replace("ok_control", "")


def test_only_controls_is_a_clear_error(tmp_path):
    _png(tmp_path / "c" / "a_control.png")
    with pytest.raises(UserInputError, match="only control images"):
        scan_pairs(tmp_path, "c")


def test_load_pairs_resizes_both_alike_and_reads_target_captions(tmp_path):
    _png(tmp_path / "l" / "a.png", (200, 0, 0), (40, 20))
    _png(tmp_path / "l" / "a_control.png", (0, 0, 200), (80, 40))
    (tmp_path / "l" / "a.txt").write_text("make it red")
    data = load_pair_folder(tmp_path, "l", captions=CaptionOptions(trigger_word="edt"),
                            resize=ResizeSpec(mode="center_crop", width=32, height=16))
    assert data.images[0].shape == (16, 32, 3) and data.controls[0][0].shape == (16, 32, 3)
    assert data.images[0][..., 0].mean() > 0.7 and data.controls[0][0][..., 2].mean() > 0.7
    assert data.captions == ["edt, make it red"] and "1 with 1 control" in data.summary()


def test_very_different_aspect_ratios_are_refused_by_name(tmp_path):
    _png(tmp_path / "r" / "wide.png", size=(64, 16))
    _png(tmp_path / "r" / "wide_control.png", size=(16, 64))
    with pytest.raises(UserInputError, match=r"r/wide.png 64x16 vs r/wide_control.png 16x64"):
        load_pair_folder(tmp_path, "r")
    data = load_pair_folder(tmp_path, "r", pairs=PairOptions(max_aspect_mismatch=0))  # on purpose: allowed
    assert data.controls[0][0].shape == (64, 16, 3)


def test_skip_bad_drops_the_whole_pair(tmp_path):
    _png(tmp_path / "z" / "a.png")
    _png(tmp_path / "z" / "a_control.png")
    _png(tmp_path / "z" / "b.png")
    (tmp_path / "z" / "b_control.png").write_bytes(b"not a png")
    with pytest.raises(UserInputError, match="b_control.png"):
        load_pair_folder(tmp_path, "z")
    data = load_pair_folder(tmp_path, "z", skip_bad=True)
    assert [e.relative_path for e in data.entries] == ["z/a.png"] and len(data.skipped) == 1


def test_control_size_rules():
    assert control_size("match_target", (300, 200), (512, 256)) == (512, 256)
    assert control_size("none", (300, 200), (512, 256)) is None
    w, h = control_size("area_1024", (2000, 1000), (64, 64))
    assert (w % 16, h % 16) == (0, 0) and abs(w * h / 1024 ** 2 - 1) < 0.05 and abs(w / h - 2) < 0.05
    w, h = control_size("target_area", (100, 100), (128, 32))
    assert (w, h) == (64, 64)
    with pytest.raises(UserInputError):
        control_size("family", (1, 1), (1, 1))
    control = torch.rand(40, 80, 3)
    assert resize_control(control, "match_target", (32, 32)).shape == (32, 32, 3)
    assert resize_control(control, "target_area", (64, 32)).shape == (32, 64, 3)


def test_controls_of_one_target_pad_to_one_size():
    a, b = torch.rand(16, 32, 3), torch.rand(32, 32, 3)
    out = as_one_size([a, b])
    assert [tuple(x.shape) for x in out] == [(16, 32, 3), (16, 32, 3)] and out[0] is a


def test_saved_dataset_keeps_each_samples_reference_latents(tmp_path):
    """An edit-pair dataset (reference latents in each sample's conditioning, as ReferenceLatent puts them) saves
    and loads bit for bit; the shared caption embedding is stored once, each reference latent once."""
    from lora_core.data import load_dataset, save_dataset
    from lora_core.data.pairs import EDIT_FAMILY_KEY
    from lora_core.data.cond_codec import CondEncoder

    text = torch.randn(1, 7, 32)
    refs = [[torch.randn(1, 16, 1, 4, 4)], [torch.randn(1, 16, 1, 4, 4), torch.randn(1, 16, 1, 6, 6)]]
    conds = [[[text, {"reference_latents": r, EDIT_FAMILY_KEY: "qwen_image_edit_plus"}]] for r in refs]
    latents = [torch.randn(16, 1, 4, 4), torch.randn(16, 1, 4, 4)]
    save_dataset(tmp_path, "pairs", latents, conds)
    loaded = load_dataset(tmp_path, "pairs")
    for original, back in zip(conds, loaded.conds):
        assert torch.equal(back[0][0], text) and back[0][1][EDIT_FAMILY_KEY] == "qwen_image_edit_plus"
        assert len(back[0][1]["reference_latents"]) == len(original[0][1]["reference_latents"])
        assert all(torch.equal(a, b) for a, b in zip(back[0][1]["reference_latents"], original[0][1]["reference_latents"]))
    encoder = CondEncoder()
    for i, c in enumerate(conds):
        encoder.encode(c, f"sample {i}")
    assert len(encoder.tensors) == 4   # one text embedding + three reference latents


def test_edit_families():
    from lora_core.data.pairs import EDIT_FAMILIES, edit_family, family_by_key
    assert [f.max_controls for f in EDIT_FAMILIES.values()] == [1, 1, 3]
    assert family_by_key("flux_kontext").model_configs == ("Flux",)
    with pytest.raises(UserInputError, match="Flux.1 Kontext"):
        edit_family("SDXL")
