"""CROWN's refinement on receptive-field windows gives the bounds of the dense pass (float64:
to rounding), on random convolution stacks (hypothesis), residual blocks and real networks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from certkit.bounds import BoundedModel
from certkit.bounds.windows import Windows, merge, unit_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _both(bm: BoundedModel, lo: torch.Tensor, up: torch.Tensor) -> tuple[dict, dict]:
    out = []
    for windowed in (False, True):
        bm.windowed = windowed
        with torch.no_grad():
            out.append(bm.intervals(lo, up, "crown"))
    return out[0], out[1]


def _assert_same(dense: dict, windowed: dict, tol: float = 1e-9) -> None:
    for name, (lo, up) in dense.items():
        scale = 1 + max(float(lo.abs().max()), float(up.abs().max()))
        assert torch.allclose(windowed[name][0], lo, rtol=0, atol=tol * scale), name
        assert torch.allclose(windowed[name][1], up, rtol=0, atol=tol * scale), name


def _boxes(shape, batch: int, eps: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *shape, generator=gen, dtype=torch.float64)
    return x - eps, x + eps


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.down = nn.Conv2d(c, c, 1, stride=2)
        self.main = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        y = torch.relu(self.body(x) + x)
        return torch.relu(self.main(y) + self.down(y))  # two paths of one stride, different windows


def _randomise_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


@pytest.mark.parametrize("batch", [1, 4])
def test_a_residual_network_bounds_the_same_on_windows(batch, monkeypatch):
    import certkit.bounds.windows as windows

    used = {"steps": set(), "merged": 0}
    step, join = windows.backward, windows.merge

    def counted_step(op, *args):
        out = step(op, *args)
        if out is not None:
            used["steps"].add(type(op).__name__)
        return out

    def counted_merge(a, b):
        out = join(a, b)
        used["merged"] += out is not None
        return out

    monkeypatch.setattr(windows, "backward", counted_step)
    monkeypatch.setattr(windows, "merge", counted_merge)
    torch.manual_seed(0)
    net = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), Residual(4),
                                      nn.Flatten(), nn.Linear(4 * 4 * 4, 5)))
    bm = BoundedModel(net, (3, 16, 16)).to(torch.float64)
    _assert_same(*_both(bm, *_boxes((3, 16, 16), batch, 0.02)))
    assert {"Conv2d", "ReLU", "Add"} <= used["steps"] and used["merged"] > 0  # the windows did the work


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 2), st.integers(0, 2), st.integers(1, 2),
                          st.sampled_from(["relu", "sigmoid", "bn-relu"])), min_size=2, max_size=3),
       st.integers(1, 3), st.integers(0, 1000))
def test_random_convolution_stacks_bound_the_same_on_windows(layers, batch, seed):
    torch.manual_seed(seed)
    mods, c, size = [], 2, 14
    for kernel, stride, padding, dilation, act in layers:
        span = dilation * (kernel - 1) + 1
        if size + 2 * padding < span:
            continue
        out = 2 + seed % 2
        mods.append(nn.Conv2d(c, out, kernel, stride=stride, padding=padding, dilation=dilation))
        size = (size + 2 * padding - span) // stride + 1
        if act == "bn-relu":
            mods.append(nn.BatchNorm2d(out))
        mods.append(nn.Sigmoid() if act == "sigmoid" else nn.ReLU())
        c = out
    net = _randomise_bn(nn.Sequential(*mods, nn.Conv2d(c, 2, 1), nn.Flatten()))
    bm = BoundedModel(net, (2, 14, 14)).to(torch.float64)
    lo, up = _boxes((2, 14, 14), batch, 0.05, seed)
    dense, windowed = _both(bm, lo, up)
    _assert_same(dense, windowed)
    with torch.no_grad():  # and sound: sampled outputs inside
        pts = lo + (up - lo) * torch.rand(64, *lo.shape, dtype=torch.float64)
        ys = bm(pts.reshape(-1, *lo.shape[1:])).reshape(64, batch, -1)
    out_lo, out_up = windowed[bm.graph.output]
    assert (ys >= out_lo.reshape(batch, -1) - 1e-9).all() and (ys <= out_up.reshape(batch, -1) + 1e-9).all()


def test_pairs_read_their_domains_intervals_on_windows(monkeypatch):
    """Per (domain, neuron) pair, windows cut each pair's domain's intervals out of the batch's
    (no gathered copy): the same bounds as the dense pass over gathered intervals."""
    torch.manual_seed(1)
    net = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), Residual(4),
                                      nn.Flatten(), nn.Linear(4 * 4 * 4, 5)))
    bm = BoundedModel(net, (3, 16, 16)).to(torch.float64)
    refine = BoundedModel._crown_refine
    monkeypatch.setattr(BoundedModel, "_crown_refine", lambda self, *a, **k: refine(self, *a, **k, per_pair=True))
    domains = []
    cut = Windows.cut
    monkeypatch.setattr(Windows, "cut", lambda self, maps: (domains.append(self.domain), cut(self, maps))[1])
    _assert_same(*_both(bm, *_boxes((3, 16, 16), 3, 0.02)))
    assert any(d is not None for d in domains)


@pytest.mark.parametrize("size, rows", [(3, 3), (3, 200), (9, 40)])  # strided view, unfold, wide windows
def test_windows_cut_each_rows_domain(size, rows):
    gen = torch.Generator().manual_seed(size)
    C, H, W, batch = 2, 9, 8, 3
    pos = torch.stack([torch.randint(0, n, (2, rows), generator=gen) for n in (5, 4)], -1)
    domain = torch.tensor([2, 0])
    win = Windows(torch.rand(2, rows, C, size, size, generator=gen, dtype=torch.float64), pos, (5, 4), (2, 2), (1, 1),
                  (C, H, W), domain)
    maps = torch.rand(batch, C, H, W, generator=gen, dtype=torch.float64)
    padded = F.pad(maps, (1, 1 + size, 1, 1 + size))
    got = win.cut(maps)
    for b in range(2):
        for s, (h, w) in enumerate(pos[b].tolist()):
            assert torch.equal(got[b, s], padded[domain[b], :, 2 * h:2 * h + size, 2 * w:2 * w + size])


@pytest.mark.parametrize("network", ["cifar10_resnet_2021/onnx/resnet_2b.onnx", "oval21_2022/onnx/cifar_base_kw.onnx"])
def test_real_networks_bound_the_same_on_windows(network, vnncomp_dir):
    bm = BoundedModel(vnncomp_dir / network).to(torch.float64)
    _assert_same(*_both(bm, *_boxes(bm.graph.input_shape, 2, 2 / 255)))


def test_windows_cut_and_densify_like_slicing():
    gen = torch.Generator().manual_seed(0)
    C, H, W = 3, 7, 6
    index = torch.tensor([[0 * 42 + 0, 1 * 42 + 3 * 6 + 5, 2 * 42 + 6 * 6 + 2]])
    win = unit_rows(index, torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64), (C, H, W))
    dense = win.dense()
    expected = torch.zeros(1, 3, C * H * W, dtype=torch.float64)
    expected[0, 0, 0], expected[0, 1, 42 + 23], expected[0, 2, 84 + 38] = 1.0, -1.0, 2.0
    assert torch.equal(dense, expected.reshape(1, 3, C, H, W))
    # a grown window (stride 2, pad 1, 3×3) cuts what slicing the zero-padded map gives
    grown = Windows(torch.rand(1, 3, C, 3, 3, generator=gen, dtype=torch.float64), win.pos, (H, W), (2, 2), (1, 1),
                    (C, 13, 12))
    maps = torch.rand(1, C, 13, 12, generator=gen, dtype=torch.float64)
    padded = torch.nn.functional.pad(maps, (1, 4, 1, 4))
    cut = grown.cut(maps)
    for s, (h, w) in enumerate(win.pos[0].tolist()):
        assert torch.equal(cut[0, s], padded[0, :, 2 * h:2 * h + 3, 2 * w:2 * w + 3])
    assert torch.allclose((grown.dense() * maps.unsqueeze(1)).flatten(2).sum(-1),
                          (grown.A * cut).flatten(2).sum(-1))
    other = Windows(torch.rand(1, 3, C, 1, 1, generator=gen, dtype=torch.float64), win.pos, (H, W), (2, 2), (0, 0),
                    (C, 13, 12))
    assert torch.allclose(merge(grown, other).dense(), grown.dense() + other.dense())


@pytest.mark.parametrize("name", ["groups", "rectangular"])
def test_grouped_and_rectangular_convolutions_bound_the_same_on_windows(name):
    torch.manual_seed(0)
    if name == "groups":  # grouped and depthwise kernels, a 1×3 kernel with stride (1, 2), a non-square map
        net, shape = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU(),
                                   nn.Conv2d(8, 4, (1, 3), stride=(1, 2)), nn.ReLU(), nn.Flatten()), (4, 12, 18)
    else:  # different kernels, strides, paddings and dilations per axis, and tanh
        net, shape = nn.Sequential(nn.Conv2d(3, 6, (3, 5), stride=(2, 1), padding=(1, 2)), nn.ReLU(),
                                   nn.Conv2d(6, 6, (5, 3), stride=(1, 2), padding=(2, 0), dilation=(1, 2)), nn.Tanh(),
                                   nn.Conv2d(6, 3, 3), nn.ReLU(), nn.Flatten()), (3, 20, 16)
    bm = BoundedModel(net.eval(), shape).to(torch.float64)
    for batch in (1, 3):
        _assert_same(*_both(bm, *_boxes(shape, batch, 0.05, batch)))


def test_a_batch_norm_that_stays_apart_bounds_the_same_on_windows(monkeypatch):
    """A batch norm after a ReLU (not folded into a convolution) is cut per window too."""
    import certkit.bounds.windows as windows

    used, step = set(), windows.backward

    def counted(op, *args):
        out = step(op, *args)
        if out is not None:
            used.add(type(op).__name__)
        return out

    monkeypatch.setattr(windows, "backward", counted)
    torch.manual_seed(0)
    net = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4),
                                      nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.Flatten()))
    bm = BoundedModel(net, (3, 12, 12)).to(torch.float64)
    _assert_same(*_both(bm, *_boxes((3, 12, 12), 2, 0.05)))
    assert "BatchNorm" in used


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 6), st.integers(1, 5), st.integers(1, 3), st.integers(0, 2),
       st.integers(1, 2), st.integers(4, 9), st.integers(0, 2))
def test_the_convolution_adjoint_equals_the_transposed_convolution(c_out, c_in, k, stride, pad, dil, size, extra):
    """conv2d_adjoint (a flipped convolution without stride, a pixel shuffle with one) is
    conv_transpose2d, for every stride, padding, dilation and output padding a backward pass meets."""
    _check_adjoint(c_out, c_in, k, stride, pad, dil, size, extra)


@pytest.mark.parametrize("k, stride, pad, extra", [(2, 2, 0, 0), (4, 2, 1, 0), (4, 2, 1, 1), (4, 2, 2, 2),
                                                   (6, 3, 1, 0), (3, 3, 0, 2), (6, 2, 2, 1),
                                                   (3, 2, 0, 0), (3, 2, 1, 1), (5, 2, 2, 0), (5, 3, 1, 1),
                                                   (1, 2, 0, 0), (7, 4, 3, 2)])
@pytest.mark.parametrize("c_out, c_in", [(8, 3), (24, 3), (16, 8)])
def test_the_strided_adjoint_by_pixel_shuffle_equals_the_transposed_convolution(c_out, c_in, k, stride, pad, extra):
    """Strided adjoints into few channels (the phase sub-kernels and a pixel shuffle), kernels the
    stride divides and kernels padded with zero taps (1×1 stride 2: phases without a tap), with and
    without output padding."""
    _check_adjoint(c_out, c_in, k, stride, pad, 1, 9, extra)


@pytest.mark.parametrize("k, stride, pad, extra",
                         [(3, 2, 1, 1), (3, 2, 0, 0), (1, 2, 0, 0), (4, 2, 1, 0), (5, 3, 2, 2)])
@pytest.mark.parametrize("c_out", [16, 32])
def test_the_strided_adjoint_on_channels_last_copies_equals_the_transposed_convolution(c_out, k, stride, pad, extra):
    """Strided adjoints from 16 channels into more than the phase path takes (channels-last copies)."""
    _check_adjoint(c_out, 16, k, stride, pad, 1, 9, extra)


def _check_adjoint(c_out, c_in, k, stride, pad, dil, size, extra):
    from certkit.bounds.ops.linear import conv2d_adjoint

    g = torch.Generator().manual_seed(c_out * 1000 + k * 100 + size)
    w = torch.randn(c_out, c_in, k, k + extra % 2, generator=g, dtype=torch.float64)  # square: the pixel shuffle
    x = torch.randn(2, c_in, size + extra, size, generator=g, dtype=torch.float64)
    if min(x.shape[2:]) + 2 * pad < dil * k + 1:
        return
    y = F.conv2d(x, w, None, stride, pad, dil)
    A = torch.randn(y.shape, generator=g, dtype=torch.float64)
    out_pad = tuple((x.shape[2 + d] + 2 * pad - dil * (w.shape[2 + d] - 1) - 1) % stride for d in range(2))
    want = F.conv_transpose2d(A, w, None, stride, pad, out_pad, 1, dil)
    for layout in (torch.contiguous_format, torch.channels_last):  # the phases' copies read any strides
        got = conv2d_adjoint(A.contiguous(memory_format=layout), w, (stride, stride), (pad, pad), out_pad, 1,
                             (dil, dil))
        assert got.shape == want.shape == x.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows", [2, 60])  # few rows: the intervals are relaxed per window; many: the map
@pytest.mark.parametrize("step", ["sigmoid", "relu", "conv"])
def test_what_windows_hold_off_the_map_reaches_nothing(step, rows):
    """A convolution's windows keep whatever lands in the padding (``clean`` False): every next step
    gives what it gives on the windows zeroed there, e.g. a sigmoid's lines over [0, 0] off the map
    have an intercept, so coefficients there are zeroed before intervals are relaxed per window."""
    from certkit.bounds import windows
    from certkit.bounds.ops.activation import ReLU, Sigmoid
    from certkit.bounds.ops.linear import Conv2d

    gen = torch.Generator().manual_seed(rows)
    C, H, W = 2, 6, 6
    pos = torch.stack([torch.randint(0, 3, (1, rows), generator=gen) for _ in range(2)], -1)
    dirty = Windows(torch.randn(1, rows, C, 4, 4, generator=gen, dtype=torch.float64), pos, (3, 3), (2, 2), (1, 1),
                    (C, H, W), clean=False)
    assert not dirty.inside().bool().all()  # some positions lie off the map
    clean = dirty.cleaned()
    lo = torch.randn(1, C, H, W, generator=gen, dtype=torch.float64)
    bounds = [(lo, lo + torch.rand(1, C, H, W, generator=gen, dtype=torch.float64))]
    if step == "conv":  # a convolution 3 → C channels whose output map the windows cover
        w = torch.randn(C, 3, 3, 3, generator=gen, dtype=torch.float64)
        op, shapes = Conv2d(lambda: (w, None), (1, 1), (1, 1), (1, 1), 1, (3, H, W)), [(3, H, W)]
    else:
        op, shapes = (Sigmoid() if step == "sigmoid" else ReLU()), [(C, H, W)]
    (got,), got_bias = windows.backward(op, dirty, bounds, shapes)
    (want,), want_bias = windows.backward(op, clean, bounds, shapes)
    assert torch.allclose(got.dense(), want.dense(), atol=1e-12)
    assert got_bias is None and want_bias is None or torch.allclose(got_bias, want_bias, atol=1e-12)
    box = (torch.zeros(1, *shapes[0], dtype=torch.float64), torch.ones(1, *shapes[0], dtype=torch.float64))
    assert torch.allclose(windows.concretize(got, box), windows.concretize(want, box), atol=1e-12)


@pytest.mark.parametrize("change", ["in place", "data", "parameter"])
def test_kernels_derived_from_weights_follow_every_change_of_them(change):
    """|W| and the adjoint kernels are cached per weights while verifying; weights changed in place,
    through ``.data`` or replaced give the bounds of a model built fresh on the new weights."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()
    bm = BoundedModel(net, (2, 8, 8))
    lo, up = _boxes((2, 8, 8), 2, 0.1)
    with torch.no_grad():
        before = bm.compute_bounds(lo, up, "crown")
        for m in (net[0], net[2], net[5]):
            new = torch.randn_like(m.weight)
            if change == "in place":
                m.weight.copy_(new)
            elif change == "data":
                m.weight.data = new
            else:
                m.weight = nn.Parameter(new)
        after = bm.compute_bounds(lo, up, "crown")
        fresh = BoundedModel(net, (2, 8, 8)).compute_bounds(lo, up, "crown")
    assert not torch.allclose(before[0], fresh[0])
    assert torch.equal(after[0], fresh[0]) and torch.equal(after[1], fresh[1])


