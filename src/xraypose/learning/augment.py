"""Domain randomisation of training DRRs, towards real X-rays: contrast, noise, blur, collimation, detector.

:func:`augment` acts on a batch of raw ``−ln(I/I0)`` line-integral images ``(B, 1, H, W)`` (or ``(B, H, W)``)
*before* the per-image standardisation (:func:`xraypose.learning.data.standardize`), on the batch's device,
with every random draw taken from one ``torch.Generator`` on that device (same generator state: same output).

Each operation is applied to each image independently with its probability ``p_*``; its **magnitude** is
scaled by :attr:`AugmentConfig.strength` (the incremental-training schedule sets it per stage). With
``strength = 0`` the batch is returned unchanged (the identity). Operations, in order:

1. **collimation** (``p_collimation``): a rectangular or circular field (:func:`xraypose.physics.detector.
   collimator_mask`, soft edge), at most ``collimation_max · strength`` of the field's half-extent cut; outside,
   the image is replaced by a constant: with probability 1/2 the value of a blocked beam (``1``–``1.3`` × the
   image's maximum: bright in attenuation polarity), else 0 (processed images that black the shutter out);
2. **realistic detector** (``p_detector``): :func:`xraypose.physics.simulate_detector` on ``exp(−x)`` with a
   random :class:`~xraypose.physics.DetectorModel` (quanta per pixel log-uniform down to
   ``10**(5 − 1.5·strength)``, PSF FWHM up to ``strength`` mm, scatter-to-primary up to ``0.4·strength``,
   heel effect up to ±``0.2·strength``, 12 bits); needs the pixel spacing;
3. **Gaussian blur** (``p_blur``): σ up to ``blur_sigma_max_px · strength`` pixels;
4. **Gaussian noise** (``p_noise``): standard deviation up to ``noise_max · strength`` × the image's std;
5. **Poisson-like quantum noise** (``p_poisson``): ``x + z · sqrt(exp(x) / N0)`` (the variance of
   ``−ln`` of a Poisson count of mean ``N0 · exp(−x)``), ``N0`` log-uniform in ``[photons_max^(1−strength)·
   photons_min^strength, photons_max]``;
6. **gamma** (``p_gamma``): on the image rescaled to ``[0, 1]``, ``y^γ`` with ``ln γ`` uniform in
   ``±gamma_max · strength``;
7. **window** (``p_window``): clip to random low/high quantiles (at most ``window_max · strength`` of the pixels
   saturated at each end). An affine contrast change would be undone by the standardisation, so contrast is
   randomised by gamma and windowing;
8. **inversion** (``p_invert``, off by default): ``max + min − x`` (intensity polarity).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..physics.detector import (
    CircularCollimator,
    DetectorModel,
    RectangularCollimator,
    collimator_mask,
    simulate_detector,
)
from ._config import dataclass_from_dict

__all__ = ["AugmentConfig", "augment"]

_PROBS = ("p_collimation", "p_detector", "p_blur", "p_noise", "p_poisson", "p_gamma", "p_window", "p_invert")


@dataclass(frozen=True)
class AugmentConfig:
    """Domain-randomisation settings (see the module docstring for each operation).

    Attributes:
        strength: scales every magnitude (0: identity; 1: the nominal ranges below).
        p_*: per-image probability of each operation, in ``[0, 1]``.
        collimation_max: largest fraction of the field half-extent removed by the collimator.
        blur_sigma_max_px: largest blur σ, pixels.
        noise_max: largest Gaussian noise std relative to the image's std.
        photons_min, photons_max: quanta per pixel range of the Poisson-like noise.
        gamma_max: ``|ln γ|`` bound.
        window_max: largest fraction of pixels clipped at each end.
    """

    strength: float = 1.0
    p_collimation: float = 0.3
    p_detector: float = 0.25
    p_blur: float = 0.3
    p_noise: float = 0.5
    p_poisson: float = 0.3
    p_gamma: float = 0.5
    p_window: float = 0.3
    p_invert: float = 0.0
    collimation_max: float = 0.4
    blur_sigma_max_px: float = 1.5
    noise_max: float = 0.05
    photons_min: float = 1e4
    photons_max: float = 1e6
    gamma_max: float = 0.4
    window_max: float = 0.05

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(f"AugmentConfig.{f.name}: expected a finite number >= 0; got {v!r}")
            object.__setattr__(self, f.name, float(v))
        for name in (*_PROBS, "collimation_max", "window_max"):
            if getattr(self, name) > 1:
                raise InputError(
                    f"AugmentConfig.{name}: expected a value in [0, 1]; got {getattr(self, name)!r}"
                )
        if not 0 < self.photons_min <= self.photons_max:
            raise InputError(
                f"AugmentConfig: expected 0 < photons_min <= photons_max; got {self.photons_min}, {self.photons_max}"
            )

    def scaled(self, factor: float) -> AugmentConfig:
        """The same configuration with ``strength`` multiplied by ``factor``."""
        return dataclasses.replace(self, strength=self.strength * float(factor))

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AugmentConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`InputError`, missing ones take defaults."""
        return dataclass_from_dict(cls, data)


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """``(B, 2r+1)`` normalised Gaussian kernels (σ = 0: a delta)."""
    x = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (x / s) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur of ``(B, H, W)`` (reflect padding), σ ``(B,)`` pixels."""
    b, h, w = x.shape
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    radius = min(radius, h - 1, w - 1)
    k = _gaussian_kernels(sigma.to(x.dtype), radius)
    y = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")  # (1, B, H+2r, W+2r)
    y = F.conv2d(y, k[:, None, None, :], groups=b)
    y = F.conv2d(y, k[:, None, :, None], groups=b)
    return y[0]


def _quantiles(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-image quantile ``q[i]`` of ``x[i]`` ``(B, H, W)`` (nearest rank)."""
    flat = x.flatten(1).sort(dim=1).values
    idx = (q * (flat.shape[1] - 1)).round().long().clamp(0, flat.shape[1] - 1)
    return flat.gather(1, idx[:, None])[:, 0]


