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

import csv
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
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
    budget_position,
    ct_sha256,
    jsonable,
    physical_detector,
    resume_from_checkpoint,
    rewrite_log,
    save_checkpoint,
    versions,
    warmup_cosine,
)
from .augment import AugmentConfig, augment
from .data import (
    PoseDataStream,
    PoseDistribution,
    derive_seed,
    distribution_from_dict,
    standardize,
    target_to_pose,
)
from .model import PoseNormalizer, PoseOutput, PoseRegressor, PoseRegressorConfig

__all__ = [
    "ModelCardWarning",
    "TrainedModel",
    "TrainingConfig",
    "TrainingResult",
    "card_cts",
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
        crop_probability: probability that a sample renders a random sub-box of its CT
            (:class:`~xraypose.learning.data.PoseDataStream`; ``0``: never).
        crop_min_mm: smallest side of a crop box, mm.
        max_seconds: wall-clock budget of the whole training (resumptions included), seconds; ``0``: none. With
            a budget, training stops at whichever of ``steps`` and the budget comes first, and the schedule
            (the cosine decay and the stages; not the warm-up, which counts steps) follows whichever is further
            along, so a run cut by its budget still ends at the final learning rate and the full pose range;
            such runs depend on the machine's speed and are not reproducible step for step.
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
    crop_probability: float = 0.0
    crop_min_mm: float = 100.0
    max_seconds: float = 0.0

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
            "crop_probability",
            "crop_min_mm",
            "max_seconds",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, "a finite number >= 0")
            object.__setattr__(self, name, float(v))
        if self.lr <= 0:
            raise bad("lr", "a positive number")
        if self.min_foreground > 1:
            raise bad("min_foreground", "a fraction in [0, 1]")
        if self.crop_probability > 1:
            raise bad("crop_probability", "a probability in [0, 1]")
        if self.crop_min_mm <= 0:
            raise bad("crop_min_mm", "a positive length in mm")
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

    def schedule_position(self, step: int, elapsed_s: float = 0.0) -> int:
        """The step the schedule (stages, cosine decay) is at: ``step``, or with a time budget the further
        along of ``step`` and ``steps · elapsed_s / max_seconds`` (at most ``steps − 1``)."""
        return budget_position(step, self.steps, elapsed_s, self.max_seconds)

    def stage_at(self, step: int) -> tuple[int, float, float]:
        """``(stage index, pose scale, augmentation strength factor)`` of ``step`` (0-based; with a time budget
        pass :meth:`schedule_position`)."""
        acc = 0.0
        for i, (frac, scale, strength) in enumerate(self.stages):
            acc += frac
            if step < round(acc * self.steps) or i == len(self.stages) - 1:
                return i, scale, strength
        raise AssertionError("unreachable")

    def lr_factor(self, step: int, position: int | None = None) -> float:
        """Learning rate of ``step`` relative to :attr:`lr`: a warm-up over the first ``warmup_steps`` steps,
        then a cosine to ``final_lr_fraction`` at the schedule ``position`` (default ``step``;
        :meth:`schedule_position`)."""
        return warmup_cosine(step, self.steps, self.warmup_steps, self.final_lr_fraction, position)


@dataclass
class TrainingResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained network (on the training device, unwrapped from DDP, in eval mode).
        normalizer: its translation normaliser.
        reference_frame: ``(4, 4)`` float64 frame ``F`` of the targets (poses: ``F · Y⁻¹``); ``None`` when
            trained over several CTs (each has its own, ``card["cts"]``).
        steps: steps done in total (including those before a resumption).
        wall_time_s: training time in total (including earlier runs of a resumed training).
        final_loss: mean loss of the last logged interval (``nan`` if no step ran in this call).
        out_dir: the output folder.
        card: the model card (written at the end or at ``stop_after``).
        resumed_from: the step a resumption started from (``None``: fresh start).
        finished: the training is complete: all ``config.steps`` done, or the time budget spent
            (``card["stopped_by"]``: ``"steps"``, ``"time_budget"`` or ``"stop_after"``).
    """

    model: PoseRegressor
    normalizer: PoseNormalizer
    reference_frame: torch.Tensor | None
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


class ModelCardWarning(UserWarning):
    """A model is used on a CT it was not trained on (a patient-agnostic model on a new patient)."""


def _read_card(card: Mapping[str, Any] | str | os.PathLike) -> Mapping[str, Any]:
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
    return card


def card_cts(card: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The CTs a model card says the model was trained (or finetuned) on: ``card["cts"]``, or for cards
    written before several CTs were supported, ``[card["ct"]]`` with the card's reference frame."""
    cts = card.get("cts")
    if isinstance(cts, list) and cts:
        return [dict(c) for c in cts]
    ct = dict(card.get("ct") or {})
    poses = card.get("poses") or {}
    ct.setdefault("center_world", poses.get("center_world"))
    ct.setdefault("reference_frame", poses.get("reference_frame"))
    return [ct]


