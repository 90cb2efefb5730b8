"""The loss chart: raw loss (thin), a smoothed curve, validation loss (markers), over optimizer steps.

Raw per-step loss of a diffusion model is noise-level lottery, so the curve worth reading is the
smoothed one: an exponential moving average, bias-corrected (as Adam corrects its moments) so
the first points are not dragged towards zero. The chart must draw for one value, a constant
series and non-finite gaps, the cases that break ComfyUI's built-in graph.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .atomic import write_bytes_atomically  # noqa: E402


def smoothed(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected EMA; non-finite values are skipped (the average carries over)."""
    average, weight, result = 0.0, 0.0, []
    for value in values:
        if math.isfinite(value):
            average = beta * average + (1 - beta) * value
            weight = beta * weight + (1 - beta)
        result.append(average / weight if weight > 0 else float("nan"))
    return result


def smoothing_beta(count: int) -> float:
    """Window of roughly a twentieth of the run, at least a few steps."""
    return 1.0 - 1.0 / max(3.0, count / 20.0)


def _figure(
    loss: Sequence[float],
    steps: Sequence[int] | None,
    val_loss: Sequence[tuple[int, float]],
    log_scale: bool,
    title: str,
):
    steps = list(steps) if steps is not None else list(range(1, len(loss) + 1))
    figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if loss:
        axes.plot(steps, loss, color="tab:blue", alpha=0.35, linewidth=0.8, label="loss")
        axes.plot(steps, smoothed(loss, smoothing_beta(len(loss))), color="tab:blue", linewidth=2.0, label="smoothed")
        if len(loss) == 1:
            axes.scatter(steps, loss, color="tab:blue", s=16)
    if val_loss:
        val_steps, val_values = zip(*val_loss)
        axes.plot(val_steps, val_values, "o--", color="tab:orange", markersize=4, linewidth=1.0, label="validation")
    values = [v for v in list(loss) + [v for _, v in val_loss] if math.isfinite(v)]
    if log_scale and values and min(values) > 0:
        axes.set_yscale("log")
    if values and max(values) == min(values):
        # A constant series: give matplotlib a range to draw in instead of a zero-height axis.
        pad = abs(values[0]) * 0.1 or 1.0
        axes.set_ylim(values[0] - pad if not log_scale else values[0] / 2, values[0] + pad)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if loss or val_loss:
        axes.legend(loc="upper right")
    figure.tight_layout()
    return figure


def loss_chart_png(
    loss: Sequence[float],
    steps: Sequence[int] | None = None,
    val_loss: Sequence[tuple[int, float]] = (),
    log_scale: bool = False,
    title: str = "Training loss",
) -> bytes:
    """The chart as PNG bytes; `val_loss` holds (step, value) pairs."""
    figure = _figure(loss, steps, list(val_loss), log_scale, title)
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png")
    finally:
        plt.close(figure)
    return buffer.getvalue()


def png_to_array(png: bytes) -> np.ndarray:
    """HxWx3 float32 in [0, 1], the layout of a ComfyUI IMAGE without the batch axis."""
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def save_loss_chart(path: str, loss: Sequence[float], **chart_options) -> np.ndarray:
    """Write the chart PNG to `path` atomically and return it as an HxWx3 array for previews."""
    png = loss_chart_png(loss, **chart_options)
    write_bytes_atomically(path, png)
    return png_to_array(png)
