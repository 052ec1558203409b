"""Evaluation metrics of 2D/3D registration, defined from first principles (see ``docs/metrics.md``).

Frames and units follow ``docs/conventions.md``: the world is the CT's RAS frame in mm, a pose is
``T_world_from_camera`` (camera-to-world), the camera's +z is the principal ray and the detector plane is
``z = sdd``. Every metric compares an estimated pose with the true pose of the same X-ray image:

- :func:`mtre` — mean target registration error (mm, 3D), the error of where the CT's anatomy is placed
  relative to the C-arm;
- :func:`mpd`, :func:`mrpe` — mean projection distance on the detector (mm of the detector; pixels), never
  rescaled; :func:`mpd_isocenter` — the same scaled to the isocentre plane (clearly named);
- :func:`rotation_error_deg`, :func:`translation_error_mm` and their per-axis variants;
- :func:`double_geodesic_error` — DiffPose's double geodesic distance (mm);
- :func:`success_rate`, :class:`CaseResult`, :func:`summarize`, :func:`summary_markdown` — aggregation of
  per-case results for benchmark tables.

Pose tensors are ``(B, 4, 4)`` or ``(4, 4)`` (promoted to ``B = 1``); an estimated and a true batch broadcast
(``B`` against ``1``). Landmarks are world points in mm, ``(L, 3)`` shared by the batch or ``(B, L, 3)``.
:func:`mtre`, :func:`mpd`, :func:`mrpe` and the pose distances are differentiable, with finite (zero)
gradients where the poses coincide. A pose with a non-finite entry (a diverged optimiser) gives NaN errors,
never 0, and NaN fails every success threshold.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch

from .errors import InputError
from .geometry.camera import Camera, Intrinsics
from .geometry.rotations import _safe_sqrt, matrix_to_euler, so3_log
from .geometry.se3 import (
    double_geodesic_distance,
    invert,
    rotation_distance,
    transform_points,
    translation_distance,
)

__all__ = [
    "DEFAULT_THRESHOLDS_MM",
    "CaseResult",
    "PoseErrors",
    "Stats",
    "SuccessRate",
    "Summary",
    "double_geodesic_error",
    "image_metrics",
    "mpd",
    "mpd_isocenter",
    "mrpe",
    "mtre",
    "pose_errors",
    "rotation_error_deg",
    "rotation_error_per_axis_deg",
    "success_rate",
    "summarize",
    "summarize_by",
    "summary_markdown",
    "translation_error_mm",
    "translation_error_per_axis_mm",
]

#: Default mTRE thresholds (mm) of success rates.
DEFAULT_THRESHOLDS_MM: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)

Frame = Literal["camera", "world"]


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _pose_batch(pose: object, name: str, func: str) -> torch.Tensor:
    """Shape/dtype check of a pose (no device synchronisation); returns ``(B, 4, 4)``."""
    if not isinstance(pose, torch.Tensor) or not pose.is_floating_point():
        got = f"dtype {pose.dtype}" if isinstance(pose, torch.Tensor) else type(pose).__name__
        raise InputError(f"{func}: '{name}' must be a float32/float64 tensor of shape (B, 4, 4); got {got}")
    if pose.ndim == 2:
        pose = pose.unsqueeze(0)
    if pose.ndim != 3 or pose.shape[-2:] != (4, 4):
        raise InputError(f"{func}: '{name}' must have shape (B, 4, 4) or (4, 4); got {tuple(pose.shape)}")
    return pose


def _pose_pair(pose_est: object, pose_true: object, func: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check two pose batches: broadcastable batch sizes, one device; promoted to a common dtype."""
    est = _pose_batch(pose_est, "pose_est", func)
    true = _pose_batch(pose_true, "pose_true", func)
    if est.shape[0] != true.shape[0] and 1 not in (est.shape[0], true.shape[0]):
        raise InputError(
            f"{func}: batch sizes of 'pose_est' ({est.shape[0]}) and 'pose_true' ({true.shape[0]}) must be "
            "equal or one of them 1"
        )
    if est.device != true.device:
        raise InputError(f"{func}: 'pose_est' is on {est.device} but 'pose_true' on {true.device}")
    dtype = torch.promote_types(est.dtype, true.dtype)
    return est.to(dtype), true.to(dtype)


