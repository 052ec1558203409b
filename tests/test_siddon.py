"""Tests of the exact Siddon kernels (:mod:`xraypose.render.siddon`) against analytic chords, the PyTorch
reference, torch autograd and finite differences."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from xraypose.errors import InputError
from xraypose.render.siddon import (
    siddon_backward,
    siddon_backward_volume,
    siddon_forward,
    siddon_reference,
)

SHAPE = (7, 9, 11)


def _clip(src: np.ndarray, dirv: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slab intersection of the rays with the box [lo, hi] (per axis), restricted to t ∈ [0, 1]."""
    t0 = np.zeros(len(src))
    t1 = np.ones(len(src))
    with np.errstate(divide="ignore", invalid="ignore"):
        for a in range(3):
            s, d = src[:, a], dirv[:, a]
            ta = (lo[a] - s) / d
            tb = (hi[a] - s) / d
            zero = d == 0
            inside = (s >= lo[a]) & (s <= hi[a])
            t_enter = np.where(zero, np.where(inside, -np.inf, np.inf), np.minimum(ta, tb))
            t_exit = np.where(zero, np.where(inside, np.inf, -np.inf), np.maximum(ta, tb))
            t0 = np.maximum(t0, t_enter)
            t1 = np.minimum(t1, t_exit)
    return t0, t1


def _clip_to_volume(src, dirv, shape=SHAPE):
    return _clip(src, dirv, np.full(3, -0.5), np.asarray(shape) - 0.5)


