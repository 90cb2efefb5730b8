"""Small videos written at test time with PyAV: frame i is a flat grey of level `level(i)`, so a
decoded frame tells which source frame it is."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

av = __import__("pytest").importorskip("av")

CODECS = {  # extension -> (codec, pixel format, muxer or None)
    ".mp4": ("libx264", "yuv420p", None),
    ".mov": ("libx264", "yuv420p", None),
    ".mkv": ("ffv1", "yuv444p", None),
    ".webm": ("libvpx-vp9", "yuv420p", None),
    ".avi": ("mpeg4", "yuv420p", None),
    ".gif": ("gif", "rgb8", None),
}


def level(i: int) -> int:
    return (i * 23) % 240 + 8


def write_video(path: Path, frames: int = 20, fps: int = 16, width: int = 32, height: int = 24,
                times_ms: list[int] | None = None) -> Path:
    """A video of `frames` flat frames; `times_ms` gives each frame's time (variable rate, mkv/ffv1)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec, pix_fmt, _ = CODECS[path.suffix.lower()]
    container = av.open(str(path), "w", format=_format(path))
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    if times_ms is not None:
        stream.codec_context.time_base = Fraction(1, 1000)
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), level(i), np.uint8), format="rgb24")
        if times_ms is not None:
            frame.pts, frame.time_base = times_ms[i], Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def write_audio_only(path: Path) -> Path:
    container = av.open(str(path), "w", format="mp4")
    stream = container.add_stream("aac", rate=16000)
    for i in range(4):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, i * 1024
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def frame_levels(frames) -> list[int]:
    """The grey level of each decoded frame [T, H, W, 3] (0..1 floats) as 0..255 integers."""
    return [round(float(f.mean()) * 255) for f in frames]


def _format(path: Path) -> str | None:
    return {".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi", ".gif": "gif", ".mp4": "mp4"}.get(
        path.suffix.lower())
