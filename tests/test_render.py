"""The DRR engine against analytic line integrals, its reference path, finite differences and invariances."""

from __future__ import annotations

import math

import pytest
import torch

from xraypose.errors import GeometryError, InputError
from xraypose.geometry import Camera, Intrinsics, carm_pose
from xraypose.geometry.se3 import compose, invert, se3_exp
from xraypose.render import DRR, random_patch_pixels, render

METHODS = ("siddon", "trilinear")


def _grid(shape, spacing, origin_centered=True, dtype=torch.float64):
    """Affine with the box centred on the world origin, and world coordinates of voxel centres."""
    aff = torch.diag(torch.tensor([*spacing, 1.0], dtype=dtype))
    aff[:3, 3] = -(torch.tensor(shape, dtype=dtype) - 1) / 2 * torch.tensor(spacing, dtype=dtype)
    return aff


def _centres(shape, aff, sub=1):
    """World coordinates of (sub-)voxel centres, shape (*shape, sub³, 3)."""
    off = (torch.arange(sub, dtype=aff.dtype) + 0.5) / sub - 0.5
    oi, oj, ok = torch.meshgrid(off, off, off, indexing="ij")
    offs = torch.stack([oi, oj, ok], -1).reshape(-1, 3)
    idx = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=aff.dtype) for n in shape), indexing="ij"), -1)
    pts = idx[..., None, :] + offs
    return pts @ aff[:3, :3].T + aff[:3, 3]


def _camera(
    rows=24, cols=20, lao=17.0, cran=-11.0, inplane=5.0, sid=400.0, sdd=800.0, det=260.0, dtype=torch.float64
):
    intr = Intrinsics(sdd=sdd, rows=rows, cols=cols, dy=det / rows, dx=det / cols, x0=3.0, y0=-2.0)
    pose = carm_pose(lao, cran, inplane, source_to_isocenter=sid, isocenter=(1.0, -2.0, 0.5), dtype=dtype)
    return Camera(intr, pose)


def _chords_sphere(camera, center, radius):
    src = camera.source_world()[:, None, :]
    det = camera.detector_world()
    d = det - src
    dn = d / d.norm(dim=-1, keepdim=True)
    oc = src - center
    b = (oc * dn).sum(-1)
    c = (oc * oc).sum(-1) - radius**2
    disc = (b * b - c).clamp_min(0)
    return 2 * disc.sqrt()


# -- (a) analytic phantoms ---------------------------------------------------------------------------------


def test_uniform_box_exact_chords():
    """A uniform volume: every ray's integral is μ × its chord through the box (slab method), for both methods."""
    shape, spacing = (30, 26, 22), (2.0, 2.5, 3.0)
    aff = _grid(shape, spacing)
    mu = 0.02
    vol = torch.full(shape, mu, dtype=torch.float64)
    cam = _camera()
    lo = aff[:3, 3] - 0.5 * torch.tensor(spacing, dtype=torch.float64)
    hi = lo + torch.tensor(shape, dtype=torch.float64) * torch.tensor(spacing, dtype=torch.float64)
    src = cam.source_world()[:, None, :]
    d = cam.detector_world() - src
    ta, tb = (lo - src) / d, (hi - src) / d
    t0 = torch.minimum(ta, tb).amax(-1).clamp(0, 1)
    t1 = torch.maximum(ta, tb).amin(-1).clamp(0, 1)
    chord = ((t1 - t0).clamp_min(0) * d.norm(dim=-1)).reshape(1, cam.intrinsics.rows, cam.intrinsics.cols)
    assert float(chord.max()) > 50  # the rays really cross the box
    for method in METHODS:
        img = render(vol, aff, cam, method=method, multires=False)
        rel = (img - mu * chord).abs().max() / (mu * chord).max()
        assert float(rel) < 1e-6, method


