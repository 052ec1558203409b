"""Conversion of CT numbers (Hounsfield units) to linear attenuation coefficients μ (1/mm).

The model is the definition of the Hounsfield scale, ``HU = 1000 · (μ − μ_water) / (μ_water − μ_air)``,
solved for μ at one effective X-ray energy:

    μ_lin(HU) = μ_water + HU · (μ_water − μ_air) / 1000        (= μ_water · (1 + HU / 1000) for μ_air = 0)

Above ``bone_threshold_hu`` the slope can be multiplied by ``bone_scale`` (bone attenuates more than the
water-equivalent line predicts at low energies), continuously at the threshold:

    μ(HU) = μ_lin(HU)                                               for HU ≤ threshold
    μ(HU) = μ_lin(threshold) + bone_scale · (μ_lin(HU) − μ_lin(threshold))   for HU > threshold

and finally ``μ ≥ 0`` (values below air are clamped to 0). The default ``μ_water = 0.0193 /mm`` is water's
linear attenuation at about 70 keV (mass attenuation 0.193 cm²/g × 1 g/cm³), a typical effective energy of a
diagnostic / C-arm beam. The mapping is piecewise linear and differentiable almost everywhere in HU and in
every parameter given as a tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from xraypose.errors import InputError

__all__ = ["MU_WATER_70KEV", "AttenuationModel", "hu_to_mu"]

#: Linear attenuation coefficient of water at ≈ 70 keV, in 1/mm.
MU_WATER_70KEV = 0.0193


def _check_params(mu_water: float, mu_air: float, bone_threshold_hu: float, bone_scale: float) -> None:
    named = (
        ("mu_water", mu_water),
        ("mu_air", mu_air),
        ("bone_threshold_hu", bone_threshold_hu),
        ("bone_scale", bone_scale),
    )
    for name, v in named:
        if isinstance(v, torch.Tensor):
            if not bool(torch.isfinite(v).all()):
                raise InputError(f"{name}: expected a finite value, got {v}")
        elif not math.isfinite(float(v)):
            raise InputError(f"{name}: expected a finite value, got {v}")
    if not isinstance(mu_water, torch.Tensor) and not mu_water > 0:
        raise InputError(f"mu_water: expected > 0 (1/mm), got {mu_water}")
    if not isinstance(mu_air, torch.Tensor) and not 0 <= mu_air:
        raise InputError(f"mu_air: expected >= 0 (1/mm), got {mu_air}")
    if not isinstance(mu_air, torch.Tensor) and not isinstance(mu_water, torch.Tensor) and mu_air >= mu_water:
        raise InputError(f"mu_air: expected < mu_water = {mu_water} (1/mm), got {mu_air}")
    if not isinstance(bone_scale, torch.Tensor) and not bone_scale >= 0:
        raise InputError(f"bone_scale: expected >= 0, got {bone_scale}")


def hu_to_mu(
    hu: torch.Tensor | np.ndarray | float,
    *,
    mu_water: float | torch.Tensor = MU_WATER_70KEV,
    mu_air: float | torch.Tensor = 0.0,
    bone_threshold_hu: float | torch.Tensor = 350.0,
    bone_scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Linear attenuation μ (1/mm) of CT values ``hu`` (Hounsfield units); see the module docstring.

    Args:
        hu: CT values in HU, any shape. Tensors keep their device and floating dtype (integer input →
            float32); numpy arrays and numbers become float32 tensors.
        mu_water: μ of water (1/mm), > 0; default 0.0193 /mm (≈ 70 keV).
        mu_air: μ of air (1/mm), 0 ≤ mu_air < mu_water; default 0.
        bone_threshold_hu: HU above which the slope is scaled by ``bone_scale``.
        bone_scale: slope multiplier above the threshold (1 = plain linear model), ≥ 0.

    Returns:
        μ in 1/mm, same shape as ``hu``, ≥ 0. Example (defaults): −1000 HU → 0, 0 HU → 0.0193,
        1000 HU → 0.0386 /mm.
    """
    _check_params(mu_water, mu_air, bone_threshold_hu, bone_scale)
    if isinstance(hu, torch.Tensor):
        x = hu if hu.is_floating_point() else hu.to(torch.float32)
    else:
        x = torch.as_tensor(np.asarray(hu, dtype=np.float32))
    # Written as μ_air + (μ_water − μ_air)·(1 + HU/1000) so that −1000 HU gives μ_air and 0 HU gives μ_water
    # exactly, also in float32.
    delta = mu_water - mu_air
    mu = mu_air + delta * (1.0 + x / 1000.0)
    if not (isinstance(bone_scale, float | int) and bone_scale == 1.0):
        mu_t = mu_air + delta * (1.0 + bone_threshold_hu / 1000.0)
        mu = torch.where(x > bone_threshold_hu, mu_t + bone_scale * (mu - mu_t), mu)
    return torch.clamp(mu, min=0.0)


@dataclass(frozen=True)
class AttenuationModel:
    """The HU → μ (1/mm) mapping of :func:`hu_to_mu` with fixed parameters; call it on HU values.

    Attributes:
        mu_water: μ of water in 1/mm (default 0.0193, ≈ 70 keV).
        mu_air: μ of air in 1/mm (default 0).
        bone_threshold_hu: HU above which the slope is multiplied by ``bone_scale`` (default 350).
        bone_scale: slope multiplier for bone (default 1: the plain linear model).
    """

    mu_water: float = MU_WATER_70KEV
    mu_air: float = 0.0
    bone_threshold_hu: float = 350.0
    bone_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_params(self.mu_water, self.mu_air, self.bone_threshold_hu, self.bone_scale)

    def __call__(self, hu: torch.Tensor | np.ndarray | float) -> torch.Tensor:
        """μ in 1/mm of ``hu`` (HU), same shape; see :func:`hu_to_mu`."""
        return hu_to_mu(
            hu,
            mu_water=self.mu_water,
            mu_air=self.mu_air,
            bone_threshold_hu=self.bone_threshold_hu,
            bone_scale=self.bone_scale,
        )
