"""Interop with DiffDRR 0.6.1's conventions (:mod:`xraypose.geometry.diffdrr`).

Three levels of checks:

1. geometry only (no peer): parameterization round trips, the AP frame change, the projection of the volume
   centre and the image orientation;
2. recorded DiffDRR rays (``tests/data/diffdrr_rays.npz``, made with DiffDRR 0.6.1 itself): for the chest
   CT, the 4 reference poses, the orientations ``"AP"``, ``"PA"``, ``None`` and three detectors (the 128²
   reference one; 7×10 and 9×5 with unequal spacings and non-zero ``x0``/``y0``, the last one with
   ``reverse_x_axis=False``), the npz holds DiffDRR's source ``(4, 3)`` and detector-pixel target points
   ``(4, N, 3)`` from ``DRR.detector(convert(rot, xyz, "euler_angles", "ZXY"), None)`` (in DiffDRR's
   centred world) for N recorded pixels. Our :class:`Camera` built through the conversion must reproduce
   them to < 1e-3 mm (after adding back the centre DiffDRR subtracted, and the column flip where DiffDRR's
   image is mirrored);
3. DiffDRR's reference DRRs (``../shared/data/peer-reference``) rendered with our renderer, and (``-m slow``)
   DiffDRR itself, when importable.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from xraypose.errors import InputError
from xraypose.geometry.camera import Camera, carm_pose
from xraypose.geometry.diffdrr import (
    DIFFDRR_PARAMETERIZATIONS,
    DiffDRRGeometry,
    diffdrr_camera,
    diffdrr_camera_frame_change,
    diffdrr_density,
    diffdrr_isocenter,
    diffdrr_params_to_matrix,
    diffdrr_pose_to_world,
    matrix_to_diffdrr_params,
    world_pose_to_diffdrr,
)
from xraypose.geometry.rotations import euler_to_matrix, random_rotation
from xraypose.geometry.se3 import make_transform

HERE = Path(__file__).resolve().parent
RAYS = HERE / "data" / "diffdrr_rays.npz"
SHARED = HERE.parents[1] / "shared" / "data"
PEER_REF = SHARED / "peer-reference" / "diffdrr-0.6.1-chest-128.npz"
CHEST = SHARED / "chest-ct" / "ct.nii.gz"
ORIENTATIONS = ("AP", "PA", None)

# A small anisotropic grid with a non-trivial (flipped, translated) affine.
AFFINE = np.array(
    [[-0.8, 0.0, 0.0, 120.0], [0.0, 0.9, 0.0, -80.0], [0.0, 0.0, 2.0, 40.0], [0.0, 0.0, 0.0, 1.0]]
)
SHAPE = (60, 50, 40)


def _random_params(
    parameterization: str, n: int, gen: torch.Generator, orientation: str | None = "AP"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random DiffDRR ``(rotation, translation)`` (float64) whose source is about 800 mm from the volume
    centre and looks at it (DiffDRR's principal ray is ``R·Reo·e_z``; the source is at ``R·t``)."""
    R = random_rotation(n, generator=gen, dtype=torch.float64)
    axis = {"AP": (0.0, 800.0, 0.0), "PA": (0.0, -800.0, 0.0), None: (0.0, 0.0, -800.0)}[orientation]
    t = torch.randn(n, 3, generator=gen, dtype=torch.float64) * 20 + torch.tensor(axis, dtype=torch.float64)
    m = make_transform(R, (R @ t.unsqueeze(-1)).squeeze(-1))
    if parameterization == "matrix":
        return m, torch.zeros(n, 3, dtype=torch.float64)
    return matrix_to_diffdrr_params(m, parameterization, "ZXY")


