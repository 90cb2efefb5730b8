"""Small generated training folders for the integration tests (PNG images, optional .txt captions)."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

# Mixed sizes on purpose: square, landscape, portrait; all multiples of 16 px (two latent levels).
MIXED_SIZES = [(64, 64), (96, 64), (64, 96), (64, 64), (128, 128), (96, 64)]


def write_images(folder: Path, sizes=MIXED_SIZES, captions: bool | int = True, seed: int = 0,
                 subject: str = "sks toy") -> list[Path]:
    """Write one PNG per size (a coloured disc on a plain background) and, if asked, a .txt caption
    beside the first `captions` images (all of them when True). Replaces the folder."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    paths = []
    n_captions = len(sizes) if captions is True else int(captions)
    for i, (w, h) in enumerate(sizes):
        image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        r = min(w, h) // 3
        cx, cy = rng.randrange(r, w - r + 1), rng.randrange(r, h - r + 1)
        ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        path = folder / f"img_{i:02d}.png"
        image.save(path)
        paths.append(path)
        if i < n_captions:
            path.with_suffix(".txt").write_text(f"a photo of {subject}, picture {i}, {w}x{h}")
    return paths
