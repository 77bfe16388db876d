"""Data for gqn-fast: built-in procedural scenes, the on-disk format, the training loader
and the converter of DeepMind's gqn-datasets.

    builtin_dataset("rooms")            -> folder of the default set (generated on first use)
    make_loader(root, "train", 36, 9, seed=0, num_workers=2) -> batches (Batch)
    to_model_inputs(batch, "cuda")      -> (context_x, context_v, query_x, query_v) floats

Modules: camera (conventions), render (ray caster), scenes (families), format (files),
builtin (writing sets), cache (its folder), loader, tfrecord, deepmind, record_index and
records (training on DeepMind's download), folder (what a --data folder holds), show, commands (CLI).
"""

import importlib

# Imported on first use (PEP 562): `import gqn_fast.data.catalog` (the command line's parser)
# must not load torch through this file.
_LAZY = {
    "builtin_dataset": "builtin",
    "default_cache_dir": "cache",
    "make_dataset": "builtin",
    "DatasetFormatError": "format",
    "open_split": "format",
    "Batch": "loader",
    "BatchPlan": "loader",
    "BatchPlanner": "loader",
    "SceneDataset": "loader",
    "SceneLoader": "loader",
    "make_loader": "loader",
    "to_model_inputs": "loader",
    "CorruptRecordError": "tfrecord",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"gqn_fast.data.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gqn_fast.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