def _exact_cell_integrals(vol, aff, camera):
    """Exact line integrals through a piecewise-constant volume: Σ over non-zero cells of μ × chord(ray, cell box).

    Brute force with the slab method per cell — an algorithm independent of Siddon's traversal.
    """
    src = camera.source_world()[:, None, :].double()
    d = (camera.detector_world().double() - src).reshape(-1, 3)
    src = src.expand(-1, camera.intrinsics.num_pixels, -1).reshape(-1, 3)
    idx = vol.nonzero().double()
    half = 0.5 * aff[:3, :3].norm(dim=0)
    centres = idx @ aff[:3, :3].T + aff[:3, 3]
    lo, hi = centres - half, centres + half
    values = vol[vol != 0].double()
    total = torch.zeros(src.shape[0], dtype=torch.float64)
    for r0 in range(0, src.shape[0], 64):
        s_, d_ = src[r0 : r0 + 64, None, :], d[r0 : r0 + 64, None, :]
        ta, tb = (lo - s_) / d_, (hi - s_) / d_
        t0 = torch.minimum(ta, tb).amax(-1).clamp(0, 1)
        t1 = torch.maximum(ta, tb).amin(-1).clamp(0, 1)
        total[r0 : r0 + 64] = ((t1 - t0).clamp_min(0) * values).sum(-1) * d_[:, 0].norm(dim=-1)
    return total.reshape(camera.batch_size, camera.intrinsics.rows, camera.intrinsics.cols)


@pytest.mark.parametrize("phantom", ["sphere", "cylinder"])
def test_voxelised_phantoms_against_exact_chords(phantom):
    """Sphere and cylinder phantoms made of whole voxel cells, whose exact line integrals are sums of chords
    through cell boxes: Siddon within 1e-3 of every ray (trilinear is checked on continuous phantoms below)."""
    shape, spacing = (26, 24, 22), (1.5, 1.25, 1.75)
    aff = _grid(shape, spacing)
    pts = _centres(shape, aff)[..., 0, :]
    if phantom == "sphere":
        inside = pts.norm(dim=-1) <= 14.0
    else:  # cylinder along world z
        inside = (pts[..., :2].norm(dim=-1) <= 13.0) & (pts[..., 2].abs() <= 12.0)
    vol = 0.03 * inside.double()
    cam = _camera(rows=22, cols=20, det=160.0, sid=300.0, sdd=600.0)
    exact = _exact_cell_integrals(vol, aff, cam)
    assert float(exact.max()) > 0.5
    siddon = render(vol, aff, cam, method="siddon")
    assert float(((siddon - exact).abs() / exact.clamp_min(1e-3)).max()) < 1e-3


def test_continuous_sphere_converges_to_exact_chords():
    """A continuous sphere (partial-volume voxelised) against its true chords. Voxelisation makes the error
    first order in the voxel size (boundary cells), so it halves when the voxels halve, for both methods; at
    1 mm voxels (radius 20 mm) trilinear at default sampling is within 1e-2 on rays crossing the sphere's core."""
    errors = {}
    central_error = {}
    radius, mu = 20.0, 0.03
    cam = _camera(rows=30, cols=30, lao=25.0, cran=14.0, inplane=0.0, det=200.0)
    exact = mu * _chords_sphere(cam, torch.zeros(3, dtype=torch.float64), radius).reshape(1, 30, 30)
    for h in (2.0, 1.0):
        n = round(52 / h)
        aff = _grid((n, n, n), (h, h, h))
        vol = mu * (_centres((n, n, n), aff, sub=4).norm(dim=-1) <= radius).double().mean(-1)
        for method in METHODS:
            img = render(
                vol.float(),
                aff.float(),
                Camera(cam.intrinsics, cam.pose.float()),
                method=method,
                multires=False,
            )
            errors[method, h] = float((img.double() - exact).abs().sum() / exact.sum())
            core = exact > mu * radius
            central_error[method, h] = float(((img.double() - exact).abs() / exact)[core].mean())
    assert central_error["trilinear", 1.0] < 1e-2, central_error
    for method in METHODS:
        assert errors[method, 1.0] < 0.02, errors
        assert errors[method, 1.0] < 0.65 * errors[method, 2.0], errors


# -- (b) fused path equals reference path ------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_fused_equals_reference_forward_and_backward(method):
    torch.manual_seed(0)
    shape = (2, 21, 17, 13)
    aff = _grid(shape[1:], (3.0, 2.5, 4.0), dtype=torch.float32)
    vol = torch.rand(shape, dtype=torch.float32) * 0.05
    base = _camera(rows=12, cols=10, dtype=torch.float32).pose
    outs = {}
    for backend in ("fused", "reference"):
        v = vol.clone().requires_grad_(True)
        xi = torch.zeros(2, 6, requires_grad=True)
        pose = compose(
            base.expand(2, 4, 4), se3_exp(xi + torch.tensor([[0.0] * 6, [1.0, -2.0, 0.5, 0.02, -0.01, 0.03]]))
        )
        img = render(
            v, aff, Camera(_camera(rows=12, cols=10).intrinsics, pose), method=method, backend=backend
        )
        weights = torch.linspace(0.5, 1.5, img.numel()).reshape(img.shape)
        (img * weights).sum().backward()
        outs[backend] = (img.detach(), xi.grad.clone(), v.grad.clone())
    (fi, fx, fv), (ri, rx, rv) = outs["fused"], outs["reference"]
    assert float(fi.abs().max()) > 0.1
    assert torch.allclose(fi, ri, rtol=1e-4, atol=1e-4 * float(ri.abs().max()))
    assert torch.allclose(fx, rx, rtol=1e-4, atol=1e-4 * float(rx.abs().max())), (fx, rx)
    assert torch.allclose(fv, rv, rtol=1e-4, atol=1e-4 * float(rv.abs().max()))


