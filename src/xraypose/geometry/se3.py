"""Rigid transforms SE(3) as ``(..., 4, 4)`` homogeneous matrices.

Conventions (see ``docs/conventions.md``): ``T = [[R, t], [0, 1]]`` acts on column vectors,
``p' = R p + t``, translations in millimetres; ``compose(A, B) = A @ B`` (apply ``B`` first); a twist is
``xi = (v, omega)`` with the translation part first (mm) and the rotation part second (rad), and
``se3_exp(xi) = [[so3_exp(omega), V(omega) v], [0, 1]]``.

All functions are batched over leading ``...`` dimensions (broadcast where two inputs meet),
differentiable, and work for float32/float64 on any device.

Input checking: every public function checks shapes and dtypes (free, no device synchronisation).
The value checks of :func:`validate_transform` (finite entries, last row ``[0, 0, 0, 1]``) read data back
from the device, so only :func:`se3_log`, :func:`adjoint` and :func:`split_transform` run them; call
:func:`validate_transform` yourself where transforms enter the program (files, user arguments).
"""

from __future__ import annotations

import functools
import math

import torch

from xraypose.errors import InputError
from xraypose.geometry.rotations import (
    _check_tensor,
    _safe_sqrt,
    _skew,
    _so3_coefficients,
    _vinv_coefficient,
    geodesic_distance,
    so3_log,
)

__all__ = [
    "adjoint",
    "compose",
    "double_geodesic_distance",
    "invert",
    "is_rigid",
    "make_transform",
    "rotation_distance",
    "se3_exp",
    "se3_log",
    "split_transform",
    "transform_points",
    "transform_vectors",
    "translation_distance",
    "validate_transform",
]


def _check_transform(T: object, name: str, func: str) -> None:
    """Shape/dtype check of a ``(..., 4, 4)`` transform (no device synchronisation)."""
    _check_tensor(T, name, (4, 4), func)


def _homogeneous_row(like: torch.Tensor) -> torch.Tensor:
    """``[0, 0, 0, 1]`` with the dtype and device of ``like``, made on the device (no host copy)."""
    row = like.new_zeros(4)
    row[3] = 1.0
    return row


def validate_transform(T: torch.Tensor, name: str = "T", *, atol: float = 1e-6) -> None:
    """Raise :class:`InputError` unless ``T`` is a usable ``(..., 4, 4)`` homogeneous transform.

    Checks: a floating-point tensor of shape ``(..., 4, 4)``, all entries finite, and last row
    ``[0, 0, 0, 1]`` within ``atol``. Rigidity of the rotation block is *not* checked (see
    :func:`is_rigid`). The value checks synchronise with the device.

    Args:
        T: the transform(s) to check.
        name: the argument name used in the error message.
        atol: absolute tolerance on the last row.
    """
    _validate_transform(T, name, "validate_transform", atol)


def _validate_transform(T: object, name: str, func: str, atol: float = 1e-6) -> None:
    _check_transform(T, name, func)
    assert isinstance(T, torch.Tensor)
    if not bool(torch.isfinite(T).all()):
        raise InputError(
            f"{func}: argument '{name}' must have finite entries; got NaN or inf in a tensor of shape "
            f"{tuple(T.shape)}"
        )
    last = _homogeneous_row(T)
    off = ((T[..., 3, :] - last).abs() > atol).any(-1)
    if bool(off.any()):
        bad = T[..., 3, :][off][0].tolist()
        raise InputError(
            f"{func}: argument '{name}' must be a homogeneous transform (..., 4, 4) with last row "
            f"[0, 0, 0, 1]; got last row {bad}"
        )


