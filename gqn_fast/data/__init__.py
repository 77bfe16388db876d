"""Data for gqn-fast: built-in procedural scenes, the on-disk format, the training loader
and the converter of DeepMind's gqn-datasets.

    builtin_dataset("rooms")            -> folder of the default set (generated on first use)
    make_loader(root, "train", 36, 9, seed=0, num_workers=2) -> batches (Batch)
    to_model_inputs(batch, "cuda")      -> (context_x, context_v, query_x, query_v) floats

Modules: camera (conventions), render (ray caster), scenes (families), format (files),
builtin (writing sets), loader, tfrecord, deepmind, show, commands (CLI).
"""

from gqn_fast.data.builtin import builtin_dataset, default_cache_dir, make_dataset
from gqn_fast.data.format import DatasetFormatError, open_split
from gqn_fast.data.loader import Batch, BatchPlan, BatchPlanner, SceneDataset, SceneLoader, make_loader, to_model_inputs
from gqn_fast.data.tfrecord import CorruptRecordError

__all__ = [
    "Batch",
    "BatchPlan",
    "BatchPlanner",
    "CorruptRecordError",
    "DatasetFormatError",
    "SceneDataset",
    "SceneLoader",
    "builtin_dataset",
    "default_cache_dir",
    "make_dataset",
    "make_loader",
    "open_split",
    "to_model_inputs",
]
