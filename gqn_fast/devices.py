"""The device a command runs on, from its --device argument: one check for every command."""

from __future__ import annotations

import torch

from gqn_fast.errors import UsageError


def device_of(name: str | None) -> torch.device:
    """--device NAME (default: a GPU if torch sees one); UsageError for a name torch does not
    know or a CUDA device this torch cannot use (a CPU build, no GPU, an index past the count)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no CUDA device"
            raise UsageError(f"--device: {name} asked for, but {build}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device: {name} asked for, but torch sees {torch.cuda.device_count()} CUDA devices")
    return device
