"""Realistic X-ray images of a CT in one call: polychromatic primary → detector model.

:func:`simulate_xray` is what benchmark targets are made with: the Diff-DeepDRR physics
(:mod:`.polychromatic`) gives the primary transmission ``I/I0``; :func:`~.detector.simulate_detector` adds the
heel effect, collimation, scatter, quantum noise, detector blur, the log transform and quantisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..geometry.camera import Camera
from .detector import DetectorModel, simulate_detector
from .materials import MaterialModel
from .polychromatic import Detector, render_polychromatic
from .spectrum import Spectrum

__all__ = ["simulate_xray"]


def simulate_xray(
    volume: torch.Tensor,
    affine: torch.Tensor,
    camera: Camera,
    *,
    materials: MaterialModel | Sequence[str] | None = None,
    spectrum: Spectrum | None = None,
    detector: Detector = "energy_integrating",
    detector_model: DetectorModel | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    **render_options: Any,
) -> torch.Tensor:
    """Simulated detector images ``(B, rows, cols)`` of a CT (HU, or density channels with material names).

    Args:
        volume, affine, camera, materials, spectrum, detector, render_options: see
            :func:`~xraypose.physics.polychromatic.render_polychromatic`.
        detector_model: noise, blur, scatter, heel effect, collimation, output and bit depth
            (default :class:`~xraypose.physics.detector.DetectorModel`).
        seed, generator: make the noise reproducible (one of them).
    Returns:
        The detector model's output: ``−ln(I/I0)`` (default) or intensity, quantised to its bit depth.
    """
    primary = render_polychromatic(
        volume,
        affine,
        camera,
        materials=materials,
        spectrum=spectrum,
        detector=detector,
        output="intensity",
        **render_options,
    )
    intr = camera.intrinsics
    model = DetectorModel() if detector_model is None else detector_model
    return simulate_detector(
        primary.clamp(0.0, 1.0), (intr.dy, intr.dx), model, seed=seed, generator=generator
    )