def _landmark_batch(landmarks: object, batch: int, like: torch.Tensor, func: str) -> torch.Tensor:
    """Check landmarks ``(L, 3)`` or ``(B, L, 3)`` (world mm); returns ``(B or 1, L, 3)`` in ``like``'s dtype."""
    if isinstance(landmarks, np.ndarray):
        landmarks = torch.as_tensor(landmarks)
    if not isinstance(landmarks, torch.Tensor) or not landmarks.is_floating_point():
        got = f"dtype {landmarks.dtype}" if isinstance(landmarks, torch.Tensor) else type(landmarks).__name__
        raise InputError(
            f"{func}: 'landmarks' must be a floating tensor of shape (L, 3) or (B, L, 3); got {got}"
        )
    if landmarks.ndim == 2:
        landmarks = landmarks.unsqueeze(0)
    if landmarks.ndim != 3 or landmarks.shape[-1] != 3 or landmarks.shape[1] < 1:
        raise InputError(
            f"{func}: 'landmarks' must have shape (L, 3) or (B, L, 3) with L >= 1; got {tuple(landmarks.shape)}"
        )
    if landmarks.shape[0] not in (1, batch):
        raise InputError(
            f"{func}: 'landmarks' has batch size {landmarks.shape[0]}, the poses {batch} (expected 1 or {batch})"
        )
    return landmarks.to(device=like.device, dtype=like.dtype)


