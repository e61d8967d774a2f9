"""CROWN's backward pass on receptive-field windows, for the intermediate bounds of image networks.

A CROWN refinement of a convolution's output starts from one row per neuron (±e_j). Going
back through convolutions, a row's coefficients stay zero outside the neuron's receptive
field, which near the output is a small window of each map: dense coefficient tensors spend
most of their memory and time on zeros (cnn-small's second convolution: 94% of full CROWN's
time, the transposed convolution into the input image running at a tenth of its speed on
small kernels). Here each row keeps only its window (auto_LiRPA's "patches" keep the same):

- a row's window at a node of spatial size H×W covers rows ``p·stride − pad … + kh − 1`` (and
  the same for columns), where p is the row's neuron's position at the start node and the
  stride, padding and size accumulate along the path (:class:`Windows`);
- through a convolution, the window grows by the kernel (one transposed convolution of the
  small windows, without padding, or one matrix product with the window-to-window map kept per
  weights where that map is small); positions outside the map, which only padding read, are
  left as they come (``clean`` False) and zeroed only where a later step would read them: the
  next convolution, or a relaxation of intervals cut at each window (off the map [0, 0], whose
  lines need not be zero); the usual next step, an activation's lines or an affine map's scale
  cut at each window, is zero there and cleans them for free;
- through an activation, an element-wise affine map, a batch norm or a sum, the per-neuron
  quantities (relaxation lines, scales, shifts) are cut out at each window (by indexing);
- at the input the windows are concretised against the box's windows.

Anything else (another operator, two windows of different strides meeting, windows as wide
as their map, or half as wide before an activation) turns the windows back into dense
coefficients and the pass goes on as usual.
Every coefficient a dense pass would compute is computed, only in another order: the bounds
are the same up to float rounding, and the tests hold the two paths to each other.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from certkit.bounds.ops import Activation, Add, BatchNorm, Conv2d, ElementwiseAffine
from certkit.bounds.ops.base import through_lines

Interval = tuple[Tensor, Tensor]
# Windows at least this wide are copied at every position from a strided view of the maps,
# narrower ones by unfold (im2col), whichever is faster (one thread: unfold 2× faster at 3×3,
# even at 5×5, the view copy 2–4× faster from 7×7 up to 31×31).
_WIDE = 5
# Windows narrower than this, when rows are fewer than window positions, are gathered by flat
# offsets into the padded maps with ``index_select`` (1.4–5× faster than advanced indexing of the
# strided view, whose inner runs are a window's rows: 3×3 to 12×12); wider ones from the view
# (31×31: 0.8× the time of the flat gather, which builds an index per element).
_GATHER_WIDE = 16
# Windowed convolution adjoints by a matrix product with the window-to-window map (_by_window_map):
# its largest size (entries), the product's work (multiply-adds) below which it is used whatever the
# map's zeros, and above it the largest ratio of its work to the convolution's.
_WINDOW_MAP_MAX = 1 << 18
_WINDOW_MAP_WORK = 1 << 24
_WINDOW_MAP_DENSITY = 3
# Share of its map from which a window goes dense before an activation's step: cutting the
# relaxation's three maps (and the box at the input) at every row's window costs more than one
# scatter of the rows into dense coefficients and steps over whole maps (ResNet-2B and -4B at
# batch 1: 0.88–0.92× the time at 0.5 or 0.7; the OVAL21 nets, whose windows stay narrower, 1.00×).
_DENSE_FROM = 0.5


@dataclass
class Windows:
    """Coefficients ``A`` (B, S, C, kh, kw) of rows that are zero outside a window of a (C, H, W)
    map: row (b, s), whose neuron sits at ``pos[b, s]`` = (h, w) of the start node's grid, covers
    map rows ``h·stride[0] − pad[0] … + kh − 1`` and the same for columns. With ``domain``, rows
    (b, ·) read sample ``domain[b]`` of the maps they are cut from (the (domain, neuron) pairs of
    a CROWN refinement, cut from the batch's intervals instead of a gathered copy per pair)."""

    A: Tensor
    pos: Tensor  # (B, S, 2), long
    grid: tuple[int, int]  # the start node's spatial size
    stride: tuple[int, int]
    pad: tuple[int, int]
    map_shape: tuple[int, int, int]  # (C, H, W) of the node the coefficients apply to
    domain: Tensor | None = None  # (B,), long: the maps' sample each row reads (None: b itself)
    clean: bool = True  # whether A is zero at window positions off the map (finite there if not)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the dense coefficients these stand for: (B, S, C, H, W)."""
        return (*self.A.shape[:2], *self.map_shape)

    @property
    def size(self) -> tuple[int, int]:
        return self.A.shape[-2], self.A.shape[-1]

    def fits(self) -> bool:
        """Whether the windows are worth keeping: narrower than their map."""
        (kh, kw), (_, H, W) = self.size, self.map_shape
        return (kh < H or kw < W) and min(self.pad) >= 0

    def _corners(self) -> tuple[Tensor, Tensor]:
        """Each row's window's first map row and column, in the map padded by ``pad`` (B, S)."""
        return self.pos[..., 0] * self.stride[0], self.pos[..., 1] * self.stride[1]

    def _map_coordinates(self) -> tuple[Tensor, Tensor, Tensor]:
        """Each row's window's map rows (B, S, kh) and columns (B, S, kw), and whether each window
        position lies on the map (B, S, kh, kw) rather than in the padding."""
        (kh, kw), (_, H, W) = self.size, self.map_shape
        top, left = self._corners()
        rows = top[..., None] - self.pad[0] + torch.arange(kh, device=top.device)
        cols = left[..., None] - self.pad[1] + torch.arange(kw, device=top.device)
        on_map = ((rows >= 0) & (rows < H))[..., :, None] & ((cols >= 0) & (cols < W))[..., None, :]
        return rows, cols, on_map

    def cut(self, maps: Tensor) -> Tensor:
        """Each row's window of ``maps`` (B or 1, C or 1, H, W; the domains' count with ``domain``):
        (B, S, C or 1, kh, kw), zero outside the map. With fewer rows than window positions each row's
        window is gathered from a strided view of the padded maps; otherwise every position's
        window is copied once and the rows pick theirs."""
        B, S = self.A.shape[:2]
        (kh, kw), (_, H, W) = self.size, self.map_shape
        maps = maps.reshape(maps.shape[0], -1, H, W)
        C = maps.shape[1]
        ph, pw = self.pad
        top, left = self._corners()
        which = self._samples(maps.shape[0])
        if int(top.max()) > H + 2 * ph or int(left.max()) > W + 2 * pw:  # off the padded grid
            rows, cols, on_map = self._map_coordinates()
            picked = maps[which[..., None, None], :, rows.clamp(0, H - 1)[..., :, None],
                          cols.clamp(0, W - 1)[..., None, :]]
            picked = picked * on_map.unsqueeze(-1).to(picked.dtype)  # (B, S, kh, kw, C), zero off the map
            return picked.permute(0, 1, 4, 2, 3)
        padded = F.pad(maps, (pw, pw + kw, ph, ph + kh))  # room for every window's far side
        view = padded.unfold(2, kh, self.stride[0]).unfold(3, kw, self.stride[1])  # (Bm, C, nh, nw, kh, kw)
        nh, nw = view.shape[2:4]
        if maps.shape[0] * nh * nw > B * S:  # fewer rows than window positions: gather each row's
            if kw >= _GATHER_WIDE:
                return view.permute(0, 2, 3, 1, 4, 5)[which, self.pos[..., 0], self.pos[..., 1]]
            # by flat offsets: each row's window's first element, plus the window's own pattern
            Hp, Wp = padded.shape[2:]
            first = (which * C * Hp + top) * Wp + left  # (B, S)
            index = (first[..., None] + _window_pattern(C, kh, kw, Hp, Wp, first.device)).reshape(-1)
            return padded.reshape(-1).index_select(0, index).reshape(B, S, C, kh, kw)
        # every window position copied once (see _WIDE), then whole rows of that matrix picked
        # (index_select: 3–6× faster than gathering each row's window from the strided view)
        if kw < _WIDE:
            every = F.unfold(padded, (kh, kw), stride=self.stride).transpose(1, 2)  # (Bm, nh·nw, C·kh·kw)
        else:
            every = view.permute(0, 2, 3, 1, 4, 5)
        index = (which * nh + self.pos[..., 0]) * nw + self.pos[..., 1]  # (B, S) into the Bm·nh·nw windows
        picked = every.reshape(-1, C * kh * kw).index_select(0, index.reshape(-1))
        return picked.reshape(B, S, C, kh, kw)

    def _samples(self, batch: int) -> Tensor:
        """The maps' sample each row reads, (B, 1) (or (1, 1) when the maps hold one sample for all),
        for indexing beside (B, S) positions."""
        if batch == 1:
            return torch.zeros(1, 1, dtype=torch.long, device=self.A.device)
        if self.domain is not None:
            return self.domain[:, None]
        return torch.arange(self.A.shape[0], device=self.A.device)[:, None]

    def cut_all(self, *maps: Tensor | None) -> list[Tensor | None]:
        """:meth:`cut` of several maps of the same spatial size at once (one gather of their channels
        side by side instead of one each); None stays None."""
        given = [m for m in maps if m is not None]
        if not given:
            return list(maps)
        _, H, W = self.map_shape
        flat = [m.reshape(m.shape[0], -1, H, W) for m in given]
        batch = max(m.shape[0] for m in flat)
        counts = [m.shape[1] for m in flat]
        pieces = iter(self.cut(torch.cat([m.expand(batch, -1, -1, -1) for m in flat], 1)).split(counts, 2))
        return [None if m is None else next(pieces) for m in maps]

    def inside(self) -> Tensor:
        """1 where a window position lies on the map, 0 where it lies in the padding (B, S, 1, kh, kw)."""
        return self._map_coordinates()[2].unsqueeze(2).to(self.A.dtype)

    def cleaned(self) -> Windows:
        """These windows with A zero at the positions off the map."""
        return self if self.clean else replace(self, A=self.A * self.inside(), clean=True)

    def dense(self) -> Tensor:
        """The coefficients as a dense (B, S, C, H, W) tensor (window positions off the map, which
        only padding reads, are dropped): one scatter into the flat result, positions off the map
        sent to a slot past its end."""
        B, S, C, kh, kw = self.A.shape
        _, H, W = self.map_shape
        R, n = B * S, C * H * W
        rows, cols, on_map = (t.reshape(R, *t.shape[2:]) for t in self._map_coordinates())
        spot = rows[:, :, None] * W + cols[:, None, :] + torch.arange(R, device=rows.device)[:, None, None] * n
        spot = torch.where(on_map, spot, R * n)  # (R, kh, kw)
        channel = torch.arange(C, device=rows.device)[None, :, None, None] * (H * W)
        index = spot[:, None] + channel * on_map[:, None]  # (R, C, kh, kw)
        out = self.A.new_zeros(R * n + 1)
        out.index_put_((index.reshape(-1),), self.A.reshape(-1))
        return out[:R * n].view(B, S, C, H, W)


@functools.lru_cache(maxsize=64)
def _window_pattern(C: int, kh: int, kw: int, Hp: int, Wp: int, device: torch.device) -> Tensor:
    """The flat offsets of a kh×kw window's elements (C, kh, kw, flattened) in (C, Hp, Wp) maps,
    from its first element."""
    pattern = (torch.arange(C)[:, None, None] * Hp + torch.arange(kh)[:, None]) * Wp + torch.arange(kw)
    return pattern.reshape(-1).to(device)


def unit_rows(index: Tensor, signs: Tensor, shape, domain: Tensor | None = None) -> Windows | None:
    """Rows ``signs[s]``·e_j, j = ``index[b, s]`` (flat), of a (C, H, W) node as 1×1 windows (the
    rows of a CROWN refinement; ``domain``: see :class:`Windows`), or None when the node is not an
    image or they would not fit."""
    if len(shape) != 3 or shape[1] * shape[2] <= 1:
        return None
    C, H, W = shape
    B, S = index.shape
    channel, spot = index // (H * W), index % (H * W)
    A = torch.zeros(B, S, C, 1, 1, dtype=signs.dtype, device=signs.device)
    A[..., 0, 0].scatter_(2, channel.unsqueeze(2), signs.expand(B, S).unsqueeze(2).contiguous())
    win = Windows(A, torch.stack([spot // W, spot % W], -1), (H, W), (1, 1), (0, 0), (C, H, W), domain)
    return win if win.fits() else None


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ a·b over each row's window (B, S): one fused reduction, no product tensor."""
    return torch.linalg.vecdot(a.flatten(2), b.expand_as(a).flatten(2))


def _spatial(shape) -> bool:
    return len(shape) == 3


def backward(op, win: Windows, in_bounds: list[Interval], in_shapes: list[tuple[int, ...]]
             ) -> tuple[list[Windows], Tensor | None] | None:
    """The windowed backward rule of ``op`` (the windows reaching each input, and the bias), or
    None when ``op`` has none here (the caller then goes on with dense coefficients)."""
    if isinstance(op, Conv2d):
        return _conv(op, win, in_shapes[0])
    if type(op).backward is Activation.backward and in_shapes[0] == win.map_shape:
        (kh, kw), (_, H, W) = win.size, win.map_shape
        return None if kh * kw >= _DENSE_FROM * H * W else _activation(op, win, in_bounds[0])
    if isinstance(op, ElementwiseAffine) and op.in_shape == win.map_shape:
        return _affine(win, op.scale, op.shift)
    if isinstance(op, BatchNorm) and _spatial(win.map_shape):
        return _affine(win, *op.scale_shift(4))  # per channel, (C, 1, 1)
    if isinstance(op, Add) and all(tuple(s) == win.map_shape for s in op.in_shapes):
        other = win if op.sign > 0 else replace(win, A=-win.A)
        return [win, other], None
    return None


def _conv(op: Conv2d, win: Windows, in_shape: tuple[int, ...]):
    s, p, d = op.stride, op.padding, op.dilation
    if not _spatial(in_shape) or not all(isinstance(v, int) for v in (*s, *p, *d)):
        return None  # (a padding given as a string, 'same', has no fixed offset here)
    w, b = op._params()
    win = win.cleaned()  # what the padding holds must not reach the input's map
    B, S, C, kh, kw = win.A.shape
    rows = win.A.reshape(B * S, C, kh, kw)
    if _by_window_map(w, op.groups, C, kh, kw, s, d, B * S):
        n = C * kh * kw
        T = op._from_weights(f"window map {kh}x{kw}", w, lambda w: op.adjoint(
            torch.eye(n, dtype=w.dtype, device=w.device).reshape(n, C, kh, kw), w, (0, 0), (0, 0)))
        A_in = (rows.reshape(B * S, -1) @ T.reshape(n, -1)).reshape(B, S, *T.shape[1:])
    else:
        A_in = op.adjoint(rows, w, (0, 0), (0, 0))
        A_in = A_in.reshape(B, S, *A_in.shape[1:])
    grown = Windows(A_in, win.pos, win.grid, (win.stride[0] * s[0], win.stride[1] * s[1]),
                    (win.pad[0] * s[0] + p[0], win.pad[1] * s[1] + p[1]), tuple(in_shape), win.domain,
                    clean=False)
    bias = None if b is None else win.A.sum((-2, -1)).matmul(b)
    return [grown], bias


def _by_window_map(w: Tensor, groups: int, C: int, kh: int, kw: int, stride, dilation, rows: int) -> bool:
    """Whether a convolution's adjoint on ``rows`` windows (C, kh, kw) runs as one matrix product
    with its window-to-window map (the adjoint of every unit window, kept per weights and window
    size) rather than as a convolution: single positions always (a refinement's first step: a
    convolution call costs 50–100 µs however few the rows); wider windows without gradients (the
    map is kept) when the map is small (``_WINDOW_MAP_MAX``), and either the product is small
    (``_WINDOW_MAP_WORK``) or the map is not much sparser than the convolution's work
    (``_WINDOW_MAP_DENSITY``): 4×4 to 6×6 windows of 8–32 channels, 16–200 rows, 0.2–0.9× the
    convolution's time; 1,000–2,000 rows 0.2–1.06× within these limits."""
    if kh * kw == 1:
        return True
    if torch.is_grad_enabled():
        return False
    kH, kW = w.shape[2:]
    oh = (kh - 1) * stride[0] + dilation[0] * (kH - 1) + 1
    ow = (kw - 1) * stride[1] + dilation[1] * (kW - 1) + 1
    entries = C * kh * kw * w.shape[1] * groups * oh * ow
    dense = oh * ow * groups <= _WINDOW_MAP_DENSITY * kH * kW  # the map's work over the convolution's
    return entries <= _WINDOW_MAP_MAX and (rows * entries <= _WINDOW_MAP_WORK or dense)


def _activation(op: Activation, win: Windows, bounds: Interval):
    # relaxations are per neuron: relaxing each window's intervals is relaxing the map's, cut;
    # whichever holds fewer neurons is relaxed. Cut lines are zero off the map (the result is
    # clean whatever A holds there); intervals cut are [0, 0] there, whose lines need not be
    # zero: they meet coefficients made zero there first
    lo, up = bounds
    B, S = win.A.shape[:2]
    if B * S * win.size[0] * win.size[1] <= lo.shape[0] * lo[0, 0].numel():
        win = win.cleaned()
        a_l, b_l, a_u, b_u = op.relax(*win.cut_all(lo, up))
    else:
        a_l, b_l, a_u, b_u = win.cut_all(*op.lines(lo, up))
    A = win.A
    negative = A.clamp(max=0)
    A_in = through_lines(A, negative, a_l, a_u)
    bias = _dot(negative, b_u)
    if b_l is not None:
        bias = bias + _dot(A - negative, b_l)
    return [replace(win, A=A_in, clean=True)], bias


def _full_map(t: Tensor, shape: tuple[int, int, int]) -> Tensor | None:
    """A constant broadcast over one sample, as a (1, C, H, W) map (None when it has more dims)."""
    if t.dim() > 3:
        return None
    return t.expand(shape).unsqueeze(0)


def _affine(win: Windows, scale: Tensor | None, shift: Tensor | None):
    A = win.A
    maps = [None if t is None else _full_map(t, win.map_shape) for t in (scale, shift)]
    if any(m is None and t is not None for m, t in zip(maps, (scale, shift))):
        return None
    scale_w, shift_w = win.cut_all(*maps)  # zero off the map
    bias = None if shift_w is None else _dot(A, shift_w)
    A_in = A if scale_w is None else A * scale_w
    return [replace(win, A=A_in, clean=win.clean or scale_w is not None)], bias


def merge(a: Windows, b: Windows) -> Windows | None:
    """The sum of two windowed coefficient sets reaching the same node (a residual block's two
    paths), on the union of their windows; None when their grids do not line up."""
    if (a.stride, a.map_shape, a.grid) != (b.stride, b.map_shape, b.grid) or not torch.equal(a.pos, b.pos):
        return None
    if a.domain is not b.domain and (a.domain is None or b.domain is None or not torch.equal(a.domain, b.domain)):
        return None
    pad = tuple(max(x, y) for x, y in zip(a.pad, b.pad))
    ends = [max(x - px, y - py) for x, px, y, py in zip(a.size, a.pad, b.size, b.pad)]
    size = tuple(e + p for e, p in zip(ends, pad))

    def widen(w: Windows) -> Tensor:
        top, left = pad[0] - w.pad[0], pad[1] - w.pad[1]
        return F.pad(w.A, (left, size[1] - w.size[1] - left, top, size[0] - w.size[0] - top))

    return replace(a, A=widen(a) + widen(b), pad=pad, clean=a.clean and b.clean)


def concretize(win: Windows, box: Interval) -> Tensor:
    """Lower bound (B, S) of the windowed A·x over the box (A·c − |A|·r on each window; c and r
    are cut as zero off the map, so whatever A holds there adds nothing)."""
    c, r = win.cut_all(*box_center_radius(box))
    return _dot(win.A, c) - _dot(win.A.abs(), r)


_last_box: list = [None]


def box_center_radius(box: Interval) -> tuple[Tensor, Tensor]:
    """((u + l)/2, (u − l)/2) of a box, kept for the last box asked for while no gradient is
    needed: every pass of one CROWN call concretises against the same input box (matched by
    identity and version, as :meth:`~certkit.bounds.ops.Activation.lines` matches intervals)."""
    lo, up = box
    if torch.is_grad_enabled():
        return (up + lo) / 2, (up - lo) / 2
    hit = _last_box[0]
    versions = (lo._version, up._version)
    if hit is None or hit[0] is not lo or hit[1] is not up or hit[2] != versions:
        hit = _last_box[0] = (lo, up, versions, ((up + lo) / 2, (up - lo) / 2))
    return hit[3]