def _random_rays(rng: np.random.Generator, n: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Segments between two random points of an enlarged box: most cross the volume, some miss."""
    size = np.asarray(shape, dtype=float)
    a = rng.uniform(-4.0, size + 3.0, (n, 3))
    b = rng.uniform(-4.0, size + 3.0, (n, 3))
    return a, b - a


def _special_rays(rng: np.random.Generator, shape=SHAPE):
    """Axis-parallel rays, zero direction components, starts exactly on faces, empty/missing rays."""
    src, dirv, t0, t1 = [], [], [], []
    n = np.asarray(shape, dtype=float)

    def add(s, d, a=None, b=None):
        s, d = np.asarray(s, float), np.asarray(d, float)
        if a is None:
            a, b = _clip_to_volume(s[None], d[None], shape)
            a, b = a[0], b[0]
        src.append(s)
        dirv.append(d)
        t0.append(a)
        t1.append(b)

    for axis in range(3):  # axis-parallel, both directions, generic and on-face transverse positions
        for sign in (1.0, -1.0):
            s = rng.uniform(0.0, n - 1.0)
            s[axis] = -3.0 if sign > 0 else n[axis] + 2.0
            d = np.zeros(3)
            d[axis] = sign * (n[axis] + 5.0)
            add(s, d)
            s2 = s.copy()
            s2[(axis + 1) % 3] = 2.5  # exactly on a face of the other axes
            s2[(axis + 2) % 3] = -0.5  # exactly on the lower box face
            add(s2, d)
            s3 = s.copy()
            s3[(axis + 1) % 3] = n[(axis + 1) % 3] - 0.5  # on the upper box face: outside
            add(s3, d)
    for axis in range(3):  # one zero component
        s = rng.uniform(-3.0, n + 2.0)
        e = rng.uniform(-3.0, n + 2.0)
        s[axis] = e[axis] = rng.uniform(0.0, n[axis] - 1.0)
        add(s, e - s)
    for m in range(6):  # starting exactly on a cell face (half-integer coordinates), inside the volume
        s = rng.integers(1, np.asarray(shape) - 1) + 0.5 * rng.choice([-1.0, 1.0], 3)
        d = rng.normal(size=3) * 4.0
        if m % 2:
            d[rng.integers(3)] = 0.0
        _, b = _clip_to_volume(s[None], d[None], shape)
        add(s, d, 0.0, b[0])
    for _ in range(4):  # starting and ending inside a cell (t0, t1 inside the volume)
        s = rng.uniform(0.0, n - 1.0)
        d = rng.normal(size=3) * 2.0
        add(s, d, 0.13, 0.71)
    add([1.0, 2.0, 3.0], [3.0, 1.0, 2.0], 0.6, 0.6)  # empty interval
    add([1.0, 2.0, 3.0], [3.0, 1.0, 2.0], 0.6, 0.2)  # reversed interval
    add([-3.0, -3.0, -3.0], [-1.0, 2.0, 1.0], 0.0, 1.0)  # misses the box
    add([3.0, 4.0, 5.0], [0.0, 0.0, 0.0], 0.0, 1.0)  # zero direction: value × (t1 − t0)
    add([3.1, 4.1, 12.0], [0.0, 0.0, 0.0], 0.0, 1.0)  # zero direction outside
    add([-0.5, -0.5, -0.5], [7.0, 9.0, 11.0], 0.0, 1.0)  # exact main diagonal, corner to corner
    return tuple(np.asarray(x) for x in (src, dirv, t0, t1))


def _all_rays(rng, n=200):
    s, d = _random_rays(rng, n)
    t0, t1 = _clip_to_volume(s, d)
    ss, sd, st0, st1 = _special_rays(rng)
    return (
        np.concatenate([s, ss]),
        np.concatenate([d, sd]),
        np.concatenate([t0, st0]),
        np.concatenate([t1, st1]),
    )


def _generic_rays(rng, n=150, shape=SHAPE):
    """Rays whose t0/t1 are not on a cell face: interior sub-intervals of clipped rays and unclipped rays."""
    s, d = _random_rays(rng, n, shape)
    t0, t1 = _clip_to_volume(s, d, shape)
    keep = t1 - t0 > 0.05
    s, d, t0, t1 = s[keep], d[keep], t0[keep], t1[keep]
    u = rng.uniform(0.0, 0.3, (2, len(s)))
    t0, t1 = t0 + u[0] * (t1 - t0), t1 - u[1] * (t1 - t0)
    half = len(s) // 2  # second half: the raw segment [0, 1] between two points (usually outside the box)
    t0[half:], t1[half:] = 0.0, 1.0
    d[: len(s) // 8, rng.integers(3)] = 0.0  # some zero direction components
    return s, d, t0, t1


def _kernel_forward(vol, src, dirv, t0, t1):
    out = np.empty((len(src), vol.shape[0]), dtype=vol.dtype)
    siddon_forward(vol, src, dirv, t0, t1, out)
    return out


def _kernel_backward(vol, src, dirv, t0, t1, grad_out):
    R = len(src)
    g = [np.full((R, 3), np.nan, vol.dtype), np.full((R, 3), np.nan, vol.dtype)]
    g += [np.full(R, np.nan, vol.dtype), np.full(R, np.nan, vol.dtype)]
    siddon_backward(vol, src, dirv, t0, t1, grad_out, *g)
    return g


def _reference(vol, src, dirv, t0, t1, requires_grad=False):
    ts = [torch.tensor(x, requires_grad=requires_grad) for x in (vol, src, dirv, t0, t1)]
    return siddon_reference(*ts), ts


# ------------------------------------------------------------------------------------------------------------


def test_uniform_box_matches_analytic_chord():
    rng = np.random.default_rng(1)
    shape = (12, 10, 8)
    lo_cell, hi_cell = np.array([2, 1, 3]), np.array([8, 6, 6])
    value = 3.7
    vol = np.zeros((1, *shape))
    vol[0, 2:9, 1:7, 3:7] = value
    s, d = _random_rays(rng, 400, shape)
    t0, t1 = _clip_to_volume(s, d, shape)
    # plus axis-parallel rays through the box and rays starting inside it
    par_s = np.array([[-2.0, 3.2, 4.4], [5.3, -1.0, 3.9], [4.1, 2.2, 20.0]])
    par_d = np.array([[15.0, 0.0, 0.0], [0.0, 13.0, 0.0], [0.0, 0.0, -25.0]])
    pt0, pt1 = _clip_to_volume(par_s, par_d, shape)
    s, d = np.concatenate([s, par_s]), np.concatenate([d, par_d])
    t0, t1 = np.concatenate([t0, pt0]), np.concatenate([t1, pt1])
    out = _kernel_forward(vol, s, d, t0, t1)[:, 0]
    b0, b1 = _clip(s, d, lo_cell - 0.5, hi_cell + 0.5)
    chord = np.clip(np.minimum(b1, t1) - np.maximum(b0, t0), 0.0, None) * value
    assert (chord > 0).sum() > 100  # the test exercises real chords
    np.testing.assert_allclose(out, chord, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-6), (np.float32, 1e-4)])
def test_forward_matches_reference(dtype, tol):
    rng = np.random.default_rng(2)
    vol = rng.uniform(0.5, 2.0, (2, *SHAPE))
    src, dirv, t0, t1 = (x.astype(dtype) for x in _all_rays(rng))
    vol = vol.astype(dtype)
    out = _kernel_forward(vol, src, dirv, t0, t1)
    ref, _ = _reference(vol, src, dirv, t0, t1)
    ref = ref.numpy()
    assert out.dtype == dtype
    assert (ref > 0.1).sum() > 100
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max())
    # special cases with known values
    n_special = len(_special_rays(np.random.default_rng(2))[0])
    special = out[-n_special:]
    np.testing.assert_array_equal(special[-6:-3], 0.0)  # empty interval, reversed interval, missing ray
    np.testing.assert_allclose(special[-3], vol[:, 3, 4, 5], rtol=tol)  # zero direction inside
    assert np.all(special[-2] == 0.0)  # zero direction outside


def test_special_rays_values():
    """Hand-checked values: axis-parallel, on faces, corner-to-corner diagonal, empty intervals."""
    rng = np.random.default_rng(3)
    vol = rng.uniform(0.5, 2.0, (2, *SHAPE))
    R = 6
    src = np.array(
        [
            [-3.0, 2.0, 5.0],  # along i at cell (·, 2, 5)
            [-3.0, 2.5, 5.0],  # on the face j = 2.5: belongs to cell j = 3
            [-3.0, 8.5, 5.0],  # on the upper box face j = 8.5: outside
            [2.5, 4.0, 6.0],  # starts on the face i = 2.5, going −i: cells 2, 1, 0
            [-0.5, -0.5, -0.5],  # main diagonal of the box
            [1.0, 1.0, 1.0],
        ]
    )
    dirv = np.array(
        [[12.0, 0, 0], [12.0, 0, 0], [12.0, 0, 0], [-3.0, 0, 0], [7.0, 9.0, 11.0], [1.0, 1.0, 1.0]]
    )
    t0 = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.5])
    t1 = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    out = _kernel_forward(vol, src, dirv, t0, t1)
    assert out.shape == (R, 2)
    np.testing.assert_allclose(out[0], vol[:, :, 2, 5].sum(axis=1) / 12.0, rtol=1e-12)
    np.testing.assert_allclose(out[1], vol[:, :, 3, 5].sum(axis=1) / 12.0, rtol=1e-12)
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_allclose(out[3], vol[:, 0:3, 4, 6].sum(axis=1) / 3.0, rtol=1e-12)
    ref, _ = _reference(vol, src[4:5], dirv[4:5], t0[4:5], t1[4:5])
    np.testing.assert_allclose(out[4], ref.numpy()[0], rtol=1e-9)
    np.testing.assert_array_equal(out[5], 0.0)


def test_backward_matches_autograd():
    rng = np.random.default_rng(4)
    vol = rng.uniform(0.5, 2.0, (2, *SHAPE))
    src, dirv, t0, t1 = _generic_rays(rng)
    grad_out = rng.normal(size=(len(src), 2))
    ref, ts = _reference(vol, src, dirv, t0, t1, requires_grad=True)
    (ref * torch.tensor(grad_out)).sum().backward()
    g_src, g_dirv, g_t0, g_t1 = _kernel_backward(vol, src, dirv, t0, t1, grad_out)
    for name, mine, t in [
        ("src", g_src, ts[1]),
        ("dirv", g_dirv, ts[2]),
        ("t0", g_t0, ts[3]),
        ("t1", g_t1, ts[4]),
    ]:
        expected = t.grad.numpy()
        assert np.abs(expected).max() > 0.1, name
        np.testing.assert_allclose(
            mine, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max(), err_msg=name
        )
    gv = np.zeros_like(vol)
    siddon_backward_volume(src, dirv, t0, t1, grad_out, gv)
    np.testing.assert_allclose(gv, ts[0].grad.numpy(), rtol=1e-6, atol=1e-9)


def test_backward_matches_finite_differences():
    rng = np.random.default_rng(5)
    vol = rng.uniform(0.5, 2.0, (2, *SHAPE))
    src, dirv, t0, t1 = _generic_rays(rng, 120)
    w = rng.normal(size=(len(src), 2))
    g_src, g_dirv, g_t0, g_t1 = _kernel_backward(vol, src, dirv, t0, t1, w)
    h = 1e-6

    def f(s, d, a, b):
        return (_kernel_forward(vol, s, d, a, b) * w).sum(axis=1)

    for name, mine, arg in [("src", g_src, 0), ("dirv", g_dirv, 1)]:
        for axis in range(3):
            args_p = [src.copy(), dirv.copy(), t0, t1]
            args_m = [src.copy(), dirv.copy(), t0, t1]
            args_p[arg][:, axis] += h
            args_m[arg][:, axis] -= h
            fd = (f(*args_p) - f(*args_m)) / (2 * h)
            np.testing.assert_allclose(mine[:, axis], fd, rtol=1e-5, atol=1e-5, err_msg=f"{name}[{axis}]")
    fd_t0 = (f(src, dirv, t0 + h, t1) - f(src, dirv, t0 - h, t1)) / (2 * h)
    fd_t1 = (f(src, dirv, t0, t1 + h) - f(src, dirv, t0, t1 - h)) / (2 * h)
    np.testing.assert_allclose(g_t0, fd_t0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_t1, fd_t1, rtol=1e-5, atol=1e-5)
    assert np.abs(g_src).max() > 0.1 and np.abs(g_t0).max() > 0.1


@pytest.mark.parametrize("threads", [1, 2])
def test_volume_gradient_threads(threads):
    rng = np.random.default_rng(6)
    vol = rng.uniform(0.5, 2.0, (2, *SHAPE))
    src, dirv, t0, t1 = _all_rays(rng, 600)  # ≥ 128 rays per thread: the i-slab parallel path
    grad_out = rng.normal(size=(len(src), 2))
    ref, ts = _reference(vol, src, dirv, t0, t1, requires_grad=True)
    (ref * torch.tensor(grad_out)).sum().backward()
    expected = ts[0].grad.numpy()
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        gv = np.ones_like(vol)  # the kernel adds to grad_vol
        siddon_backward_volume(src, dirv, t0, t1, grad_out, gv)
        gv32 = np.zeros(vol.shape, np.float32)
        siddon_backward_volume(*(x.astype(np.float32) for x in (src, dirv, t0, t1, grad_out)), gv32)
    finally:
        numba.set_num_threads(old)
    np.testing.assert_allclose(gv - 1.0, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(gv32, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


class _KernelIntegral(torch.autograd.Function):
    """Minimal autograd wrapper of the kernels (ray-parameter gradients only), for the chain-rule test."""

    @staticmethod
    def forward(ctx, vol, src, dirv, t0, t1):
        ctx.save_for_backward(vol, src, dirv, t0, t1)
        out = torch.empty(len(src), vol.shape[0], dtype=src.dtype)
        siddon_forward(vol, src, dirv, t0, t1, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        vol, src, dirv, t0, t1 = ctx.saved_tensors
        g = [torch.empty_like(src), torch.empty_like(dirv), torch.empty_like(t0), torch.empty_like(t1)]
        siddon_backward(vol, src, dirv, t0, t1, grad.contiguous(), *g)
        return None, *g


def test_gradient_through_caller_clipping():
    """t0/t1 clipped to the box in torch (kinks at the box faces): the total gradient matches finite
    differences of the composed function, whichever side of a kink the kernel's derivative is taken on."""
    rng = np.random.default_rng(9)
    vol = torch.tensor(rng.uniform(0.5, 2.0, (1, *SHAPE)))
    size = torch.tensor(SHAPE, dtype=torch.float64)

    def f(s, d):
        dd = torch.where(d == 0, torch.full_like(d, 1e-300), d)
        ta, tb = (-0.5 - s) / dd, (size - 0.5 - s) / dd
        t0 = torch.clamp(torch.minimum(ta, tb).amax(dim=1), min=0.0)
        t1 = torch.clamp(torch.maximum(ta, tb).amin(dim=1), max=1.0)
        return _KernelIntegral.apply(vol, s, d, t0, t1)[:, 0]

    a, d0 = _random_rays(rng, 150)
    src = torch.tensor(a, requires_grad=True)
    dirv = torch.tensor(d0, requires_grad=True)
    f(src, dirv).sum().backward()
    h = 1e-6
    for which, grad in ((0, src.grad), (1, dirv.grad)):
        for axis in range(3):
            plus = [src.detach().clone(), dirv.detach().clone()]
            minus = [src.detach().clone(), dirv.detach().clone()]
            plus[which][:, axis] += h
            minus[which][:, axis] -= h
            fd = (f(*plus) - f(*minus)) / (2 * h)
            torch.testing.assert_close(grad[:, axis], fd, rtol=1e-5, atol=1e-6)
    assert src.grad.abs().max() > 0.1


def test_float32_backward_close_to_float64():
    rng = np.random.default_rng(7)
    vol = rng.uniform(0.5, 2.0, (1, *SHAPE))
    src, dirv, t0, t1 = _generic_rays(rng, 80)
    go = rng.normal(size=(len(src), 1))
    g64 = _kernel_backward(vol, src, dirv, t0, t1, go)
    g32 = _kernel_backward(*(x.astype(np.float32) for x in (vol, src, dirv, t0, t1, go)))
    for a, b in zip(g32, g64, strict=True):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())


