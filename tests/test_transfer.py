"""Transfer functions in the ray engine: post-classified trilinear marching and per-voxel Siddon."""

from __future__ import annotations

import math

import pytest
import torch

from xraypose.errors import InputError
from xraypose.geometry import Camera, Intrinsics, carm_pose
from xraypose.geometry.se3 import se3_exp
from xraypose.render import render
from xraypose.render.transfer import ThresholdTransfer, TransferFunction


def _ramp_channels(x: torch.Tensor) -> torch.Tensor:
    """Three smooth-ish channels of a scalar: a soft threshold, a ramp and a bump."""
    return torch.stack(
        [torch.sigmoid((x - 200) / 40), torch.relu(x + 500) * 1e-3, torch.exp(-(((x - 50) / 300) ** 2))], -1
    )


TF = TransferFunction.from_function(_ramp_channels, -1100, 1500, 5.0, names=("a", "b", "c"))
THR = ThresholdTransfer((0.001029, 1.03, 0.0005886, 1.03), (-300.0, 200.0, 600.0), 150.0)
TRANSFERS = {"table": TF, "threshold": THR}


def _scene(shape=(14, 12, 10), rows=10, cols=9, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    vol = torch.rand(shape, generator=g, dtype=dtype) * 1800 - 1000
    aff = torch.diag(torch.tensor([2.0, 2.2, 2.5, 1.0], dtype=dtype))
    centre = aff[:3, :3] @ ((torch.tensor(shape, dtype=dtype) - 1) / 2)
    pose = carm_pose(
        torch.tensor([12.0, -25.0]),
        torch.tensor([4.0, 18.0]),
        7.0,
        source_to_isocenter=300.0,
        isocenter=centre,
        dtype=dtype,
    )
    intr = Intrinsics(sdd=600.0, rows=rows, cols=cols, dy=5.0, dx=5.5, x0=2.0, y0=-1.0)
    return vol, aff, Camera(intr, pose)


def test_table_evaluation_is_piecewise_linear_and_exact_at_knots():
    x = TF.knots
    assert torch.allclose(TF(x), _ramp_channels(x), atol=1e-12)
    mid = (x[:-1] + x[1:]) / 2
    assert torch.allclose(TF(mid), (_ramp_channels(x[:-1]) + _ramp_channels(x[1:])) / 2, atol=1e-12)
    # linear extension beyond the ends
    far = torch.tensor([2000.0], dtype=torch.float64)
    slope = (TF.table[-1] - TF.table[-2]) / TF.dx
    expect = TF.table[-1] + slope * (far - TF.knots[-1])
    assert torch.allclose(TF(far)[0], expect)


def test_zero_below_and_errors():
    tf = TransferFunction.from_function(lambda x: torch.relu(x + 900.0), -1100, 0, 10.0)
    assert tf.zero_below == pytest.approx(-900.0)
    assert TF.zero_below is None or TF.zero_below < -1000  # channel "a" is tiny but non-zero everywhere
    with pytest.raises(InputError, match="dx > 0"):
        TransferFunction(0.0, 0.0, torch.zeros(3, 1))
    with pytest.raises(InputError, match="table"):
        TransferFunction(0.0, 1.0, torch.zeros(1, 2))
    with pytest.raises(InputError, match="names"):
        TransferFunction(0.0, 1.0, torch.zeros(3, 2), names=("x",))


@pytest.mark.parametrize("kind", sorted(TRANSFERS))
@pytest.mark.parametrize("method", ["trilinear", "siddon"])
def test_fused_equals_reference_forward_and_backward(method, kind):
    tf = TRANSFERS[kind]
    vol, aff, cam = _scene()
    w = None
    results = []
    for backend in ("fused", "reference"):
        v = vol.clone().requires_grad_(True)
        p = cam.pose.clone().requires_grad_(True)
        img = render(
            v, aff, Camera(cam.intrinsics, p), method=method, transfer=tf, backend=backend, multires=False
        )
        if w is None:
            w = torch.randn_like(img)
        (img * w).sum().backward()
        results.append((img.detach(), p.grad, v.grad))
    (a, pa, va), (b, pb, vb) = results
    assert a.shape == (2, tf.channels, 10, 9)
    assert float(b.abs().max()) > 1.0
    for x, y in ((a, b), (pa, pb), (va, vb)):
        assert float((x - y).abs().max() / y.abs().max()) < 1e-9


@pytest.mark.parametrize("method", ["trilinear", "siddon"])
def test_channels_integrate_the_table(method):
    """Summing the channels of a transfer equals rendering the transfer of their sum (linearity)."""
    vol, aff, cam = _scene()
    parts = render(vol, aff, cam, method=method, transfer=TF, multires=False)
    total_tf = TransferFunction(TF.x0, TF.dx, TF.table.sum(1, keepdim=True))
    total = render(vol, aff, cam, method=method, transfer=total_tf, multires=False)
    assert torch.allclose(parts.sum(1), total[:, 0], rtol=1e-10, atol=1e-10)


def test_siddon_transfer_equals_classifying_voxels_first():
    vol, aff, cam = _scene()
    a = render(vol, aff, cam, method="siddon", transfer=TF)
    b = render(TF.apply_to_volume(vol), aff, cam, method="siddon")
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_trilinear_transfer_is_post_classification():
    """Trilinear with a transfer samples the scalar, then maps it. A narrow bump of the transfer between two
    voxel values is caught by post-classification (it matches a dense integral of f(v(s))) and missed by
    classifying voxels first."""
    shape = (40, 8, 8)
    aff = torch.eye(4, dtype=torch.float64)
    i = torch.arange(shape[0], dtype=torch.float64)
    vol = (i[:, None, None] * 50.0 - 1000.0).expand(shape).contiguous()  # -1000 … 950 HU along i
    tf = TransferFunction.from_function(lambda x: torch.exp(-(((x - 25.0) / 10.0) ** 2)), -1100, 1100, 0.5)
    # a ray along i through the middle of the volume
    intr = Intrinsics(sdd=1000.0, rows=1, cols=1, dy=0.1, dx=0.1)
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, :3] = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    pose[:3, 3] = torch.tensor([-300.0, 3.5, 3.5], dtype=torch.float64)
    cam = Camera(intr, pose.unsqueeze(0))
    post = render(vol, aff, cam, transfer=tf, n_samples=4000, multires=False)[0, 0, 0, 0]
    pre = render(tf.apply_to_volume(vol), aff, cam, n_samples=4000, multires=False)[0, 0, 0, 0]
    exact = 10.0 * math.sqrt(math.pi) / 50.0  # ∫ exp(-((50 s - 1025) / 10)²) ds
    assert float(abs(post - exact) / exact) < 1e-3
    assert float(pre) < 0.1 * exact


