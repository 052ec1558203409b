"""Self-supervised training data: DRRs of the patient's CT rendered on the fly at sampled C-arm poses.

:class:`PoseDataStream` is an infinite, seedable stream of training batches (DiffPose-style patient-specific
training). For each sample it draws a camera-to-world pose from a pose distribution, renders a monochromatic
(or polychromatic) DRR at the training size with the fast engine under :func:`torch.no_grad`, discards
near-empty views, and returns the image together with the pose and the **target** the network regresses.

Target parameterisation
-----------------------
Let ``F`` be the *reference frame* (a rigid ``(4, 4)`` world-from-frame transform): its origin is the anatomy
centre ``c`` (world mm) and its axes are those of the distribution's reference camera (for the C-arm
distribution: the C-arm pose at the middle of the angle ranges, i.e. the AP view for the default symmetric
ranges; for the Gaussian distribution: the given reference pose). For a camera-to-world pose ``T`` the target
is

    ``Y = T⁻¹ · F``  (the reference frame seen from the camera: ``camera_from_F``)

so ``Y[:3, 3] = Rᵀ (c − t)`` is **the anatomy centre in camera coordinates** (mm) and ``Y[:3, :3] = Rᵀ R_F``.
Unlike the source position, this translation hardly depends on the rotation for C-arm motions about the
isocentre (it stays near ``(0, 0, source_to_isocentre)`` plus the isocentre offset), and it is directly
visible in the image (2D position and magnification of the anatomy). The network predicts ``Y`` as a
rotation (6D head) and a translation normalised by :class:`~xraypose.learning.model.PoseNormalizer`
(``t_norm = (t_mm − mean) / scale``, mean and per-axis standard deviation of ``Y[:3, 3]`` over 4096 poses of
the full distribution). The camera-to-world pose is ``T = F · Y⁻¹`` (:func:`target_to_pose`). The geodesic
rotation error of ``Y`` equals that of ``T``.

Images
------
``drr`` are the raw ``−ln(I/I0)`` line integrals (bright = attenuating), ``(B, 1, S, S)`` on the stream's
device, rendered with the intrinsics resized to ``S × S`` pixels (the same physical detector,
:meth:`~xraypose.geometry.Intrinsics.resized`). ``images`` are the network inputs: each image standardised to
zero mean and unit standard deviation over its pixels (:func:`standardize`); X-rays must be normalised the
same way at inference. Domain randomisation (:mod:`xraypose.learning.augment`) acts on ``drr`` before the
standardisation.

Determinism and sharding
------------------------
Sample ``j`` of rank ``r`` at step ``s`` has the *global index* ``i = r · batch_size + j`` and is drawn from its
own generator seeded by ``(seed, s, i)`` (also for the redraws of rejected views). A batch is therefore a pure
function of ``(seed, rank, step)`` (given the batch size and the pose scale): resuming at any step is exact,
ranks draw different samples, and ``world_size`` ranks with ``batch_size = b`` see exactly the samples of one
process with ``batch_size = world_size · b``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from ..geometry.camera import Camera, Intrinsics, carm_pose
from ..geometry.sampling import CArmPoseDistribution, gaussian_se3_poses, sample_carm_poses
from ..geometry.se3 import invert, make_transform
from ..io.volume import Volume
from .model import PoseNormalizer

__all__ = [
    "GaussianPoseDistribution",
    "PoseBatch",
    "PoseDataStream",
    "PoseDistribution",
    "derive_seed",
    "distribution_from_dict",
    "distribution_to_dict",
    "pose_to_target",
    "reference_frame",
    "scale_distribution",
    "standardize",
    "target_to_pose",
]


# --------------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------------


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (integers or strings), well mixed (BLAKE2b)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------------
# Pose distributions
# --------------------------------------------------------------------------------------------------


def _triple(value: object, name: str, *, nonnegative: bool) -> tuple[float, float, float]:
    try:
        t = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except TypeError:
        t = (float(value),) * 3  # type: ignore[arg-type]
    except ValueError:
        t = ()
    if len(t) != 3 or not all(math.isfinite(v) and (v >= 0 or not nonnegative) for v in t):
        what = "finite values >= 0" if nonnegative else "finite values"
        raise InputError(f"GaussianPoseDistribution.{name}: expected one or three {what}; got {value!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class GaussianPoseDistribution:
    """A Gaussian in the se(3) tangent space around a reference pose (DiffPose's training distribution).

    Poses are :func:`~xraypose.geometry.sampling.gaussian_se3_poses` ``(reference, n, rotation_sigma,
    translation_sigma, translation_mean=..., frame=...)``.

    Attributes:
        reference: ``(4, 4)`` rigid camera-to-world reference pose (nested tuples, world RAS mm).
        rotation_sigma: standard deviation of the rotation part of the twist, radians (one or three values).
        translation_sigma: standard deviation of the translation part, mm (one or three values).
        translation_mean: mean of the translation part, mm (default 0).
        frame: ``"local"`` (camera axes, rotation about the source) or ``"world"``.
    """

    reference: tuple[tuple[float, ...], ...]
    rotation_sigma: tuple[float, float, float] = (0.1, 0.1, 0.1)
    translation_sigma: tuple[float, float, float] = (20.0, 20.0, 20.0)
    translation_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    frame: str = "local"

    def __post_init__(self) -> None:
        try:
            ref = torch.as_tensor(self.reference, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            ref = None
        if ref is not None and ref.shape == (1, 4, 4):
            ref = ref[0]
        if ref is None or ref.shape != (4, 4) or not bool(torch.isfinite(ref).all()):
            raise InputError(
                f"GaussianPoseDistribution.reference: expected a (4, 4) camera-to-world pose; got {self.reference!r}"
            )
        object.__setattr__(self, "reference", tuple(tuple(float(v) for v in row) for row in ref.tolist()))
        object.__setattr__(
            self, "rotation_sigma", _triple(self.rotation_sigma, "rotation_sigma", nonnegative=True)
        )
        object.__setattr__(
            self, "translation_sigma", _triple(self.translation_sigma, "translation_sigma", nonnegative=True)
        )
        object.__setattr__(
            self, "translation_mean", _triple(self.translation_mean, "translation_mean", nonnegative=False)
        )
        if self.frame not in ("local", "world"):
            raise InputError(
                f"GaussianPoseDistribution.frame: expected 'local' or 'world'; got {self.frame!r}"
            )

    @property
    def reference_pose(self) -> torch.Tensor:
        """``(4, 4)`` float64 reference pose."""
        return torch.tensor(self.reference, dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": [list(r) for r in self.reference],
            "rotation_sigma": list(self.rotation_sigma),
            "translation_sigma": list(self.translation_sigma),
            "translation_mean": list(self.translation_mean),
            "frame": self.frame,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GaussianPoseDistribution:
        return cls(**dict(data))


PoseDistribution = CArmPoseDistribution | GaussianPoseDistribution


def distribution_to_dict(dist: PoseDistribution) -> dict[str, Any]:
    """``{"kind": "carm" | "gaussian_se3", **fields}`` (JSON types)."""
    if isinstance(dist, CArmPoseDistribution):
        return {"kind": "carm", **dist.to_dict()}
    if isinstance(dist, GaussianPoseDistribution):
        return {"kind": "gaussian_se3", **dist.to_dict()}
    raise InputError(
        f"distribution: expected a CArmPoseDistribution or GaussianPoseDistribution; got {type(dist).__name__}"
    )


def distribution_from_dict(data: Mapping[str, Any]) -> PoseDistribution:
    """Inverse of :func:`distribution_to_dict`."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind == "carm":
        return CArmPoseDistribution.from_dict(data)
    if kind == "gaussian_se3":
        return GaussianPoseDistribution.from_dict(data)
    raise InputError(f"distribution: unknown kind {kind!r}; expected 'carm' or 'gaussian_se3'")


def scale_distribution(dist: PoseDistribution, scale: float) -> PoseDistribution:
    """The distribution with its spread multiplied by ``scale`` (the incremental-training pose range).

    C-arm: every angle range shrinks about its midpoint and the isocentre half-widths are scaled; Gaussian: the
    standard deviations are scaled (the mean is kept). ``scale = 1`` returns ``dist`` itself.
    """
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not (math.isfinite(scale) and scale >= 0)
    ):
        raise InputError(f"scale_distribution: 'scale' must be a finite number >= 0; got {scale!r}")
    if scale == 1:
        return dist
    if isinstance(dist, CArmPoseDistribution):

        def rng(r: tuple[float, float]) -> tuple[float, float]:
            mid = 0.5 * (r[0] + r[1])
            return (mid + scale * (r[0] - mid), mid + scale * (r[1] - mid))

        return CArmPoseDistribution(
            lao_deg=rng(dist.lao_deg),
            cranial_deg=rng(dist.cranial_deg),
            inplane_deg=rng(dist.inplane_deg),
            isocenter_offset_mm=tuple(scale * h for h in dist.isocenter_offset_mm),  # type: ignore[arg-type]
            source_to_isocenter_mm=dist.source_to_isocenter_mm,
        )
    if isinstance(dist, GaussianPoseDistribution):
        return GaussianPoseDistribution(
            reference=dist.reference,
            rotation_sigma=tuple(scale * s for s in dist.rotation_sigma),  # type: ignore[arg-type]
            translation_sigma=tuple(scale * s for s in dist.translation_sigma),  # type: ignore[arg-type]
            translation_mean=dist.translation_mean,
            frame=dist.frame,
        )
    raise InputError(f"scale_distribution: unsupported distribution {type(dist).__name__}")


