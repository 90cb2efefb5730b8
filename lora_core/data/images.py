"""Read any common image file as an RGB float tensor [H, W, 3] in 0..1 (ComfyUI's IMAGE layout).

EXIF orientation is applied first, so a phone photo trains upright. 16-bit grayscale is scaled
by 65535 straight from its integer values, never through 8 bits. Transparency is either
composited over a background colour (what the picture looks like in a viewer) or dropped.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import UserInputError

log = logging.getLogger(__name__)

ALPHA_MODES = ("composite", "drop")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_IMAGE_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# What a broken or unreadable file raises inside Pillow's decoders.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class ImageTooLarge(UserInputError):
    """An image over the pixel limit: a setting to change, so `skip_bad` never hides it."""


@dataclass(frozen=True)
class ImageLoadOptions:
    alpha: str = "composite"                           # "composite" over `background`, or "drop"
    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int = 64_000_000                       # larger files are refused before decoding

    def __post_init__(self) -> None:
        if self.alpha not in ALPHA_MODES:
            raise UserInputError(f"alpha = {self.alpha!r} is not an option: use one of {', '.join(ALPHA_MODES)}.")
        check_rgb_color(self.background, "background colour")
        if self.max_pixels < 1:
            raise UserInputError(f"max pixels = {self.max_pixels} must be at least 1 (e.g. 64000000 for 64 MP).")


@dataclass
class LoadedImages:
    images: list[torch.Tensor]                     # each [H, W, 3] float32 in 0..1
    kept: list[int]                                # index into the input list of each image
    skipped: list[str] = field(default_factory=list)   # one "file: reason" per skipped file


def load_image(path: str | os.PathLike, options: ImageLoadOptions | None = None,
               shown: str | None = None) -> torch.Tensor:
    """The image at `path` as [H, W, 3] float32 in 0..1; `shown` is the name used in messages."""
    options = options or ImageLoadOptions()
    shown = shown or str(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > options.max_pixels:
                raise ImageTooLarge(
                    f"Image {shown} is {width}x{height} = {width * height / 1e6:.1f} MP, over the limit of "
                    f"{options.max_pixels / 1e6:g} MP: shrink it in an image editor or raise the pixel limit."
                )
            img.load()
            upright = ImageOps.exif_transpose(img)
            return _to_rgb_tensor(upright, options)
    except UserInputError:
        raise
    except FileNotFoundError as err:
        raise UserInputError(f"Image {shown} does not exist any more: scan the folder again.") from err
    except _DECODE_ERRORS as err:
        raise UserInputError(
            f"Image {shown} could not be read ({type(err).__name__}: {err}); the file is corrupt, truncated "
            f"or not an image: re-export it, or remove it from the folder, or turn on skipping bad images."
        ) from err


def load_images(paths: list, options: ImageLoadOptions | None = None, skip_bad: bool = False,
                shown: list[str] | None = None) -> LoadedImages:
    """Every readable image; with `skip_bad`, unreadable ones are logged and left out instead of raising.

    Only unreadable files are skipped: an image over the pixel limit is a setting to change, so it
    always raises.
    """
    shown = shown or [str(p) for p in paths]
    result = LoadedImages(images=[], kept=[])
    for index, path in enumerate(paths):
        try:
            image = load_image(path, options, shown[index])
        except UserInputError as err:
            if not skip_bad or isinstance(err, ImageTooLarge):
                raise
            log.warning("Skipping bad image: %s", err)
            result.skipped.append(f"{shown[index]}: {err.__cause__ or err}")
            continue
        result.images.append(image)
        result.kept.append(index)
    if not result.images:
        raise UserInputError(
            f"None of the {len(paths)} images could be read ({'; '.join(result.skipped[:3])}): "
            f"re-export them as PNG or JPEG."
        )
    return result


def _to_rgb_tensor(img: Image.Image, options: ImageLoadOptions) -> torch.Tensor:
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES:  # "I" (32-bit) is read as 16-bit data, as ComfyUI does; above 65535 clips
        gray = torch.from_numpy(np.asarray(img).astype(np.float32)) / 65535.0
        return gray.clamp_(0.0, 1.0).unsqueeze(-1).expand(-1, -1, 3).contiguous()
    if mode == "F":
        gray = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
        return gray.clamp_(0.0, 1.0).unsqueeze(-1).expand(-1, -1, 3).contiguous()
    if mode in ALPHA_IMAGE_MODES or "transparency" in img.info:
        rgba = _uint8_to_float(img.convert("RGBA"))
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        if options.alpha == "drop":
            return rgb.contiguous()
        background = torch.tensor(options.background, dtype=torch.float32) / 255.0
        return (rgb * alpha + background * (1.0 - alpha)).clamp_(0.0, 1.0)
    return _uint8_to_float(img if mode == "RGB" else img.convert("RGB"))


def _uint8_to_float(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).to(torch.float32).div_(255.0)


def check_rgb_color(color, what: str) -> None:
    if len(color) != 3 or any(not isinstance(c, int) or not 0 <= c <= 255 for c in color):
        raise UserInputError(f"The {what} {color!r} must be three integers 0..255, e.g. (255, 255, 255).")


def shown_paths(root: Path, relative_paths: list[str]) -> list[str]:
    """Names for messages: `input/dogs/a.png` rather than a long absolute path."""
    return [f"{Path(root).name}/{rel}" for rel in relative_paths]
