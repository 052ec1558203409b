"""Registration with ProST's learned similarity, and the ProST → CMA-ES / gradient-NCC pipeline.

:class:`LearnedSimilarityRenderer` and :class:`LearnedSimilarityLoss` plug a trained similarity
(:func:`xraypose.learning.load_similarity`) into the existing engine: the "renderer" projects the network's
feature volume with the projective spatial transformer, the "loss" encodes that projection and the X-ray and
returns their distance ``(B,)``. :func:`register_prost` descends it with :func:`~xraypose.registration.register`
(one level at the network's image size, no multi-start search, the same pivot chart as in training) until it
plateaus, then hands the pose over to CMA-ES (:func:`~xraypose.registration.register_cmaes`, the paper's
pipeline) or to gradient-NCC descent through the CT's own renderer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import InputError
from ..geometry.camera import Camera, Intrinsics
from ..io.volume import Volume
from .baselines import CMAESConfig, MethodFn, register_cmaes
from .engine import (
    RegistrationConfig,
    RegistrationResult,
    Scale,
    Step,
    _check_problem,
    _level_loss,
    _score,
    register,
)
from .renderers import Renderer

__all__ = [
    "HANDOVER_SIGMA",
    "PROST_METHODS",
    "LearnedSimilarityLoss",
    "LearnedSimilarityRenderer",
    "ProSTConfig",
    "ProSTMethod",
    "prost_method_table",
    "register_prost",
]

Refine = Literal["cmaes", "gncc", "none"]
#: Trajectory level of the learned-similarity descent in a :func:`register_prost` result (the refinement's
#: levels follow from 0; −1 is the engine's multi-start search).
PROST_LEVEL = -2


class LearnedSimilarityRenderer:
    """The trained feature volume of a CT seen by a camera: ``(B, C, rows, cols)`` projections (renderer
    protocol of the engine; differentiable w.r.t. the pose; no sparse pixels).

    Args:
        similarity: a :class:`~xraypose.learning.TrainedSimilarity`.
        ct: the patient's CT (HU), the one the similarity was trained on.
        device: where to run.
    """

    def __init__(self, similarity: Any, ct: Volume, *, device: torch.device | str = "cpu") -> None:
        from ..learning.similarity_training import TrainedSimilarity

        if not isinstance(similarity, TrainedSimilarity):
            raise InputError(f"similarity: expected a TrainedSimilarity, got {type(similarity).__name__}")
        self.similarity = similarity
        self.model = similarity.model.to(device).eval()
        prepared = similarity.prepare(ct).to(device)
        with torch.no_grad():
            self.features = self.model.feature_volume(prepared.volume)
        self.affine = prepared.affine
        self.volume = self.features  # for the engine's default pivot (the box centre)

    @property
    def device(self) -> torch.device:
        return self.features.device

    def __call__(self, camera: Camera, pixels: torch.Tensor | None = None) -> torch.Tensor:
        if pixels is not None:
            raise InputError("the learned-similarity renderer renders whole detectors (no sparse pixels)")
        pose = camera.pose.to(device=self.device, dtype=self.features.dtype)
        return self.model.project(self.features, self.affine, Camera(camera.intrinsics, pose))


class LearnedSimilarityLoss:
    """``loss(moving, target, mask=None) → (B,)``: the network's encoding distance of moving projections
    ``(B, C, H, W)`` and X-rays ``(B, H, W)`` (``−ln(I/I0)``; standardised inside). ``mask`` is not supported."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if mask is not None:
            raise InputError("the learned similarity scores whole images (no masks / sparse rendering)")
        return self.model.encodings_distance(pred, target.to(device=pred.device, dtype=pred.dtype))


#: Initial CMA-ES σ of ProST's hand-over (°, °, °, mm, mm, mm): a third of the ``cmaes`` baseline's.
HANDOVER_SIGMA: tuple[float, ...] = (5.0, 5.0, 10.0, 15.0, 15.0, 30.0)


