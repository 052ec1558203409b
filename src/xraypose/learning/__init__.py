"""Learning: a patient-specific pose regression network (DiffPose-style) and its building blocks."""

from .model import (
    PoseNormalizer,
    PoseOutput,
    PoseRegressor,
    PoseRegressorConfig,
    SpatialSelfAttention,
    available_backbones,
    sinusoidal_position_embedding_2d,
)

__all__ = [
    "PoseNormalizer",
    "PoseOutput",
    "PoseRegressor",
    "PoseRegressorConfig",
    "SpatialSelfAttention",
    "available_backbones",
    "sinusoidal_position_embedding_2d",
]
