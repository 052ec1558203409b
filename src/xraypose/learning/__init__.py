"""Learning: a pose regression network (DiffPose-style), its training data, training (patient-specific, pretrained
over several CTs, finetuned) and network initialisation of registration; ProST's learned similarity and its
double-backward training."""

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
from .inference import InitialPose, NetworkInitializer, predict_initial_pose, to_line_integrals
from .model import (
    PoseNormalizer,
    PoseOutput,
    PoseRegressor,
    PoseRegressorConfig,
    SpatialSelfAttention,
    available_backbones,
    sinusoidal_position_embedding_2d,
)
from .similarity import (
    LearnedSimilarity,
    PreparedVolume,
    SimilarityConfig,
    direction_loss,
    geodesic_direction,
    prepare_volume,
)
from .similarity_training import (
    PairBatch,
    SimilarityTrainingConfig,
    SimilarityTrainingResult,
    TrainedSimilarity,
    load_similarity,
    sample_pairs,
    train_similarity,
)
from .training import (
    ModelCardWarning,
    TrainedModel,
    TrainingConfig,
    TrainingResult,
    card_cts,
    check_model_card,
    ct_sha256,
    load_trained_model,
    pose_losses,
    train,
)

__all__ = [
    "AugmentConfig",
    "GaussianPoseDistribution",
    "InitialPose",
    "LearnedSimilarity",
    "ModelCardWarning",
    "NetworkInitializer",
    "PairBatch",
    "PoseBatch",
    "PoseDataStream",
    "PoseNormalizer",
    "PoseOutput",
    "PoseRegressor",
    "PoseRegressorConfig",
    "PreparedVolume",
    "SimilarityConfig",
    "SimilarityTrainingConfig",
    "SimilarityTrainingResult",
    "SpatialSelfAttention",
    "TrainedModel",
    "TrainedSimilarity",
    "TrainingConfig",
    "TrainingResult",
    "augment",
    "available_backbones",
    "card_cts",
    "check_model_card",
    "ct_sha256",
    "direction_loss",
    "geodesic_direction",
    "load_similarity",
    "load_trained_model",
    "pose_losses",
    "pose_to_target",
    "predict_initial_pose",
    "prepare_volume",
    "reference_frame",
    "sample_pairs",
    "sinusoidal_position_embedding_2d",
    "standardize",
    "target_to_pose",
    "to_line_integrals",
    "train",
    "train_similarity",
]