# -- (c) gradcheck in float64 ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("method", METHODS)
def test_pose_gradcheck_float64(method, backend):
    torch.manual_seed(1)
    shape = (9, 8, 7)
    aff = _grid(shape, (4.0, 4.5, 5.0))
    # smooth volume: a Gaussian blob plus a gradient, so derivatives are informative
    pts = _centres(shape, aff)[..., 0, :]
    vol = 0.03 * torch.exp(-((pts.norm(dim=-1) / 12) ** 2)) + 0.001 * (pts[..., 0] + 20) / 40
    cam = _camera(rows=5, cols=4, sid=200.0, sdd=400.0, det=90.0)

    def f(xi):
        pose = compose(cam.pose, se3_exp(xi))
        return render(
            vol,
            aff,
            Camera(cam.intrinsics, pose),
            method=method,
            backend=backend,
            n_samples=23 if method == "trilinear" else None,
        )

    xi = (
        torch.randn(1, 6, dtype=torch.float64) * torch.tensor([1.0, 1.0, 1.0, 0.01, 0.01, 0.01])
    ).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (xi,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_volume_gradcheck_float64():
    torch.manual_seed(2)
    shape = (5, 4, 6)
    aff = _grid(shape, (6.0, 7.0, 5.0))
    cam = _camera(rows=4, cols=3, sid=200.0, sdd=400.0, det=80.0)
    for method in METHODS:
        vol = (torch.rand(shape, dtype=torch.float64) * 0.05).requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda v, m=method: render(v, aff, cam, method=m, backend="fused"), (vol,), eps=1e-6
        )


