"""`gqn-fast data show`: a PNG grid of a dataset's scenes (rows) and their views (columns)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from gqn_fast.data.folder import DOWNLOAD, inspect_folder, open_dataset
from gqn_fast.errors import UsageError, check_count

GAP = 2  # pixels between tiles
MAX_VIEWS = 16  # columns by default: mazes have 300 views


def save_grid(
    root,
    out=None,
    split: str = "train",
    scenes: int = 8,
    views: int | None = None,
    first: int = 0,
    dataset_name: str | None = None,
) -> Path:
    """Write scenes first..first+scenes-1 of a split, up to `views` views each, as one PNG; returns
    its path. `root`: a converted folder or DeepMind's download (`dataset_name`: which set, where
    its folder does not say)."""
    found = inspect_folder(root, dataset_name)
    dataset = open_dataset(root, split, dataset_name)
    check_count("scenes", scenes)
    if not 0 <= first < len(dataset):
        raise UsageError(f"first: expected a scene index in [0, {len(dataset)}), got {first!r}")
    rows = min(scenes, len(dataset) - first)
    cols = min(views or MAX_VIEWS, dataset.num_views)
    tile = 64 + GAP
    grid = np.full((rows * tile + GAP, cols * tile + GAP, 3), 255, np.uint8)
    for r in range(rows):
        images, _ = dataset[first + r]
        for c in range(cols):
            grid[GAP + r * tile : GAP + r * tile + 64, GAP + c * tile : GAP + c * tile + 64] = images[c].numpy()
    if out is None:  # nothing is written into a download
        out = (
            Path(f"preview-{found.dataset}-{split}.png")
            if found.kind == DOWNLOAD
            else Path(root) / f"preview-{split}.png"
        )
    out = Path(out)
    Image.fromarray(grid).save(out)
    return out
