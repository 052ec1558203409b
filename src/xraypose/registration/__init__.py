"""Intraoperative registration: optimise the C-arm pose so that a rendering of the CT matches an X-ray."""

from .baselines import METHODS, CMAESConfig, register_cmaes, register_euler_gd
from .engine import RegistrationConfig, RegistrationResult, Scale, Search, Step, register, search_starts
from .renderers import Physics, Renderer, VolumeRenderer

__all__ = [
    "METHODS",
    "CMAESConfig",
    "Physics",
    "RegistrationConfig",
    "RegistrationResult",
    "Renderer",
    "Scale",
    "Search",
    "Step",
    "VolumeRenderer",
    "register",
    "register_cmaes",
    "register_euler_gd",
    "search_starts",
]
