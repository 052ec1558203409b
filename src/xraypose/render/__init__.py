"""DRR rendering: one ray engine (Siddon and trilinear), fused CPU kernels and a PyTorch reference."""

from .drr import DRR, downsample_volume, normalize_display, pyramid_factors, random_patch_pixels, render
from .engine import box_intersection, double_differentiable, integrate_rays
from .projective import ProjectiveGrid, projective_transform

__all__ = [
    "DRR",
    "ProjectiveGrid",
    "box_intersection",
    "double_differentiable",
    "downsample_volume",
    "integrate_rays",
    "normalize_display",
    "projective_transform",
    "pyramid_factors",
    "random_patch_pixels",
    "render",
]
