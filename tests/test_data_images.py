"""Image loading and resizing on real files of every common kind."""

import numpy as np
import pytest
import torch
from PIL import Image

from lora_core.data import (FolderOptions, ImageLoadOptions, ImageTooLarge, ResizeSpec, load_image,
                            load_image_folder, load_images, resize_image)
from lora_core.errors import UserInputError


def _rgb_gradient(width, height):
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                           np.full((height, width, 1), 77, np.float32)], axis=2).round().astype(np.uint8)


def test_png_is_exact_float_layout(tmp_path):
    pixels = _rgb_gradient(24, 16)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.shape == (16, 24, 3) and image.dtype == torch.float32
    assert torch.equal(image, torch.from_numpy(pixels).float() / 255.0)


@pytest.mark.parametrize("fmt,ext", [("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tif"), ("JPEG", "jpeg")])
def test_other_formats_load_as_rgb(tmp_path, fmt, ext):
    extra = {"lossless": True} if fmt == "WEBP" else {}
    Image.new("RGB", (20, 12), (200, 40, 90)).save(tmp_path / f"a.{ext}", format=fmt, **extra)
    image = load_image(tmp_path / f"a.{ext}")
    assert image.shape == (12, 20, 3)
    assert torch.allclose(image[6, 10], torch.tensor([200, 40, 90]) / 255.0, atol=3 / 255)


def test_jpeg_exif_orientation_6_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:10, :10] = (255, 0, 0)              # red mark at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6                            # "rotate 90 CW to display"
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    image = load_image(tmp_path / "phone.jpg")
    assert image.shape == (40, 20, 3)           # displayed upright: portrait
    assert image[3, 16, 0] > 0.8 and image[3, 16, 1] < 0.2   # the mark is now top-right
    assert image[3, 3, 0] < 0.2


