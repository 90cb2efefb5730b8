"""ComfyUI glue for video datasets: our lazy clips as ComfyUI VIDEO values, and what a VAE says about frames.

`ClipVideo` is a ComfyUI `VideoInput` over a `lora_core.data.clips.VideoClip`: nothing is decoded
until a node asks for the frames (`get_components`), and then only the clip's frames, cropped. So
our loaders' outputs connect to core video nodes (Save Video, Get Video Components, the dataset
video nodes) and core VIDEO values (Load Video, core folder loaders) come into ours (`as_clip`).

A video VAE's frame rule is read from ComfyUI's VAE object: `latent_dim == 3` marks a video VAE,
and its time compression k comes from `downscale_index_formula` / `temporal_compression_decode()`;
it takes 1 + k*m frames.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import torch
from comfy_api.latest import Input, InputImpl, Types

from ..lora_core.data.clips import FrameRule, VideoClip, full_clip
from ..lora_core.data.video import VideoUnreadable, memory_video, probe_video
from ..lora_core.errors import UserInputError

log = logging.getLogger(__name__)


class ClipVideo(Input.Video):
    """A lazy training clip as a ComfyUI VIDEO."""

    def __init__(self, clip: VideoClip):
        self.clip = clip

    def get_components(self):
        return Types.VideoComponents(images=self.clip.read(), frame_rate=self.get_frame_rate())

    def save_to(self, path, format=Types.VideoContainer.AUTO, codec=Types.VideoCodec.AUTO, metadata=None,
                *args, **kwargs):
        return InputImpl.VideoFromComponents(self.get_components()).save_to(path, format, codec, metadata,
                                                                            *args, **kwargs)

    def as_trimmed(self, start_time=None, duration=None, strict_duration=False):
        start = int(round((start_time or 0.0) * self.clip.fps))
        count = self.clip.frame_count - start if not duration else int(round(duration * self.clip.fps))
        if start >= self.clip.frame_count or count <= 0:
            return None
        return ClipVideo(self.clip.sub_clip(start, count))

    def get_dimensions(self) -> tuple[int, int]:
        return self.clip.width, self.clip.height

    def get_frame_count(self) -> int:
        return self.clip.frame_count

    def get_frame_rate(self) -> Fraction:
        return Fraction(self.clip.fps).limit_denominator(1001)

    def get_duration(self) -> float:
        return self.clip.frame_count / self.clip.fps

    def get_container_format(self) -> str:
        return "image" if self.clip.source.is_image else self.clip.source.path.suffix.lstrip(".").lower()


def as_clip(video, position: int) -> VideoClip:
    """Our clip for any ComfyUI VIDEO: ours as is, a file-backed one probed (nothing decoded), others
    from their decoded frames."""
    if isinstance(video, ClipVideo):
        return video.clip
    if not isinstance(video, Input.Video):
        raise UserInputError(
            f"Video {position} is a {type(video).__name__}, not a VIDEO: connect Load Video Dataset from Folder "
            f"or a core video loader."
        )
    source = video.get_stream_source() if isinstance(video, InputImpl.VideoFromFile) else None
    if isinstance(source, str):
        clip = full_clip(probe_video(source, Path(source).name))
        start, duration = video.get_active_trim_window()
        if start or duration:
            first = int(round(start * clip.fps))
            count = clip.frame_count - first if not duration else int(round(duration * clip.fps))
            clip = clip.sub_clip(first, count)
        return clip
    components = video.get_components()
    return full_clip(memory_video(components.images, float(components.frame_rate), f"video {position}"))


def frame_rule(vae) -> FrameRule | None:
    """The frame counts `vae` encodes (1 + k*m), or None for an image VAE (one frame at a time)."""
    if getattr(vae, "latent_dim", 2) != 3 or getattr(vae, "not_video", False):
        return None
    formula = getattr(vae, "downscale_index_formula", None)
    step = None
    if formula is not None:
        step = int(formula[0])
    elif hasattr(vae, "temporal_compression_decode"):
        step = vae.temporal_compression_decode()
    if not step:
        raise UserInputError(
            "This video VAE does not say how many frames it compresses into one latent frame: set frame_rule on "
            "Sample Video Clips by hand (4k+1 for Wan / HunyuanVideo, 8k+1 for LTX)."
        )
    return FrameRule(int(step))


def encode_clip(vae, frames: torch.Tensor, tile_size: int = 0, tile_frames: int = 0) -> torch.Tensor:
    """VAE latent [1, C, T', h, w] (video VAE) or [1, C, h, w] (image VAE, one frame) of [T, H, W, 3] frames.

    A video VAE gets the whole clip as one sample; ComfyUI encodes it in time chunks (Wan / Hunyuan
    encoders are causal and cache across chunks) and retries tiled when memory runs out. `tile_size` > 0
    forces spatial tiles of that many pixels (and `tile_frames` time chunks) from the start.
    """
    rule = frame_rule(vae)
    if rule is None:
        if frames.shape[0] != 1:
            raise UserInputError(
                f"A clip of {frames.shape[0]} frames cannot be encoded with an image VAE: connect the video "
                f"model's VAE (e.g. Wan 2.1 VAE), or use one-frame clips."
            )
        return vae.encode(frames[..., :3])
    if not rule.accepts(frames.shape[0]):
        raise UserInputError(
            f"A clip of {frames.shape[0]} frames does not fit this VAE, which takes {rule.describe()}: use Sample "
            f"Video Clips with this VAE connected (it snaps frame counts)."
        )
    if tile_size > 0:
        return vae.encode_tiled(frames[..., :3], tile_x=tile_size, tile_y=tile_size, overlap=max(8, tile_size // 4),
                                tile_t=tile_frames or None, overlap_t=None)
    return vae.encode(frames[..., :3])


def encode_clips(vae, clips: list[VideoClip], tile_size: int = 0, tile_frames: int = 0) -> list[torch.Tensor | None]:
    """One latent per clip, clip by clip: decode its frames, encode, let the frames go. Progress per clip.

    A clip whose frames cannot be decoded stops the run with the file's name, unless its loader was
    asked to skip unreadable files: then its latent is None (logged and shown) and the others go on.
    """
    import comfy.utils

    from . import comfy_glue

    pbar = comfy.utils.ProgressBar(len(clips))
    latents = []
    for i, clip in enumerate(clips):
        comfy_glue.raise_if_interrupted()
        comfy_glue.send_text(f"encoding clip {i + 1}/{len(clips)}: {clip.describe()}")
        try:
            frames = clip.read()
        except VideoUnreadable as err:
            if not clip.skip_bad:
                raise
            log.warning("[LoRA Trainer] skipping clip: %s", err)
            comfy_glue.send_text(f"skipped: {err}")
            latents.append(None)
            pbar.update_absolute(i + 1, len(clips))
            continue
        latents.append(encode_clip(vae, frames, tile_size, tile_frames).cpu())
        del frames
        pbar.update_absolute(i + 1, len(clips))
    return latents