def check_model_card(
    card: Mapping[str, Any] | str | os.PathLike,
    ct: Volume,
    intrinsics: Intrinsics,
    *,
    allow_mismatch: bool = False,
    allow_new_patient: bool = False,
    rtol: float = 1e-6,
    sha256: str | None = None,
) -> list[str]:
    """Check that a model is used on a CT it was trained for and on the C-arm detector it was trained for.

    The CT must be one of the model's training CTs (:func:`card_cts`: the one CT of a patient-specific or a
    finetuned model, any of the CTs of a pretrained one), compared by the SHA-256 of its voxels
    (:func:`ct_sha256`), then by grid shape and affine. A **patient-agnostic** model (pretrained over several
    CTs, ``card["patient_agnostic"]``) may be used on a new CT with ``allow_new_patient=True``: a
    :class:`ModelCardWarning` says so (finetuning on the new CT, ``train(..., init_model=)``, is the better
    route); a patient-specific or finetuned model is refused on another CT either way. The physical detector
    (source-to-detector distance, detector extent in mm, principal-point offsets) must match in every case;
    the pixel count may differ (images are resampled to the training size).

    Args:
        card: the model card (a mapping, or the path of ``model_card.json`` or of its folder).
        ct: the CT the model is about to be used with.
        intrinsics: the detector of the X-rays.
        allow_mismatch: return the mismatches instead of raising.
        allow_new_patient: accept a CT the model was not trained on if the model is patient-agnostic.
        rtol: relative tolerance of the numeric comparisons.
        sha256: :func:`ct_sha256` of ``ct`` when already known.
    Returns:
        The mismatches found (empty when everything matches, or when the only difference is a new CT for a
        patient-agnostic model with ``allow_new_patient``).
    Raises:
        InputError: naming every mismatch, unless ``allow_mismatch``.
        FileFormatError: the card cannot be read.
    """
    card = _read_card(card)
    if not isinstance(ct, Volume):
        raise InputError(f"check_model_card: 'ct' must be a Volume; got {type(ct).__name__}")
    if not isinstance(intrinsics, Intrinsics):
        raise InputError(
            f"check_model_card: 'intrinsics' must be Intrinsics; got {type(intrinsics).__name__}"
        )
    problems: list[str] = []
    agnostic = bool(card.get("patient_agnostic", False))
    entries = card_cts(card)
    sha = ct_sha256(ct) if sha256 is None else sha256
    match = next((e for e in entries if e.get("sha256") == sha), None)
    if match is None:
        trained = ", ".join(
            f"SHA-256 {str(e.get('sha256'))[:12]}… shape {tuple(e.get('shape', ()))}" for e in entries[:3]
        ) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        what = f"CT voxels differ (trained on {trained}; given SHA-256 {sha[:12]}…, shape {ct.shape})"
        if agnostic and allow_new_patient:
            warnings.warn(
                f"model card: the patient-agnostic model is used on a CT it was not trained on ({what}); "
                "finetuning it on this CT (xraypose train --init-model) is expected to be more accurate",
                ModelCardWarning,
                stacklevel=2,
            )
        elif agnostic:
            problems.append(
                what
                + "; the model is patient-agnostic: allow_new_patient=True (--allow-new-patient) uses it "
                "on a new patient"
            )
        else:
            problems.append(what)
    elif tuple(match.get("shape", ())) != ct.shape:
        problems.append(f"CT shape differs (trained {tuple(match.get('shape', ()))}, given {ct.shape})")
    else:
        want = torch.tensor(match.get("affine"), dtype=torch.float64)
        got = ct.affine.detach().cpu().double()
        if want.shape != (4, 4) or not torch.allclose(want, got, rtol=rtol, atol=1e-6):
            problems.append("CT affine (voxel-to-world placement) differs from the training CT's")
    trained_det = card.get("detector", {})
    given = physical_detector(intrinsics)
    diffs = [
        f"{k}: trained {trained_det.get(k)!r}, given {v:g}"
        for k, v in given.items()
        if not isinstance(trained_det.get(k), (int, float))
        or not math.isclose(trained_det[k], v, rel_tol=rtol, abs_tol=1e-9)
    ]
    if diffs:
        problems.append("C-arm detector differs (" + "; ".join(diffs) + ")")
    if problems and not allow_mismatch:
        kind = "patient-agnostic" if agnostic else "patient-specific"
        raise InputError(
            f"model card: this {kind} model was trained for another CT/camera: "
            + "; ".join(problems)
            + " (pass allow_mismatch=True to use it anyway)"
        )
    return problems