# -- (d) invariance and (e) projection ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_moving_camera_equals_moving_volume_inversely(method):
    torch.manual_seed(3)
    shape = (20, 18, 16)
    aff = _grid(shape, (3.0, 3.0, 3.0))
    vol = torch.rand(shape, dtype=torch.float64) * 0.05
    cam = _camera(rows=16, cols=14)
    T = se3_exp(torch.tensor([[5.0, -3.0, 8.0, 0.2, -0.1, 0.15]], dtype=torch.float64))[0]
    moved_camera = render(vol, aff, Camera(cam.intrinsics, T @ cam.pose), method=method, multires=False)
    moved_volume = render(vol, invert(T) @ aff, cam, method=method, multires=False)
    assert float(moved_camera.abs().max()) > 0.5
    assert torch.allclose(moved_camera, moved_volume, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_bead_renders_where_the_camera_projects_it(method):
    shape = (41, 41, 41)
    aff = _grid(shape, (1.0, 1.0, 1.0))
    bead_ijk = (27, 12, 30)
    vol = torch.zeros(shape, dtype=torch.float64)
    vol[bead_ijk] = 1.0
    bead_world = (aff @ torch.tensor([*bead_ijk, 1.0], dtype=torch.float64))[:3]
    intr = Intrinsics(sdd=1000.0, rows=101, cols=91, dy=0.4, dx=0.45, x0=2.0, y0=-3.0)
    pose = carm_pose(12.0, -7.0, 20.0, source_to_isocenter=500.0, dtype=torch.float64)
    cam = Camera(intr, pose)
    img = render(vol, aff, cam, method=method, multires=False)[0]
    assert float(img.max()) > 0
    rows, cols = torch.meshgrid(
        torch.arange(101.0, dtype=torch.float64), torch.arange(91.0, dtype=torch.float64), indexing="ij"
    )
    w = img / img.sum()
    centroid = torch.stack([(w * cols).sum(), (w * rows).sum()])
    expected = cam.project(bead_world[None])[0, 0]
    assert float((centroid - expected).norm()) < 0.3, (centroid, expected)


# -- sparse rendering, multires, outputs, batches ----------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_sparse_pixels_match_the_full_image(method):
    torch.manual_seed(4)
    shape = (20, 18, 16)
    aff = _grid(shape, (3.0, 3.0, 3.0), dtype=torch.float32)
    vol = torch.rand(shape) * 0.05
    cam = _camera(rows=30, cols=28, dtype=torch.float32)
    cam = Camera(cam.intrinsics, torch.cat([cam.pose, carm_pose(-20.0, 5.0, source_to_isocenter=400.0)]))
    full = render(vol, aff, cam, method=method).reshape(2, -1)
    pix = random_patch_pixels(cam.intrinsics, 5, 4, generator=torch.Generator().manual_seed(0))
    assert 16 <= pix.numel() <= 80
    sparse = render(vol, aff, cam, method=method, pixels=pix)
    assert sparse.shape == (2, pix.numel())
    assert torch.allclose(sparse, full[:, pix], rtol=1e-5, atol=1e-6)
    per_view = torch.stack([pix, pix.flip(0)])
    sparse2 = render(vol, aff, cam, method=method, pixels=per_view)
    assert torch.allclose(sparse2[1], full[1, pix.flip(0)], rtol=1e-5, atol=1e-6)


def test_multires_uses_a_coarser_level_and_stays_close():
    torch.manual_seed(5)
    shape = (64, 64, 64)
    aff = _grid(shape, (1.0, 1.0, 1.0), dtype=torch.float32)
    pts = _centres(shape, aff.double())[..., 0, :]
    vol = (0.02 * torch.exp(-((pts.norm(dim=-1) / 15) ** 2)) + 0.005 * (pts[..., 1] > 0)).float()
    intr = Intrinsics(sdd=1000.0, rows=32, cols=32, dy=8.0, dx=8.0)  # footprint ≈ 4 mm at the isocentre
    cam = Camera(intr, carm_pose(10.0, 5.0, source_to_isocenter=500.0))
    coarse = render(vol, aff, cam, method="trilinear", multires=True)
    fine = render(vol, aff, cam, method="trilinear", multires=False, step_mm=0.5)
    rel = float((coarse - fine).abs().mean() / fine.max())
    assert rel < 0.01
    assert rel > 1e-7  # a different level really was used


def test_intensity_is_beer_lambert_and_batches_are_independent():
    shape = (10, 10, 10)
    aff = _grid(shape, (5.0, 5.0, 5.0), dtype=torch.float32)
    vol = torch.rand(shape) * 0.02
    poses = carm_pose(
        torch.tensor([0.0, 30.0, -45.0]), torch.tensor([0.0, 10.0, 0.0]), source_to_isocenter=300.0
    )
    intr = Intrinsics(sdd=600.0, rows=8, cols=9, dy=10.0, dx=10.0)
    batch = render(vol, aff, Camera(intr, poses))
    for b in range(3):
        single = render(vol, aff, Camera(intr, poses[b : b + 1]))
        assert torch.allclose(batch[b : b + 1], single, atol=1e-6)
    inten = render(vol, aff, Camera(intr, poses), output="intensity")
    assert torch.allclose(inten, torch.exp(-batch), atol=1e-6)


def test_multichannel_is_the_sum_of_channels():
    torch.manual_seed(6)
    shape = (12, 11, 10)
    aff = _grid(shape, (4.0, 4.0, 4.0), dtype=torch.float32)
    chans = torch.rand(3, *shape) * 0.02
    cam = _camera(rows=9, cols=8, dtype=torch.float32)
    for method in METHODS:
        multi = render(chans, aff, cam, method=method)
        assert multi.shape == (1, 3, 9, 8)
        total = render(chans.sum(0), aff, cam, method=method)
        assert torch.allclose(multi.sum(1), total, rtol=1e-4, atol=1e-6)


def test_drr_class_matches_functional_render():
    shape = (12, 11, 10)
    aff = _grid(shape, (4.0, 4.0, 4.0), dtype=torch.float32)
    vol = torch.rand(shape) * 0.02
    cam = _camera(rows=9, cols=8, dtype=torch.float32)
    drr = DRR(vol, aff, cam.intrinsics, method="siddon")
    assert torch.allclose(drr(cam.pose), render(vol, aff, cam, method="siddon"))


# -- bad input ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    shape = (10, 10, 10)
    aff = _grid(shape, (5.0, 5.0, 5.0), dtype=torch.float32)
    vol = torch.rand(shape)
    cam = _camera(rows=4, cols=4, dtype=torch.float32)
    with pytest.raises(InputError, match="pose"):
        Camera(cam.intrinsics, torch.eye(3))
    with pytest.raises(InputError, match="float32 or float64"):
        Camera(cam.intrinsics, torch.eye(4, dtype=torch.int64))
    with pytest.raises(InputError, match="rotation"):
        Camera(cam.intrinsics, 2 * torch.eye(4))
    with pytest.raises(InputError, match="rows"):
        Intrinsics(sdd=1000.0, rows=0, cols=4, dy=1.0, dx=1.0)
    with pytest.raises(InputError, match="sdd"):
        Intrinsics(sdd=-5.0, rows=4, cols=4, dy=1.0, dx=1.0)
    with pytest.raises(InputError, match="density"):
        render(torch.rand(10, 10), aff, cam)
    with pytest.raises(InputError, match="spacing"):
        render(vol, torch.diag(torch.tensor([0.0, 1.0, 1.0, 1.0])), cam)
    with pytest.raises(InputError, match="method"):
        render(vol, aff, cam, method="raycast")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="pixels"):
        render(vol, aff, cam, pixels=torch.tensor([0, 99]))
    inside = Camera(cam.intrinsics, carm_pose(source_to_isocenter=5.0))
    with pytest.raises(GeometryError, match="inside the volume"):
        render(vol, aff, inside)
    assert math.isfinite(float(render(vol, aff, cam).sum()))


