"""Videos on real files made at test time: probing, lazy decoding, clip sampling, frame rules, bad input."""

import os
import random

import pytest
import torch
from PIL import Image

from video_files import frame_levels, level, write_audio_only, write_video

from lora_core.data.captions import CaptionOptions
from lora_core.data.clips import ClipOptions, FrameRule, clip_table, full_clip, plan_clips, sample_clips, timeline
from lora_core.data.video import VideoTooLarge, VideoUnreadable, memory_video, probe_video, read_frames
from lora_core.data.video_folder import VideoFolderOptions, load_video_folder
from lora_core.errors import UserInputError

TOL = 3  # grey levels a lossy codec may move a flat frame


def _close(got, want):
    assert len(got) == len(want) and all(abs(g - w) <= TOL for g, w in zip(got, want)), (got, want)


# ---- probing and decoding -------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"])
def test_every_container_probes_and_decodes_the_asked_frames(tmp_path, ext):
    fps = 10 if ext == ".gif" else 16
    path = write_video(tmp_path / f"clip{ext}", frames=20, fps=fps)
    info = probe_video(path, f"input/clip{ext}")
    assert (info.frame_count, info.width, info.height) == (20, 32, 24)
    assert info.fps == pytest.approx(fps, rel=0.02) and not info.variable_fps
    frames = read_frames(info, [3, 4, 11, 19])
    assert frames.shape == (4, 24, 32, 3) and frames.dtype == torch.float32
    if ext != ".gif":  # the gif palette quantises greys
        _close(frame_levels(frames), [level(i) for i in (3, 4, 11, 19)])


def test_decoding_seeks_and_keeps_only_the_asked_frames_in_their_order(tmp_path):
    path = write_video(tmp_path / "long.mkv", frames=60)   # ffv1: every frame a key frame, exact greys
    info = probe_video(path)
    frames = read_frames(info, [50, 41, 41])
    assert frame_levels(frames) == [level(50), level(41), level(41)]
    cropped = read_frames(info, [0], size=(16, 16))
    assert cropped.shape == (1, 16, 16, 3)


def test_uppercase_extensions_images_as_one_frame_clips_and_natural_order(tmp_path):
    folder = tmp_path / "input" / "clips"
    write_video(folder / "v10.MP4", frames=9)
    write_video(folder / "v2.webm", frames=9)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "still.PNG")
    loaded = load_video_folder(tmp_path / "input", "clips")
    assert [e.relative_path for e in loaded.entries] == ["clips/still.PNG", "clips/v2.webm", "clips/v10.MP4"]
    still = loaded.clips[0]
    assert still.source.is_image and still.frame_count == 1 and (still.width, still.height) == (40, 30)
    assert read_frames(still.source, [0]).shape == (1, 30, 40, 3)
    only_videos = load_video_folder(tmp_path / "input", "clips", VideoFolderOptions(include_images=False))
    assert len(only_videos.clips) == 2


def test_captions_trigger_word_and_kohya_repeats(tmp_path):
    root = tmp_path / "input"
    write_video(root / "set" / "3_dance" / "a.mp4", frames=5)
    (root / "set" / "3_dance" / "a.txt").write_text("a woman dancing")
    write_video(root / "set" / "b.mp4", frames=5)
    options = VideoFolderOptions(captions=CaptionOptions(trigger_word="sks", default_caption="a clip"))
    loaded = load_video_folder(root, "set", options)
    assert loaded.captions == ["sks, a woman dancing", "sks, a clip"]
    assert loaded.repeats == [3, 1]
    with pytest.raises(UserInputError, match=r"b\.mp4"):
        load_video_folder(root, "set", VideoFolderOptions(captions=CaptionOptions(missing="error")))


def test_folder_rules_are_those_of_images(tmp_path):
    root = tmp_path / "input"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    write_video(outside / "x.mp4", frames=3)
    os.symlink(outside, root / "linked")
    with pytest.raises(UserInputError, match="outside"):
        load_video_folder(root, "linked")
    with pytest.raises(UserInputError, match=r"\.\."):
        load_video_folder(root, "../elsewhere")
    (root / "empty").mkdir()
    with pytest.raises(UserInputError, match=r"No videos found .*\.mp4"):
        load_video_folder(root, "empty")


# ---- bad input --------------------------------------------------------------------------------

