"""Random C-arm poses: a distribution of clinical C-arm views and random perturbations of poses.

Frames and units follow ``docs/conventions.md``: poses are ``T_world_from_camera`` (camera-to-world) 4×4
matrices in the CT's RAS world (mm); angles in this module are in **degrees**, as their names say.

- :class:`CArmPoseDistribution` — independent uniform C-arm angles (LAO/RAO, cranial/caudal, in-plane) and a
  uniform isocentre offset around an anatomy centre; :func:`sample_carm_poses` draws poses from it through
  :func:`~xraypose.geometry.carm_pose`.
- :func:`carm_angles_from_pose` — the inverse of :func:`~xraypose.geometry.carm_pose`'s rotation.
- :func:`perturb_poses` — a rigid motion of exactly a given angle about an axis through the anatomy centre
  plus a translation of exactly a given length: initial poses for registration at controlled distances.
- :func:`uniform_rotations` — Haar-uniform rotations (normalised Gaussian quaternions).
- :func:`gaussian_se3_poses` — a Gaussian in the se(3) tangent space around a reference pose (the
  DiffPose training distribution); rotation σ in **radians**, translation mean and σ in mm.
- :func:`uniform_box_poses` — Euler angles (degrees) and a translation (mm) uniform in per-axis ranges,
  optionally composed with a reference pose.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import InputError
from .camera import _R_AP, carm_pose
from .rotations import axis_angle_to_matrix, euler_to_matrix, matrix_to_euler, quaternion_to_matrix
from .se3 import is_rigid, se3_exp

__all__ = [
    "CArmPoseDistribution",
    "CArmSample",
    "carm_angles_from_pose",
    "gaussian_se3_poses",
    "perturb_poses",
    "sample_carm",
    "sample_carm_poses",
    "uniform_box_poses",
    "uniform_rotations",
]


def _check_range(name: str, value: object) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InputError(f"CArmPoseDistribution.{name}: expected a (low, high) pair, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise InputError(f"CArmPoseDistribution.{name}: expected finite low <= high, got ({lo}, {hi})")
    return lo, hi


@dataclass(frozen=True)
class CArmPoseDistribution:
    """Independent uniform distributions of C-arm angles and isocentre position.

    Angles are those of :func:`~xraypose.geometry.carm_pose` (``docs/conventions.md``, "Standard views"); each
    is drawn uniformly in its ``(low, high)`` range, in degrees. The isocentre is the anatomy centre given to
    :func:`sample_carm_poses` plus an offset drawn uniformly in ``[-h, h]`` along each world axis (RAS, mm).

    Attributes:
        lao_deg: LAO (+) / RAO (−) range, degrees. Default ±30°.
        cranial_deg: cranial (+) / caudal (−) range, degrees. Default ±20°.
        inplane_deg: in-plane detector rotation range, degrees. Default ±10°.
        isocenter_offset_mm: half-widths ``(hx, hy, hz)`` of the uniform isocentre offset along world x, y, z,
            mm. Default ±30 mm per axis.
        source_to_isocenter_mm: distance from the X-ray source to the isocentre along the principal ray, mm.
            Default 620 mm: with a 1020 mm source-to-detector distance this puts the isocentre 400 mm in front
            of the detector (magnification 1.65), typical of a mobile C-arm with the patient near the
            isocentre.
    """

    lao_deg: tuple[float, float] = (-30.0, 30.0)
    cranial_deg: tuple[float, float] = (-20.0, 20.0)
    inplane_deg: tuple[float, float] = (-10.0, 10.0)
    isocenter_offset_mm: tuple[float, float, float] = (30.0, 30.0, 30.0)
    source_to_isocenter_mm: float = 620.0

    def __post_init__(self) -> None:
        for name in ("lao_deg", "cranial_deg", "inplane_deg"):
            object.__setattr__(self, name, _check_range(name, getattr(self, name)))
        try:
            half = tuple(float(v) for v in self.isocenter_offset_mm)
        except (TypeError, ValueError):
            half = ()
        if len(half) != 3 or not all(math.isfinite(h) and h >= 0 for h in half):
            raise InputError(
                "CArmPoseDistribution.isocenter_offset_mm: expected three finite half-widths >= 0 in mm, "
                f"got {self.isocenter_offset_mm!r}"
            )
        object.__setattr__(self, "isocenter_offset_mm", half)
        sid = self.source_to_isocenter_mm
        if isinstance(sid, bool) or not isinstance(sid, (int, float)) or not (math.isfinite(sid) and sid > 0):
            raise InputError(
                f"CArmPoseDistribution.source_to_isocenter_mm: expected a positive distance in mm, got {sid!r}"
            )
        object.__setattr__(self, "source_to_isocenter_mm", float(sid))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CArmPoseDistribution:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True, eq=False)
class CArmSample:
    """C-arm parameters drawn by :func:`sample_carm` and the poses they give.

    Attributes:
        angles_deg: ``(n, 3)`` float64 ``(lao, cranial, inplane)`` in degrees.
        isocenters: ``(n, 3)`` float64 isocentres in world RAS mm.
        poses: ``(n, 4, 4)`` float64 camera-to-world poses, ``carm_pose(*angles, isocenter=...)``.
    """

    angles_deg: torch.Tensor
    isocenters: torch.Tensor
    poses: torch.Tensor


def _center(center_world: object, func: str) -> torch.Tensor:
    c = torch.as_tensor(center_world, dtype=torch.float64)
    if c.shape != (3,) or not bool(torch.isfinite(c).all()):
        raise InputError(
            f"{func}: center_world must be a finite (x, y, z) point in world mm, got {c.tolist()}"
        )
    return c.cpu()


def _check_count(n: object, func: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"{func}: n must be a non-negative integer, got {n!r}")
    return n


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(n, generator=generator, dtype=torch.float64, device="cpu")
    return lo + (hi - lo) * u


def sample_carm(
    dist: CArmPoseDistribution,
    n: int,
    center_world: torch.Tensor | tuple[float, float, float],
    *,
    generator: torch.Generator | None = None,
) -> CArmSample:
    """Draw ``n`` C-arm configurations (angles, isocentres) and their poses; see :func:`sample_carm_poses`."""
    if not isinstance(dist, CArmPoseDistribution):
        raise InputError(f"sample_carm: dist must be a CArmPoseDistribution, got {type(dist).__name__}")
    n = _check_count(n, "sample_carm")
    center = _center(center_world, "sample_carm")
    # One draw per quantity in a fixed order: the same generator state gives the same sample.
    lao = _uniform(n, *dist.lao_deg, generator)
    cran = _uniform(n, *dist.cranial_deg, generator)
    inpl = _uniform(n, *dist.inplane_deg, generator)
    offset = torch.stack([_uniform(n, -h, h, generator) for h in dist.isocenter_offset_mm], dim=-1)
    iso = center + offset
    angles = torch.stack([lao, cran, inpl], dim=-1)
    if n == 0:
        poses = torch.empty(0, 4, 4, dtype=torch.float64)
    else:
        poses = carm_pose(
            lao,
            cran,
            inpl,
            source_to_isocenter=dist.source_to_isocenter_mm,
            isocenter=iso,
            dtype=torch.float64,
        )
    return CArmSample(angles_deg=angles, isocenters=iso, poses=poses)


def sample_carm_poses(
    dist: CArmPoseDistribution,
    n: int,
    center_world: torch.Tensor | tuple[float, float, float],
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``n`` camera-to-world C-arm poses around an anatomy centre.

    Each pose is :func:`~xraypose.geometry.carm_pose` with angles drawn uniformly from ``dist``'s ranges, the
    source ``dist.source_to_isocenter_mm`` from the isocentre, and the isocentre at ``center_world`` plus a
    uniform offset of at most ``dist.isocenter_offset_mm`` along each world axis.

    Args:
        dist: the distribution.
        n: number of poses (≥ 0).
        center_world: ``(3,)`` anatomy centre in world RAS mm.
        generator: a CPU ``torch.Generator`` for reproducibility (default: torch's global generator).
    Returns:
        ``(n, 4, 4)`` float64 poses (CPU).
    """
    return sample_carm(dist, n, center_world, generator=generator).poses