def test_double_differentiable_backpropagates_pose_gradients_into_the_volume():
    """Inside ``double_differentiable`` the reference path is used, so a loss on the pose gradient can be
    back-propagated into the volume (ProST's double-backward training). The pose gradient of a weighted
    DRR sum is linear in the volume, so central differences along a volume direction check it exactly."""
    from xraypose.render import double_differentiable

    torch.manual_seed(7)
    shape = (9, 8, 7)
    aff = _grid(shape, (4.0, 4.5, 5.0))
    cam = _camera(rows=5, cols=4, sid=200.0, sdd=400.0, det=90.0)
    weights = torch.rand(1, 5, 4, dtype=torch.float64)
    u = torch.randn(6, dtype=torch.float64)

    def pose_grad(vol, create_graph, m="trilinear"):
        xi = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
        with double_differentiable():
            img = render(
                vol, aff, Camera(cam.intrinsics, compose(cam.pose, se3_exp(xi))), method=m, n_samples=17
            )
        (g,) = torch.autograd.grad((weights * img).sum(), xi, create_graph=create_graph)
        return g[0]

    for method in METHODS:
        vol = (torch.rand(shape, dtype=torch.float64) * 0.05).requires_grad_(True)
        g = pose_grad(vol, True, method)
        (dvol,) = torch.autograd.grad((g * u).sum(), vol)
        v = torch.randn(shape, dtype=torch.float64)
        eps = 1e-4
        fd = (
            (
                pose_grad(vol.detach() + eps * v, False, method)
                - pose_grad(vol.detach() - eps * v, False, method)
            )
            * u
        ).sum() / (2 * eps)
        assert abs(float(fd)) > 1e-6
        assert abs(float((dvol * v).sum()) - float(fd)) < 1e-6 * max(1.0, abs(float(fd))), method


@pytest.mark.parametrize("method", METHODS)
def test_integrate_rays_fused_equals_reference_on_arbitrary_rays(method):
    """The low-level engine entry point (used for custom ray sets) agrees across backends, gradients too."""
    from xraypose.render import box_intersection, integrate_rays

    torch.manual_seed(8)
    vol = torch.rand(2, 11, 9, 7, dtype=torch.float64) * 0.05
    src = torch.tensor([[-20.0, 4.0, 3.0]], dtype=torch.float64).expand(40, 3).clone()
    dirv = torch.cat([torch.full((40, 1), 40.0), torch.randn(40, 2) * 6], 1).double()
    outs = []
    for backend in ("fused", "reference"):
        s, d = src.clone().requires_grad_(True), dirv.clone().requires_grad_(True)
        v = vol.clone().requires_grad_(True)
        t0, t1 = box_intersection(s, d, (11, 9, 7))
        nsamp = torch.full((40,), 13, dtype=torch.int32)
        out = integrate_rays(v, s, d, t0, t1, method=method, nsamp=nsamp, backend=backend)
        (out * torch.linspace(0.5, 2.0, 80, dtype=torch.float64).reshape(40, 2)).sum().backward()
        outs.append((out.detach(), s.grad, d.grad, v.grad))
    assert float(outs[0][0].abs().max()) > 1e-3
    for a, b in zip(outs[0], outs[1], strict=True):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-9)


