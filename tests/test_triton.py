"""The Triton trilinear kernels against the PyTorch reference, run on CPU by Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton.language`` is first imported (its own helpers, ``tl.zeros``,
``tl.sum``…, are JIT functions decorated at import); ``tests/conftest.py`` sets it on machines without CUDA.
On a CUDA machine the same tests check the compiled kernels on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from xraypose.render import _triton
from xraypose.render._triton import TritonTrilinear, triton_available
from xraypose.render.engine import box_intersection
from xraypose.render.trilinear import trilinear_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
in_process = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1"
)


def _rays(shape, R=50, seed=0, dtype=torch.float64):
    """Rays through and around a box: clipped, unclipped (sampling outside the box), empty and n = 0."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor(shape, dtype=dtype)
    src = (torch.rand(R, 3, generator=g, dtype=dtype) * 2 - 0.5) * (size + 4) - 2
    target = torch.rand(R, 3, generator=g, dtype=dtype) * size - 0.5
    dirv = (target - src) * 1.7
    t0, t1 = box_intersection(src, dirv, shape)
    # Shrink the clipped intervals a little: a ray crossing two opposite faces with as many samples as voxels
    # samples exactly on voxel-centre planes, where the interpolant has a kink and the kernels take the
    # one-sided derivative from above while the reference's clamp at n − 1 splits it.
    length = t1 - t0
    t0 = t0 + length * (0.01 + 0.04 * torch.rand(R, generator=g, dtype=dtype))
    t1 = t1 - length * (0.01 + 0.04 * torch.rand(R, generator=g, dtype=dtype))
    nsamp = torch.randint(1, 25, (R,), generator=g, dtype=torch.int32)
    # unclipped intervals: samples outside the box take the edge value
    t0[:6] = torch.rand(6, generator=g, dtype=dtype) * 0.2
    t1[:6] = 0.8 + torch.rand(6, generator=g, dtype=dtype) * 0.4
    t1[6:10] = t0[6:10] - 0.1 * torch.rand(4, generator=g, dtype=dtype)  # t1 < t0
    t1[10:12] = t0[10:12]  # t1 = t0
    nsamp[12:16] = 0
    nsamp[16:18] = 1
    return src, dirv, t0, t1, nsamp


def _problem(C, seed, shape=(9, 8, 7)):
    g = torch.Generator().manual_seed(seed)
    vol = torch.rand(C, *shape, generator=g, dtype=torch.float64)
    src, dirv, t0, t1, nsamp = _rays(shape, seed=seed)
    weight = torch.randn(src.shape[0], C, generator=g, dtype=torch.float64)
    weight[::7, 0] = 0.0  # a zero first-channel cotangent
    return vol, src, dirv, t0, t1, nsamp, weight


def _grads(fn, vol, src, dirv, t0, t1, nsamp, weight, dtype=torch.float64, device="cpu"):
    """Output and gradients of ``Σ weight · fn(...)`` w.r.t. vol, src, dirv, t0, t1 (as CPU float64)."""
    inputs = [
        x.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
        for x in (vol, src, dirv, t0, t1)
    ]
    out = fn(*inputs, nsamp.to(device))
    grads = torch.autograd.grad((out * weight.to(device=device, dtype=dtype)).sum(), inputs)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    return out.detach().cpu().double(), [g.cpu().double() for g in grads]


def _close(got, want, rtol):
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-12))


@in_process
@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 1e-4), (torch.float64, 1e-9)], ids=["f32", "f64"]
)
@pytest.mark.parametrize("C", [1, 2, 3], ids=["C1", "C2", "C3"])
def test_forward_backward_match_reference(dtype, rtol, C):
    problem = _problem(C, seed=C)
    ref, ref_grads = _grads(trilinear_reference, *problem)
    out, grads = _grads(TritonTrilinear.apply, *problem, dtype=dtype, device=DEVICE)
    assert out.shape == ref.shape
    _close(out, ref, rtol)
    assert bool((out[6:16] == 0).all())  # t1 < t0, t1 = t0 and n = 0
    for name, got, want in zip(("vol", "src", "dirv", "t0", "t1"), grads, ref_grads, strict=True):
        assert got.shape == want.shape, name
        _close(got, want, rtol)


