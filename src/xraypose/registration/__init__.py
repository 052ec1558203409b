"""Intraoperative registration: optimise the C-arm pose so that a rendering of the CT matches an X-ray."""

from .engine import RegistrationConfig, RegistrationResult, Scale, Step, register
from .renderers import Physics, Renderer, VolumeRenderer

__all__ = [
    "Physics",
    "RegistrationConfig",
    "RegistrationResult",
    "Renderer",
    "Scale",
    "Step",
    "VolumeRenderer",
    "register",
]
