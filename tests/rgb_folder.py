"""A seeded RGB image folder for tests: simple coloured shapes, one sub-folder per class.

Each image is ``size x size`` RGB: a dark, slightly tinted background and one filled shape (a disc,
a square or a triangle, one class each) of a random bright colour, size and position. It mirrors
the user folder of issue 19 (900 16x16 images of simple coloured shapes, 3 classes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("disc", "square", "triangle")


def _shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], colour: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = box
    if kind == "disc":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def draw_image(kind: str, rng: np.random.Generator, size: int = 16) -> Image.Image:
    """One ``size x size`` RGB image of a shape of class ``kind``."""
    bg = tuple(int(v) for v in rng.integers(0, 60, 3))
    im = Image.new("RGB", (size, size), bg)
    side = int(rng.integers(size // 2, size - 2))  # the shape covers half to most of the image
    x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
    colour = tuple(int(v) for v in rng.integers(120, 256, 3))
    _shape(ImageDraw.Draw(im), kind, (x0, y0, x0 + side, y0 + side), colour)
    return im


def make_rgb_folder(root: str | Path, per_class: int = 100, size: int = 16, seed: int = 0) -> Path:
    """Write ``per_class`` PNGs for each of :data:`CLASSES` under ``root/<class>/``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_image(kind, rng, size).save(root / kind / f"{i:04d}.png")
    return root


if __name__ == "__main__":  # python tests/rgb_folder.py OUT [PER_CLASS]
    import sys

    print(make_rgb_folder(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 300))
