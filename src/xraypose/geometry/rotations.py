"""Rotations in 3D: conversions between matrices, axis-angle, quaternions, Euler angles and 6D.

All functions are pure PyTorch, batched over leading ``...`` dimensions, differentiable, and work for
float32 and float64 tensors on any device. Conventions (see ``docs/conventions.md``):

- rotation matrices ``R`` are ``(..., 3, 3)`` and act on column vectors, ``p' = R p``;
- axis-angle (rotation vector) ``omega`` is ``(..., 3)``: unit axis times angle in radians;
- quaternions are ``(..., 4)`` = ``(w, x, y, z)``, scalar first; outputs are unit norm with ``w >= 0``;
- Euler angles follow SciPy's ``Rotation.from_euler`` / ``as_euler``: an upper-case convention
  (``"ZXY"``) is intrinsic, ``R = R_Z(a0) R_X(a1) R_Y(a2)``; a lower-case one (``"zxy"``) is extrinsic,
  ``R = R_y(a2) R_x(a1) R_z(a0)``; angles in radians;
- the 6D representation (Zhou et al. 2019) is the first two **columns** of ``R``, ``(r1, r2)``.

Functions with a removable singularity at angle 0 (``so3_exp``, ``so3_log`` …) switch to Taylor
expansions below a small angle, selected with a "double ``where``" so that values *and* gradients are
finite and accurate at and near 0.
"""

from __future__ import annotations

import math

import torch

from xraypose.errors import InputError

__all__ = [
    "axis_angle_to_matrix",
    "axis_angle_to_quaternion",
    "euler_to_matrix",
    "geodesic_distance",
    "matrix_to_axis_angle",
    "matrix_to_euler",
    "matrix_to_quaternion",
    "matrix_to_rotation_6d",
    "quaternion_multiply",
    "quaternion_to_axis_angle",
    "quaternion_to_matrix",
    "random_rotation",
    "rotation_6d_to_matrix",
    "skew",
    "so3_exp",
    "so3_log",
]

# --------------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------------


def _check_tensor(x: object, name: str, trailing: tuple[int, ...], func: str) -> None:
    """Raise :class:`InputError` unless ``x`` is a floating tensor of shape ``(..., *trailing)``."""
    expected = "(..., " + ", ".join(str(s) for s in trailing) + ")"
    if not isinstance(x, torch.Tensor):
        raise InputError(
            f"{func}: argument '{name}' must be a floating-point torch.Tensor of shape {expected}; "
            f"got {type(x).__name__}"
        )
    n = len(trailing)
    if x.ndim < n or tuple(x.shape[x.ndim - n :]) != trailing or not x.is_floating_point():
        raise InputError(
            f"{func}: argument '{name}' must be a floating-point tensor of shape {expected}; "
            f"got shape {tuple(x.shape)} and dtype {x.dtype}"
        )


# --------------------------------------------------------------------------------------------------
# Stable series helpers
# --------------------------------------------------------------------------------------------------

# Below this squared angle (rad^2, i.e. angle < 0.2 rad) the coefficient functions use their Taylor
# series. Six terms keep the truncation error below 1e-17 there, while above it the closed forms lose
# at most ~1e-13 (float64) / ~1e-5 (float32) relative accuracy in their derivatives to cancellation.
_SMALL_ANGLE2 = 0.04
_N_TERMS = 6

# sin(t)/t, (1 - cos t)/t^2, (t - sin t)/t^3 as power series in t^2.
_COEF_A = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(_N_TERMS))
_COEF_B = tuple((-1) ** k / math.factorial(2 * k + 2) for k in range(_N_TERMS))
_COEF_C = tuple((-1) ** k / math.factorial(2 * k + 3) for k in range(_N_TERMS))
# sin(t/2)/t as a power series in t^2.
_COEF_HALF = tuple((-1) ** k / (2 * 4**k * math.factorial(2 * k + 1)) for k in range(_N_TERMS))
# cos(t/2) as a power series in t^2.
_COEF_COS_HALF = tuple((-1) ** k / (4**k * math.factorial(2 * k)) for k in range(_N_TERMS))
# (1 - (t/2) cot(t/2)) / t^2 = sum_{n>=1} (-1)^(n+1) B_2n t^(2n-2) / (2n)!  (B_2n: Bernoulli numbers).
_COEF_D = (1 / 12, 1 / 720, 1 / 30240, 1 / 1209600, 1 / 47900160, 691 / 1307674368000)
# 2 atan(r)/r as a power series in r^2 (used with r = |v|/w <= ~0.1).
_SMALL_SIN_HALF2 = 0.01
_COEF_ATAN = tuple(2 * (-1) ** k / (2 * k + 1) for k in range(7))