# --------------------------------------------------------------------------------------------------
# Geometry only
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("reverse_x_axis", [True, False])
def test_intrinsics_round_trip(orientation: str | None, reverse_x_axis: bool) -> None:
    g = DiffDRRGeometry(1020.0, 7, 10, 3.0, 2.5, 12.0, -7.5, orientation, reverse_x_axis)
    k = g.to_intrinsics()
    assert (k.rows, k.cols, k.dy, k.dx, k.sdd) == (7, 10, 2.5, 3.0, 1020.0)
    assert k.x0 == (-12.0 if orientation == "PA" else 12.0) and k.y0 == -7.5
    assert DiffDRRGeometry.from_intrinsics(k, orientation, reverse_x_axis) == g
    assert g.flip_columns == ((orientation == "PA") == reverse_x_axis)
    img = torch.arange(70.0).reshape(1, 7, 10)
    assert torch.equal(g.image_to_diffdrr(g.image_from_diffdrr(img)), img)


def test_invalid_inputs() -> None:
    with pytest.raises(InputError):
        DiffDRRGeometry(1020.0, 8, 8, 1.0, 1.0, orientation="LR")
    with pytest.raises(InputError):
        diffdrr_params_to_matrix(torch.zeros(1, 3), torch.zeros(1, 3), "so3_log_map")
    with pytest.raises(InputError):
        diffdrr_params_to_matrix(torch.zeros(1, 3), torch.zeros(1, 3), "euler_angles", "zxy")
    with pytest.raises(InputError):
        diffdrr_params_to_matrix(torch.zeros(1, 3), None, "euler_angles", "ZXY")
    with pytest.raises(InputError):
        diffdrr_density(torch.full((4, 4, 4), -1000.0))


def test_ap_frame_change_is_our_ap_view() -> None:
    """With orientation "AP", DiffDRR's camera (after its frame change) is our AP view."""
    c = diffdrr_camera_frame_change("AP")
    ap = carm_pose(source_to_isocenter=1.0, dtype=torch.float64)[0]
    assert torch.allclose(c[:3, :3], ap[:3, :3])
    for orientation in ORIENTATIONS:
        r = diffdrr_camera_frame_change(orientation)[:3, :3]
        assert torch.allclose(r.T @ r, torch.eye(3, dtype=torch.float64))
        assert math.isclose(float(torch.linalg.det(r)), 1.0)


def test_parameterization_semantics() -> None:
    """Spot checks of DiffDRR's (pytorch3d's) conventions against hand-built matrices."""
    a = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    t = torch.tensor([[10.0, 800.0, -20.0]], dtype=torch.float64)
    m = diffdrr_params_to_matrix(a, t, "euler_angles", "ZXY")
    rz = euler_to_matrix(torch.tensor([[0.3, 0.0, 0.0]], dtype=torch.float64), "ZXY")
    rx = euler_to_matrix(torch.tensor([[0.0, -0.2, 0.0]], dtype=torch.float64), "ZXY")
    ry = euler_to_matrix(torch.tensor([[0.0, 0.0, 0.5]], dtype=torch.float64), "ZXY")
    r = rz @ rx @ ry  # intrinsic Z, X', Y''
    assert torch.allclose(m[:, :3, :3], r)
    assert torch.allclose(m[:, :3, 3], (r @ t[0]).reshape(1, 3))  # the source sits at R·t
    deg = diffdrr_params_to_matrix(torch.rad2deg(a), t, "euler_angles", "ZXY", degrees=True)
    assert torch.allclose(deg, m)
    # rotation_6d is the first two ROWS of R in DiffDRR.
    m6 = diffdrr_params_to_matrix(r[:, :2, :].reshape(1, 6), t, "rotation_6d", None)
    assert torch.allclose(m6, m)
    # matrix: the 4×4 itself, or (R, t) read like the others.
    assert torch.equal(diffdrr_params_to_matrix(m, None, "matrix", None), m)
    assert torch.allclose(diffdrr_params_to_matrix(r, t, "matrix", None), m)
    # se3_log_map: the twist (translation, rotation) of exp, not R·t.
    xi_v, xi_w = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), torch.tensor([[0.0, 0.0, math.pi / 2]])
    ms = diffdrr_params_to_matrix(xi_w.double(), xi_v, "se3_log_map", None)
    expected_t = torch.tensor([1.0 - 2.0, 1.0 + 2.0, 3.0], dtype=torch.float64) * (2 / math.pi)
    expected_t[2] = 3.0
    assert torch.allclose(ms[0, :3, 3], expected_t, atol=1e-12)


