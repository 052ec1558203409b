"""Registration pictures: DRR edges over the X-ray (before / after) and an animation of the optimisation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_path
from ..errors import InputError

__all__ = ["edge_map", "overlay_edges", "save_overlay", "save_registration_animation"]


def _window(image: torch.Tensor | np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    a = np.asarray(torch.as_tensor(image).detach().cpu().to(torch.float64))
    finite = a[np.isfinite(a)]
    lo, hi = np.percentile(finite, [low, high]) if finite.size else (0.0, 1.0)
    return np.clip((np.nan_to_num(a, nan=lo) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def edge_map(image: torch.Tensor | np.ndarray, quantile: float = 0.9) -> np.ndarray:
    """Boolean edges of a 2D image: Sobel gradient magnitude above its ``quantile`` (per image)."""
    from ..losses import image_gradients

    t = torch.as_tensor(image, dtype=torch.float64).detach().cpu()
    if t.ndim != 2:
        raise InputError(f"image: expected a 2D image, got shape {tuple(t.shape)}")
    g = image_gradients(t[None])[0]
    mag = g.pow(2).sum(0).sqrt().numpy()
    return mag > np.quantile(mag, quantile)


def overlay_edges(
    xray: torch.Tensor | np.ndarray, drr: torch.Tensor | np.ndarray, color: tuple[int, int, int] = (0, 255, 0)
) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)``: the windowed X-ray in grey with the DRR's edges drawn in ``color``."""
    grey = (_window(xray) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    edges = edge_map(drr)
    if edges.shape != grey.shape:
        raise InputError(f"drr: expected the X-ray's shape {grey.shape}, got {edges.shape}")
    rgb[edges] = color
    return rgb


def save_overlay(
    path: str | Path,
    xray: torch.Tensor | np.ndarray,
    drr_before: torch.Tensor | np.ndarray,
    drr_after: torch.Tensor | np.ndarray,
    titles: Sequence[str] = ("initial pose", "registered"),
) -> Path:
    """Write a PNG with two panels: DRR edges at the initial pose (red) and at the result (green)."""
    from PIL import Image, ImageDraw

    p = Path(path)
    if p.suffix.lower() != ".png":
        raise InputError(f"{p}: the overlay is written as .png, got {p.suffix!r}")
    left = overlay_edges(xray, drr_before, (255, 60, 60))
    right = overlay_edges(xray, drr_after, (60, 255, 60))
    gap = np.zeros((left.shape[0], 4, 3), dtype=np.uint8)
    canvas = np.concatenate([left, gap, right], axis=1)
    caption = np.zeros((18, canvas.shape[1], 3), dtype=np.uint8)
    img = Image.fromarray(np.concatenate([caption, canvas], axis=0))
    draw = ImageDraw.Draw(img)
    draw.text((4, 3), titles[0], fill=(255, 255, 255))
    draw.text((left.shape[1] + 8, 3), titles[1], fill=(255, 255, 255))
    with atomic_path(p) as tmp:
        img.save(tmp, format="PNG")
    return p


def save_registration_animation(
    path: str | Path,
    xray: torch.Tensor | np.ndarray,
    drrs: Sequence[torch.Tensor | np.ndarray],
    *,
    labels: Sequence[str] | None = None,
    duration_ms: int = 120,
) -> Path:
    """Write an animated GIF: the X-ray with each frame's DRR edges (green), e.g. along the optimisation."""
    from PIL import Image, ImageDraw

    p = Path(path)
    if p.suffix.lower() != ".gif":
        raise InputError(f"{p}: the animation is written as .gif, got {p.suffix!r}")
    if not drrs:
        raise InputError("drrs: expected at least one frame")
    frames = []
    for i, drr in enumerate(drrs):
        img = Image.fromarray(overlay_edges(xray, drr))
        if labels is not None:
            ImageDraw.Draw(img).text((4, 3), labels[i], fill=(255, 255, 0))
        frames.append(img)
    with atomic_path(p) as tmp:
        frames[0].save(
            tmp, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0
        )
    return p