# --------------------------------------------------------------------------------------------------
# Trained model (inference)
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """A trained pose regressor with what inference needs: normaliser, reference frame and model card.

    ``reference_frame`` is the frame ``F`` of the one training CT (``None`` for a model pretrained over
    several CTs: each CT has its own, :meth:`reference_frame_for`). ``path`` is the folder it was loaded from.
    """

    model: PoseRegressor
    normalizer: PoseNormalizer
    reference_frame: torch.Tensor | None
    card: dict[str, Any]
    path: Path | None = None

    def reference_frame_for(self, ct: Volume, *, sha256: str | None = None) -> torch.Tensor:
        """The ``(4, 4)`` float64 reference frame ``F`` of the targets on ``ct``: the recorded one when ``ct`` is
        a training CT (same voxels), else the frame of the model's pose distribution about ``ct``'s anatomy
        centre (:func:`~xraypose.datasets.synthetic.anatomy_center`: labels, else bone, else box centre).
        Does not check the card (:func:`check_model_card`)."""
        from .data import distribution_from_dict, reference_frame

        sha = ct_sha256(ct) if sha256 is None else sha256
        for entry in card_cts(self.card):
            if entry.get("sha256") == sha and entry.get("reference_frame") is not None:
                return torch.tensor(entry["reference_frame"], dtype=torch.float64)
        from ..datasets.synthetic import anatomy_center

        try:
            dist = distribution_from_dict(self.card["poses"]["distribution"])
        except (KeyError, TypeError) as exc:
            raise FileFormatError(f"model card: no pose distribution recorded ({exc})") from None
        return reference_frame(dist, anatomy_center(ct))

    def predict(self, images: torch.Tensor, reference_frame: torch.Tensor | None = None) -> torch.Tensor:
        """Camera-to-world poses ``(B, 4, 4)`` (float64, CPU) of ``−ln(I/I0)`` images ``(B, H, W)`` or
        ``(B, 1, H, W)`` (bright = attenuating), resized to the training size (area averaging: the same
        physical detector on ``S × S`` pixels, as the training DRRs) and standardised as in training.

        ``reference_frame``: the frame of the CT the images show (default the model's own; required for a
        model pretrained over several CTs, :meth:`reference_frame_for`)."""
        frame = self.reference_frame if reference_frame is None else reference_frame
        if frame is None:
            raise InputError(
                "TrainedModel.predict: this model was trained over several CTs; pass the reference frame of "
                "the CT the images show (reference_frame_for(ct)), or use predict_initial_pose"
            )
        x = images if images.ndim == 4 else images[:, None]
        s = self.model.config.image_size
        dev = next(self.model.parameters()).device
        x = x.to(device=dev, dtype=torch.float32)
        if tuple(x.shape[-2:]) != (s, s):
            x = torch.nn.functional.interpolate(x, size=(s, s), mode="area")
        self.model.eval()
        with torch.no_grad():
            y = self.model.predict_pose(standardize(x), self.normalizer)
        return target_to_pose(y.double().cpu(), frame.double().cpu())