def carm_angles_from_pose(pose: torch.Tensor) -> torch.Tensor:
    """C-arm angles ``(lao, cranial, inplane)`` in degrees of camera-to-world poses (inverse of ``carm_pose``).

    ``carm_pose``'s rotation is ``R = R_z(lao) · R_x(cranial) · R_AP · R_z(inplane)``
    ``= R_z(lao) · R_x(cranial) · R_y(−inplane) · R_AP``, so the angles are the intrinsic ``"ZXY"`` Euler angles
    of ``R · R_APᵀ`` (with the last one negated). Unique for ``|cranial| < 90°``.

    Args:
        pose: ``(..., 4, 4)`` (or ``(..., 3, 3)`` rotations).
    Returns:
        ``(..., 3)`` degrees, in the pose's dtype.
    """
    if not isinstance(pose, torch.Tensor) or pose.shape[-2:] not in ((4, 4), (3, 3)):
        raise InputError("carm_angles_from_pose: expected a (..., 4, 4) pose or (..., 3, 3) rotation tensor")
    rot = pose[..., :3, :3]
    r_ap = torch.tensor(_R_AP, dtype=rot.dtype, device=rot.device)
    euler = torch.rad2deg(matrix_to_euler(rot @ r_ap.T, "ZXY"))
    return euler * euler.new_tensor([1.0, 1.0, -1.0])


