"""A folder of images (and captions) to a list of ready image tensors: scan, caption, load, resize.

This is the whole "Load Image (and Text) Dataset from Folder" job in one call, so the nodes only
translate their inputs into `FolderOptions`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .captions import CaptionOptions, caption_entries
from .images import ImageLoadOptions, load_images, shown_paths
from .resize import ResizeSpec, resize_image
from .scan import FolderScan, ImageEntry, scan_folder


@dataclass(frozen=True)
class FolderOptions:
    recursive: bool = False
    captions: CaptionOptions | None = None          # None: images only, captions not read
    caption_extension: str = ".txt"
    image: ImageLoadOptions = field(default_factory=ImageLoadOptions)
    resize: ResizeSpec = field(default_factory=ResizeSpec)
    skip_bad: bool = False                          # leave unreadable images out (logged) instead of failing


@dataclass
class FolderDataset:
    images: list[torch.Tensor]      # each [H, W, 3] float32 in 0..1
    entries: list[ImageEntry]       # same order as images: relative path, caption, repeats, concept
    skipped: list[str]              # "file: reason" for images left out by skip_bad
    scan: FolderScan

    @property
    def kept(self) -> FolderScan:
        """The scan narrowed to the images that loaded (skip_bad may have left some out)."""
        return self.scan.with_entries(self.entries)

    @property
    def captions(self) -> list[str]:
        return self.kept.captions

    @property
    def repeats(self) -> list[int]:
        return self.kept.repeats

    def summary(self) -> str:
        lines = [self.kept.summary()]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable images:")
            lines.extend(f"  {s}" for s in self.skipped)
        return "\n".join(lines)


def load_image_folder(root: str | os.PathLike, folder: str, options: FolderOptions | None = None) -> FolderDataset:
    """The images of `root/folder` in scan order, loaded and resized, with their entries."""
    options = options or FolderOptions()
    scan = scan_folder(root, folder, recursive=options.recursive, caption_extension=options.caption_extension)
    if options.captions is not None:
        scan = caption_entries(scan, options.captions)
    shown = shown_paths(scan.root, [e.relative_path for e in scan.entries])
    loaded = load_images(scan.paths, options.image, skip_bad=options.skip_bad, shown=shown)
    images = [resize_image(image, options.resize) for image in loaded.images]
    entries = [scan.entries[i] for i in loaded.kept]
    return FolderDataset(images=images, entries=entries, skipped=loaded.skipped, scan=scan)
