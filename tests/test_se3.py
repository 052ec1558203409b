"""Tests of xraypose.geometry.se3 (rigid transforms, exp/log, distances)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.spatial.transform import RigidTransform, Rotation

from xraypose.errors import InputError
from xraypose.geometry import se3
from xraypose.geometry.rotations import skew, so3_exp

DTYPES = [torch.float32, torch.float64]
F64 = torch.float64


def _random_transforms(n: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    T = np.zeros((n, 4, 4))
    T[:, :3, :3] = Rotation.random(n, rng=rng).as_matrix()
    T[:, :3, 3] = rng.normal(scale=100.0, size=(n, 3))
    T[:, 3, 3] = 1.0
    return torch.as_tensor(T, dtype=dtype)


def _twist_matrix(xi: torch.Tensor) -> torch.Tensor:
    """The 4x4 Lie-algebra matrix [[omega^, v], [0, 0]] of a twist (v, omega)."""
    out = torch.zeros((*xi.shape[:-1], 4, 4), dtype=xi.dtype)
    out[..., :3, :3] = skew(xi[..., 3:])
    out[..., :3, 3] = xi[..., :3]
    return out


@pytest.fixture(scope="module")
def Ts() -> torch.Tensor:
    return _random_transforms(64, 0)


# --------------------------------------------------------------------------------------------------
# exp / log
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_se3_exp_matches_matrix_exponential_and_scipy(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    xi = torch.randn(64, 6, generator=g, dtype=F64) * torch.tensor([50.0, 50, 50, 1, 1, 1], dtype=F64)
    T = se3.se3_exp(xi.to(dtype))
    assert T.shape == (64, 4, 4) and T.dtype == dtype
    tol = 1e-10 if dtype == F64 else 1e-4
    torch.testing.assert_close(T.double(), torch.linalg.matrix_exp(_twist_matrix(xi)), atol=tol, rtol=tol)
    # SciPy orders exponential coordinates rotation first.
    ref = RigidTransform.from_exp_coords(torch.cat([xi[:, 3:], xi[:, :3]], -1).numpy()).as_matrix()
    np.testing.assert_allclose(T.double().numpy(), ref, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(
        T[..., 3, :], torch.tensor([0.0, 0, 0, 1], dtype=dtype).expand(64, 4), rtol=0, atol=0
    )


def test_se3_exp_pure_translation_and_zero() -> None:
    xi = torch.tensor([[10.0, -5.0, 2.0, 0.0, 0.0, 0.0], [0.0] * 6], dtype=F64)
    T = se3.se3_exp(xi)
    want = torch.eye(4, dtype=F64).repeat(2, 1, 1)
    want[0, :3, 3] = xi[0, :3]
    torch.testing.assert_close(T, want, rtol=0, atol=0)


def test_se3_exp_small_rotation() -> None:
    xi = torch.tensor([[1.0, 2.0, 3.0, 1e-8, -2e-8, 5e-9]], dtype=F64)
    want = torch.linalg.matrix_exp(_twist_matrix(xi))
    torch.testing.assert_close(se3.se3_exp(xi), want, atol=1e-15, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_se3_log_matches_scipy(Ts: torch.Tensor, dtype: torch.dtype) -> None:
    xi = se3.se3_log(Ts.to(dtype))
    ref = RigidTransform.from_matrix(Ts.numpy()).as_exp_coords()
    tol = 1e-10 if dtype == F64 else 2e-3
    np.testing.assert_allclose(
        xi.double().numpy(), np.concatenate([ref[:, 3:], ref[:, :3]], -1), atol=tol, rtol=0
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_log_round_trip(Ts: torch.Tensor, dtype: torch.dtype) -> None:
    T = Ts.to(dtype)
    tol = 1e-11 if dtype == F64 else 2e-4
    torch.testing.assert_close(se3.se3_exp(se3.se3_log(T)), T, atol=tol, rtol=tol)
    g = torch.Generator().manual_seed(2)
    xi = torch.randn(32, 6, generator=g, dtype=F64) * 20
    omega = xi[:, 3:]
    xi[:, 3:] = omega / omega.norm(dim=-1, keepdim=True) * torch.rand(32, 1, generator=g, dtype=F64) * 3.0
    torch.testing.assert_close(se3.se3_log(se3.se3_exp(xi.to(dtype))).double(), xi, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("angle", [0.0, 1e-8, 1e-4, math.pi - 1e-6, math.pi])
def test_exp_log_round_trip_extreme_angles(angle: float) -> None:
    axis = torch.nn.functional.normalize(torch.tensor([0.2, -0.4, 0.9], dtype=F64), dim=0)
    xi = torch.cat([torch.tensor([30.0, -10.0, 5.0], dtype=F64), axis * angle])
    T = se3.se3_exp(xi)
    torch.testing.assert_close(T, torch.linalg.matrix_exp(_twist_matrix(xi)), atol=1e-12, rtol=0)
    back = se3.se3_log(T)
    torch.testing.assert_close(se3.se3_exp(back), T, atol=1e-12, rtol=0)
    if angle < math.pi:
        torch.testing.assert_close(back, xi, atol=1e-8, rtol=0)


@pytest.mark.parametrize("angle", [0.0, 1e-8, 1e-3, 0.19, 0.21, 1.5, math.pi - 0.05])
def test_gradcheck_se3_exp_log(angle: float) -> None:
    axis = torch.nn.functional.normalize(
        torch.tensor([[0.2, -0.4, 0.9], [1.0, 0.3, -0.2]], dtype=F64), dim=-1
    )
    xi = torch.cat([torch.tensor([[30.0, -10.0, 5.0], [-2.0, 1.0, 4.0]], dtype=F64), axis * angle], -1)
    assert torch.autograd.gradcheck(se3.se3_exp, (xi.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)
    T = se3.se3_exp(xi).detach()

    def log_of_top_rows(top: torch.Tensor) -> torch.Tensor:  # perturb only the [R | t] block
        bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=F64).expand(*top.shape[:-2], 1, 4)
        return se3.se3_log(torch.cat([top, bottom], dim=-2))

    top = T[..., :3, :].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(log_of_top_rows, (top,), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# compose / invert / transform
# --------------------------------------------------------------------------------------------------


def test_compose_and_invert_identities(Ts: torch.Tensor) -> None:
    A, B, C = Ts[:16], Ts[16:32], Ts[32:48]
    eye = torch.eye(4, dtype=F64).expand(16, 4, 4)
    torch.testing.assert_close(se3.compose(A, B), A @ B, rtol=0, atol=0)
    torch.testing.assert_close(se3.compose(A, B, C), A @ B @ C)
    torch.testing.assert_close(se3.compose(se3.compose(A, B), C), se3.compose(A, se3.compose(B, C)))
    torch.testing.assert_close(se3.compose(A), A, rtol=0, atol=0)
    torch.testing.assert_close(se3.compose(A, se3.invert(A)), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(se3.compose(se3.invert(A), A), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(se3.invert(A), torch.linalg.inv(A), atol=1e-12, rtol=0)
    torch.testing.assert_close(se3.invert(se3.invert(A)), A, atol=1e-12, rtol=0)
    torch.testing.assert_close(se3.invert(se3.compose(A, B)), se3.compose(se3.invert(B), se3.invert(A)))
    # Broadcasting: one transform against a batch.
    torch.testing.assert_close(se3.compose(A[0], B), A[0] @ B, rtol=0, atol=0)
    assert (se3.compose(A, B) - se3.compose(B, A)).abs().max() > 1.0  # not commutative


@pytest.mark.parametrize("dtype", DTYPES)
def test_transform_points_matches_homogeneous_math(Ts: torch.Tensor, dtype: torch.dtype) -> None:
    T = Ts[:4].to(dtype)
    p = torch.randn(4, 10, 3, generator=torch.Generator().manual_seed(3), dtype=dtype) * 100
    hom = torch.cat([p, torch.ones(4, 10, 1, dtype=dtype)], -1)
    want = (T @ hom.transpose(-1, -2)).transpose(-1, -2)[..., :3]
    tol = 1e-12 if dtype == F64 else 1e-4
    torch.testing.assert_close(se3.transform_points(T, p), want, atol=tol, rtol=tol)
    # (B, 4, 4) against shared (N, 3) points, and one T against batched points.
    torch.testing.assert_close(
        se3.transform_points(T, p[0]), (T @ hom[0].T).transpose(-1, -2)[..., :3], atol=tol, rtol=tol
    )
    assert se3.transform_points(T[0], p).shape == (4, 10, 3)
    # Vectors: rotation only.
    torch.testing.assert_close(
        se3.transform_vectors(T, p), p @ T[..., :3, :3].transpose(-1, -2), rtol=0, atol=0
    )
    d = se3.transform_points(T, p[:, :1]) - se3.transform_points(T, p[:, 1:2])
    torch.testing.assert_close(se3.transform_vectors(T, p[:, :1] - p[:, 1:2]), d, atol=tol * 100, rtol=tol)


def test_make_and_split_transform(Ts: torch.Tensor) -> None:
    R, t = se3.split_transform(Ts)
    assert R.shape == (64, 3, 3) and t.shape == (64, 3)
    torch.testing.assert_close(se3.make_transform(R, t), Ts, rtol=0, atol=0)
    # Broadcasting one rotation against many translations.
    T = se3.make_transform(R[0], t)
    assert T.shape == (64, 4, 4)
    torch.testing.assert_close(T[:, :3, :3], R[0].expand(64, 3, 3), rtol=0, atol=0)
    torch.testing.assert_close(T[:, :3, 3], t, rtol=0, atol=0)


def test_is_rigid(Ts: torch.Tensor) -> None:
    assert se3.is_rigid(Ts).all()
    bad = Ts[:5].clone()
    bad[0, :3, :3] *= 1.01  # scaled
    bad[1, 3, 0] = 0.5  # not homogeneous
    bad[2, :3, 0] *= -1  # reflection (det -1)
    bad[3, 0, 3] = float("nan")
    result = se3.is_rigid(bad)
    assert result.tolist() == [False, False, False, False, True]
    assert se3.is_rigid(Ts[0].float()).shape == ()


def test_adjoint(Ts: torch.Tensor) -> None:
    T = Ts[:8]
    xi = torch.randn(8, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    lhs = T @ se3.se3_exp(xi) @ se3.invert(T)
    rhs = se3.se3_exp((se3.adjoint(T) @ xi[..., None])[..., 0])
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-10)
    A, B = Ts[8:16], Ts[16:24]
    torch.testing.assert_close(se3.adjoint(A @ B), se3.adjoint(A) @ se3.adjoint(B), atol=1e-10, rtol=1e-10)
    assert se3.adjoint(T).shape == (8, 6, 6)


# --------------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------------


def _pose(rotvec: list[float], t: list[float]) -> torch.Tensor:
    return se3.make_transform(so3_exp(torch.tensor(rotvec, dtype=F64)), torch.tensor(t, dtype=F64))


def test_distances_on_known_poses() -> None:
    identity = torch.eye(4, dtype=F64)
    rot90 = _pose([0.0, 0.0, math.pi / 2], [0.0, 0.0, 0.0])
    shift10 = _pose([0.0, 0.0, 0.0], [6.0, 0.0, -8.0])  # |t| = 10 mm
    both = _pose([math.pi / 2, 0.0, 0.0], [0.0, 10.0, 0.0])
    r = 500.0
    assert se3.rotation_distance(identity, rot90).item() == pytest.approx(math.pi / 2, abs=1e-14)
    assert se3.rotation_distance(identity, rot90, degrees=True).item() == pytest.approx(90.0, abs=1e-12)
    assert se3.translation_distance(identity, rot90).item() == 0.0
    assert se3.translation_distance(identity, shift10).item() == pytest.approx(10.0, abs=1e-14)
    assert se3.rotation_distance(identity, shift10).item() == 0.0
    # Hand-computed double geodesic: r * pi/2 = 785.398... mm, 10 mm, and their hypotenuse.
    assert se3.double_geodesic_distance(identity, rot90, radius=r).item() == pytest.approx(785.3981633974483)
    assert se3.double_geodesic_distance(identity, shift10, radius=r).item() == pytest.approx(10.0)
    assert se3.double_geodesic_distance(identity, both, radius=r).item() == pytest.approx(
        math.sqrt(785.3981633974483**2 + 100.0)
    )
    assert se3.double_geodesic_distance(rot90, rot90, radius=r).item() == 0.0


def test_distances_batched_and_symmetric(Ts: torch.Tensor) -> None:
    A, B = Ts[:32], Ts[32:]
    d_rot = se3.rotation_distance(A, B)
    want = (
        Rotation.from_matrix(A[:, :3, :3].numpy()).inv() * Rotation.from_matrix(B[:, :3, :3].numpy())
    ).magnitude()
    np.testing.assert_allclose(d_rot.numpy(), want, atol=1e-12)
    torch.testing.assert_close(se3.translation_distance(A, B), (A[:, :3, 3] - B[:, :3, 3]).norm(dim=-1))
    dg = se3.double_geodesic_distance(A, B, radius=250.0)
    torch.testing.assert_close(dg, se3.double_geodesic_distance(B, A, radius=250.0))
    torch.testing.assert_close(dg, torch.hypot(250.0 * d_rot, se3.translation_distance(A, B)))


def test_distance_gradients_finite_at_coincident_poses(Ts: torch.Tensor) -> None:
    xi = torch.zeros(2, 6, dtype=F64, requires_grad=True)
    target = Ts[:2]
    d = se3.double_geodesic_distance(se3.compose(target, se3.se3_exp(xi)), target, radius=100.0)
    d.sum().backward()
    assert xi.grad is not None and torch.isfinite(xi.grad).all()
    # Away from the optimum the gradient of the distance is finite and non-zero.
    xi2 = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=F64, requires_grad=True)
    se3.double_geodesic_distance(se3.se3_exp(xi2), torch.eye(4, dtype=F64), radius=100.0).sum().backward()
    assert xi2.grad is not None
    torch.testing.assert_close(xi2.grad, torch.tensor([[1.0, 0, 0, 0, 0, 0]], dtype=F64))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_validate_transform(Ts: torch.Tensor) -> None:
    se3.validate_transform(Ts)  # valid: no error
    with pytest.raises(InputError, match=r"'pose'.*\(\.\.\., 4, 4\).*\(3, 4\)"):
        se3.validate_transform(torch.zeros(3, 4), "pose")
    with pytest.raises(InputError, match=r"'pose'.*torch\.int64"):
        se3.validate_transform(torch.eye(4, dtype=torch.int64), "pose")
    with pytest.raises(InputError, match="'T'"):
        se3.validate_transform(np.eye(4))  # type: ignore[arg-type]
    nan = Ts[:2].clone()
    nan[1, 0, 0] = float("nan")
    with pytest.raises(InputError, match=r"'extrinsics'.*finite"):
        se3.validate_transform(nan, "extrinsics")
    row = Ts[:2].clone()
    row[1, 3] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=F64)
    with pytest.raises(InputError, match=r"'T'.*last row"):
        se3.validate_transform(row)


@pytest.mark.parametrize(
    ("fn", "args", "name"),
    [
        (se3.se3_exp, (torch.zeros(5),), "xi"),
        (se3.se3_log, (torch.zeros(3, 3),), "T"),
        (se3.se3_log, (torch.full((4, 4), float("inf")),), "T"),
        (se3.compose, (), "Ts"),
        (se3.compose, (torch.eye(4), torch.eye(3)), "Ts[1]"),
        (se3.compose, (torch.eye(4).expand(2, 4, 4), torch.eye(4).expand(3, 4, 4)), "Ts"),
        (se3.invert, (torch.eye(3),), "T"),
        (se3.transform_points, (torch.eye(4), torch.zeros(5, 2)), "points"),
        (se3.transform_points, (torch.eye(4), torch.zeros(3)), "points"),
        (se3.transform_points, (torch.eye(4), torch.zeros(5, 3, dtype=F64)), "points"),
        (se3.transform_points, (torch.eye(4).expand(2, 4, 4), torch.zeros(3, 5, 3)), "points"),
        (se3.transform_vectors, (torch.eye(4), torch.zeros(5, 4)), "vectors"),
        (se3.make_transform, (torch.eye(3), torch.zeros(4)), "t"),
        (se3.make_transform, (torch.eye(3).expand(2, 3, 3), torch.zeros(3, 3)), "t"),
        (se3.make_transform, (torch.eye(3), torch.zeros(3, dtype=F64)), "t"),
        (se3.split_transform, (torch.eye(4)[:3],), "T"),
        (se3.adjoint, (torch.zeros(4, 4),), "T"),
        (se3.is_rigid, (torch.eye(4, dtype=torch.int32),), "T"),
        (se3.translation_distance, (torch.eye(4), torch.eye(3)), "T2"),
        (se3.rotation_distance, (torch.eye(3), torch.eye(4)), "T1"),
    ],
)
def test_bad_input_raises_input_error(fn: Callable[..., object], args: tuple, name: str) -> None:
    with pytest.raises(InputError, match=f"'{name}'".replace("[", r"\[").replace("]", r"\]")) as info:
        fn(*args)
    assert "got" in str(info.value)


@pytest.mark.parametrize("radius", [0.0, -1.0, float("nan"), float("inf"), "500", None, True])
def test_double_geodesic_bad_radius(radius: object) -> None:
    with pytest.raises(InputError, match="'radius'"):
        se3.double_geodesic_distance(torch.eye(4), torch.eye(4), radius=radius)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_device_agnostic(device: str) -> None:
    xi = torch.tensor([[10.0, -5.0, 2.0, 0.3, -0.2, 1.0], [0.0, 0.0, 0.0, 1e-9, 0.0, 0.0]], dtype=F64)
    T_cpu = se3.se3_exp(xi)
    T = se3.se3_exp(xi.to(device))
    assert T.device.type == device
    torch.testing.assert_close(T.cpu(), T_cpu, atol=1e-12, rtol=0)
    torch.testing.assert_close(se3.se3_log(T).cpu(), xi, atol=1e-12, rtol=0)
    p = torch.ones(2, 5, 3, dtype=F64, device=device)
    torch.testing.assert_close(se3.transform_points(se3.invert(T), se3.transform_points(T, p)), p)
    assert se3.double_geodesic_distance(T, T, radius=100.0).device.type == device
    assert se3.is_rigid(T).all()


def test_distances_of_a_nan_pose_are_nan_not_zero() -> None:
    """A non-finite pose (e.g. a diverged registration) must not read as zero error."""
    a = torch.eye(4, dtype=torch.float64)[None]
    b = a.clone()
    b[0, 1, 3] = math.nan
    assert bool(torch.isnan(se3.translation_distance(a, b)).all())
    assert bool(torch.isnan(se3.double_geodesic_distance(a, b, radius=500.0)).all())
    # …while equal poses still give exactly 0 with a zero gradient
    c = a.clone().requires_grad_(True)
    d = se3.translation_distance(c, a)
    d.sum().backward()
    assert float(d.detach()) == 0.0 and bool((c.grad == 0).all())
