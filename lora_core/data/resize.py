"""Resize images to the sizes a VAE accepts: whole multiples of 8 pixels.

Works on [H, W, 3] float tensors so 16-bit sources keep their precision; downscaling is
antialiased (bicubic), results are clamped to 0..1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserInputError
from .images import check_rgb_color

RESIZE_MODES = ("none", "stretch", "center_crop", "pad")
MAX_SIDE = 16384


@dataclass(frozen=True)
class ResizeSpec:
    """What size to make each image.

    `longest_side` > 0 keeps each image's aspect ratio and wins over width x height. Sizes are
    snapped to the nearest multiple of `multiple`. Mode "none" leaves images as they are.
    """
    mode: str = "none"                  # none | stretch | center_crop | pad
    width: int = 0
    height: int = 0
    longest_side: int = 0
    pad_color: tuple[int, int, int] = (0, 0, 0)
    multiple: int = 8

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise UserInputError(f"resize mode {self.mode!r} is not an option: use one of {', '.join(RESIZE_MODES)}.")
        for name in ("width", "height", "longest_side"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_SIDE:
                raise UserInputError(f"resize {name} = {value} must be between 0 (unused) and {MAX_SIDE}.")
        if self.multiple < 1:
            raise UserInputError(f"resize multiple = {self.multiple} must be at least 1 (8 suits most VAEs).")
        if self.mode != "none" and self.longest_side == 0 and (self.width == 0 or self.height == 0):
            raise UserInputError(
                f"resize mode {self.mode!r} needs a size: set width and height, or longest side."
            )
        check_rgb_color(self.pad_color, "pad colour")

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image of this size becomes."""
        if self.mode == "none":
            return width, height
        if self.longest_side:
            scale = self.longest_side / max(width, height)
            return snap(width * scale, self.multiple), snap(height * scale, self.multiple)
        return snap(self.width, self.multiple), snap(self.height, self.multiple)


def snap(value: float, multiple: int) -> int:
    """Nearest whole multiple of `multiple`, at least `multiple`."""
    return max(multiple, int(value / multiple + 0.5) * multiple)


def resize_image(image: torch.Tensor, spec: ResizeSpec) -> torch.Tensor:
    height, width = image.shape[0], image.shape[1]
    target_w, target_h = spec.target_size(width, height)
    if spec.mode == "none":
        return image
    if spec.mode == "stretch":
        return interpolate(image, target_w, target_h)
    if spec.mode == "center_crop":
        return cover_crop(image, target_w, target_h)
    return fit_pad(image, target_w, target_h, spec.pad_color)


def interpolate(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[H, W, 3] resized to exactly width x height."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    nchw = image.permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(nchw, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out.squeeze(0).permute(1, 2, 0).clamp_(0.0, 1.0).contiguous()


def cover_crop(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Scaled to cover width x height, then the centre cut out: no distortion, no borders."""
    src_h, src_w = image.shape[0], image.shape[1]
    scale = max(width / src_w, height / src_h)
    new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    scaled = interpolate(image, new_w, new_h)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return scaled[top:top + height, left:left + width].contiguous()


def fit_pad(image: torch.Tensor, width: int, height: int, color: tuple[int, int, int]) -> torch.Tensor:
    """Scaled to fit inside width x height, centred on a `color` canvas: nothing is cut off."""
    src_h, src_w = image.shape[0], image.shape[1]
    scale = min(width / src_w, height / src_h)
    new_w = min(width, max(1, round(src_w * scale)))
    new_h = min(height, max(1, round(src_h * scale)))
    scaled = interpolate(image, new_w, new_h)
    canvas = (torch.tensor(color, dtype=image.dtype) / 255.0).expand(height, width, 3).clone()
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = scaled
    return canvas