def make_transform(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Assemble ``T = [[R, t], [0, 1]]``.

    Args:
        R: ``(..., 3, 3)`` rotation matrices.
        t: ``(..., 3)`` translations (mm); batch dimensions broadcast against ``R``'s.

    Returns:
        ``(..., 4, 4)`` transforms.
    """
    _check_tensor(R, "R", (3, 3), "make_transform")
    _check_tensor(t, "t", (3,), "make_transform")
    if R.dtype != t.dtype:
        raise InputError(
            f"make_transform: arguments 'R' and 't' must have the same dtype; got {R.dtype} and {t.dtype}"
        )
    try:
        batch = torch.broadcast_shapes(R.shape[:-2], t.shape[:-1])
    except RuntimeError as err:
        raise InputError(
            f"make_transform: batch shapes of 'R' (..., 3, 3) and 't' (..., 3) must broadcast; "
            f"got shapes {tuple(R.shape)} and {tuple(t.shape)}"
        ) from err
    top = torch.cat([R.expand(*batch, 3, 3), t.expand(*batch, 3)[..., None]], dim=-1)
    bottom = _homogeneous_row(R).expand(*batch, 1, 4)
    return torch.cat([top, bottom], dim=-2)


def split_transform(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``T`` into its rotation ``(..., 3, 3)`` and translation ``(..., 3)`` (views of ``T``).

    Args:
        T: ``(..., 4, 4)`` transforms (validated with :func:`validate_transform`).

    Returns:
        ``(R, t)``.
    """
    _validate_transform(T, "T", "split_transform")
    return T[..., :3, :3], T[..., :3, 3]


def se3_exp(xi: torch.Tensor) -> torch.Tensor:
    """Exponential map of SE(3): twist ``xi = (v, omega)`` to transform.

    ``T = [[exp(omega^), V t], [0, 1]]`` with ``V = I + ((1 - cos a)/a^2) K + ((a - sin a)/a^3) K^2``,
    ``K = omega^``, ``a = |omega|``; Taylor series near ``a = 0`` keep values and gradients exact there.

    Args:
        xi: ``(..., 6)`` twists, translation part ``v`` (mm) first, rotation part ``omega`` (rad) second.

    Returns:
        ``(..., 4, 4)`` rigid transforms.
    """
    _check_tensor(xi, "xi", (6,), "se3_exp")
    v, omega = xi[..., :3], xi[..., 3:]
    theta2 = (omega * omega).sum(-1)
    a, b, c = (x[..., None, None] for x in _so3_coefficients(theta2))
    k = _skew(omega)
    k2 = k @ k
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device)
    R = eye + a * k + b * k2
    V = eye + b * k + c * k2
    return make_transform(R, (V @ v[..., None])[..., 0])


def se3_log(T: torch.Tensor) -> torch.Tensor:
    """Logarithm map of SE(3): transform to twist ``(v, omega)`` with ``|omega| <= pi``.

    ``omega = so3_log(R)``, ``v = V^-1 t`` with ``V^-1 = I - K/2 + ((1 - (a/2) cot(a/2)) / a^2) K^2``,
    stable near ``a = 0`` (Taylor series) and up to ``a = pi``.

    Args:
        T: ``(..., 4, 4)`` rigid transforms.

    Returns:
        ``(..., 6)`` twists ``(v [mm], omega [rad])``.
    """
    _validate_transform(T, "T", "se3_log")
    R, t = T[..., :3, :3], T[..., :3, 3]
    omega = so3_log(R)
    d = _vinv_coefficient((omega * omega).sum(-1))[..., None, None]
    k = _skew(omega)
    eye = torch.eye(3, dtype=T.dtype, device=T.device)
    v_inv = eye - 0.5 * k + d * (k @ k)
    return torch.cat([(v_inv @ t[..., None])[..., 0], omega], dim=-1)


def compose(*Ts: torch.Tensor) -> torch.Tensor:
    """Compose transforms left to right as matrix products: ``compose(A, B, C) = A @ B @ C``.

    ``compose(A, B)`` applies ``B`` first, then ``A``. Batch dimensions broadcast.

    Args:
        *Ts: one or more ``(..., 4, 4)`` transforms.

    Returns:
        ``(..., 4, 4)`` product.
    """
    if not Ts:
        raise InputError("compose: needs at least one transform argument 'Ts'; got none")
    for i, T in enumerate(Ts):
        _check_transform(T, f"Ts[{i}]", "compose")
    try:
        return functools.reduce(torch.matmul, Ts)
    except RuntimeError as err:
        raise InputError(
            "compose: arguments 'Ts' must have broadcastable batch shapes and one dtype; got "
            + ", ".join(f"{tuple(T.shape)} {T.dtype}" for T in Ts)
        ) from err