# -- empty-space skipping ----------------------------------------------------------------------------------


def test_occupancy_marks_exactly_the_blocks_whose_samples_can_read_a_non_zero_voxel():
    import numpy as np

    from xraypose.render.trilinear import occupancy, pad_volume

    rng = np.random.default_rng(3)
    vol = np.zeros((2, 19, 14, 23), dtype=np.float32)
    for _ in range(6):  # a few isolated non-zero voxels, in either channel
        c, i, j, k = (int(rng.integers(0, n)) for n in vol.shape)
        vol[c, i, j, k] = 1.0
    volp = pad_volume(vol)
    occ, shift = occupancy(volp, shift=2)
    assert shift == 2 and occ.dtype == np.uint8
    nz = (volp != 0).any(0)
    size = 4
    for bi in range(occ.shape[0]):
        for bj in range(occ.shape[1]):
            for bk in range(occ.shape[2]):
                # cells with lower corner in the block read voxels up to (b + 1)·size inclusive
                window = nz[
                    bi * size : bi * size + size + 1,
                    bj * size : bj * size + size + 1,
                    bk * size : bk * size + size + 1,
                ]
                assert occ[bi, bj, bk] == int(window.any()), (bi, bj, bk)
    assert 0 < occ.mean() < 0.5
    # an everywhere non-zero volume gets one block: nothing to skip
    full, full_shift = occupancy(pad_volume(np.ones((1, 9, 9, 9), np.float32)))
    assert full.shape == (1, 1, 1) and full_shift > 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_empty_space_skipping_changes_neither_the_image_nor_the_pose_gradient(method, dtype):
    """Blobs in a zero volume (zero margins and zero gaps between them): the fused path, which skips the empty
    blocks at both ends of every ray (trilinear: in its kernels; Siddon: by clipping the rays to the faces of
    the occupied blocks), equals the reference path, forward and pose gradient, for oblique views and for
    rays parallel to the grid axes (whose direction has zero components)."""
    from xraypose.render import engine

    shape = (40, 36, 30)
    aff = _grid(shape, (2.0, 2.5, 3.0), dtype=dtype)
    pts = _centres(shape, aff)[..., 0, :]
    vol = torch.zeros(shape, dtype=dtype)
    for centre, radius in (((-18.0, 5.0, 10.0), 9.0), ((15.0, -10.0, -12.0), 11.0), ((5.0, 22.0, 0.0), 6.0)):
        r = (pts - torch.tensor(centre, dtype=dtype)).norm(dim=-1)
        vol = vol + 0.02 * (1 - r / radius).clamp_min(0)
    assert float((vol == 0).to(torch.float64).mean()) > 0.7
    layout = engine._kernel_layout(vol[None], (0, 1, 2, 3), pad=True)
    occ, _ = engine._trilinear.occupancy(layout)
    assert occ.shape != (1, 1, 1) and occ.mean() < 0.6  # skipping is on for this volume
    cells = engine._siddon.cell_occupancy(vol[None].numpy())
    assert cells is not None and cells[0].mean() < 0.6
    intr = Intrinsics(sdd=700.0, rows=17, cols=15, dy=14.0, dx=14.0)
    views = [(17.0, -11.0, 5.0), (0.0, 0.0, 0.0), (90.0, 0.0, 0.0), (33.0, 41.0, -20.0)]
    for lao, cran, inplane in views:
        base = carm_pose(
            lao, cran, inplane, source_to_isocenter=350.0, isocenter=(1.0, -2.0, 0.5), dtype=dtype
        )
        outs = {}
        for backend in ("fused", "reference"):
            xi = torch.zeros(1, 6, dtype=dtype, requires_grad=True)
            cam = Camera(intr, compose(base, se3_exp(xi)))
            img = render(vol[None], aff, cam, method=method, backend=backend, multires=False)
            (img * torch.linspace(0.5, 1.5, img.numel(), dtype=dtype).reshape(img.shape)).sum().backward()
            outs[backend] = (img.detach(), xi.grad.clone())
        (fi, fg), (ri, rg) = outs["fused"], outs["reference"]
        tol = 1e-4 if dtype == torch.float32 else 1e-9
        assert float(ri.abs().max()) > 0.05
        assert torch.allclose(fi, ri, rtol=tol, atol=tol * float(ri.abs().max())), (lao, cran)
        assert torch.allclose(fg, rg, rtol=tol, atol=tol * float(rg.abs().max())), (lao, cran, fg, rg)