def _sample(dist: PoseDistribution, n: int, center: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(n, 4, 4)`` float64 camera-to-world poses (CPU)."""
    if isinstance(dist, CArmPoseDistribution):
        return sample_carm_poses(dist, n, center, generator=generator)
    return gaussian_se3_poses(
        dist.reference_pose,
        n,
        dist.rotation_sigma,
        dist.translation_sigma,
        translation_mean=dist.translation_mean,
        frame=dist.frame,
        generator=generator,
    )


def reference_frame(
    dist: PoseDistribution, center_world: torch.Tensor | tuple[float, float, float]
) -> torch.Tensor:
    """The ``(4, 4)`` float64 reference frame ``F`` of the targets (see the module docstring): origin at the
    anatomy centre, axes of the distribution's reference camera."""
    c = torch.as_tensor(center_world, dtype=torch.float64).cpu()
    if c.shape != (3,) or not bool(torch.isfinite(c).all()):
        raise InputError(
            f"reference_frame: center_world must be a finite (x, y, z) point in mm; got {c.tolist()}"
        )
    if isinstance(dist, CArmPoseDistribution):
        mids = [0.5 * (r[0] + r[1]) for r in (dist.lao_deg, dist.cranial_deg, dist.inplane_deg)]
        rot = carm_pose(*mids, source_to_isocenter=dist.source_to_isocenter_mm, dtype=torch.float64)[
            0, :3, :3
        ]
    elif isinstance(dist, GaussianPoseDistribution):
        rot = dist.reference_pose[:3, :3]
    else:
        raise InputError(f"reference_frame: unsupported distribution {type(dist).__name__}")
    return make_transform(rot, c)


def pose_to_target(pose: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Regression target ``Y = T⁻¹ · F`` of camera-to-world poses ``T`` ``(..., 4, 4)``; computed in float64,
    returned in ``pose``'s dtype and device."""
    out = invert(pose.double()) @ frame.to(device=pose.device, dtype=torch.float64)
    return out.to(pose.dtype)


def target_to_pose(target: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Camera-to-world pose ``T = F · Y⁻¹`` of targets (or network predictions) ``Y`` ``(..., 4, 4)``."""
    out = frame.to(device=target.device, dtype=torch.float64) @ invert(target.double())
    return out.to(target.dtype)


def standardize(images: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-image standardisation: ``(x − mean) / (std + eps)`` over all dimensions but the first (batch).

    Makes the network input invariant to the (arbitrary) affine scale of line integrals, so the same
    normalisation applies to DRRs and to log-transformed X-rays. A constant image becomes all zeros.
    """
    if not isinstance(images, torch.Tensor) or images.ndim < 2 or not images.is_floating_point():
        raise InputError("standardize: 'images' must be a floating tensor (B, ...)")
    dims = tuple(range(1, images.ndim))
    mean = images.mean(dim=dims, keepdim=True)
    std = images.std(dim=dims, keepdim=True, unbiased=False)
    return (images - mean) / (std + eps)


# --------------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PoseBatch:
    """One training batch (tensors on the stream's device unless said otherwise).

    Attributes:
        images: ``(B, 1, S, S)`` float32 standardised DRRs (:func:`standardize` of ``drr``).
        drr: ``(B, 1, S, S)`` float32 raw ``−ln(I/I0)`` line integrals.
        poses: ``(B, 4, 4)`` float32 camera-to-world poses (world RAS mm of the sample's CT).
        targets: ``(B, 4, 4)`` float32 regression targets ``Y = T⁻¹ · F`` (module docstring), ``F`` the
            reference frame of the sample's CT.
        translation_norm: ``(B, 3)`` float32 ``normalizer.normalize(targets[:, :3, 3])``.
        step: the step the batch belongs to.
        rank: the rank that drew it.
        redraws: number of views rejected as near-empty (or with the source inside the CT) and redrawn.
        ct_index: ``(B,)`` int64 (CPU): which of the stream's CTs each sample was rendered from.
        crop_boxes: ``(B, 2, 3)`` int64 (CPU): the box of that CT rendered, as voxel-index bounds
            ``lo <= (i, j, k) < hi`` of the CT's grid (the whole grid ``[0, shape)`` when not cropped).
    """

    images: torch.Tensor
    drr: torch.Tensor
    poses: torch.Tensor
    targets: torch.Tensor
    translation_norm: torch.Tensor
    step: int
    rank: int
    redraws: int = 0
    ct_index: torch.Tensor | None = None
    crop_boxes: torch.Tensor | None = None


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"PoseDataStream: '{name}' must be an integer >= {low}; got {value!r}")
    return value


def _check_number(value: object, name: str, low: float, high: float = math.inf) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        limits = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise InputError(f"PoseDataStream: '{name}' must be a finite number {limits}; got {value!r}")
    return float(value)


@dataclass(eq=False)
class _Source:
    """One CT of a stream, bound to its renderer (internal)."""

    ct: Volume
    center: torch.Tensor  # (3,) float64 world mm
    frame: torch.Tensor  # (4, 4) float64 reference frame F
    renderer: Any
    pyramid_factors: tuple[int, int, int]
    inv_affine: torch.Tensor  # (4, 4) float64 world -> voxel index
    shape: torch.Tensor  # (3,) float64


@dataclass(eq=False)
class PoseDataStream:
    """Infinite, seedable stream of training batches rendered from one CT or several (module docstring).

    **Several CTs** (patient-agnostic pretraining): each sample first draws which CT it is rendered from, with
    probabilities proportional to ``ct_weights``, from its own generator seeded by ``(seed, step, global
    index)``; the choice is kept when the view is redrawn, so rejections do not bias the weights. Poses are
    drawn about that CT's anatomy centre and the target ``Y = T⁻¹ · F_k`` uses that CT's reference frame
    ``F_k`` (origin at its anatomy centre, axes of the distribution's reference camera): the target law is
    the same for every CT, and one normaliser serves them all (fitted on the first CT's draw; for the C-arm
    distribution it does not depend on the CT). Several CTs need a
    :class:`~xraypose.geometry.sampling.CArmPoseDistribution`.

    **Random crops**: with probability ``crop_probability`` a sample renders only a random sub-box of its CT,
    axis-aligned in the voxel grid: along each index axis its side is uniform in ``[min(crop_min_mm,
    extent), extent]`` mm (rounded to whole voxels), and its position is uniform among those that keep the
    box inside the grid and the anatomy centre inside the box. The box is snapped outwards to the voxels of
    the pyramid level rendered (:meth:`_make_renderer`); :attr:`PoseBatch.crop_boxes` holds the box actually
    rendered. Crops change the image, never the target (the world frame is unchanged).

    Args:
        ct: the patient's CT (HU), or a sequence of CTs.
        intrinsics: the C-arm detector (any resolution); images are rendered on the same physical detector
            resampled to ``image_size × image_size`` pixels.
        image_size: side ``S`` of the training images.
        batch_size: samples per batch **of this rank**.
        distribution: :class:`~xraypose.geometry.sampling.CArmPoseDistribution` (default: its defaults, the
            benchmark's C-arm ranges) or :class:`GaussianPoseDistribution` (one CT only).
        center_world: anatomy centre (world mm) the C-arm views aim at and origin of the reference frame;
            default :func:`xraypose.datasets.synthetic.anatomy_center` (labels, else bone, else box centre) of
            each CT. With several CTs: ``None`` or one centre per CT (``(n, 3)``).
        ct_weights: sampling weights of the CTs (default equal), finite, ``>= 0``, not all zero.
        crop_probability: probability of rendering a random sub-box of the CT instead of all of it.
        crop_min_mm: smallest side of a crop box, mm (per axis, capped at the CT's extent).
        seed: base seed.
        rank, world_size: this process's shard (``0 <= rank < world_size``).
        device: where volumes, renders and batches live.
        physics: ``"mono"`` or ``"poly"`` (:class:`~xraypose.registration.VolumeRenderer`).
        foreground_level: a pixel is foreground when its line integral exceeds this (dimensionless).
        min_foreground: a view is kept when at least this fraction of its pixels is foreground (xvr-style
            rejection of near-empty DRRs); ``0`` keeps everything.
        max_redraws: per sample; past it the stream raises :class:`InputError` (the distribution misses the CT).
        normalizer: translation normaliser; default fitted on 4096 targets of the full distribution.
        render_options: passed to the renderer (``method``, ``step_mm``, ...); ``multires`` (default on for
            trilinear) selects one pyramid level per CT for the whole stream (see :meth:`_make_renderer`), so
            that a sample's DRR never depends on the other samples of its batch.
    """

    ct: Volume | Sequence[Volume]
    intrinsics: Intrinsics
    image_size: int = 128
    batch_size: int = 8
    distribution: PoseDistribution | None = None
    center_world: Any = None
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    device: torch.device | str = "cpu"
    physics: str = "mono"
    foreground_level: float = 0.1
    min_foreground: float = 0.1
    max_redraws: int = 100
    normalizer: PoseNormalizer | None = None
    render_options: dict[str, Any] = field(default_factory=dict)
    ct_weights: Sequence[float] | None = None
    crop_probability: float = 0.0
    crop_min_mm: float = 100.0

    def __post_init__(self) -> None:
        if isinstance(self.ct, Volume):
            cts: tuple[Volume, ...] = (self.ct,)
        elif isinstance(self.ct, (list, tuple)) and self.ct and all(isinstance(v, Volume) for v in self.ct):
            cts = tuple(self.ct)
        else:
            raise InputError(
                f"PoseDataStream: 'ct' must be a Volume or a non-empty sequence of Volumes; got "
                f"{type(self.ct).__name__}"
            )
        self.cts = cts
        self.ct = cts[0]
        if not isinstance(self.intrinsics, Intrinsics):
            raise InputError(
                f"PoseDataStream: 'intrinsics' must be Intrinsics; got {type(self.intrinsics).__name__}"
            )
        _check_int(self.image_size, "image_size", 8)
        _check_int(self.batch_size, "batch_size", 1)
        _check_int(self.seed, "seed", 0)
        _check_int(self.world_size, "world_size", 1)
        _check_int(self.rank, "rank", 0)
        _check_int(self.max_redraws, "max_redraws", 0)
        if self.rank >= self.world_size:
            raise InputError(
                f"PoseDataStream: 'rank' ({self.rank}) must be < 'world_size' ({self.world_size})"
            )
        _check_number(self.foreground_level, "foreground_level", -math.inf)
        _check_number(self.min_foreground, "min_foreground", 0.0, 1.0)
        self.crop_probability = _check_number(self.crop_probability, "crop_probability", 0.0, 1.0)
        self.crop_min_mm = _check_number(self.crop_min_mm, "crop_min_mm", 1e-6)
        self.ct_probabilities = self._probabilities(self.ct_weights, len(cts))
        self.distribution = CArmPoseDistribution() if self.distribution is None else self.distribution
        distribution_to_dict(self.distribution)  # type check
        if len(cts) > 1 and not isinstance(self.distribution, CArmPoseDistribution):
            raise InputError(
                "PoseDataStream: several CTs need a CArmPoseDistribution (aimed at each CT's anatomy centre); "
                "a GaussianPoseDistribution's reference pose lies in one CT's world"
            )
        if (
            isinstance(self.distribution, CArmPoseDistribution)
            and self.distribution.source_to_isocenter_mm >= self.intrinsics.sdd
        ):
            raise InputError(
                f"PoseDataStream: distribution.source_to_isocenter_mm ({self.distribution.source_to_isocenter_mm:g}"
                f" mm) must be smaller than the source-to-detector distance ({self.intrinsics.sdd:g} mm)"
            )
        centers = self._centers(self.center_world, cts)
        self.device = torch.device(self.device)
        self.train_intrinsics = self.intrinsics.resized(self.image_size)
        g = torch.Generator().manual_seed(derive_seed(self.seed, "normalizer"))
        nominal = _sample(self.distribution, 4096, centers[0], g)
        frames = [reference_frame(self.distribution, c) for c in centers]
        if self.normalizer is None:
            self.normalizer = PoseNormalizer.from_translations(pose_to_target(nominal, frames[0])[:, :3, 3])
        elif not isinstance(self.normalizer, PoseNormalizer):
            raise InputError(
                f"PoseDataStream: 'normalizer' must be a PoseNormalizer; got {type(self.normalizer).__name__}"
            )
        self._sources: list[_Source] = []
        for k, (vol, centre, frame) in enumerate(zip(cts, centers, frames, strict=True)):
            if k > 0:
                g = torch.Generator().manual_seed(derive_seed(self.seed, "normalizer"))
                nominal = _sample(self.distribution, 4096, centre, g)
            renderer, factors = self._make_renderer(vol, nominal)
            self._sources.append(
                _Source(
                    ct=vol,
                    center=centre,
                    frame=frame,
                    renderer=renderer,
                    pyramid_factors=factors,
                    inv_affine=torch.linalg.inv(vol.affine.detach().cpu().double()),
                    shape=torch.tensor(vol.shape, dtype=torch.float64),
                )
            )
        first = self._sources[0]
        # the single-CT view (the first CT) kept for callers of one-CT streams
        self.center, self.frame = first.center, first.frame
        self.renderer, self.pyramid_factors = first.renderer, first.pyramid_factors
        self.centers = [s.center for s in self._sources]
        self.frames = [s.frame for s in self._sources]

    @staticmethod
    def _probabilities(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
        if weights is None:
            return (1.0 / n,) * n
        try:
            w = [float(v) for v in weights]  # type: ignore[union-attr]
        except (TypeError, ValueError):
            w = []
        if len(w) != n or not all(math.isfinite(v) and v >= 0 for v in w) or sum(w) <= 0:
            raise InputError(
                f"PoseDataStream: 'ct_weights' must be {n} finite numbers >= 0 (one per CT), not all zero; "
                f"got {weights!r}"
            )
        total = sum(w)
        return tuple(v / total for v in w)

    @staticmethod
    def _centers(center_world: Any, cts: tuple[Volume, ...]) -> list[torch.Tensor]:
        if center_world is None:
            from ..datasets.synthetic import anatomy_center

            return [anatomy_center(v).detach().to(device="cpu", dtype=torch.float64) for v in cts]
        try:
            c = torch.as_tensor(center_world, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            c = torch.empty(0)
        if len(cts) == 1 and c.shape == (3,):
            c = c[None]
        if c.shape != (len(cts), 3) or not bool(torch.isfinite(c).all()):
            raise InputError(
                f"PoseDataStream: 'center_world' must be None or {'a point (x, y, z)' if len(cts) == 1 else ''}"
                f"{' or ' if len(cts) == 1 else ''}one finite point per CT ({len(cts)}, 3) in mm; got "
                f"shape {tuple(c.shape)}"
            )
        return list(c.unbind(0))

    def _make_renderer(self, ct: Volume, nominal: torch.Tensor) -> tuple[Any, tuple[int, int, int]]:
        """The renderer of ``ct``, at a pyramid level fixed for the whole stream, and its pooling factors.

        ``render``'s automatic multi-resolution picks the level from the closest view *of each call*, so a
        sample's DRR would depend on the other samples of its batch. The level is chosen here once, by the same
        rule (voxels within 1.5 pixel footprints at the CT centre), for the closest source of ``nominal``
        poses (the full distribution), and rendering runs with ``multires=False`` on it.
        """
        from ..registration.renderers import VolumeRenderer
        from ..render.drr import downsample_volume, pyramid_factors

        opts = dict(self.render_options)
        multires = opts.pop("multires", None)
        if multires is None:
            multires = opts.get("method", "trilinear") == "trilinear"
        renderer = VolumeRenderer(ct, self.physics, multires=False, **opts)  # type: ignore[arg-type]
        factors: tuple[int, int, int] = (1, 1, 1)
        if multires:
            centre = ct.center_world.detach().cpu().double()
            dist = max(float((nominal[:, :3, 3] - centre).norm(dim=-1).min()), 1e-3)
            ti = self.train_intrinsics
            footprint = min(ti.dx, ti.dy) * dist / ti.sdd
            level = pyramid_factors(tuple(float(v) for v in ct.spacing.cpu()), footprint)
            if level != (1, 1, 1):
                vol = renderer.volume
                pooled, affine = downsample_volume(vol.unsqueeze(0), renderer.affine, level)
                renderer.volume, renderer.affine = pooled[0], affine
                factors = tuple(int(f) for f in level)  # type: ignore[assignment]
        return renderer.to(self.device), factors

    # ----------------------------------------------------------------------------------------------

    @property
    def n_cts(self) -> int:
        return len(self._sources)

    def fit_normalizer(self, n: int = 4096) -> PoseNormalizer:
        """Mean and per-axis std of the target translations of ``n`` poses of the full distribution (a fixed
        draw of ``seed`` about the first CT; at least 1 mm per axis)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "normalizer"))
        poses = _sample(self.distribution, n, self.center, g)  # type: ignore[arg-type]
        return PoseNormalizer.from_translations(pose_to_target(poses, self.frame)[:, :3, 3])

    def ct_indices(self, step: int) -> torch.Tensor:
        """``(batch_size,)`` int64: the CT each sample of this rank's batch at ``step`` is rendered from (a pure
        function of ``(seed, rank, step)``; all zeros with one CT)."""
        _check_int(step, "step", 0)
        b, first = self.batch_size, self.rank * self.batch_size
        if self.n_cts == 1:
            return torch.zeros(b, dtype=torch.int64)
        cdf = torch.tensor(self.ct_probabilities, dtype=torch.float64).cumsum(0)
        u = torch.cat(
            [
                torch.rand(
                    1,
                    generator=torch.Generator().manual_seed(derive_seed(self.seed, "ct", step, first + j)),
                    dtype=torch.float64,
                )
                for j in range(b)
            ]
        )
        return torch.searchsorted(cdf, u, right=True).clamp_max(self.n_cts - 1)

    def _full_box(self, k: int) -> torch.Tensor:
        return torch.tensor([[0, 0, 0], list(self._sources[k].ct.shape)], dtype=torch.int64)

    def _draw_crop(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """``(2, 3)`` int64 voxel-index bounds of the box of CT ``k`` to render (class docstring)."""
        src = self._sources[k]
        shape = [int(v) for v in src.ct.shape]
        draws = torch.rand(7, generator=generator, dtype=torch.float64).tolist()
        if draws[0] >= self.crop_probability:
            return self._full_box(k)
        spacing = [float(v) for v in src.ct.spacing.cpu()]
        centre = src.inv_affine[:3, :3] @ src.center + src.inv_affine[:3, 3]
        lo, hi = [0, 0, 0], [0, 0, 0]
        for a in range(3):
            extent = shape[a] * spacing[a]
            side = min(self.crop_min_mm, extent) + draws[1 + a] * (extent - min(self.crop_min_mm, extent))
            n = min(shape[a], max(1, round(side / spacing[a])))
            c = min(shape[a] - 1, max(0, round(float(centre[a]))))
            first, last = max(0, c - n + 1), min(c, shape[a] - n)
            start = first + min(last - first, int(draws[4 + a] * (last - first + 1)))
            lo[a], hi[a] = start, start + n
        f = src.pyramid_factors
        lo = [(lo[a] // f[a]) * f[a] for a in range(3)]
        hi = [min(shape[a], -(-hi[a] // f[a]) * f[a]) for a in range(3)]
        return torch.tensor([lo, hi], dtype=torch.int64)

    def _cropped_renderer(self, k: int, box: torch.Tensor) -> Any:
        """A shallow copy of CT ``k``'s renderer bound to the sub-box ``box`` of its (pyramid-level) volume."""
        import copy

        src = self._sources[k]
        f = torch.tensor(src.pyramid_factors, dtype=torch.int64)
        a = (box[0] // f).tolist()
        b = (-(-box[1] // f)).tolist()
        r = copy.copy(src.renderer)
        vol = src.renderer.volume
        r.volume = vol[a[0] : b[0], a[1] : b[1], a[2] : b[2]].contiguous()
        shift = torch.eye(4, dtype=src.renderer.affine.dtype, device=src.renderer.affine.device)
        shift[:3, 3] = torch.tensor(a, dtype=shift.dtype, device=shift.device)
        r.affine = src.renderer.affine @ shift
        return r

    def _source_inside(self, poses: torch.Tensor, ks: torch.Tensor | None = None) -> torch.Tensor:
        ks = torch.zeros(poses.shape[0], dtype=torch.int64) if ks is None else ks
        out = torch.zeros(poses.shape[0], dtype=torch.bool)
        for k in ks.unique().tolist():
            sel = ks == k
            src = self._sources[k]
            idx = poses[sel, :3, 3] @ src.inv_affine[:3, :3].T + src.inv_affine[:3, 3]
            out[sel] = ((idx > -0.5) & (idx < src.shape - 0.5)).all(-1)
        return out

    def _render_with(self, renderer: Any, poses: torch.Tensor) -> torch.Tensor:
        cam = Camera(self.train_intrinsics, poses.to(device=self.device, dtype=torch.float32))
        with torch.no_grad():
            img = renderer(cam)
        return img.to(torch.float32).reshape(poses.shape[0], 1, self.image_size, self.image_size)

    def render(
        self, poses: torch.Tensor, ct_index: int = 0, crop_box: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw line-integral DRRs ``(n, 1, S, S)`` float32 of camera-to-world poses of CT ``ct_index`` (all of
        it, or the voxel-index box ``crop_box`` ``(2, 3)`` snapped to its pyramid level), without gradients."""
        if isinstance(ct_index, bool) or not isinstance(ct_index, int) or not 0 <= ct_index < self.n_cts:
            raise InputError(
                f"PoseDataStream.render: 'ct_index' must be in [0, {self.n_cts}); got {ct_index!r}"
            )
        if crop_box is None:
            return self._render_with(self._sources[ct_index].renderer, poses)
        return self._render_with(self._cropped_renderer(ct_index, torch.as_tensor(crop_box)), poses)

    def _render_samples(self, poses: torch.Tensor, ks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """DRRs of samples (each with its CT and box): uncropped samples of one CT in one call, crops alone."""
        out = torch.empty(poses.shape[0], 1, self.image_size, self.image_size, device=self.device)
        full = torch.tensor([torch.equal(boxes[i], self._full_box(int(ks[i]))) for i in range(len(ks))])
        for k in ks.unique().tolist():
            sel = torch.nonzero((ks == k) & full).flatten()
            if sel.numel():
                out[sel.to(self.device)] = self._render_with(self._sources[k].renderer, poses[sel])
        for i in torch.nonzero(~full).flatten().tolist():
            r = self._cropped_renderer(int(ks[i]), boxes[i])
            out[i] = self._render_with(r, poses[i : i + 1])[0]
        return out

    def _keep(self, drr: torch.Tensor) -> torch.Tensor:
        frac = (drr > self.foreground_level).float().mean(dim=(1, 2, 3))
        return (frac >= self.min_foreground).cpu()

    def batch(self, step: int, *, pose_scale: float = 1.0) -> PoseBatch:
        """The batch of this rank at ``step``: a pure function of ``(seed, rank, step, batch_size, pose_scale)``."""
        _check_int(step, "step", 0)
        dist = scale_distribution(self.distribution, pose_scale)  # type: ignore[arg-type]
        b = self.batch_size
        first = self.rank * b
        gens = [
            torch.Generator().manual_seed(derive_seed(self.seed, "sample", step, first + j)) for j in range(b)
        ]
        ks = self.ct_indices(step)
        crop_gens = (
            [torch.Generator().manual_seed(derive_seed(self.seed, "crop", step, first + j)) for j in range(b)]
            if self.crop_probability > 0
            else None
        )

        def draw_box(j: int) -> torch.Tensor:
            k = int(ks[j])
            return self._full_box(k) if crop_gens is None else self._draw_crop(k, crop_gens[j])

        poses = torch.cat([_sample(dist, 1, self.centers[int(ks[j])], gens[j]) for j in range(b)])
        boxes = torch.stack([draw_box(j) for j in range(b)])
        drr = torch.empty(b, 1, self.image_size, self.image_size, device=self.device)
        todo = torch.arange(b)
        redraws = 0
        for attempt in range(self.max_redraws + 1):
            inside = self._source_inside(poses[todo], ks[todo])
            ok = ~inside
            if bool(ok.any()):
                idx = todo[ok]
                img = self._render_samples(poses[idx], ks[idx], boxes[idx])
                drr[idx.to(self.device)] = img
                ok[ok.clone()] = self._keep(img)
            todo = todo[~ok]
            if todo.numel() == 0:
                break
            if attempt == self.max_redraws:
                raise InputError(
                    f"PoseDataStream: {todo.numel()} sample(s) at step {step} gave near-empty DRRs (or a source "
                    f"inside the CT) {self.max_redraws + 1} times in a row; the pose distribution misses the CT "
                    f"(check center_world and the ranges) or lower min_foreground ({self.min_foreground})"
                )
            redraws += int(todo.numel())
            for j in todo.tolist():
                poses[j] = _sample(dist, 1, self.centers[int(ks[j])], gens[j])[0]
                boxes[j] = draw_box(j)
        frames = self.frames[0] if self.n_cts == 1 else torch.stack([self.frames[int(k)] for k in ks])
        targets = pose_to_target(poses, frames)
        t_norm = self.normalizer.normalize(targets[:, :3, 3])  # type: ignore[union-attr]
        dev = self.device
        return PoseBatch(
            images=standardize(drr),
            drr=drr,
            poses=poses.to(device=dev, dtype=torch.float32),
            targets=targets.to(device=dev, dtype=torch.float32),
            translation_norm=t_norm.to(device=dev, dtype=torch.float32),
            step=step,
            rank=self.rank,
            redraws=redraws,
            ct_index=ks,
            crop_boxes=boxes,
        )

    def batches(
        self, start_step: int = 0, pose_scale: float | Callable[[int], float] = 1.0
    ) -> Iterator[PoseBatch]:
        """Batches of steps ``start_step, start_step + 1, …`` forever; ``pose_scale`` may depend on the step."""
        step = _check_int(start_step, "start_step", 0)
        while True:
            scale = pose_scale(step) if callable(pose_scale) else pose_scale
            yield self.batch(step, pose_scale=scale)
            step += 1

    def __iter__(self) -> Iterator[PoseBatch]:
        return self.batches(0)

    def describe(self) -> dict[str, Any]:
        """JSON description (distribution, centres, reference frames, CT weights, crops, detector, rendering).

        With one CT ``center_world`` and ``reference_frame`` are its own; with several they are ``None`` and
        ``cts`` lists each CT's (its shape, sampling probability, centre and frame)."""
        single = self.n_cts == 1
        return {
            "distribution": distribution_to_dict(self.distribution),  # type: ignore[arg-type]
            "center_world": self.center.tolist() if single else None,
            "reference_frame": self.frame.tolist() if single else None,
            "cts": [
                {
                    "shape": list(s.ct.shape),
                    "probability": p,
                    "center_world": s.center.tolist(),
                    "reference_frame": s.frame.tolist(),
                    "pyramid_factors": list(s.pyramid_factors),
                }
                for s, p in zip(self._sources, self.ct_probabilities, strict=True)
            ],
            "target": "Y = inverse(T_world_from_camera) @ reference_frame (anatomy frame seen from the camera); "
            "T = reference_frame @ inverse(Y), with the reference frame of the CT the image shows",
            "crop": {
                "probability": self.crop_probability,
                "min_mm": self.crop_min_mm,
                "rule": "sub-box axis-aligned in the voxel grid, side per axis uniform in [min(min_mm, extent), "
                "extent] mm, containing the anatomy centre",
            },
            "image_size": self.image_size,
            "training_intrinsics": self.train_intrinsics.to_dict(),
            "physics": self.physics,
            "image_normalization": "per-image standardisation of -ln(I/I0): (x - mean) / (std + 1e-6)",
            "foreground_level": self.foreground_level,
            "min_foreground": self.min_foreground,
        }
