"""gqn_fast.nn.ConvLSTM / ConvLSTMCell against a plain ConvLSTM written here from the equations
of the module they replace (ndrplz/ConvLSTM_pytorch: one conv over [x, h], gates split
i, f, o, g), in float64: a state_dict saved by the plain module loads into ours, and
outputs, last states and every gradient agree. Under TRITON_INTERPRET=1 each step runs the
fused conv_lstm_cell kernels, on tiny shapes (the `interpreter` tests: see tests/conftest.py)."""

import io

import pytest
import torch
from gqn_fast.kernels import interpreter_enabled
from helpers import RMS_LIMITS, assert_close_rms
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kernels_dispatch import CPU_PATHS, select_path, with_fixtures
from torch import nn

from gqn_fast.nn import ConvLSTM, ConvLSTMCell

INTERPRETED = interpreter_enabled()


class PlainCell(nn.Module):
    """c' = sigmoid(f) c + sigmoid(i) tanh(g), h' = sigmoid(o) tanh(c'); [i, f, o, g] = conv([x, h])."""

    def __init__(self, input_dim, hidden_dim, kernel_size, bias):
        super().__init__()
        self.hidden_dim = hidden_dim
        padding = (kernel_size[0] // 2, kernel_size[1] // 2)
        self.conv = nn.Conv2d(input_dim + hidden_dim, 4 * hidden_dim, kernel_size, padding=padding, bias=bias)

    def forward(self, x, state):
        h, c = state
        i, f, o, g = torch.split(self.conv(torch.cat([x, h], dim=1)), self.hidden_dim, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class PlainConvLSTM(nn.Module):
    """Layers run one after the other over a batch-first sequence, from the given states."""

    def __init__(self, input_dim, hidden_dims, kernel_sizes, bias):
        super().__init__()
        dims = [input_dim] + hidden_dims
        self.cell_list = nn.ModuleList(PlainCell(dims[i], dims[i + 1], k, bias) for i, k in enumerate(kernel_sizes))

    def forward(self, x, states):
        outputs, last = [], []
        for cell, (h, c) in zip(self.cell_list, states):
            hs = []
            for t in range(x.shape[1]):
                h, c = cell(x[:, t], (h, c))
                hs.append(h)
            x = torch.stack(hs, dim=1)
            outputs.append(x)
            last.append((h, c))
        return outputs, last


def saved_and_loaded(plain: nn.Module, ours: nn.Module) -> None:
    """Save the plain module's state_dict to bytes and load it into ours, strictly."""
    buffer = io.BytesIO()
    torch.save(plain.state_dict(), buffer)
    buffer.seek(0)
    ours.load_state_dict(torch.load(buffer, weights_only=True))


def frames_channels_last(x: torch.Tensor) -> torch.Tensor:
    """The same [*, *, C, Y, X] values with the channels innermost in memory."""
    return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


@st.composite
def convlstm_cases(draw):
    tiny = INTERPRETED  # the interpreter runs every step's kernels in Python
    layers = draw(st.integers(1, 2 if tiny else 3))
    odd = st.sampled_from([1, 3] if tiny else [1, 3, 5])
    kernel_sizes = [(draw(odd), draw(odd)) for _ in range(layers)]
    same_kernel = draw(st.booleans())
    return dict(
        input_dim=draw(st.integers(1, 4)),
        hidden_dims=[draw(st.integers(1, 3 if tiny else 5)) for _ in range(layers)],
        kernel_sizes=[kernel_sizes[0]] * layers if same_kernel else kernel_sizes,
        # How the constructor gets kernel_size: one tuple for all layers, or a list.
        kernel_arg="tuple" if same_kernel else "list",
        batch=draw(st.integers(1, 2 if tiny else 3)),
        steps=draw(st.integers(1, 3 if tiny else 4)),
        height=draw(st.integers(1, 5 if tiny else 7)),
        width=draw(st.integers(1, 5 if tiny else 7)),
        batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        return_all_layers=draw(st.booleans()),
        with_state=draw(st.booleans()),
        channels_last=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("interpret", CPU_PATHS)
@settings(with_fixtures, max_examples=max(1, settings.default.max_examples // (2 if INTERPRETED else 1)))
@given(case=convlstm_cases())
def test_convlstm_matches_plain_module_loaded_from_its_checkpoint(interpret, case, nan_poison):
    select_path(interpret)
    torch.manual_seed(case["seed"])
    gen = torch.Generator().manual_seed(case["seed"])
    layers, hidden_dims = len(case["hidden_dims"]), case["hidden_dims"]
    plain = PlainConvLSTM(case["input_dim"], hidden_dims, case["kernel_sizes"], case["bias"])
    kernel_size = case["kernel_sizes"][0] if case["kernel_arg"] == "tuple" else case["kernel_sizes"]
    ours = ConvLSTM(
        case["input_dim"], hidden_dims, kernel_size, layers,
        batch_first=case["batch_first"], bias=case["bias"], return_all_layers=case["return_all_layers"],
    )  # fmt: skip
    saved_and_loaded(plain, ours)
    oracle = plain.double()

    batch, steps, height, width = case["batch"], case["steps"], case["height"], case["width"]
    x = torch.randn(batch, steps, case["input_dim"], height, width, generator=gen)
    if case["channels_last"]:
        x = frames_channels_last(x)
    x_ours = (x if case["batch_first"] else x.transpose(0, 1)).detach().requires_grad_()
    states = None
    if case["with_state"]:
        states = [
            tuple(torch.randn(batch, h, height, width, generator=gen).requires_grad_() for _ in range(2))
            for h in hidden_dims
        ]
    outputs, last = ours(x_ours, states)

    x64 = x.double().requires_grad_()
    states64 = [
        tuple(t.detach().double().requires_grad_() for t in s) if states else (torch.zeros(batch, h, height, width, dtype=torch.float64),) * 2
        for h, s in zip(hidden_dims, states or [None] * layers)
    ]  # fmt: skip
    outputs_ref, last_ref = oracle(x64, states64)
    if not case["return_all_layers"]:
        outputs_ref, last_ref = outputs_ref[-1:], last_ref[-1:]
    assert len(outputs) == len(last) == len(outputs_ref)

    limit = RMS_LIMITS[torch.float32]
    for layer, (out, out_ref, (h, c), (h_ref, c_ref)) in enumerate(zip(outputs, outputs_ref, last, last_ref)):
        assert out.shape == out_ref.shape and out.dtype == torch.float32  # batch first, as the replaced module
        assert_close_rms(out, out_ref, limit, f"layer {layer} output")
        assert_close_rms(h, h_ref, limit, f"layer {layer} h")
        assert_close_rms(c, c_ref, limit, f"layer {layer} c")
        if case["channels_last"] and not case["with_state"]:
            assert h.is_contiguous(memory_format=torch.channels_last), "channels_last input, channels_last state"

    # Every gradient: input, initial states and parameters, from weighted sums of every output.
    returned = [t for out, (h, c) in zip(outputs, last) for t in (out, h, c)]
    returned_ref = [t for out, (h, c) in zip(outputs_ref, last_ref) for t in (out, h, c)]
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in returned]
    loss = sum((t * w.float()).sum() for t, w in zip(returned, weights))
    loss_ref = sum((t * w).sum() for t, w in zip(returned_ref, weights))
    leaves = [x_ours] + [t for s in states or [] for t in s] + list(ours.parameters())
    leaves_ref = [x64] + ([t for s in states64 for t in s] if states else []) + list(oracle.parameters())
    names = (
        ["input"] + [f"state {i}" for i in range(2 * layers if states else 0)] + [n for n, _ in ours.named_parameters()]
    )
    grads = torch.autograd.grad(loss, leaves)
    grads_ref = torch.autograd.grad(loss_ref, leaves_ref)
    for name, grad, grad_ref in zip(names, grads, grads_ref):
        if name == "input" and not case["batch_first"]:
            grad = grad.transpose(0, 1)
        assert_close_rms(grad, grad_ref, limit, f"grad {name}")


@pytest.mark.parametrize("interpret", CPU_PATHS)
@pytest.mark.parametrize("kernel_size,bias", [((3, 3), True), ((1, 5), False)])
def test_cell_matches_plain_cell(interpret, kernel_size, bias, nan_poison):
    """One step of ConvLSTMCell, as user code that loops over the cell itself calls it."""
    select_path(interpret)
    torch.manual_seed(0)
    plain, cell = PlainCell(3, 4, kernel_size, bias), ConvLSTMCell(3, 4, kernel_size, bias)
    saved_and_loaded(plain, cell)
    plain.double()
    x, h, c = (torch.randn(2, n, 5, 6, requires_grad=True) for n in (3, 4, 4))
    h_new, c_new = cell(x, (h, c))
    inputs64 = [t.detach().double().requires_grad_() for t in (x, h, c)]
    h_ref, c_ref = plain(inputs64[0], (inputs64[1], inputs64[2]))
    assert_close_rms(h_new, h_ref, RMS_LIMITS[torch.float32], "h")
    assert_close_rms(c_new, c_ref, RMS_LIMITS[torch.float32], "c")
    grads = torch.autograd.grad((h_new * c_new).sum(), [x, h, c, *cell.parameters()])
    grads_ref = torch.autograd.grad((h_ref * c_ref).sum(), [*inputs64, *plain.parameters()])
    for grad, grad_ref in zip(grads, grads_ref):
        assert_close_rms(grad, grad_ref, RMS_LIMITS[torch.float32], "grad")
    zeros = cell.init_hidden(2, (5, 6))
    assert all(t.shape == (2, 4, 5, 6) and not t.any() for t in zeros)


def test_public_attributes_and_state_dict_names_match_the_replaced_module():
    model = ConvLSTM(3, [8, 4], [(3, 3), (5, 5)], 2, batch_first=True, bias=False, return_all_layers=True)
    assert list(model.state_dict()) == ["cell_list.0.conv.weight", "cell_list.1.conv.weight"]
    assert model.cell_list[1].conv.weight.shape == (16, 8 + 4, 5, 5)
    assert (model.input_dim, model.hidden_dim, model.kernel_size) == (3, [8, 4], [(3, 3), (5, 5)])
    assert (model.num_layers, model.batch_first, model.bias, model.return_all_layers) == (2, True, False, True)
    assert model.cell_list[0].padding == (1, 1) and model.cell_list[1].padding == (2, 2)
    assert [len(s) for s in model._init_hidden(2, (4, 4))] == [2, 2]


@pytest.mark.parametrize("interpret", CPU_PATHS)
def test_batch_of_one_sample_does_not_mix_with_others(interpret, nan_poison):
    """A NaN in one sample's input reaches that sample's outputs only."""
    select_path(interpret)
    model = ConvLSTM(2, 3, (3, 3), 2, batch_first=True)
    x = torch.randn(3, 2, 2, 4, 4)
    x[1, 0, 0, 2, 2] = float("nan")
    (out,), ((h, c),) = model(x)
    for tensor in (out, h, c):
        assert torch.isnan(tensor[1]).any() and torch.isfinite(tensor[[0, 2]]).all()


def test_compiles_without_graph_break_in_a_model():
    """torch.compile(fullgraph=True) of a small video model built on ConvLSTM: same values and gradients."""

    class NextFrame(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = ConvLSTM(1, [4, 4], (3, 3), 2, batch_first=True)
            self.head = nn.Conv2d(4, 1, 1)

        def forward(self, frames):
            (outputs,), _ = self.encoder(frames)
            return self.head(outputs[:, -1])

    torch.manual_seed(0)
    model = NextFrame()
    frames = torch.randn(2, 3, 1, 6, 6)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, out_ref = compiled(frames), model(frames)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    grads_ref = torch.autograd.grad(out_ref.square().sum(), list(model.parameters()))
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Bad arguments: errors name them
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_layers=0), r"num_layers: expected a positive int, got 0"),
        (dict(input_dim=0), r"input_dim: expected a positive int, got 0"),
        (dict(hidden_dim=[4, 0]), r"hidden_dim\[1\]: expected a positive int, got 0"),
        (dict(hidden_dim=[4, 4, 4]), r"hidden_dim: expected one entry per layer \(num_layers=2\), got a list of 3"),
        (dict(kernel_size=(4, 4)), r"kernel_size\[0\]: expected an odd positive int or a pair.*\(4, 4\)"),
        (dict(kernel_size=[(3, 3), (3, 2)]), r"kernel_size\[1\]: expected an odd.*\(3, 2\)"),
        (dict(kernel_size=[(3, 3)]), r"kernel_size: expected one entry per layer"),
        (dict(kernel_size="3"), r"kernel_size\[0\]: expected an odd positive int"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    args = dict(input_dim=2, hidden_dim=4, kernel_size=(3, 3), num_layers=2) | kwargs
    with pytest.raises(ValueError, match=match):
        ConvLSTM(**args)


def test_cell_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"kernel_size: expected an odd positive int or a pair.*\(2, 3\)"):
        ConvLSTMCell(2, 4, (2, 3), True)
    with pytest.raises(ValueError, match=r"hidden_dim: expected a positive int, got -1"):
        ConvLSTMCell(2, -1, 3, True)


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda: (torch.randn(2, 3, 2, 4),), ValueError, r"input_tensor: expected shape \[B, T, C, Y, X\] with input_dim=2, got \[2, 3, 2, 4\]"),
        (lambda: (torch.randn(2, 3, 5, 4, 4),), ValueError, r"input_tensor: expected shape .* input_dim=2, got \[2, 3, 5, 4, 4\]"),
        (lambda: (torch.randn(2, 0, 2, 4, 4),), ValueError, r"input_tensor: expected at least one time step"),
        (lambda: (torch.randint(0, 3, (2, 3, 2, 4, 4)),), TypeError, r"input_tensor: expected a floating-point tensor"),
        (lambda: ([1.0],), TypeError, r"input_tensor: expected a torch.Tensor, got list"),
        (lambda: (torch.randn(2, 3, 2, 4, 4), [(torch.zeros(2, 4, 4, 4),) * 2]), ValueError,
         r"hidden_state: expected one \(h, c\) pair per layer \(2\), got 1 entries"),
        (lambda: (torch.randn(2, 3, 2, 4, 4), [(torch.zeros(2, 4, 4, 4),) * 2, (torch.zeros(2, 4, 4, 5),) * 2]),
         ValueError, r"hidden_state\[1\]: h: expected shape \[2, 4, 4, 4\], got \[2, 4, 4, 5\]"),
        (lambda: (torch.randn(2, 3, 2, 4, 4), [(torch.zeros(2, 4, 4, 4),) * 2, (torch.zeros(2, 4, 4, 4),)]),
         ValueError, r"hidden_state\[1\]: expected a pair \(h, c\)"),
        (lambda: (torch.randn(2, 3, 2, 4, 4), [(torch.zeros(2, 4, 4, 4),) * 2, (torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4, device="meta"))]),
         ValueError, r"hidden_state\[1\]: c: expected device cpu"),
    ],
)  # fmt: skip
def test_forward_rejects_bad_arguments(make_args, error, match):
    model = ConvLSTM(2, 4, (3, 3), 2, batch_first=True)
    with pytest.raises(error, match=match):
        model(*make_args())


def test_cell_forward_rejects_bad_state():
    cell = ConvLSTMCell(2, 4, (3, 3), True)
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"cur_state: expected a pair \(h, c\), got Tensor"):
        cell(x, torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"cur_state: c: expected shape \[1, 4, 4, 4\], got \[1, 3, 4, 4\]"):
        cell(x, (torch.zeros(1, 4, 4, 4), torch.zeros(1, 3, 4, 4)))
