"""Cut training clips out of videos: frame counts the VAE accepts, a frame rate, where the clips start.

A causal video VAE (Wan, HunyuanVideo, LTX) encodes the first frame alone and then groups of k
frames, so it takes 1 + k*m frames: 4k+1 for Wan / HunyuanVideo (1, 5, ..., 81), 8k+1 for LTX.
`FrameRule` holds k and snaps a count down to the nearest one the VAE takes.

A video is first resampled to a timeline of source-frame indices: every `frame_stride`-th frame,
or, with `target_fps`, the frame shown at each tick of that rate (by timestamp, so variable-rate
videos come out evenly timed). Clips of `frames` frames are then taken from that timeline, with
musubi-tuner's extraction names:
- head: the first clip;            - chunk: back-to-back clips, no overlap;
- slide: a clip every `slide_step` frames (overlapping);
- uniform: `clips_per_video` clips with starts spread evenly from the first to the last possible;
- random: `clips_per_video` clips at random starts (seeded, so the same each run);
- full: the whole video (up to `frames`), snapped to the rule.
Only indices are planned here; frames are decoded later, and only those (see video.read_frames).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import torch

from ..errors import UserInputError
from .video import VideoInfo, read_frames

EXTRACTIONS = ("head", "uniform", "chunk", "slide", "random", "full")
TOO_SHORT_POLICIES = ("error", "skip", "shorter_clip")


@dataclass(frozen=True)
class FrameRule:
    """Frame counts a VAE accepts: 1 + step*m (step 1: any count)."""
    step: int = 1

    def __post_init__(self) -> None:
        if self.step < 1:
            raise UserInputError(f"frame rule step = {self.step} must be 1 or more (4 for Wan, 8 for LTX).")

    def accepts(self, frames: int) -> bool:
        return frames >= 1 and (frames - 1) % self.step == 0

    def snap_down(self, frames: int) -> int:
        """The largest accepted count <= frames (at least 1)."""
        return 1 + max(0, (frames - 1) // self.step) * self.step

    def describe(self) -> str:
        if self.step == 1:
            return "any frame count"
        examples = ", ".join(str(1 + self.step * m) for m in range(4))
        return f"{self.step}k+1 frames ({examples}, ...)"


@dataclass(frozen=True)
class ClipOptions:
    frames: int = 33
    extraction: str = "head"
    target_fps: float = 0.0        # 0: keep the source rate (then frame_stride applies)
    frame_stride: int = 1          # every n-th source frame, when target_fps is 0
    clips_per_video: int = 1       # uniform / random: how many; chunk / slide: at most (0 = all)
    slide_step: int = 0            # slide: frames between clip starts (0 = half a clip)
    seed: int = 0
    too_short: str = "error"       # a video shorter than a clip: error | skip | shorter_clip
    rule: FrameRule = FrameRule()

    def __post_init__(self) -> None:
        if self.extraction not in EXTRACTIONS:
            raise UserInputError(f"extraction {self.extraction!r} is not an option: use one of {', '.join(EXTRACTIONS)}.")
        if self.too_short not in TOO_SHORT_POLICIES:
            raise UserInputError(
                f"too_short {self.too_short!r} is not an option: use one of {', '.join(TOO_SHORT_POLICIES)}.")
        if self.frames < 1:
            raise UserInputError(f"frames = {self.frames} must be 1 or more ({self.rule.describe()}).")
        if not math.isfinite(self.target_fps) or self.target_fps < 0:
            raise UserInputError(f"target_fps = {self.target_fps} must be 0 (source rate) or a positive rate, e.g. 16.")
        if self.frame_stride < 1:
            raise UserInputError(f"frame_stride = {self.frame_stride} must be 1 or more (1 = every frame).")
        if self.clips_per_video < 0 or self.slide_step < 0:
            raise UserInputError("clips_per_video and slide_step must be 0 or more.")

    @property
    def clip_frames(self) -> int:
        """`frames` snapped down to what the VAE accepts."""
        return self.rule.snap_down(self.frames)


@dataclass(frozen=True)
class VideoClip:
    """One training clip: which frames of which video, at what rate, cropped to what size."""
    source: VideoInfo
    indices: tuple[int, ...]
    fps: float
    size: tuple[int, int] | None = None      # (width, height) to cover-crop each frame to; None = as is
    start_time: float = 0.0
    skip_bad: bool = False                   # the user asked to skip unreadable files: a decode error drops the clip

    @property
    def frame_count(self) -> int:
        return len(self.indices)

    @property
    def width(self) -> int:
        return self.size[0] if self.size else self.source.width

    @property
    def height(self) -> int:
        return self.size[1] if self.size else self.source.height

    def read(self) -> torch.Tensor:
        """[T, H, W, 3] float32 in 0..1: decodes these frames only."""
        return read_frames(self.source, self.indices, self.size)

    def with_size(self, width: int, height: int) -> "VideoClip":
        return replace(self, size=(int(width), int(height)))

    def sub_clip(self, start: int, count: int) -> "VideoClip":
        """Frames start..start+count of this clip (trimming)."""
        start = max(0, min(start, self.frame_count - 1))
        count = max(1, min(count, self.frame_count - start))
        return replace(self, indices=self.indices[start:start + count],
                       start_time=self.start_time + start / self.fps)

    def describe(self) -> str:
        if self.source.is_image:
            return f"{self.source.shown} (image)"
        first, last = self.indices[0], self.indices[-1]
        return f"{self.source.shown} frames {first}..{last} ({self.frame_count} at {self.fps:g} fps)"


def full_clip(info: VideoInfo, skip_bad: bool = False) -> VideoClip:
    """The whole video as one clip (what a folder loader hands on, nothing decoded)."""
    return VideoClip(source=info, indices=tuple(range(info.frame_count)), fps=info.fps, skip_bad=skip_bad)


def timeline(info: VideoInfo, options: ClipOptions) -> tuple[list[int], float]:
    """(source index of each frame of the resampled video, its frame rate)."""
    if info.is_image:
        return [0], 1.0
    if options.target_fps > 0 or info.variable_fps:
        # By timestamps: even timing at the target rate (or, for a variable-rate video, its average rate).
        fps = options.target_fps if options.target_fps > 0 else info.fps
        span = info.time_of(info.frame_count - 1) + 1.0 / info.fps
        count = max(1, int(span * fps + 1e-6))
        return [info.index_at(k / fps) for k in range(count)], fps
    stride = options.frame_stride
    return list(range(0, info.frame_count, stride)), info.fps / stride


def plan_clips(clip: VideoClip, options: ClipOptions, key: str = "") -> tuple[list[VideoClip], str | None]:
    """(clips cut from `clip`'s frames, why none were cut or None). `key` seeds random starts per video.

    Raises UserInputError for a too-short video when `options.too_short` is "error".
    """
    info = clip.source
    if info.is_image:
        return [replace(clip, indices=(clip.indices[0],), fps=1.0)], None
    base = _restricted(info, clip.indices)
    line, fps = timeline(base, options)
    line = [clip.indices[i] for i in line]
    want = options.clip_frames
    length = len(line)
    if options.extraction == "full":
        starts, want = [0], min(options.rule.snap_down(length), want)
    elif length < want:
        usable = options.rule.snap_down(length)
        message = (f"Video {info.shown} has {length} frames at {fps:g} fps (after target_fps / frame_stride; "
                   f"{info.frame_count} source frames) but clips of {want} frames were asked")
        if options.too_short == "error":
            raise UserInputError(
                f"{message}: lower frames (to {usable} or less), set target_fps lower, or set too_short to "
                f"'skip' or 'shorter_clip'."
            )
        if options.too_short == "skip":
            return [], message
        starts, want = [0], usable
    else:
        starts = _starts(options, length, want, key)
    clips = [VideoClip(source=info, indices=tuple(line[s:s + want]), fps=fps, size=clip.size,
                       start_time=s / fps, skip_bad=clip.skip_bad) for s in starts]
    return clips, None


def _restricted(info: VideoInfo, indices: tuple[int, ...]) -> VideoInfo:
    """A view of `info` holding only `indices` (a clip already trimmed upstream), renumbered 0..n-1."""
    if len(indices) == info.frame_count and indices == tuple(range(info.frame_count)):
        return info
    first = info.time_of(indices[0])
    times = tuple(info.time_of(i) - first for i in indices)
    return replace(info, frame_count=len(indices), frame_times=times, pts=(), frames=None)


def _starts(options: ClipOptions, length: int, want: int, key: str) -> list[int]:
    last = length - want
    limit = options.clips_per_video
    if options.extraction == "head":
        return [0]
    if options.extraction == "chunk":
        starts = list(range(0, last + 1, want))
    elif options.extraction == "slide":
        step = options.slide_step or max(1, want // 2)
        starts = list(range(0, last + 1, step))
    elif options.extraction == "uniform":
        count = max(1, limit)
        if count == 1:
            return [last // 2]
        return sorted({round(i * last / (count - 1)) for i in range(count)})
    else:  # random
        generator = torch.Generator().manual_seed(_seed_for(options.seed, key))
        count = max(1, limit)
        return sorted(int(torch.randint(0, last + 1, (1,), generator=generator)) for _ in range(count))
    return starts[:limit] if limit else starts


def _seed_for(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def sample_clips(sources: list[VideoClip], options: ClipOptions,
                 keys: list[str] | None = None) -> tuple[list[list[VideoClip]], list[str]]:
    """Clips for every source (same order) and the list of "file: reason" for sources that gave none."""
    keys = keys or [c.source.shown for c in sources]
    out, skipped = [], []
    for source, key in zip(sources, keys):
        clips, reason = plan_clips(source, options, key)
        out.append(clips)
        if reason:
            skipped.append(reason)
    return out, skipped


def clip_table(clips: list[VideoClip]) -> str:
    """Frames x width x height of the clips and how many of each: what will be encoded."""
    counts: dict[tuple[int, int, int], int] = {}
    for clip in clips:
        key = (clip.frame_count, clip.width, clip.height)
        counts[key] = counts.get(key, 0) + 1
    lines = ["frames x  w x h        clips"]
    for (frames, w, h), n in sorted(counts.items()):
        lines.append(f"{frames:>6} x {w:>4} x {h:<6} {n:>6}")
    lines.append(f"{len(counts)} shapes, {sum(counts.values())} clips")
    return "\n".join(lines)
