"""Folder scan and captions on real files: order, kohya repeats, captions, and every bad folder."""

import os

import pytest
from PIL import Image

from lora_core.data import CaptionOptions, caption_entries, scan_folder
from lora_core.errors import UserInputError


def _png(path, color=(10, 20, 30), size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _text(path, content, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode(encoding) if isinstance(content, str) else content)


def test_order_is_natural_and_extensions_case_insensitive(tmp_path):
    folder = tmp_path / "dogs"
    for name in ["img10.png", "Img3.Png", ".hidden.png"]:
        _png(folder / name)
    Image.new("RGB", (8, 8)).save(folder / "img2.JPG", format="JPEG")
    Image.new("RGB", (8, 8)).save(folder / "img1.webp", format="WEBP")
    (folder / "notes.md").write_text("not an image")
    scan = scan_folder(tmp_path, "dogs")
    assert [e.relative_path for e in scan.entries] == ["dogs/img1.webp", "dogs/img2.JPG", "dogs/Img3.Png",
                                                       "dogs/img10.png"]
    assert scan.repeats == [1, 1, 1, 1]
    assert all(e.path.is_absolute() and e.path.exists() for e in scan.entries)


def test_kohya_folders_give_repeats_and_concepts(tmp_path):
    root = tmp_path / "input"
    _png(root / "set" / "10_dog" / "a.png")
    _png(root / "set" / "10_dog" / "b.png")
    _png(root / "set" / "2_sks cat" / "c.png")
    _png(root / "set" / "top.png")
    _png(root / "set" / "misc" / "deep.png")          # not kohya-named: only read when recursive
    _png(root / "set" / "10_dog" / "extra" / "e.png")  # inside a concept folder: only when recursive

    flat = scan_folder(root, "set")
    assert [(e.relative_path, e.repeats, e.concept) for e in flat.entries] == [
        ("set/2_sks cat/c.png", 2, "sks cat"),
        ("set/10_dog/a.png", 10, "dog"),
        ("set/10_dog/b.png", 10, "dog"),
        ("set/top.png", 1, ""),
    ]
    deep = scan_folder(root, "set", recursive=True)
    by_path = {e.relative_path: (e.repeats, e.concept) for e in deep.entries}
    assert by_path["set/10_dog/extra/e.png"] == (10, "dog")
    assert by_path["set/misc/deep.png"] == (1, "")
    assert len(deep.entries) == 6
    assert "dog: 3 images x 10 repeats" in deep.summary()


def test_captions_bom_whitespace_trigger_and_default(tmp_path):
    folder = tmp_path / "d"
    for name in ["a", "b", "c", "d", "e"]:
        _png(folder / f"{name}.png")
    _text(folder / "a.txt", "\ufeff  a dog on grass \n\n", "utf-8")
    _text(folder / "b.txt", "sks, already tagged")
    _text(folder / "c.txt", "   \n")                    # empty counts as missing
    _text(folder / "d.txt", "un chien à Paris")
    scan = caption_entries(scan_folder(tmp_path, "d"),
                           CaptionOptions(trigger_word="sks", default_caption="a photo"))
    assert scan.captions == ["sks, a dog on grass", "sks, already tagged", "sks, a photo",
                             "sks, un chien à Paris", "sks, a photo"]
    no_trigger = caption_entries(scan_folder(tmp_path, "d"), CaptionOptions())
    assert no_trigger.captions == ["a dog on grass", "sks, already tagged", "", "un chien à Paris", ""]


def test_missing_captions_error_lists_files_and_orphans(tmp_path):
    folder = tmp_path / "d"
    for name in ["a", "b", "c"]:
        _png(folder / f"{name}.png")
    _text(folder / "a.txt", "one")
    _text(folder / "bb.txt", "typo in the name")
    with pytest.raises(UserInputError) as err:
        caption_entries(scan_folder(tmp_path, "d"), CaptionOptions(missing="error"))
    message = str(err.value)
    assert "2 of 3 images" in message and "d/b.png" in message and "d/c.png" in message
    assert "d/bb.txt" in message and ".txt file" in message


def test_caption_extension_is_matched_case_insensitively(tmp_path):
    folder = tmp_path / "d"
    _png(folder / "a.png")
    _png(folder / "b.png")
    _text(folder / "a.CAPTION", "upper case extension")
    _text(folder / "b.txt", "ignored: not the chosen extension")
    scan = caption_entries(scan_folder(tmp_path, "d", caption_extension=".caption"), CaptionOptions())
    assert scan.captions == ["upper case extension", ""]


def test_non_utf8_caption_names_file_and_fix(tmp_path):
    folder = tmp_path / "d"
    _png(folder / "a.png")
    _text(folder / "a.txt", "caf\xe9 au lait", "latin-1")
    with pytest.raises(UserInputError, match=r"d/a\.txt is not UTF-8.*UTF-8 encoding"):
        caption_entries(scan_folder(tmp_path, "d"), CaptionOptions())


def test_bad_caption_options_are_refused():
    with pytest.raises(UserInputError, match="missing captions"):
        CaptionOptions(missing="ignore")
    with pytest.raises(UserInputError, match="extension"):
        scan_folder("/nonexistent", "x", caption_extension="txt")


@pytest.mark.parametrize("name", ["../outside", "a/../../outside", "/etc", "C:\\Windows", ""])
def test_folder_names_that_escape_the_root_are_refused(tmp_path, name):
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    _png(tmp_path / "outside" / "x.png")
    with pytest.raises(UserInputError):
        scan_folder(tmp_path / "root", name)


def test_symlinks_outside_the_root_are_refused(tmp_path):
    root = tmp_path / "root"
    _png(tmp_path / "secret" / "x.png")
    _png(root / "d" / "ok.png")
    os.symlink(tmp_path / "secret", root / "escape")
    with pytest.raises(UserInputError, match="outside"):
        scan_folder(root, "escape")
    os.symlink(tmp_path / "secret" / "x.png", root / "d" / "linked.png")
    with pytest.raises(UserInputError, match="symlink"):
        scan_folder(root, "d")


def test_symlinks_inside_the_root_are_followed_once(tmp_path):
    root = tmp_path / "root"
    _png(root / "d" / "a.png")
    os.symlink(root / "d", root / "d" / "loop")
    scan = scan_folder(root, "d", recursive=True)
    assert [e.relative_path for e in scan.entries] == ["d/a.png"]


def test_empty_missing_and_imageless_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match=r"No images found in .*empty/"):
        scan_folder(tmp_path, "empty")
    with pytest.raises(UserInputError, match="does not exist"):
        scan_folder(tmp_path, "nothing_here")
    _text(tmp_path / "docs" / "readme.txt", "hello")
    _png(tmp_path / "docs" / "sub" / "x.png")
    with pytest.raises(UserInputError, match="recursive"):
        scan_folder(tmp_path, "docs")
    _text(tmp_path / "file.png", "x")
    with pytest.raises(UserInputError, match="is a file"):
        scan_folder(tmp_path, "file.png")


def test_zero_repeat_folder_is_refused(tmp_path):
    _png(tmp_path / "d" / "0_dog" / "a.png")
    with pytest.raises(UserInputError, match="1_dog"):
        scan_folder(tmp_path, "d")
