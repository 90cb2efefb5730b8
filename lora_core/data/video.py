"""Read videos lazily with PyAV: probe once (no decoding), decode only the frames a clip uses.

`probe_video` reads the container's packet timestamps (demuxing only, nothing is decoded), which
gives the exact frame count even where the header has none (webm, mkv), each frame's time (so a
variable-frame-rate video is sampled by time, not by index) and an early, clear error for files
that are empty, truncated before the first frame, audio-only or not a video at all.
`read_frames` then seeks to the key frame before the first wanted frame, decodes forward and
converts to RGB only the frames asked for, cropping each as it arrives, so memory holds the
clip, never the video. Still images (png, jpg...) are one-frame videos here, so images and
videos mix in one dataset.

PyAV (`av`) ships with ComfyUI; it is imported on first use so the rest of lora_core works without it.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserInputError
from .images import ImageLoadOptions, load_image
from .resize import cover_crop
from .scan import IMAGE_EXTENSIONS

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"})
DEFAULT_MAX_PIXELS = 4096 * 4096        # per frame; 4K UHD (8.3 MP) fits, 8K does not
_VFR_TOLERANCE = 0.25                   # frame intervals differing by more than this fraction: variable rate


class VideoUnreadable(UserInputError):
    """A video that cannot be used as it is (corrupt, empty, no video stream): `skip_bad` may skip it."""


class VideoTooLarge(UserInputError):
    """Frames over the pixel limit: a setting to change, so `skip_bad` never hides it."""


@dataclass(frozen=True)
class VideoInfo:
    """What a probe learned about one file; enough to plan clips without decoding anything."""
    path: Path
    shown: str                              # name for messages, e.g. "input/clips/a.mp4"
    width: int
    height: int
    frame_count: int
    fps: float                              # average frames per second (1.0 for a still image)
    frame_times: tuple[float, ...] = ()     # presentation time of each frame in seconds, sorted
    variable_fps: bool = False
    is_image: bool = False
    pts: tuple[int, ...] = ()               # stream timestamps of the frames (for seeking), () if unknown
    frames: torch.Tensor | None = field(default=None, compare=False, repr=False)   # in-memory source [N,H,W,3]

    @property
    def duration(self) -> float:
        return self.frame_count / self.fps if self.fps > 0 else 0.0

    def time_of(self, index: int) -> float:
        return self.frame_times[index] if self.frame_times else index / self.fps

    def index_at(self, time: float) -> int:
        """The frame shown at `time` seconds (the last one starting at or before it)."""
        if not self.frame_times:
            return min(self.frame_count - 1, max(0, int(time * self.fps + 1e-6)))
        return max(0, min(self.frame_count - 1, bisect.bisect_right(self.frame_times, time + 1e-6) - 1))


def probe_video(path: str | os.PathLike, shown: str | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> VideoInfo:
    """Frame count, size, timing of `path` (a video or a still image); raises with the file named."""
    path = Path(path)
    shown = shown or str(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return _probe_image(path, shown, max_pixels)
    try:
        size = path.stat().st_size
    except FileNotFoundError as err:
        raise VideoUnreadable(f"Video {shown} does not exist any more: scan the folder again.") from err
    if size == 0:
        raise VideoUnreadable(f"Video {shown} is empty (0 bytes): copy it again or remove it from the folder.")
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["no streams"]
                raise VideoUnreadable(
                    f"File {shown} has no video stream (it holds {', '.join(kinds)}): only a file with a video "
                    f"stream can train a video LoRA; remove it from the folder."
                )
            stream = container.streams.video[0]
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
            if width * height > max_pixels:
                raise VideoTooLarge(
                    f"Video {shown} is {width}x{height} = {width * height / 1e6:.1f} MP per frame, over the limit "
                    f"of {max_pixels / 1e6:g} MP: downscale it first (e.g. ffmpeg -i in.mp4 -vf scale=-2:720 "
                    f"out.mp4) or raise the pixel limit."
                )
            pts = [p.pts for p in container.demux(stream) if p.size and not p.is_corrupt]
            time_base = float(stream.time_base) if stream.time_base else 0.0
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    except UserInputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError, IndexError) as err:
        raise VideoUnreadable(
            f"Video {shown} could not be read ({type(err).__name__}: {err}); the file is corrupt, truncated or "
            f"not a video: re-export it, remove it from the folder, or turn on skipping bad files."
        ) from err
    if not pts:
        raise VideoUnreadable(
            f"Video {shown} holds no readable frames (truncated or corrupt): re-export it, remove it from the "
            f"folder, or turn on skipping bad files."
        )
    if any(p is None for p in pts) or not time_base:
        fps = float(rate) if rate else 24.0
        return VideoInfo(path=path, shown=shown, width=width, height=height, frame_count=len(pts), fps=fps)
    ordered = sorted(set(pts))
    times = tuple((p - ordered[0]) * time_base for p in ordered)
    return VideoInfo(path=path, shown=shown, width=width, height=height, frame_count=len(ordered),
                     fps=_average_fps(times, rate), frame_times=times, variable_fps=_is_variable(times),
                     pts=tuple(ordered))


def memory_video(frames: torch.Tensor, fps: float, shown: str) -> VideoInfo:
    """A video already decoded ([N, H, W, 3] in 0..1), e.g. from another node."""
    if frames.ndim != 4 or frames.shape[-1] < 3 or frames.shape[0] < 1:
        raise UserInputError(f"Video {shown} has frames of shape {list(frames.shape)}: expected [frames, H, W, 3].")
    return VideoInfo(path=Path(shown), shown=shown, width=int(frames.shape[2]), height=int(frames.shape[1]),
                     frame_count=int(frames.shape[0]), fps=float(fps) if fps and fps > 0 else 24.0,
                     frames=frames[..., :3])


def read_frames(info: VideoInfo, indices: list[int] | tuple[int, ...],
                size: tuple[int, int] | None = None) -> torch.Tensor:
    """Frames `indices` of the video as [T, H, W, 3] float32 in 0..1, each cover-cropped to `size`
    (width, height) when given. Only these frames are converted; decoding starts at the key frame
    before the first of them and stops after the last."""
    if not indices:
        raise ValueError("no frames asked")
    bad = [i for i in indices if not 0 <= i < info.frame_count]
    if bad:
        raise UserInputError(f"Video {info.shown} has {info.frame_count} frames; frame {bad[0]} was asked for.")
    if info.frames is not None:
        return torch.stack([_fit(info.frames[i].float(), size) for i in indices])
    if info.is_image:
        image = load_image(info.path, ImageLoadOptions(), info.shown)
        return _fit(image, size).unsqueeze(0).expand(len(indices), -1, -1, -1).contiguous()
    decoded = _decode(info, sorted(set(indices)), size)
    return torch.stack([decoded[i] for i in indices])


# ---- internals ---------------------------------------------------------------------------------

def _decode(info: VideoInfo, wanted: list[int], size) -> dict[int, torch.Tensor]:
    av = _av()
    out: dict[int, torch.Tensor] = {}
    index_of_pts = {p: i for i, p in enumerate(info.pts)}
    last = wanted[-1]
    wanted_set = set(wanted)
    try:
        with av.open(str(info.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            sequential = not info.pts
            if not sequential and wanted[0] > 0:
                container.seek(info.pts[wanted[0]], stream=stream, backward=True, any_frame=False)
            counter = -1
            for frame in container.decode(stream):
                if sequential or frame.pts is None:
                    counter += 1
                    index = counter
                else:
                    index = index_of_pts.get(frame.pts, -1)
                if index in wanted_set and index not in out:
                    out[index] = _fit(torch.from_numpy(frame.to_ndarray(format="rgb24")).float().div_(255.0), size)
                if index >= last or len(out) == len(wanted_set):
                    break
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as err:
        raise VideoUnreadable(
            f"Video {info.shown} could not be decoded after {len(out)} of the {len(wanted)} frames asked "
            f"({type(err).__name__}: {err}); the file is corrupt or truncated: re-export it, remove it, or turn "
            f"on skipping bad files."
        ) from err
    missing = [i for i in wanted if i not in out]
    if missing:
        raise VideoUnreadable(
            f"Video {info.shown} gave only {len(out)} of the {len(wanted)} frames asked (frame {missing[0]} of "
            f"{info.frame_count} could not be decoded): the file is truncated or damaged; re-export it, ask for "
            f"fewer frames, or turn on skipping bad files."
        )
    return out


def _fit(frame: torch.Tensor, size) -> torch.Tensor:
    if size is None or (frame.shape[1], frame.shape[0]) == tuple(size):
        return frame
    return cover_crop(frame, int(size[0]), int(size[1]))


def _probe_image(path: Path, shown: str, max_pixels: int) -> VideoInfo:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            width, height = ImageOps.exif_transpose(img).size if img.getexif() else img.size
    except FileNotFoundError as err:
        raise VideoUnreadable(f"Image {shown} does not exist any more: scan the folder again.") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise VideoUnreadable(
            f"Image {shown} could not be read ({type(err).__name__}: {err}); the file is corrupt or not an "
            f"image: re-export it, remove it from the folder, or turn on skipping bad files."
        ) from err
    if width * height > max_pixels:
        raise VideoTooLarge(
            f"Image {shown} is {width}x{height} = {width * height / 1e6:.1f} MP, over the limit of "
            f"{max_pixels / 1e6:g} MP: shrink it or raise the pixel limit."
        )
    return VideoInfo(path=path, shown=shown, width=width, height=height, frame_count=1, fps=1.0, is_image=True)


def _average_fps(times: tuple[float, ...], rate) -> float:
    if len(times) > 1 and times[-1] > times[0]:
        # n frames span n intervals; the last one's length is unknown, so average over n - 1.
        return (len(times) - 1) / (times[-1] - times[0])
    return float(rate) if rate else 24.0


def _is_variable(times: tuple[float, ...]) -> bool:
    if len(times) < 3:
        return False
    deltas = [b - a for a, b in zip(times, times[1:])]
    mean = (times[-1] - times[0]) / len(deltas)
    return mean > 0 and max(abs(d - mean) for d in deltas) > _VFR_TOLERANCE * mean


def _av():
    try:
        import av
    except ImportError as err:  # pragma: no cover - ComfyUI ships PyAV
        raise UserInputError("Reading videos needs PyAV: pip install av (ComfyUI ships it).") from err
    return av