def load_trained_model(path: str | os.PathLike) -> TrainedModel:
    """Load ``model.safetensors`` (safetensors: no pickle) and ``model_card.json`` from a training folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileFormatError(f"{folder}: model folder not found (expected {MODEL_FILE} and {CARD_FILE})")
    model, normalizer = PoseRegressor.load(folder / MODEL_FILE)
    try:
        card = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
        raw = card["poses"]["reference_frame"]
        frame = None if raw is None else torch.tensor(raw, dtype=torch.float64)
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{folder / CARD_FILE}: missing or invalid model card ({exc})") from None
    if normalizer is None:
        raise FileFormatError(f"{folder / MODEL_FILE}: no translation normaliser stored")
    model.eval()
    return TrainedModel(model, normalizer, frame, card, folder)


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


def _rank0_value(value: float, world: int, device: torch.device) -> float:
    """``value`` as rank 0 has it (every rank gets the same number)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t[0])


def _all_mean(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= world
    return values


# --------------------------------------------------------------------------------------------------
# Checkpoints and logs
# --------------------------------------------------------------------------------------------------


def _weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and float32-or-native bytes, in key order)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        data = t.detach().cpu().contiguous()
        h.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        h.update(data.numpy().tobytes() if data.dtype != torch.bfloat16 else data.float().numpy().tobytes())
    return h.hexdigest()


