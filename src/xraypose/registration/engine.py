"""Test-time pose optimisation: gradient descent through a differentiable renderer in se(3).

The pose is ``T(ξ) = T0 · P · exp(ξ) · P⁻¹``: the initial camera-to-world pose ``T0`` composed with a twist
``ξ = (v, ω)`` (mm, rad) expressed in a frame parallel to the camera's and centred on a **pivot** (by default
the CT's centre, as seen from the initial camera), ``P`` the translation to that pivot. Rotating about the
anatomy rather than about the X-ray source keeps rotation and translation nearly decoupled, so one step size
per group suits every pose. Euler-angle and quaternion parameterisations of the same local motion are
available for comparison.

One call optimises ``B`` independent problems at once (several X-rays, or several restarts of one): Adam with
separate learning rates for rotation and translation, a coarse-to-fine detector schedule (each level renders
the same physical detector with fewer pixels and compares with the area-downsampled target), optional sparse
rendering (random square patches per step), learning-rate reduction on plateaus and early stopping, the best
pose per problem, and a divergence guard (a non-finite loss or pose restores that problem's best pose).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..errors import GeometryError, InputError
from ..geometry.camera import Camera, Intrinsics, validate_pose
from ..geometry.rotations import euler_to_matrix, quaternion_to_matrix
from ..geometry.se3 import compose, invert, make_transform, se3_exp, transform_points
from ..losses import scatter_pixels
from ..render import random_patch_pixels
from .renderers import Physics, Renderer

__all__ = [
    "PRESETS",
    "Parameterization",
    "RegistrationConfig",
    "RegistrationResult",
    "Scale",
    "Search",
    "Solver",
    "Step",
    "preset",
    "register",
    "search_starts",
]

Parameterization = Literal["se3", "euler", "quaternion"]
Solver = Literal["adam", "newton"]
LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Scale:
    """One level of the coarse-to-fine schedule.

    Args:
        size: detector rows at this level (columns follow the detector's aspect ratio); a level is never
            rendered finer than the X-ray itself (its rows cap ``size``).
        iterations: at most this many steps.
        lr_rotation: Adam step size of the rotation parameters (rad for se(3) and Euler).
        lr_translation: Adam step size of the translation parameters (mm).
        patches: ``(n_patches, patch_size)`` random square patches rendered per step (sparse rendering), or
            ``None`` for the whole detector.
        physics: render this level with the renderer's ``with_physics(physics)`` view (``"mono"`` or
            ``"poly"``, e.g. a polychromatic last level after monochromatic coarse ones), or ``None`` for the
            renderer as given. Needs a renderer with ``with_physics``
            (:class:`~xraypose.registration.VolumeRenderer`).
        noise_weight: ``gamma`` of :func:`xraypose.losses.quantum_noise_weights`: the level's loss weights
            each pixel of the (downsampled) X-ray by ``exp(−gamma · (p̄ − min p̄))``, the inverse variance of
            Poisson quantum noise in the ``−ln(I/I0)`` domain for ``gamma = 1``, so that the least attenuated,
            least noisy pixels count most; ``0`` (default) weights every pixel alike. Meant for a last,
            full-resolution level, where the X-ray's noise, not the capture range, limits the accuracy; it
            needs targets in natural-log units (``−ln(I/I0)``, as :func:`~xraypose.physics.simulate_xray`
            writes them).
        solver: ``"adam"`` (default; the learning rates are Adam's step sizes) or ``"newton"``: damped
            Newton steps (Levenberg–Marquardt) on the exact gradient through the renderer, with the Hessian of
            the loss through the image linearised in the pose (a finite-difference Jacobian of the image,
            ``n_params`` extra renders in one batch at the start of the level); the learning rates are then
            the largest step per iteration (a trust radius). Converges in a few steps near the minimum, so it
            suits the last, most expensive levels; it cannot be combined with ``patches``.
        loss: this level's loss (an :class:`xraypose.losses.ImageLoss` spec or a callable), or ``None`` for
            the configuration's. E.g. ``"pwls"`` (:func:`xraypose.losses.poisson_wls`) on a last,
            polychromatic, whole-detector level.
    """

    size: int
    iterations: int
    lr_rotation: float = 1e-2
    lr_translation: float = 1.0
    patches: tuple[int, int] | None = None
    physics: Physics | None = None
    noise_weight: float = 0.0
    solver: Solver = "adam"
    loss: str | LossFn | None = None

    def __post_init__(self) -> None:
        if self.size < 4 or self.iterations < 0:
            raise InputError(
                f"scale: expected size ≥ 4 pixels and iterations ≥ 0, got {self.size}, {self.iterations}"
            )
        if not (self.lr_rotation > 0 and self.lr_translation > 0):
            raise InputError(
                f"scale: learning rates must be positive, got {self.lr_rotation}, {self.lr_translation}"
            )
        if self.physics not in (None, "mono", "poly"):
            raise InputError(f"scale: physics must be None, 'mono' or 'poly', got {self.physics!r}")
        if not (isinstance(self.noise_weight, (int, float)) and 0 <= self.noise_weight < math.inf):
            raise InputError(f"scale: noise_weight must be a finite number ≥ 0, got {self.noise_weight!r}")
        if self.solver not in ("adam", "newton"):
            raise InputError(f"scale: solver must be 'adam' or 'newton', got {self.solver!r}")
        if self.loss is not None and not (callable(self.loss) or isinstance(self.loss, str)):
            raise InputError(f"scale: loss must be an ImageLoss spec, a callable or None, got {self.loss!r}")
        if isinstance(
            self.loss, str
        ):  # a bad spec fails here, naming the problem, not in the middle of a run
            from ..losses import ImageLoss

            ImageLoss.parse(self.loss)
        if self.solver == "newton" and self.patches is not None:
            raise InputError("scale: the 'newton' solver renders the whole detector; set patches=None")


def _level_renderer(renderer: Renderer, physics: Physics | None) -> Renderer:
    """``renderer`` itself, or its ``with_physics(physics)`` view for a level that asks for one."""
    if physics is None:
        return renderer
    with_physics = getattr(renderer, "with_physics", None)
    if not callable(with_physics):
        raise InputError(
            f"scale physics {physics!r}: the renderer ({type(renderer).__name__}) has no with_physics(); use a "
            "VolumeRenderer or leave Scale.physics at None"
        )
    return with_physics(physics)


@dataclass(frozen=True)
class Search:
    """A multi-start search run before the schedule, to widen the capture range.

    Every problem is started from ``starts`` poses at once (one batched render per step): the initial pose
    and ``starts − 1`` poses rotated from it by ``rotation_deg`` about the pivot, about axes spread evenly in
    the detector plane (the out-of-plane rotations a single view resolves worst; see :func:`search_starts`).
    Each start descends ``iterations`` steps at ``size`` pixels; the start whose pose then scores best (exact
    loss on the whole detector at that size) continues into the schedule.

    Args:
        size: detector rows of the search renders (columns follow the aspect ratio).
        iterations: steps per start.
        starts: poses per problem (1 = plain descent at this size).
        rotation_deg: angle of the extra starts (degrees).
        lr_rotation: Adam step size of the rotation (rad).
        lr_translation: Adam step size of the translation (mm).
    """

    size: int = 32
    iterations: int = 60
    starts: int = 9
    rotation_deg: float = 15.0
    lr_rotation: float = 3e-2
    lr_translation: float = 3.0

    def __post_init__(self) -> None:
        if self.size < 4 or self.iterations < 1 or self.starts < 1:
            raise InputError(
                "search: expected size ≥ 4 pixels, iterations ≥ 1 and starts ≥ 1, got "
                f"{self.size}, {self.iterations}, {self.starts}"
            )
        if not (0 <= self.rotation_deg <= 180):
            raise InputError(f"search: rotation_deg must lie in [0, 180], got {self.rotation_deg}")
        if not (self.lr_rotation > 0 and self.lr_translation > 0):
            raise InputError(
                f"search: learning rates must be positive, got {self.lr_rotation}, {self.lr_translation}"
            )


@dataclass(frozen=True)
class RegistrationConfig:
    """Settings of :func:`register`.

    The defaults (the ``"default"`` entry of :data:`PRESETS`): a 9-start :class:`Search` at 32 px, then
    64 → 128 px (xvr's coarse-to-fine schedule with shorter levels), loss 0.5 × multiscale NCC + 0.5 × gradient
    NCC, learning rates halved after 5 steps without improvement and a level ended after 15. They were tuned on
    the synthetic pelvis and chest benchmarks (``docs/benchmarks.md``): every case from 20°/40 mm converges,
    in about 3 s per registration on a 2-core CPU. The ``"fine"`` preset keeps the search and the 64 px level,
    then renders polychromatically (``Scale.physics = "poly"``, so it needs a renderer with ``with_physics``,
    such as :class:`~xraypose.registration.VolumeRenderer`) at 128 px and at the full 256 px detector, each
    with damped Newton steps (``Scale.solver = "newton"``, a few steps per level) on the Poisson likelihood of
    the X-ray's transmission with a fitted gain and kernel scatter (``Scale.loss = "pwls"``,
    :func:`xraypose.losses.poisson_wls`; it needs X-rays in natural-log units, ``−ln(I/I0)``): it lowers the
    error (the depth along the principal ray is what a single view resolves worst) at about the default's
    time.

    Args:
        scales: the coarse-to-fine schedule.
        loss: an :class:`xraypose.losses.ImageLoss` spec (or a callable ``loss(pred, target, mask=None) → (B,)``).
        parameterization: ``"se3"`` (default), ``"euler"`` (ZYX angles + translation) or ``"quaternion"``.
        plateau_patience: steps without a relative improvement of ``rel_tol`` before the learning rates are
            multiplied by ``plateau_factor``.
        patience: steps without improvement that end a level.
        max_divergences: non-finite steps tolerated (each restores the best pose) before stopping.
        seed: seeds the sparse patches.
        search: the multi-start :class:`Search` run before ``scales`` (``None``: start the schedule from the
            initial pose).
    """

    scales: tuple[Scale, ...] = (Scale(64, 100, 2e-2, 2.0), Scale(128, 100, 5e-3, 0.5))
    loss: str | LossFn = "0.5*mncc+0.5*gncc"
    parameterization: Parameterization = "se3"
    rel_tol: float = 1e-4
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    patience: int = 15
    max_divergences: int = 5
    seed: int = 0
    search: Search | None = field(default_factory=Search)

    def __post_init__(self) -> None:
        if self.search is not None and not isinstance(self.search, Search):
            raise InputError(f"search: expected a Search or None, got {type(self.search).__name__}")
        if not self.scales:
            raise InputError("scales: expected at least one level")
        if self.parameterization not in ("se3", "euler", "quaternion"):
            raise InputError(
                f"parameterization: expected 'se3', 'euler' or 'quaternion', got {self.parameterization!r}"
            )


#: Named configurations: ``"default"`` (``RegistrationConfig()``) and ``"fine"`` (after the default's search
#: and 64 px level, polychromatic 128 and 256 px levels with Newton steps on the ``pwls`` likelihood).
PRESETS: dict[str, RegistrationConfig] = {
    "default": RegistrationConfig(),
    "fine": RegistrationConfig(
        scales=(
            RegistrationConfig().scales[0],
            Scale(128, 15, 1e-2, 1.0, physics="poly", solver="newton", loss="pwls"),
            Scale(256, 6, 5e-3, 0.5, physics="poly", solver="newton", loss="pwls"),
        )
    ),
}


def preset(name: str, **overrides: Any) -> RegistrationConfig:
    """The named entry of :data:`PRESETS`, with fields replaced by ``overrides`` (e.g. ``seed=1``)."""
    if name not in PRESETS:
        raise InputError(f"preset: expected one of {', '.join(PRESETS)}, got {name!r}")
    try:
        return replace(PRESETS[name], **overrides)
    except TypeError as exc:
        raise InputError(f"preset {name!r}: {exc}") from None


@dataclass(frozen=True)
class Step:
    """One optimisation step: level (−1 for a :class:`Search`), step index, per-problem loss (before the
    update), wall time since the start (s)."""

    level: int
    step: int
    loss: torch.Tensor
    seconds: float


@dataclass
class RegistrationResult:
    """What :func:`register` found.

    Attributes:
        pose: ``(B, 4, 4)`` best camera-to-world pose per problem.
        loss: ``(B,)`` its loss at the finest level run (full detector).
        initial_loss: ``(B,)`` loss of the initial pose at the finest level.
        poses: ``(S, B, 4, 4)`` the pose after every step (for animations), on the CPU.
        trajectory: every step's losses and time.
        stop_reason: why the last level ended (``"iterations"``, ``"plateau"``, ``"diverged"``).
        diverged: ``(B,)`` problems that hit a non-finite step (their best pose is returned).
        seconds: wall time.
    """

    pose: torch.Tensor
    loss: torch.Tensor
    initial_loss: torch.Tensor
    poses: torch.Tensor
    trajectory: list[Step] = field(default_factory=list)
    stop_reason: str = ""
    diverged: torch.Tensor | None = None
    seconds: float = 0.0

    @property
    def iterations(self) -> int:
        return len(self.trajectory)


def _loss_fn(loss: str | LossFn) -> LossFn:
    if callable(loss):
        return loss
    from ..losses import ImageLoss

    return ImageLoss.parse(loss)  # type: ignore[return-value]


def _level_loss(scale: Scale, default: str | LossFn) -> LossFn:
    """The loss a level minimises: its own :attr:`Scale.loss`, else the configuration's ``default``."""
    return _loss_fn(default if scale.loss is None else scale.loss)


def _level_intrinsics(intrinsics: Intrinsics, size: int) -> Intrinsics:
    """The detector of a level of ``size`` rows (aspect kept), never finer than ``intrinsics`` itself:
    upsampling the X-ray would only add blocky edges."""
    rows = min(size, intrinsics.rows)
    return intrinsics.resized(rows, max(4, round(rows * intrinsics.cols / intrinsics.rows)))


def _downsample(image: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if image.shape[-2:] == (rows, cols):
        return image
    return F.interpolate(image.unsqueeze(1), size=(rows, cols), mode="area").squeeze(1)


def _noise_weights(target: torch.Tensor, gamma: float) -> torch.Tensor | None:
    """A level's pixel weights (:attr:`Scale.noise_weight`), or ``None`` for uniform weights."""
    if gamma <= 0:
        return None
    from ..losses import quantum_noise_weights

    return quantum_noise_weights(target, gamma)


def _weighted_loss(
    loss_fn: LossFn, pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """``loss_fn(pred, target)``, with ``mask=weights`` when the level weights its pixels (a custom loss
    without a ``mask`` argument works as long as no level asks for weights)."""
    if weights is None:
        return loss_fn(pred, target)
    return loss_fn(pred, target, mask=weights)


def _score(
    renderer: Renderer, target: torch.Tensor, intrinsics: Intrinsics, pose: torch.Tensor, loss: Any, rows: int
) -> torch.Tensor:
    """Loss ``(B,)`` of ``pose`` at a detector of ``rows`` rows (aspect kept; never finer than the X-ray, as a
    level of :func:`register`), without gradients: how the refinements and the ``none`` method score a pose."""
    intr = _level_intrinsics(intrinsics, rows)
    with torch.no_grad():
        image = renderer(Camera(intr, pose))
        return _loss_fn(loss)(image, _downsample(target, intr.rows, intr.cols)).to(pose.dtype)


class _Motion:
    """Local motion parameters → pose, for one parameterisation; rotation and translation are separate leaves."""

    def __init__(self, kind: Parameterization, B: int, dtype: torch.dtype, device: torch.device) -> None:
        self.kind = kind
        self.nrot = 4 if kind == "quaternion" else 3  # rotation parameters; then 3 of translation
        self.rotation = torch.zeros(B, self.nrot, dtype=dtype, device=device)
        if kind == "quaternion":
            self.rotation[:, 0] = 1.0
        self.translation = torch.zeros(B, 3, dtype=dtype, device=device)

    def leaves(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotation, self.translation

    def params(self) -> torch.Tensor:
        """The current parameters as one detached ``(B, n)`` tensor: rotation, then translation."""
        return torch.cat([self.rotation.detach(), self.translation.detach()], -1)

    def set_params(self, params: torch.Tensor) -> None:
        """Set the leaves from a ``(B, n)`` tensor laid out as :meth:`params`."""
        with torch.no_grad():
            self.rotation.copy_(params[:, : self.nrot])
            self.translation.copy_(params[:, self.nrot :])

    def transform(self, params: torch.Tensor | None = None) -> torch.Tensor:
        """The local motion of the current parameters, or of ``params`` ``(B, n)`` laid out as :meth:`params`."""
        if params is None:
            rotation, translation = self.rotation, self.translation
        else:
            rotation, translation = params[:, : self.nrot], params[:, self.nrot :]
        if self.kind == "se3":
            return se3_exp(torch.cat([translation, rotation], -1))
        if self.kind == "euler":
            R = euler_to_matrix(rotation, "ZYX")
        else:
            q = rotation / rotation.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            R = quaternion_to_matrix(q)
        return make_transform(R, translation)


def _check_problem(
    target: torch.Tensor, intrinsics: Intrinsics, init_pose: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, rows, cols)`` targets on the pose's device and dtype, ``(B, 4, 4)`` poses; clear errors."""
    if not isinstance(intrinsics, Intrinsics):
        raise InputError(f"intrinsics: expected Intrinsics, got {type(intrinsics).__name__}")
    init_pose = validate_pose(init_pose, "init_pose")
    if not isinstance(target, torch.Tensor):
        raise InputError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if target.ndim == 2:
        target = target.unsqueeze(0)
    B = init_pose.shape[0]
    if target.ndim != 3 or target.shape[0] != B or target.shape[-2:] != (intrinsics.rows, intrinsics.cols):
        raise InputError(
            f"target: expected ({B}, {intrinsics.rows}, {intrinsics.cols}) images for {B} initial poses on the "
            f"given detector, got {tuple(target.shape)}"
        )
    if not bool(torch.isfinite(target).all()):
        raise InputError("target: the X-ray image holds NaN or inf values")
    return target.to(device=init_pose.device, dtype=init_pose.dtype), init_pose


def _pivot_world(renderer: Renderer, pivot_world: object) -> torch.Tensor | None:
    """The engine's default pivot: the CT's centre when the renderer exposes ``volume`` and ``affine``."""
    if pivot_world is not None:
        return torch.as_tensor(pivot_world, dtype=torch.float64).reshape(3)
    vol, aff = getattr(renderer, "volume", None), getattr(renderer, "affine", None)
    if vol is None or aff is None:
        return None
    aff = aff.detach().double().cpu()
    shape = torch.tensor(vol.shape[-3:], dtype=torch.float64)
    return aff[:3, :3] @ ((shape - 1) / 2) + aff[:3, 3]


def register(
    renderer: Renderer,
    target: torch.Tensor,
    intrinsics: Intrinsics,
    init_pose: torch.Tensor,
    config: RegistrationConfig | None = None,
    *,
    pivot_world: torch.Tensor | Sequence[float] | None = None,
    callback: Callable[[Step, torch.Tensor], None] | None = None,
) -> RegistrationResult:
    """Find the poses at which the renderer's images match ``target``.

    Args:
        renderer: e.g. :class:`~xraypose.registration.VolumeRenderer` (mono or polychromatic).
        target: ``(B, rows, cols)`` or ``(rows, cols)`` X-ray images on ``intrinsics``' detector, in the
            ``−ln(I/I0)`` domain (any affine intensity scale).
        intrinsics: the detector of ``target``.
        init_pose: ``(B, 4, 4)`` (or ``(4, 4)``) initial camera-to-world poses (world = CT RAS, mm).
        config: schedule, loss, parameterisation, stopping rules.
        pivot_world: centre of the local rotations (world mm); default the CT's centre if the renderer has a
            volume, else the point on each initial principal axis at half the source-to-detector distance.
        callback: called after every step with the step and the current poses (e.g. a progress bar).
    """
    config = RegistrationConfig() if config is None else config
    loss_fn = _loss_fn(config.loss)
    target, init_pose = _check_problem(target, intrinsics, init_pose)
    pivot = _pivot_world(renderer, pivot_world)
    start = time.perf_counter()
    search = config.search
    if search is None:
        return _descend(renderer, target, intrinsics, init_pose, config, loss_fn, pivot, callback, start)

    B, K = init_pose.shape[0], search.starts
    starts = search_starts(init_pose, intrinsics, search.rotation_deg, K, pivot_world=pivot)
    search_config = replace(
        config,
        scales=(Scale(search.size, search.iterations, search.lr_rotation, search.lr_translation),),
        search=None,
    )

    def search_callback(step: Step, pose: torch.Tensor) -> None:
        if callback is None:
            return
        loss = step.loss.view(B, K)
        lead = loss.nan_to_num(math.inf).argmin(1)
        arange = torch.arange(B)
        callback(
            replace(step, level=-1, loss=loss[arange, lead]),
            pose.view(B, K, 4, 4)[arange, lead.to(pose.device)],
        )

    found = _descend(
        renderer,
        target.repeat_interleave(K, 0),
        intrinsics,
        starts,
        search_config,
        loss_fn,
        pivot,
        search_callback,
        start,
    )
    best = found.loss.view(B, K).nan_to_num(math.inf).argmin(1)
    arange = torch.arange(B, device=best.device)
    chosen = found.pose.view(B, K, 4, 4)[arange, best]
    result = _descend(
        renderer, target, intrinsics, chosen, config, loss_fn, pivot, callback, start, initial_pose=init_pose
    )
    # the search's steps (of the start that was chosen) come first in the trajectory and the pose history
    best_cpu = best.cpu()
    arange_cpu = torch.arange(B)
    search_steps = [
        replace(s, level=-1, loss=s.loss.view(B, K)[arange_cpu, best_cpu]) for s in found.trajectory
    ]
    search_poses = found.poses.view(-1, B, K, 4, 4)[:, arange_cpu, best_cpu]
    diverged = result.diverged
    if diverged is not None and found.diverged is not None:
        diverged = diverged | found.diverged.view(B, K).any(1)
    return RegistrationResult(
        pose=result.pose,
        loss=result.loss,
        initial_loss=result.initial_loss,
        poses=torch.cat([search_poses, result.poses]),
        trajectory=search_steps + result.trajectory,
        stop_reason=result.stop_reason,
        diverged=diverged,
        seconds=time.perf_counter() - start,
    )


def search_starts(
    init_pose: torch.Tensor,
    intrinsics: Intrinsics,
    rotation_deg: float,
    starts: int,
    *,
    pivot_world: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """The starting poses of a multi-start :class:`Search`: ``(B·starts, 4, 4)``, ``starts`` per problem.

    Start 0 is the initial pose; start ``k ≥ 1`` is the initial pose rotated by ``rotation_deg`` about the
    pivot (world mm; default the point on the principal axis at half the source-to-detector distance), about
    the axis at angle ``2π(k − 1)/(starts − 1)`` in the detector plane (camera x toward y).
    """
    init_pose = validate_pose(init_pose, "init_pose")
    B = init_pose.shape[0]
    dtype, device = init_pose.dtype, init_pose.device
    to_pivot, from_pivot = _pivot_frames(init_pose, intrinsics, pivot_world)
    phi = 2 * math.pi * torch.arange(max(starts - 1, 0), dtype=dtype, device=device) / max(starts - 1, 1)
    axes = torch.stack([phi.cos(), phi.sin(), torch.zeros_like(phi)], -1)
    omega = torch.cat([torch.zeros(1, 3, dtype=dtype, device=device), axes * math.radians(rotation_deg)])
    delta = se3_exp(torch.cat([torch.zeros_like(omega), omega], -1))  # (K, 4, 4)
    K = delta.shape[0]
    poses = compose(
        init_pose[:, None].expand(B, K, 4, 4),
        to_pivot[:, None].expand(B, K, 4, 4),
        delta[None].expand(B, K, 4, 4),
        from_pivot[:, None].expand(B, K, 4, 4),
    )
    return poses.reshape(B * K, 4, 4)


def _pivot_frames(
    init_pose: torch.Tensor, intrinsics: Intrinsics, pivot_world: torch.Tensor | Sequence[float] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Translations to and from the pivot, in each initial camera frame: two ``(B, 4, 4)``."""
    B = init_pose.shape[0]
    dtype, device = init_pose.dtype, init_pose.device
    if pivot_world is None:
        pivot_cam = torch.tensor([0.0, 0.0, intrinsics.sdd / 2], dtype=dtype, device=device).expand(B, 3)
    else:
        pw = torch.as_tensor(pivot_world, dtype=dtype, device=device).reshape(1, 1, 3).expand(B, 1, 3)
        pivot_cam = transform_points(invert(init_pose), pw)[:, 0]
    to_pivot = torch.eye(4, dtype=dtype, device=device).repeat(B, 1, 1)
    to_pivot[:, :3, 3] = pivot_cam
    return to_pivot, invert(to_pivot)


def _descend(
    renderer: Renderer,
    target: torch.Tensor,
    intrinsics: Intrinsics,
    init_pose: torch.Tensor,
    config: RegistrationConfig,
    loss_fn: LossFn,
    pivot_world: torch.Tensor | None,
    callback: Callable[[Step, torch.Tensor], None] | None,
    start: float,
    initial_pose: torch.Tensor | None = None,
) -> RegistrationResult:
    """The coarse-to-fine schedule of ``config.scales`` from ``init_pose`` (checked inputs); the result's
    ``initial_loss`` scores ``initial_pose`` (default ``init_pose``) at the finest level."""
    B = init_pose.shape[0]
    dtype, device = init_pose.dtype, init_pose.device
    to_pivot, from_pivot = _pivot_frames(init_pose, intrinsics, pivot_world)

    motion = _Motion(config.parameterization, B, dtype, device)

    def pose_of(params: torch.Tensor | None = None) -> torch.Tensor:
        return compose(init_pose, to_pivot, motion.transform(params), from_pivot)

    gen = torch.Generator().manual_seed(config.seed)
    best_rot, best_trans = (x.clone() for x in motion.leaves())
    diverged = torch.zeros(B, dtype=torch.bool, device=device)
    trajectory: list[Step] = []
    poses: list[torch.Tensor] = []
    stop_reason = "iterations"
    n_div = 0

    def full_loss(
        fn: LossFn, render: Renderer, intr: Intrinsics, tgt: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        with torch.no_grad():
            return _weighted_loss(fn, render(Camera(intr, pose_of())), tgt, weights).to(dtype)

    for level, scale in enumerate(config.scales):
        render = _level_renderer(renderer, scale.physics)
        intr = _level_intrinsics(intrinsics, scale.size)
        rows, cols = intr.rows, intr.cols
        tgt = _downsample(target, rows, cols)
        weights = _noise_weights(tgt, scale.noise_weight)
        level_loss = _level_loss(scale, loss_fn)
        newton: _Newton | None = None
        opt: torch.optim.Optimizer | None = None
        # start from the best pose so far (motion holds it), scored at this level
        if scale.solver == "newton":  # its first step scores the starting pose (and builds the model)
            level_best = torch.full((B,), math.inf, dtype=dtype, device=device)
        else:
            level_best = full_loss(level_loss, render, intr, tgt, weights)
        for leaf in motion.leaves():
            leaf.requires_grad_(True)
        if scale.solver == "adam":
            opt = torch.optim.Adam(
                [
                    {"params": [motion.rotation], "lr": scale.lr_rotation},
                    {"params": [motion.translation], "lr": scale.lr_translation},
                ]
            )
        level_best = torch.where(
            torch.isfinite(level_best), level_best, torch.full_like(level_best, math.inf)
        )
        best_rot, best_trans = (x.detach().clone() for x in motion.leaves())
        since_improve = 0
        since_plateau = 0
        stop_reason = "iterations"
        for step in range(scale.iterations):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            else:
                for leaf in motion.leaves():
                    leaf.grad = None
            pose = pose_of()
            camera = Camera(intr, pose)
            try:
                if scale.patches is not None:
                    n_patches, size = scale.patches
                    pixels = random_patch_pixels(intr, n_patches, size, generator=gen).to(device)
                    pred, mask = scatter_pixels(render(camera, pixels), pixels, (rows, cols))
                    mask = mask if weights is None else mask * weights
                    loss = level_loss(pred, tgt, mask=mask).to(dtype)
                else:
                    pred = render(camera)
                    loss = _weighted_loss(level_loss, pred, tgt, weights).to(dtype)
                    if scale.solver == "newton" and newton is None:
                        hessian = _newton_hessian(
                            render,
                            intr,
                            pred.detach(),
                            tgt,
                            weights,
                            level_loss,
                            motion.params(),
                            pose_of,
                            motion.nrot,
                        )
                        newton = _Newton(hessian, scale, motion.nrot)
            except GeometryError:  # a step put an X-ray source inside the CT: treat it like a divergence
                loss = torch.full((B,), math.nan, dtype=dtype, device=device)
            finite = torch.isfinite(loss) & torch.isfinite(pose.detach()).flatten(1).all(1)
            record = Step(level, step, loss.detach().cpu(), time.perf_counter() - start)
            trajectory.append(record)
            poses.append(pose.detach().cpu())
            if callback is not None:
                callback(record, pose.detach())
            if not bool(finite.all()):
                n_div += 1
                diverged |= ~finite
                with torch.no_grad():
                    motion.rotation[~finite] = best_rot[~finite]
                    motion.translation[~finite] = best_trans[~finite]
                if newton is not None:
                    newton.restart(~finite)
                if n_div > config.max_divergences:
                    stop_reason = "diverged"
                    break
                continue
            if scale.patches is None:  # exact scores: track the best pose per problem
                with torch.no_grad():
                    better = loss.detach() < level_best
                    best_rot[better] = motion.rotation.detach()[better]
                    best_trans[better] = motion.translation.detach()[better]
                    improved = bool((loss.detach() < level_best - config.rel_tol * level_best.abs()).any())
                    level_best = torch.minimum(level_best, loss.detach())
            else:
                improved = True  # noisy patch losses: rely on the iteration budget and the final check
            since_improve = 0 if improved else since_improve + 1
            if since_improve >= config.patience:
                stop_reason = "plateau"
                break
            if step == scale.iterations - 1 and scale.patches is None:
                break  # the pose just scored is the level's last: no update to score again
            loss.sum().backward()
            grads_ok = all(
                torch.isfinite(leaf.grad).all() for leaf in motion.leaves() if leaf.grad is not None
            )
            if not grads_ok:
                n_div += 1
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                continue
            if newton is not None:
                grad = torch.cat([leaf.grad for leaf in motion.leaves()], -1)  # type: ignore[misc]
                update, converged = newton.step(motion.params(), loss.detach(), grad)
                motion.set_params(update)
                if converged:  # the update is below the tolerance: the best pose scored is the result
                    stop_reason = "converged"
                    break
            else:
                assert opt is not None
                opt.step()
                since_plateau = 0 if improved else since_plateau + 1
                if since_plateau >= config.plateau_patience:
                    for group in opt.param_groups:
                        group["lr"] *= config.plateau_factor
                    since_plateau = 0
        for leaf in motion.leaves():
            leaf.requires_grad_(False)
        if scale.patches is not None or not bool(torch.isfinite(level_best).all()):
            # score the last pose exactly and keep it where it beats the best one (always with sparse steps;
            # and where no step scored it, e.g. a Newton level of 0 iterations)
            last = full_loss(level_loss, render, intr, tgt, weights)
            with torch.no_grad():
                better = torch.isfinite(last) & (last < level_best)
                best_rot[better] = motion.rotation[better]
                best_trans[better] = motion.translation[better]
                level_best = torch.where(better, last, level_best)
        with torch.no_grad():
            motion.rotation.copy_(best_rot)
            motion.translation.copy_(best_trans)
        if stop_reason == "diverged":
            break

    # the motion holds the last level's best pose, scored there, unless a divergence ended the run earlier
    scored = level == len(config.scales) - 1
    final_intr = _level_intrinsics(intrinsics, config.scales[-1].size)
    final_tgt = _downsample(target, final_intr.rows, final_intr.cols)
    final_weights = _noise_weights(final_tgt, config.scales[-1].noise_weight)
    render = _level_renderer(renderer, config.scales[-1].physics)
    final_loss = _level_loss(config.scales[-1], loss_fn)
    with torch.no_grad():
        pose = pose_of().detach()
        # the best pose of the last level was scored there (a run stopped early is scored at the last level)
        loss = level_best if scored else full_loss(final_loss, render, final_intr, final_tgt, final_weights)
        loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, math.nan))
        scored_pose = init_pose if initial_pose is None else initial_pose
        initial = _weighted_loss(
            final_loss, render(Camera(final_intr, scored_pose)), final_tgt, final_weights
        )
        initial = initial.to(dtype)
    return RegistrationResult(
        pose=pose,
        loss=loss,
        initial_loss=initial,
        poses=torch.stack(poses) if poses else pose.cpu().unsqueeze(0),
        trajectory=trajectory,
        stop_reason=stop_reason,
        diverged=diverged,
        seconds=time.perf_counter() - start,
    )


#: Finite-difference steps of the image Jacobian of a ``"newton"`` level: rotation parameters (rad; 1 mrad
#: moves a point 0.1 mm at 100 mm from the pivot) and translation (mm), both far below a voxel.
_JACOBIAN_STEP_ROTATION = 1e-3
_JACOBIAN_STEP_TRANSLATION = 0.1
#: The Jacobian of a ``"newton"`` level is rendered on a detector of at most this many rows (then upsampled).
_JACOBIAN_MAX_ROWS = 128


def _newton_hessian(
    render: Renderer,
    intr: Intrinsics,
    base: torch.Tensor,
    tgt: torch.Tensor,
    weights: torch.Tensor | None,
    loss_fn: LossFn,
    p0: torch.Tensor,
    pose_of: Callable[[torch.Tensor], torch.Tensor],
    nrot: int,
) -> torch.Tensor:
    """The ``(B, n, n)`` Hessian of the loss through the image linearised in the parameters about the
    current ones ``p0`` ``(B, n)``: ``L(I₀ + J δ)`` at ``δ = 0``, ``I₀ = base`` the image rendered at ``p0``.

    ``J`` comes from forward differences (``n + 1`` renders of every problem in one batch, on a detector of
    at most ``_JACOBIAN_MAX_ROWS`` rows, upsampled); the Hessian from
    central differences of the exact gradient of that cheap surrogate (image operations only). Its
    eigenvalues are made positive (absolute values, floored at ``1e-6`` of the largest), so every step it
    gives descends."""
    B, n = p0.shape
    steps = torch.full((n,), _JACOBIAN_STEP_TRANSLATION, dtype=p0.dtype, device=p0.device)
    steps[:nrot] = _JACOBIAN_STEP_ROTATION
    with torch.no_grad():
        shifted = [pose_of(p0)]
        for k in range(n):
            p = p0.clone()
            p[:, k] += steps[k]
            shifted.append(pose_of(p))
        # the Jacobian only shapes the steps (the gradients are exact): a coarser detector will do
        factor = max(1, math.ceil(intr.rows / _JACOBIAN_MAX_ROWS))
        coarse = (
            intr if factor == 1 else intr.resized(max(4, intr.rows // factor), max(4, intr.cols // factor))
        )
        images = render(Camera(coarse, torch.cat(shifted)))
        images = images.view(n + 1, B, *images.shape[1:])
        jac = (images[1:] - images[:1]) / steps.view(n, *([1] * (images.ndim - 1))).to(images.dtype)
        jac = jac.transpose(0, 1)  # (B, n, rows, cols) of the coarse detector
        if factor > 1:
            jac = F.interpolate(jac, size=base.shape[-2:], mode="bilinear", align_corners=False)

    def surrogate_grad(delta: torch.Tensor) -> torch.Tensor:
        delta = delta.to(base.dtype).requires_grad_(True)
        with torch.enable_grad():
            image = base + torch.einsum("bn,bn...->b...", delta, jac)
            (grad,) = torch.autograd.grad(_weighted_loss(loss_fn, image, tgt, weights).sum(), delta)
        return grad.to(p0.dtype)

    hessian = torch.empty(B, n, n, dtype=p0.dtype, device=p0.device)
    for k in range(n):
        e = torch.zeros_like(p0)
        e[:, k] = steps[k]
        hessian[:, :, k] = (surrogate_grad(e) - surrogate_grad(-e)) / (2 * steps[k])
    hessian = 0.5 * (hessian + hessian.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(hessian.double())
    evals = evals.abs()
    evals = torch.maximum(evals, 1e-6 * evals.amax(-1, keepdim=True).clamp_min(1e-30))
    hessian = (evecs * evals.unsqueeze(-2)) @ evecs.transpose(1, 2)
    return hessian.to(p0.dtype)


class _Newton:
    """Levenberg–Marquardt steps ``δ = −(H + λ diag H)⁻¹ g`` with a fixed Hessian ``H`` and exact gradients
    ``g``, per problem: a step that raised the loss is taken back (the next step starts from the previous
    parameters with ``λ`` × 4), an accepted one divides ``λ`` by 3; steps are shrunk to the level's trust
    radius (its learning rates: rotation rad, translation mm)."""

    #: A step whose model decrease is below this fraction of |loss| counts as converged.
    TOLERANCE = 1e-6
    #: ... as does a step shorter than this fraction of the trust radius (the level's learning rates).
    STEP_TOLERANCE = 0.05
    #: Consecutive rejected steps after which a problem counts as converged (its loss is flat at this scale).
    MAX_REJECTIONS = 2

    def __init__(self, hessian: torch.Tensor, scale: Scale, nrot: int) -> None:
        self.hessian = hessian
        self.nrot = nrot
        self.max_rotation = scale.lr_rotation
        self.max_translation = scale.lr_translation
        self.lam = torch.full((hessian.shape[0],), 1e-2, dtype=hessian.dtype, device=hessian.device)
        self.radius = torch.ones_like(self.lam)  # in units of the level's learning rates
        self.last_length = torch.ones_like(self.lam)
        self.rejections = torch.zeros_like(self.lam, dtype=torch.long)
        self.previous: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _bfgs_update(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """Correct the Hessian with the curvature measured between two exact gradients (BFGS), per problem,
        where it is positive (a step and its gradient change ``s``, ``y``, both ``(B, n)``)."""
        Hs = torch.einsum("bij,bj->bi", self.hessian, s)
        sHs = (s * Hs).sum(-1)
        sy = (s * y).sum(-1)
        ok = (sy > 1e-12 * s.norm(dim=-1) * y.norm(dim=-1)) & (sHs > 0) & torch.isfinite(sy)
        if not bool(ok.any()):
            return
        sHs = torch.where(ok, sHs, torch.ones_like(sHs))
        sy = torch.where(ok, sy, torch.ones_like(sy))
        update = (
            y[:, :, None] * y[:, None, :] / sy[:, None, None]
            - Hs[:, :, None] * Hs[:, None, :] / sHs[:, None, None]
        )
        self.hessian = self.hessian + torch.where(ok[:, None, None], update, torch.zeros_like(update))

    def restart(self, problems: torch.Tensor) -> None:
        """Problems whose step was not finite (their best pose restored): damp their next steps more."""
        self.lam = torch.where(problems, self.lam * 4, self.lam)
        if self.previous is not None:
            p, loss, g = self.previous
            self.previous = (p, torch.where(problems, torch.full_like(loss, math.inf), loss), g)

    def step(self, p: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The next parameters ``(B, n)`` from the current ones, their loss and gradient; and whether every
        problem's step is below the tolerance."""
        if self.previous is not None:
            p_prev, loss_prev, g_prev = self.previous
            self._bfgs_update(p - p_prev, grad - g_prev)
            worse = ~(loss <= loss_prev)
            # a rejected step: back to the previous parameters, with half the radius and more damping
            self.radius = torch.where(worse, 0.5 * self.last_length, (2 * self.radius).clamp(max=1.0))
            self.rejections = torch.where(worse, self.rejections + 1, torch.zeros_like(self.rejections))
            p = torch.where(worse[:, None], p_prev, p)
            grad = torch.where(worse[:, None], g_prev, grad)
            loss = torch.where(worse, loss_prev, loss)
            self.lam = torch.where(worse, self.lam * 4, self.lam / 3).clamp(1e-6, 1e6)
        self.previous = (p, loss, grad)
        system = self.hessian + self.lam[:, None, None] * torch.diag_embed(
            self.hessian.diagonal(dim1=1, dim2=2)
        )
        delta = -torch.linalg.solve(system, grad.unsqueeze(-1)).squeeze(-1)
        # step length in units of the trust radius (the level's learning rates): at most self.radius
        length = torch.maximum(
            delta[:, : self.nrot].norm(dim=-1) / self.max_rotation,
            delta[:, self.nrot :].norm(dim=-1) / self.max_translation,
        )
        delta = delta * (self.radius / length.clamp_min(1e-30)).clamp(max=1.0)[:, None]
        self.last_length = torch.minimum(length, self.radius)
        decrease = -(grad * delta).sum(-1) - 0.5 * torch.einsum("bi,bij,bj->b", delta, self.hessian, delta)
        small = (decrease <= self.TOLERANCE * loss.abs().clamp_min(1e-12)) | (
            self.last_length < self.STEP_TOLERANCE
        )
        converged = bool((small | (self.rejections >= self.MAX_REJECTIONS)).all())
        return p + delta, converged
