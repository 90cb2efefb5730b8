import io
import math

import numpy as np
import pytest
from PIL import Image

from lora_core.plotting import loss_chart_png, save_loss_chart, smoothed


def test_smoothing_is_bias_corrected_and_skips_gaps():
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    values = smoothed([1.0, float("nan"), 3.0], beta=0.5)
    assert values[0] == pytest.approx(1.0) and values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    assert math.isnan(smoothed([float("nan")])[0])


@pytest.mark.parametrize(
    "loss, options",
    [
        ([0.7], {}),
        ([0.5] * 20, {}),
        ([0.5] * 20, {"log_scale": True}),
        ([1.0, float("nan"), 0.5, float("inf"), 0.25], {"log_scale": True}),
        ([], {"val_loss": [(0, 1.0), (10, 0.5)]}),
        ([3.0 / (i + 1) for i in range(200)], {"val_loss": [(0, 3.0), (100, 0.1), (200, 0.02)], "log_scale": True}),
    ],
)
def test_chart_draws_awkward_series(tmp_path, loss, options):
    path = tmp_path / "charts" / "loss.png"
    image = save_loss_chart(str(path), loss, **options)
    assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.std() > 0.01, "something was drawn"
    with Image.open(path) as written:
        assert written.size == (image.shape[1], image.shape[0])
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"], "no temporary file left behind"


def _blue_rows(png: bytes, columns: slice) -> float:
    """Mean row of the smoothed curve's pixels (matplotlib's tab:blue) in some columns."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)[:, columns]
    blue = (abs(pixels[..., 0] - 31) < 20) & (abs(pixels[..., 1] - 119) < 20) & (abs(pixels[..., 2] - 180) < 20)
    rows, _ = np.nonzero(blue)
    return rows.mean()


def test_a_falling_loss_is_drawn_falling():
    png = loss_chart_png([1.0 / (i + 1) for i in range(50)])
    width = Image.open(io.BytesIO(png)).size[0]
    assert _blue_rows(png, slice(width // 8, width // 4)) < _blue_rows(png, slice(width // 2, 3 * width // 4))