@dataclass(frozen=True)
class ProSTConfig:
    """Settings of :func:`register_prost`.

    Args:
        iterations: at most this many steps of learned-similarity descent (Adam, se(3) about the pivot).
        lr_rotation: its step size of the rotation (rad).
        lr_translation: its step size of the translation (mm).
        plateau_patience: steps without a relative improvement of ``rel_tol`` before the steps are halved.
        patience: steps without improvement that end the descent (the plateau).
        rel_tol: relative improvement that counts.
        refine: the hand-over: ``"cmaes"`` (the paper's ProST → CMA-ES), ``"gncc"`` (gradient-NCC descent)
            or ``"none"``.
        cmaes: settings of the CMA-ES refinement: default the ``cmaes`` baseline's (xReg's two levels) with a
            narrower initial σ, :data:`HANDOVER_SIGMA` (5°, 5°, 10°, 15, 15, 30 mm), since it starts from the
            learned descent's pose, not from anywhere in the capture range (measured on the pelvis at 20°/40 mm:
            11/12 successes against 8/12 with the baseline's σ of 15°, 15°, 30°, 50, 50, 100 mm;
            ``docs/benchmarks.md``).
        gncc: settings of the gradient refinement (default: the engine's schedule on gradient NCC, no search).
        seed: seeds the refinement.
    """

    iterations: int = 200
    lr_rotation: float = 1e-2
    lr_translation: float = 2.0
    plateau_patience: int = 10
    patience: int = 25
    rel_tol: float = 1e-4
    refine: Refine = "cmaes"
    cmaes: CMAESConfig = field(default_factory=lambda: CMAESConfig(sigma=HANDOVER_SIGMA))
    gncc: RegistrationConfig = field(default_factory=lambda: RegistrationConfig(loss="gncc", search=None))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.refine not in ("cmaes", "gncc", "none"):
            raise InputError(f"ProSTConfig.refine: expected 'cmaes', 'gncc' or 'none', got {self.refine!r}")
        for name in ("iterations", "plateau_patience", "patience", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"ProSTConfig.{name}: expected an integer >= 0, got {v!r}")
        if not isinstance(self.cmaes, CMAESConfig) or not isinstance(self.gncc, RegistrationConfig):
            raise InputError("ProSTConfig: 'cmaes' must be a CMAESConfig and 'gncc' a RegistrationConfig")


def register_prost(
    renderer: Renderer,
    target: torch.Tensor,
    intrinsics: Intrinsics,
    init_pose: torch.Tensor,
    similarity_renderer: LearnedSimilarityRenderer,
    config: ProSTConfig | None = None,
    *,
    pivot_world: torch.Tensor | Sequence[float] | None = None,
    callback: Callable[[Step, torch.Tensor], None] | None = None,
) -> RegistrationResult:
    """ProST registration: descend the learned similarity until it plateaus, then refine.

    Args:
        renderer: the CT's renderer for the refinement (e.g. :class:`~xraypose.registration.VolumeRenderer`).
        target: ``(B, rows, cols)`` or ``(rows, cols)`` X-rays (``−ln(I/I0)``) on ``intrinsics``' detector.
        intrinsics: their detector.
        init_pose: ``(B, 4, 4)`` initial camera-to-world poses.
        similarity_renderer: the trained similarity bound to the CT (:class:`LearnedSimilarityRenderer`).
        config: settings (default :class:`ProSTConfig`).
        pivot_world: centre of the local rotations (world mm); default the similarity's training pivot.
        callback: called after every step of both stages with the step and the current poses.
    Returns:
        The refinement's :class:`~xraypose.registration.RegistrationResult` (its pose, loss and stop reason),
        with the learned-similarity steps first in ``trajectory`` (level ``PROST_LEVEL`` = −2) and ``poses``,
        ``initial_loss`` the initial pose's refinement loss at the refinement's finest level (for
        ``refine="none"``: the learned similarity's), and the total wall time.
    """
    config = ProSTConfig() if config is None else config
    if not isinstance(config, ProSTConfig):
        raise InputError(f"config: expected a ProSTConfig, got {type(config).__name__}")
    if not isinstance(similarity_renderer, LearnedSimilarityRenderer):
        raise InputError(
            f"similarity_renderer: expected a LearnedSimilarityRenderer, got {type(similarity_renderer).__name__}"
        )
    target, init_pose = _check_problem(target, intrinsics, init_pose)
    pivot = similarity_renderer.similarity.pivot_world if pivot_world is None else pivot_world
    start = time.perf_counter()
    size = similarity_renderer.model.config.image_size
    stage1 = RegistrationConfig(
        scales=(Scale(size, config.iterations, config.lr_rotation, config.lr_translation),),
        loss=LearnedSimilarityLoss(similarity_renderer.model),
        rel_tol=config.rel_tol,
        plateau_patience=config.plateau_patience,
        patience=config.patience,
        seed=config.seed,
        search=None,
    )
    if config.iterations > 0:
        learned = register(
            similarity_renderer, target, intrinsics, init_pose, stage1, pivot_world=pivot, callback=callback
        )
        pose = learned.pose.to(init_pose.dtype)
    else:
        learned, pose = None, init_pose
    if config.refine == "none":
        if learned is None:
            raise InputError("ProSTConfig: iterations = 0 and refine = 'none' leave nothing to run")
        return replace(
            learned,
            trajectory=[replace(s, level=PROST_LEVEL) for s in learned.trajectory],
            seconds=time.perf_counter() - start,
        )
    if config.refine == "cmaes":
        cm = replace(config.cmaes, seed=config.seed)
        refined = register_cmaes(renderer, target, intrinsics, pose, cm, pivot_world=pivot, callback=callback)
        factor = cm.local_downsample if cm.local != "none" and cm.local_evaluations > 0 else cm.downsample
        initial = _score(
            renderer, target, intrinsics, init_pose, cm.loss, max(4, round(intrinsics.rows / factor))
        )
    else:
        gc = replace(config.gncc, seed=config.seed)
        refined = register(renderer, target, intrinsics, pose, gc, pivot_world=pivot, callback=callback)
        last = gc.scales[-1]
        initial = _score(renderer, target, intrinsics, init_pose, _level_loss(last, gc.loss), last.size)
    if learned is None:
        return replace(refined, initial_loss=initial, seconds=time.perf_counter() - start)
    steps = [replace(s, level=PROST_LEVEL) for s in learned.trajectory]
    return RegistrationResult(
        pose=refined.pose,
        loss=refined.loss,
        initial_loss=initial,
        poses=torch.cat([learned.poses, refined.poses.to(learned.poses.dtype)]),
        trajectory=steps + refined.trajectory,
        stop_reason=refined.stop_reason,
        diverged=refined.diverged
        if learned.diverged is None or refined.diverged is None
        else refined.diverged | learned.diverged.to(refined.diverged.device),
        seconds=time.perf_counter() - start,
    )


