"""Baseline registration methods in the same framework, on the same similarity, and a registry of methods.

Every method optimises the same local motion as :func:`~xraypose.registration.register`:
``T = T0 · P · M(p) · P⁻¹``, the initial camera-to-world pose ``T0`` moved by a motion ``M`` expressed in a frame
parallel to the initial camera's and centred on a pivot ``P`` (default: the CT's centre), scored by the same
:class:`~xraypose.losses.ImageLoss` (default ``RegistrationConfig().loss``), and returns the same
:class:`~xraypose.registration.RegistrationResult`.

Methods (``METHODS``, each ``method(renderer, target, intrinsics, init_pose, *, seed=0) -> RegistrationResult``,
run with its defaults):

- ``"diffpose"``: :func:`~xraypose.registration.register` with its default :class:`RegistrationConfig` —
  a 9-start search at 32 px, then gradient descent (Adam) through the differentiable renderer in se(3) about
  the CT's centre, coarse to fine (64 → 128 px).
- ``"diffpose-fine"``: the same with the ``"fine"`` preset: after the search and the 64 px level, polychromatic
  128 and 256 px levels with damped Newton steps on the Poisson likelihood with a fitted scatter background
  (``"pwls"``).
- ``"cmaes"``: :func:`register_cmaes`, the conventional derivative-free, intensity-based baseline of xReg
  (Grupp et al.): CMA-ES over the 6 pose parameters at 8× detector downsampling (population 100,
  σ = 15°, 15°, 30°, 50, 50, 100 mm), then BOBYQA (nlopt ``LN_BOBYQA``) from the best pose at 4×
  downsampling. Each CMA-ES generation is rendered as one batched call.
- ``"none"``: no refinement: the initial pose itself, scored by the default loss on the whole detector. It
  measures an initialiser on its own (e.g. ``xraypose benchmark --init model --method none``).
- ``"euler-gd"``: :func:`register_euler_gd`, the naive gradient method — the same engine and schedule with
  ZYX Euler angles rotating about the X-ray source (the camera origin) instead of the anatomy, so rotation
  and translation are strongly coupled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

from ..errors import GeometryError, InputError
from ..geometry.camera import Camera, Intrinsics
from ..geometry.se3 import compose, invert, transform_points
from .engine import (
    RegistrationConfig,
    RegistrationResult,
    Step,
    _check_problem,
    _downsample,
    _loss_fn,
    _Motion,
    _pivot_world,
    _score,
    preset,
    register,
)
from .renderers import Renderer

__all__ = ["METHODS", "CMAESConfig", "MethodFn", "register_cmaes", "register_euler_gd"]

LossFn = Callable[..., torch.Tensor]
Callback = Callable[[Step, torch.Tensor], None]
#: A registration method: ``(renderer, target, intrinsics, init_pose, *, seed=0) -> RegistrationResult``.
MethodFn = Callable[..., RegistrationResult]

_PENALTY = (
    1e6  # objective value of a pose whose loss is not finite (derivative-free optimisers need a number)
)


def _positive_six(value: object, name: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected 6 numbers (3 rotations in °, 3 translations in mm)") from None
    if len(vals) != 6 or not all(math.isfinite(v) and v > 0 for v in vals):
        raise InputError(
            f"{name}: expected 6 positive finite numbers (3 rotations in °, 3 translations in mm), got {value!r}"
        )
    return vals


def _integer(value: object, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name}: expected an integer ≥ {low}, got {value!r}")


@dataclass(frozen=True)
class CMAESConfig:
    """Settings of :func:`register_cmaes` (defaults: xReg's two-level schedule).

    Pose parameters are ``(rx, ry, rz, tx, ty, tz)``: rotations in degrees about the pivot, translations in mm,
    along the initial camera's axes (x along detector columns, y along rows, z along the principal ray, so
    ``rz`` is the in-plane rotation and ``tz`` the depth). With ``parameterization="se3"`` they are the twist
    ``(ω, v)`` of the engine (``ω`` in degrees; ``v`` equals the pivot's displacement for small rotations), with
    ``"euler"`` intrinsic ZYX angles (``R = R_z(rz) R_y(ry) R_x(rx)``) and the pivot's displacement.

    Args:
        downsample: level 1 (global search) detector downsampling factor: ``rows / downsample`` pixels
            (e.g. 256 → 32 px).
        population: CMA-ES population (poses rendered per generation, in one batched call).
        sigma: CMA-ES initial standard deviation per parameter (°, °, °, mm, mm, mm). CMA-ES runs on the
            normalised parameters ``x = p / sigma`` with a single σ = 1.
        generations: at most this many CMA-ES generations at level 1.
        patience: generations without a relative improvement of ``rel_tol`` of the best loss that end level 1
            (CMA-ES's own stopping rules end it too).
        rel_tol: relative improvement that counts (level 1 patience).
        local: level 2 optimiser, started from the best pose of level 1: ``"bobyqa"`` (nlopt ``LN_BOBYQA``, one
            pose per evaluation), ``"cmaes"`` (a second, small-σ CMA-ES: ``sigma = local_step``,
            ``local_population`` poses per generation in one batched call — the alternative without nlopt) or
            ``"none"`` (level 1 only).
        local_downsample: level 2 detector downsampling factor (e.g. 256 → 64 px).
        local_step: level 2 initial step per parameter (°, °, °, mm, mm, mm): BOBYQA's initial trust-region
            radius, or the small CMA-ES's σ.
        local_bound: level 2 searches the box ``± local_bound · local_step`` around the level 1 pose (≥ 1).
        local_evaluations: at most this many level 2 loss evaluations (poses rendered).
        local_xtol: BOBYQA stops when a step changes every parameter by less than ``local_xtol · local_step``.
        local_population: population of the ``"cmaes"`` level 2.
        loss: an :class:`xraypose.losses.ImageLoss` spec (or a callable ``loss(pred, target, mask=None) → (B,)``),
            the same default as :class:`RegistrationConfig`.
        parameterization: ``"se3"`` (the engine's default local motion) or ``"euler"``.
        max_divergences: generations (or evaluations) without a finite loss tolerated before stopping.
        seed: seeds CMA-ES (problem ``b`` of a batch uses ``seed + b``); results are reproducible.
    """

    downsample: int = 8
    population: int = 100
    sigma: tuple[float, ...] = (15.0, 15.0, 30.0, 50.0, 50.0, 100.0)
    generations: int = 100
    patience: int = 20
    rel_tol: float = 1e-4
    local: Literal["bobyqa", "cmaes", "none"] = "bobyqa"
    local_downsample: int = 4
    local_step: tuple[float, ...] = (2.5, 2.5, 2.5, 5.0, 5.0, 10.0)
    local_bound: float = 4.0
    local_evaluations: int = 300
    local_xtol: float = 1e-3
    local_population: int = 16
    loss: str | LossFn = field(default=RegistrationConfig().loss)
    parameterization: Literal["se3", "euler"] = "se3"
    max_divergences: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        _integer(self.downsample, "CMAESConfig.downsample", 1)
        _integer(self.local_downsample, "CMAESConfig.local_downsample", 1)
        _integer(self.population, "CMAESConfig.population (poses per generation)", 2)
        _integer(self.local_population, "CMAESConfig.local_population", 2)
        _integer(self.generations, "CMAESConfig.generations", 1)
        _integer(self.patience, "CMAESConfig.patience", 1)
        _integer(self.local_evaluations, "CMAESConfig.local_evaluations", 0)
        _integer(self.max_divergences, "CMAESConfig.max_divergences", 0)
        _integer(self.seed, "CMAESConfig.seed", 0)
        if self.seed >= 2**32:
            raise InputError(f"CMAESConfig.seed: expected an integer in [0, 2³²), got {self.seed}")
        object.__setattr__(self, "sigma", _positive_six(self.sigma, "CMAESConfig.sigma"))
        object.__setattr__(self, "local_step", _positive_six(self.local_step, "CMAESConfig.local_step"))
        if self.local not in ("bobyqa", "cmaes", "none"):
            raise InputError(f"CMAESConfig.local: expected 'bobyqa', 'cmaes' or 'none', got {self.local!r}")
        if self.parameterization not in ("se3", "euler"):
            raise InputError(
                f"CMAESConfig.parameterization: expected 'se3' or 'euler', got {self.parameterization!r}"
            )
        for name in ("rel_tol", "local_xtol"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"CMAESConfig.{name}: expected a finite number ≥ 0, got {value!r}")
        if not isinstance(self.local_bound, (int, float)) or not (1.0 <= self.local_bound < math.inf):
            raise InputError(
                f"CMAESConfig.local_bound: expected a finite number ≥ 1 (in units of local_step), "
                f"got {self.local_bound!r}"
            )
        if not (callable(self.loss) or isinstance(self.loss, str)):
            raise InputError(f"CMAESConfig.loss: expected an ImageLoss spec or a callable, got {self.loss!r}")


# ---------------------------------------------------------------------------------------------- helpers
def _level(intrinsics: Intrinsics, target: torch.Tensor, factor: int) -> tuple[Intrinsics, torch.Tensor]:
    rows = max(4, round(intrinsics.rows / factor))
    cols = max(4, round(rows * intrinsics.cols / intrinsics.rows))
    return intrinsics.resized(rows, cols), _downsample(target, rows, cols)


def _stack_results(results: list[RegistrationResult], seconds: float) -> RegistrationResult:
    """Problems solved one at a time → one batched result (shorter trajectories repeat their last step)."""
    if len(results) == 1:
        return results[0]
    S = max(r.poses.shape[0] for r in results)
    poses = torch.cat(
        [torch.cat([r.poses, r.poses[-1:].expand(S - r.poses.shape[0], -1, -1, -1)]) for r in results], 1
    )
    n = max(len(r.trajectory) for r in results)
    trajectory = []
    for i in range(n):
        steps = [r.trajectory[min(i, len(r.trajectory) - 1)] for r in results if r.trajectory]
        trajectory.append(
            Step(steps[0].level, i, torch.cat([s.loss for s in steps]), max(s.seconds for s in steps))
        )
    reasons = list(dict.fromkeys(r.stop_reason for r in results))
    diverged = [
        r.diverged if r.diverged is not None else torch.zeros(r.pose.shape[0], dtype=torch.bool)
        for r in results
    ]
    return RegistrationResult(
        pose=torch.cat([r.pose for r in results]),
        loss=torch.cat([r.loss for r in results]),
        initial_loss=torch.cat([r.initial_loss for r in results]),
        poses=poses,
        trajectory=trajectory,
        stop_reason=",".join(reasons),
        diverged=torch.cat([d.to(results[0].pose.device) for d in diverged]),
        seconds=seconds,
    )


class _Problem:
    """One registration problem: parameters ``p`` (°, mm) ``(P, 6)`` → poses, and their losses at a level."""

    def __init__(
        self,
        renderer: Renderer,
        target: torch.Tensor,
        intrinsics: Intrinsics,
        init_pose: torch.Tensor,
        pivot_world: torch.Tensor | None,
        config: CMAESConfig,
        callback: Callback | None,
        start: float,
    ) -> None:
        self.renderer, self.target, self.intrinsics = renderer, target, intrinsics
        self.loss_fn = _loss_fn(config.loss)
        self.kind = config.parameterization
        self.dtype, self.device = init_pose.dtype, init_pose.device
        self.init = init_pose.detach().to(torch.float64)
        pivot_cam = torch.tensor([[0.0, 0.0, intrinsics.sdd / 2]], dtype=torch.float64, device=self.device)
        if pivot_world is not None:
            pw = pivot_world.to(device=self.device, dtype=torch.float64).reshape(1, 1, 3)
            pivot_cam = transform_points(invert(self.init), pw)[:, 0]
        self.to_pivot = torch.eye(4, dtype=torch.float64, device=self.device).unsqueeze(0)
        self.to_pivot[:, :3, 3] = pivot_cam
        self.from_pivot = invert(self.to_pivot)
        self.callback, self.start = callback, start
        self.trajectory: list[Step] = []
        self.poses: list[torch.Tensor] = []
        self.nonfinite = 0  # losses that were not finite

    def pose(self, params: np.ndarray) -> torch.Tensor:
        p = torch.as_tensor(np.asarray(params, dtype=np.float64), device=self.device).reshape(-1, 6)
        motion = _Motion(self.kind, p.shape[0], torch.float64, self.device)
        rotation = torch.deg2rad(p[:, :3])
        # ZYX Euler angles are ordered (z, y, x); the parameters stay (rx, ry, rz)
        motion.rotation = rotation.flip(-1) if self.kind == "euler" else rotation
        motion.translation = p[:, 3:]
        return compose(self.init, self.to_pivot, motion.transform(), self.from_pivot).to(self.dtype)

    def losses(
        self, intr: Intrinsics, tgt: torch.Tensor, params: np.ndarray
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Poses ``(P, 4, 4)`` and losses ``(P,)`` (float64, NaN kept) of parameters ``(P, 6)``: one render."""
        poses = self.pose(params)
        with torch.no_grad():
            try:
                image = self.renderer(Camera(intr, poses))
                loss = self.loss_fn(image, tgt.expand(poses.shape[0], -1, -1))
            except GeometryError:
                # a wide search can put a candidate's X-ray source inside the CT: such candidates are
                # infeasible (NaN, replaced by a poor finite value by the optimiser), the others are scored
                loss = torch.full((poses.shape[0],), math.nan, dtype=torch.float64)
                for i in range(poses.shape[0]):
                    try:
                        one = self.renderer(Camera(intr, poses[i : i + 1]))
                    except GeometryError:
                        continue
                    loss[i] = float(self.loss_fn(one, tgt[:1])[0])
        return poses, loss.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1)

    def record(self, level: int, step: int, loss: float, pose: torch.Tensor) -> None:
        record = Step(level, step, torch.tensor([loss], dtype=self.dtype), time.perf_counter() - self.start)
        self.trajectory.append(record)
        self.poses.append(pose.detach().cpu().reshape(1, 4, 4))
        if self.callback is not None:
            self.callback(record, pose.detach().reshape(1, 4, 4))


def _cmaes_level(
    problem: _Problem,
    level: int,
    factor: int,
    base: np.ndarray,
    scale: np.ndarray,
    population: int,
    generations: int,
    bound: float | None,
    config: CMAESConfig,
    seed: int,
) -> tuple[np.ndarray, float, str]:
    """CMA-ES on ``x = (p − base) / scale`` from ``x = 0`` (σ = 1): the best parameters, loss, stop reason."""
    from cmaes import CMA

    intr, tgt = _level(problem.intrinsics, problem.target, factor)
    pose, loss = problem.losses(intr, tgt, base[None])
    best_p, best = base.copy(), float(loss[0]) if math.isfinite(loss[0]) else math.inf
    problem.record(level, 0, float(loss[0]), pose)
    bounds = None if bound is None else np.tile([-bound, bound], (6, 1)).astype(np.float64)
    opt = CMA(mean=np.zeros(6), sigma=1.0, bounds=bounds, seed=seed, population_size=population)
    reason, since, divergences = "iterations", 0, 0
    for gen in range(1, generations + 1):
        xs = np.stack([opt.ask() for _ in range(opt.population_size)])
        params = base + xs * scale
        poses, losses = problem.losses(intr, tgt, params)
        finite = np.isfinite(losses)
        problem.nonfinite += int((~finite).sum())
        values = np.where(finite, losses, (losses[finite].max() + 1.0) if finite.any() else _PENALTY)
        opt.tell(list(zip(xs, values.tolist(), strict=True)))
        i = int(np.argmin(values))
        problem.record(level, gen, float(losses[i]), poses[i])
        if not finite.any():
            divergences += 1
            if divergences > config.max_divergences:
                reason = "diverged"
                break
            continue
        improved = losses[i] < best - config.rel_tol * abs(best) if math.isfinite(best) else True
        if losses[i] < best:
            best_p, best = params[i].copy(), float(losses[i])
        since = 0 if improved else since + 1
        if since >= config.patience:
            reason = "plateau"
            break
        if opt.should_stop():
            reason = "converged"
            break
    return best_p, best, reason


def _bobyqa_level(
    problem: _Problem, level: int, base: np.ndarray, config: CMAESConfig
) -> tuple[np.ndarray, float, str]:
    """BOBYQA (nlopt) on ``x = (p − base) / local_step`` in ``±local_bound``: best parameters, loss, reason."""
    try:
        import nlopt
    except ImportError:
        raise InputError(
            "CMAESConfig.local='bobyqa' needs the nlopt package (pip install nlopt), or use local='cmaes'"
        ) from None
    intr, tgt = _level(problem.intrinsics, problem.target, config.local_downsample)
    step = np.asarray(config.local_step, dtype=np.float64)
    state: dict[str, Any] = {"best_p": base.copy(), "best": math.inf, "n": 0, "nan": 0}
    opt = nlopt.opt(nlopt.LN_BOBYQA, 6)

    def objective(x: np.ndarray, grad: np.ndarray) -> float:
        params = base + np.asarray(x, dtype=np.float64) * step
        pose, loss = problem.losses(intr, tgt, params[None])
        value = float(loss[0])
        problem.record(level, state["n"], value, pose)
        state["n"] += 1
        if not math.isfinite(value):
            state["nan"] += 1
            if state["nan"] > config.max_divergences:
                opt.force_stop()
            return _PENALTY
        if value < state["best"]:
            state["best_p"], state["best"] = params.copy(), value
        return value

    opt.set_min_objective(objective)
    opt.set_lower_bounds([-config.local_bound] * 6)
    opt.set_upper_bounds([config.local_bound] * 6)
    opt.set_initial_step(1.0)
    opt.set_xtol_abs(config.local_xtol)
    opt.set_maxeval(config.local_evaluations)
    try:
        opt.optimize(np.zeros(6))
    except (nlopt.RoundoffLimited, nlopt.ForcedStop):
        pass
    code = opt.last_optimize_result()
    problem.nonfinite += state["nan"]
    if code == nlopt.FORCED_STOP:
        reason = "diverged"
    elif code == nlopt.MAXEVAL_REACHED:
        reason = "iterations"
    else:
        reason = "converged"
    return state["best_p"], state["best"], reason


def _cmaes_one(
    problem: _Problem, config: CMAESConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    zero = np.zeros(6)
    best_p, _, reason = _cmaes_level(
        problem,
        0,
        config.downsample,
        zero,
        np.asarray(config.sigma, dtype=np.float64),
        config.population,
        config.generations,
        None,
        config,
        seed,
    )
    final_factor = config.downsample
    if config.local != "none" and reason != "diverged" and config.local_evaluations > 0:
        final_factor = config.local_downsample
        if config.local == "bobyqa":
            best_p, _, reason = _bobyqa_level(problem, 1, best_p, config)
        else:
            generations = max(1, config.local_evaluations // config.local_population)
            best_p, _, reason = _cmaes_level(
                problem,
                1,
                config.local_downsample,
                best_p,
                np.asarray(config.local_step, dtype=np.float64),
                config.local_population,
                generations,
                config.local_bound,
                config,
                seed,
            )
    # the best pose and the initial one, scored at the finest level run (one batched render)
    intr, tgt = _level(problem.intrinsics, problem.target, final_factor)
    poses, losses = problem.losses(intr, tgt, np.stack([best_p, zero]))
    loss = torch.tensor(losses, dtype=problem.dtype, device=problem.device)
    return poses[:1], loss[:1], loss[1:], reason


# ---------------------------------------------------------------------------------------------- methods
def register_cmaes(
    renderer: Renderer,
    target: torch.Tensor,
    intrinsics: Intrinsics,
    init_pose: torch.Tensor,
    config: CMAESConfig | None = None,
    *,
    pivot_world: torch.Tensor | Sequence[float] | None = None,
    callback: Callback | None = None,
) -> RegistrationResult:
    """xReg-style registration: CMA-ES at a coarse detector, then a local derivative-free refinement.

    Level 1 runs CMA-ES over the 6 local pose parameters (see :class:`CMAESConfig`) at ``config.downsample``,
    rendering each generation's whole population in one batched call; level 2 refines the best pose with
    BOBYQA (or a small CMA-ES) at ``config.local_downsample``. Problems of a batch are solved one at a time.

    Args:
        renderer: e.g. :class:`~xraypose.registration.VolumeRenderer`.
        target: ``(B, rows, cols)`` or ``(rows, cols)`` X-ray images on ``intrinsics``' detector (``−ln(I/I0)``).
        intrinsics: the detector of ``target``.
        init_pose: ``(B, 4, 4)`` (or ``(4, 4)``) initial camera-to-world poses (world = CT RAS, mm).
        config: schedule, loss, parameterisation, seed.
        pivot_world: centre of the local rotations (world mm); default as :func:`register` (the CT's centre if
            the renderer has a volume, else the point on each initial principal axis at half the
            source-to-detector distance).
        callback: called after every evaluation step with the step (``loss`` ``(1,)``: the generation's best,
            or BOBYQA's evaluation) and its pose ``(1, 4, 4)``.

    Returns:
        A :class:`RegistrationResult`: the best pose per problem, its loss and the initial pose's at the finest
        level run, the trajectory (level 1: the initial pose, then each generation's best member; level 2: each
        evaluation; ``poses`` ``(S, B, 4, 4)``, shorter problems repeat their last pose), ``stop_reason`` of the
        last level (``"iterations"``, ``"plateau"``, ``"converged"``, ``"diverged"``; comma-joined when the
        problems of a batch differ), ``diverged`` (a non-finite loss was met) and the wall time.
    """
    config = CMAESConfig() if config is None else config
    if not isinstance(config, CMAESConfig):
        raise InputError(f"config: expected a CMAESConfig, got {type(config).__name__}")
    target, init_pose = _check_problem(target, intrinsics, init_pose)
    pivot = _pivot_world(renderer, pivot_world)
    start = time.perf_counter()
    results = []
    for b in range(init_pose.shape[0]):
        t0 = time.perf_counter()
        problem = _Problem(
            renderer, target[b : b + 1], intrinsics, init_pose[b : b + 1], pivot, config, callback, start
        )
        pose, loss, initial, reason = _cmaes_one(problem, config, config.seed + b)
        results.append(
            RegistrationResult(
                pose=pose,
                loss=loss,
                initial_loss=initial,
                poses=torch.stack(problem.poses),
                trajectory=problem.trajectory,
                stop_reason=reason,
                diverged=torch.tensor([problem.nonfinite > 0], device=pose.device),
                seconds=time.perf_counter() - t0,
            )
        )
    return _stack_results(results, time.perf_counter() - start)


def register_euler_gd(
    renderer: Renderer,
    target: torch.Tensor,
    intrinsics: Intrinsics,
    init_pose: torch.Tensor,
    config: RegistrationConfig | None = None,
    *,
    callback: Callback | None = None,
) -> RegistrationResult:
    """Naive gradient descent: :func:`register` with ZYX Euler angles rotating about the X-ray source.

    A thin wrapper: ``config`` (default :class:`RegistrationConfig`, same schedule and loss as ``"diffpose"``)
    is used with ``parameterization="euler"`` and no multi-start search forced, and the pivot is the initial source position (the camera
    origin), so a rotation swings the anatomy ~``source-to-object distance × angle`` across the detector.
    Problems whose initial sources differ are solved one at a time (the engine takes one pivot per call).
    """
    config = RegistrationConfig() if config is None else config
    if not isinstance(config, RegistrationConfig):
        raise InputError(f"config: expected a RegistrationConfig, got {type(config).__name__}")
    config = replace(config, parameterization="euler", search=None)
    target, init_pose = _check_problem(target, intrinsics, init_pose)
    sources = init_pose[:, :3, 3]
    if bool(torch.allclose(sources, sources[:1].expand_as(sources), rtol=0.0, atol=1e-6)):
        return register(
            renderer, target, intrinsics, init_pose, config, pivot_world=sources[0], callback=callback
        )
    start = time.perf_counter()
    results = [
        register(
            renderer,
            target[b : b + 1],
            intrinsics,
            init_pose[b : b + 1],
            config,
            pivot_world=sources[b],
            callback=callback,
        )
        for b in range(init_pose.shape[0])
    ]
    return _stack_results(results, time.perf_counter() - start)


def _preset_method(name: str) -> MethodFn:
    """A method running :func:`register` with the preset ``name`` (``"default"``: search at 32 px, then
    64 → 128 px; ``"fine"``: polychromatic Newton levels on ``pwls`` at 128 and 256 px after the 64 px one)."""

    def method(
        renderer: Renderer,
        target: torch.Tensor,
        intrinsics: Intrinsics,
        init_pose: torch.Tensor,
        *,
        seed: int = 0,
    ) -> RegistrationResult:
        return register(renderer, target, intrinsics, init_pose, preset(name, seed=seed))

    method.__doc__ = f"``register`` with the {name!r} preset."
    return method


def _cmaes_method(
    renderer: Renderer,
    target: torch.Tensor,
    intrinsics: Intrinsics,
    init_pose: torch.Tensor,
    *,
    seed: int = 0,
) -> RegistrationResult:
    """``register_cmaes`` with the default :class:`CMAESConfig` (CMA-ES at 8×, BOBYQA at 4× downsampling)."""
    return register_cmaes(renderer, target, intrinsics, init_pose, CMAESConfig(seed=seed))


def _euler_gd_method(
    renderer: Renderer,
    target: torch.Tensor,
    intrinsics: Intrinsics,
    init_pose: torch.Tensor,
    *,
    seed: int = 0,
) -> RegistrationResult:
    """``register_euler_gd`` with the default schedule (Euler angles about the source)."""
    return register_euler_gd(renderer, target, intrinsics, init_pose, RegistrationConfig(seed=seed))


def _no_refinement_method(
    renderer: Renderer,
    target: torch.Tensor,
    intrinsics: Intrinsics,
    init_pose: torch.Tensor,
    *,
    seed: int = 0,
) -> RegistrationResult:
    """The initial pose unchanged (no steps), scored by the default loss at the full detector."""
    del seed  # deterministic
    start = time.perf_counter()
    target, init_pose = _check_problem(target, intrinsics, init_pose)
    loss = _score(renderer, target, intrinsics, init_pose, RegistrationConfig().loss, intrinsics.rows)
    return RegistrationResult(
        pose=init_pose.detach().clone(),
        loss=loss,
        initial_loss=loss.clone(),
        poses=init_pose.detach().cpu().unsqueeze(0),
        stop_reason="none",
        diverged=torch.zeros(init_pose.shape[0], dtype=torch.bool, device=init_pose.device),
        seconds=time.perf_counter() - start,
    )


#: The registered methods, by name (see the module docstring), for the benchmark runner.
METHODS: dict[str, MethodFn] = {
    "diffpose": _preset_method("default"),
    "diffpose-fine": _preset_method("fine"),
    "cmaes": _cmaes_method,
    "euler-gd": _euler_gd_method,
    "none": _no_refinement_method,
}
