"""Representation networks psi(x, v) -> r (docs/spec.md): tower, pool and pyramid.

Each takes one image x [N, 3, 64, 64] and its viewpoint v [N, 7] and returns r^k; the
GQN sums r^k over a scene's context views. ReLU follows every convolution.
"""

import torch
import torch.nn.functional as F
from torch import nn


def tile(v: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C] -> [N, C, size, size]: the same vector at every grid position."""
    return v[:, :, None, None].expand(-1, -1, size, size)


class Tower(nn.Module):
    """r is r_dim x 16 x 16. Widths are the paper's for r_dim = 256."""

    def __init__(self, r_dim: int = 256, v_dim: int = 7):
        super().__init__()
        wide, narrow = r_dim, r_dim // 2
        self.conv1 = nn.Conv2d(3, wide, kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(wide, wide, kernel_size=2, stride=2)
        self.conv3 = nn.Conv2d(wide, narrow, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(narrow, wide, kernel_size=2, stride=2)
        self.conv5 = nn.Conv2d(wide + v_dim, wide, kernel_size=3, padding=1)
        self.conv6 = nn.Conv2d(wide + v_dim, narrow, kernel_size=3, padding=1)
        self.conv7 = nn.Conv2d(narrow, wide, kernel_size=3, padding=1)
        self.conv8 = nn.Conv2d(wide, wide, kernel_size=1)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h1 = F.relu(self.conv1(x))  # 32x32
        skip = F.relu(self.conv2(h1))  # 16x16
        h = F.relu(self.conv3(h1))  # 32x32
        h = F.relu(self.conv4(h)) + skip  # 16x16
        h = torch.cat([h, tile(v, h.shape[-1])], dim=1)
        skip = F.relu(self.conv5(h))
        h = F.relu(self.conv6(h))
        h = F.relu(self.conv7(h)) + skip
        return F.relu(self.conv8(h))


class Pool(Tower):
    """The tower, then the average over its 16x16 grid: r is r_dim x 1 x 1."""

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return super().forward(x, v).mean(dim=(2, 3), keepdim=True)


class Pyramid(nn.Module):
    """v tiled over the 64x64 image, then four strided convs down to r_dim x 1 x 1."""

    def __init__(self, r_dim: int = 256, v_dim: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(3 + v_dim, r_dim // 8, kernel_size=2, stride=2)  # 32x32
        self.conv2 = nn.Conv2d(r_dim // 8, r_dim // 4, kernel_size=2, stride=2)  # 16x16
        self.conv3 = nn.Conv2d(r_dim // 4, r_dim // 2, kernel_size=2, stride=2)  # 8x8
        self.conv4 = nn.Conv2d(r_dim // 2, r_dim, kernel_size=8, stride=8)  # 1x1

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, tile(v, x.shape[-1])], dim=1)
        h = F.relu(self.conv1(h))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return F.relu(self.conv4(h))


NETS = {"tower": Tower, "pool": Pool, "pyramid": Pyramid}
