"""Double-backward, gradient-driven training of ProST's learned similarity on one patient's CT.

Each step (:func:`train_similarity`):

1. true poses ``T_gt`` and their DRRs (the *fixed* images) come from the pose-regressor's data stream
   (:class:`~xraypose.learning.data.PoseDataStream`: the patient's C-arm poses by default, rendered by the fast
   engine, near-empty views redrawn; a pure function of ``(seed, step)``), randomised towards real X-rays
   (:mod:`~xraypose.learning.augment`);
2. start poses ``T_s = T_gt · P · exp(ξ) · P⁻¹``, ``ξ ~ N(0, diag(σ_t², σ_r²))`` per axis in the pivot chart of
   the registration engine (``P``: translation to the pivot, the CT centre, in the true camera's frame;
   defaults close to the paper: σ_r = 9.5° and σ_t = 22 mm per axis), seeded by ``(seed, step, sample)``;
3. the network's feature volume is projected at ``T_s`` by the projective spatial transformer, the similarity
   ``S`` is differentiated w.r.t. the start pose's twist with ``create_graph=True`` and the direction loss
   ``2 − cos∠(−∇_ω S, ξ*_ω) − cos∠(−∇_v S, ξ*_v)`` against the SE(3) geodesic's tangent
   ``ξ* = log(P_s⁻¹ T_s⁻¹ T_gt P_s)`` (:func:`~xraypose.learning.similarity.direction_loss`) is backpropagated
   into the network (AdamW, warm-up and cosine decay, gradient clipping).

Run-keeping is the pose regressor's (:mod:`xraypose.learning._run`): ``out_dir/checkpoint.pt`` written
atomically every ``checkpoint_every`` steps (model, optimiser, scheduler, RNG, step; read with
``weights_only=True``), exact resume (bitwise on the CPU), ``log.csv``, a rich progress bar, and at the end
``similarity.safetensors`` and ``model_card.json`` (CT SHA-256, detector, poses, configurations, pivot, input
volume level; :func:`~xraypose.learning.check_model_card` checks it against another CT or camera).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_path, atomic_write_text
from ..errors import FileFormatError, InputError
from ..geometry.camera import Intrinsics
from ..geometry.se3 import compose, se3_exp
from ..io.volume import Volume
from ._config import dataclass_from_dict
from ._run import (
    append_log_row,
    budget_position,
    ct_record,
    ct_sha256,
    jsonable,
    physical_detector,
    progress_bar,
    resume_from_checkpoint,
    rewrite_log,
    rng_state,
    save_checkpoint,
    versions,
    warmup_cosine,
)
from .augment import AugmentConfig, augment
from .data import PoseDataStream, PoseDistribution, derive_seed
from .similarity import (
    LearnedSimilarity,
    PreparedVolume,
    SimilarityConfig,
    direction_loss,
    pivot_frames,
    prepare_volume,
)

__all__ = [
    "PairBatch",
    "SimilarityTrainingConfig",
    "SimilarityTrainingResult",
    "TrainedSimilarity",
    "load_similarity",
    "sample_pairs",
    "train_similarity",
]

CHECKPOINT = "checkpoint.pt"
WEIGHTS_FILE = "similarity.safetensors"
CARD_FILE = "model_card.json"
LOG_FILE = "log.csv"
_CKPT_FORMAT = "xraypose.similarity_checkpoint"
_CARD_FORMAT = "xraypose.model_card"  # the model-card format of learning.training (check_model_card reads it)
_KIND = "prost_similarity"
_LOG_FIELDS = (
    "step",
    "loss",
    "cos_rotation",
    "cos_translation",
    "similarity",
    "lr",
    "pairs_per_s",
    "seconds",
)
_RESUME_FREE = ("checkpoint_every", "log_every", "device")


@dataclass(frozen=True)
class SimilarityTrainingConfig:
    """Hyper-parameters of :func:`train_similarity` (JSON round trip with :meth:`to_dict` / :meth:`from_dict`).

    Attributes:
        steps: optimiser steps.
        batch_size: (start, truth) pairs per step.
        lr: peak learning rate (AdamW); warm-up over ``warmup_steps``, cosine decay to ``lr · final_lr_fraction``.
        weight_decay: AdamW decoupled weight decay.
        grad_clip: clip the gradient norm to this (``0``: off; the paper clips at 10).
        rotation_sigma_deg: standard deviation of the start's rotation offset per axis (degrees, about the pivot).
        translation_sigma_mm: standard deviation of its translation offset per axis (mm, camera axes).
        augment: domain randomisation of the fixed images.
        checkpoint_every, log_every: steps between checkpoints / log rows (and at the end).
        seed: base seed of the initialisation, the poses and the augmentation.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``…
        physics: DRR physics of the fixed images, ``"mono"`` or ``"poly"``.
        min_foreground: near-empty fixed-image rejection (:class:`~xraypose.learning.data.PoseDataStream`).
        max_seconds: wall-clock budget of the whole training (resumptions included), seconds; ``0``: none. As in
            :class:`~xraypose.learning.TrainingConfig`: training stops at whichever of ``steps`` and the budget
            comes first, and the cosine decay follows whichever is further along (such runs depend on the
            machine's speed and are not reproducible step for step).
    """

    steps: int = 2000
    batch_size: int = 4
    lr: float = 2e-4
    warmup_steps: int = 50
    final_lr_fraction: float = 0.05
    weight_decay: float = 1e-4
    grad_clip: float = 10.0
    rotation_sigma_deg: float = 9.5
    translation_sigma_mm: float = 22.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    physics: str = "mono"
    min_foreground: float = 0.1
    max_seconds: float = 0.0

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> InputError:
            return InputError(
                f"SimilarityTrainingConfig.{name}: expected {expected}; got {getattr(self, name)!r}"
            )

        for name, low in (
            ("steps", 1),
            ("batch_size", 1),
            ("warmup_steps", 0),
            ("checkpoint_every", 1),
            ("log_every", 1),
            ("seed", 0),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise bad(name, f"an integer >= {low}")
        for name in (
            "lr",
            "final_lr_fraction",
            "weight_decay",
            "grad_clip",
            "rotation_sigma_deg",
            "translation_sigma_mm",
            "min_foreground",
            "max_seconds",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, "a finite number >= 0")
            object.__setattr__(self, name, float(v))
        if self.lr <= 0:
            raise bad("lr", "a positive number")
        if self.rotation_sigma_deg <= 0 and self.translation_sigma_mm <= 0:
            raise InputError(
                "SimilarityTrainingConfig: the start poses need a rotation or translation sigma > 0"
            )
        if self.min_foreground > 1:
            raise bad("min_foreground", "a fraction in [0, 1]")
        if isinstance(self.augment, Mapping):
            object.__setattr__(self, "augment", AugmentConfig.from_dict(self.augment))
        if not isinstance(self.augment, AugmentConfig):
            raise bad("augment", "an AugmentConfig")
        if not isinstance(self.device, str) or not self.device:
            raise bad("device", "'auto', 'cpu' or a CUDA device name")
        if self.physics not in ("mono", "poly"):
            raise bad("physics", "'mono' or 'poly'")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimilarityTrainingConfig:
        return dataclass_from_dict(cls, data)

    def schedule_position(self, step: int, elapsed_s: float = 0.0) -> int:
        """The step the cosine decay is at (``step``, or further along by the time budget; see
        :func:`~xraypose.learning._run.budget_position`)."""
        return budget_position(step, self.steps, elapsed_s, self.max_seconds)

    def lr_factor(self, step: int, position: int | None = None) -> float:
        """Learning rate of ``step`` relative to :attr:`lr`: warm-up, then a cosine at ``position``."""
        return warmup_cosine(step, self.steps, self.warmup_steps, self.final_lr_fraction, position)


@dataclass(frozen=True, eq=False)
class PairBatch:
    """One step's training pairs: ``fixed`` ``(B, 1, S, S)`` images at the ``truth`` poses, ``start`` poses
    (``(B, 4, 4)`` float64 camera-to-world)."""

    fixed: torch.Tensor
    start: torch.Tensor
    truth: torch.Tensor
    step: int


def _start_poses(
    truth: torch.Tensor,
    pivot: torch.Tensor,
    config: SimilarityTrainingConfig,
    step: int,
    source_inside: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``T_gt · P · exp(ξ) · P⁻¹`` with Gaussian ``ξ`` per sample, redrawn while the source is inside the CT."""
    B = truth.shape[0]
    P, Pinv = pivot_frames(truth, pivot)
    sig = torch.tensor(
        [config.translation_sigma_mm] * 3 + [math.radians(config.rotation_sigma_deg)] * 3, dtype=torch.float64
    )
    gens = [torch.Generator().manual_seed(derive_seed(config.seed, "start", step, i)) for i in range(B)]
    xi = torch.stack([torch.randn(6, generator=g, dtype=torch.float64) for g in gens]) * sig
    start = compose(truth, P, se3_exp(xi), Pinv)
    for _ in range(100):
        bad = source_inside(start)
        if not bool(bad.any()):
            break
        for i in bad.nonzero()[:, 0].tolist():
            xi_i = torch.randn(6, generator=gens[i], dtype=torch.float64) * sig
            start[i] = compose(truth[i], P[i], se3_exp(xi_i), Pinv[i])
    return start


def sample_pairs(
    stream: PoseDataStream, config: SimilarityTrainingConfig, step: int, pivot: torch.Tensor
) -> PairBatch:
    """The pairs of ``step``: a pure function of ``(config.seed, step)`` and the stream's settings."""
    batch = stream.batch(step)
    fixed = batch.drr
    if config.augment.strength > 0:
        gen = torch.Generator(device=fixed.device).manual_seed(derive_seed(config.seed, "augment", step))
        ti = stream.train_intrinsics
        fixed = augment(fixed, config.augment, gen, pixel_spacing_mm=(ti.dy, ti.dx))
    truth = batch.poses.double().cpu()
    start = _start_poses(truth, pivot, config, step, stream._source_inside)
    return PairBatch(fixed=fixed, start=start, truth=truth, step=step)


@dataclass
class SimilarityTrainingResult:
    """What :func:`train_similarity` returns (``model`` in eval mode on the training device)."""

    model: LearnedSimilarity
    volume: PreparedVolume
    pivot_world: torch.Tensor
    steps: int
    wall_time_s: float
    final_loss: float
    out_dir: Path
    card: dict[str, Any]
    resumed_from: int | None = None
    finished: bool = True


def _device(pref: str) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"SimilarityTrainingConfig.device: {pref!r} requested but CUDA is not available")
    return device


