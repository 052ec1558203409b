"""Patient-specific training of a :class:`~xraypose.learning.model.PoseRegressor` (DiffPose-style, self-supervised).

:func:`train` renders DRRs of the patient's CT at poses drawn from a C-arm (or Gaussian se(3)) distribution
(:class:`~xraypose.learning.data.PoseDataStream`), randomises them towards real X-rays
(:mod:`~xraypose.learning.augment`) and regresses the pose target of :mod:`xraypose.learning.data`
(``Y = T⁻¹ · F``: the anatomy frame seen from the camera). It

- optimises AdamW with a linear warm-up and a cosine decay of the learning rate;
- follows an *incremental* schedule: :attr:`TrainingConfig.stages` lists ``(fraction of the steps, pose-range
  scale, augmentation strength)``; the pose ranges widen and the augmentation grows stage by stage;
- minimises ``w_rot · geodesic angle (rad) + w_trans · |t_norm − t_norm*| + w_dg · double_geodesic / r``
  (``r = sdd / 2``, DiffPose's radius, making the double geodesic dimensionless) ``+ w_ae · autoencoder loss``
  (:func:`pose_losses`);
- writes ``out_dir/checkpoint.pt`` atomically every ``checkpoint_every`` steps (model, optimiser, scheduler,
  step, RNG states, configuration: tensors and plain containers only, read back with
  ``torch.load(weights_only=True)``); with ``resume=True`` an interrupted run continues from it and ends with
  the same weights as an uninterrupted one (on the CPU; every batch is a pure function of the seed and step);
- writes ``out_dir/model.safetensors`` (:meth:`PoseRegressor.save`, normaliser included),
  ``out_dir/model_card.json`` (what the model was trained on, :func:`check_model_card`), ``out_dir/log.csv``
  and, when ``torch.utils.tensorboard`` imports, TensorBoard events in ``out_dir/tensorboard``;
- runs under ``torchrun`` with :class:`torch.nn.parallel.DistributedDataParallel` (gloo on CPU, NCCL on CUDA):
  :attr:`TrainingConfig.batch_size` is the **global** batch, split evenly over the ranks, each rank rendering its
  own shard; only rank 0 writes files. With ``norm="group"`` (or on CUDA, where BatchNorm is synchronised) and
  no augmentation, ``n`` ranks follow the single-process run up to floating-point rounding.
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
import torch.distributed as dist

from .._atomic import atomic_path, atomic_write_text
from ..errors import FileFormatError, InputError
from ..geometry.camera import Intrinsics
from ..geometry.rotations import geodesic_distance
from ..geometry.se3 import double_geodesic_distance, make_transform
from ..io.volume import Volume
from ..losses import translation_error_mm
from ._config import dataclass_from_dict
from ._run import (
    append_log_row,
    ct_record,
    ct_sha256,
    jsonable,
    load_checkpoint,
    physical_detector,
    progress_bar,
    restore_rng,
    resume_mismatch,
    rewrite_log,
    rng_state,
    save_checkpoint,
    versions,
    warmup_cosine,
)
from .augment import AugmentConfig, augment
from .data import (
    PoseDataStream,
    PoseDistribution,
    derive_seed,
    standardize,
    target_to_pose,
)
from .model import PoseNormalizer, PoseOutput, PoseRegressor, PoseRegressorConfig

__all__ = [
    "TrainedModel",
    "TrainingConfig",
    "TrainingResult",
    "check_model_card",
    "ct_sha256",
    "load_trained_model",
    "pose_losses",
    "train",
]

CHECKPOINT = "checkpoint.pt"
MODEL_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
LOG_FILE = "log.csv"
_CKPT_FORMAT = "xraypose.training_checkpoint"
_CARD_FORMAT = "xraypose.model_card"
_LOG_FIELDS = (
    "step",
    "loss",
    "rotation",
    "translation",
    "double_geodesic",
    "autoencoder",
    "lr",
    "pose_scale",
    "augment_strength",
    "images_per_s",
    "seconds",
)
# Fields that do not change the trained weights: they may differ between a run and its resumption.
_RESUME_FREE = ("checkpoint_every", "log_every", "tensorboard", "device")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingConfig:
    """Training hyper-parameters (JSON-serialisable with :meth:`to_dict` / :meth:`from_dict`).

    Attributes:
        steps: optimiser steps.
        batch_size: global batch (split over DDP ranks; must be divisible by the world size).
        lr: peak learning rate (AdamW).
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr``.
        final_lr_fraction: the cosine decay ends at ``lr · final_lr_fraction`` at the last step.
        weight_decay: AdamW decoupled weight decay.
        grad_clip: clip the global gradient norm to this (``0``: no clipping).
        image_size: training image side (must equal the model's ``image_size``).
        rotation_weight: weight of the mean geodesic rotation error (rad).
        translation_weight: weight of the mean Euclidean error of the normalised translation.
        double_geodesic_weight: weight of the mean double geodesic distance divided by ``sdd / 2``.
        autoencoder_weight: multiplies :meth:`PoseRegressor.autoencoder_loss` (which holds the model's own
            ``autoencoder_weight``); irrelevant without the autoencoder branch.
        stages: ``(fraction of steps, pose-range scale, augmentation strength)`` per stage, fractions summing to
            1; the augmentation strength multiplies ``augment.strength``.
        augment: domain randomisation (:class:`~xraypose.learning.augment.AugmentConfig`).
        checkpoint_every: write the checkpoint every this many steps (and at the end).
        log_every: write a log row every this many steps (and at the last step).
        seed: base seed of the model initialisation, the poses and the augmentation.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``…
        amp: bfloat16 autocast of the network on CUDA (ignored on the CPU).
        physics: DRR physics, ``"mono"`` or ``"poly"``.
        min_foreground: near-empty DRR rejection (:class:`~xraypose.learning.data.PoseDataStream`).
        tensorboard: also write TensorBoard events when ``torch.utils.tensorboard`` imports.
    """

    steps: int = 10000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.01
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    image_size: int = 128
    rotation_weight: float = 1.0
    translation_weight: float = 1.0
    double_geodesic_weight: float = 1.0
    autoencoder_weight: float = 1.0
    stages: tuple[tuple[float, float, float], ...] = ((0.2, 0.25, 0.0), (0.3, 0.6, 0.5), (0.5, 1.0, 1.0))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    physics: str = "mono"
    min_foreground: float = 0.1
    tensorboard: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> InputError:
            return InputError(f"TrainingConfig.{name}: expected {expected}; got {getattr(self, name)!r}")

        for name, low in (
            ("steps", 1),
            ("batch_size", 1),
            ("warmup_steps", 0),
            ("image_size", 32),
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
            "rotation_weight",
            "translation_weight",
            "double_geodesic_weight",
            "autoencoder_weight",
            "min_foreground",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, "a finite number >= 0")
            object.__setattr__(self, name, float(v))
        if self.lr <= 0:
            raise bad("lr", "a positive number")
        if self.min_foreground > 1:
            raise bad("min_foreground", "a fraction in [0, 1]")
        try:
            stages = tuple(tuple(float(x) for x in st) for st in self.stages)
        except (TypeError, ValueError):
            raise bad("stages", "a list of (fraction, pose_scale, augment_strength) triples") from None
        if not stages or any(
            len(st) != 3 or not all(math.isfinite(x) and x >= 0 for x in st) or st[0] <= 0 for st in stages
        ):
            raise bad("stages", "a non-empty list of (fraction > 0, pose_scale >= 0, augment_strength >= 0)")
        if abs(sum(st[0] for st in stages) - 1.0) > 1e-6:
            raise bad("stages", "fractions summing to 1")
        object.__setattr__(self, "stages", stages)
        if isinstance(self.augment, Mapping):
            object.__setattr__(self, "augment", AugmentConfig.from_dict(self.augment))
        if not isinstance(self.augment, AugmentConfig):
            raise bad("augment", "an AugmentConfig")
        if not isinstance(self.device, str) or not self.device:
            raise bad("device", "'auto', 'cpu' or a CUDA device name")
        if not isinstance(self.amp, bool) or not isinstance(self.tensorboard, bool):
            raise InputError("TrainingConfig: 'amp' and 'tensorboard' must be bools")
        if self.physics not in ("mono", "poly"):
            raise bad("physics", "'mono' or 'poly'")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["stages"] = [list(st) for st in self.stages]
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`InputError`, missing ones take defaults."""
        return dataclass_from_dict(cls, data)

    def stage_at(self, step: int) -> tuple[int, float, float]:
        """``(stage index, pose scale, augmentation strength factor)`` of ``step`` (0-based)."""
        acc = 0.0
        for i, (frac, scale, strength) in enumerate(self.stages):
            acc += frac
            if step < round(acc * self.steps) or i == len(self.stages) - 1:
                return i, scale, strength
        raise AssertionError("unreachable")

    def lr_factor(self, step: int) -> float:
        """Learning rate of ``step`` relative to :attr:`lr` (warm-up, then cosine to ``final_lr_fraction``)."""
        return warmup_cosine(step, self.steps, self.warmup_steps, self.final_lr_fraction)


@dataclass
class TrainingResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained network (on the training device, unwrapped from DDP, in eval mode).
        normalizer: its translation normaliser.
        reference_frame: ``(4, 4)`` float64 frame ``F`` of the targets (poses: ``F · Y⁻¹``).
        steps: steps done in total (including those before a resumption).
        wall_time_s: training time in total (including earlier runs of a resumed training).
        final_loss: mean loss of the last logged interval (``nan`` if no step ran in this call).
        out_dir: the output folder.
        card: the model card (written at the end or at ``stop_after``).
        resumed_from: the step a resumption started from (``None``: fresh start).
        finished: ``steps == config.steps``.
    """

    model: PoseRegressor
    normalizer: PoseNormalizer
    reference_frame: torch.Tensor
    steps: int
    wall_time_s: float
    final_loss: float
    out_dir: Path
    card: dict[str, Any]
    resumed_from: int | None = None
    finished: bool = True


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def pose_losses(
    output: PoseOutput,
    targets: torch.Tensor,
    normalizer: PoseNormalizer,
    *,
    radius_mm: float,
) -> dict[str, torch.Tensor]:
    """Mean pose loss terms of a batch (float32, differentiable w.r.t. ``output``).

    Returns ``{"rotation": geodesic angle (rad), "translation": |t_norm − t_norm*| (normalised units),
    "double_geodesic": double geodesic distance (mm) / radius_mm}`` for targets ``(B, 4, 4)`` in mm.
    """
    rot = output.rotation.float()
    t_norm = output.translation_norm.float()
    targets = targets.float()
    t_true = normalizer.normalize(targets[:, :3, 3])
    pred = make_transform(rot, normalizer.denormalize(t_norm))
    return {
        "rotation": geodesic_distance(rot, targets[:, :3, :3]).mean(),
        "translation": translation_error_mm(t_norm, t_true).mean(),
        "double_geodesic": double_geodesic_distance(pred, targets, radius=radius_mm).mean() / radius_mm,
    }


# --------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------


def check_model_card(
    card: Mapping[str, Any] | str | os.PathLike,
    ct: Volume,
    intrinsics: Intrinsics,
    *,
    allow_mismatch: bool = False,
    rtol: float = 1e-6,
) -> list[str]:
    """Check that a patient-specific model is used on the CT and the C-arm detector it was trained for.

    Compares the SHA-256 of the CT voxels (:func:`ct_sha256`), the CT grid shape and affine, and the physical
    detector (source-to-detector distance, detector extent in mm, principal-point offsets; the pixel count may
    differ: images are resampled to the training size).

    Args:
        card: the model card (a mapping, or the path of ``model_card.json`` or of its folder).
        ct: the CT the model is about to be used with.
        intrinsics: the detector of the X-rays.
        allow_mismatch: return the mismatches instead of raising.
        rtol: relative tolerance of the numeric comparisons.
    Returns:
        The mismatches found (empty when everything matches).
    Raises:
        InputError: naming every mismatch, unless ``allow_mismatch``.
        FileFormatError: the card cannot be read.
    """
    if not isinstance(card, Mapping):
        path = Path(card)
        if path.is_dir():
            path = path / CARD_FILE
        try:
            card = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileFormatError(f"{path}: model card not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FileFormatError(f"{path}: not a readable model card ({exc})") from None
    if not isinstance(card, Mapping) or card.get("format") != _CARD_FORMAT:
        raise FileFormatError(f"model card: not an xraypose model card (format {_CARD_FORMAT!r} expected)")
    if not isinstance(ct, Volume):
        raise InputError(f"check_model_card: 'ct' must be a Volume; got {type(ct).__name__}")
    if not isinstance(intrinsics, Intrinsics):
        raise InputError(
            f"check_model_card: 'intrinsics' must be Intrinsics; got {type(intrinsics).__name__}"
        )
    problems: list[str] = []
    trained_ct = card.get("ct", {})
    sha = ct_sha256(ct)
    if trained_ct.get("sha256") != sha:
        problems.append(
            f"CT voxels differ (trained on SHA-256 {str(trained_ct.get('sha256'))[:12]}…, shape "
            f"{tuple(trained_ct.get('shape', ()))}; given SHA-256 {sha[:12]}…, shape {ct.shape})"
        )
    elif tuple(trained_ct.get("shape", ())) != ct.shape:
        problems.append(f"CT shape differs (trained {tuple(trained_ct.get('shape', ()))}, given {ct.shape})")
    else:
        want = torch.tensor(trained_ct.get("affine"), dtype=torch.float64)
        got = ct.affine.detach().cpu().double()
        if want.shape != (4, 4) or not torch.allclose(want, got, rtol=rtol, atol=1e-6):
            problems.append("CT affine (voxel-to-world placement) differs from the training CT's")
    trained = card.get("detector", {})
    given = physical_detector(intrinsics)
    diffs = [
        f"{k}: trained {trained.get(k)!r}, given {v:g}"
        for k, v in given.items()
        if not isinstance(trained.get(k), (int, float))
        or not math.isclose(trained[k], v, rel_tol=rtol, abs_tol=1e-9)
    ]
    if diffs:
        problems.append("C-arm detector differs (" + "; ".join(diffs) + ")")
    if problems and not allow_mismatch:
        raise InputError(
            "model card: this patient-specific model was trained for another CT/camera: "
            + "; ".join(problems)
            + " (pass allow_mismatch=True to use it anyway)"
        )
    return problems


# --------------------------------------------------------------------------------------------------
# Trained model (inference)
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """A trained pose regressor with what inference needs: normaliser, reference frame and model card."""

    model: PoseRegressor
    normalizer: PoseNormalizer
    reference_frame: torch.Tensor
    card: dict[str, Any]

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Camera-to-world poses ``(B, 4, 4)`` (float64, CPU) of ``−ln(I/I0)`` images ``(B, H, W)`` or
        ``(B, 1, H, W)`` (bright = attenuating), resized to the training size and standardised as in training."""
        x = images if images.ndim == 4 else images[:, None]
        s = self.model.config.image_size
        dev = next(self.model.parameters()).device
        x = x.to(device=dev, dtype=torch.float32)
        if tuple(x.shape[-2:]) != (s, s):
            x = torch.nn.functional.interpolate(x, size=(s, s), mode="area")
        self.model.eval()
        with torch.no_grad():
            y = self.model.predict_pose(standardize(x), self.normalizer)
        return target_to_pose(y.double().cpu(), self.reference_frame)


def load_trained_model(path: str | os.PathLike) -> TrainedModel:
    """Load ``model.safetensors`` and ``model_card.json`` from a training folder."""
    folder = Path(path)
    model, normalizer = PoseRegressor.load(folder / MODEL_FILE)
    try:
        card = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
        frame = torch.tensor(card["poses"]["reference_frame"], dtype=torch.float64)
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{folder / CARD_FILE}: missing or invalid model card ({exc})") from None
    if normalizer is None:
        raise FileFormatError(f"{folder / MODEL_FILE}: no translation normaliser stored")
    model.eval()
    return TrainedModel(model, normalizer, frame, card)


# --------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------


def _distributed(device_pref: str) -> tuple[int, int, bool, torch.device]:
    """``(rank, world_size, initialised_here, device)``: joins a ``torchrun`` launch when its env is set."""
    initialised_here = False
    if dist.is_available() and not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            cuda = device_pref != "cpu" and torch.cuda.is_available()
            dist.init_process_group(backend="nccl" if cuda else "gloo")
            initialised_here = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_pref)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"TrainingConfig.device: {device_pref!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0)
        torch.cuda.set_device(device)
    return rank, world, initialised_here, device


