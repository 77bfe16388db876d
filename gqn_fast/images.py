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


CAPTION = 12  # pixels under a captioned row (before scaling): room for one line of text


def grid(rows: list[list[torch.Tensor | None]], pad: int = 2, captions=None) -> Image.Image:
    """A grid of [3, H, W] images, one list per row; None leaves a cell blank. `captions`: one
    list of labels (or None) per row, each label written under its cell."""
    captions = captions or [None] * len(rows)
    size = next(t for row in rows for t in row if t is not None).shape[-1]
    cols = max(len(row) for row in rows)
    heights = [size + pad + (CAPTION if caption else 0) for caption in captions]
    canvas = np.full((sum(heights) + pad, cols * (size + pad) + pad, 3), 255, dtype=np.uint8)
    y = pad
    for row, height in zip(rows, heights):
        for j, image in enumerate(row):
            if image is not None:
                x = pad + j * (size + pad)
                canvas[y : y + size, x : x + size] = to_uint8(image)
        y += height
    return Image.fromarray(canvas)


def _write_captions(image: Image.Image, rows, captions, pad: int, scale: int) -> None:
    """Each label centred under its cell, in the strip `grid` left, drawn after scaling (crisp)."""
    from PIL import ImageDraw, ImageFont

    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    size = next(t for row in rows for t in row if t is not None).shape[-1]
    y = pad
    for _row, caption in zip(rows, captions):
        y += size
        for j, label in enumerate(caption or []):
            if label:
                centre = (pad + j * (size + pad) + size / 2) * scale
                left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
                draw.text((centre - (right - left) / 2, (y + 1) * scale), label, fill=(60, 60, 60), font=font)
        y += pad + (CAPTION if caption else 0)


def save_grid(rows, path: Path, scale: int = 2, captions=None) -> Path:
    """`grid` scaled up `scale` times (nearest pixel) with its captions, as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pad = 2
    image = grid(rows, pad, captions)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    if captions:
        _write_captions(image, rows, captions, pad, scale)
    image.save(path)
    return path


def save_gif(frames: list[torch.Tensor], path: Path, scale: int = 2, ms_per_frame: int = 80) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(to_uint8(f)) for f in frames]
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
    return path