@pytest.mark.parametrize("parameterization", DIFFDRR_PARAMETERIZATIONS)
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_pose_round_trip(parameterization: str, orientation: str | None) -> None:
    gen = torch.Generator().manual_seed(1)
    R = random_rotation(5, generator=gen, dtype=torch.float64)
    pose = make_transform(R, torch.randn(5, 3, generator=gen, dtype=torch.float64) * 300)
    conv = "ZXY" if parameterization == "euler_angles" else None
    rot, trans = world_pose_to_diffdrr(pose, parameterization, conv, AFFINE, SHAPE, orientation)
    if parameterization == "matrix":
        assert rot.shape == (5, 3, 3)
    back = diffdrr_pose_to_world(rot, trans, parameterization, conv, AFFINE, SHAPE, orientation)
    assert torch.allclose(back, pose, atol=1e-9)
    # params -> pose -> params -> pose (parameters are not unique, their matrices are).
    rot2, trans2 = world_pose_to_diffdrr(back, parameterization, conv, AFFINE, SHAPE, orientation)
    again = diffdrr_pose_to_world(rot2, trans2, parameterization, conv, AFFINE, SHAPE, orientation)
    assert torch.allclose(again, pose, atol=1e-9)


@pytest.mark.parametrize("convention", ["ZXY", "XYZ", "ZYX", "ZYZ", "XZX"])
def test_euler_conventions_round_trip(convention: str) -> None:
    gen = torch.Generator().manual_seed(2)
    rot, trans = _random_params("euler_angles", 6, gen)
    m = diffdrr_params_to_matrix(rot, trans, "euler_angles", "ZXY")
    angles, t2 = matrix_to_diffdrr_params(m, "euler_angles", convention, degrees=True)
    assert torch.allclose(diffdrr_params_to_matrix(angles, t2, "euler_angles", convention, degrees=True), m)


def test_volume_centre_projects_to_principal_point() -> None:
    """DiffDRR's zero rotation + translation (0, d, 0) in AP: source d mm anterior of the CT centre, looking
    posterior; head up, patient's right on the image left; the centre lands on the principal point."""
    g = DiffDRRGeometry(1020.0, 9, 12, 2.0, 3.0, x0=4.0, y0=-6.0, orientation="AP")
    cam = diffdrr_camera(torch.zeros(1, 3), torch.tensor([[0.0, 850.0, 0.0]]), g, AFFINE, SHAPE)
    c = diffdrr_isocenter(AFFINE, SHAPE, dtype=torch.float32)
    assert torch.allclose(cam.source_world()[0], c + torch.tensor([0.0, 850.0, 0.0]))
    k = g.to_intrinsics()
    pts = torch.stack([c, c + torch.tensor([10.0, 0, 0]), c + torch.tensor([0, 0, 10.0])])
    uv = cam.project(pts)[0]
    assert torch.allclose(uv[0], torch.tensor([k.cx, k.cy]), atol=1e-4)
    assert uv[1, 0] < k.cx  # patient's right (+x) to the image left
    assert uv[2, 1] < k.cy  # superior (+z) up
    # The centre is the voxel-grid centre, independent of the order the axes are stored in.
    perm = AFFINE[:, [2, 0, 1, 3]]
    assert torch.allclose(diffdrr_isocenter(perm, (SHAPE[2], SHAPE[0], SHAPE[1])), c.double(), atol=1e-5)


def test_pose_conversion_is_differentiable() -> None:
    rot = torch.tensor([[0.1, 0.2, -0.3]], requires_grad=True)
    trans = torch.tensor([[5.0, 850.0, -3.0]], requires_grad=True)
    pose = diffdrr_pose_to_world(rot, trans, "euler_angles", "ZXY", AFFINE, SHAPE)
    pose[:, :3, :].sum().backward()
    assert rot.grad is not None and torch.isfinite(rot.grad).all() and trans.grad is not None


