"""C-arm pose sampling and pose perturbation (xraypose.geometry.sampling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from xraypose.errors import InputError
from xraypose.geometry import carm_pose
from xraypose.geometry.rotations import euler_to_matrix, geodesic_distance, matrix_to_euler, so3_exp
from xraypose.geometry.sampling import (
    CArmPoseDistribution,
    carm_angles_from_pose,
    gaussian_se3_poses,
    perturb_poses,
    sample_carm,
    sample_carm_poses,
    uniform_box_poses,
    uniform_rotations,
)
from xraypose.geometry.se3 import invert, is_rigid, rotation_distance, se3_log, transform_points

CENTER = (12.0, -40.0, 150.0)
N = 4000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sample():
    return sample_carm(CArmPoseDistribution(), N, CENTER, generator=_gen(3))


def test_defaults_are_documented_values() -> None:
    d = CArmPoseDistribution()
    assert d.lao_deg == (-30.0, 30.0)
    assert d.cranial_deg == (-20.0, 20.0)
    assert d.inplane_deg == (-10.0, 10.0)
    assert d.isocenter_offset_mm == (30.0, 30.0, 30.0)
    assert d.source_to_isocenter_mm == 620.0
    assert CArmPoseDistribution.from_dict(d.to_dict()) == d


def test_poses_are_rigid_float64_and_match_carm_pose(sample) -> None:
    poses = sample.poses
    assert poses.shape == (N, 4, 4) and poses.dtype == torch.float64
    assert bool(is_rigid(poses).all())
    a = sample.angles_deg
    want = carm_pose(
        a[:, 0], a[:, 1], a[:, 2], source_to_isocenter=620.0, isocenter=sample.isocenters, dtype=torch.float64
    )
    torch.testing.assert_close(poses, want, rtol=0, atol=1e-12)


def test_recovered_angles_lie_in_ranges_and_are_uniform(sample) -> None:
    angles = carm_angles_from_pose(sample.poses)
    torch.testing.assert_close(angles, sample.angles_deg, rtol=0, atol=1e-9)
    for col, (lo, hi) in enumerate(((-30, 30), (-20, 20), (-10, 10))):
        a = angles[:, col].numpy()
        assert a.min() >= lo and a.max() <= hi
        assert a.min() < lo + 0.1 * (hi - lo) and a.max() > hi - 0.1 * (hi - lo)  # the range is used
        # Kolmogorov–Smirnov against U(lo, hi): seeded, so the p-value is a fixed number well above 1e-3.
        assert stats.kstest(a, stats.uniform(loc=lo, scale=hi - lo).cdf).pvalue > 1e-3
        # mean and variance of a uniform, within ~4 standard errors
        assert abs(a.mean() - (lo + hi) / 2) < 4 * (hi - lo) / math.sqrt(12 * N)
        assert abs(a.var() - (hi - lo) ** 2 / 12) < 0.1 * (hi - lo) ** 2 / 12
    # the angles are drawn independently
    corr = torch.corrcoef(angles.T)
    assert float((corr - torch.eye(3, dtype=corr.dtype)).abs().max()) < 0.08


def test_isocentres_are_uniform_around_the_centre(sample) -> None:
    iso = sample.poses[:, :3, 3] + 620.0 * sample.poses[:, :3, 2]  # the isocentre on the principal ray
    torch.testing.assert_close(iso, sample.isocenters, rtol=0, atol=1e-9)
    offset = (iso - torch.tensor(CENTER, dtype=torch.float64)).numpy()
    assert (abs(offset) <= 30.0 + 1e-9).all()
    for axis in range(3):
        assert stats.kstest(offset[:, axis], stats.uniform(loc=-30, scale=60).cdf).pvalue > 1e-3
    # the source is source_to_isocenter from the isocentre
    dist = (sample.poses[:, :3, 3] - sample.isocenters).norm(dim=-1)
    torch.testing.assert_close(dist, torch.full_like(dist, 620.0))


def test_custom_distribution_and_validation() -> None:
    d = CArmPoseDistribution(
        lao_deg=(10, 10), cranial_deg=(-5, 0), inplane_deg=(0, 0), isocenter_offset_mm=(0, 0, 0)
    )
    angles = carm_angles_from_pose(sample_carm_poses(d, 50, (0, 0, 0), generator=_gen()))
    assert torch.allclose(angles[:, 0], torch.full((50,), 10.0, dtype=torch.float64))
    assert float(angles[:, 1].min()) >= -5 and float(angles[:, 1].max()) <= 0
    for bad in (
        dict(lao_deg=(5, -5)),
        dict(cranial_deg=(0, math.inf)),
        dict(isocenter_offset_mm=(1, 2)),
        dict(isocenter_offset_mm=(-1, 0, 0)),
        dict(source_to_isocenter_mm=0),
    ):
        with pytest.raises(InputError, match="CArmPoseDistribution"):
            CArmPoseDistribution(**bad)
    with pytest.raises(InputError, match="center_world"):
        sample_carm_poses(CArmPoseDistribution(), 3, (0, 0), generator=_gen())
    assert sample_carm_poses(CArmPoseDistribution(), 0, CENTER).shape == (0, 4, 4)


def test_sampling_is_reproducible() -> None:
    d = CArmPoseDistribution()
    a = sample_carm_poses(d, 20, CENTER, generator=_gen(7))
    b = sample_carm_poses(d, 20, CENTER, generator=_gen(7))
    c = sample_carm_poses(d, 20, CENTER, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(("rot", "trans"), [(0.0, 0.0), (2.0, 5.0), (20.0, 40.0), (179.0, 1.0)])
def test_perturbation_magnitudes_are_exact(sample, rot: float, trans: float) -> None:
    poses = sample.poses[:500]
    center = torch.tensor(CENTER, dtype=torch.float64)
    out = perturb_poses(poses, rot, trans, center, generator=_gen(1))
    assert out.shape == poses.shape and out.dtype == torch.float64
    assert bool(is_rigid(out).all())
    torch.testing.assert_close(
        rotation_distance(poses, out, degrees=True),
        torch.full((500,), rot, dtype=torch.float64),
        atol=1e-9,
        rtol=0,
    )
    # the anatomy centre moves by exactly `trans` in camera coordinates
    c = center.expand(500, 1, 3)
    moved = (transform_points(invert(out), c) - transform_points(invert(poses), c)).norm(dim=-1)[:, 0]
    torch.testing.assert_close(moved, torch.full((500,), trans, dtype=torch.float64), atol=1e-9, rtol=0)


def test_perturbation_directions_are_uniform(sample) -> None:
    poses = sample.poses[:2000]
    out = perturb_poses(poses, 10.0, 20.0, CENTER, generator=_gen(2))
    center = torch.tensor(CENTER, dtype=torch.float64)
    # world-frame motion D = out · poses⁻¹: translation direction of the centre, rotation axis
    D = out @ invert(poses)
    shift = (D[:, :3, :3] @ center + D[:, :3, 3] - center) / 20.0
    axis_w = torch.stack([D[:, 2, 1] - D[:, 1, 2], D[:, 0, 2] - D[:, 2, 0], D[:, 1, 0] - D[:, 0, 1]], -1) / (
        2 * math.sin(math.radians(10.0))
    )
    for v in (shift, axis_w):
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(2000, dtype=torch.float64))
        # uniform on the sphere: each coordinate is U(-1, 1)
        for k in range(3):
            assert stats.kstest(v[:, k].numpy(), stats.uniform(loc=-1, scale=2).cdf).pvalue > 1e-3


def test_perturbation_is_reproducible_and_batched(sample) -> None:
    poses = sample.poses[:12].reshape(3, 4, 4, 4).to(torch.float32)
    a = perturb_poses(poses, 5.0, 10.0, CENTER, generator=_gen(4))
    b = perturb_poses(poses, 5.0, 10.0, CENTER, generator=_gen(4))
    assert a.shape == (3, 4, 4, 4) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, perturb_poses(poses, 5.0, 10.0, CENTER, generator=_gen(5)))
    with pytest.raises(InputError, match="rotation_deg"):
        perturb_poses(poses, 190.0, 1.0, CENTER)
    with pytest.raises(InputError, match="translation_mm"):
        perturb_poses(poses, 1.0, -1.0, CENTER)
    with pytest.raises(InputError, match="poses"):
        perturb_poses(torch.eye(3), 1.0, 1.0, CENTER)


# --------------------------------------------------------------------------------------------------
# SE(3) sampling: Haar rotations, se(3) Gaussians, uniform boxes
# --------------------------------------------------------------------------------------------------

N_HAAR = 20000
# Seeded draws give fixed p-values; a correct sampler passes at 1e-3, a wrong one must fall below 1e-6.
P_PASS = 1e-3
P_FAIL = 1e-6


def _haar_angle_cdf(theta):
    """CDF of the rotation angle of a Haar-uniform rotation: density (1 − cos θ)/π on [0, π]."""
    return (theta - np.sin(theta)) / math.pi


def _angles(R: torch.Tensor) -> np.ndarray:
    return geodesic_distance(torch.eye(3, dtype=R.dtype), R).numpy()


def test_uniform_rotations_are_haar() -> None:
    R = uniform_rotations(N_HAAR, generator=_gen(11))
    assert R.shape == (N_HAAR, 3, 3) and R.dtype == torch.float64
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye.expand_as(R), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        torch.linalg.det(R), torch.ones(N_HAAR, dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert stats.kstest(_angles(R), _haar_angle_cdf).pvalue > P_PASS
    # E[R] = 0 under the Haar measure; each entry has variance 1/3
    assert float(R.mean(0).abs().max()) < 5 / math.sqrt(3 * N_HAAR)
    # E[R_ij^2] = 1/3
    assert float((R.pow(2).mean(0) - 1 / 3).abs().max()) < 0.02


@pytest.mark.parametrize("wrong", ["euler", "axis_uniform_angle"])
def test_haar_check_rejects_wrong_samplers(wrong: str) -> None:
    """The KS check of test_uniform_rotations_are_haar, applied to non-Haar samplers, fails."""
    g = _gen(11)
    if wrong == "euler":  # independent uniform ZYX angles over their full ranges: not Haar
        lo = torch.tensor([-math.pi, -math.pi / 2, -math.pi], dtype=torch.float64)
        u = torch.rand(N_HAAR, 3, generator=g, dtype=torch.float64)
        R = euler_to_matrix(lo + u * (-2 * lo), "ZYX")
    else:  # uniform axis, angle uniform in [0, π]
        axis = torch.nn.functional.normalize(torch.randn(N_HAAR, 3, generator=g, dtype=torch.float64), dim=-1)
        angle = math.pi * torch.rand(N_HAAR, 1, generator=g, dtype=torch.float64)
        R = so3_exp(axis * angle)
    # proper rotations, so only the angle distribution tells them apart
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(N_HAAR, dtype=torch.float64))
    assert stats.kstest(_angles(R), _haar_angle_cdf).pvalue < P_FAIL


def test_uniform_rotations_reproducible_dtype_and_validation() -> None:
    a = uniform_rotations(5, generator=_gen(1))
    b = uniform_rotations(5, generator=_gen(1), dtype=torch.float32)
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, a.float())
    assert not torch.equal(a, uniform_rotations(5, generator=_gen(2)))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(InputError, match="'n'"):
            uniform_rotations(bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="'dtype'"):
        uniform_rotations(3, dtype=torch.int64)


def _reference_pose() -> torch.Tensor:
    pose = carm_pose(25.0, -10.0, 5.0, source_to_isocenter=620.0, isocenter=CENTER, dtype=torch.float64)
    return pose.reshape(4, 4)


N_GAUSS = 20000
ROT_SIGMA = (0.2, 0.1, 0.25)  # DiffPose's rotation σ, rad
TRANS_SIGMA = (70.0, 90.0, 50.0)  # DiffPose's translation σ, mm
TRANS_MEAN = (10.0, 250.0, 5.0)  # DiffPose's translation mean, mm


@pytest.mark.parametrize("frame", ["local", "world"])
def test_gaussian_se3_recovers_mean_and_covariance(frame: str) -> None:
    ref = _reference_pose()
    poses = gaussian_se3_poses(
        ref, N_GAUSS, ROT_SIGMA, TRANS_SIGMA, translation_mean=TRANS_MEAN, frame=frame, generator=_gen(5)
    )
    assert poses.shape == (N_GAUSS, 4, 4) and poses.dtype == torch.float64
    assert bool(is_rigid(poses).all())
    rel = invert(ref) @ poses if frame == "local" else poses @ invert(ref)
    xi = se3_log(rel)  # (v [mm], ω [rad])
    sigma = torch.tensor(TRANS_SIGMA + ROT_SIGMA, dtype=torch.float64)
    mean = torch.tensor((*TRANS_MEAN, 0.0, 0.0, 0.0), dtype=torch.float64)
    # mean within 5 standard errors σ/√n
    assert bool(((xi.mean(0) - mean).abs() < 5 * sigma / math.sqrt(N_GAUSS)).all())
    # covariance ≈ diag(σ²): variances within 5 standard errors (√(2/n) relative), correlations within 5/√n
    cov = torch.cov(xi.T)
    rel_var = cov.diagonal() / sigma**2
    assert bool(((rel_var - 1).abs() < 5 * math.sqrt(2 / N_GAUSS)).all()), rel_var
    corr = torch.corrcoef(xi.T)
    assert float((corr - torch.eye(6, dtype=corr.dtype)).abs().max()) < 5 / math.sqrt(N_GAUSS)
    # each component is normal (KS against N(mean, σ²))
    for k in range(6):
        z = ((xi[:, k] - mean[k]) / sigma[k]).numpy()
        assert stats.kstest(z, stats.norm.cdf).pvalue > P_PASS


def test_gaussian_se3_frames() -> None:
    ref = _reference_pose()
    local, world = (
        gaussian_se3_poses(
            ref, 200, ROT_SIGMA, TRANS_SIGMA, translation_mean=TRANS_MEAN, frame=f, generator=_gen(9)
        )
        for f in ("local", "world")
    )
    # the same seed gives the same twist ξ: local = ref·E, world = E·ref, so world = ref⁻¹·local·ref
    torch.testing.assert_close(world, invert(ref) @ local @ ref, rtol=0, atol=1e-9)
    assert float((world - local).abs().max()) > 1.0
    # pure translations: the source moves along the camera axes (local) or the world axes (world)
    t_loc = gaussian_se3_poses(ref, 50, 0.0, 30.0, frame="local", generator=_gen(4))
    t_world = gaussian_se3_poses(ref, 50, 0.0, 30.0, frame="world", generator=_gen(4))
    v = se3_log(invert(ref) @ t_loc)[:, :3]
    torch.testing.assert_close(t_loc[:, :3, 3], ref[:3, 3] + v @ ref[:3, :3].T, rtol=0, atol=1e-9)
    torch.testing.assert_close(t_world[:, :3, 3], ref[:3, 3] + v, rtol=0, atol=1e-9)
    for p in (t_loc, t_world):  # rotation untouched
        torch.testing.assert_close(p[:, :3, :3], ref[:3, :3].expand(50, 3, 3), rtol=0, atol=1e-12)
    # pure rotations: local rotates about the source (which stays put), world about the world origin
    r_loc = gaussian_se3_poses(ref, 50, 0.3, 0.0, frame="local", generator=_gen(4))
    r_world = gaussian_se3_poses(ref, 50, 0.3, 0.0, frame="world", generator=_gen(4))
    torch.testing.assert_close(r_loc[:, :3, 3], ref[:3, 3].expand(50, 3), rtol=0, atol=1e-9)
    norms = r_world[:, :3, 3].norm(dim=-1)
    torch.testing.assert_close(norms, ref[:3, 3].norm().expand(50), rtol=0, atol=1e-9)
    assert float((r_world[:, :3, 3] - ref[:3, 3]).norm(dim=-1).min()) > 1.0


def test_gaussian_se3_batched_reference_dtype_and_reproducibility() -> None:
    refs = sample_carm_poses(CArmPoseDistribution(), 6, CENTER, generator=_gen(0))
    out = gaussian_se3_poses(refs, 6, 0.0, 0.0, generator=_gen(1))
    torch.testing.assert_close(out, refs, rtol=0, atol=1e-12)
    out32 = gaussian_se3_poses(refs.float(), 6, 0.1, (1.0, 2.0, 3.0), generator=_gen(1))
    assert out32.dtype == torch.float32
    out64 = gaussian_se3_poses(refs, 6, 0.1, (1.0, 2.0, 3.0), generator=_gen(1))
    torch.testing.assert_close(out32, out64.float(), rtol=0, atol=1e-4)
    assert torch.equal(out64, gaussian_se3_poses(refs, 6, 0.1, (1.0, 2.0, 3.0), generator=_gen(1)))
    # a (1, 4, 4) reference is the same as a (4, 4) one
    ref = _reference_pose()
    torch.testing.assert_close(
        gaussian_se3_poses(ref[None], 4, 0.1, 5.0, generator=_gen(3)),
        gaussian_se3_poses(ref, 4, 0.1, 5.0, generator=_gen(3)),
        rtol=0,
        atol=0,
    )


def test_gaussian_se3_validation() -> None:
    ref = _reference_pose()
    cases = [
        ("rotation_sigma", dict(rotation_sigma=-0.1)),
        ("rotation_sigma", dict(rotation_sigma=(0.1, 0.2))),
        ("translation_sigma", dict(translation_sigma=(1.0, -1.0, 1.0))),
        ("translation_sigma", dict(translation_sigma=math.nan)),
        ("translation_mean", dict(translation_mean=(1.0, math.inf, 0.0))),
        ("'n'", dict(n=0)),
        ("'n'", dict(n=-3)),
        ("reference", dict(reference=torch.eye(3, dtype=torch.float64))),
        ("reference", dict(reference=torch.eye(4, dtype=torch.float64).expand(2, 4, 4))),  # n = 3
        ("reference", dict(reference=2 * torch.eye(4, dtype=torch.float64))),  # not rigid
        ("reference", dict(reference=torch.eye(4, dtype=torch.int64))),
        ("frame", dict(frame="camera")),
    ]
    for name, bad in cases:
        args = dict(reference=ref, n=3, rotation_sigma=0.1, translation_sigma=1.0) | bad
        with pytest.raises(InputError, match=name):
            gaussian_se3_poses(**args)  # type: ignore[arg-type]


N_BOX = 4000
ROT_RANGE = ((-30.0, 40.0), (-15.0, 15.0), (0.0, 20.0))  # (z, y, x) for intrinsic "ZYX", degrees
TRANS_RANGE = ((-20.0, 20.0), (-5.0, 50.0), (10.0, 12.0))  # x, y, z, mm


@pytest.mark.parametrize("frame", ["local", "world", None])
def test_uniform_box_poses_lie_in_ranges_and_are_uniform(frame: str | None) -> None:
    ref = _reference_pose() if frame is not None else None
    poses = uniform_box_poses(
        N_BOX, ROT_RANGE, TRANS_RANGE, reference=ref, frame=frame or "local", generator=_gen(6)
    )
    assert poses.shape == (N_BOX, 4, 4) and poses.dtype == torch.float64
    assert bool(is_rigid(poses).all())
    if ref is None:
        rel = poses
    else:
        rel = invert(ref) @ poses if frame == "local" else poses @ invert(ref)
    angles = torch.rad2deg(matrix_to_euler(rel[:, :3, :3], "ZYX")).numpy()
    trans = rel[:, :3, 3].numpy()
    for values, ranges in ((angles, ROT_RANGE), (trans, TRANS_RANGE)):
        for k, (lo, hi) in enumerate(ranges):
            x = values[:, k]
            assert x.min() >= lo - 1e-9 and x.max() <= hi + 1e-9
            assert stats.kstest(x, stats.uniform(loc=lo, scale=hi - lo).cdf).pvalue > P_PASS
    # a wrong range is detected: the first angle is not uniform on a range 10% too wide
    lo, hi = ROT_RANGE[0]
    assert stats.kstest(angles[:, 0], stats.uniform(loc=lo, scale=1.1 * (hi - lo)).cdf).pvalue < P_FAIL


def test_uniform_box_poses_range_forms_dtype_and_validation() -> None:
    a = uniform_box_poses(10, 5.0, (1.0, 2.0, 3.0), generator=_gen(2))
    b = uniform_box_poses(10, ((-5, 5),) * 3, ((-1, 1), (-2, 2), (-3, 3)), generator=_gen(2))
    assert torch.equal(a, b)
    c = uniform_box_poses(10, 5.0, (1.0, 2.0, 3.0), generator=_gen(2), dtype=torch.float32)
    assert c.dtype == torch.float32
    torch.testing.assert_close(c, a.float())
    # zero-width ranges give exactly the reference
    ref = _reference_pose().float()
    out = uniform_box_poses(3, 0.0, 0.0, reference=ref, generator=_gen(2))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.expand(3, 4, 4))
    # another convention
    e = uniform_box_poses(200, ((10, 20), (30, 40), (-5, 0)), 0.0, convention="xyz", generator=_gen(3))
    ang = torch.rad2deg(matrix_to_euler(e[:, :3, :3], "xyz"))
    assert bool(
        (ang >= torch.tensor([10, 30, -5]) - 1e-9).all() and (ang <= torch.tensor([20, 40, 0]) + 1e-9).all()
    )
    cases = [
        ("rotation_range_deg", dict(rotation_range_deg=-1.0)),
        ("rotation_range_deg", dict(rotation_range_deg=((5, -5), (0, 1), (0, 1)))),
        ("translation_range_mm", dict(translation_range_mm=(1.0, 2.0))),
        ("translation_range_mm", dict(translation_range_mm=(1.0, -2.0, 3.0))),
        ("'n'", dict(n=0)),
        ("reference", dict(reference=torch.eye(4, dtype=torch.float64)[None].expand(2, 4, 4))),
        ("frame", dict(frame="global")),
        ("convention", dict(convention="ZZY")),
        ("generator", dict(generator=7)),
    ]
    for name, bad in cases:
        args = dict(n=3, rotation_range_deg=5.0, translation_range_mm=1.0) | bad
        with pytest.raises(InputError, match=name):
            uniform_box_poses(**args)  # type: ignore[arg-type]
