"""C-arm pose sampling and pose perturbation (xraypose.geometry.sampling)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from xraypose.errors import InputError
from xraypose.geometry import carm_pose
from xraypose.geometry.sampling import (
    CArmPoseDistribution,
    carm_angles_from_pose,
    perturb_poses,
    sample_carm,
    sample_carm_poses,
)
from xraypose.geometry.se3 import invert, is_rigid, rotation_distance, transform_points

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