def train_similarity(
    ct: Volume,
    intrinsics: Intrinsics,
    out_dir: str | os.PathLike,
    config: SimilarityTrainingConfig | None = None,
    model_config: SimilarityConfig | None = None,
    *,
    distribution: PoseDistribution | None = None,
    center_world: torch.Tensor | tuple[float, float, float] | None = None,
    pivot_world: torch.Tensor | tuple[float, float, float] | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> SimilarityTrainingResult:
    """Train ProST's learned similarity on DRRs of ``ct`` (module docstring).

    Args:
        ct: the patient's CT (HU).
        intrinsics: the C-arm detector (any resolution; images are resampled to ``model_config.image_size``).
        out_dir: output folder (created): checkpoint, weights, model card, log.
        config: hyper-parameters (default :class:`SimilarityTrainingConfig`).
        model_config: the network (default :class:`~xraypose.learning.similarity.SimilarityConfig`).
        distribution: true poses (default: the C-arm ranges of :class:`~xraypose.geometry.sampling.CArmPoseDistribution`).
        center_world: the anatomy centre the C-arm views aim at (default: the stream's).
        pivot_world: rotation centre of the pose chart (default: the CT's centre, the registration engine's
            default pivot).
        resume: continue from ``out_dir/checkpoint.pt`` when present (same configuration, CT and camera; only
            ``checkpoint_every``, ``log_every`` and ``device`` may change); ``False`` starts afresh.
        progress: show a progress bar.
        stop_after: stop once this many steps are done in total, after a checkpoint (call again to continue).
        callback: ``callback(step, terms)`` after every step with the loss terms as floats.
    """
    config = SimilarityTrainingConfig() if config is None else config
    model_config = SimilarityConfig() if model_config is None else model_config
    if not isinstance(config, SimilarityTrainingConfig):
        raise InputError(
            f"train_similarity: 'config' must be a SimilarityTrainingConfig; got {type(config).__name__}"
        )
    if not isinstance(model_config, SimilarityConfig):
        raise InputError(
            f"train_similarity: 'model_config' must be a SimilarityConfig; got {type(model_config).__name__}"
        )
    if not isinstance(ct, Volume):
        raise InputError(f"train_similarity: 'ct' must be a Volume; got {type(ct).__name__}")
    if not isinstance(intrinsics, Intrinsics):
        raise InputError(
            f"train_similarity: 'intrinsics' must be Intrinsics; got {type(intrinsics).__name__}"
        )
    if stop_after is not None and (
        isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 0
    ):
        raise InputError(
            f"train_similarity: 'stop_after' must be None or an integer >= 0; got {stop_after!r}"
        )
    out = Path(out_dir)
    device = _device(config.device)
    out.mkdir(parents=True, exist_ok=True)
    pivot = (
        ct.center_world.detach().cpu().double()
        if pivot_world is None
        else torch.as_tensor(pivot_world, dtype=torch.float64).reshape(3)
    )
    stream = PoseDataStream(
        ct,
        intrinsics,
        image_size=model_config.image_size,
        batch_size=config.batch_size,
        distribution=distribution,
        center_world=center_world,
        seed=config.seed,
        device=device,
        physics=config.physics,
        min_foreground=config.min_foreground,
    )
    prepared = prepare_volume(ct, model_config.volume_size).to(device)
    sha = ct_sha256(ct)
    identity = {
        "config": config.to_dict(),
        "model_config": model_config.to_dict(),
        "ct_sha256": sha,
        "intrinsics": intrinsics.to_dict(),
        "poses": jsonable(stream.describe()),
        "pivot_world": pivot.tolist(),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init"))
        model = LearnedSimilarity(model_config)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: config.lr_factor(step))

    ckpt_path = out / CHECKPOINT
    start, elapsed_before, resumed_from, last_loss = 0, 0.0, None, float("nan")
    if resume:
        start, elapsed_before, resumed_from, last_loss = resume_from_checkpoint(
            ckpt_path, device, _CKPT_FORMAT, identity, _RESUME_FREE, model, opt, sched
        )
    log_path = out / LOG_FILE
    rewrite_log(log_path, start if resumed_from is not None else None, _LOG_FIELDS)

    intr_train = stream.train_intrinsics
    end = config.steps if stop_after is None else min(config.steps, max(stop_after, start))
    budget = config.max_seconds
    stopped_by = "steps"
    if budget > 0 and elapsed_before >= budget:
        end, stopped_by = start, "time_budget"
    elapsed_now = elapsed_before
    done = start
    acc = torch.zeros(4, dtype=torch.float64)
    n_acc = 0
    t0 = t_log = time.perf_counter()

    def checkpoint(step: int) -> None:
        save_checkpoint(
            ckpt_path,
            {
                "format": _CKPT_FORMAT,
                "version": 1,
                "step": step,
                "elapsed_s": elapsed_before + time.perf_counter() - t0,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": rng_state(device),
                "last_loss": last_loss,
                **identity,
            },
        )

    names = ("loss", "cos_rotation", "cos_translation", "similarity")
    with progress_bar("similarity", enabled=progress, rate_unit="pairs/s") as bar:
        task = bar.add_task("train", total=config.steps, completed=start, loss="—", ips="—")
        model.train()
        for step in range(start, end):
            if budget > 0:  # the decay follows the time spent (SimilarityTrainingConfig.max_seconds)
                factor = config.lr_factor(step, config.schedule_position(step, elapsed_now))
                for group in opt.param_groups:
                    group["lr"] = config.lr * factor
            pairs = sample_pairs(stream, config, step, pivot)
            features = model.feature_volume(prepared.volume)
            terms = direction_loss(
                model, features, prepared.affine, intr_train, pairs.fixed, pairs.start, pairs.truth, pivot
            )
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            lr_used = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            values = torch.stack([terms[k].detach().double().cpu() for k in names])
            acc += values
            n_acc += 1
            if callback is not None:
                callback(step + 1, dict(zip(names, values.tolist(), strict=True)))
            done = step + 1
            elapsed_now = elapsed_before + time.perf_counter() - t0
            budget_hit = budget > 0 and elapsed_now >= budget
            final = done == end or budget_hit
            if done % config.log_every == 0 or final:
                mean = (acc / n_acc).tolist()
                now = time.perf_counter()
                rate = n_acc * config.batch_size / max(now - t_log, 1e-9)
                last_loss = mean[0]
                row = {k: f"{v:.6g}" for k, v in zip(names, mean, strict=True)}
                row.update(
                    step=done,
                    lr=f"{lr_used:.6g}",
                    pairs_per_s=f"{rate:.2f}",
                    seconds=f"{elapsed_before + now - t0:.2f}",
                )
                append_log_row(log_path, _LOG_FIELDS, row)
                bar.update(task, loss=f"{mean[0]:.4f}", ips=f"{rate:.2f}")
                acc.zero_()
                n_acc = 0
                t_log = now
            if done % config.checkpoint_every == 0 or final:
                checkpoint(done)
            bar.update(task, completed=done)
            if budget_hit:
                stopped_by = "time_budget"
                break
        if end == start and not ckpt_path.exists():
            checkpoint(start)

    wall = elapsed_before + time.perf_counter() - t0
    if stopped_by == "steps" and done < config.steps:
        stopped_by = "stop_after"
    finished = stopped_by != "stop_after"
    extra = {
        "pivot_world": pivot.tolist(),
        "volume_scale": prepared.scale,
        "volume_factors": list(prepared.factors),
        "training_intrinsics": intr_train.to_dict(),
    }
    card = {
        "format": _CARD_FORMAT,
        "kind": _KIND,
        "version": 1,
        "created_unix": time.time(),
        "versions": versions(),
        "ct": ct_record(ct, sha),
        "intrinsics": intrinsics.to_dict(),
        "detector": physical_detector(intrinsics),
        "poses": identity["poses"],
        **extra,
        "training_config": config.to_dict(),
        "model_config": model_config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps_done": done,
        "finished": finished,
        "stopped_by": stopped_by,
        "wall_time_s": wall,
        "device": str(device),
        "final_loss": last_loss if math.isfinite(last_loss) else None,
        "files": {"weights": WEIGHTS_FILE, "checkpoint": CHECKPOINT, "log": LOG_FILE},
    }
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        model.save(tmp, extra)
    atomic_write_text(out / CARD_FILE, json.dumps(jsonable(card), indent=2))
    model.eval()
    return SimilarityTrainingResult(
        model=model,
        volume=prepared,
        pivot_world=pivot,
        steps=done,
        wall_time_s=wall,
        final_loss=last_loss,
        out_dir=out,
        card=card,
        resumed_from=resumed_from,
        finished=finished,
    )


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainedSimilarity:
    """A trained similarity and what using it needs: the pivot of its pose chart, the input-volume scale and
    the model card."""

    model: LearnedSimilarity
    pivot_world: torch.Tensor
    volume_scale: float
    card: dict[str, Any]

    def prepare(self, ct: Volume) -> PreparedVolume:
        """The network's input volume of ``ct``, scaled as in training."""
        return prepare_volume(ct, self.model.config.volume_size, scale=self.volume_scale)


def load_similarity(path: str | os.PathLike) -> TrainedSimilarity:
    """Load ``similarity.safetensors`` and ``model_card.json`` from a :func:`train_similarity` folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileFormatError(f"{folder}: not a trained-similarity folder (expected {WEIGHTS_FILE} inside)")
    model, extra = LearnedSimilarity.load(folder / WEIGHTS_FILE)
    try:
        card = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
        if card.get("kind") != _KIND:
            raise KeyError("kind")
        pivot = torch.tensor(extra["pivot_world"], dtype=torch.float64)
        scale = float(extra["volume_scale"])
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise FileFormatError(
            f"{folder / CARD_FILE}: missing or invalid similarity model card ({exc})"
        ) from None
    return TrainedSimilarity(model, pivot, scale, card)