def test_zero_length_corrupt_truncated_and_audio_only_files_name_the_file(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoUnreadable, match=r"empty\.mp4 is empty \(0 bytes\)"):
        probe_video(tmp_path / "empty.mp4")
    (tmp_path / "noise.mp4").write_bytes(random.Random(0).randbytes(4000))  # fixed: some random bytes parse as a subtitle stream
    with pytest.raises(VideoUnreadable, match=r"noise\.mp4 could not be read"):
        probe_video(tmp_path / "noise.mp4")
    whole = write_video(tmp_path / "whole.mp4", frames=30).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])   # the index (moov) is at the end: lost
    with pytest.raises(VideoUnreadable, match=r"cut\.mp4"):
        probe_video(tmp_path / "cut.mp4")
    write_audio_only(tmp_path / "song.mp4")
    with pytest.raises(VideoUnreadable, match=r"song\.mp4 has no video stream \(it holds audio\)"):
        probe_video(tmp_path / "song.mp4")


def test_truncated_stream_gives_fewer_frames_and_a_clear_too_short_message(tmp_path):
    whole = write_video(tmp_path / "whole.mkv", frames=40).read_bytes()
    (tmp_path / "cut.mkv").write_bytes(whole[: len(whole) // 2])
    info = probe_video(tmp_path / "cut.mkv", "input/cut.mkv")
    assert 1 <= info.frame_count < 40
    frames = read_frames(info, list(range(info.frame_count)))          # what is there decodes
    assert frames.shape[0] == info.frame_count
    with pytest.raises(UserInputError, match=r"input/cut\.mkv has \d+ frames .* clips of 81 frames"):
        plan_clips(full_clip(info), ClipOptions(frames=81, rule=FrameRule(4)))


def test_skip_bad_files_keeps_the_rest_but_never_hides_a_size_limit(tmp_path):
    root = tmp_path / "input"
    write_video(root / "set" / "good.mp4", frames=5)
    (root / "set" / "bad.mp4").write_bytes(b"not a video at all" * 10)
    (root / "set" / "zero.webm").write_bytes(b"")
    with pytest.raises(UserInputError, match=r"bad\.mp4"):
        load_video_folder(root, "set")
    loaded = load_video_folder(root, "set", VideoFolderOptions(skip_bad=True))
    assert [e.relative_path for e in loaded.entries] == ["set/good.mp4"]
    assert len(loaded.skipped) == 2 and "bad.mp4" in loaded.skipped[0] and "zero.webm" in loaded.skipped[1]
    assert "skipped 2 unreadable files" in loaded.summary()
    # the wish to skip travels with the clips, so a clip that fails to decode later is dropped, not fatal
    clips, _ = plan_clips(loaded.clips[0], ClipOptions(frames=5, rule=FrameRule(4)))
    assert clips[0].skip_bad
    with pytest.raises(VideoTooLarge, match=r"good\.mp4 is 32x24"):
        load_video_folder(root, "set", VideoFolderOptions(skip_bad=True, max_pixels=500))


def test_variable_frame_rate_is_sampled_by_timestamps(tmp_path):
    times = [0, 100, 133, 233, 266, 366, 399, 499, 532, 632]   # alternating 100 ms / 33 ms
    info = probe_video(write_video(tmp_path / "vfr.mkv", frames=10, times_ms=times))
    assert info.variable_fps and info.frame_count == 10
    line, fps = timeline(info, ClipOptions(frames=1, target_fps=10))
    assert fps == 10
    # at 0, 0.1, 0.2, ... s the frame on screen is the last one that started by then
    assert line[:7] == [0, 1, 2, 4, 6, 7, 8]
    # without a target rate a variable-rate video is still resampled by time, at its average rate
    line, fps = timeline(info, ClipOptions(frames=1))
    assert fps == pytest.approx(9 / 0.632) and line[:3] == [0, 0, 2]


# ---- frame rules and extraction -------------------------------------------------------------

def test_frame_rules_snap_down_to_what_the_vae_takes():
    wan, ltx = FrameRule(4), FrameRule(8)
    assert [wan.snap_down(n) for n in (1, 4, 5, 80, 81, 83)] == [1, 1, 5, 77, 81, 81]
    assert [ltx.snap_down(n) for n in (8, 9, 96, 97)] == [1, 9, 89, 97]
    assert wan.accepts(81) and not wan.accepts(80) and FrameRule(1).accepts(16)
    assert "4k+1" in wan.describe() and ClipOptions(frames=20, rule=wan).clip_frames == 17
    with pytest.raises(UserInputError, match="frame rule"):
        FrameRule(0)


def _starts(clips):
    return [c.indices[0] for c in clips]


def test_extraction_modes(tmp_path):
    info = probe_video(write_video(tmp_path / "v.mkv", frames=40))
    source = full_clip(info)
    rule = FrameRule(4)

    def plan(**kw):
        return plan_clips(source, ClipOptions(rule=rule, **kw), key="v")[0]

    head = plan(frames=9)
    assert _starts(head) == [0] and head[0].indices == tuple(range(9))
    assert _starts(plan(frames=9, extraction="chunk", clips_per_video=0)) == [0, 9, 18, 27]
    assert _starts(plan(frames=9, extraction="chunk", clips_per_video=2)) == [0, 9]
    assert _starts(plan(frames=9, extraction="slide", slide_step=10, clips_per_video=0)) == [0, 10, 20, 30]
    assert _starts(plan(frames=9, extraction="uniform", clips_per_video=3)) == [0, 16, 31]
    full = plan(frames=200, extraction="full")
    assert len(full) == 1 and full[0].frame_count == 37          # 40 snapped to 4k+1
    random_a = plan(frames=9, extraction="random", clips_per_video=3, seed=5)
    assert _starts(random_a) == _starts(plan(frames=9, extraction="random", clips_per_video=3, seed=5))
    assert all(0 <= s <= 31 for s in _starts(random_a))
    other_seeds = {tuple(_starts(plan(frames=9, extraction="random", clips_per_video=3, seed=s))) for s in range(6)}
    assert len(other_seeds) > 1
    snapped = plan(frames=10)                                    # 10 is not 4k+1: 9 frames
    assert snapped[0].frame_count == 9
    decoded = snapped[0].read()
    assert frame_levels(decoded) == [level(i) for i in range(9)]


def test_target_fps_and_frame_stride_resample_the_timeline(tmp_path):
    info = probe_video(write_video(tmp_path / "v.mkv", frames=32, fps=16))
    half = plan_clips(full_clip(info), ClipOptions(frames=5, target_fps=8, rule=FrameRule(4)))[0][0]
    assert half.indices == (0, 2, 4, 6, 8) and half.fps == 8
    strided = plan_clips(full_clip(info), ClipOptions(frames=5, frame_stride=3, rule=FrameRule(4)))[0][0]
    assert strided.indices == (0, 3, 6, 9, 12) and strided.fps == pytest.approx(16 / 3, rel=1e-3)


def test_too_short_videos_error_skip_or_shorter_clip(tmp_path):
    info = probe_video(write_video(tmp_path / "short.mp4", frames=12), "input/short.mp4")
    source = full_clip(info)
    with pytest.raises(UserInputError, match=r"input/short\.mp4 has 12 frames .*to 9 or less"):
        plan_clips(source, ClipOptions(frames=17, rule=FrameRule(4)))
    clips, reason = plan_clips(source, ClipOptions(frames=17, rule=FrameRule(4), too_short="skip"))
    assert clips == [] and "input/short.mp4" in reason
    clips, _ = plan_clips(source, ClipOptions(frames=17, rule=FrameRule(4), too_short="shorter_clip"))
    assert clips[0].frame_count == 9


def test_images_are_one_frame_clips_and_the_table_counts_shapes(tmp_path):
    Image.new("RGB", (48, 32), (1, 2, 3)).save(tmp_path / "a.png")
    image = full_clip(probe_video(tmp_path / "a.png"))
    video = full_clip(probe_video(write_video(tmp_path / "v.mkv", frames=20)))
    per_source, skipped = sample_clips([image, video], ClipOptions(frames=9, extraction="chunk", clips_per_video=0,
                                                                   rule=FrameRule(4)))
    assert [len(c) for c in per_source] == [1, 2] and not skipped
    assert per_source[0][0].frame_count == 1
    table = clip_table([c for clips in per_source for c in clips])
    assert "1 x   48 x 32" in table and "9 x   32 x 24" in table and "3 clips" in table


def test_trimmed_and_in_memory_sources(tmp_path):
    info = probe_video(write_video(tmp_path / "v.mkv", frames=30))
    trimmed = full_clip(info).sub_clip(10, 12)
    clip = plan_clips(trimmed, ClipOptions(frames=5, rule=FrameRule(4)))[0][0]
    assert clip.indices == (10, 11, 12, 13, 14)
    frames = torch.rand(7, 8, 12, 3)
    memory = full_clip(memory_video(frames, 8.0, "video from a node"))
    clip = plan_clips(memory, ClipOptions(frames=5, extraction="uniform", rule=FrameRule(4)))[0][0]
    assert torch.equal(clip.read(), frames[1:6])