def test_a_model_copies_after_bounding_with_intervals_of_an_autograd_graph():
    """Operators cache the lines of the intervals they relaxed and kernels of their weights; a copy
    (branch and bound's float32 twin) starts without them, even when the intervals came from a pass
    with gradients (α-CROWN's, relaxed again without), which ``copy.deepcopy`` refuses to copy."""
    import copy

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()
    bm = BoundedModel(net, (1, 7, 7))
    x = torch.rand(1, 1, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        want = bm.compute_bounds(x - 0.1, x + 0.1, "crown")
    relu = next(n.op for n in bm.graph.nodes[1:] if n.op.kind == "relu")
    h = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    lo, up = h - 1, h + 1  # intervals with an autograd history
    with torch.no_grad():
        relu.lines(lo, up)
    assert relu._relaxed[0] is lo
    twin = copy.deepcopy(bm).to(torch.float32)
    with torch.no_grad():
        got = twin.compute_bounds((x - 0.1).float(), (x + 0.1).float(), "crown")
    assert torch.allclose(got[0].double(), want[0], atol=1e-5) and torch.allclose(got[1].double(), want[1], atol=1e-5)


def test_lines_follow_intervals_changed_in_place():
    """An activation keeps the lines of the last intervals it relaxed; the same tensors changed in
    place (a split neuron clamped) are relaxed again."""
    from certkit.bounds.ops.activation import ReLU

    relu = ReLU()
    lo, up = torch.tensor([[-1.0, -2.0]]), torch.tensor([[1.0, 3.0]])
    with torch.no_grad():
        first = relu.lines(lo, up)
        assert relu.lines(lo, up) is first
        lo[0, 0] = 0.0  # the first neuron now stable: the identity
        again = relu.lines(lo, up)
    assert again is not first and again[0][0, 0] == 1 and again[2][0, 0] == 1 and again[3][0, 0] == 0


def test_the_input_box_centre_follows_boxes_changed_in_place():
    """Every pass of a call concretises against the same box, whose centre and radius are kept;
    the same tensors changed in place are read again."""
    from certkit.bounds.windows import box_center_radius

    lo, up = torch.zeros(1, 3), torch.ones(1, 3)
    with torch.no_grad():
        first = box_center_radius((lo, up))
        assert box_center_radius((lo, up)) is first
        up[0, 1] = 3.0
        c, r = box_center_radius((lo, up))
    assert c[0, 1] == 1.5 and r[0, 1] == 1.5 and c[0, 0] == 0.5


@pytest.mark.parametrize("rows", [1, 8, 300])
@pytest.mark.parametrize("k, stride, pad, window",
                         [(4, 2, 1, 4), (3, 1, 1, 6), (3, 2, 1, 3), (1, 2, 0, 2), (3, 1, 0, 1)])
def test_windows_through_a_convolution_by_the_window_map_or_the_adjoint_agree(k, stride, pad, window, rows,
                                                                             monkeypatch):
    """A windowed convolution step gives the same windows by the kept window-to-window map (a
    matrix product) as by the adjoint convolution, and the step on windows that of the dense rows."""
    from certkit.bounds import windows
    from certkit.bounds.ops.linear import Conv2d

    g = torch.Generator().manual_seed(rows + 10 * k + window)
    conv = nn.Conv2d(5, 6, k, stride=stride, padding=pad).double()
    op = Conv2d(lambda: (conv.weight, conv.bias), conv.stride, conv.padding, conv.dilation, conv.groups, (5, 16, 16))
    size = (16 + 2 * pad - k) // stride + 1
    pos = torch.randint(0, size - window + 1, (1, rows, 2), generator=g)
    win = Windows(torch.randn(1, rows, 6, window, window, generator=g, dtype=torch.float64), pos, (size, size),
                  (1, 1), (0, 0), (6, size, size))
    got = {}
    for limit in (0, 1 << 30):  # never the map (beyond single positions), the map whenever it fits
        monkeypatch.setattr(windows, "_WINDOW_MAP_MAX", limit)
        monkeypatch.setattr(windows, "_WINDOW_MAP_WORK", limit)
        with torch.no_grad():
            (grown,), bias = windows._conv(op, win, (5, 16, 16))
        got[limit] = (grown.cleaned().dense(), bias)
        want_A, want_bias = op.backward(win.dense(), [])
        torch.testing.assert_close(got[limit][0], want_A[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(bias, want_bias, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch", [1, 3, 8, 9])
@pytest.mark.parametrize("c_in, c_out, size, k, stride, pad", [(3, 8, 32, 4, 2, 1), (8, 12, 9, 2, 1, 1),
                                                              (4, 4, 7, 3, 1, 0), (2, 5, 6, 1, 2, 0)])
def test_small_convolutions_by_pytorchs_own_kernel_equal_conv2d(batch, c_in, c_out, size, k, stride, pad):
    """certkit's conv2d (PyTorch's im2col kernel for small work, oneDNN's otherwise) is F.conv2d,
    values and gradients."""
    from certkit.bounds.ops.linear import conv2d

    g = torch.Generator().manual_seed(batch * 100 + k)
    x = torch.randn(batch, c_in, size, size, generator=g, requires_grad=True)
    w = torch.randn(c_out, c_in, k, k, generator=g, requires_grad=True)
    b = torch.randn(c_out, generator=g)
    got, want = conv2d(x, w, b, stride, pad), F.conv2d(x, w, b, stride, pad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gx, gw = torch.autograd.grad(got.square().sum(), (x, w))
    hx, hw = torch.autograd.grad(want.square().sum(), (x, w))
    torch.testing.assert_close(gx, hx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, hw, rtol=1e-4, atol=1e-4)
