"""Geometry: rotations, SE(3) rigid transforms and the C-arm camera (units and frames: docs/conventions.md)."""

from . import rotations, se3
from .camera import Camera, Intrinsics, ap_view, carm_pose, validate_pose

__all__ = ["Camera", "Intrinsics", "ap_view", "carm_pose", "rotations", "se3", "validate_pose"]