class ProSTMethod:
    """A benchmark method running :func:`register_prost` with a trained similarity folder.

    The runner binds the CT (:meth:`bind_ct`) before the first call; the model card is checked against the CT
    and the detector at the first call.

    Args:
        similarity: a :func:`~xraypose.learning.train_similarity` output folder, or its loaded
            :class:`~xraypose.learning.TrainedSimilarity`.
        refine: ``"cmaes"``, ``"gncc"`` or ``"none"``.
        config: further settings (``refine`` and ``seed`` are replaced).
        device: where the similarity runs (default: the renderer's device).
    """

    def __init__(
        self,
        similarity: Any,
        refine: Refine = "cmaes",
        config: ProSTConfig | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        from ..learning import TrainedSimilarity, load_similarity

        self.similarity = (
            similarity if isinstance(similarity, TrainedSimilarity) else load_similarity(similarity)
        )
        self.config = replace(ProSTConfig() if config is None else config, refine=refine)
        self.device = device
        self._ct: Volume | None = None
        self._bound: LearnedSimilarityRenderer | None = None
        self._checked: set[tuple[Any, ...]] = set()

    def bind_ct(self, volume: Volume, ct_file: Path | None = None) -> ProSTMethod:
        self._ct = volume
        self._bound = None
        return self

    def __call__(
        self,
        renderer: Renderer,
        target: torch.Tensor,
        intrinsics: Intrinsics,
        init_pose: torch.Tensor,
        *,
        seed: int = 0,
    ) -> RegistrationResult:
        from ..learning import check_model_card

        if self._ct is None:
            raise InputError("ProSTMethod: bind the CT first (bind_ct), as run_benchmark does")
        key = (intrinsics.sdd, intrinsics.rows * intrinsics.dy, intrinsics.cols * intrinsics.dx)
        if key not in self._checked:
            check_model_card(self.similarity.card, self._ct, intrinsics)
            self._checked.add(key)
        if self._bound is None:
            device = self.device if self.device is not None else getattr(renderer, "device", "cpu")
            self._bound = LearnedSimilarityRenderer(self.similarity, self._ct, device=device)
        return register_prost(
            renderer,
            target,
            intrinsics,
            init_pose,
            self._bound,
            replace(self.config, seed=seed),
        )


#: Benchmark method names of the ProST pipeline → their refinement (they need a trained similarity folder).
PROST_METHODS: dict[str, Refine] = {"prost-cmaes": "cmaes", "prost-gncc": "gncc", "prost": "none"}


def prost_method_table(
    similarity_dir: str | Path, names: Sequence[str] | None = None, config: ProSTConfig | None = None
) -> dict[str, MethodFn]:
    """``{name: ProSTMethod}`` for the :data:`PROST_METHODS` ``names`` (default all), sharing one loaded model;
    ``config`` sets everything but the refinement (default :class:`ProSTConfig`)."""
    from ..learning import load_similarity

    names = list(PROST_METHODS) if names is None else list(names)
    unknown = [n for n in names if n not in PROST_METHODS]
    if unknown:
        raise InputError(f"prost methods: unknown {unknown}; expected {sorted(PROST_METHODS)}")
    trained = load_similarity(similarity_dir)
    return {n: ProSTMethod(trained, PROST_METHODS[n], config) for n in names}