def invert(T: torch.Tensor) -> torch.Tensor:
    """Inverse of a rigid transform in closed form: ``[[R^T, -R^T t], [0, 1]]``.

    Only valid for rigid ``T`` (orthonormal ``R``); that is not checked.

    Args:
        T: ``(..., 4, 4)`` rigid transforms.

    Returns:
        ``(..., 4, 4)`` inverses.
    """
    _check_transform(T, "T", "invert")
    rt = T[..., :3, :3].transpose(-1, -2)
    return make_transform(rt, -(rt @ T[..., :3, 3:])[..., 0])


def _check_points(x: object, name: str, func: str, T: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[-1] != 3 or not x.is_floating_point():
        got = (
            f"shape {tuple(x.shape)} and dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        )
        raise InputError(
            f"{func}: argument '{name}' must be a floating-point tensor of shape (..., N, 3); got {got}"
        )
    if x.dtype != T.dtype:
        raise InputError(f"{func}: argument '{name}' must have the dtype of 'T' ({T.dtype}); got {x.dtype}")


def transform_points(T: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply ``T`` to points: ``p' = R p + t``.

    Args:
        T: ``(..., 4, 4)`` transforms.
        points: ``(..., N, 3)`` points (mm); batch dimensions broadcast against ``T``'s.

    Returns:
        ``(..., N, 3)`` transformed points.
    """
    _check_transform(T, "T", "transform_points")
    _check_points(points, "points", "transform_points", T)
    try:
        return points @ T[..., :3, :3].transpose(-1, -2) + T[..., None, :3, 3]
    except RuntimeError as err:
        raise InputError(
            "transform_points: batch shapes of 'T' (..., 4, 4) and 'points' (..., N, 3) must broadcast; "
            f"got {tuple(T.shape)} and {tuple(points.shape)}"
        ) from err


def transform_vectors(T: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Apply the rotation of ``T`` to direction vectors: ``d' = R d`` (translation ignored).

    Args:
        T: ``(..., 4, 4)`` transforms.
        vectors: ``(..., N, 3)`` vectors; batch dimensions broadcast against ``T``'s.

    Returns:
        ``(..., N, 3)`` rotated vectors.
    """
    _check_transform(T, "T", "transform_vectors")
    _check_points(vectors, "vectors", "transform_vectors", T)
    try:
        return vectors @ T[..., :3, :3].transpose(-1, -2)
    except RuntimeError as err:
        raise InputError(
            "transform_vectors: batch shapes of 'T' (..., 4, 4) and 'vectors' (..., N, 3) must broadcast; "
            f"got {tuple(T.shape)} and {tuple(vectors.shape)}"
        ) from err


def is_rigid(T: torch.Tensor, atol: float = 1e-5) -> torch.Tensor:
    """Whether each ``T`` is a proper rigid transform within ``atol``.

    True where all entries are finite, the last row is ``[0, 0, 0, 1]``, ``R^T R = I`` and ``det R = 1``
    (each within ``atol``).

    Args:
        T: ``(..., 4, 4)`` matrices.
        atol: absolute tolerance.

    Returns:
        ``(...)`` boolean tensor.
    """
    _check_transform(T, "T", "is_rigid")
    R = T[..., :3, :3]
    eye = torch.eye(3, dtype=T.dtype, device=T.device)
    last = _homogeneous_row(T)
    finite = torch.isfinite(T).flatten(-2).all(-1)
    ortho = ((R.transpose(-1, -2) @ R - eye).abs() <= atol).flatten(-2).all(-1)
    det = (torch.linalg.det(R) - 1).abs() <= atol
    row = ((T[..., 3, :] - last).abs() <= atol).all(-1)
    return finite & ortho & det & row


def adjoint(T: torch.Tensor) -> torch.Tensor:
    """Adjoint matrix of ``T`` for twists ordered ``(v, omega)``: ``[[R, [t]_x R], [0, R]]``.

    Satisfies ``T @ se3_exp(xi) @ invert(T) == se3_exp(adjoint(T) @ xi)``.

    Args:
        T: ``(..., 4, 4)`` rigid transforms.

    Returns:
        ``(..., 6, 6)`` adjoint matrices.
    """
    _validate_transform(T, "T", "adjoint")
    R, t = T[..., :3, :3], T[..., :3, 3]
    top = torch.cat([R, _skew(t) @ R], dim=-1)
    bottom = torch.cat([torch.zeros_like(R), R], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def translation_distance(T1: torch.Tensor, T2: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between the translations of ``T1`` and ``T2`` (mm), ``|t1 - t2|``.

    For camera-to-world C-arm poses this is the distance between the two X-ray source positions.
    The gradient is 0 (not NaN) where ``t1 == t2``.

    Args:
        T1: ``(..., 4, 4)`` transforms.
        T2: ``(..., 4, 4)`` transforms, broadcastable against ``T1``.

    Returns:
        ``(...)`` distances in mm.
    """
    _check_transform(T1, "T1", "translation_distance")
    _check_transform(T2, "T2", "translation_distance")
    d = T1[..., :3, 3] - T2[..., :3, 3]
    return _safe_sqrt((d * d).sum(-1))


def rotation_distance(T1: torch.Tensor, T2: torch.Tensor, *, degrees: bool = False) -> torch.Tensor:
    """Geodesic angle between the rotations of ``T1`` and ``T2`` (angle of ``R1^T R2``).

    Args:
        T1: ``(..., 4, 4)`` transforms.
        T2: ``(..., 4, 4)`` transforms, broadcastable against ``T1``.
        degrees: return degrees instead of radians.

    Returns:
        ``(...)`` angles in ``[0, pi]`` rad (or ``[0, 180]`` deg).
    """
    _check_transform(T1, "T1", "rotation_distance")
    _check_transform(T2, "T2", "rotation_distance")
    angle = geodesic_distance(T1[..., :3, :3], T2[..., :3, :3])
    return torch.rad2deg(angle) if degrees else angle


def double_geodesic_distance(T1: torch.Tensor, T2: torch.Tensor, *, radius: float) -> torch.Tensor:
    """Double geodesic distance of DiffPose (Gopalakrishnan et al., CVPR 2024), in mm.

    ``d = sqrt((radius * d_rot)^2 + d_trans^2)`` where ``d_rot`` is the geodesic angle between the
    rotations (rad, :func:`rotation_distance`) and ``d_trans = |t1 - t2|`` the distance between the
    translations (mm, :func:`translation_distance`). The angle is turned into a length by the
    characteristic radius: an arc of angle ``d_rot`` on a sphere of radius ``radius``. DiffPose uses the
    source-to-detector radius (half the source-to-detector distance, e.g. ~510 mm for ``sdd = 1020``).
    The gradient is 0 (not NaN) where the poses coincide.

    Args:
        T1: ``(..., 4, 4)`` transforms.
        T2: ``(..., 4, 4)`` transforms, broadcastable against ``T1``.
        radius: characteristic radius in mm, positive and finite.

    Returns:
        ``(...)`` distances in mm.
    """
    if (
        isinstance(radius, bool)
        or not isinstance(radius, (int, float))
        or not math.isfinite(radius)
        or radius <= 0
    ):
        raise InputError(
            "double_geodesic_distance: argument 'radius' must be a positive finite number (mm); "
            f"got {radius!r}"
        )
    _check_transform(T1, "T1", "double_geodesic_distance")
    _check_transform(T2, "T2", "double_geodesic_distance")
    d_rot = radius * rotation_distance(T1, T2)
    d = T1[..., :3, 3] - T2[..., :3, 3]
    return _safe_sqrt(d_rot * d_rot + (d * d).sum(-1))
