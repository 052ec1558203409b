"""Geometry: rotations, SE(3) rigid transforms and the C-arm camera (units and frames: docs/conventions.md)."""

from . import rotations, se3
from .camera import Camera, Intrinsics, ap_view, carm_pose, validate_pose
from .sampling import gaussian_se3_poses, uniform_box_poses, uniform_rotations

__all__ = [
    "Camera",
    "Intrinsics",
    "ap_view",
    "carm_pose",
    "gaussian_se3_poses",
    "rotations",
    "se3",
    "uniform_box_poses",
    "uniform_rotations",
    "validate_pose",
]
