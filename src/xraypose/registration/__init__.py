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
from .prost import (
    PROST_METHODS,
    LearnedSimilarityLoss,
    LearnedSimilarityRenderer,
    ProSTConfig,
    ProSTMethod,
    prost_method_table,
    register_prost,
)
from .renderers import Physics, Renderer, VolumeRenderer

__all__ = [
    "METHODS",
    "PRESETS",
    "PROST_METHODS",
    "CMAESConfig",
    "LearnedSimilarityLoss",
    "LearnedSimilarityRenderer",
    "Physics",
    "ProSTConfig",
    "ProSTMethod",
    "RegistrationConfig",
    "RegistrationResult",
    "Renderer",
    "Scale",
    "Search",
    "Step",
    "VolumeRenderer",
    "preset",
    "prost_method_table",
    "register",
    "register_cmaes",
    "register_euler_gd",
    "register_prost",
    "search_starts",
]