def _all_mean(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= world
    return values


# --------------------------------------------------------------------------------------------------
# Checkpoints and logs
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def train(
    ct: Volume,
    intrinsics: Intrinsics,
    out_dir: str | os.PathLike,
    config: TrainingConfig | None = None,
    model_config: PoseRegressorConfig | None = None,
    *,
    distribution: PoseDistribution | None = None,
    center_world: torch.Tensor | tuple[float, float, float] | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainingResult:
    """Train a patient-specific pose regressor on DRRs of ``ct`` (module docstring).

    Args:
        ct: the patient's CT (HU).
        intrinsics: the C-arm detector the model will be used with (any resolution).
        out_dir: output folder (created): checkpoint, weights, model card, log.
        config: hyper-parameters (default :class:`TrainingConfig`).
        model_config: network (default ``PoseRegressorConfig(image_size=config.image_size)``); its
            ``image_size`` must equal ``config.image_size``.
        distribution: poses (default :class:`~xraypose.geometry.sampling.CArmPoseDistribution`).
        center_world: the anatomy centre (default :func:`xraypose.datasets.synthetic.anatomy_center`).
        resume: continue from ``out_dir/checkpoint.pt`` when present (its configuration, CT and camera must
            match; only ``checkpoint_every``, ``log_every``, ``tensorboard`` and ``device`` may change). With
            ``False`` a fresh training overwrites the folder's files.
        progress: show a progress bar (rank 0).
        stop_after: stop once this many steps are done in total, after writing a checkpoint (time-sliced jobs:
            call again with the same arguments to continue).
        callback: ``callback(step, terms)`` after every step, with the step's loss terms as floats (rank-local).
    Returns:
        A :class:`TrainingResult`.
    """
    config = TrainingConfig() if config is None else config
    if not isinstance(config, TrainingConfig):
        raise InputError(f"train: 'config' must be a TrainingConfig; got {type(config).__name__}")
    if model_config is None:
        model_config = PoseRegressorConfig(image_size=config.image_size)
    if not isinstance(model_config, PoseRegressorConfig):
        raise InputError(
            f"train: 'model_config' must be a PoseRegressorConfig; got {type(model_config).__name__}"
        )
    if model_config.image_size != config.image_size:
        raise InputError(
            f"train: model_config.image_size ({model_config.image_size}) must equal config.image_size "
            f"({config.image_size})"
        )
    if model_config.in_chans != 1:
        raise InputError(
            f"train: the model must take 1 channel (X-rays); got in_chans={model_config.in_chans}"
        )
    if not isinstance(ct, Volume):
        raise InputError(f"train: 'ct' must be a Volume; got {type(ct).__name__}")
    if not isinstance(intrinsics, Intrinsics):
        raise InputError(f"train: 'intrinsics' must be Intrinsics; got {type(intrinsics).__name__}")
    if stop_after is not None and (
        isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 0
    ):
        raise InputError(f"train: 'stop_after' must be None or an integer >= 0; got {stop_after!r}")

    rank, world, init_here, device = _distributed(config.device)
    try:
        return _train(
            ct,
            intrinsics,
            Path(out_dir),
            config,
            model_config,
            distribution,
            center_world,
            resume,
            progress,
            stop_after,
            callback,
            rank,
            world,
            device,
        )
    finally:
        if init_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    ct: Volume,
    intrinsics: Intrinsics,
    out: Path,
    config: TrainingConfig,
    model_config: PoseRegressorConfig,
    distribution: PoseDistribution | None,
    center_world: Any,
    resume: bool,
    progress: bool,
    stop_after: int | None,
    callback: Callable[[int, dict[str, float]], None] | None,
    rank: int,
    world: int,
    device: torch.device,
) -> TrainingResult:
    if config.batch_size % world:
        raise InputError(
            f"TrainingConfig.batch_size ({config.batch_size}) must be divisible by the number of processes ({world})"
        )
    main = rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
    stream = PoseDataStream(
        ct,
        intrinsics,
        image_size=config.image_size,
        batch_size=config.batch_size // world,
        distribution=distribution,
        center_world=center_world,
        seed=config.seed,
        rank=rank,
        world_size=world,
        device=device,
        physics=config.physics,
        min_foreground=config.min_foreground,
    )
    normalizer = stream.normalizer
    assert normalizer is not None
    sha = ct_sha256(ct)
    identity = {
        "config": config.to_dict(),
        "model_config": dataclasses.replace(model_config, weights=None).to_dict(),
        "ct_sha256": sha,
        "intrinsics": intrinsics.to_dict(),
        "poses": jsonable(stream.describe()),
    }

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init"))
        model = PoseRegressor(model_config)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: config.lr_factor(step))

    ckpt_path = out / CHECKPOINT
    start, elapsed_before, resumed_from, resumed_loss = 0, 0.0, None, float("nan")
    if resume and ckpt_path.exists():
        blob = load_checkpoint(ckpt_path, device, _CKPT_FORMAT)
        bad = resume_mismatch(blob, identity, _RESUME_FREE)
        if bad:
            raise InputError(
                f"{ckpt_path}: the checkpoint was written by a different training ({', '.join(bad)} differ); "
                "use another output folder or resume=False to start afresh"
            )
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        start = int(blob["step"])
        elapsed_before = float(blob["elapsed_s"])
        resumed_from = start
        resumed_loss = float(blob.get("last_loss", float("nan")))
        restore_rng(blob.get("rng", {}), device)

    ddp: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":
            ddp = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ddp = DistributedDataParallel(ddp, device_ids=[device.index])
        else:
            ddp = DistributedDataParallel(model)

    log_path = out / LOG_FILE
    writer = None
    tb_note = "disabled in the training config"
    if main:
        rewrite_log(log_path, start if resumed_from is not None else None, _LOG_FIELDS)
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(out / "tensorboard"), purge_step=start)
                tb_note = "written to tensorboard/"
            except Exception as exc:  # tensorboard is optional
                tb_note = f"skipped: torch.utils.tensorboard unavailable ({type(exc).__name__})"

    radius = intrinsics.sdd / 2
    spacing = (stream.train_intrinsics.dy, stream.train_intrinsics.dx)
    use_amp = config.amp and device.type == "cuda"
    end = config.steps if stop_after is None else min(config.steps, max(stop_after, start))
    terms_acc = torch.zeros(5, dtype=torch.float64, device=device)
    n_acc = 0
    last_loss = resumed_loss
    t_log = time.perf_counter()
    t0 = time.perf_counter()

    def checkpoint(step: int) -> None:
        if not main:
            return
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
                "normalizer": normalizer.to_dict(),
                **identity,
            },
        )

    bar = progress_bar("training", enabled=progress and main)
    with bar:
        task = bar.add_task("train", total=config.steps, completed=start, loss="—", ips="—")
        ddp.train()
        for step in range(start, end):
            _, pose_scale, strength = config.stage_at(step)
            batch = stream.batch(step, pose_scale=pose_scale)
            drr = batch.drr
            aug = config.augment.scaled(strength)
            if aug.strength > 0:
                gen = torch.Generator(device=device).manual_seed(
                    derive_seed(config.seed, "augment", rank, step)
                )
                drr = augment(drr, aug, gen, pixel_spacing_mm=spacing)
            images = standardize(drr)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                output = ddp(images)
            terms = pose_losses(output, batch.targets, normalizer, radius_mm=radius)
            ae = model.autoencoder_loss(images, output).float() if model.decoder is not None else None
            loss = (
                config.rotation_weight * terms["rotation"]
                + config.translation_weight * terms["translation"]
                + config.double_geodesic_weight * terms["double_geodesic"]
            )
            if ae is not None:
                loss = loss + config.autoencoder_weight * ae
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            lr_used = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            values = torch.stack(
                [
                    loss.detach().double(),
                    terms["rotation"].detach().double(),
                    terms["translation"].detach().double(),
                    terms["double_geodesic"].detach().double(),
                    ae.detach().double() if ae is not None else loss.new_zeros((), dtype=torch.float64),
                ]
            )
            terms_acc += values
            n_acc += 1
            if callback is not None:
                callback(
                    step + 1,
                    dict(
                        zip(
                            ("loss", "rotation", "translation", "double_geodesic", "autoencoder"),
                            values.tolist(),
                            strict=True,
                        )
                    ),
                )
            done = step + 1
            if done % config.log_every == 0 or done == end:
                mean = _all_mean(terms_acc / n_acc, world).tolist()
                now = time.perf_counter()
                ips = n_acc * config.batch_size / max(now - t_log, 1e-9)
                last_loss = mean[0]
                if main:
                    row = {
                        "step": done,
                        "loss": f"{mean[0]:.6g}",
                        "rotation": f"{mean[1]:.6g}",
                        "translation": f"{mean[2]:.6g}",
                        "double_geodesic": f"{mean[3]:.6g}",
                        "autoencoder": f"{mean[4]:.6g}",
                        "lr": f"{lr_used:.6g}",
                        "pose_scale": pose_scale,
                        "augment_strength": aug.strength,
                        "images_per_s": f"{ips:.1f}",
                        "seconds": f"{elapsed_before + now - t0:.2f}",
                    }
                    append_log_row(log_path, _LOG_FIELDS, row)
                    if writer is not None:
                        for name, v in zip(
                            ("loss", "rotation", "translation", "double_geodesic", "autoencoder"),
                            mean,
                            strict=True,
                        ):
                            writer.add_scalar(f"train/{name}", v, done)
                        writer.add_scalar("train/lr", lr_used, done)
                        writer.add_scalar("train/images_per_s", ips, done)
                bar.update(task, loss=f"{mean[0]:.4f}", ips=f"{ips:.0f}")
                terms_acc.zero_()
                n_acc = 0
                t_log = now
            if done % config.checkpoint_every == 0 or done == end:
                checkpoint(done)
            bar.update(task, completed=done)
        if end == start and main and not ckpt_path.exists():
            checkpoint(start)

    if writer is not None:
        writer.close()
    wall = elapsed_before + time.perf_counter() - t0
    finished = end >= config.steps
    card = {
        "format": _CARD_FORMAT,
        "version": 1,
        "created_unix": time.time(),
        "versions": versions(),
        "ct": ct_record(ct, sha),
        "intrinsics": intrinsics.to_dict(),
        "detector": physical_detector(intrinsics),
        "poses": identity["poses"],
        "normalizer": normalizer.to_dict(),
        "training_config": config.to_dict(),
        "model_config": identity["model_config"],
        "steps_done": end,
        "finished": finished,
        "wall_time_s": wall,
        "world_size": world,
        "device": str(device),
        "final_loss": last_loss if math.isfinite(last_loss) else None,
        "tensorboard": tb_note,
        "files": {"weights": MODEL_FILE, "checkpoint": CHECKPOINT, "log": LOG_FILE},
    }
    if main:
        with atomic_path(out / MODEL_FILE) as tmp:
            model.save(tmp, normalizer)
        atomic_write_text(out / CARD_FILE, json.dumps(jsonable(card), indent=2))
    if world > 1:
        dist.barrier()
    model.eval()
    return TrainingResult(
        model=model,
        normalizer=normalizer,
        reference_frame=stream.frame.clone(),
        steps=end,
        wall_time_s=wall,
        final_loss=last_loss,
        out_dir=out,
        card=card,
        resumed_from=resumed_from,
        finished=finished,
    )
