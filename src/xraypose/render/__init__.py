"""DRR rendering: one ray engine (Siddon and trilinear), fused CPU kernels and a PyTorch reference."""

from .drr import DRR, downsample_volume, normalize_display, pyramid_factors, random_patch_pixels, render
from .engine import box_intersection, double_differentiable, integrate_rays

__all__ = [
    "DRR",
    "box_intersection",
    "double_differentiable",
    "downsample_volume",
    "integrate_rays",
    "normalize_display",
    "pyramid_factors",
    "random_patch_pixels",
    "render",
]
