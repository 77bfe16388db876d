"""What datasets there are: DeepMind's sets as their release lists them, and the built-in
sets' defaults and held-out combinations. Plain Python, imported by the command line's parser
(gqn_fast/arguments.py), which must not load torch or NumPy to answer --help."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

from gqn_fast.errors import UsageError

SPLITS = ("train", "test")

# Built-in sets (gqn-fast data make, and the set `gqn-fast train` makes without --data).
DEFAULT_SCENES = 20_000
DEFAULT_SEED = 0
TEST_FRACTION = 0.1


def is_red(colour) -> bool:
    """A hue within 30 degrees of pure red (a sixth of the hue circle)."""
    hue = colorsys.rgb_to_hsv(*colour)[0]
    return hue < 1 / 12 or hue >= 11 / 12


# Combinations of scene elements that a training split can leave out, so that a model's
# rendering of them tests compositionality (it saw red things and boxes, never red boxes).
# Each is a predicate on (object kind, colour); kinds: 0 sphere, 1 box, 2 cylinder.
HOLDOUTS = {
    "red-boxes": lambda kind, colour: kind == 1 and is_red(colour),
}

# The properties `gqn-fast analyze algebra` changes in a built-in room (gqn_fast/analyze.py).
ALGEBRA_PROPERTIES = ("object-colour", "shape", "wall-colour")


@dataclass(frozen=True)
class DeepMindDataset:
    name: str
    num_views: int  # T, views per scene
    image_size: int  # frame size in the TFRecords, resized to 64
    train_files: int  # record files in the original release
    test_files: int

    def file_count(self, split: str) -> int:
        """Record files of `split` in the original release."""
        if split not in SPLITS:
            raise UsageError(f"split: expected one of {list(SPLITS)}, got {split!r}")
        return self.train_files if split == "train" else self.test_files


DEEPMIND_DATASETS = {
    d.name: d
    for d in (
        DeepMindDataset("rooms_ring_camera", 10, 64, 2160, 240),
        DeepMindDataset("rooms_free_camera_no_object_rotations", 10, 64, 2160, 240),
        DeepMindDataset("rooms_free_camera_with_object_rotations", 10, 128, 2034, 226),
        DeepMindDataset("jaco", 11, 64, 3600, 400),
        DeepMindDataset("shepard_metzler_5_parts", 15, 64, 900, 100),
        DeepMindDataset("shepard_metzler_7_parts", 15, 64, 900, 100),
        DeepMindDataset("mazes", 300, 84, 1080, 120),
    )
}