def augment(
    images: torch.Tensor,
    config: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
    *,
    pixel_spacing_mm: float | tuple[float, float] = 1.0,
) -> torch.Tensor:
    """Randomise a batch of raw line-integral images (module docstring).

    Args:
        images: ``(B, 1, H, W)`` or ``(B, H, W)`` float ``−ln(I/I0)`` images (``>= 0`` for the detector model).
        config: the settings (default :class:`AugmentConfig`).
        generator: a ``torch.Generator`` on the images' device (default: torch's global generator there).
        pixel_spacing_mm: detector pixel spacing ``(dy, dx)`` in mm (or one value) of the images, for the
            collimator and the detector model.
    Returns:
        A new tensor of the input's shape, dtype and device (the input itself when nothing applies).
    """
    config = AugmentConfig() if config is None else config
    if not isinstance(config, AugmentConfig):
        raise InputError(f"augment: 'config' must be an AugmentConfig; got {type(config).__name__}")
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim not in (3, 4):
        raise InputError("augment: 'images' must be a floating tensor (B, 1, H, W) or (B, H, W)")
    if images.ndim == 4 and images.shape[1] != 1:
        raise InputError(f"augment: expected one channel; got shape {tuple(images.shape)}")
    if generator is not None and torch.device(generator.device).type != images.device.type:
        raise InputError(f"augment: the generator is on {generator.device}, the images on {images.device}")
    s = config.strength
    if s == 0 or all(getattr(config, p) == 0 for p in _PROBS):
        return images
    shape = images.shape
    x = images.reshape(shape[0], shape[-2], shape[-1]).clone()
    b, h, w = x.shape
    dev, dt = x.device, x.dtype
    try:
        dy, dx = (
            (float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1]))  # type: ignore[index]
            if isinstance(pixel_spacing_mm, (tuple, list))
            else (float(pixel_spacing_mm),) * 2
        )
    except (TypeError, ValueError, IndexError):
        dy = dx = float("nan")
    if not (math.isfinite(dy) and math.isfinite(dx) and dy > 0 and dx > 0):
        raise InputError(
            f"augment: 'pixel_spacing_mm' must be a positive spacing or a pair; got {pixel_spacing_mm!r}"
        )
    g = generator
    # One fixed draw of every per-image uniform, whatever applies: the stream of draws does not depend on p.
    u = torch.rand(b, 28, generator=g, device=dev, dtype=torch.float64)
    apply = {name: u[:, i] < getattr(config, name) for i, name in enumerate(_PROBS)}
    p = u[:, len(_PROBS) :]  # 20 parameter uniforms per image

    # 1. collimation
    sel = apply["p_collimation"].nonzero().flatten().tolist()
    if sel:
        hw_mm, hh_mm = 0.5 * w * dx, 0.5 * h * dy
        vals = p[sel].tolist()
        for i, v in zip(sel, vals, strict=True):
            cut = min(config.collimation_max * s, 0.95)
            centre = (0.1 * s * hw_mm * (2 * v[3] - 1), 0.1 * s * hh_mm * (2 * v[4] - 1))
            edge = 5.0 * v[5] * s * min(dx, dy)
            if v[0] < 0.5:
                coll: Any = RectangularCollimator(
                    half_width_mm=hw_mm * (1 - cut * v[1]) + 1e-6,
                    half_height_mm=hh_mm * (1 - cut * v[2]) + 1e-6,
                    center_mm=centre,
                    edge_width_mm=edge,
                )
            else:
                radius = math.hypot(hw_mm, hh_mm) * (1 - cut * v[1])
                coll = CircularCollimator(radius_mm=max(radius, 1e-3), center_mm=centre, edge_width_mm=edge)
            m = collimator_mask(coll, (h, w), (dy, dx), dtype=dt, device=dev)
            fill = float(x[i].max()) * (1.0 + 0.3 * v[7]) if v[6] < 0.5 else 0.0
            x[i] = x[i] * m + fill * (1 - m)

    # 2. realistic detector
    sel = apply["p_detector"].nonzero().flatten().tolist()
    if sel:
        vals = p[sel].tolist()
        for i, v in zip(sel, vals, strict=True):
            model = DetectorModel(
                photons_per_pixel=10 ** (5.0 - 1.5 * s * v[8]),
                psf_fwhm_mm=s * v[9],
                scatter_to_primary=0.4 * s * v[10],
                heel_effect=min(0.2 * s, 1.5) * (2 * v[11] - 1),
                bit_depth=12,
            )
            primary = torch.exp(-x[i].clamp_min(0)).clamp(0, 1)
            x[i] = simulate_detector(primary, (dy, dx), model, generator=g)

    # 3. blur
    blur = apply["p_blur"]
    if bool(blur.any()):
        sigma = torch.where(blur, config.blur_sigma_max_px * s * p[:, 12], 0.0)
        if float(sigma.max()) > 0:
            x = _blur(x, sigma)

    # 4. Gaussian noise, 5. Poisson-like noise
    std = x.flatten(1).std(dim=1, unbiased=False)
    sel_noise = apply["p_noise"]
    if bool(sel_noise.any()):
        z = torch.randn(x.shape, generator=g, device=dev, dtype=dt)
        amp = torch.where(sel_noise, config.noise_max * s * p[:, 13], 0.0).to(dt) * std
        x = x + amp[:, None, None] * z
    sel_poisson = apply["p_poisson"]
    if bool(sel_poisson.any()):
        z = torch.randn(x.shape, generator=g, device=dev, dtype=dt)
        lo, hi = math.log10(config.photons_min), math.log10(config.photons_max)
        n0 = 10 ** (hi - s * (hi - lo) * p[:, 14])
        amp = torch.where(sel_poisson, 1.0 / n0.sqrt(), 0.0).to(dt)
        x = x + amp[:, None, None] * torch.exp(0.5 * x.clamp(max=30.0)) * z

    # 6. gamma
    sel = apply["p_gamma"]
    if bool(sel.any()):
        gamma = torch.exp(config.gamma_max * s * (2 * p[:, 15] - 1)).to(dt)
        gamma = torch.where(sel, gamma, torch.ones_like(gamma))
        lo = x.flatten(1).min(dim=1).values[:, None, None]
        hi = x.flatten(1).max(dim=1).values[:, None, None]
        span = (hi - lo).clamp_min(1e-12)
        y = ((x - lo) / span).clamp(0, 1) ** gamma[:, None, None]
        x = torch.where(sel[:, None, None], lo + span * y, x)

    # 7. window
    sel = apply["p_window"]
    if bool(sel.any()):
        q_lo = config.window_max * s * p[:, 16]
        q_hi = 1 - config.window_max * s * p[:, 17]
        lo = _quantiles(x, q_lo.to(dt))[:, None, None]
        hi = _quantiles(x, q_hi.to(dt))[:, None, None]
        x = torch.where(sel[:, None, None], torch.minimum(torch.maximum(x, lo), hi), x)

    # 8. inversion
    sel = apply["p_invert"]
    if bool(sel.any()):
        lo = x.flatten(1).min(dim=1).values[:, None, None]
        hi = x.flatten(1).max(dim=1).values[:, None, None]
        x = torch.where(sel[:, None, None], hi + lo - x, x)
    return x.reshape(shape)