def test_rgba_composited_on_background_or_alpha_dropped(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :4, 3] = 255      # left half opaque red
    rgba[:, 4:, 3] = 0        # right half fully transparent (colour red underneath)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    white = load_image(tmp_path / "a.png")
    assert torch.equal(white[0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(white[0, 7], torch.tensor([1.0, 1.0, 1.0]))
    green = load_image(tmp_path / "a.png", ImageLoadOptions(background=(0, 255, 0)))
    assert torch.equal(green[0, 7], torch.tensor([0.0, 1.0, 0.0]))
    dropped = load_image(tmp_path / "a.png", ImageLoadOptions(alpha="drop"))
    assert torch.equal(dropped[0, 7], torch.tensor([1.0, 0.0, 0.0]))


def test_grayscale_la_and_palette_with_transparency(tmp_path):
    Image.new("L", (6, 4), 128).save(tmp_path / "g.png")
    gray = load_image(tmp_path / "g.png")
    assert gray.shape == (4, 6, 3) and torch.allclose(gray, torch.full((4, 6, 3), 128 / 255))
    Image.new("LA", (6, 4), (0, 0)).save(tmp_path / "la.png")
    assert torch.equal(load_image(tmp_path / "la.png"), torch.ones(4, 6, 3))   # transparent -> white
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert torch.equal(load_image(tmp_path / "p.png")[0, 0], torch.tensor([0.0, 0.0, 1.0]))
    palette.save(tmp_path / "pt.png", transparency=1)
    assert torch.equal(load_image(tmp_path / "pt.png")[0, 0], torch.tensor([1.0, 1.0, 1.0]))


def test_16_bit_png_keeps_full_precision(tmp_path):
    values = (np.arange(64, dtype=np.uint16) * 1000 + 1).reshape(8, 8)   # not multiples of 257
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = load_image(tmp_path / "deep.png")
    assert image.shape == (8, 8, 3)
    assert np.array_equal((image[..., 0].double() * 65535).round().numpy().astype(np.uint16), values)
    assert torch.equal(image[..., 0], image[..., 2])
    # 1001 and 1002 would be the same value after a trip through 8 bits.
    Image.fromarray(np.array([[1001, 1002]], np.uint16)).save(tmp_path / "close.png")
    close = load_image(tmp_path / "close.png")
    assert close[0, 0, 0] != close[0, 1, 0]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    image = load_image(tmp_path / "c.jpg")
    assert image.shape == (16, 16, 3)
    assert torch.allclose(image[8, 8], torch.tensor([1.0, 0.0, 0.0]), atol=0.05)


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not a png at all")
    Image.fromarray(_rgb_gradient(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ("junk.png", "cut.png"):
        with pytest.raises(UserInputError, match=rf"Image .*{name} could not be read.*re-export"):
            load_image(tmp_path / name)


def test_skip_bad_leaves_unreadable_files_out(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG broken")
    Image.new("RGB", (8, 8), (4, 5, 6)).save(tmp_path / "c.png")
    paths = [tmp_path / n for n in ("a.png", "b.png", "c.png")]
    with pytest.raises(UserInputError, match="b.png"):
        load_images(paths)
    loaded = load_images(paths, skip_bad=True)
    assert loaded.kept == [0, 2] and len(loaded.images) == 2
    assert len(loaded.skipped) == 1 and "b.png" in loaded.skipped[0]


def test_pixel_limit_names_the_file_even_with_skip_bad(tmp_path):
    Image.new("RGB", (100, 50)).save(tmp_path / "big.png")
    with pytest.raises(ImageTooLarge, match=r"big\.png is 100x50.*pixel limit"):
        load_images([tmp_path / "big.png"], ImageLoadOptions(max_pixels=4999), skip_bad=True)
    assert load_image(tmp_path / "big.png", ImageLoadOptions(max_pixels=5000)).shape == (50, 100, 3)


def test_bad_load_options_are_refused():
    with pytest.raises(UserInputError, match="alpha"):
        ImageLoadOptions(alpha="keep")
    with pytest.raises(UserInputError, match="background"):
        ImageLoadOptions(background=(300, 0, 0))


# --- resizing ---------------------------------------------------------------------------------

def _two_tone(width, height):
    """Left half black, right half white: shows where crops and pads land."""
    image = torch.zeros(height, width, 3)
    image[:, width // 2:] = 1.0
    return image


def test_resize_none_keeps_the_image():
    image = torch.rand(30, 50, 3)
    assert resize_image(image, ResizeSpec()) is image


def test_stretch_hits_exact_size_snapped_to_8():
    out = resize_image(torch.rand(30, 50, 3), ResizeSpec(mode="stretch", width=100, height=61))
    assert out.shape == (64, 104, 3)          # 100 -> 104, 61 -> 64: nearest multiples of 8
    assert out.min() >= 0 and out.max() <= 1


def test_center_crop_cuts_the_sides_evenly():
    # 200x100 (2:1) cropped to 64x64: the centre column is the black/white edge.
    out = resize_image(_two_tone(200, 100), ResizeSpec(mode="center_crop", width=64, height=64))
    assert out.shape == (64, 64, 3)
    assert torch.all(out[:, :28] < 0.02) and torch.all(out[:, 36:] > 0.98)


def test_pad_keeps_everything_and_fills_with_the_pad_colour():
    out = resize_image(torch.ones(50, 100, 3), ResizeSpec(mode="pad", width=64, height=64, pad_color=(255, 0, 0)))
    assert out.shape == (64, 64, 3)
    assert torch.equal(out[0, 32], torch.tensor([1.0, 0.0, 0.0]))     # top band is padding
    assert torch.equal(out[63, 32], torch.tensor([1.0, 0.0, 0.0]))    # bottom band too
    assert torch.allclose(out[32, 0], torch.ones(3))                  # the image spans the full width
    assert torch.allclose(out[16:48, :], torch.ones(32, 64, 3))


def test_longest_side_keeps_aspect_and_snaps():
    out = resize_image(torch.rand(300, 500, 3), ResizeSpec(mode="stretch", longest_side=256))
    assert out.shape == (152, 256, 3)        # 153.6 -> nearest multiple of 8
    out = resize_image(torch.rand(500, 300, 3), ResizeSpec(mode="center_crop", longest_side=100))
    assert out.shape == (104, 64, 3)


def test_resize_needs_a_size():
    with pytest.raises(UserInputError, match="needs a size"):
        ResizeSpec(mode="pad")
    with pytest.raises(UserInputError, match="resize mode"):
        ResizeSpec(mode="zoom")


def test_folder_dataset_end_to_end(tmp_path):
    folder = tmp_path / "input" / "set" / "5_cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 32), (255, 0, 0)).save(folder / "1.png")
    (folder / "2.png").write_bytes(b"broken")
    Image.new("L", (40, 40), 255).save(folder / "3.jpg")
    (folder / "1.txt").write_text("red")
    from lora_core.data import CaptionOptions
    result = load_image_folder(tmp_path / "input", "set", FolderOptions(
        captions=CaptionOptions(trigger_word="cat", default_caption="a cat"),
        resize=ResizeSpec(mode="center_crop", width=32, height=32), skip_bad=True))
    assert [e.relative_path for e in result.entries] == ["set/5_cat/1.png", "set/5_cat/3.jpg"]
    assert result.captions == ["cat, red", "cat, a cat"]
    assert result.repeats == [5, 5]
    assert [tuple(i.shape) for i in result.images] == [(32, 32, 3), (32, 32, 3)]
    assert "skipped 1" in result.summary()
