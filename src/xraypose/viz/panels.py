"""Side-by-side image panels with captions, written as 8-bit PNG (Pillow; no plotting library needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_path
from ..errors import InputError

__all__ = ["panel_image", "save_panels"]

_CAPTION_PX = 18


def panel_image(
    images: Sequence[torch.Tensor | np.ndarray],
    titles: Sequence[str] | None = None,
    *,
    low: float = 0.5,
    high: float = 99.5,
    gap: int = 4,
) -> np.ndarray:
    """Tile 2D images left to right, each windowed to its own ``low``–``high`` percentiles, with a caption strip.

    Returns an ``(H + caption, W_total)`` uint8 array (white captions on black).
    """
    if not images:
        raise InputError("images: expected at least one image")
    if titles is not None and len(titles) != len(images):
        raise InputError(f"titles: expected {len(images)} titles, got {len(titles)}")
    arrays = []
    for i, im in enumerate(images):
        a = np.asarray(torch.as_tensor(im).detach().cpu().to(torch.float64))
        if a.ndim != 2:
            raise InputError(f"images[{i}]: expected a 2D image, got shape {a.shape}")
        finite = a[np.isfinite(a)]
        lo, hi = np.percentile(finite, [low, high]) if finite.size else (0.0, 1.0)
        scaled = np.clip((np.nan_to_num(a, nan=lo) - lo) / max(hi - lo, 1e-12), 0, 1)
        arrays.append((scaled * 255 + 0.5).astype(np.uint8))
    h = max(a.shape[0] for a in arrays)
    width = sum(a.shape[1] for a in arrays) + gap * (len(arrays) - 1)
    caption = _CAPTION_PX if titles else 0
    canvas = np.zeros((h + caption, width), dtype=np.uint8)
    x = 0
    for a in arrays:
        canvas[caption : caption + a.shape[0], x : x + a.shape[1]] = a
        x += a.shape[1] + gap
    if titles:
        from PIL import Image, ImageDraw

        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        x = 0
        for a, title in zip(arrays, titles, strict=True):
            draw.text((x + 4, 3), title, fill=255)
            x += a.shape[1] + gap
        canvas = np.asarray(img)
    return canvas


def save_panels(
    path: str | Path,
    images: Sequence[torch.Tensor | np.ndarray],
    titles: Sequence[str] | None = None,
    **kwargs,
) -> Path:
    """Write :func:`panel_image` to a PNG atomically; returns the path."""
    from PIL import Image

    p = Path(path)
    if p.suffix.lower() != ".png":
        raise InputError(f"{p}: panels are written as .png, got {p.suffix!r}")
    canvas = panel_image(images, titles, **kwargs)
    with atomic_path(p) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return p