def _norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last dimension with a zero (not NaN) gradient at 0; NaN stays NaN."""
    return _safe_sqrt((x * x).sum(-1))


def _nan_if_nonfinite(value: torch.Tensor, est: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """NaN where either pose has a non-finite entry (an inf pose can otherwise give a finite distance)."""
    bad = ~(torch.isfinite(est).flatten(-2).all(-1) & torch.isfinite(true).flatten(-2).all(-1))
    if value.ndim == 2:
        bad = bad.unsqueeze(-1)
    return torch.where(bad, torch.full_like(value, math.nan), value)


# --------------------------------------------------------------------------------------------------
# 3D error: mTRE
# --------------------------------------------------------------------------------------------------


def mtre(pose_est: torch.Tensor, pose_true: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """Mean target registration error (mm): ``mean_l ‖T_est⁻¹ p_l − T_true⁻¹ p_l‖``.

    ``T⁻¹ p`` is landmark ``p`` (CT world mm) expressed in the C-arm (camera) frame by a pose; the difference is
    how far the estimated registration puts the CT's anatomy from where it really is relative to the C-arm.
    Equivalently ``‖T_true T_est⁻¹ p − p‖``: the displacement of the anatomy by the registration's error
    transform, in world mm. Independent of the detector (no projection, no magnification).

    Args:
        pose_est: ``(B, 4, 4)`` or ``(4, 4)`` estimated camera-to-world poses.
        pose_true: ``(B, 4, 4)`` or ``(4, 4)`` true camera-to-world poses.
        landmarks: ``(L, 3)`` or ``(B, L, 3)`` world points (mm).

    Returns:
        ``(B,)`` mm. Differentiable; the gradient is finite (0) where the poses coincide.
    """
    est, true = _pose_pair(pose_est, pose_true, "mtre")
    batch = max(est.shape[0], true.shape[0])
    pts = _landmark_batch(landmarks, batch, est, "mtre")
    diff = transform_points(invert(est), pts) - transform_points(invert(true), pts)
    return _norm(diff).mean(-1).expand(batch)


# --------------------------------------------------------------------------------------------------
# 2D errors: mPD, mRPE
# --------------------------------------------------------------------------------------------------


def _cameras(
    est: Camera | torch.Tensor, true: Camera | torch.Tensor, intrinsics: Intrinsics | None, func: str
) -> tuple[torch.Tensor, torch.Tensor, Intrinsics]:
    """Resolve ``(pose_est, pose_true, intrinsics)`` from Cameras or pose tensors."""
    found = [c.intrinsics for c in (est, true) if isinstance(c, Camera)]
    if intrinsics is not None:
        if not isinstance(intrinsics, Intrinsics):
            raise InputError(f"{func}: 'intrinsics' must be Intrinsics; got {type(intrinsics).__name__}")
        found.append(intrinsics)
    if not found:
        raise InputError(f"{func}: pass Cameras, or pose tensors together with 'intrinsics'")
    if any(k != found[0] for k in found[1:]):
        raise InputError(
            f"{func}: the two views must share one detector (pixel offsets are only comparable on one "
            f"detector); got {found}"
        )
    pose_est = est.pose if isinstance(est, Camera) else est
    pose_true = true.pose if isinstance(true, Camera) else true
    pose_est, pose_true = _pose_pair(pose_est, pose_true, func)
    return pose_est, pose_true, found[0]


def _pixel_offsets(
    est: Camera | torch.Tensor,
    true: Camera | torch.Tensor,
    landmarks: torch.Tensor,
    intrinsics: Intrinsics | None,
    func: str,
) -> tuple[torch.Tensor, Intrinsics]:
    """``(B, L, 2)`` pixel offsets ``(Δu, Δv)`` = projection by the estimated minus by the true camera."""
    pose_est, pose_true, intr = _cameras(est, true, intrinsics, func)
    batch = max(pose_est.shape[0], pose_true.shape[0])
    pts = _landmark_batch(landmarks, batch, pose_est, func)
    # A non-finite pose (a diverged optimiser) gives NaN offsets instead of Camera's validation error.
    eye = torch.eye(4, dtype=pose_est.dtype, device=pose_est.device)
    finite_est = torch.isfinite(pose_est).flatten(-2).all(-1)[:, None, None]
    finite_true = torch.isfinite(pose_true).flatten(-2).all(-1)[:, None, None]
    uv_est = Camera(intr, torch.where(finite_est, pose_est, eye)).project(pts)
    uv_true = Camera(intr, torch.where(finite_true, pose_true, eye)).project(pts)
    offsets = uv_est - uv_true
    offsets = torch.where(finite_est & finite_true, offsets, torch.full_like(offsets, math.nan))
    return offsets.expand(batch, pts.shape[1], 2), intr


def mpd(
    est: Camera | torch.Tensor,
    true: Camera | torch.Tensor,
    landmarks: torch.Tensor,
    intrinsics: Intrinsics | None = None,
) -> torch.Tensor:
    """Mean projection distance on the detector plane, in mm of the detector.

    ``mean_l ‖((u_est − u_true)·dx, (v_est − v_true)·dy)‖`` where ``(u, v)`` are the pixel coordinates of
    landmark ``l`` projected by each camera (:meth:`Camera.project`) and ``(dx, dy)`` the column and row pixel
    spacing (mm). The distance is measured **on the detector**: it includes the projective magnification
    ``sdd / z`` of a landmark at depth ``z`` and is **not** rescaled to the isocentre (see
    :func:`mpd_isocenter`) nor multiplied by any further pixel spacing.

    Args:
        est: estimated :class:`Camera`, or ``(B, 4, 4)`` camera-to-world poses with ``intrinsics``.
        true: true :class:`Camera`, or poses.
        landmarks: ``(L, 3)`` or ``(B, L, 3)`` world points (mm).
        intrinsics: the detector, required when ``est`` and ``true`` are pose tensors; both views must share it.

    Returns:
        ``(B,)`` mm; NaN where a landmark lies behind (or at) either source.
    """
    offsets, intr = _pixel_offsets(est, true, landmarks, intrinsics, "mpd")
    spacing = offsets.new_tensor([intr.dx, intr.dy])
    return _norm(offsets * spacing).mean(-1)


def mrpe(
    est: Camera | torch.Tensor,
    true: Camera | torch.Tensor,
    landmarks: torch.Tensor,
    intrinsics: Intrinsics | None = None,
) -> torch.Tensor:
    """Mean reprojection error in pixels: ``mean_l ‖(u_est − u_true, v_est − v_true)‖``.

    The pixel-unit twin of :func:`mpd` (same arguments); with square pixels ``mrpe = mpd / dx``.

    Returns:
        ``(B,)`` pixels; NaN where a landmark lies behind (or at) either source.
    """
    offsets, _ = _pixel_offsets(est, true, landmarks, intrinsics, "mrpe")
    return _norm(offsets).mean(-1)


def mpd_isocenter(
    est: Camera | torch.Tensor,
    true: Camera | torch.Tensor,
    landmarks: torch.Tensor,
    intrinsics: Intrinsics | None = None,
    *,
    source_to_isocenter: float,
) -> torch.Tensor:
    """:func:`mpd` scaled to the isocentre plane: ``mpd · source_to_isocenter / sdd`` (mm at the isocentre).

    Dividing by the magnification of the isocentre, ``sdd / source_to_isocenter``, turns detector millimetres
    into millimetres in the plane through the isocentre parallel to the detector; for landmarks at the
    isocentre's depth this is the lateral component of their 3D displacement. It is a scaled 2D distance,
    not a 3D error (see :func:`mtre`).
    """
    if (
        isinstance(source_to_isocenter, bool)
        or not isinstance(source_to_isocenter, (int, float))
        or not math.isfinite(source_to_isocenter)
        or source_to_isocenter <= 0
    ):
        raise InputError(
            f"mpd_isocenter: 'source_to_isocenter' must be a positive distance in mm; got {source_to_isocenter!r}"
        )
    offsets, intr = _pixel_offsets(est, true, landmarks, intrinsics, "mpd_isocenter")
    spacing = offsets.new_tensor([intr.dx, intr.dy])
    return _norm(offsets * spacing).mean(-1) * (float(source_to_isocenter) / intr.sdd)


# --------------------------------------------------------------------------------------------------
# Pose errors
# --------------------------------------------------------------------------------------------------


def rotation_error_deg(pose_est: torch.Tensor, pose_true: torch.Tensor) -> torch.Tensor:
    """Geodesic angle between the estimated and true camera rotations, degrees in ``[0, 180]``.

    The angle of ``R_trueᵀ R_est`` (the same in any frame: ``R_est R_trueᵀ`` has the same angle).
    Returns ``(B,)``.
    """
    est, true = _pose_pair(pose_est, pose_true, "rotation_error_deg")
    return _nan_if_nonfinite(rotation_distance(est, true, degrees=True), est, true)


def translation_error_mm(pose_est: torch.Tensor, pose_true: torch.Tensor) -> torch.Tensor:
    """Distance between the estimated and true camera centres (X-ray sources), ``‖t_est − t_true‖`` (mm).

    Returns ``(B,)``. Depends on where the world origin is only through the camera centres, which are
    physical points: the value is the same for any choice of world frame.
    """
    est, true = _pose_pair(pose_est, pose_true, "translation_error_mm")
    return _nan_if_nonfinite(translation_distance(est, true), est, true)


def _check_frame(frame: object, func: str) -> None:
    if frame not in ("camera", "world"):
        raise InputError(f"{func}: 'frame' must be 'camera' or 'world'; got {frame!r}")


def rotation_error_per_axis_deg(
    pose_est: torch.Tensor,
    pose_true: torch.Tensor,
    *,
    frame: Frame = "camera",
    convention: str = "ZYX",
) -> torch.Tensor:
    """Absolute rotation errors about the x, y, z axes (degrees), ``(B, 3)`` in the order x, y, z.

    The relative rotation of the estimated camera with respect to the true one is
    ``ΔR = R_trueᵀ R_est`` for ``frame="camera"`` (``R_est = R_true ΔR``: axes of the true camera, x along
    detector columns, y along rows, z the principal ray, so z is the in-plane rotation) or
    ``ΔR = R_est R_trueᵀ`` for ``frame="world"`` (``R_est = ΔR R_true``: CT RAS axes, x right–left, y
    anterior–posterior, z superior–inferior). ``ΔR`` is decomposed into Euler angles by ``convention``, a
    three-distinct-axis (Tait–Bryan) SciPy convention string (upper case intrinsic, lower case extrinsic; see
    :func:`xraypose.geometry.rotations.matrix_to_euler`), and each angle is reported under its axis. With
    ``convention="rotvec"`` the components of the rotation vector ``log(ΔR)`` are reported instead (no order
    dependence). For small errors all choices agree to first order; a rotation about one axis alone is
    reported on that axis exactly by every convention.
    """
    func = "rotation_error_per_axis_deg"
    _check_frame(frame, func)
    est, true = _pose_pair(pose_est, pose_true, func)
    r_est, r_true = est[..., :3, :3], true[..., :3, :3]
    rel = r_true.transpose(-1, -2) @ r_est if frame == "camera" else r_est @ r_true.transpose(-1, -2)
    if convention == "rotvec":
        return _nan_if_nonfinite(torch.rad2deg(so3_log(rel)).abs(), est, true)
    if (
        not isinstance(convention, str)
        or len(convention) != 3
        or not (convention.isupper() or convention.islower())
        or set(convention.lower()) != {"x", "y", "z"}
    ):
        raise InputError(
            f"{func}: 'convention' must be 'rotvec' or a Tait–Bryan axis sequence such as 'ZYX' or 'xyz' "
            f"(three distinct axes); got {convention!r}"
        )
    angles = torch.rad2deg(matrix_to_euler(rel, convention)).abs()
    order = [convention.lower().index(axis) for axis in "xyz"]
    return _nan_if_nonfinite(angles[..., order], est, true)


def translation_error_per_axis_mm(
    pose_est: torch.Tensor, pose_true: torch.Tensor, *, frame: Frame = "camera"
) -> torch.Tensor:
    """Absolute components of the camera-centre (source) displacement ``t_est − t_true`` (mm), ``(B, 3)``.

    ``frame="camera"``: components along the true camera's axes, ``|R_trueᵀ (t_est − t_true)|`` — x and y
    parallel to the detector (columns, rows), z along the principal ray (depth, seen as magnification).
    ``frame="world"``: components along the CT's RAS axes, ``|t_est − t_true|``.
    """
    func = "translation_error_per_axis_mm"
    _check_frame(frame, func)
    est, true = _pose_pair(pose_est, pose_true, func)
    delta = est[..., :3, 3] - true[..., :3, 3]
    if frame == "camera":
        delta = (true[..., :3, :3].transpose(-1, -2) @ delta.unsqueeze(-1)).squeeze(-1)
    return _nan_if_nonfinite(delta.abs(), est, true)


def double_geodesic_error(pose_est: torch.Tensor, pose_true: torch.Tensor, radius_mm: float) -> torch.Tensor:
    """DiffPose's double geodesic distance (mm): ``sqrt((radius_mm · θ)² + ‖t_est − t_true‖²)``.

    ``θ`` is the geodesic rotation angle (rad); DiffPose takes ``radius_mm = sdd / 2``. See
    :func:`xraypose.geometry.se3.double_geodesic_distance`. Returns ``(B,)``.
    """
    est, true = _pose_pair(pose_est, pose_true, "double_geodesic_error")
    return _nan_if_nonfinite(double_geodesic_distance(est, true, radius=radius_mm), est, true)


# --------------------------------------------------------------------------------------------------
# Per-case results
# --------------------------------------------------------------------------------------------------


def _to_float_list(values: object, name: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        return [float(v) for v in values.detach().reshape(-1).cpu().tolist()]
    if isinstance(values, np.ndarray):
        return [float(v) for v in values.reshape(-1).tolist()]
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InputError(f"{name}: expected a sequence of numbers, got {type(values).__name__}")
    return [float(v) for v in values]


@dataclass(frozen=True, kw_only=True)
class CaseResult:
    """One registration case's outcome (plain Python values, JSON-friendly).

    Attributes:
        case: case identifier (e.g. ``"chest/017"``).
        level: difficulty or initialisation level (free text; ``""`` if none).
        method: registration method name.
        mtre_mm: :func:`mtre` of the final pose (mm).
        mpd_mm: :func:`mpd` (detector mm), ``None`` if not computed.
        mrpe_px: :func:`mrpe` (pixels).
        rot_deg: :func:`rotation_error_deg`.
        trans_mm: :func:`translation_error_mm`.
        rot_deg_xyz: :func:`rotation_error_per_axis_deg` (x, y, z).
        trans_mm_xyz: :func:`translation_error_per_axis_mm` (x, y, z).
        dgeo_mm: :func:`double_geodesic_error`.
        initial_mtre_mm: mTRE of the initial pose, before registration.
        seconds: wall-clock time of the registration of this case.
        iterations: optimiser iterations.
        converged: whether the method reports convergence.
        stop_reason: why the method stopped (free text).
        extra: anything else (JSON-serialisable values).
    """

    case: str
    level: str = ""
    method: str
    mtre_mm: float
    mpd_mm: float | None = None
    mrpe_px: float | None = None
    rot_deg: float | None = None
    trans_mm: float | None = None
    rot_deg_xyz: tuple[float, float, float] | None = None
    trans_mm_xyz: tuple[float, float, float] | None = None
    dgeo_mm: float | None = None
    initial_mtre_mm: float | None = None
    seconds: float | None = None
    iterations: int | None = None
    converged: bool | None = None
    stop_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("rot_deg_xyz", "trans_mm_xyz"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaseResult:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(
                f"CaseResult.from_dict: unknown field(s) {sorted(unknown)}; expected {sorted(known)}"
            )
        values = dict(data)
        for key in ("rot_deg_xyz", "trans_mm_xyz"):
            if values.get(key) is not None:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)


@dataclass(frozen=True)
class PoseErrors:
    """All pose metrics of a batch (tensors, detached from the graph).

    ``mtre_mm``, ``rot_deg``, ``trans_mm`` are ``(B,)``; ``rot_deg_xyz``, ``trans_mm_xyz`` ``(B, 3)``;
    ``mpd_mm``, ``mrpe_px`` ``(B,)`` or ``None`` without intrinsics; ``dgeo_mm`` ``(B,)`` or ``None`` without
    a radius.
    """

    mtre_mm: torch.Tensor
    rot_deg: torch.Tensor
    trans_mm: torch.Tensor
    rot_deg_xyz: torch.Tensor
    trans_mm_xyz: torch.Tensor
    mpd_mm: torch.Tensor | None = None
    mrpe_px: torch.Tensor | None = None
    dgeo_mm: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.mtre_mm.shape[0])

    def case_result(
        self, index: int, *, case: str, method: str, level: str = "", **kwargs: Any
    ) -> CaseResult:
        """The :class:`CaseResult` of batch element ``index``; ``kwargs`` fill the remaining fields."""

        def one(t: torch.Tensor | None) -> float | None:
            return None if t is None else float(t[index])

        def three(t: torch.Tensor) -> tuple[float, float, float]:
            x, y, z = (float(v) for v in t[index].tolist())
            return (x, y, z)

        return CaseResult(
            case=case,
            level=level,
            method=method,
            mtre_mm=float(self.mtre_mm[index]),
            mpd_mm=one(self.mpd_mm),
            mrpe_px=one(self.mrpe_px),
            rot_deg=float(self.rot_deg[index]),
            trans_mm=float(self.trans_mm[index]),
            rot_deg_xyz=three(self.rot_deg_xyz),
            trans_mm_xyz=three(self.trans_mm_xyz),
            dgeo_mm=one(self.dgeo_mm),
            **kwargs,
        )


@torch.no_grad()
def pose_errors(
    pose_est: torch.Tensor,
    pose_true: torch.Tensor,
    landmarks: torch.Tensor,
    intrinsics: Intrinsics | None = None,
    *,
    radius_mm: float | None = None,
    frame: Frame = "camera",
    convention: str = "ZYX",
) -> PoseErrors:
    """Every metric of this module for a batch of poses (no gradients), for benchmark runners.

    mPD and mRPE need ``intrinsics``; the double geodesic error needs ``radius_mm``. ``frame`` and
    ``convention`` apply to the per-axis errors.
    """
    est, true = _pose_pair(pose_est, pose_true, "pose_errors")
    batch = max(est.shape[0], true.shape[0])
    est, true = est.expand(batch, 4, 4), true.expand(batch, 4, 4)
    return PoseErrors(
        mtre_mm=mtre(est, true, landmarks),
        rot_deg=rotation_error_deg(est, true),
        trans_mm=translation_error_mm(est, true),
        rot_deg_xyz=rotation_error_per_axis_deg(est, true, frame=frame, convention=convention),
        trans_mm_xyz=translation_error_per_axis_mm(est, true, frame=frame),
        mpd_mm=None if intrinsics is None else mpd(est, true, landmarks, intrinsics),
        mrpe_px=None if intrinsics is None else mrpe(est, true, landmarks, intrinsics),
        dgeo_mm=None if radius_mm is None else double_geodesic_error(est, true, radius_mm),
    )


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuccessRate:
    """Success count at one threshold: a case succeeds when its value is **strictly below** ``threshold``.

    NaN values count as failures (they stay in ``total``). ``float(rate)`` is the fraction.
    """

    threshold: float
    successes: int
    total: int

    @property
    def fraction(self) -> float:
        """``successes / total``; NaN when there are no cases."""
        return self.successes / self.total if self.total else math.nan

    def __float__(self) -> float:
        return self.fraction


def success_rate(
    values: Sequence[float] | torch.Tensor | np.ndarray, thresholds: Iterable[float] = DEFAULT_THRESHOLDS_MM
) -> dict[float, SuccessRate]:
    """Success rates of per-case errors (e.g. mTRE in mm) at each threshold.

    A case succeeds at threshold ``τ`` when ``value < τ`` (strict; a value equal to the threshold fails; NaN
    fails). Returns ``{τ: SuccessRate(τ, successes, total)}`` in the order of ``thresholds``.
    """
    vals = _to_float_list(values, "success_rate")
    out: dict[float, SuccessRate] = {}
    for tau in thresholds:
        tau = float(tau)
        if not math.isfinite(tau) or tau <= 0:
            raise InputError(f"success_rate: thresholds must be positive and finite; got {tau!r}")
        out[tau] = SuccessRate(tau, sum(1 for v in vals if v < tau), len(vals))
    return out


@dataclass(frozen=True)
class Stats:
    """Median and mean of the finite values of one metric; ``n`` counts them (non-finite values are left out)."""

    median: float
    mean: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stats | None:
        """Stats of the finite values; ``None`` when no value was given (all ``None``)."""
        given = [float(v) for v in values if v is not None]
        if not given:
            return None
        finite = [v for v in given if math.isfinite(v)]
        if not finite:
            return cls(math.nan, math.nan, 0)
        return cls(statistics.median(finite), statistics.fmean(finite), len(finite))


@dataclass(frozen=True)
class Summary:
    """Aggregate of a list of :class:`CaseResult` (see :func:`summarize`).

    ``method``/``level`` are the common value of the records, or ``"mixed"``. Metric fields are
    :class:`Stats` (``None`` when no record has that metric); per-axis fields are ``(x, y, z)`` tuples of
    Stats. ``success`` maps each mTRE threshold (mm) to its :class:`SuccessRate` over **all** cases.
    """

    method: str
    level: str
    n_cases: int
    mtre_mm: Stats
    success: dict[float, SuccessRate]
    mpd_mm: Stats | None = None
    mrpe_px: Stats | None = None
    rot_deg: Stats | None = None
    trans_mm: Stats | None = None
    rot_deg_xyz: tuple[Stats, Stats, Stats] | None = None
    trans_mm_xyz: tuple[Stats, Stats, Stats] | None = None
    dgeo_mm: Stats | None = None
    initial_mtre_mm: Stats | None = None
    seconds: Stats | None = None
    converged_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["success"] = {str(k): {**asdict(v), "fraction": v.fraction} for k, v in self.success.items()}
        return out


def _common(values: Iterable[str]) -> str:
    unique = sorted(set(values))
    return unique[0] if len(unique) == 1 else "mixed"


def _axis_stats(vectors: list[tuple[float, float, float] | None]) -> tuple[Stats, Stats, Stats] | None:
    given = [v for v in vectors if v is not None]
    if not given:
        return None
    x, y, z = (Stats.of(v[i] for v in given) for i in range(3))
    assert x is not None and y is not None and z is not None
    return (x, y, z)


def summarize(records: Sequence[CaseResult], thresholds: Iterable[float] = DEFAULT_THRESHOLDS_MM) -> Summary:
    """Summarise per-case results: median/mean of each metric, mTRE success rates, time per case.

    Medians and means are over the records that have the metric and where it is finite (``Stats.n`` says how
    many); success rates are over all records (a non-finite mTRE fails). ``converged_fraction`` is over the
    records that report ``converged``.
    """
    records = list(records)
    if not records:
        raise InputError("summarize: no records")
    if not all(isinstance(r, CaseResult) for r in records):
        raise InputError("summarize: records must be CaseResult instances")
    mtre_stats = Stats.of(r.mtre_mm for r in records)
    assert mtre_stats is not None
    flags = [r.converged for r in records if r.converged is not None]
    return Summary(
        method=_common(r.method for r in records),
        level=_common(r.level for r in records),
        n_cases=len(records),
        mtre_mm=mtre_stats,
        success=success_rate([r.mtre_mm for r in records], thresholds),
        mpd_mm=Stats.of(r.mpd_mm for r in records),
        mrpe_px=Stats.of(r.mrpe_px for r in records),
        rot_deg=Stats.of(r.rot_deg for r in records),
        trans_mm=Stats.of(r.trans_mm for r in records),
        rot_deg_xyz=_axis_stats([r.rot_deg_xyz for r in records]),
        trans_mm_xyz=_axis_stats([r.trans_mm_xyz for r in records]),
        dgeo_mm=Stats.of(r.dgeo_mm for r in records),
        initial_mtre_mm=Stats.of(r.initial_mtre_mm for r in records),
        seconds=Stats.of(r.seconds for r in records),
        converged_fraction=(sum(flags) / len(flags)) if flags else None,
    )


def summarize_by(
    records: Sequence[CaseResult],
    keys: Sequence[str] = ("method", "level"),
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS_MM,
) -> dict[tuple[Any, ...], Summary]:
    """:func:`summarize` per group of records sharing the values of ``keys`` (CaseResult field names).

    Groups appear in the order of their first record.
    """
    names = {f.name for f in fields(CaseResult)}
    bad = [k for k in keys if k not in names]
    if bad:
        raise InputError(f"summarize_by: unknown CaseResult field(s) {bad}")
    groups: dict[tuple[Any, ...], list[CaseResult]] = {}
    for r in records:
        groups.setdefault(tuple(getattr(r, k) for k in keys), []).append(r)
    thresholds = tuple(thresholds)
    return {key: summarize(group, thresholds) for key, group in groups.items()}


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _fmt_stats(stats: Stats | None, n_cases: int, attr: str, digits: int) -> str:
    if stats is None:
        return "—"
    text = _fmt(getattr(stats, attr), digits)
    return text if stats.n == n_cases else f"{text} (n={stats.n})"


def summary_markdown(
    summaries: Summary | Sequence[Summary], *, per_axis: bool = False, header: bool = True
) -> str:
    """A Markdown table (header, separator, one row per summary) of :func:`summarize` results.

    Columns: method, level, n, mTRE median and mean (mm), SR at each threshold of the first summary (%),
    mPD median (detector mm), mRPE median (px), rotation median (°), translation median (mm), median seconds
    per case, and with ``per_axis`` the mean absolute rotation (°) and translation (mm) errors about/along
    x, y, z. A statistic over fewer cases than ``n`` (non-finite values left out) shows ``(n=…)``; a metric
    not computed shows ``—``. ``header=False`` gives the rows only.
    """
    rows = [summaries] if isinstance(summaries, Summary) else list(summaries)
    if not rows or not all(isinstance(s, Summary) for s in rows):
        raise InputError("summary_markdown: expected a Summary or a non-empty sequence of Summary")
    thresholds = list(rows[0].success)
    cols = ["method", "level", "n", "mTRE median (mm)", "mTRE mean (mm)"]
    cols += [f"SR@{t:g} mm (%)" for t in thresholds]
    cols += ["mPD median (mm)", "mRPE median (px)", "rot median (°)", "trans median (mm)", "s/case median"]
    if per_axis:
        cols += [f"rot {a} mean (°)" for a in "xyz"] + [f"trans {a} mean (mm)" for a in "xyz"]
    lines = []
    if header:
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|")
    for s in rows:
        n = s.n_cases
        cells = [s.method, s.level or "—", str(n)]
        cells += [_fmt_stats(s.mtre_mm, n, "median", 2), _fmt_stats(s.mtre_mm, n, "mean", 2)]
        for t in thresholds:
            rate = s.success.get(t)
            cells.append("—" if rate is None else _fmt(100.0 * rate.fraction, 1))
        cells += [
            _fmt_stats(s.mpd_mm, n, "median", 2),
            _fmt_stats(s.mrpe_px, n, "median", 2),
            _fmt_stats(s.rot_deg, n, "median", 2),
            _fmt_stats(s.trans_mm, n, "median", 2),
            _fmt_stats(s.seconds, n, "median", 2),
        ]
        if per_axis:
            for axes in (s.rot_deg_xyz, s.trans_mm_xyz):
                cells += ["—"] * 3 if axes is None else [_fmt_stats(a, n, "mean", 2) for a in axes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Image metrics
# --------------------------------------------------------------------------------------------------


def image_metrics(
    image: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """NCC, SSIM and gradient correlation of ``image`` against ``reference`` (``(B, H, W)`` each → ``(B,)``).

    The same functions the registration losses use (:mod:`xraypose.losses`), evaluated without gradients.
    """
    from .losses import gradient_correlation, ncc, ssim

    with torch.no_grad():
        return {
            "ncc": ncc(image, reference, mask=mask),
            "ssim": ssim(image, reference, mask=mask),
            "gradient_correlation": gradient_correlation(image, reference, mask=mask),
        }
