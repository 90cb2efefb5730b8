"""Bucket math, image-to-bucket fitting, and grouping of encoded latents."""

import math

import pytest
import torch

from lora_core.data import (BucketSpec, bucket_table, fit_to_bucket, flatten_latent_batches, group_latents_by_size,
                            make_buckets, nearest_bucket)
from lora_core.errors import UserInputError


@pytest.mark.parametrize("resolution", [512, 768, 1024, 1536])
@pytest.mark.parametrize("max_aspect", [1.5, 2.0, 3.0])
def test_buckets_keep_area_grid_and_aspect_cap(resolution, max_aspect):
    buckets = make_buckets(BucketSpec(resolution=resolution, step=64, max_aspect=max_aspect))
    target = resolution * resolution
    assert (resolution, resolution) in buckets
    assert len(set(buckets)) == len(buckets)
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert abs(width * height / target - 1) <= 0.05
        assert max(width, height) / min(width, height) <= max_aspect + 1e-9
        assert (height, width) in buckets       # portrait and landscape mirror each other
    if max_aspect >= 2.0:
        aspects = [max(w, h) / min(w, h) for w, h in buckets]
        assert max(aspects) > 1.7               # wide shapes are covered, not just near-squares


def test_nearest_bucket_uses_log_aspect():
    buckets = make_buckets(BucketSpec(resolution=512))
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    assert nearest_bucket(1920, 1080, buckets) == (704, 384)
    assert nearest_bucket(1080, 1920, buckets) == (384, 704)
    assert nearest_bucket(5000, 100, buckets) == (704, 384)   # beyond the cap: the widest bucket
    # 2:1 and 1:2 are equally far from square on a log scale
    assert math.isclose(abs(math.log(2)), abs(math.log(0.5)))


def test_fit_to_bucket_covers_and_center_crops():
    buckets = make_buckets(BucketSpec(resolution=512))
    image = torch.zeros(1080, 1920, 3)
    image[:, 960:] = 1.0
    out = fit_to_bucket(image, buckets)
    assert out.shape == (384, 704, 3)
    assert torch.all(out[:, :340] < 0.02) and torch.all(out[:, 364:] > 0.98)


def test_bucket_table_counts():
    table = bucket_table([(512, 512), (704, 384), (512, 512)])
    lines = table.splitlines()
    assert lines[0].startswith("bucket")
    assert any("512 x 512" in line and line.rstrip().endswith("2") for line in lines)
    assert lines[-1] == "2 buckets, 3 samples"


def test_bad_bucket_specs():
    for kwargs in ({"step": 60}, {"resolution": 32}, {"max_aspect": 0.5}):
        with pytest.raises(UserInputError):
            BucketSpec(**kwargs)


def test_group_latents_by_size_like_resolution_bucket():
    latents = [torch.full((4, 8, 8), 0.0), torch.full((4, 8, 12), 1.0), torch.full((4, 8, 8), 2.0)]
    conds = ["c0", "c1", "c2"]
    groups = group_latents_by_size(latents, conds)
    assert [g.indices for g in groups] == [[0, 2], [1]]
    assert groups[0].samples.shape == (2, 4, 8, 8) and torch.equal(groups[0].samples[1], latents[2])
    assert groups[0].conds == ["c0", "c2"] and groups[1].conds == ["c1"]
    with pytest.raises(UserInputError, match="2 conditionings"):
        group_latents_by_size(latents, conds[:2])


def test_flatten_comfy_latent_batches():
    pair = [torch.zeros(1, 3, 2), {"pooled_output": torch.zeros(1, 2)}]
    batches = [{"samples": torch.zeros(1, 4, 8, 8)}, {"samples": torch.ones(2, 4, 8, 8)}]
    latents, conds = flatten_latent_batches(batches, [[pair], [pair, pair]])
    assert [tuple(l.shape) for l in latents] == [(4, 8, 8)] * 3
    assert conds[0] == [pair] and conds[1] == [pair] and conds[2] == [pair]
    with pytest.raises(UserInputError, match="3 entries"):
        flatten_latent_batches([{"samples": torch.zeros(2, 4, 8, 8)}], [[pair, pair, pair]])
