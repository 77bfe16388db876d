"""The GQN configuration shared by the reference and the fast model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

REPRESENTATIONS = ("tower", "pool", "pyramid")
# The GQN of Eslami et al. 2018, Consistent GQN (JUMP, Kumar et al. 2018) and attention GQN
# (Rosenbaum et al. 2018); gqn_fast/models.py maps each to its classes.
MODELS = ("gqn", "jump", "attention")

# Image and latent grid sizes are fixed by the architecture (docs/spec.md): 64x64 images,
# a 16x16 grid for r, the core states and z.
IMAGE_SIZE = 64
GRID_SIZE = 16
VIEWPOINT_DIM = 7
# Attention GQN's patch sides: they divide the image, and the patch net's two k2 s2 convs then a
# k(P/4) s(P/4) conv read each patch alone (reference/attention.py).
ATTENTION_PATCHES = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class GQNConfig:
    """Hyper-parameters of a GQN; see docs/spec.md for what each one means.

    representation: "tower" (r is r_dim x 16 x 16), "pool" or "pyramid" (r_dim x 1 x 1); not
    read by attention GQN, whose scene is a set of patches (its read is r_dim x 16 x 16).
    L: number of generation steps. z_dim: latent channels per step.
    hidden: ConvLSTM hidden channels. canvas: channels of the 64x64 canvas u.
    r_dim: channels of the scene representation r.
    share_cores: one set of core weights for all L steps instead of one per step.
    model: which member of the family (MODELS): "gqn" (2018), "jump" (Consistent GQN) or
    "attention" (attention GQN); each reads the fields above that it needs.
    attention_patch: attention GQN only: the side of the square patches each context image is
    cut into (4, 8, 16, 32 or 64; 64 / attention_patch patches a side).
    attention_key_dim: attention GQN only: channels of each patch's key and of each query.
    """

    representation: str = "tower"
    L: int = 12
    z_dim: int = 3
    hidden: int = 128
    canvas: int = 128
    r_dim: int = 256
    share_cores: bool = False
    model: str = "gqn"
    attention_patch: int = 8
    attention_key_dim: int = 64

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model: expected one of {MODELS}, got {self.model!r}")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"representation: expected one of {REPRESENTATIONS}, got {self.representation!r}")
        for name in ("L", "z_dim", "hidden", "canvas", "r_dim", "attention_key_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.r_dim % 8 and self.representation == "pyramid":
            raise ValueError(f"r_dim: the pyramid net needs a multiple of 8, got {self.r_dim}")
        if self.r_dim % 2:
            raise ValueError(f"r_dim: expected an even number, got {self.r_dim}")
        if self.attention_patch not in ATTENTION_PATCHES or isinstance(self.attention_patch, bool):
            raise ValueError(f"attention_patch: expected one of {ATTENTION_PATCHES}, got {self.attention_patch!r}")
        if not isinstance(self.share_cores, bool):
            raise TypeError(f"share_cores: expected a bool, got {type(self.share_cores).__name__}")

    @property
    def r_is_vector(self) -> bool:
        """r is one r_dim vector per scene, tiled over the grid (pool, pyramid), not the tower's
        r_dim x 16 x 16 map."""
        return self.representation != "tower"

    @classmethod
    def preset(cls, name: str, **overrides) -> GQNConfig:
        """`"paper"`: Eslami et al. 2018. `"small"`: trains on a 2-core CPU in minutes. `"jump-small"`:
        Consistent GQN (JUMP) and `"attention-small"`: attention GQN, at the small preset's sizes."""
        if name not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GQNConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}")
        return cls(**values)


PRESETS = {
    "paper": GQNConfig(),
    "small": GQNConfig(
        # Shared cores: the constant inputs' conv work is then done once instead of L times,
        # which is where the fast path gains most on a CPU (docs/design.md).
        representation="tower",
        L=6,
        z_dim=3,
        hidden=32,
        canvas=32,
        r_dim=64,
        share_cores=True,
    ),
}
# The family at the small preset's sizes. Consistent GQN (JUMP): one latent per scene, L z_dim x 16
# x 16; attention GQN: 8x8 patches, 64 a context view.
PRESETS["jump-small"] = dataclasses.replace(PRESETS["small"], model="jump")
PRESETS["attention-small"] = dataclasses.replace(
    PRESETS["small"], model="attention", attention_patch=8, attention_key_dim=32
)
