"""The projective spatial transformer (ProST) against the engine's trilinear renderer, and its first and second
derivatives against finite differences."""

from __future__ import annotations

import pytest
import torch

from xraypose.errors import GeometryError, InputError
from xraypose.geometry import Camera, Intrinsics, carm_pose
from xraypose.geometry.se3 import compose, se3_exp
from xraypose.render import ProjectiveGrid, integrate_rays, projective_transform, render
from xraypose.render.projective import near_far


def _scene(shape=(10, 9, 8), spacing=(3.0, 2.5, 3.5), channels=2, rows=12, cols=10, border=False, seed=0):
    """An anisotropic, oblique, off-centre volume and an off-axis detector (float64)."""
    g = torch.Generator().manual_seed(seed)
    aff = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    rot = se3_exp(torch.tensor([0.0, 0.0, 0.0, 0.1, -0.2, 0.15], dtype=torch.float64))
    aff = rot @ aff
    aff[:3, 3] = torch.tensor([-12.0, -10.0, -13.0], dtype=torch.float64)
    vol = torch.rand(channels, *shape, generator=g, dtype=torch.float64) + 0.1
    if border:  # zero outer voxels: edge replication and "zero outside the box" agree
        vol[:, 0] = vol[:, -1] = 0
        vol[:, :, 0] = vol[:, :, -1] = 0
        vol[:, :, :, 0] = vol[:, :, :, -1] = 0
    intr = Intrinsics(sdd=600.0, rows=rows, cols=cols, dy=72.0 / rows, dx=70.0 / cols, x0=3.0, y0=-2.0)
    pose = carm_pose(
        torch.tensor([17.0, -25.0]),
        torch.tensor([-11.0, 8.0]),
        5.0,
        source_to_isocenter=300.0,
        isocenter=(1.0, -2.0, 0.5),
        dtype=torch.float64,
    )
    return vol, aff, intr, pose


def test_box_limits_equal_the_trilinear_renderer():
    """limits='box' is the engine's trilinear marching: on one channel it equals render() at the same samples."""
    vol, aff, intr, pose = _scene(channels=1)
    cam = Camera(intr, pose)
    ours = projective_transform(vol, aff, cam, n_samples=37, limits="box")
    ref = render(vol[0], aff, cam, method="trilinear", n_samples=37, multires=False, backend="reference")
    assert ours.shape == (2, 1, 12, 10)
    torch.testing.assert_close(ours[:, 0], ref, rtol=1e-10, atol=1e-12)
    fused = render(vol[0], aff, cam, method="trilinear", n_samples=37, multires=False, backend="fused")
    torch.testing.assert_close(ours[:, 0], fused, rtol=1e-10, atol=1e-12)


def test_corner_limits_equal_the_engine_at_the_same_samples():
    """ProST's near/far grid is the engine's midpoint rule on [t_near, t_far] (engine rays, same samples)."""
    vol, aff, intr, pose = _scene(channels=1, border=True)
    cam = Camera(intr, pose)
    K = 40
    ours = projective_transform(vol, aff, cam, n_samples=K)
    t_near, t_far = near_far(aff, vol.shape[1:], pose, intr.sdd)
    M = (torch.linalg.inv(aff) @ pose)[:, :3, :]
    pix = intr.pixel_points(None, dtype=torch.float64)
    dirv = (pix @ M[:, :, :3].transpose(-1, -2)).reshape(-1, 3)
    src = M[:, None, :, 3].expand(-1, pix.shape[0], -1).reshape(-1, 3)
    n = pix.shape[0]
    t0, t1 = t_near.repeat_interleave(n), t_far.repeat_interleave(n)
    nsamp = torch.full_like(t0, K, dtype=torch.int32)
    ref = integrate_rays(vol, src, dirv, t0, t1, nsamp=nsamp, backend="reference")
    ref = ref[:, 0] * (dirv @ aff[:3, :3].T).norm(dim=-1)
    torch.testing.assert_close(ours.reshape(-1), ref, rtol=1e-10, atol=1e-13)
    # and it converges to the renderer's line integral
    fine = projective_transform(vol, aff, cam, n_samples=2000)
    exact = render(vol[0], aff, cam, method="trilinear", n_samples=2000, multires=False, backend="reference")
    assert float((fine[:, 0] - exact).abs().max() / exact.abs().max()) < 1e-5