def test_torch_tensors_share_memory():
    rng = np.random.default_rng(8)
    vol = torch.tensor(rng.uniform(size=(1, *SHAPE)))
    src, dirv, t0, t1 = (torch.tensor(x) for x in _generic_rays(rng, 20))
    out = torch.zeros(len(src), 1, dtype=torch.float64)
    siddon_forward(vol, src, dirv, t0, t1, out)
    torch.testing.assert_close(out, siddon_reference(vol, src, dirv, t0, t1), rtol=1e-9, atol=1e-12)


def test_input_validation():
    vol = np.zeros((1, *SHAPE))
    src = np.zeros((4, 3))
    t = np.zeros(4)
    out = np.zeros((4, 1))
    with pytest.raises(InputError, match="dtype"):
        siddon_forward(vol.astype(np.float32), src, src, t, t, out)
    with pytest.raises(InputError, match="C-contiguous"):
        siddon_forward(vol, np.zeros((3, 4)).T, src, t, t, out)
    with pytest.raises(InputError, match=r"\(C, I, J, K\)"):
        siddon_forward(vol[0], src, src, t, t, out)
    with pytest.raises(InputError, match="out must have shape"):
        siddon_forward(vol, src, src, t, t, np.zeros((4, 2)))
    with pytest.raises(InputError, match="float32 or float64"):
        siddon_forward(vol, src.astype(np.int64), src, t, t, out)
    with pytest.raises(InputError, match="grad_vol"):
        siddon_backward_volume(src, src, t, t, out, np.zeros(SHAPE))