def _poly(x2: torch.Tensor, coefs: tuple[float, ...]) -> torch.Tensor:
    """Evaluate ``sum_k coefs[k] * x2**k`` by Horner's rule."""
    out = torch.full_like(x2, coefs[-1])
    for c in reversed(coefs[:-1]):
        out = out * x2 + c
    return out


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` for ``x >= 0`` with a zero (not infinite/NaN) gradient at ``x == 0``; NaN stays NaN (a
    non-finite input must not read as a zero distance)."""
    keep = ~(x <= 0)  # positive or NaN
    return torch.where(keep, torch.sqrt(torch.where(keep, x, torch.ones_like(x))), torch.zeros_like(x))


def _safe_atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``atan2(y, x)`` returning 0 with a zero gradient (not NaN) at ``y == x == 0``."""
    zero = (y == 0) & (x == 0)
    return torch.where(zero, torch.zeros_like(y), torch.atan2(y, torch.where(zero, torch.ones_like(x), x)))


def _so3_coefficients(theta2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(sin t / t, (1 - cos t) / t^2, (t - sin t) / t^3)`` for ``t^2 = theta2``, stable at 0."""
    small = theta2 < _SMALL_ANGLE2
    t2 = torch.where(small, torch.ones_like(theta2), theta2)
    t = torch.sqrt(t2)
    s = torch.sin(t)
    a = torch.where(small, _poly(theta2, _COEF_A), s / t)
    b = torch.where(small, _poly(theta2, _COEF_B), 2.0 * torch.sin(0.5 * t) ** 2 / t2)
    c = torch.where(small, _poly(theta2, _COEF_C), (t - s) / (t2 * t))
    return a, b, c


def _vinv_coefficient(theta2: torch.Tensor) -> torch.Tensor:
    """Return ``(1 - (t/2) cot(t/2)) / t^2`` for ``t^2 = theta2`` (``0 <= t <= pi``), stable at 0 and pi."""
    small = theta2 < _SMALL_ANGLE2
    t2 = torch.where(small, torch.ones_like(theta2), theta2)
    half = 0.5 * torch.sqrt(t2)
    exact = (1.0 - half * torch.cos(half) / torch.sin(half)) / t2
    return torch.where(small, _poly(theta2, _COEF_D), exact)


def _eye_like(x: torch.Tensor) -> torch.Tensor:
    return torch.eye(3, dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------------------------------
# Axis-angle <-> matrix
# --------------------------------------------------------------------------------------------------


def _skew(w: torch.Tensor) -> torch.Tensor:
    x, y, z = w.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).unflatten(-1, (3, 3))


def skew(w: torch.Tensor) -> torch.Tensor:
    """Cross-product matrix ``[w]_x`` with ``skew(w) @ v == cross(w, v)``.

    Args:
        w: ``(..., 3)`` vectors.

    Returns:
        ``(..., 3, 3)`` skew-symmetric matrices.
    """
    _check_tensor(w, "w", (3,), "skew")
    return _skew(w)


def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    """Exponential map of SO(3): axis-angle vector to rotation matrix (Rodrigues' formula).

    ``R = I + (sin t / t) K + ((1 - cos t) / t^2) K^2`` with ``K = [omega]_x``, ``t = |omega|``; Taylor
    series below 0.2 rad keep values and gradients exact at and near ``omega = 0``.

    Args:
        omega: ``(..., 3)`` rotation vectors (unit axis times angle, radians).

    Returns:
        ``(..., 3, 3)`` rotation matrices.
    """
    _check_tensor(omega, "omega", (3,), "so3_exp")
    theta2 = (omega * omega).sum(-1)
    a, b, _ = _so3_coefficients(theta2)
    k = _skew(omega)
    return _eye_like(omega) + a[..., None, None] * k + b[..., None, None] * (k @ k)


def _matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Unchecked core of :func:`matrix_to_quaternion`."""
    m00, m01, m02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    m10, m11, m12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    m20, m21, m22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    # 4 q_i^2 for i = w, x, y, z (exact for rotation matrices); they always sum to 4, so the largest is >= 1.
    sq = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    )
    # Row i holds 4 q_i * q: divide the best-conditioned row (largest |q_i|) by 4 |q_i| = 2 sqrt(sq_i).
    candidates = torch.stack(
        [
            torch.stack([sq[..., 0], m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, sq[..., 1], m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, sq[..., 2], m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, sq[..., 3]], dim=-1),
        ],
        dim=-2,
    )
    best = sq.argmax(dim=-1, keepdim=True)
    row = torch.take_along_dim(candidates, best[..., None], dim=-2).squeeze(-2)
    denom = 2.0 * torch.sqrt(torch.take_along_dim(sq, best, dim=-1))
    q = torch.nn.functional.normalize(row / denom, dim=-1)
    return _standardize(q)


def _standardize(q: torch.Tensor) -> torch.Tensor:
    """Flip quaternions to ``w >= 0`` (``q`` and ``-q`` are the same rotation)."""
    return torch.where(q[..., :1] < 0, -q, q)


def _unit_quaternion_to_axis_angle(q: torch.Tensor) -> torch.Tensor:
    """Axis-angle of a unit quaternion with ``w >= 0``: ``2 atan2(|v|, w) v / |v|``, stable at 0 and pi."""
    w, v = q[..., 0], q[..., 1:]
    n2 = (v * v).sum(-1)
    small = n2 < _SMALL_SIN_HALF2
    n = torch.sqrt(torch.where(small, torch.ones_like(n2), n2))
    exact = 2.0 * torch.atan2(n, w) / n
    w_safe = torch.where(small, w, torch.ones_like(w))
    series = _poly(n2 / (w_safe * w_safe), _COEF_ATAN) / w_safe
    return torch.where(small, series, exact)[..., None] * v


def so3_log(R: torch.Tensor) -> torch.Tensor:
    """Logarithm map of SO(3): rotation matrix to axis-angle vector with angle in ``[0, pi]``.

    Goes through the quaternion (robust branch selection) and ``angle = 2 atan2(|v|, w)``, so it is
    accurate near 0 and near pi. At exactly pi the sign of the axis is arbitrary (both are valid).

    Args:
        R: ``(..., 3, 3)`` rotation matrices.

    Returns:
        ``(..., 3)`` rotation vectors (radians).
    """
    _check_tensor(R, "R", (3, 3), "so3_log")
    return _unit_quaternion_to_axis_angle(_matrix_to_quaternion(R))


axis_angle_to_matrix = so3_exp
matrix_to_axis_angle = so3_log


# --------------------------------------------------------------------------------------------------
# Quaternions
# --------------------------------------------------------------------------------------------------


def _quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    q = torch.nn.functional.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz = x * y, x * z, y * z
    wx, wy, wz = w * x, w * y, w * z
    return torch.stack(
        [
            1 - 2 * (yy + zz),
            2 * (xy - wz),
            2 * (xz + wy),
            2 * (xy + wz),
            1 - 2 * (xx + zz),
            2 * (yz - wx),
            2 * (xz - wy),
            2 * (yz + wx),
            1 - 2 * (xx + yy),
        ],
        dim=-1,
    ).unflatten(-1, (3, 3))


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Quaternion ``(w, x, y, z)`` to rotation matrix; the input is normalised first.

    Args:
        q: ``(..., 4)`` quaternions, scalar first, any non-zero norm.

    Returns:
        ``(..., 3, 3)`` rotation matrices.
    """
    _check_tensor(q, "q", (4,), "quaternion_to_matrix")
    return _quaternion_to_matrix(q)


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrix to unit quaternion ``(w, x, y, z)`` with ``w >= 0``.

    Picks, per matrix, the best-conditioned of the four classic formulas (largest ``|q_i|``), so it is
    accurate for every rotation, including angles near pi.

    Args:
        R: ``(..., 3, 3)`` rotation matrices.

    Returns:
        ``(..., 4)`` unit quaternions, scalar first, ``w >= 0``.
    """
    _check_tensor(R, "R", (3, 3), "matrix_to_quaternion")
    return _matrix_to_quaternion(R)


def quaternion_multiply(a: torch.Tensor, b: torch.Tensor, *, canonical: bool = True) -> torch.Tensor:
    """Hamilton product ``a * b`` (the rotation of ``b`` followed by that of ``a``).

    ``quaternion_to_matrix(quaternion_multiply(a, b)) == quaternion_to_matrix(a) @ quaternion_to_matrix(b)``.

    Args:
        a: ``(..., 4)`` quaternions ``(w, x, y, z)``.
        b: ``(..., 4)`` quaternions, broadcastable against ``a``.
        canonical: flip the result to ``w >= 0`` (the same rotation); ``False`` returns the raw product.

    Returns:
        ``(..., 4)`` quaternions.
    """
    _check_tensor(a, "a", (4,), "quaternion_multiply")
    _check_tensor(b, "b", (4,), "quaternion_multiply")
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    out = torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )
    return _standardize(out) if canonical else out


def quaternion_to_axis_angle(q: torch.Tensor) -> torch.Tensor:
    """Quaternion ``(w, x, y, z)`` (normalised first) to axis-angle with angle in ``[0, pi]``.

    Args:
        q: ``(..., 4)`` quaternions, scalar first.

    Returns:
        ``(..., 3)`` rotation vectors (radians).
    """
    _check_tensor(q, "q", (4,), "quaternion_to_axis_angle")
    q = _standardize(torch.nn.functional.normalize(q, dim=-1))
    return _unit_quaternion_to_axis_angle(q)


def axis_angle_to_quaternion(omega: torch.Tensor) -> torch.Tensor:
    """Axis-angle to unit quaternion ``(cos(t/2), sin(t/2) omega / t)``, flipped to ``w >= 0``.

    Args:
        omega: ``(..., 3)`` rotation vectors (radians).

    Returns:
        ``(..., 4)`` unit quaternions, scalar first, ``w >= 0``.
    """
    _check_tensor(omega, "omega", (3,), "axis_angle_to_quaternion")
    theta2 = (omega * omega).sum(-1)
    small = theta2 < _SMALL_ANGLE2
    t = torch.sqrt(torch.where(small, torch.ones_like(theta2), theta2))
    factor = torch.where(small, _poly(theta2, _COEF_HALF), torch.sin(0.5 * t) / t)
    w = torch.where(small, _poly(theta2, _COEF_COS_HALF), torch.cos(0.5 * t))
    q = torch.cat([w[..., None], factor[..., None] * omega], dim=-1)
    return _standardize(q)


# --------------------------------------------------------------------------------------------------
# Euler angles
# --------------------------------------------------------------------------------------------------

_AXIS_INDEX = {"x": 0, "y": 1, "z": 2}


def _parse_convention(convention: object, func: str) -> tuple[list[int], bool]:
    """Return ``(axes, intrinsic)`` for a SciPy-style convention string; raise InputError otherwise."""
    valid = (
        isinstance(convention, str)
        and len(convention) == 3
        and (set(convention) <= set("XYZ") or set(convention) <= set("xyz"))
        and convention[0] != convention[1]
        and convention[1] != convention[2]
    )
    if not valid:
        raise InputError(
            f"{func}: argument 'convention' must be one of the 12 Euler sequences, upper-case for intrinsic "
            f"or lower-case for extrinsic (e.g. 'ZYX', 'zyx', 'ZXZ'); got {convention!r}"
        )
    assert isinstance(convention, str)
    return [_AXIS_INDEX[c] for c in convention.lower()], convention.isupper()


def _elementary_rotation(axis: int, angle: torch.Tensor) -> torch.Tensor:
    """Right-handed rotation by ``angle`` (rad) about basis axis ``axis``; ``(...)`` -> ``(..., 3, 3)``."""
    c, s = torch.cos(angle), torch.sin(angle)
    o, one = torch.zeros_like(angle), torch.ones_like(angle)
    if axis == 0:
        entries = [one, o, o, o, c, -s, o, s, c]
    elif axis == 1:
        entries = [c, o, s, o, one, o, -s, o, c]
    else:
        entries = [c, -s, o, s, c, o, o, o, one]
    return torch.stack(entries, dim=-1).unflatten(-1, (3, 3))


def euler_to_matrix(angles: torch.Tensor, convention: str) -> torch.Tensor:
    """Euler angles to rotation matrix, exactly as SciPy's ``Rotation.from_euler(convention, angles)``.

    Upper-case conventions are intrinsic (``"XYZ"``: ``R = R_X(a0) R_Y(a1) R_Z(a2)``), lower-case ones are
    extrinsic (``"xyz"``: ``R = R_z(a2) R_y(a1) R_x(a0)``). All 6 Tait-Bryan (``XYZ XZY YXZ YZX ZXY ZYX``)
    and 6 proper Euler (``XYX XZX YXY YZY ZXZ ZYZ``) sequences are accepted in both cases.

    Args:
        angles: ``(..., 3)`` angles in radians, in the order of ``convention``.
        convention: three-letter axis sequence.

    Returns:
        ``(..., 3, 3)`` rotation matrices.
    """
    axes, intrinsic = _parse_convention(convention, "euler_to_matrix")
    _check_tensor(angles, "angles", (3,), "euler_to_matrix")
    r0, r1, r2 = (_elementary_rotation(ax, angles[..., i]) for i, ax in enumerate(axes))
    return r0 @ r1 @ r2 if intrinsic else r2 @ r1 @ r0


def matrix_to_euler(R: torch.Tensor, convention: str) -> torch.Tensor:
    """Rotation matrix to Euler angles, matching SciPy's ``Rotation.as_euler(convention)``.

    Uses the quaternion-based method of Bernardes & Viollet (2022), as SciPy does. Ranges: first and
    third angle in ``[-pi, pi]``; second angle in ``[-pi/2, pi/2]`` (Tait-Bryan) or ``[0, pi]`` (proper
    Euler). In gimbal lock (second angle within 1e-7 rad of its limits) the third angle is set to 0, as
    in SciPy (without the warning). Gradients are finite everywhere but meaningless in gimbal lock.

    Args:
        R: ``(..., 3, 3)`` rotation matrices.
        convention: three-letter axis sequence (see :func:`euler_to_matrix`).

    Returns:
        ``(..., 3)`` angles in radians.
    """
    axes, intrinsic = _parse_convention(convention, "matrix_to_euler")
    _check_tensor(R, "R", (3, 3), "matrix_to_euler")
    quat = _matrix_to_quaternion(R)
    extrinsic = not intrinsic
    i, j, k = axes if extrinsic else axes[::-1]
    symmetric = i == k
    if symmetric:
        k = 3 - i - j
    sign = float((i - j) * (j - k) * (k - i) // 2)
    qw, qi, qj, qk = quat[..., 0], quat[..., i + 1], quat[..., j + 1], quat[..., k + 1]
    if symmetric:
        a, b, c, d = qw, qi, qj, qk * sign
    else:
        a, b, c, d = qw - qj, qi + qk * sign, qj + qw, qk * sign - qi

    half_sum = _safe_atan2(b, a)
    half_diff = _safe_atan2(d, c)
    theta1 = 2.0 * torch.atan2(_safe_sqrt(c * c + d * d), _safe_sqrt(a * a + b * b))
    eps = 1e-7
    case1 = theta1.abs() <= eps
    case2 = (theta1 - math.pi).abs() <= eps
    case0 = ~(case1 | case2)
    zero = torch.zeros_like(theta1)
    # Same case analysis as SciPy: in gimbal lock the angle that SciPy calls "third" is set to 0.
    degenerate = torch.where(case1, 2.0 * half_sum, 2.0 * half_diff * (-1.0 if extrinsic else 1.0))
    first = torch.where(case0, half_sum - half_diff, degenerate if extrinsic else zero)
    third = torch.where(case0, half_sum + half_diff, zero if extrinsic else degenerate)
    if not symmetric:
        third = third * sign
        theta1 = theta1 - 0.5 * math.pi
    out = torch.stack([first, theta1, third] if extrinsic else [third, theta1, first], dim=-1)
    # Wrap to [-pi, pi].
    out = torch.where(out < -math.pi, out + 2 * math.pi, out)
    return torch.where(out > math.pi, out - 2 * math.pi, out)


# --------------------------------------------------------------------------------------------------
# 6D representation
# --------------------------------------------------------------------------------------------------


def rotation_6d_to_matrix(x: torch.Tensor) -> torch.Tensor:
    """6D representation to rotation matrix by Gram-Schmidt (Zhou et al. 2019).

    ``x = (a1, a2)`` are two 3-vectors; ``b1 = a1 / |a1|``, ``b2`` = normalised part of ``a2`` orthogonal
    to ``b1``, ``b3 = b1 x b2``; ``R = [b1 b2 b3]`` (columns).

    Args:
        x: ``(..., 6)``; the two vectors must be non-zero and not parallel.

    Returns:
        ``(..., 3, 3)`` rotation matrices whose first two columns span the same plane as ``a1, a2``.
    """
    _check_tensor(x, "x", (6,), "rotation_6d_to_matrix")
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def matrix_to_rotation_6d(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrix to 6D representation: its first two columns concatenated, ``(r1, r2)``.

    Args:
        R: ``(..., 3, 3)`` rotation matrices.

    Returns:
        ``(..., 6)``.
    """
    _check_tensor(R, "R", (3, 3), "matrix_to_rotation_6d")
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)


# --------------------------------------------------------------------------------------------------
# Distances and sampling
# --------------------------------------------------------------------------------------------------


def geodesic_distance(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Geodesic distance on SO(3): the angle of ``R1^T R2``, in radians, in ``[0, pi]``.

    Computed as ``atan2(|vee(M - M^T)| / 2, (tr M - 1) / 2)`` with ``M = R1^T R2``, which is accurate
    near 0 and pi (unlike ``acos`` of a clamped trace). The gradient is finite everywhere; at
    ``R1 == R2`` it is 0 (a subgradient of the non-smooth distance).

    Args:
        R1: ``(..., 3, 3)`` rotation matrices.
        R2: ``(..., 3, 3)`` rotation matrices, broadcastable against ``R1``.

    Returns:
        ``(...)`` angles in radians.
    """
    _check_tensor(R1, "R1", (3, 3), "geodesic_distance")
    _check_tensor(R2, "R2", (3, 3), "geodesic_distance")
    m = R1.transpose(-1, -2) @ R2
    cos = 0.5 * (m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2] - 1.0)
    a = torch.stack(
        [m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1
    )
    sin = 0.5 * _safe_sqrt((a * a).sum(-1))
    return torch.atan2(sin, cos)


def random_rotation(
    n: int | tuple[int, ...],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Haar-uniform random rotation matrices (normalised Gaussian quaternions).

    Args:
        n: number of rotations, or a batch shape.
        generator: optional ``torch.Generator`` for reproducibility; samples are drawn on its device and
            then moved to ``device``.
        dtype: floating dtype of the output.
        device: output device (default: the generator's device, else the default device).

    Returns:
        ``(n, 3, 3)`` (or ``(*n, 3, 3)``) rotation matrices.
    """
    shape = (n,) if isinstance(n, int) else tuple(n)
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise InputError(
            f"random_rotation: argument 'n' must be a non-negative int or tuple of ints; got {n!r}"
        )
    if not dtype.is_floating_point:
        raise InputError(f"random_rotation: argument 'dtype' must be a floating dtype; got {dtype}")
    sample_device = generator.device if generator is not None else device
    q = torch.randn((*shape, 4), generator=generator, dtype=dtype, device=sample_device)
    if device is not None:
        q = q.to(device)
    return _quaternion_to_matrix(q)