def test_corner_limits_span_the_posed_box():
    vol, aff, intr, pose = _scene()
    t_near, t_far = near_far(aff, vol.shape[1:], pose, intr.sdd)
    shape = torch.tensor(vol.shape[1:], dtype=torch.float64)
    corners = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=torch.float64)
    idx = -0.5 + corners * shape
    world = idx @ aff[:3, :3].T + aff[:3, 3]
    depth = ((world[None] - pose[:, None, :3, 3]) @ pose[:, :3, :3])[..., 2]  # camera z of the corners
    torch.testing.assert_close(t_near, depth.amin(-1) / intr.sdd)
    torch.testing.assert_close(t_far, depth.amax(-1) / intr.sdd)


def test_multichannel_equals_per_channel_and_matches_float32():
    vol, aff, intr, pose = _scene(channels=3)
    cam = Camera(intr, pose)
    for limits in ("corners", "box"):
        together = projective_transform(vol, aff, cam, n_samples=24, limits=limits)
        for c in range(3):
            alone = projective_transform(vol[c], aff, cam, n_samples=24, limits=limits)
            torch.testing.assert_close(together[:, c], alone[:, 0], rtol=1e-12, atol=1e-14)
    f64 = projective_transform(vol, aff, cam, n_samples=24)
    f32 = projective_transform(vol.float(), aff.float(), Camera(intr, pose.float()), n_samples=24)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), f64, rtol=1e-4, atol=1e-5)


def test_grid_reuse_and_checks():
    vol, aff, intr, pose = _scene()
    cam = Camera(intr, pose)
    grid = ProjectiveGrid(intr, 16, dtype=torch.float64)
    torch.testing.assert_close(
        projective_transform(vol, aff, cam, n_samples=16, grid=grid),
        projective_transform(vol, aff, cam, n_samples=16),
    )
    with pytest.raises(InputError, match="grid"):
        projective_transform(vol, aff, cam, n_samples=8, grid=grid)
    with pytest.raises(InputError, match="limits"):
        projective_transform(vol, aff, cam, limits="near")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="volume"):
        projective_transform(vol[0, 0], aff, cam)
    inside = pose.clone()
    inside[:, :3, 3] = aff[:3, 3] + aff[:3, :3] @ torch.tensor([4.0, 4.0, 4.0], dtype=torch.float64)
    with pytest.raises(GeometryError, match="inside"):
        projective_transform(vol, aff, Camera(intr, inside))


def test_twice_differentiable_pose_and_volume_against_finite_differences():
    """gradcheck and gradgradcheck (double backward: finite differences of the first gradient) in float64, on a
    tiny volume, w.r.t. a twist of the pose and per-channel volume scales (the mixed pose-volume second
    derivatives that the double-backward loss needs), for both limits; and gradcheck w.r.t. every voxel."""
    vol, aff, intr, pose = _scene(
        shape=(5, 6, 4), spacing=(6.0, 5.0, 7.0), channels=2, rows=3, cols=4, border=True
    )
    pose = pose[:1]
    xi0 = torch.tensor([[0.3, -0.2, 0.5, 0.01, -0.02, 0.015]], dtype=torch.float64)
    for limits in ("corners", "box"):

        def f(xi: torch.Tensor, scale: torch.Tensor, limits: str = limits) -> torch.Tensor:
            cam = Camera(intr, compose(pose, se3_exp(xi)))
            v = vol * scale[:, None, None, None]
            return projective_transform(v, aff, cam, n_samples=7, limits=limits, backend="reference")

        xi = xi0.clone().requires_grad_(True)
        scale = torch.tensor([1.0, 0.7], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(f, (xi, scale), eps=1e-6, atol=1e-6)
        assert torch.autograd.gradgradcheck(f, (xi, scale), eps=1e-6, atol=1e-5)

    def g(v: torch.Tensor) -> torch.Tensor:
        return projective_transform(v, aff, Camera(intr, compose(pose, se3_exp(xi0))), n_samples=7)

    assert torch.autograd.gradcheck(g, (vol.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_pose_gradient_matches_the_renderer():
    """First-order pose gradients of the box limits equal the renderer's fused analytic backward."""
    vol, aff, intr, pose = _scene(channels=1)
    w = torch.rand(2, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = []
    for fn in (
        lambda p: projective_transform(vol, aff, Camera(intr, p), n_samples=30, limits="box")[:, 0],
        lambda p: render(vol[0], aff, Camera(intr, p), method="trilinear", n_samples=30, multires=False),
    ):
        p = pose.clone().requires_grad_(True)
        (fn(p) * w).sum().backward()
        grads.append(p.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)
