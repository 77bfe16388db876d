"""The ConvLSTM cell and GQN's inference and generator cores (docs/spec.md, "Cores")."""

import torch
from torch import nn


class ConvLSTMCell(nn.Module):
    """An LSTM whose matrix products are convolutions.

    One conv over cat[input, h] gives 4 * hidden channels in PyTorch's gate order (i, f, g, o):
    c' = sigmoid(f) c + sigmoid(i) tanh(g);  h' = sigmoid(o) tanh(c').
    """

    def __init__(self, in_channels: int, hidden: int, kernel_size: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + hidden, 4 * hidden, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        i, f, g, o = self.conv(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


# The group each core's cell keeps as its own state: ConvLSTMCell concatenates it after the
# others, so a layout lists it last.
INFERENCE_STATE = "h_e"
GENERATOR_STATE = "h_g"


def cell_inputs(layout: dict[str, int], state: str) -> list[str]:
    """The groups a core passes to its cell as x (layout order), all but the cell's own state."""
    if list(layout)[-1] != state:
        raise ValueError(f"layout: expected the cell's state {state!r} last, got {list(layout)}")
    return [name for name in layout if name != state]


def inference_layout(v_dim: int, r_dim: int, hidden: int, canvas: int) -> dict[str, int]:
    """The inference cell's input channels in the order they are concatenated: name -> count.

    x_q and u are down-sampled to 16x16; h_e is the cell's own state (INFERENCE_STATE), last.
    """
    return {"x_q": 3, "v_q": v_dim, "r": r_dim, "h_g": hidden, "u": canvas, "h_e": hidden}


def generator_layout(v_dim: int, r_dim: int, z_dim: int, hidden: int) -> dict[str, int]:
    """The generator cell's input channels in the order they are concatenated: name -> count.

    h_g is the cell's own state (GENERATOR_STATE), last.
    """
    return {"v_q": v_dim, "r": r_dim, "z": z_dim, "h_g": hidden}


class InferenceCore(nn.Module):
    """Reads the query image, the viewpoint, r, the generator's state and its canvas."""

    def __init__(self, v_dim: int, r_dim: int, hidden: int, canvas: int):
        super().__init__()
        self.layout = inference_layout(v_dim, r_dim, hidden, canvas)
        self.input_groups = cell_inputs(self.layout, INFERENCE_STATE)
        # 64x64 -> 16x16 so that the query image and the canvas meet the 16x16 state.
        self.downsample_x = nn.Conv2d(3, 3, kernel_size=4, stride=4)
        self.downsample_u = nn.Conv2d(canvas, canvas, kernel_size=4, stride=4)
        self.cell = ConvLSTMCell(sum(self.layout[name] for name in self.input_groups), hidden)

    def forward(self, x_q, v_q, r, h_g, u, h_e, c_e):
        inputs = {"x_q": self.downsample_x(x_q), "v_q": v_q, "r": r, "h_g": h_g, "u": self.downsample_u(u)}
        # In layout order; the cell appends its own state h_e.
        return self.cell(torch.cat([inputs[name] for name in self.input_groups], dim=1), h_e, c_e)


class GeneratorCore(nn.Module):
    """Updates its state from the viewpoint, r and z, then draws on the 64x64 canvas."""

    def __init__(self, v_dim: int, r_dim: int, z_dim: int, hidden: int, canvas: int):
        super().__init__()
        self.layout = generator_layout(v_dim, r_dim, z_dim, hidden)
        self.input_groups = cell_inputs(self.layout, GENERATOR_STATE)
        self.cell = ConvLSTMCell(sum(self.layout[name] for name in self.input_groups), hidden)
        self.upsample_h = nn.ConvTranspose2d(hidden, canvas, kernel_size=4, stride=4)

    def forward(self, v_q, r, z, h_g, c_g, u):
        inputs = {"v_q": v_q, "r": r, "z": z}
        # In layout order; the cell appends its own state h_g.
        h_g, c_g = self.cell(torch.cat([inputs[name] for name in self.input_groups], dim=1), h_g, c_g)
        u = u + self.upsample_h(h_g)
        return h_g, c_g, u
