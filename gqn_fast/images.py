"""Pictures for people: PNG grids of views and GIF fly-arounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] (or uint8) -> [H, W, 3] uint8."""
    image = image.detach().cpu()
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.permute(1, 2, 0).numpy()


def grid(rows: list[list[torch.Tensor | None]], pad: int = 2) -> Image.Image:
    """A grid of [3, H, W] images, one list per row; None leaves a cell blank."""
    size = next(t for row in rows for t in row if t is not None).shape[-1]
    cols = max(len(row) for row in rows)
    canvas = np.full(
        (len(rows) * (size + pad) + pad, cols * (size + pad) + pad, 3), 255, dtype=np.uint8
    )
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            if image is None:
                continue
            y, x = pad + i * (size + pad), pad + j * (size + pad)
            canvas[y : y + size, x : x + size] = to_uint8(image)
    return Image.fromarray(canvas)


def save_grid(rows, path: Path, scale: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = grid(rows)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)
    return path


def save_gif(frames: list[torch.Tensor], path: Path, scale: int = 2, ms_per_frame: int = 80) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(to_uint8(f)) for f in frames]
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
    return path
