"""Learning: a patient-specific pose regression network (DiffPose-style), its training data and training."""

from .augment import AugmentConfig, augment
from .data import (
    GaussianPoseDistribution,
    PoseBatch,
    PoseDataStream,
    pose_to_target,
    reference_frame,
    standardize,
    target_to_pose,
)
from .model import (
    PoseNormalizer,
    PoseOutput,
    PoseRegressor,
    PoseRegressorConfig,
    SpatialSelfAttention,
    available_backbones,
    sinusoidal_position_embedding_2d,
)
from .training import (
    TrainedModel,
    TrainingConfig,
    TrainingResult,
    check_model_card,
    ct_sha256,
    load_trained_model,
    pose_losses,
    train,
)

__all__ = [
    "AugmentConfig",
    "GaussianPoseDistribution",
    "PoseBatch",
    "PoseDataStream",
    "PoseNormalizer",
    "PoseOutput",
    "PoseRegressor",
    "PoseRegressorConfig",
    "SpatialSelfAttention",
    "TrainedModel",
    "TrainingConfig",
    "TrainingResult",
    "augment",
    "available_backbones",
    "check_model_card",
    "ct_sha256",
    "load_trained_model",
    "pose_losses",
    "pose_to_target",
    "reference_frame",
    "sinusoidal_position_embedding_2d",
    "standardize",
    "target_to_pose",
    "train",
]
