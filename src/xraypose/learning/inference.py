"""Network initialisation: the initial C-arm pose of an X-ray predicted by a trained pose regressor.

:func:`predict_initial_pose` (or a :class:`NetworkInitializer` bound once to a model, a CT and a detector, for
many X-rays) is the one path from an X-ray to a network pose, shared by ``xraypose register --model`` and the
benchmark runner's ``init="model"``:

1. the model card is checked against the CT and the detector (:func:`~xraypose.learning.check_model_card`;
   a patient-agnostic model on a new CT needs ``allow_new_patient``);
2. the X-ray is brought to the training images' domain: ``−ln(I/I0)`` line integrals (bright = attenuating;
   ``polarity="intensity"`` takes ``−log`` of raw detector values, :func:`to_line_integrals`), area-resized
   from the detector's ``rows × cols`` to the model's ``S × S`` (the same physical detector, as the training
   DRRs were rendered) and standardised per image (:func:`~xraypose.learning.standardize`);
3. the network predicts the target ``Y`` and the pose is ``T = F · Y⁻¹`` with the reference frame ``F`` of that
   CT (:meth:`~xraypose.learning.TrainedModel.reference_frame_for`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..geometry.camera import Intrinsics
from ..io.images import to_line_integrals
from ..io.volume import Volume
from .training import TrainedModel, check_model_card, ct_sha256, load_trained_model

__all__ = ["InitialPose", "NetworkInitializer", "predict_initial_pose", "to_line_integrals"]


@dataclass(frozen=True)
class InitialPose:
    """A network's initial pose.

    Attributes:
        pose: ``(1, 4, 4)`` float64 (CPU) camera-to-world pose, world = the CT's RAS frame, mm.
        seconds: the network's time: preprocessing and forward pass (CUDA synchronised), not loading.
        reference_frame: ``(4, 4)`` float64 frame ``F`` of the CT used (``pose = F · Y⁻¹``).
    """

    pose: torch.Tensor
    seconds: float
    reference_frame: torch.Tensor


class NetworkInitializer:
    """A trained model bound to one CT and one detector (card checked, reference frame found, once).

    Args:
        model: the training folder (``model.safetensors`` + ``model_card.json``) or a :class:`TrainedModel`.
        ct: the CT the X-rays are registered to.
        intrinsics: the detector of the X-rays.
        allow_new_patient: use a patient-agnostic model on a CT it was not trained on (with a warning).
        allow_mismatch: skip the card check's errors (return them in :attr:`problems`).
        device: where the network runs (default: where it is; loaded models are on the CPU).
    Raises:
        InputError: the card does not match the CT or detector (:func:`check_model_card`).
        FileFormatError: the model folder cannot be read.
    """

    def __init__(
        self,
        model: str | os.PathLike | TrainedModel,
        ct: Volume,
        intrinsics: Intrinsics,
        *,
        allow_new_patient: bool = False,
        allow_mismatch: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(ct, Volume):
            raise InputError(f"NetworkInitializer: 'ct' must be a Volume; got {type(ct).__name__}")
        if not isinstance(intrinsics, Intrinsics):
            raise InputError(
                f"NetworkInitializer: 'intrinsics' must be Intrinsics; got {type(intrinsics).__name__}"
            )
        trained = model if isinstance(model, TrainedModel) else load_trained_model(Path(model))
        if device is not None:
            trained.model.to(torch.device(device))
        sha = ct_sha256(ct)
        self.problems = check_model_card(
            trained.card,
            ct,
            intrinsics,
            allow_mismatch=allow_mismatch,
            allow_new_patient=allow_new_patient,
            sha256=sha,
        )
        self.trained = trained
        self.intrinsics = intrinsics
        self.frame = trained.reference_frame_for(ct, sha256=sha)

    @property
    def device(self) -> torch.device:
        return next(self.trained.model.parameters()).device

    def __call__(self, xray: torch.Tensor | np.ndarray, *, polarity: str = "attenuation") -> InitialPose:
        """The initial pose of one X-ray ``(rows, cols)`` (or ``(1, rows, cols)``) of the bound detector."""
        t0 = time.perf_counter()
        x = to_line_integrals(xray, polarity)
        if x.ndim == 3 and x.shape[0] == 1:
            x = x[0]
        want = (self.intrinsics.rows, self.intrinsics.cols)
        if x.ndim != 2 or tuple(x.shape) != want:
            raise InputError(
                f"X-ray: image is {tuple(x.shape)} pixels but the camera has {want} (rows, cols)"
            )
        pose = self.trained.predict(x[None], reference_frame=self.frame)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return InitialPose(pose=pose, seconds=time.perf_counter() - t0, reference_frame=self.frame.clone())


def predict_initial_pose(
    model: str | os.PathLike | TrainedModel,
    xray: torch.Tensor | np.ndarray,
    intrinsics: Intrinsics,
    ct: Volume,
    *,
    polarity: str = "attenuation",
    allow_new_patient: bool = False,
    allow_mismatch: bool = False,
    device: torch.device | str | None = None,
) -> InitialPose:
    """The network's initial pose of ``xray`` (module docstring); for many X-rays of one CT bind a
    :class:`NetworkInitializer` once instead (it checks the card and hashes the CT only once)."""
    init = NetworkInitializer(
        model,
        ct,
        intrinsics,
        allow_new_patient=allow_new_patient,
        allow_mismatch=allow_mismatch,
        device=device,
    )
    return init(xray, polarity=polarity)