def _pretrained_summary(pre: TrainedModel) -> dict[str, Any]:
    """What a finetuned model's card records of the model it started from (``pretrained_from``)."""
    card = pre.card
    canonical = json.dumps(card, sort_keys=True, separators=(",", ":")).encode()
    return jsonable(
        {
            "path": None if pre.path is None else str(pre.path),
            "card_sha256": hashlib.sha256(canonical).hexdigest(),
            "weights_sha256": _weights_sha256(pre.model),
            "kind": card.get("kind", "patient-specific"),
            "patient_agnostic": bool(card.get("patient_agnostic", False)),
            "steps_done": card.get("steps_done"),
            "created_unix": card.get("created_unix"),
            "cts": [
                {"sha256": e.get("sha256"), "source": e.get("source"), "probability": e.get("probability")}
                for e in card_cts(card)
            ],
            "pretrained_from": card.get("pretrained_from"),
        }
    )


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def train(
    ct: Volume | Sequence[Volume],
    intrinsics: Intrinsics,
    out_dir: str | os.PathLike,
    config: TrainingConfig | None = None,
    model_config: PoseRegressorConfig | None = None,
    *,
    distribution: PoseDistribution | None = None,
    center_world: Any = None,
    ct_weights: Sequence[float] | None = None,
    init_model: str | os.PathLike | TrainedModel | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainingResult:
    """Train a pose regressor on DRRs of ``ct`` (module docstring).

    One CT trains a patient-specific model; several CTs pretrain a **patient-agnostic** one (each sample is
    rendered from a CT drawn with probability proportional to ``ct_weights``, in that CT's own anatomy frame;
    :class:`~xraypose.learning.data.PoseDataStream`). ``init_model`` **finetunes** a trained model: training
    starts from its weights (its normaliser and, by default, its pose distribution), with a fresh optimiser and
    schedule. The model card records which (``kind``: ``"patient-specific"``, ``"pretrained"``,
    ``"finetuned"``; ``pretrained_from``; ``finetuned_on``).

    Args:
        ct: the patient's CT (HU), or a sequence of CTs (pretraining).
        intrinsics: the C-arm detector the model will be used with (any resolution).
        out_dir: output folder (created): checkpoint, weights, model card, log.
        config: hyper-parameters (default :class:`TrainingConfig`).
        model_config: network (default ``PoseRegressorConfig(image_size=config.image_size)``, or with
            ``init_model`` the pretrained model's, which it must equal); its ``image_size`` must equal
            ``config.image_size``.
        distribution: poses (default :class:`~xraypose.geometry.sampling.CArmPoseDistribution`; with
            ``init_model`` the pretrained model's).
        center_world: the anatomy centre (default :func:`xraypose.datasets.synthetic.anatomy_center` of each
            CT); with several CTs one centre per CT.
        ct_weights: sampling weights of several CTs (default equal).
        init_model: a trained model (its folder, or a :class:`TrainedModel`) to finetune.
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
    pretrained: TrainedModel | None = None
    if init_model is not None:
        pretrained = init_model if isinstance(init_model, TrainedModel) else load_trained_model(init_model)
        pre_config = dataclasses.replace(pretrained.model.config, weights=None)
        if model_config is None:
            model_config = pre_config
        elif isinstance(model_config, PoseRegressorConfig):
            given, have = model_config.to_dict(), pre_config.to_dict()
            diff = [f"{k}: pretrained {have[k]!r}, given {given[k]!r}" for k in have if given[k] != have[k]]
            if diff:
                raise InputError(
                    "train: init_model's architecture differs from model_config ("
                    + "; ".join(diff)
                    + "); finetuning keeps the pretrained architecture: leave model_config unset or equal"
                )
    if model_config is None:
        model_config = PoseRegressorConfig(image_size=config.image_size)
    if not isinstance(model_config, PoseRegressorConfig):
        raise InputError(
            f"train: 'model_config' must be a PoseRegressorConfig; got {type(model_config).__name__}"
        )
    if model_config.image_size != config.image_size:
        raise InputError(
            f"train: model_config.image_size ({model_config.image_size}) must equal config.image_size "
            f"({config.image_size})" + (" (the pretrained model's image size)" if pretrained else "")
        )
    if model_config.in_chans != 1:
        raise InputError(
            f"train: the model must take 1 channel (X-rays); got in_chans={model_config.in_chans}"
        )
    cts = [ct] if isinstance(ct, Volume) else list(ct) if isinstance(ct, (list, tuple)) else []
    if not cts or not all(isinstance(v, Volume) for v in cts):
        raise InputError(
            f"train: 'ct' must be a Volume or a non-empty sequence of Volumes; got {type(ct).__name__}"
        )
    if not isinstance(intrinsics, Intrinsics):
        raise InputError(f"train: 'intrinsics' must be Intrinsics; got {type(intrinsics).__name__}")
    if stop_after is not None and (
        isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 0
    ):
        raise InputError(f"train: 'stop_after' must be None or an integer >= 0; got {stop_after!r}")

    rank, world, init_here, device = _distributed(config.device)
    try:
        return _train(
            cts,
            intrinsics,
            Path(out_dir),
            config,
            model_config,
            distribution,
            center_world,
            ct_weights,
            pretrained,
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
    cts: list[Volume],
    intrinsics: Intrinsics,
    out: Path,
    config: TrainingConfig,
    model_config: PoseRegressorConfig,
    distribution: PoseDistribution | None,
    center_world: Any,
    ct_weights: Sequence[float] | None,
    pretrained: TrainedModel | None,
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
    single = len(cts) == 1
    if distribution is None and pretrained is not None:
        distribution = distribution_from_dict(pretrained.card["poses"]["distribution"])
    stream = PoseDataStream(
        cts[0] if single else cts,
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
        normalizer=None if pretrained is None else pretrained.normalizer,
        ct_weights=ct_weights,
        crop_probability=config.crop_probability,
        crop_min_mm=config.crop_min_mm,
    )
    normalizer = stream.normalizer
    assert normalizer is not None
    shas = [ct_sha256(v) for v in cts]
    source_summary = None if pretrained is None else _pretrained_summary(pretrained)
    identity = {
        "config": config.to_dict(),
        "model_config": dataclasses.replace(model_config, weights=None).to_dict(),
        "ct_sha256": shas[0] if single else shas,
        "intrinsics": intrinsics.to_dict(),
        "poses": jsonable(stream.describe()),
        "init_model": None
        if source_summary is None
        else {k: source_summary[k] for k in ("card_sha256", "weights_sha256")},
    }

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init"))
        model = PoseRegressor(model_config)
    if pretrained is not None:
        model.load_state_dict(pretrained.model.state_dict(), strict=True)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: config.lr_factor(step))

    ckpt_path = out / CHECKPOINT
    start, elapsed_before, resumed_from, resumed_loss = 0, 0.0, None, float("nan")
    if resume:
        start, elapsed_before, resumed_from, resumed_loss = resume_from_checkpoint(
            ckpt_path, device, _CKPT_FORMAT, identity, _RESUME_FREE, model, opt, sched
        )

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
    budget = config.max_seconds
    elapsed_now = elapsed_before
    stopped_by = "steps"
    if budget > 0 and elapsed_before >= budget:
        end, stopped_by = start, "time_budget"
    done = start
    terms_acc = torch.zeros(5, dtype=torch.float64, device=device)
    n_acc = 0
    last_loss = resumed_loss
    t_log = time.perf_counter()
    t0 = time.perf_counter()

    def checkpoint(step: int) -> None:
        if not main:
            return
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
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
                "rng": rng,
                "last_loss": last_loss,
                "normalizer": normalizer.to_dict(),
                **identity,
            },
        )

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[ips]} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not (progress and main),
    )
    with bar:
        task = bar.add_task("train", total=config.steps, completed=start, loss="—", ips="—")
        ddp.train()
        for step in range(start, end):
            position = config.schedule_position(step, elapsed_now)
            _, pose_scale, strength = config.stage_at(position)
            if budget > 0:  # the schedule follows the time spent (TrainingConfig.max_seconds)
                for group in opt.param_groups:
                    group["lr"] = config.lr * config.lr_factor(step, position)
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
            budget_hit = False
            if budget > 0:  # rank 0's clock decides, so that every rank stops at the same step
                elapsed_now = _rank0_value(elapsed_before + time.perf_counter() - t0, world, device)
                budget_hit = elapsed_now >= budget
            final = done == end or budget_hit
            if done % config.log_every == 0 or final:
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
                    with log_path.open("a", newline="", encoding="utf-8") as f:
                        csv.DictWriter(f, fieldnames=_LOG_FIELDS, lineterminator="\n").writerow(row)
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
            if done % config.checkpoint_every == 0 or final:
                checkpoint(done)
            bar.update(task, completed=done)
            if budget_hit:
                stopped_by = "time_budget"
                break
        if end == start and main and not ckpt_path.exists():
            checkpoint(start)

    if writer is not None:
        writer.close()
    wall = elapsed_before + time.perf_counter() - t0
    if stopped_by == "steps" and done < config.steps:
        stopped_by = "stop_after"
    finished = stopped_by != "stop_after"
    entries = [
        {
            "sha256": sha,
            "shape": list(vol.shape),
            "affine": vol.affine.detach().cpu().double().tolist(),
            "spacing_mm": vol.spacing.detach().cpu().tolist(),
            "source": vol.source,
            "probability": prob,
            "center_world": stream.centers[k].tolist(),
            "center": "anatomy_center" if center_world is None else "given",
            "reference_frame": stream.frames[k].tolist(),
        }
        for k, (vol, sha, prob) in enumerate(zip(cts, shas, stream.ct_probabilities, strict=True))
    ]
    kind = "pretrained" if not single else "finetuned" if pretrained is not None else "patient-specific"
    card = {
        "format": _CARD_FORMAT,
        "version": 1,
        "created_unix": time.time(),
        "versions": versions(),
        "kind": kind,
        "patient_agnostic": not single,
        "ct": entries[0] if single else None,
        "cts": entries,
        "pretrained_from": source_summary,
        "finetuned_on": None
        if kind != "finetuned"
        else {
            "ct_sha256": shas[0],
            "source": cts[0].source,
            "steps": config.steps,
            "steps_done": done,
            "max_seconds": budget,
        },
        "intrinsics": intrinsics.to_dict(),
        "detector": physical_detector(intrinsics),
        "poses": identity["poses"],
        "normalizer": normalizer.to_dict(),
        "training_config": config.to_dict(),
        "model_config": identity["model_config"],
        "steps_done": done,
        "finished": finished,
        "stopped_by": stopped_by,
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
        reference_frame=stream.frame.clone() if single else None,
        steps=done,
        wall_time_s=wall,
        final_loss=last_loss,
        out_dir=out,
        card=card,
        resumed_from=resumed_from,
        finished=finished,
    )