@in_process
def test_partial_gradients():
    """Only the volume, or only pose inputs, requiring grad (the kernel skips the other part)."""
    vol, src, dirv, t0, t1, nsamp, weight = (x.to(DEVICE) for x in _problem(2, seed=5))
    _, ref_grads = _grads(trilinear_reference, vol, src, dirv, t0, t1, nsamp, weight)

    v = vol.clone().requires_grad_(True)
    (TritonTrilinear.apply(v, src, dirv, t0, t1, nsamp) * weight).sum().backward()
    _close(v.grad.cpu(), ref_grads[0], 1e-9)

    s = src.clone().requires_grad_(True)
    b = t1.clone().requires_grad_(True)
    (TritonTrilinear.apply(vol, s, dirv, t0, b, nsamp) * weight).sum().backward()
    _close(s.grad.cpu(), ref_grads[1], 1e-9)
    _close(b.grad.cpu(), ref_grads[4], 1e-9)


@in_process
def test_int64_offsets(monkeypatch):
    """The int64 addressing used for volumes of 2³¹ elements or more, forced on a small volume."""
    geometry = _triton._geometry
    monkeypatch.setattr(_triton, "_geometry", lambda volp: {**geometry(volp), "BIG": True})
    problem = _problem(3, seed=7)
    ref, ref_grads = _grads(trilinear_reference, *problem)
    out, grads = _grads(TritonTrilinear.apply, *problem, device=DEVICE)
    _close(out, ref, 1e-9)
    for got, want in zip(grads, ref_grads, strict=True):
        _close(got, want, 1e-9)


@in_process
def test_no_rays_and_cached_layout():
    vol = torch.rand(2, 4, 3, 5, dtype=torch.float64, device=DEVICE)
    empty = torch.zeros(0, 3, dtype=torch.float64, device=DEVICE)
    t = torch.zeros(0, dtype=torch.float64, device=DEVICE)
    out = TritonTrilinear.apply(vol, empty, empty, t, t, torch.zeros(0, dtype=torch.int32, device=DEVICE))
    assert out.shape == (0, 2)
    src, dirv, t0, t1, nsamp = (x.to(DEVICE) for x in _rays((4, 3, 5), R=10, seed=1))
    first = TritonTrilinear.apply(vol, src, dirv, t0, t1, nsamp)
    vol.mul_(2.0)  # in-place edit: the cached padded copy must not be reused
    second = TritonTrilinear.apply(vol, src, dirv, t0, t1, nsamp)
    _close(second.cpu(), 2 * first.cpu(), 1e-12)


@in_process
def test_module_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from xraypose.render import _triton\n"
        "assert not _triton.triton_available()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert triton_available()


@in_process
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_threshold_kernels_match_the_reference(dtype):
    """The Triton threshold-transfer kernels (poly renderer on CUDA) against the post-classified reference."""
    from xraypose.render._triton import TritonThreshold
    from xraypose.render.transfer import ThresholdTransfer

    tf = ThresholdTransfer((0.001029, 1.03, 0.0005886, 1.03), (-300.0, 200.0, 600.0), 150.0)
    _, _, params, channels = tf.kernel_spec(dtype)
    g = torch.Generator().manual_seed(5)
    shape = (9, 8, 7)
    hu = torch.rand(1, *shape, generator=g, dtype=torch.float64) * 2000 - 1000
    src, dirv, t0, t1, nsamp = _rays(shape, seed=5)
    weight = torch.randn(src.shape[0], channels, generator=g, dtype=torch.float64)

    def ours(v, s, d, a, b, n):
        return TritonThreshold.apply(v, params, channels, s, d, a, b, n)

    def ref(v, s, d, a, b, n):
        return trilinear_reference(v, s, d, a, b, n, transfer=tf)

    out, grads = _grads(ours, hu, src, dirv, t0, t1, nsamp, weight, dtype=dtype, device=DEVICE)
    want, wgrads = _grads(ref, hu, src, dirv, t0, t1, nsamp, weight)
    # float64: sums of many HU-scaled terms in a different order (atomic adds) agree to ~1e-8 of the largest
    rtol = 1e-7 if dtype == torch.float64 else 2e-3
    assert out.shape == (src.shape[0], 4)
    _close(out, want, rtol)
    for got, exp in zip(grads, wgrads, strict=True):
        _close(got, exp, rtol)
