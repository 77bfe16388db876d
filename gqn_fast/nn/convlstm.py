"""ConvLSTM modules that load the checkpoints of the ConvLSTM most PyTorch users copy
(ndrplz/ConvLSTM_pytorch's `convlstm.py` and its forks) and run each step as one fused
kernel on a GPU.

The equations (one convolution over the input and the previous h, gates in the order
i, f, o, g of its output channels, as that code splits them):

    i, f, o, g = split(conv([x_t, h_{t-1}]) + bias, hidden_dim)
    c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g);   h_t = sigmoid(o) tanh(c_t)

Same constructor arguments, forward arguments, return values and parameter names
(`cell_list.{i}.conv.weight` / `.bias`, an nn.Conv2d over input_dim + hidden_dim channels).
Where the Triton kernels run (CUDA; the CPU under TRITON_INTERPRET=1) two things are computed
differently, with the same result: the input's share of the convolution runs once for all
time steps (one large convolution instead of T small ones), and each step is
gqn_fast.kernels.conv_lstm_cell (the h convolution with the gates in its epilogue). Elsewhere each
step is the plain PyTorch of the equations above. Added: an initial state,
any odd kernel size, any spatial size, channels_last inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gqn_fast.kernels import conv_lstm_cell, use_triton

# conv_lstm_cell takes the gates as i, f, g, o; this module's weight holds them as i, f, o, g.
_TO_KERNEL_GATE_ORDER = [0, 1, 3, 2]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _odd_kernel_size(name: str, value) -> tuple[int, int]:
    """(ky, kx) from an int or a pair of ints, each odd: "same" padding needs odd sizes."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 and k % 2 == 1 for k in pair)
    ):
        raise ValueError(f"{name}: expected an odd positive int or a pair of them, e.g. (3, 3), got {value!r}")
    return tuple(pair)


def _check_frames(name: str, tensor, shape: tuple, like: torch.Tensor) -> None:
    """`tensor` is a float tensor of `shape` on `like`'s device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(tensor.shape)}")
    if tensor.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (as the input), got {tensor.device}")


def _zeros_like_frame(frame: torch.Tensor, channels: int) -> torch.Tensor:
    """A zero state [B, channels, Y, X] with the input frame's dtype, device and memory format."""
    batch, _, height, width = frame.shape
    zeros = frame.new_zeros(batch, channels, height, width)
    if frame.stride(1) < frame.stride(3):  # channels innermost: the frames are channels_last
        return zeros.contiguous(memory_format=torch.channels_last)
    return zeros