def _random_unit_vectors(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """``(n, 3)`` float64 directions uniform on the unit sphere (normalised Gaussians)."""
    v = torch.randn(n, 3, generator=generator, dtype=torch.float64, device="cpu")
    norm = v.norm(dim=-1, keepdim=True)
    # A zero Gaussian vector has probability 0; guard anyway so that the result is always unit length.
    fallback = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    return torch.where(norm > 1e-12, v / norm.clamp_min(1e-12), fallback)


def perturb_poses(
    poses: torch.Tensor,
    rotation_deg: float,
    translation_mm: float,
    center_world: torch.Tensor | tuple[float, float, float],
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Move each camera-to-world pose by a random rigid motion of exactly the given size.

    For each pose ``T`` a world-frame motion ``D`` is drawn and ``D · T`` returned, where ``D`` rotates by exactly
    ``rotation_deg`` about an axis through ``center_world`` whose direction is uniform on the sphere, then
    translates by exactly ``translation_mm`` in a uniformly random direction:
    ``D(p) = R (p − c) + c + t``, ``|angle(R)| = rotation_deg``, ``|t| = translation_mm``. Hence

    - the geodesic distance between the rotations of ``T`` and ``D · T`` is ``rotation_deg``;
    - the anatomy centre ``c`` moves by exactly ``translation_mm`` in camera coordinates:
      ``|(D T)⁻¹ c − T⁻¹ c| = translation_mm`` (rotating about ``c`` rather than the source keeps the anatomy
      in view).

    Args:
        poses: ``(..., 4, 4)`` camera-to-world poses (world RAS mm).
        rotation_deg: rotation angle, degrees, in ``[0, 180]``.
        translation_mm: translation length, mm, ``≥ 0``.
        center_world: ``(3,)`` rotation centre (the anatomy centre) in world RAS mm.
        generator: a CPU ``torch.Generator`` for reproducibility.
    Returns:
        ``(..., 4, 4)`` perturbed poses, the input's dtype and device.
    """
    if not isinstance(poses, torch.Tensor) or poses.ndim < 2 or poses.shape[-2:] != (4, 4):
        raise InputError("perturb_poses: poses must be a (..., 4, 4) tensor of camera-to-world poses")
    if not poses.is_floating_point():
        raise InputError(f"perturb_poses: poses must be float32 or float64, got {poses.dtype}")
    rot = float(rotation_deg)
    trans = float(translation_mm)
    if not (math.isfinite(rot) and 0.0 <= rot <= 180.0):
        raise InputError(f"perturb_poses: rotation_deg must lie in [0, 180] degrees, got {rotation_deg!r}")
    if not (math.isfinite(trans) and trans >= 0.0):
        raise InputError(
            f"perturb_poses: translation_mm must be a finite length >= 0 mm, got {translation_mm!r}"
        )
    c = _center(center_world, "perturb_poses")
    batch = poses.shape[:-2]
    n = math.prod(batch)
    axis = _random_unit_vectors(n, generator)
    direction = _random_unit_vectors(n, generator)
    R = axis_angle_to_matrix(axis * math.radians(rot))  # (n, 3, 3)
    t = direction * trans
    D = torch.zeros(n, 4, 4, dtype=torch.float64)
    D[:, :3, :3] = R
    D[:, :3, 3] = c - R @ c + t
    D[:, 3, 3] = 1.0
    out = D @ poses.detach().reshape(n, 4, 4).to(device="cpu", dtype=torch.float64)
    out[:, 3] = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    return out.reshape(*batch, 4, 4).to(device=poses.device, dtype=poses.dtype)


# --------------------------------------------------------------------------------------------------
# SE(3) sampling: Haar rotations, tangent-space Gaussians, uniform boxes
# --------------------------------------------------------------------------------------------------

_FRAMES = ("local", "world")


def _check_positive_count(n: object, func: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"{func}: argument 'n' must be a positive integer (>= 1); got {n!r}")
    return n


def _check_generator(generator: object, func: str) -> None:
    if generator is not None and (
        not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
    ):
        raise InputError(
            f"{func}: argument 'generator' must be None or a CPU torch.Generator; got {generator!r}"
        )


def _check_frame(frame: object, func: str) -> str:
    if frame not in _FRAMES:
        raise InputError(f"{func}: argument 'frame' must be 'local' or 'world'; got {frame!r}")
    return str(frame)


def _per_axis(value: object, name: str, func: str, *, nonnegative: bool) -> torch.Tensor:
    """A float or three values as a ``(3,)`` float64 tensor (finite, and ``>= 0`` if ``nonnegative``)."""
    try:
        t = torch.as_tensor(value, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is not None and t.ndim == 0:
        t = t.expand(3).clone()
    if (
        t is None
        or t.shape != (3,)
        or not bool(torch.isfinite(t).all())
        or (nonnegative and bool((t < 0).any()))
    ):
        what = "finite values >= 0" if nonnegative else "finite values"
        raise InputError(f"{func}: argument '{name}' must be a number or three {what}; got {value!r}")
    return t


def _ranges(value: object, name: str, func: str) -> torch.Tensor:
    """Per-axis ``(low, high)`` ranges as a ``(3, 2)`` float64 tensor.

    Accepts a half-width ``h`` (every axis ``[-h, h]``), three half-widths, or a ``(3, 2)`` array of
    ``(low, high)`` pairs; half-widths must be ``>= 0`` and ``low <= high``.
    """
    try:
        t = torch.as_tensor(value, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is not None and t.ndim == 0:
        t = t.expand(3)
    if t is not None and t.shape == (3,) and bool((t >= 0).all()):
        t = torch.stack([-t, t], dim=-1)
    if (
        t is None
        or t.shape != (3, 2)
        or not bool(torch.isfinite(t).all())
        or not bool((t[:, 0] <= t[:, 1]).all())
    ):
        raise InputError(
            f"{func}: argument '{name}' must be a half-width h >= 0, three half-widths >= 0, or three "
            f"finite (low, high) pairs with low <= high; got {value!r}"
        )
    return t


def _reference(reference: object, func: str, n: int) -> torch.Tensor:
    """Check a rigid ``(4, 4)``, ``(1, 4, 4)`` or ``(n, 4, 4)`` reference pose; return it as float64 on the CPU."""
    if not isinstance(reference, torch.Tensor) or not reference.is_floating_point():
        got = type(reference).__name__ if not isinstance(reference, torch.Tensor) else str(reference.dtype)
        raise InputError(
            f"{func}: argument 'reference' must be a floating-point tensor of shape (4, 4) or (n, 4, 4); "
            f"got {got}"
        )
    if reference.shape not in ((4, 4), (1, 4, 4), (n, 4, 4)):
        raise InputError(
            f"{func}: argument 'reference' must have shape (4, 4), (1, 4, 4) or (n, 4, 4) = ({n}, 4, 4); "
            f"got {tuple(reference.shape)}"
        )
    ref = reference.detach().to(device="cpu", dtype=torch.float64)
    if not bool(is_rigid(ref, atol=1e-4).all()):
        raise InputError(
            f"{func}: argument 'reference' must be a rigid camera-to-world pose (finite, orthonormal rotation "
            "with det +1, last row [0, 0, 0, 1])"
        )
    return ref


def uniform_rotations(
    n: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Draw ``n`` rotation matrices from the Haar (uniform) measure on SO(3).

    A quaternion ``(w, x, y, z)`` with i.i.d. standard normal entries, normalised, is uniform on the unit
    3-sphere, and the map from unit quaternions to rotations pushes that forward to the Haar measure. The
    rotation angle ``θ`` then has density ``(1 − cos θ)/π`` on ``[0, π]`` (not uniform: small angles are
    rare), and the rotation axis is uniform on the sphere.

    Args:
        n: number of rotations (≥ 1).
        generator: a CPU ``torch.Generator`` for reproducibility (default: torch's global generator). The
            draw is made in float64 whatever ``dtype``, so a seed gives the same rotations in every dtype.
        dtype: floating dtype of the output.
    Returns:
        ``(n, 3, 3)`` rotation matrices (CPU) acting on column vectors.
    """
    func = "uniform_rotations"
    n = _check_positive_count(n, func)
    _check_generator(generator, func)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"{func}: argument 'dtype' must be a floating torch.dtype; got {dtype!r}")
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64, device="cpu")
    # A zero Gaussian 4-vector has probability 0; replace it anyway so that every output is a rotation.
    q = torch.where(q.norm(dim=-1, keepdim=True) > 1e-12, q, q.new_tensor([1.0, 0.0, 0.0, 0.0]))
    return quaternion_to_matrix(q).to(dtype)


