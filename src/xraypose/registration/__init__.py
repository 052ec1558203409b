"""Intraoperative registration: optimise the C-arm pose so that a rendering of the CT matches an X-ray."""

from .baselines import METHODS, CMAESConfig, register_cmaes, register_euler_gd
from .engine import RegistrationConfig, RegistrationResult, Scale, Step, register
from .renderers import Physics, Renderer, VolumeRenderer

__all__ = [
    "METHODS",
    "CMAESConfig",
    "Physics",
    "RegistrationConfig",
    "RegistrationResult",
    "Renderer",
    "Scale",
    "Step",
    "VolumeRenderer",
    "register",
    "register_cmaes",
    "register_euler_gd",
]