class ConvLSTMCell(nn.Module):
    """One ConvLSTM layer: `cell(x, (h, c)) -> (h', c')` for one time step.

    input_dim and hidden_dim are channel counts; kernel_size an odd int or (ky, kx) pair of
    odd ints ("same" padding); bias adds the convolution's bias. x is [B, input_dim, Y, X],
    h and c [B, hidden_dim, Y, X].
    """

    def __init__(self, input_dim: int, hidden_dim: int, kernel_size, bias: bool = True):
        super().__init__()
        self.input_dim = _positive_int("input_dim", input_dim)
        self.hidden_dim = _positive_int("hidden_dim", hidden_dim)
        self.kernel_size = _odd_kernel_size("kernel_size", kernel_size)
        self.padding = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)
        self.bias = bool(bias)
        self.conv = nn.Conv2d(
            self.input_dim + self.hidden_dim,
            4 * self.hidden_dim,
            self.kernel_size,
            padding=self.padding,
            bias=self.bias,
        )

    def init_hidden(self, batch_size: int, image_size) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (h, c) of [batch_size, hidden_dim, *image_size] on the weight's device and dtype."""
        height, width = image_size
        weight = self.conv.weight
        shape = (batch_size, self.hidden_dim, height, width)
        return weight.new_zeros(shape), weight.new_zeros(shape)

    def forward(self, input_tensor: torch.Tensor, cur_state) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input("input_tensor", input_tensor, 4, "[B, input_dim, Y, X]")
        h, c = self._check_state("cur_state", cur_state, input_tensor)
        if not use_triton(input_tensor):
            return self._plain_step(input_tensor, h, c)
        weight_x, weight_h, bias = self._kernel_parameters()
        return conv_lstm_cell(h, weight_h, F.conv2d(input_tensor, weight_x, bias, padding=self.padding), c)

    def run_sequence(self, inputs: torch.Tensor, time_dim: int, h: torch.Tensor, c: torch.Tensor):
        """(outputs [B, T, hidden_dim, Y, X], h_T, c_T) over inputs [B, T, C, Y, X] (time_dim 1)
        or [T, B, C, Y, X] (time_dim 0), from the state (h, c)."""
        hs = []
        if not use_triton(inputs):
            for t in range(inputs.shape[time_dim]):
                h, c = self._plain_step(inputs.select(time_dim, t), h, c)
                hs.append(h)
            return torch.stack(hs, dim=1), h, c
        weight_x, weight_h, bias = self._kernel_parameters()
        steps, frames = inputs.shape[time_dim], inputs.flatten(0, 1)
        # The input's share of every step's preactivations, in one convolution; bias included.
        input_preact = F.conv2d(frames, weight_x, bias, padding=self.padding).unflatten(0, inputs.shape[:2])
        for t in range(steps):
            h, c = conv_lstm_cell(h, weight_h, input_preact.select(time_dim, t), c)
            hs.append(h)
        return torch.stack(hs, dim=1), h, c

    def _plain_step(self, x, h, c):
        """One step in plain PyTorch, the replaced module's arithmetic: where no fused kernel runs."""
        i, f, o, g = torch.split(self.conv(torch.cat([x, h], dim=1)), self.hidden_dim, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def _kernel_parameters(self):
        """(weight_x, weight_h, bias) in conv_lstm_cell' gate order, split at the input channels.

        A small copy of the weight per call, not per step. Where the Triton kernels run it
        also takes the output-channels-innermost layout they read, so they copy nothing.
        """
        weight = self.conv.weight
        gathered = weight.unflatten(0, (4, self.hidden_dim))[_TO_KERNEL_GATE_ORDER].flatten(0, 1)
        if use_triton(weight):
            gathered = gathered.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
        bias = None
        if self.conv.bias is not None:
            bias = self.conv.bias.unflatten(0, (4, self.hidden_dim))[_TO_KERNEL_GATE_ORDER].flatten()
        return gathered[:, : self.input_dim], gathered[:, self.input_dim :], bias

    def _check_input(self, name: str, tensor, dims: int, layout: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != dims or tensor.shape[dims - 3] != self.input_dim:
            raise ValueError(
                f"{name}: expected shape {layout} with input_dim={self.input_dim}, got {list(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")

    def _check_state(self, name: str, state, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, c) from a pair of [B, hidden_dim, Y, X] tensors matching the input frame."""
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise ValueError(f"{name}: expected a pair (h, c), got {type(state).__name__}")
        batch, _, height, width = frame.shape
        shape = (batch, self.hidden_dim, height, width)
        for part, tensor in zip("hc", state):
            _check_frames(f"{name}: {part}", tensor, shape, frame)
        return state[0], state[1]


class ConvLSTM(nn.Module):
    """A stack of ConvLSTM layers run over a sequence.

    input_dim: channels of the input; hidden_dim: an int, or a list with one per layer;
    kernel_size: an odd int or (ky, kx) pair, or a list with one per layer; num_layers;
    batch_first: the input is [B, T, C, Y, X] (else [T, B, C, Y, X]); bias: the
    convolutions add a bias; return_all_layers: return every layer's outputs and last state
    (else the last layer's only).

    forward(input_tensor, hidden_state=None) -> (layer_output_list, last_state_list):
    layer outputs are [B, T, hidden, Y, X] (batch first whatever batch_first says, as in the
    module this replaces) and last states [h, c] pairs. hidden_state, if given, is a list
    of one (h, c) pair of [B, hidden, Y, X] tensors per layer; zeros otherwise.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim,
        kernel_size,
        num_layers: int,
        batch_first: bool = False,
        bias: bool = True,
        return_all_layers: bool = False,
    ):
        super().__init__()
        self.num_layers = _positive_int("num_layers", num_layers)
        hidden_dim = self._per_layer("hidden_dim", hidden_dim)
        kernel_size = self._per_layer("kernel_size", kernel_size)
        self.input_dim = _positive_int("input_dim", input_dim)
        self.hidden_dim = [_positive_int(f"hidden_dim[{i}]", h) for i, h in enumerate(hidden_dim)]
        self.kernel_size = [_odd_kernel_size(f"kernel_size[{i}]", k) for i, k in enumerate(kernel_size)]
        self.batch_first = batch_first
        self.bias = bias
        self.return_all_layers = return_all_layers
        self.cell_list = nn.ModuleList(
            ConvLSTMCell(
                self.input_dim if i == 0 else self.hidden_dim[i - 1], self.hidden_dim[i], self.kernel_size[i], bias
            )
            for i in range(self.num_layers)
        )

    def _per_layer(self, name: str, value) -> list:
        """A list with one entry per layer: a list as given (its length checked), else repeated."""
        if not isinstance(value, list):
            return [value] * self.num_layers
        if len(value) != self.num_layers:
            raise ValueError(
                f"{name}: expected one entry per layer (num_layers={self.num_layers}), got a list of {len(value)}"
            )
        return value

    def forward(self, input_tensor: torch.Tensor, hidden_state=None):
        layout = "[B, T, C, Y, X]" if self.batch_first else "[T, B, C, Y, X]"
        self.cell_list[0]._check_input("input_tensor", input_tensor, 5, layout)
        time_dim = 1 if self.batch_first else 0
        if input_tensor.shape[time_dim] == 0:
            raise ValueError(f"input_tensor: expected at least one time step, got shape {list(input_tensor.shape)}")
        first_frame = input_tensor.select(time_dim, 0)
        states = self._initial_states(hidden_state, first_frame)

        layer_output_list, last_state_list = [], []
        layer_input = input_tensor
        for cell, (h, c) in zip(self.cell_list, states):
            layer_input, h, c = cell.run_sequence(layer_input, time_dim, h, c)
            time_dim = 1  # every layer's output is batch first
            layer_output_list.append(layer_input)
            last_state_list.append([h, c])
        if not self.return_all_layers:
            return layer_output_list[-1:], last_state_list[-1:]
        return layer_output_list, last_state_list

    def _initial_states(self, hidden_state, frame: torch.Tensor) -> list:
        if hidden_state is None:
            return [(_zeros_like_frame(frame, cell.hidden_dim),) * 2 for cell in self.cell_list]
        if not isinstance(hidden_state, (tuple, list)) or len(hidden_state) != self.num_layers:
            got = (
                f"{len(hidden_state)} entries"
                if isinstance(hidden_state, (tuple, list))
                else type(hidden_state).__name__
            )
            raise ValueError(f"hidden_state: expected one (h, c) pair per layer ({self.num_layers}), got {got}")
        return [
            cell._check_state(f"hidden_state[{i}]", state, frame)
            for i, (cell, state) in enumerate(zip(self.cell_list, hidden_state))
        ]

    def _init_hidden(self, batch_size: int, image_size) -> list:
        """Zero states for every layer (the replaced module's helper, kept for code that calls it)."""
        return [cell.init_hidden(batch_size, image_size) for cell in self.cell_list]


__all__ = ["ConvLSTM", "ConvLSTMCell"]