def test_density_matches_diffdrr_rule() -> None:
    hu = torch.tensor([-1000.0, -900.0, -800.0, -500.0, 0.0, 350.0, 351.0, 1000.0])
    d = diffdrr_density(hu, bone_attenuation_multiplier=2.0)
    raw = torch.tensor([-500.0, -500.0, -500.0, -500.0, 0.0, 350.0, 702.0, 2000.0])
    assert torch.allclose(d, (raw + 500.0) / 2500.0)
    assert diffdrr_density(hu.double()).dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# Recorded DiffDRR rays
# --------------------------------------------------------------------------------------------------


def _ray_cases() -> list[str]:
    data = np.load(RAYS)
    return sorted(k[: -len("_detector")] for k in data.files if k.endswith("_detector"))


@pytest.mark.parametrize("key", _ray_cases())
def test_rays_match_recorded_diffdrr(key: str) -> None:
    data = np.load(RAYS)
    orient_name = key.split("_")[0]
    orientation = None if orient_name == "None" else orient_name
    sdd, h, w, dx, dy, x0, y0, rev = data[key + "_detector"].tolist()
    g = DiffDRRGeometry(sdd, int(h), int(w), dx, dy, x0, y0, orientation, bool(rev))
    p = torch.as_tensor(data["poses_euler_zxy_rad_mm"])
    cam = diffdrr_camera(p[:, :3], p[:, 3:], g, data["volume_affine"], data["volume_shape"].tolist())
    pix = torch.as_tensor(data[key + "_pixels"])
    if g.flip_columns:
        pix = (pix // int(w)) * int(w) + (int(w) - 1 - pix % int(w))
    centre = torch.as_tensor(data["diffdrr_center"])
    assert torch.allclose(centre, diffdrr_isocenter(data["volume_affine"], data["volume_shape"].tolist()))
    src_err = (cam.source_world() - (torch.as_tensor(data[key + "_source"]) + centre)).abs().max()
    tgt_err = (cam.detector_world(pix) - (torch.as_tensor(data[key + "_target"]) + centre)).abs().max()
    assert float(src_err) < 1e-3 and float(tgt_err) < 1e-3, (float(src_err), float(tgt_err))


# --------------------------------------------------------------------------------------------------
# Reference DRRs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chest() -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    if not (PEER_REF.exists() and CHEST.exists()):
        pytest.skip(f"peer reference data not found under {SHARED}")
    from xraypose.io import read_volume

    vol = read_volume(CHEST)
    return diffdrr_density(vol.data), torch.as_tensor(vol.affine), tuple(vol.data.shape)


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_reference_drrs(chest: tuple[torch.Tensor, torch.Tensor, tuple[int, ...]], method: str) -> None:
    """Our renderer through the conversion vs DiffDRR 0.6.1's own DRRs of the chest CT (4 poses, 128²)."""
    from xraypose.render import render

    density, affine, shape = chest
    ref = np.load(PEER_REF)
    p = torch.as_tensor(ref["poses_euler_zxy_rad_mm"], dtype=torch.float32)
    g = DiffDRRGeometry(sdd=1020.0, height=128, width=128, delx=4.0, dely=4.0, orientation="AP")
    cam = diffdrr_camera(p[:, :3], p[:, 3:], g, affine, shape)
    theirs = g.image_from_diffdrr(torch.as_tensor(ref[f"{method}_images"]))
    ours = render(density, affine, cam, method=method)
    err = (ours - theirs).abs().mean(dim=(1, 2)) / theirs.amax(dim=(1, 2))
    assert float(err.max()) <= 0.01, err.tolist()
    if method == "siddon":
        # DiffDRR's Siddon integrates the whole line through the volume, also past the detector (pose 3's
        # detector cuts the chest); ours stops at the detector. With the detector pushed 3x further out
        # (same rays, longer segments) the two agree to float32 precision.
        far = DiffDRRGeometry(sdd=3060.0, height=128, width=128, delx=12.0, dely=12.0, orientation="AP")
        far_cam = diffdrr_camera(p[:, :3], p[:, 3:], far, affine, shape)
        ours_far = render(density, affine, far_cam, method="siddon")
        err_far = (ours_far - theirs).abs().mean(dim=(1, 2)) / theirs.amax(dim=(1, 2))
        assert float(err_far.max()) <= 1e-4, err_far.tolist()


# --------------------------------------------------------------------------------------------------
# Live DiffDRR
# --------------------------------------------------------------------------------------------------


def _smooth_phantom(gen: torch.Generator) -> torch.Tensor:
    """A smooth random HU volume on SHAPE: blobs of bone and soft tissue in air."""
    idx = torch.stack(
        torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in SHAPE), indexing="ij"), -1
    )
    hu = torch.full(SHAPE, -1000.0)
    for _ in range(8):
        centre = torch.rand(3, generator=gen) * torch.tensor(SHAPE, dtype=torch.float32)
        radius = 4 + 10 * torch.rand(1, generator=gen)
        value = -600 + 1800 * torch.rand(1, generator=gen)
        hu = hu + (value + 1000) * torch.exp(-(((idx - centre) ** 2).sum(-1)) / (2 * radius**2))
    return hu