def gaussian_se3_poses(
    reference: torch.Tensor,
    n: int,
    rotation_sigma: float | tuple[float, float, float] | torch.Tensor,
    translation_sigma: float | tuple[float, float, float] | torch.Tensor,
    *,
    translation_mean: float | tuple[float, float, float] | torch.Tensor = 0.0,
    frame: str = "local",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``n`` poses from a Gaussian in the se(3) tangent space around a reference pose.

    A twist ``ξ = (v, ω)`` (``docs/conventions.md``: translation part ``v`` in mm first, rotation part ``ω``
    in rad second) is drawn with independent components

    - ``v_i ~ N(translation_mean_i, translation_sigma_i²)`` (mm),
    - ``ω_i ~ N(0, rotation_sigma_i²)`` (rad),

    and mapped through :func:`~xraypose.geometry.se3.se3_exp`:

    - ``frame="local"``: ``pose = reference · exp(ξ)`` — the axes of ``ξ`` are the **camera** axes of the
      reference (rotation about the X-ray source, translation along x_cam, y_cam, z_cam);
    - ``frame="world"``: ``pose = exp(ξ) · reference`` — the axes are the **world** (RAS) axes, rotation
      about the world origin.

    Hence ``se3_log(reference⁻¹ · pose)`` (local) or ``se3_log(pose · reference⁻¹)`` (world) is ``ξ`` itself
    as long as ``|ω| < π``. Note that ``v`` is a log-coordinate: the translation of ``exp(ξ)`` is ``V(ω) v``,
    which equals ``v`` only for ``ω = 0``. DiffPose (Gopalakrishnan et al., CVPR 2024) trains on this
    distribution with ``rotation_sigma = (0.2, 0.1, 0.25)`` rad, ``translation_mean = (10, 250, 5)`` mm and
    ``translation_sigma = (70, 90, 50)`` mm (log-coordinates in the same ``(v, ω)`` order; which pose it composes
    the offset with, and on which side, is DiffPose's choice and not reproduced here).

    Args:
        reference: ``(4, 4)`` (or ``(1, 4, 4)``) camera-to-world pose (world RAS mm), or ``(n, 4, 4)``: one
            reference per sample. Must be rigid.
        n: number of poses (≥ 1).
        rotation_sigma: standard deviation of ``ω``, radians: one value for all three axes or three values
            ``(σ_x, σ_y, σ_z)``; ``≥ 0``.
        translation_sigma: standard deviation of ``v``, mm: one value or three; ``≥ 0``.
        translation_mean: mean of ``v``, mm: one value or three (default 0). The rotation mean is 0.
        frame: ``"local"`` (right-multiply, camera axes) or ``"world"`` (left-multiply, world axes).
        generator: a CPU ``torch.Generator`` for reproducibility. One ``(n, 6)`` standard normal draw is
            made, so a seed gives the same ``ξ`` in both frames.
    Returns:
        ``(n, 4, 4)`` poses with ``reference``'s dtype and device (computed in float64).
    """
    func = "gaussian_se3_poses"
    n = _check_positive_count(n, func)
    ref = _reference(reference, func, n)
    rot_sigma = _per_axis(rotation_sigma, "rotation_sigma", func, nonnegative=True)
    trans_sigma = _per_axis(translation_sigma, "translation_sigma", func, nonnegative=True)
    trans_mean = _per_axis(translation_mean, "translation_mean", func, nonnegative=False)
    frame = _check_frame(frame, func)
    _check_generator(generator, func)
    z = torch.randn(n, 6, generator=generator, dtype=torch.float64, device="cpu")
    mean = torch.cat([trans_mean, torch.zeros(3, dtype=torch.float64)])
    sigma = torch.cat([trans_sigma, rot_sigma])
    delta = se3_exp(mean + sigma * z)
    out = ref @ delta if frame == "local" else delta @ ref
    out[:, 3] = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    return out.to(device=reference.device, dtype=reference.dtype)


def uniform_box_poses(
    n: int,
    rotation_range_deg: float | Any,
    translation_range_mm: float | Any,
    *,
    reference: torch.Tensor | None = None,
    frame: str = "local",
    convention: str = "ZYX",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Draw ``n`` poses with Euler angles and a translation uniform in per-axis ranges.

    Each sample is ``B = [[R, t], [0, 1]]`` where ``R = euler_to_matrix(a, convention)`` with the three
    Euler angles ``a`` (degrees) drawn independently and uniformly in ``rotation_range_deg``, and the
    translation ``t`` (mm) uniform in the box ``translation_range_mm``. With the default intrinsic ``"ZYX"``
    convention ``R = R_Z(a0) · R_Y(a1) · R_X(a2)`` (yaw, pitch, roll; SciPy naming, ``docs/conventions.md``)
    and the ranges are given in the order ``(z, y, x)`` of the convention string. Note that uniform Euler
    angles are **not** uniform rotations (use :func:`uniform_rotations` for that).

    Without ``reference`` the samples are ``B`` themselves (e.g. small motions, or poses in a box). With a
    reference pose ``T``:

    - ``frame="local"``: ``pose = T · B`` — rotation about the X-ray source, ``t`` along the camera axes;
    - ``frame="world"``: ``pose = B · T`` — rotation about the world origin, ``t`` along world RAS axes.

    Ranges are a half-width ``h`` (each axis ``[-h, h]``), three half-widths, or three ``(low, high)``
    pairs (a ``(3, 2)`` array). The angles are recovered by ``matrix_to_euler(R, convention)`` when they lie
    inside its principal ranges (middle Tait–Bryan angle within ±90°, the others within ±180°).

    Args:
        n: number of poses (≥ 1).
        rotation_range_deg: Euler-angle ranges, degrees, in the order of ``convention``.
        translation_range_mm: translation ranges along x, y, z, mm.
        reference: optional ``(4, 4)``, ``(1, 4, 4)`` or ``(n, 4, 4)`` rigid camera-to-world pose.
        frame: ``"local"`` or ``"world"`` (only used with ``reference``).
        convention: Euler sequence of :func:`~xraypose.geometry.rotations.euler_to_matrix` (default
            intrinsic ``"ZYX"``).
        generator: a CPU ``torch.Generator`` for reproducibility. Angles are drawn first (``(n, 3)``), then
            translations (``(n, 3)``), in float64.
        dtype: output dtype without ``reference``; with one, the output has ``reference``'s dtype and device.
    Returns:
        ``(n, 4, 4)`` poses (CPU float64 by default).
    """
    func = "uniform_box_poses"
    n = _check_positive_count(n, func)
    rot_range = _ranges(rotation_range_deg, "rotation_range_deg", func)
    trans_range = _ranges(translation_range_mm, "translation_range_mm", func)
    ref = _reference(reference, func, n) if reference is not None else None
    frame = _check_frame(frame, func)
    _check_generator(generator, func)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"{func}: argument 'dtype' must be a floating torch.dtype; got {dtype!r}")
    euler_to_matrix(torch.zeros(3, dtype=torch.float64), convention)  # checks 'convention'
    u_rot = torch.rand(n, 3, generator=generator, dtype=torch.float64, device="cpu")
    u_trans = torch.rand(n, 3, generator=generator, dtype=torch.float64, device="cpu")
    angles = rot_range[:, 0] + (rot_range[:, 1] - rot_range[:, 0]) * u_rot
    t = trans_range[:, 0] + (trans_range[:, 1] - trans_range[:, 0]) * u_trans
    B = torch.zeros(n, 4, 4, dtype=torch.float64)
    B[:, :3, :3] = euler_to_matrix(torch.deg2rad(angles), convention)
    B[:, :3, 3] = t
    B[:, 3, 3] = 1.0
    if ref is None:
        return B.to(dtype)
    out = ref @ B if frame == "local" else B @ ref
    out[:, 3] = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    assert reference is not None
    return out.to(device=reference.device, dtype=reference.dtype)
