"""Intraoperative registration: optimise the C-arm pose so that a rendering of the CT matches an X-ray."""

from .baselines import METHODS, CMAESConfig, register_cmaes, register_euler_gd
from .engine import (
    PRESETS,
    RegistrationConfig,
    RegistrationResult,
    Scale,
    Search,
    Step,
    preset,
    register,
    search_starts,
)
from .renderers import Physics, Renderer, VolumeRenderer

__all__ = [
    "METHODS",
    "PRESETS",
    "CMAESConfig",
    "Physics",
    "RegistrationConfig",
    "RegistrationResult",
    "Renderer",
    "Scale",
    "Search",
    "Step",
    "VolumeRenderer",
    "preset",
    "register",
    "register_cmaes",
    "register_euler_gd",
    "search_starts",
]