@pytest.mark.slow
def test_live_diffdrr() -> None:
    """Rays, density and Siddon DRRs against DiffDRR itself on random poses, for every parameterization,
    orientation and ``reverse_x_axis``."""
    pytest.importorskip("diffdrr")
    from diffdrr.data import read, transform_hu_to_density
    from diffdrr.drr import DRR
    from diffdrr.pose import convert
    from torchio import ScalarImage

    from xraypose.render import render

    gen = torch.Generator().manual_seed(0)
    hu = _smooth_phantom(gen)
    affine = torch.as_tensor(AFFINE, dtype=torch.float32)
    density = diffdrr_density(hu)
    assert torch.allclose(density, transform_hu_to_density(hu[None].clone(), 1.0)[0], atol=1e-6)
    centre = diffdrr_isocenter(AFFINE, SHAPE, dtype=torch.float32)
    for orientation in ORIENTATIONS:
        subject = read(ScalarImage(tensor=hu[None].clone(), affine=AFFINE), orientation=orientation)
        for reverse in (True, False):
            g = DiffDRRGeometry(1020.0, 24, 20, 6.0, 5.0, 9.0, -4.0, orientation, reverse)
            drr = DRR(subject, renderer="siddon", **g.drr_kwargs())
            for parameterization in DIFFDRR_PARAMETERIZATIONS:
                rot, trans = (x.float() for x in _random_params(parameterization, 3, gen, orientation))
                conv = "ZXY" if parameterization == "euler_angles" else None
                args = (rot,) if parameterization == "matrix" else (rot, trans)
                src, tgt = drr.detector(
                    convert(*args, parameterization=parameterization, convention=conv), None
                )
                pose = diffdrr_pose_to_world(rot, trans, parameterization, conv, AFFINE, SHAPE, orientation)
                cam = Camera(g.to_intrinsics(), pose)
                ours_tgt = cam.detector_world().reshape(-1, g.height, g.width, 3).movedim(-1, 1)
                ours_tgt = g.image_to_diffdrr(ours_tgt).movedim(1, -1).reshape(-1, g.height * g.width, 3)
                what = (orientation, reverse, parameterization)
                assert float((cam.source_world() - (src[:, 0] + centre)).abs().max()) < 1e-3, what
                assert float((ours_tgt - (tgt + centre)).abs().max()) < 1e-3, what
                img = drr(*args, parameterization=parameterization, convention=conv)[:, 0]
                theirs = g.image_from_diffdrr(img)
                ours = render(density, affine, cam, method="siddon")
                err = (ours - theirs).abs().mean() / theirs.amax()
                assert float(err) < 1e-3, (*what, float(err))
                # And back: our pose -> DiffDRR parameters -> DiffDRR's rays.
                rot2, trans2 = world_pose_to_diffdrr(pose, parameterization, conv, AFFINE, SHAPE, orientation)
                args2 = (
                    (make_transform(rot2, (rot2 @ trans2.unsqueeze(-1)).squeeze(-1)),)
                    if (parameterization == "matrix")
                    else (rot2, trans2)
                )
                src2, _ = drr.detector(
                    convert(*args2, parameterization=parameterization, convention=conv), None
                )
                assert float((src2 - src).abs().max()) < 1e-3, what