@pytest.mark.parametrize("kind", sorted(TRANSFERS))
@pytest.mark.parametrize("seed", [0, 1])
def test_pose_and_volume_gradcheck_with_transfer(seed, kind):
    tf = TRANSFERS[kind]
    vol, aff, cam = _scene(shape=(7, 6, 5), rows=4, cols=3)
    pose = cam.pose[:1]

    def by_pose(xi):
        return render(
            vol,
            aff,
            Camera(cam.intrinsics, se3_exp(xi) @ pose),
            transfer=tf,
            backend="fused",
            multires=False,
            n_samples=17,  # a fixed count: the default step's count jumps with the chord length
        )

    xi = (
        torch.randn(1, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e-3
    ).requires_grad_(True)
    assert torch.autograd.gradcheck(by_pose, (xi,), eps=1e-6, atol=1e-5, rtol=1e-3)

    def by_volume(v):
        return render(v, aff, Camera(cam.intrinsics, pose), transfer=tf, backend="fused", multires=False)

    assert torch.autograd.gradcheck(
        by_volume, (vol.clone().requires_grad_(True),), eps=1e-3, atol=1e-6, rtol=1e-3
    )


def test_threshold_transfer_closed_form_and_errors():
    v = torch.linspace(-1200, 1200, 4801, dtype=torch.float64)
    f = THR(v)
    rho = torch.clamp(torch.minimum(0.001029 * v + 1.03, 0.0005886 * v + 1.03), min=0)
    assert torch.allclose(f.sum(-1), rho, atol=1e-12)  # a partition of the density
    assert float(f.min()) >= 0
    assert torch.allclose(
        THR(torch.tensor([-1000.0, -100.0, 400.0, 1000.0], dtype=torch.float64)).argmax(-1), torch.arange(4)
    )
    assert THR.zero_below == pytest.approx(-1.03 / 0.001029)
    with pytest.raises(InputError, match="width"):
        ThresholdTransfer((1.0, 0.0, 1.0, 0.0), (0.0,), 0.0)
    with pytest.raises(InputError, match="edges"):
        ThresholdTransfer((1.0, 0.0, 1.0, 0.0), (1.0, 0.0), 1.0)


def test_transfer_needs_a_scalar_volume():
    vol, aff, cam = _scene()
    with pytest.raises(InputError, match="one scalar channel"):
        render(torch.stack([vol, vol]), aff, cam, transfer=TF)
    with pytest.raises(InputError, match="Transfer"):
        render(vol, aff, cam, transfer=lambda x: x)  # type: ignore[arg-type]
