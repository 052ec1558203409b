"""Tests of xraypose.geometry.rotations against SciPy's Rotation and roma."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import roma
import torch
from scipy.spatial.transform import Rotation

from xraypose.errors import InputError
from xraypose.geometry import rotations as rot

TAIT_BRYAN = ["XYZ", "XZY", "YXZ", "YZX", "ZXY", "ZYX"]
PROPER = ["XYX", "XZX", "YXY", "YZY", "ZXZ", "ZYZ"]
CONVENTIONS = [c for base in TAIT_BRYAN + PROPER for c in (base, base.lower())]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _t(x: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _wxyz(q_xyzw: np.ndarray) -> np.ndarray:
    return q_xyzw[..., [3, 0, 1, 2]]


def _xyzw(q_wxyz: torch.Tensor) -> torch.Tensor:
    return q_wxyz[..., [1, 2, 3, 0]]


@pytest.fixture(scope="module")
def rots() -> Rotation:
    return Rotation.random(128, rng=np.random.default_rng(0))


def _near_pi_rotvecs() -> np.ndarray:
    axes = np.random.default_rng(1).normal(size=(5, 3))
    axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
    angles = np.array([math.pi - 1e-3, math.pi - 1e-6, math.pi - 1e-9, math.pi, math.pi])
    out = axes * angles[:, None]
    out[-1] = [0.0, 0.0, math.pi]  # axis-aligned half turn
    return out


def _assert_same_rotvec_up_to_pi(got: torch.Tensor, want: np.ndarray, atol: float) -> None:
    """Rotation vectors equal, except that at exactly pi the axis sign is free."""
    got_np = got.detach().cpu().double().numpy()
    for g, w in zip(got_np, want, strict=True):
        if abs(np.linalg.norm(w) - math.pi) < 1e-12:
            assert min(np.abs(g - w).max(), np.abs(g + w).max()) < atol
        else:
            np.testing.assert_allclose(g, w, atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------------
# skew / exp / log
# --------------------------------------------------------------------------------------------------


def test_skew_is_cross_product() -> None:
    g = torch.Generator().manual_seed(0)
    w, v = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    k = rot.skew(w)
    torch.testing.assert_close((k @ v[..., None])[..., 0], torch.linalg.cross(w, v), rtol=0, atol=1e-14)
    torch.testing.assert_close(k, -k.transpose(-1, -2), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_so3_exp_matches_scipy_and_roma(rots: Rotation, dtype: torch.dtype) -> None:
    rotvec = rots.as_rotvec() * 1.7  # include angles beyond pi
    R = rot.so3_exp(_t(rotvec, dtype))
    assert R.dtype == dtype and R.shape == (128, 3, 3)
    want = Rotation.from_rotvec(rotvec).as_matrix()
    np.testing.assert_allclose(R.double().numpy(), want, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(R, roma.rotvec_to_rotmat(_t(rotvec, dtype)), atol=TOL[dtype], rtol=0)
    assert rot.axis_angle_to_matrix is rot.so3_exp


@pytest.mark.parametrize("dtype", DTYPES)
def test_so3_exp_small_angles(dtype: torch.dtype) -> None:
    omega = torch.tensor(
        [[0.0, 0.0, 0.0], [1e-8, -2e-8, 3e-8], [0.0, 0.15, 0.1], [0.0, 0.2, 0.0]], dtype=dtype
    )
    R = rot.so3_exp(omega)
    assert torch.equal(R[0], torch.eye(3, dtype=dtype))
    want = Rotation.from_rotvec(omega.double().numpy()).as_matrix()
    np.testing.assert_allclose(R.double().numpy(), want, atol=TOL[dtype] / 10, rtol=0)
    # First order: R ~ I + [omega]_x for 1e-8 rad, off-diagonals exactly the rotation vector.
    assert R[1, 2, 1].item() == pytest.approx(1e-8, rel=1e-6)
    assert R[1, 0, 2].item() == pytest.approx(-2e-8, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_so3_log_matches_scipy_and_roma(rots: Rotation, dtype: torch.dtype) -> None:
    R = _t(rots.as_matrix(), dtype)
    omega = rot.so3_log(R)
    np.testing.assert_allclose(omega.double().numpy(), rots.as_rotvec(), atol=10 * TOL[dtype], rtol=0)
    torch.testing.assert_close(omega, roma.rotmat_to_rotvec(R), atol=10 * TOL[dtype], rtol=0)
    assert rot.matrix_to_axis_angle is rot.so3_log


@pytest.mark.parametrize("dtype", DTYPES)
def test_so3_log_small_angles(dtype: torch.dtype) -> None:
    omega = torch.tensor([[0.0, 0.0, 0.0], [1e-8, -2e-8, 3e-8], [1e-5, 0.0, 0.0]], dtype=torch.float64)
    R = torch.as_tensor(Rotation.from_rotvec(omega.numpy()).as_matrix(), dtype=dtype)
    got = rot.so3_log(R)
    assert torch.equal(got[0], torch.zeros(3, dtype=dtype))
    # float64 resolves a 1e-8 rad rotation to ~1e-16 absolute; an acos-based log would return 0.
    atol = 1e-15 if dtype == torch.float64 else 1e-7
    torch.testing.assert_close(got.double(), omega, atol=atol, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_so3_log_near_pi(dtype: torch.dtype) -> None:
    rotvec = _near_pi_rotvecs()
    R = _t(Rotation.from_rotvec(rotvec).as_matrix(), dtype)
    got = rot.so3_log(R)
    atol = 1e-9 if dtype == torch.float64 else 2e-3
    _assert_same_rotvec_up_to_pi(got, rotvec, atol)
    torch.testing.assert_close(rot.so3_exp(got), R, atol=TOL[dtype], rtol=0)


def test_exp_log_round_trips(rots: Rotation) -> None:
    R = _t(rots.as_matrix())
    torch.testing.assert_close(rot.so3_exp(rot.so3_log(R)), R, atol=1e-14, rtol=0)
    omega = _t(rots.as_rotvec())  # angles in [0, pi)
    torch.testing.assert_close(rot.so3_log(rot.so3_exp(omega)), omega, atol=1e-13, rtol=0)


def test_batch_shapes_preserved() -> None:
    omega = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    R = rot.so3_exp(omega)
    assert R.shape == (2, 5, 3, 3)
    assert rot.so3_log(R).shape == (2, 5, 3)
    assert rot.matrix_to_quaternion(R).shape == (2, 5, 4)
    assert rot.matrix_to_euler(R, "ZYX").shape == (2, 5, 3)
    assert rot.matrix_to_rotation_6d(R).shape == (2, 5, 6)
    assert rot.geodesic_distance(R, R[:1]).shape == (2, 5)
    torch.testing.assert_close(rot.so3_exp(omega[1, 3]), R[1, 3])


# --------------------------------------------------------------------------------------------------
# Quaternions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_quaternion_to_matrix_matches_scipy_and_roma(rots: Rotation, dtype: torch.dtype) -> None:
    q = _t(_wxyz(rots.as_quat()), dtype)
    R = rot.quaternion_to_matrix(q)
    np.testing.assert_allclose(R.double().numpy(), rots.as_matrix(), atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(R, roma.unitquat_to_rotmat(_xyzw(q)), atol=TOL[dtype], rtol=0)
    # The input is normalised, and q and -q give the same matrix.
    torch.testing.assert_close(rot.quaternion_to_matrix(-3.5 * q), R, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matrix_to_quaternion_matches_scipy_and_roma(rots: Rotation, dtype: torch.dtype) -> None:
    R = _t(rots.as_matrix(), dtype)
    q = rot.matrix_to_quaternion(R)
    assert (q[..., 0] >= 0).all()
    want = _wxyz(rots.as_quat(canonical=True))
    np.testing.assert_allclose(q.double().numpy(), want, atol=TOL[dtype], rtol=0)
    q_roma = _wxyz(roma.rotmat_to_unitquat(R).numpy())
    q_roma *= np.where(q_roma[:, :1] < 0, -1.0, 1.0)
    np.testing.assert_allclose(q.numpy(), q_roma, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matrix_to_quaternion_near_pi_and_identity(dtype: torch.dtype) -> None:
    rotvec = np.concatenate([_near_pi_rotvecs(), [[0.0, 0.0, 0.0], [1e-8, 0.0, 0.0]]])
    rots = Rotation.from_rotvec(rotvec)
    q = rot.matrix_to_quaternion(_t(rots.as_matrix(), dtype)).double().numpy()
    want = _wxyz(rots.as_quat(canonical=True))
    sign = np.where((q * want).sum(-1, keepdims=True) < 0, -1.0, 1.0)  # free sign when w == 0
    np.testing.assert_allclose(q * sign, want, atol=TOL[dtype], rtol=0)
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, atol=TOL[dtype])
    assert (q[:, 0] >= 0).all()
    np.testing.assert_array_equal(q[-2], [1.0, 0.0, 0.0, 0.0])


def test_quaternion_matrix_round_trip(rots: Rotation) -> None:
    R = _t(rots.as_matrix())
    torch.testing.assert_close(rot.quaternion_to_matrix(rot.matrix_to_quaternion(R)), R, atol=1e-14, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quaternion_multiply(rots: Rotation, dtype: torch.dtype) -> None:
    r1, r2 = rots[:64], rots[64:]
    a, b = _t(_wxyz(r1.as_quat()), dtype), _t(_wxyz(r2.as_quat()), dtype)
    ab = rot.quaternion_multiply(a, b)
    assert (ab[..., 0] >= 0).all()
    want = _wxyz((r1 * r2).as_quat(canonical=True))
    np.testing.assert_allclose(ab.double().numpy(), want, atol=TOL[dtype], rtol=0)
    raw = rot.quaternion_multiply(a, b, canonical=False)
    torch.testing.assert_close(_xyzw(raw), roma.quat_product(_xyzw(a), _xyzw(b)), atol=TOL[dtype], rtol=0)
    R1, R2 = rot.quaternion_to_matrix(a), rot.quaternion_to_matrix(b)
    torch.testing.assert_close(rot.quaternion_to_matrix(ab), R1 @ R2, atol=TOL[dtype], rtol=0)
    # Non-commutative: the reversed product is a different rotation.
    assert (rot.quaternion_multiply(b, a) - ab).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_quaternion_axis_angle_conversions(rots: Rotation, dtype: torch.dtype) -> None:
    rotvec = rots.as_rotvec() * 1.9  # angles up to ~1.9 pi
    q = rot.axis_angle_to_quaternion(_t(rotvec, dtype))
    assert (q[..., 0] >= 0).all()
    want = _wxyz(Rotation.from_rotvec(rotvec).as_quat(canonical=True))
    np.testing.assert_allclose(q.double().numpy(), want, atol=TOL[dtype], rtol=0)
    q_roma = roma.rotvec_to_unitquat(_t(rotvec, dtype))
    sign = torch.where(q_roma[..., 3:] < 0, -1.0, 1.0).to(dtype)
    torch.testing.assert_close(_xyzw(q), sign * q_roma, atol=TOL[dtype], rtol=0)

    back = rot.quaternion_to_axis_angle(-2.0 * q)  # normalised, sign-insensitive, angle in [0, pi]
    want_rv = Rotation.from_rotvec(rotvec).as_rotvec()
    np.testing.assert_allclose(back.double().numpy(), want_rv, atol=10 * TOL[dtype], rtol=0)
    torch.testing.assert_close(back, roma.unitquat_to_rotvec(_xyzw(q)), atol=10 * TOL[dtype], rtol=0)


def test_quaternion_axis_angle_small() -> None:
    omega = torch.tensor([[0.0, 0.0, 0.0], [1e-8, 2e-8, -1e-8]], dtype=torch.float64)
    q = rot.axis_angle_to_quaternion(omega)
    torch.testing.assert_close(q[0], torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(q[1, 1:], 0.5 * omega[1], atol=1e-24, rtol=1e-12)
    torch.testing.assert_close(rot.quaternion_to_axis_angle(q), omega, atol=1e-22, rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# Euler angles
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_euler_to_matrix_matches_scipy_and_roma(convention: str, dtype: torch.dtype) -> None:
    angles = np.random.default_rng(2).uniform(-math.pi, math.pi, size=(32, 3))
    R = rot.euler_to_matrix(_t(angles, dtype), convention)
    want = Rotation.from_euler(convention, angles).as_matrix()
    np.testing.assert_allclose(R.double().numpy(), want, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(
        R, roma.euler_to_rotmat(convention, _t(angles, dtype)), atol=TOL[dtype], rtol=0
    )


def test_euler_intrinsic_extrinsic_definitions() -> None:
    a = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    rz, rx, ry = (rot.so3_exp(a[i] * torch.eye(3, dtype=torch.float64)[ax]) for i, ax in enumerate([2, 0, 1]))
    torch.testing.assert_close(rot.euler_to_matrix(a, "ZXY"), rz @ rx @ ry)
    torch.testing.assert_close(rot.euler_to_matrix(a, "zxy"), ry @ rx @ rz)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matrix_to_euler_matches_scipy_and_roma(rots: Rotation, convention: str, dtype: torch.dtype) -> None:
    R = _t(rots.as_matrix(), dtype)
    angles = rot.matrix_to_euler(R, convention)
    want = rots.as_euler(convention)
    atol = 1e-12 if dtype == torch.float64 else 1e-3  # float32 loses accuracy near gimbal lock
    np.testing.assert_allclose(angles.double().numpy(), want, atol=atol, rtol=0)
    torch.testing.assert_close(angles, roma.rotmat_to_euler(convention, R), atol=atol, rtol=0)
    torch.testing.assert_close(rot.euler_to_matrix(angles, convention), R, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_euler_round_trip_in_canonical_range(convention: str) -> None:
    rng = np.random.default_rng(4)
    lo, hi = (-0.49 * math.pi, 0.49 * math.pi) if convention.upper() in TAIT_BRYAN else (0.01, 0.99 * math.pi)
    angles = np.stack(
        [rng.uniform(-3.1, 3.1, 16), rng.uniform(lo, hi, 16), rng.uniform(-3.1, 3.1, 16)], axis=-1
    )
    a = _t(angles)
    torch.testing.assert_close(rot.matrix_to_euler(rot.euler_to_matrix(a, convention), convention), a)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_matrix_to_euler_gimbal_lock_like_scipy(convention: str) -> None:
    middle = [-math.pi / 2, math.pi / 2] if convention.upper() in TAIT_BRYAN else [0.0, math.pi]
    angles = np.array([[0.4, m, -0.9] for m in middle] + [[-2.0, m, 0.5] for m in middle])
    rots = Rotation.from_euler(convention, angles)
    R = _t(rots.as_matrix())
    got = rot.matrix_to_euler(R, convention)
    want = rots.as_euler(convention, suppress_warnings=True)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-7, rtol=0)
    torch.testing.assert_close(rot.euler_to_matrix(got, convention), R, atol=1e-12, rtol=0)
    # Gradients stay finite in gimbal lock.
    Rg = R.clone().requires_grad_(True)
    rot.matrix_to_euler(Rg, convention).sum().backward()
    assert Rg.grad is not None and torch.isfinite(Rg.grad).all()


@pytest.mark.parametrize("bad", ["XYY", "xxy", "xYz", "XYZX", "XY", "abc", "", 123, None])
def test_invalid_euler_convention(bad: object) -> None:
    with pytest.raises(InputError, match="convention"):
        rot.euler_to_matrix(torch.zeros(3), bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="convention"):
        rot.matrix_to_euler(torch.eye(3), bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# 6D
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotation_6d(rots: Rotation, dtype: torch.dtype) -> None:
    x = torch.randn(64, 6, dtype=dtype, generator=torch.Generator().manual_seed(5))
    R = rot.rotation_6d_to_matrix(x)
    want = roma.special_gramschmidt(x.unflatten(-1, (2, 3)).transpose(-1, -2))
    torch.testing.assert_close(R, want, atol=TOL[dtype], rtol=0)
    eye = torch.eye(3, dtype=dtype)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye.expand_as(R), atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(64, dtype=dtype), atol=TOL[dtype], rtol=0)
    # First column is the normalised first vector.
    torch.testing.assert_close(R[..., :, 0], torch.nn.functional.normalize(x[..., :3], dim=-1))

    Rs = _t(rots.as_matrix(), dtype)
    six = rot.matrix_to_rotation_6d(Rs)
    torch.testing.assert_close(six, torch.cat([Rs[..., :, 0], Rs[..., :, 1]], -1), rtol=0, atol=0)
    torch.testing.assert_close(rot.rotation_6d_to_matrix(six), Rs, atol=TOL[dtype], rtol=0)


# --------------------------------------------------------------------------------------------------
# Geodesic distance, random rotations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_geodesic_distance(rots: Rotation, dtype: torch.dtype) -> None:
    r1, r2 = rots[:64], rots[64:]
    R1, R2 = _t(r1.as_matrix(), dtype), _t(r2.as_matrix(), dtype)
    d = rot.geodesic_distance(R1, R2)
    want = (r1.inv() * r2).magnitude()
    np.testing.assert_allclose(d.double().numpy(), want, atol=10 * TOL[dtype], rtol=0)
    torch.testing.assert_close(d, roma.rotmat_geodesic_distance(R1, R2), atol=10 * TOL[dtype], rtol=0)
    torch.testing.assert_close(d, rot.geodesic_distance(R2, R1), atol=TOL[dtype], rtol=0)


def test_geodesic_distance_small_and_pi() -> None:
    angles = torch.tensor([0.0, 1e-8, 1e-4, math.pi - 1e-7, math.pi], dtype=torch.float64)
    axis = torch.nn.functional.normalize(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), dim=0)
    R = rot.so3_exp(angles[:, None] * axis)
    d = rot.geodesic_distance(torch.eye(3, dtype=torch.float64), R)
    torch.testing.assert_close(d, angles, atol=1e-14, rtol=1e-9)
    # Gradients: finite (0) at the identity, unit-speed along the geodesic at 1e-8 rad.
    w = (angles[:2, None] * axis).clone().requires_grad_(True)
    rot.geodesic_distance(torch.eye(3, dtype=torch.float64), rot.so3_exp(w)).sum().backward()
    assert w.grad is not None
    torch.testing.assert_close(w.grad[0], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(w.grad[1], axis, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_random_rotation(device: str) -> None:
    g = torch.Generator().manual_seed(7)
    R = rot.random_rotation(20000, generator=g, dtype=torch.float64, device=device)
    assert R.shape == (20000, 3, 3) and R.dtype == torch.float64 and R.device.type == device
    eye = torch.eye(3, dtype=torch.float64, device=device)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye.expand_as(R), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(20000, dtype=torch.float64, device=device))
    # Haar measure: E[R] = 0 and E[tr(R)^2] = 1 (a uniform angle in [0, pi] would give E[tr R] = 1).
    assert R.mean(0).abs().max() < 0.03
    tr = R.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert abs(tr.mean().item()) < 0.03
    assert abs((tr**2).mean().item() - 1.0) < 0.05
    again = rot.random_rotation(
        20000, generator=torch.Generator().manual_seed(7), dtype=torch.float64, device=device
    )
    torch.testing.assert_close(R, again, rtol=0, atol=0)
    assert rot.random_rotation((2, 3)).shape == (2, 3, 3, 3)
    assert rot.random_rotation(4).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------


def _gradcheck(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    assert torch.autograd.gradcheck(fn, (x.double().clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [0.0, 1e-8, 1e-3, 0.19, 0.21, 1.0, 3.0])
def test_gradcheck_so3_exp(scale: float) -> None:
    axis = torch.nn.functional.normalize(torch.tensor([[0.3, -0.5, 0.8], [-1.0, 0.2, 0.1]]), dim=-1)
    _gradcheck(rot.so3_exp, axis * scale)


@pytest.mark.parametrize("angle", [0.0, 1e-8, 1e-3, 0.19, 0.21, 1.0, 2.5, math.pi - 0.05])
def test_gradcheck_so3_log(angle: float) -> None:
    axis = torch.nn.functional.normalize(torch.tensor([[0.3, -0.5, 0.8], [-1.0, 0.2, 0.1]]), dim=-1)
    R = Rotation.from_rotvec((axis * angle).numpy()).as_matrix()
    _gradcheck(rot.so3_log, _t(R))


def test_gradcheck_quaternion_and_6d() -> None:
    g = torch.Generator().manual_seed(8)
    _gradcheck(rot.quaternion_to_matrix, torch.randn(4, 4, generator=g, dtype=torch.float64))
    _gradcheck(rot.quaternion_to_matrix, torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1e-8, 0.0, 0.0]]))
    _gradcheck(rot.rotation_6d_to_matrix, torch.randn(4, 6, generator=g, dtype=torch.float64))
    _gradcheck(rot.matrix_to_quaternion, _t(Rotation.random(4, rng=np.random.default_rng(9)).as_matrix()))
    _gradcheck(
        rot.axis_angle_to_quaternion, torch.tensor([[0.0, 0.0, 0.0], [1e-8, 0.0, 0.0], [0.5, 1.0, -2.0]])
    )
    _gradcheck(rot.quaternion_to_axis_angle, torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.8, 0.1, -0.3, 0.2]]))


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_gradcheck_euler_to_matrix(convention: str) -> None:
    angles = torch.tensor([[0.3, -0.7, 1.2], [1e-8, -1e-8, 0.0]], dtype=torch.float64)
    _gradcheck(lambda a: rot.euler_to_matrix(a, convention), angles)


@pytest.mark.parametrize("convention", ["XYZ", "zyx", "ZXZ", "yxy"])
def test_gradcheck_matrix_to_euler(convention: str) -> None:
    R = rot.euler_to_matrix(torch.tensor([[0.3, 0.7, 1.2]], dtype=torch.float64), convention)
    _gradcheck(lambda m: rot.matrix_to_euler(m, convention), R)


def test_so3_exp_jacobian_at_zero_is_generators() -> None:
    jac = torch.autograd.functional.jacobian(rot.so3_exp, torch.zeros(3, dtype=torch.float64))
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = 1.0
        torch.testing.assert_close(jac[..., i], rot.skew(e), rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "args", "name"),
    [
        (rot.so3_exp, (torch.zeros(2, 4),), "omega"),
        (rot.so3_exp, (torch.zeros(3, dtype=torch.int64),), "omega"),
        (rot.so3_exp, ([0.0, 0.0, 0.0],), "omega"),
        (rot.so3_log, (torch.zeros(3, 4),), "R"),
        (rot.skew, (torch.zeros(2),), "w"),
        (rot.quaternion_to_matrix, (torch.zeros(3),), "q"),
        (rot.matrix_to_quaternion, (torch.eye(4),), "R"),
        (rot.quaternion_multiply, (torch.zeros(4), torch.zeros(3)), "b"),
        (rot.quaternion_to_axis_angle, (torch.zeros(2, 3),), "q"),
        (rot.axis_angle_to_quaternion, (torch.zeros(4),), "omega"),
        (rot.euler_to_matrix, (torch.zeros(4), "XYZ"), "angles"),
        (rot.matrix_to_euler, (torch.zeros(3, 2), "xyz"), "R"),
        (rot.rotation_6d_to_matrix, (torch.zeros(5),), "x"),
        (rot.matrix_to_rotation_6d, (torch.zeros(6),), "R"),
        (rot.geodesic_distance, (torch.eye(3), torch.zeros(3)), "R2"),
    ],
)
def test_bad_input_raises_input_error(fn: Callable[..., object], args: tuple, name: str) -> None:
    with pytest.raises(InputError, match=f"'{name}'") as info:
        fn(*args)
    assert "got" in str(info.value)


def test_bad_input_message_names_shape_and_dtype() -> None:
    with pytest.raises(InputError) as info:
        rot.so3_exp(torch.zeros(2, 4, dtype=torch.int32))
    msg = str(info.value)
    assert "(..., 3)" in msg and "(2, 4)" in msg and "torch.int32" in msg
    with pytest.raises(InputError, match="'n'"):
        rot.random_rotation(-1)
    with pytest.raises(InputError, match="'dtype'"):
        rot.random_rotation(2, dtype=torch.int64)
