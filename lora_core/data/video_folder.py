"""A folder of videos (and captions, and optionally still images) to probed, lazily read clips.

The same folder rules as images (scan.py): inside the root, natural order, kohya-ss `N_concept`
repeats as weights, captions from `name.txt` (captions.py). Each file is probed (video.py), which
reads no pixels; a file that cannot be used stops the run with its name, or is left out and listed
when `skip_bad` is on. Frames are decoded later, only for the clips actually trained on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..errors import UserInputError
from .captions import CaptionOptions, caption_entries
from .clips import VideoClip, full_clip
from .images import shown_paths
from .scan import IMAGE_EXTENSIONS, EntryLabels, FolderScan, ImageEntry, _shown, scan_folder
from .video import DEFAULT_MAX_PIXELS, VIDEO_EXTENSIONS, VideoUnreadable, probe_video

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoFolderOptions:
    recursive: bool = False
    include_images: bool = True                     # still images become one-frame clips
    captions: CaptionOptions | None = None          # None: captions not read
    caption_extension: str = ".txt"
    skip_bad: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class VideoFolder(EntryLabels):
    clips: list[VideoClip]          # one per file, whole video, nothing decoded
    entries: list[ImageEntry]       # same order: relative path, caption, repeats, concept
    skipped: list[str]              # "file: reason" for files left out by skip_bad
    scan: FolderScan

    def summary(self) -> str:
        videos = sum(1 for c in self.clips if not c.source.is_image)
        lines = [f"{videos} videos and {len(self.clips) - videos} images in {_shown(self.scan.root, self.scan.folder)}"]
        for clip, entry in zip(self.clips, self.entries):
            info = clip.source
            if not info.is_image:
                note = ", variable frame rate: sampled by timestamps" if info.variable_fps else ""
                lines.append(f"  {entry.relative_path}: {info.frame_count} frames, {info.fps:.3g} fps, "
                             f"{info.width}x{info.height}, x{entry.repeats}{note}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable files:")
            lines.extend(f"  {s}" for s in self.skipped)
        return "\n".join(lines)


def load_video_folder(root: str | os.PathLike, folder: str,
                      options: VideoFolderOptions | None = None) -> VideoFolder:
    """Every usable video (and image, if asked) of `root/folder`, probed, in scan order."""
    options = options or VideoFolderOptions()
    extensions = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS if options.include_images else VIDEO_EXTENSIONS
    scan = scan_folder(root, folder, recursive=options.recursive, caption_extension=options.caption_extension,
                       extensions=frozenset(extensions), kind="videos")
    if options.captions is not None:
        scan = caption_entries(scan, options.captions)
    shown = shown_paths(scan.root, [e.relative_path for e in scan.entries])
    clips, entries, skipped = [], [], []
    for entry, name in zip(scan.entries, shown):
        try:
            info = probe_video(entry.path, name, options.max_pixels)
        except VideoUnreadable as err:
            if not options.skip_bad:
                raise
            log.warning("Skipping bad file: %s", err)
            skipped.append(f"{name}: {err}")
            continue
        clips.append(full_clip(info, skip_bad=options.skip_bad))
        entries.append(entry)
    if not clips:
        raise UserInputError(
            f"None of the {len(scan.entries)} files could be read ({'; '.join(skipped[:3])}): re-export them "
            f"(e.g. as H.264 mp4)."
        )
    return VideoFolder(clips=clips, entries=entries, skipped=skipped, scan=scan)
