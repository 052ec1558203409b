"""Tests of xraypose.metrics on poses with known answers (definitions: docs/metrics.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from xraypose import metrics
from xraypose.errors import InputError
from xraypose.geometry import Camera, Intrinsics, carm_pose
from xraypose.geometry.rotations import axis_angle_to_matrix, so3_exp
from xraypose.geometry.se3 import compose, invert, make_transform

F64 = torch.float64
DTYPES = [torch.float32, torch.float64]
SDD = 1020.0
SID = 600.0  # source to isocentre


def _intrinsics(dx: float = 1.0, dy: float = 1.0) -> Intrinsics:
    return Intrinsics(sdd=SDD, rows=300, cols=280, dy=dy, dx=dx, x0=3.0, y0=-2.0)


def _true_poses(dtype: torch.dtype = F64) -> torch.Tensor:
    """Four C-arm views around an isocentre at (10, -20, 30) mm."""
    return carm_pose(
        torch.tensor([0.0, 30.0, -45.0, 10.0]),
        torch.tensor([0.0, -15.0, 20.0, 5.0]),
        torch.tensor([0.0, 0.0, 90.0, -30.0]),
        source_to_isocenter=SID,
        isocenter=(10.0, -20.0, 30.0),
        dtype=dtype,
    )


def _landmarks(n: int = 12, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, generator=g, dtype=F64) * 60.0 + torch.tensor([10.0, -20.0, 30.0])).to(dtype)


def _translation(d: torch.Tensor) -> torch.Tensor:
    return make_transform(torch.eye(3, dtype=d.dtype).expand(*d.shape[:-1], 3, 3), d)


def _move_ct(pose_true: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """The estimated pose that places the CT moved by the world transform ``motion`` (``p ↦ M p``).

    The true camera sees ``M p`` where the estimate sees ``p``: ``T_est⁻¹ p = T_true⁻¹ M p``.
    """
    return compose(invert(motion), pose_true)


# --------------------------------------------------------------------------------------------------
# mTRE
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_poses_give_zero_errors_and_finite_gradients(dtype: torch.dtype) -> None:
    pose = _true_poses(dtype)
    est = pose.clone().requires_grad_(True)
    lm = _landmarks(dtype=dtype)
    intr = _intrinsics()
    values = {
        "mtre": metrics.mtre(est, pose, lm),
        "mpd": metrics.mpd(est, pose, lm, intr),
        "mrpe": metrics.mrpe(est, pose, lm, intr),
        "rot": metrics.rotation_error_deg(est, pose),
        "trans": metrics.translation_error_mm(est, pose),
        "dgeo": metrics.double_geodesic_error(est, pose, SDD / 2),
    }
    atol = 1e-9 if dtype == F64 else 2e-3
    for name, v in values.items():
        assert v.shape == (4,) and v.dtype == dtype, name
        assert float(v.detach().abs().max()) <= atol, (name, v)
        (grad,) = torch.autograd.grad(v.sum(), est)
        assert bool(torch.isfinite(grad).all()), name
    for v in (
        metrics.rotation_error_per_axis_deg(pose, pose),
        metrics.translation_error_per_axis_mm(pose, pose),
    ):
        assert v.shape == (4, 3) and float(v.abs().max()) <= atol
    # Exactly zero for mTRE (same computation on both sides).
    assert float(metrics.mtre(pose, pose, lm).abs().max()) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_pure_translation_of_the_ct_gives_mtre_equal_to_its_length(dtype: torch.dtype) -> None:
    pose = _true_poses(F64)
    g = torch.Generator().manual_seed(3)
    d = torch.randn(4, 3, generator=g, dtype=F64)
    lengths = torch.tensor([0.5, 2.0, 7.25, 40.0], dtype=F64)
    d = d / d.norm(dim=-1, keepdim=True) * lengths[:, None]
    est = _move_ct(pose, _translation(d))
    for lm in (
        _landmarks(1, seed=1),
        _landmarks(30, seed=2),
        torch.randn(4, 5, 3, generator=g, dtype=F64) * 200,
    ):
        got = metrics.mtre(est.to(dtype), pose.to(dtype), lm.to(dtype))
        tol = 1e-9 if dtype == F64 else 2e-4
        torch.testing.assert_close(got.double(), lengths, atol=tol, rtol=0)
    # The camera's translation error is the same vector (the source moved by −d).
    torch.testing.assert_close(metrics.translation_error_mm(est, pose), lengths, atol=1e-9, rtol=0)


def test_rotation_about_an_axis_through_the_centroid_gives_chord_lengths() -> None:
    pose = _true_poses()
    lm = _landmarks(20, seed=4)
    centroid = lm.mean(0)
    axis = torch.tensor([0.3, -0.5, 0.8], dtype=F64)
    axis = axis / axis.norm()
    for theta_deg in (0.5, 3.0, 20.0, 120.0):
        theta = math.radians(theta_deg)
        rot = so3_exp(axis * theta)
        # Rotation about the axis through the centroid: p ↦ c + R (p − c).
        motion = make_transform(rot, centroid - rot @ centroid)
        est = _move_ct(pose, motion.expand(4, 4, 4))
        rel = lm - centroid
        r = (rel - (rel @ axis)[:, None] * axis).norm(dim=-1)  # distance to the axis
        expected = (2.0 * r * math.sin(theta / 2)).mean()
        got = metrics.mtre(est, pose, lm)
        torch.testing.assert_close(got, expected.expand(4), atol=1e-9, rtol=1e-12)
        torch.testing.assert_close(
            metrics.rotation_error_deg(est, pose), torch.full((4,), theta_deg, dtype=F64)
        )


def test_mtre_is_the_camera_frame_distance_and_broadcasts() -> None:
    pose = _true_poses()
    g = torch.Generator().manual_seed(5)
    est = compose(
        pose,
        make_transform(
            so3_exp(torch.randn(4, 3, generator=g, dtype=F64) * 0.05),
            torch.randn(4, 3, generator=g, dtype=F64) * 5,
        ),
    )
    lm = _landmarks(7, seed=6)
    # Reference by hand: ‖T_est⁻¹ p − T_true⁻¹ p‖ with numpy.
    te, tt = np.linalg.inv(est.numpy()), np.linalg.inv(pose.numpy())
    ph = np.concatenate([lm.numpy(), np.ones((7, 1))], 1)
    ref = np.linalg.norm((ph @ te.transpose(0, 2, 1) - ph @ tt.transpose(0, 2, 1))[..., :3], axis=-1).mean(-1)
    np.testing.assert_allclose(metrics.mtre(est, pose, lm).numpy(), ref, rtol=1e-10)
    # Per-batch landmarks, (4, 4) promotion, a batch against a single pose, numpy landmarks.
    np.testing.assert_allclose(metrics.mtre(est, pose, lm.expand(4, 7, 3)).numpy(), ref, rtol=1e-10)
    one = metrics.mtre(est[1], pose[1], lm.numpy())
    assert one.shape == (1,) and abs(float(one) - ref[1]) < 1e-9
    assert metrics.mtre(est, pose[0], lm).shape == (4,)
    # Mixed precision promotes to float64.
    assert metrics.mtre(est.float(), pose, lm.float()).dtype == F64


def test_mtre_gradient_matches_finite_differences() -> None:
    pose = _true_poses()[:2]
    lm = _landmarks(5, seed=7)
    xi = torch.tensor([[1.0, -2.0, 0.5, 0.01, -0.02, 0.03], [0.0, 0.0, 3.0, 0.0, 0.05, 0.0]], dtype=F64)

    def f(x: torch.Tensor) -> torch.Tensor:
        est = compose(pose, make_transform(so3_exp(x[:, 3:]), x[:, :3]))
        return metrics.mtre(est, pose, lm)

    assert torch.autograd.gradcheck(f, (xi.clone().requires_grad_(True),))


def test_input_errors() -> None:
    pose = _true_poses()
    lm = _landmarks()
    with pytest.raises(InputError, match="pose_est"):
        metrics.mtre(pose[..., :3, :], pose, lm)
    with pytest.raises(InputError, match="batch sizes"):
        metrics.mtre(pose[:2], pose[:3], lm)
    with pytest.raises(InputError, match="landmarks"):
        metrics.mtre(pose, pose, lm[:, :2])
    with pytest.raises(InputError, match="landmarks"):
        metrics.mtre(pose, pose, lm.expand(3, 12, 3))
    with pytest.raises(InputError, match="intrinsics"):
        metrics.mpd(pose, pose, lm)
    with pytest.raises(InputError, match="one detector"):
        metrics.mpd(Camera(_intrinsics(), pose), Camera(_intrinsics(dx=2.0), pose), lm)
    with pytest.raises(InputError, match="convention"):
        metrics.rotation_error_per_axis_deg(pose, pose, convention="ZXZ")
    with pytest.raises(InputError, match="frame"):
        metrics.translation_error_per_axis_mm(pose, pose, frame="detector")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="source_to_isocenter"):
        metrics.mpd_isocenter(pose, pose, lm, _intrinsics(), source_to_isocenter=0.0)


# --------------------------------------------------------------------------------------------------
# mPD / mRPE
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["x", "y"])
@pytest.mark.parametrize(("dx", "dy"), [(0.194, 0.194), (0.5, 0.25)])
def test_lateral_shift_projects_with_magnification(direction: str, dx: float, dy: float) -> None:
    intr = _intrinsics(dx, dy)
    pose = _true_poses()
    rot, src = pose[:, :3, :3], pose[:, :3, 3]
    axis = 0 if direction == "x" else 1
    delta = 3.7
    for depth, lateral in ((SID, (0.0, 0.0)), (450.0, (25.0, -40.0)), (800.0, (-60.0, 10.0))):
        # One landmark at camera coordinates (lateral..., depth) of each true view.
        cam = torch.tensor([lateral[0], lateral[1], depth], dtype=F64)
        lm = (src + (rot @ cam)).unsqueeze(1)  # (4, 1, 3)
        # Shift the CT by Δ along the camera's x (columns) or y (rows) axis: perpendicular to the principal ray.
        d = delta * rot[:, :, axis]
        est = _move_ct(pose, _translation(d))
        expected_mm = delta * SDD / depth
        got = metrics.mpd(est, pose, lm, intr)
        torch.testing.assert_close(got, torch.full((4,), expected_mm, dtype=F64), atol=1e-6, rtol=0)
        spacing = dx if direction == "x" else dy
        torch.testing.assert_close(
            metrics.mrpe(est, pose, lm, intr),
            torch.full((4,), expected_mm / spacing, dtype=F64),
            atol=1e-6,
            rtol=0,
        )
        # Scaled to the isocentre plane: Δ · (SID / depth).
        torch.testing.assert_close(
            metrics.mpd_isocenter(est, pose, lm, intr, source_to_isocenter=SID),
            torch.full((4,), delta * SID / depth, dtype=F64),
            atol=1e-6,
            rtol=0,
        )
        # The 3D error does not depend on depth.
        torch.testing.assert_close(metrics.mtre(est, pose, lm), torch.full((4,), delta, dtype=F64))


def test_mpd_anisotropic_pixels_combine_both_axes() -> None:
    intr = _intrinsics(dx=0.5, dy=0.25)
    pose = _true_poses()
    rot, src = pose[:, :3, :3], pose[:, :3, 3]
    depth = 500.0
    lm = (src + rot[:, :, 2] * depth).unsqueeze(1)
    d = 3.0 * rot[:, :, 0] + 4.0 * rot[:, :, 1]  # 5 mm lateral, 3 along columns, 4 along rows
    est = _move_ct(pose, _translation(d))
    m = SDD / depth
    torch.testing.assert_close(metrics.mpd(est, pose, lm, intr), torch.full((4,), 5.0 * m, dtype=F64))
    expected_px = math.hypot(3.0 * m / 0.5, 4.0 * m / 0.25)
    torch.testing.assert_close(metrics.mrpe(est, pose, lm, intr), torch.full((4,), expected_px, dtype=F64))


def test_mpd_square_pixels_is_mrpe_times_spacing_and_accepts_cameras() -> None:
    intr = _intrinsics(0.194, 0.194)
    pose = _true_poses()
    g = torch.Generator().manual_seed(8)
    est = compose(
        pose,
        make_transform(
            so3_exp(torch.randn(4, 3, generator=g, dtype=F64) * 0.03),
            torch.randn(4, 3, generator=g, dtype=F64) * 4,
        ),
    )
    lm = _landmarks(9, seed=9)
    a = metrics.mpd(est, pose, lm, intr)
    b = metrics.mrpe(est, pose, lm, intr)
    torch.testing.assert_close(a, b * 0.194)
    torch.testing.assert_close(metrics.mpd(Camera(intr, est), Camera(intr, pose), lm), a)
    torch.testing.assert_close(metrics.mpd(Camera(intr, est), pose, lm), a)
    # Reference: Camera.project by hand, offsets × spacing.
    off = Camera(intr, est).project(lm) - Camera(intr, pose).project(lm)
    torch.testing.assert_close(a, (off * 0.194).norm(dim=-1).mean(-1))
    # Differentiable with finite gradients.
    e = est.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(metrics.mpd(e, pose, lm, intr).sum(), e)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_landmark_behind_the_source_gives_nan_mpd() -> None:
    intr = _intrinsics()
    pose = _true_poses()[:1]
    behind = pose[:, :3, 3] - 100.0 * pose[:, :3, 2]
    assert bool(torch.isnan(metrics.mpd(pose, pose, behind.unsqueeze(1), intr)).all())


# --------------------------------------------------------------------------------------------------
# Rotation / translation errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", ["ZYX", "XYZ", "zxy", "rotvec"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_single_axis_rotation_is_reported_on_its_axis(convention: str, axis: int) -> None:
    pose = _true_poses()
    vec = torch.zeros(3, dtype=F64)
    vec[axis] = math.radians(-7.0)
    r = axis_angle_to_matrix(vec)
    expected = torch.zeros(4, 3, dtype=F64)
    expected[:, axis] = 7.0
    # Camera frame: R_est = R_true · R_axis(7°).
    est_cam = pose.clone()
    est_cam[:, :3, :3] = pose[:, :3, :3] @ r
    got = metrics.rotation_error_per_axis_deg(est_cam, pose, frame="camera", convention=convention)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(metrics.rotation_error_deg(est_cam, pose), torch.full((4,), 7.0, dtype=F64))
    # World frame: R_est = R_axis(7°) · R_true.
    est_world = pose.clone()
    est_world[:, :3, :3] = r @ pose[:, :3, :3]
    got = metrics.rotation_error_per_axis_deg(est_world, pose, frame="world", convention=convention)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)


def test_per_axis_rotation_matches_scipy_euler_of_the_relative_rotation() -> None:
    pose = _true_poses()
    g = torch.Generator().manual_seed(10)
    est = pose.clone()
    est[:, :3, :3] = pose[:, :3, :3] @ so3_exp(torch.randn(4, 3, generator=g, dtype=F64) * 0.2)
    rel = pose[:, :3, :3].transpose(-1, -2) @ est[:, :3, :3]
    for conv in ("ZYX", "xyz", "YXZ"):
        ref = np.abs(Rotation.from_matrix(rel.numpy()).as_euler(conv, degrees=True))
        order = [conv.lower().index(a) for a in "xyz"]
        got = metrics.rotation_error_per_axis_deg(est, pose, convention=conv).numpy()
        np.testing.assert_allclose(got, ref[:, order], atol=1e-9)
    rotvec = np.abs(np.degrees(Rotation.from_matrix(rel.numpy()).as_rotvec()))
    np.testing.assert_allclose(
        metrics.rotation_error_per_axis_deg(est, pose, convention="rotvec").numpy(), rotvec, atol=1e-9
    )


def test_translation_error_per_axis_in_camera_and_world_frames() -> None:
    pose = _true_poses()
    offset_cam = torch.tensor([1.0, -2.0, 3.5], dtype=F64)
    est = pose.clone()
    est[:, :3, 3] = pose[:, :3, 3] + pose[:, :3, :3] @ offset_cam  # the source moved along camera axes
    torch.testing.assert_close(
        metrics.translation_error_per_axis_mm(est, pose), offset_cam.abs().expand(4, 3), atol=1e-9, rtol=0
    )
    world = (pose[:, :3, :3] @ offset_cam).abs()
    torch.testing.assert_close(metrics.translation_error_per_axis_mm(est, pose, frame="world"), world)
    torch.testing.assert_close(
        metrics.translation_error_mm(est, pose), offset_cam.norm().expand(4), atol=1e-9, rtol=0
    )
    # AP view: camera x = −world x, y = −world z, z = −world y.
    ap = carm_pose(source_to_isocenter=SID, dtype=F64)
    est = ap.clone()
    est[:, :3, 3] += torch.tensor([2.0, 5.0, -1.0], dtype=F64)
    torch.testing.assert_close(
        metrics.translation_error_per_axis_mm(est, ap), torch.tensor([[2.0, 1.0, 5.0]], dtype=F64)
    )


def test_double_geodesic_error_on_a_known_pair() -> None:
    pose = _true_poses()[:1]
    est = pose.clone()
    est[:, :3, :3] = pose[:, :3, :3] @ axis_angle_to_matrix(torch.tensor([0.0, 0.0, 0.01], dtype=F64))
    est[:, :3, 3] += torch.tensor([3.0, 4.0, 0.0], dtype=F64)
    radius = SDD / 2
    expected = math.sqrt((radius * 0.01) ** 2 + 5.0**2)
    torch.testing.assert_close(
        metrics.double_geodesic_error(est, pose, radius), torch.tensor([expected], dtype=F64)
    )
    with pytest.raises(InputError):
        metrics.double_geodesic_error(est, pose, -1.0)


def test_pose_errors_bundle_and_case_result() -> None:
    pose = _true_poses()
    d = torch.tensor([[2.0, 0.0, 0.0]], dtype=F64).expand(4, 3)
    est = _move_ct(pose, _translation(d))
    lm = _landmarks(6, seed=11)
    errs = metrics.pose_errors(est, pose, lm, _intrinsics(), radius_mm=SDD / 2)
    assert len(errs) == 4 and errs.mpd_mm is not None and errs.dgeo_mm is not None
    torch.testing.assert_close(errs.mtre_mm, torch.full((4,), 2.0, dtype=F64))
    rec = errs.case_result(2, case="c2", method="m", level="easy", seconds=1.5, converged=True)
    assert rec.case == "c2" and rec.mtre_mm == pytest.approx(2.0) and rec.seconds == 1.5
    assert rec.rot_deg_xyz is not None and len(rec.rot_deg_xyz) == 3
    assert metrics.CaseResult.from_dict(rec.to_dict()) == rec
    bare = metrics.pose_errors(est, pose, lm)
    assert (
        bare.mpd_mm is None
        and bare.dgeo_mm is None
        and bare.case_result(0, case="c", method="m").mpd_mm is None
    )


# --------------------------------------------------------------------------------------------------
# Success rates and summaries
# --------------------------------------------------------------------------------------------------


def test_success_rate_counts_strictly_below_the_threshold() -> None:
    values = [0.5, 1.0, 1.5, 2.0, 4.9, 5.0, 9.0, 12.0, float("nan"), float("inf")]
    sr = metrics.success_rate(values)
    assert list(sr) == [1.0, 2.0, 5.0, 10.0]
    assert [sr[t].successes for t in sr] == [1, 3, 5, 7]
    assert all(r.total == 10 for r in sr.values())
    assert sr[5.0].fraction == pytest.approx(0.5) and float(sr[10.0]) == pytest.approx(0.7)
    # Tensors and arrays are accepted; custom thresholds.
    sr2 = metrics.success_rate(torch.tensor([0.1, 3.0, 3.0]), thresholds=(3, 3.5))
    assert sr2[3.0].successes == 1 and sr2[3.5].successes == 3
    assert metrics.success_rate(np.array([]), (1.0,))[1.0].total == 0
    assert math.isnan(metrics.success_rate([], (1.0,))[1.0].fraction)
    with pytest.raises(InputError):
        metrics.success_rate([1.0], (0.0,))


def _records() -> list[metrics.CaseResult]:
    rows = [
        # case, method, level, mtre, mpd, seconds, converged
        ("a", "m1", "easy", 0.5, 1.0, 2.0, True),
        ("b", "m1", "easy", 1.5, 3.0, 4.0, True),
        ("c", "m1", "easy", 4.0, None, 6.0, False),
        ("d", "m1", "easy", 30.0, float("nan"), 8.0, None),
        ("e", "m2", "hard", 8.0, 16.0, 1.0, True),
    ]
    return [
        metrics.CaseResult(
            case=c,
            method=m,
            level=lv,
            mtre_mm=t,
            mpd_mm=p,
            rot_deg=t / 10,
            trans_mm=2 * t,
            rot_deg_xyz=(t, 0.0, 1.0),
            trans_mm_xyz=(0.0, t, 2.0),
            seconds=s,
            converged=cv,
        )
        for c, m, lv, t, p, s, cv in rows
    ]


def test_summarize_on_a_crafted_list() -> None:
    recs = _records()
    s = metrics.summarize(recs[:4])
    assert s.method == "m1" and s.level == "easy" and s.n_cases == 4
    assert (
        s.mtre_mm.median == pytest.approx(2.75) and s.mtre_mm.mean == pytest.approx(9.0) and s.mtre_mm.n == 4
    )
    assert [s.success[t].successes for t in (1.0, 2.0, 5.0, 10.0)] == [1, 2, 3, 3]
    assert s.success[5.0].fraction == pytest.approx(0.75)
    # mPD: one None (not computed) and one NaN (non-finite) are left out.
    assert s.mpd_mm is not None and s.mpd_mm.n == 2 and s.mpd_mm.median == pytest.approx(2.0)
    assert s.mrpe_px is None and s.dgeo_mm is None
    assert s.rot_deg is not None and s.rot_deg.median == pytest.approx(0.275)
    assert s.trans_mm is not None and s.trans_mm.mean == pytest.approx(18.0)
    assert (
        s.rot_deg_xyz is not None
        and s.rot_deg_xyz[0].mean == pytest.approx(9.0)
        and s.rot_deg_xyz[2].mean == 1.0
    )
    assert s.trans_mm_xyz is not None and s.trans_mm_xyz[1].median == pytest.approx(2.75)
    assert (
        s.seconds is not None
        and s.seconds.median == pytest.approx(5.0)
        and s.seconds.mean == pytest.approx(5.0)
    )
    assert s.converged_fraction == pytest.approx(2 / 3)
    d = s.to_dict()
    assert d["success"]["5.0"]["fraction"] == pytest.approx(0.75) and d["mtre_mm"]["median"] == pytest.approx(
        2.75
    )

    everything = metrics.summarize(recs, thresholds=(10.0,))
    assert everything.method == "mixed" and everything.level == "mixed" and list(everything.success) == [10.0]
    assert everything.success[10.0].successes == 4

    groups = metrics.summarize_by(recs)
    assert list(groups) == [("m1", "easy"), ("m2", "hard")]
    assert groups[("m2", "hard")].mtre_mm.median == 8.0 and groups[("m2", "hard")].n_cases == 1
    with pytest.raises(InputError):
        metrics.summarize([])
    with pytest.raises(InputError):
        metrics.summarize_by(recs, keys=("nope",))


def test_summary_markdown_table() -> None:
    groups = metrics.summarize_by(_records())
    table = metrics.summary_markdown(list(groups.values()))
    lines = table.strip().split("\n")
    assert len(lines) == 4
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["method", "level", "n", "mTRE median (mm)", "mTRE mean (mm)"]
    assert "SR@1 mm (%)" in header and "SR@10 mm (%)" in header
    assert set(lines[1].replace("|", "")) <= {"-", ":"}
    row = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|")), strict=True))
    assert row["method"] == "m1" and row["n"] == "4"
    assert row["mTRE median (mm)"] == "2.75" and row["mTRE mean (mm)"] == "9.00"
    assert row["SR@1 mm (%)"] == "25.0" and row["SR@5 mm (%)"] == "75.0"
    assert row["mPD median (mm)"] == "2.00 (n=2)" and row["mRPE median (px)"] == "—"
    assert row["s/case median"] == "5.00"
    # One summary, rows only, per-axis columns.
    one = metrics.summary_markdown(groups[("m2", "hard")], header=False, per_axis=True)
    cells = [c.strip() for c in one.strip().strip("|").split("|")]
    assert (
        one.count("\n") == 1
        and cells[0] == "m2"
        and cells[-6:] == ["8.00", "0.00", "1.00", "0.00", "8.00", "2.00"]
    )
    with pytest.raises(InputError):
        metrics.summary_markdown([])


def test_non_finite_pose_gives_nan_errors_not_zero() -> None:
    pose = _true_poses()
    est = pose.clone()
    est[1, 0, 3] = float("nan")
    est[2, :3, :3] = float("nan")
    lm = _landmarks(5)
    intr = _intrinsics()
    for v in (
        metrics.mtre(est, pose, lm),
        metrics.mpd(est, pose, lm, intr),
        metrics.mrpe(est, pose, lm, intr),
        metrics.rotation_error_deg(est, pose),
        metrics.translation_error_mm(est, pose),
        metrics.double_geodesic_error(est, pose, SDD / 2),
        metrics.rotation_error_per_axis_deg(est, pose),
        metrics.rotation_error_per_axis_deg(est, pose, convention="rotvec"),
        metrics.translation_error_per_axis_mm(est, pose),
    ):
        nan = torch.isnan(v) if v.ndim == 1 else torch.isnan(v).all(-1)
        assert nan.tolist() == [False, True, True, False], v
    errs = metrics.pose_errors(est, pose, lm, intr)
    assert metrics.success_rate(errs.mtre_mm, (1000.0,))[1000.0].successes == 2


def test_image_metrics_are_the_losses_similarities():
    from xraypose import losses
    from xraypose.metrics import image_metrics

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 24, 24, generator=g, dtype=torch.float64)
    y = 3.0 * x + 1.0
    same = image_metrics(y, x)
    for name in ("ncc", "ssim", "gradient_correlation"):
        assert same[name].shape == (2,)
    assert torch.allclose(same["ncc"], torch.ones(2, dtype=torch.float64))
    assert torch.allclose(same["gradient_correlation"], torch.ones(2, dtype=torch.float64))
    noisy_image = x + 0.3 * torch.rand(2, 24, 24, generator=g, dtype=torch.float64)
    noisy = image_metrics(noisy_image, x)
    assert torch.equal(noisy["ssim"], losses.ssim(noisy_image, x))
    assert torch.equal(noisy["ncc"], losses.ncc(noisy_image, x))
    assert bool((noisy["ncc"] < 1).all()) and bool((image_metrics(x, x)["ssim"] > noisy["ssim"]).all())
