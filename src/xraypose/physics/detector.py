"""Realistic X-ray detector images from ideal primary transmission images.

:func:`simulate_detector` turns a batch of ideal primary images ``I/I0`` (the fraction of the unattenuated beam
that reaches each detector pixel, in ``[0, 1]``, e.g. the ``"intensity"`` output of
:func:`xraypose.render.render`) into the image a flat-panel detector would deliver, for honest benchmark targets.
Every parameter is in physical units (mm at the detector, detected quanta per pixel, ratios) and collected in a
frozen :class:`DetectorModel`; every random draw is seedable.

Stages, in the order the signal meets them (see ``docs/physics-simulator.md``):

1. **Incident fluence** (relative to the nominal open beam at the detector centre): the heel effect, a linear
   gradient along the anode–cathode axis, times the collimator's transmission. The collimator sits at the tube,
   so it shapes the beam *before* the patient: blocked pixels get no primary (only ``leakage``), scatter only
   arises from the irradiated field (a smaller field gives less scatter), and the shadow's edge is later
   softened by the detector blur, as in real images.
2. **Primary + scatter**: primary ``P = fluence · I/I0``; scatter ``S`` is a broad, low-frequency copy of ``P``
   whose mean is ``scatter_to_primary · mean(P)`` (exact definition in :func:`scatter_image`). Both carry the
   heel gradient because both come from the same incident beam.
3. **Quantum noise**: the detector counts quanta, so the noise is drawn on the expected count
   ``photons_per_pixel · (P + S)`` (Poisson, or its Gaussian approximation with variance = mean). It must come
   before the blur and after the scatter: scatter quanta are as noisy as primary ones.
4. **Detector blur**: the scintillator spreads each absorbed quantum's light over neighbouring pixels, so the
   PSF acts on the *noisy* image and correlates the noise (the noise power spectrum falls like the MTF²).
5. **Log transform** (``output="log"``): ``−ln(I/I0)`` with ``I/I0 = counts / photons_per_pixel`` floored at
   ``intensity_floor`` so that zero counts stay finite; or the intensity ``I/I0`` itself.
6. **Quantisation** of the output to ``2**bit_depth`` levels over a fixed range, as a stored image is.

With every stage disabled (``photons_per_pixel=None``, ``psf_fwhm_mm=0``, ``scatter_to_primary=0``, no heel,
no collimator, ``bit_depth=None``) the ``"intensity"`` output is the primary image itself and the ``"log"``
output is ``−ln`` of it (floored).

Shapes: images are ``(B, H, W)`` or ``(H, W)`` (rows, cols); pixel spacing is ``(dy, dx)`` in mm (row spacing,
column spacing), as in :class:`xraypose.geometry.Intrinsics`. Detector coordinates of pixel ``(r, c)`` are
``x = (c − (W − 1)/2)·dx``, ``y = (r − (H − 1)/2)·dy`` mm from the detector centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = [
    "FWHM_PER_SIGMA",
    "CircularCollimator",
    "Collimator",
    "DetectorModel",
    "RectangularCollimator",
    "collimator_mask",
    "gaussian_blur",
    "heel_profile",
    "quantize",
    "scatter_image",
    "simulate_detector",
]

#: Full width at half maximum of a Gaussian in units of its standard deviation, ``2·sqrt(2·ln 2)``.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

# Tolerance on the primary image's [0, 1] range (rounding in the renderer's exp, float32).
_PRIMARY_TOLERANCE = 1e-5

# The broad scatter kernel is applied on a grid coarse enough that its sigma spans about this many coarse
# pixels (a few pixels resolve a Gaussian well); the result is bilinearly upsampled.
_SCATTER_COARSE_SIGMA_PX = 3.0

# Gaussian kernels are truncated at this many sigmas (the tail beyond holds < 1e-4 of the weight).
_TRUNCATE_SIGMAS = 4.0

# Kernels up to this many taps are applied as a sum of shifted slices, longer ones with conv1d.
_SHIFT_ADD_MAX_TAPS = 33
# Axes up to this length are blurred by a dense matrix (the same reflect-padded filter, one matmul).
_MATRIX_MAX_SIZE = 96


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_real(owner: str, name: str, value: object, *, minimum: float | None = None, what: str) -> None:
    """Raise :class:`InputError` unless ``value`` is a finite real ``>= minimum``."""
    if not _is_real(value) or not math.isfinite(value) or (minimum is not None and value < minimum):  # type: ignore[arg-type]
        raise InputError(f"{owner}.{name}: expected {what}, got {value!r}")


def _check_centre(owner: str, value: object) -> None:
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(_is_real(v) and math.isfinite(v) for v in value)  # type: ignore[arg-type]
    ):
        raise InputError(
            f"{owner}.center_mm: expected a tuple (x, y) of two finite offsets in mm, got {value!r}"
        )


@dataclass(frozen=True)
class CircularCollimator:
    """A circular (iris) collimator, as on most mobile C-arms with an image-intensifier-shaped field.

    Attributes:
        radius_mm: radius of the irradiated field at the detector, mm (> 0).
        center_mm: centre of the field, ``(x, y)`` mm from the detector centre (x along columns, y along rows).
        edge_width_mm: width of the soft edge (penumbra), mm (≥ 0): the transmission falls linearly from 1 to
            ``leakage`` over this width, centred on the nominal edge; 0 gives a hard edge.
        leakage: fraction of the beam transmitted outside the field, in ``[0, 1]``.
    """

    radius_mm: float
    center_mm: tuple[float, float] = (0.0, 0.0)
    edge_width_mm: float = 0.0
    leakage: float = 0.0

    def __post_init__(self) -> None:
        owner = "CircularCollimator"
        _check_real(owner, "radius_mm", self.radius_mm, what="a positive finite radius in mm")
        if self.radius_mm <= 0:
            raise InputError(
                f"{owner}.radius_mm: expected a positive finite radius in mm, got {self.radius_mm!r}"
            )
        _check_centre(owner, self.center_mm)
        _check_real(owner, "edge_width_mm", self.edge_width_mm, minimum=0.0, what="a finite width ≥ 0 in mm")
        _check_leakage(owner, self.leakage)


@dataclass(frozen=True)
class RectangularCollimator:
    """A rectangular (jaw) collimator aligned with the detector's rows and columns.

    Attributes:
        half_width_mm: half the field's extent along columns (x), mm (> 0).
        half_height_mm: half the field's extent along rows (y), mm (> 0).
        center_mm: centre of the field, ``(x, y)`` mm from the detector centre (x along columns, y along rows).
        edge_width_mm: width of the soft edge (penumbra), mm (≥ 0), centred on the nominal edge; 0: hard edge.
        leakage: fraction of the beam transmitted outside the field, in ``[0, 1]``.
    """

    half_width_mm: float
    half_height_mm: float
    center_mm: tuple[float, float] = (0.0, 0.0)
    edge_width_mm: float = 0.0
    leakage: float = 0.0

    def __post_init__(self) -> None:
        owner = "RectangularCollimator"
        for name in ("half_width_mm", "half_height_mm"):
            value = getattr(self, name)
            _check_real(owner, name, value, what="a positive finite length in mm")
            if value <= 0:
                raise InputError(f"{owner}.{name}: expected a positive finite length in mm, got {value!r}")
        _check_centre(owner, self.center_mm)
        _check_real(owner, "edge_width_mm", self.edge_width_mm, minimum=0.0, what="a finite width ≥ 0 in mm")
        _check_leakage(owner, self.leakage)


def _check_leakage(owner: str, value: object) -> None:
    _check_real(owner, "leakage", value, minimum=0.0, what="a fraction in [0, 1]")
    if value > 1:  # type: ignore[operator]
        raise InputError(f"{owner}.leakage: expected a fraction in [0, 1], got {value!r}")


Collimator = CircularCollimator | RectangularCollimator


@dataclass(frozen=True)
class DetectorModel:
    """Parameters of the detector simulation; the defaults describe a mobile C-arm flat panel.

    Attributes:
        photons_per_pixel: mean number of detected quanta per pixel for the unattenuated beam at the detector
            centre (> 0); ``None`` disables quantum noise. 1e4 is a radiographic (single-shot) exposure of a few
            µGy at the detector for ~0.3 mm pixels; fluoroscopy frames have ~10–100× fewer quanta.
        noise: ``"poisson"`` (exact counting statistics) or ``"gaussian"`` (normal with variance = mean,
            not clipped at 0).
        psf_fwhm_mm: full width at half maximum of the detector's Gaussian point-spread function at the
            detector, mm (≥ 0; 0 disables the blur). 0.5 mm is roughly a CsI:Tl scintillator panel.
        scatter_to_primary: scatter-to-primary ratio (SPR, ≥ 0): mean scatter / mean primary over the detector.
            0.2 is a gridded detector behind a moderately thick body part; 0 disables scatter.
        scatter_sigma_mm: standard deviation of the broad Gaussian scatter kernel at the detector, mm (> 0).
        heel_effect: total fractional change of the incident fluence across the detector along ``heel_axis``
            (``|heel_effect| < 2``): the fluence is ``1 + heel_effect·t`` with ``t`` running linearly from
            −1/2 at the first row (column) to +1/2 at the last, so 0.1 means ±5 %. Positive: the anode
            (dimmer) side is at row (column) 0. 0 (default) matches flat-field corrected images.
        heel_axis: ``"rows"`` (the anode–cathode axis runs along the row index, down the image) or ``"cols"``.
        collimator: a :class:`CircularCollimator` or :class:`RectangularCollimator`, or ``None`` (open field).
        output: ``"log"`` for line-integral images ``−ln(I/I0)`` (dimensionless) or ``"intensity"`` for ``I/I0``.
        intensity_floor: smallest ``I/I0`` passed to the log (> 0), so zero counts give a finite value;
            ``None`` picks half a quantum, ``0.5 / photons_per_pixel``, with noise and 1e-6 without.
        bit_depth: number of bits of the stored image (1 … 32); ``None`` disables quantisation.
        quantization_range: ``(low, high)`` output values mapped to the first and last of the ``2**bit_depth``
            levels; values outside are clipped (saturation). ``None`` uses ``(0, −ln(intensity_floor))`` for
            the log output (every possible value; intensities above the open beam clip to 0) and ``(0, 1)``
            for the intensity output (the open beam saturates).
    """

    photons_per_pixel: float | None = 1e4
    noise: Literal["poisson", "gaussian"] = "poisson"
    psf_fwhm_mm: float = 0.5
    scatter_to_primary: float = 0.2
    scatter_sigma_mm: float = 40.0
    heel_effect: float = 0.0
    heel_axis: Literal["rows", "cols"] = "rows"
    collimator: Collimator | None = None
    output: Literal["log", "intensity"] = "log"
    intensity_floor: float | None = None
    bit_depth: int | None = 12
    quantization_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        owner = "DetectorModel"
        if self.photons_per_pixel is not None:
            _check_real(
                owner, "photons_per_pixel", self.photons_per_pixel, what="a positive finite count or None"
            )
            if self.photons_per_pixel <= 0:
                raise InputError(
                    f"{owner}.photons_per_pixel: expected a positive finite count or None, "
                    f"got {self.photons_per_pixel!r}"
                )
        if self.noise not in ("poisson", "gaussian"):
            raise InputError(f"{owner}.noise: expected 'poisson' or 'gaussian', got {self.noise!r}")
        _check_real(owner, "psf_fwhm_mm", self.psf_fwhm_mm, minimum=0.0, what="a finite FWHM ≥ 0 in mm")
        _check_real(
            owner, "scatter_to_primary", self.scatter_to_primary, minimum=0.0, what="a finite ratio ≥ 0"
        )
        _check_real(owner, "scatter_sigma_mm", self.scatter_sigma_mm, what="a positive finite width in mm")
        if self.scatter_sigma_mm <= 0:
            raise InputError(
                f"{owner}.scatter_sigma_mm: expected a positive finite width in mm, got {self.scatter_sigma_mm!r}"
            )
        _check_real(owner, "heel_effect", self.heel_effect, what="a finite fractional change in (−2, 2)")
        if abs(self.heel_effect) >= 2:
            raise InputError(
                f"{owner}.heel_effect: expected a finite fractional change in (−2, 2), got {self.heel_effect!r}"
            )
        if self.heel_axis not in ("rows", "cols"):
            raise InputError(f"{owner}.heel_axis: expected 'rows' or 'cols', got {self.heel_axis!r}")
        if self.collimator is not None and not isinstance(
            self.collimator, (CircularCollimator, RectangularCollimator)
        ):
            raise InputError(
                f"{owner}.collimator: expected a CircularCollimator, RectangularCollimator or None, "
                f"got {type(self.collimator).__name__}"
            )
        if self.output not in ("log", "intensity"):
            raise InputError(f"{owner}.output: expected 'log' or 'intensity', got {self.output!r}")
        if self.intensity_floor is not None:
            _check_real(
                owner, "intensity_floor", self.intensity_floor, what="a positive finite fraction or None"
            )
            if not 0 < self.intensity_floor < 1:
                raise InputError(
                    f"{owner}.intensity_floor: expected a fraction in (0, 1) or None, got {self.intensity_floor!r}"
                )
        if self.bit_depth is not None and (
            isinstance(self.bit_depth, bool)
            or not isinstance(self.bit_depth, int)
            or not 1 <= self.bit_depth <= 32
        ):
            raise InputError(
                f"{owner}.bit_depth: expected an integer in 1..32 or None, got {self.bit_depth!r}"
            )
        if self.quantization_range is not None:
            r = self.quantization_range
            if (
                not isinstance(r, tuple)
                or len(r) != 2
                or not all(_is_real(v) and math.isfinite(v) for v in r)
                or not r[0] < r[1]
            ):
                raise InputError(
                    f"{owner}.quantization_range: expected a tuple (low, high) of finite values with low < high "
                    f"or None, got {r!r}"
                )

    @property
    def floor(self) -> float:
        """The intensity floor actually used by the log transform (resolves ``intensity_floor=None``)."""
        if self.intensity_floor is not None:
            return float(self.intensity_floor)
        if self.photons_per_pixel is not None:
            return min(0.5, 0.5 / self.photons_per_pixel)
        return 1e-6

    @property
    def output_range(self) -> tuple[float, float]:
        """The quantisation range actually used (resolves ``quantization_range=None``)."""
        if self.quantization_range is not None:
            return (float(self.quantization_range[0]), float(self.quantization_range[1]))
        if self.output == "log":
            return (0.0, -math.log(self.floor))
        return (0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------
# Validation of call arguments


def _validate_primary(primary: object) -> tuple[torch.Tensor, bool]:
    if not isinstance(primary, torch.Tensor):
        raise InputError(
            f"primary: expected a torch.Tensor (B, H, W) or (H, W), got {type(primary).__name__}"
        )
    if primary.dtype not in (torch.float32, torch.float64):
        raise InputError(f"primary: expected a float32 or float64 tensor, got dtype {primary.dtype}")
    if primary.ndim not in (2, 3):
        raise InputError(f"primary: expected shape (B, H, W) or (H, W), got {tuple(primary.shape)}")
    if primary.numel() == 0:
        raise InputError(f"primary: expected a non-empty image, got shape {tuple(primary.shape)}")
    if not bool(torch.isfinite(primary).all()):
        raise InputError("primary: expected finite values I/I0 in [0, 1], got NaN or infinite values")
    lo, hi = float(primary.min()), float(primary.max())
    if lo < -_PRIMARY_TOLERANCE or hi > 1 + _PRIMARY_TOLERANCE:
        raise InputError(
            f"primary: expected transmission I/I0 in [0, 1] (a line integral needs exp(−x) first), "
            f"got values in [{lo:.6g}, {hi:.6g}]"
        )
    squeeze = primary.ndim == 2
    if squeeze:
        primary = primary.unsqueeze(0)
    return primary.clamp(0.0, 1.0), squeeze


def _validate_spacing(pixel_spacing_mm: object) -> tuple[float, float]:
    """``(dy, dx)`` in mm from a float or a pair."""
    values = pixel_spacing_mm if isinstance(pixel_spacing_mm, (tuple, list)) else (pixel_spacing_mm,) * 2
    if len(values) != 2 or not all(_is_real(v) and math.isfinite(v) and v > 0 for v in values):
        raise InputError(
            f"pixel_spacing_mm: expected a positive finite spacing in mm or a pair (dy, dx), got {pixel_spacing_mm!r}"
        )
    return (float(values[0]), float(values[1]))


def _resolve_generator(
    seed: int | None, generator: torch.Generator | None, device: torch.device
) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise InputError("seed: expected either seed or generator, got both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed: expected a non-negative integer or None, got {seed!r}")
        return torch.Generator(device=device).manual_seed(seed)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise InputError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        gen_device = torch.device(generator.device)
        if gen_device.type != device.type or (gen_device.index or 0) != (device.index or 0):
            raise InputError(
                f"generator: expected a generator on the primary's device ({device}), got one on {gen_device}"
            )
    return generator


# --------------------------------------------------------------------------------------------------------------
# Stages


def _reflect_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of ``[-pad, n + pad)`` mirrored into ``[0, n)`` without repeating the edge (``'reflect'``)."""
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def _gaussian_kernel(sigma_px: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(_TRUNCATE_SIGMAS * sigma_px))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (x / sigma_px) ** 2)
    return (k / k.sum()).to(dtype)


def _blur_axis(x: torch.Tensor, sigma_px: float, dim: int) -> torch.Tensor:
    """Gaussian blur of ``(N, H, W)`` along ``dim`` (1 or 2) with reflect padding; sigma in pixels."""
    if sigma_px <= 0:
        return x
    kernel = _gaussian_kernel(sigma_px, x.dtype, x.device)
    radius = (kernel.numel() - 1) // 2
    n = x.shape[dim]
    if n <= _MATRIX_MAX_SIZE and kernel.numel() > _SHIFT_ADD_MAX_TAPS // 4:
        # short axes (scatter's coarse grid): the blur as an n × n matrix, one matmul forward and back
        rows = torch.arange(n, device=x.device)[:, None]
        cols = _reflect_index(n, radius, x.device)[rows + torch.arange(kernel.numel(), device=x.device)]
        matrix = torch.zeros(n, n, dtype=x.dtype, device=x.device)
        matrix.index_put_((rows.expand_as(cols), cols), kernel.expand_as(cols), accumulate=True)
        return (x.movedim(dim, -1) @ matrix.T).movedim(-1, dim)
    padded = x.index_select(dim, _reflect_index(n, radius, x.device))
    if kernel.numel() <= _SHIFT_ADD_MAX_TAPS:  # short kernels: a few fused passes beat conv1d's reshapes
        weights = kernel.tolist()
        out = padded.narrow(dim, 0, n) * weights[0]
        for i in range(1, len(weights)):
            out.add_(padded.narrow(dim, i, n), alpha=weights[i])
        return out
    moved = padded.movedim(dim, -1)
    shape = moved.shape
    out = F.conv1d(moved.reshape(-1, 1, shape[-1]), kernel.view(1, 1, -1))
    return out.reshape(*shape[:-1], -1).movedim(-1, dim)


def gaussian_blur(
    image: torch.Tensor, pixel_spacing_mm: float | tuple[float, float], fwhm_mm: float | tuple[float, float]
) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (the detector PSF).

    Args:
        image: ``(..., H, W)`` float tensor.
        pixel_spacing_mm: ``(dy, dx)`` mm, or one spacing for both axes.
        fwhm_mm: full width at half maximum of the Gaussian at the detector, mm, for both axes or per axis
            ``(along rows, along cols)``; 0 leaves that axis unchanged. The kernel is the Gaussian sampled at
            pixel centres, truncated at 4 σ and normalised to sum 1 (the total signal is preserved).

    Returns:
        The blurred image, same shape and dtype.
    """
    dy, dx = _validate_spacing(pixel_spacing_mm)
    fy, fx = fwhm_mm if isinstance(fwhm_mm, tuple) else (fwhm_mm, fwhm_mm)
    for value in (fy, fx):
        if not _is_real(value) or not math.isfinite(value) or value < 0:
            raise InputError(f"fwhm_mm: expected a finite FWHM ≥ 0 in mm, got {fwhm_mm!r}")
    if image.ndim < 2:
        raise InputError(f"image: expected shape (..., H, W), got {tuple(image.shape)}")
    shape = image.shape
    x = image.reshape(-1, *shape[-2:])
    x = _blur_axis(x, fy / FWHM_PER_SIGMA / dy, 1)
    x = _blur_axis(x, fx / FWHM_PER_SIGMA / dx, 2)
    return x.reshape(shape)


def scatter_image(
    primary: torch.Tensor,
    pixel_spacing_mm: float | tuple[float, float],
    scatter_to_primary: float,
    sigma_mm: float,
) -> torch.Tensor:
    """The low-frequency scatter reaching the detector, in the same units as ``primary``.

    Definition, per image ``P`` of the batch (means over all its pixels)::

        B = G_σ ∗ P                                  (broad Gaussian blur of the primary, reflect padding)
        S = scatter_to_primary · mean(P) · B / mean(B)

    so ``mean(S) = scatter_to_primary · mean(P)`` exactly and ``S`` follows the primary's low-frequency
    distribution (more scatter behind thin parts, none from a blocked field). ``G_σ`` is evaluated cheaply:
    ``P`` is area-averaged onto a grid whose pixels are about σ/3 wide, blurred there, and bilinearly upsampled.

    Args:
        primary: ``(B, H, W)`` primary signal at the detector (≥ 0).
        pixel_spacing_mm: ``(dy, dx)`` mm, or one spacing for both axes.
        scatter_to_primary: SPR, mean scatter / mean primary (≥ 0).
        sigma_mm: standard deviation of the scatter kernel at the detector, mm (> 0).

    Returns:
        ``(B, H, W)`` scatter, same dtype; zeros for an all-zero primary or ``scatter_to_primary = 0``.
    """
    dy, dx = _validate_spacing(pixel_spacing_mm)
    if scatter_to_primary == 0:
        return torch.zeros_like(primary)
    h, w = primary.shape[-2:]
    sig_y, sig_x = sigma_mm / dy, sigma_mm / dx  # pixels
    fy = max(1, int(sig_y / _SCATTER_COARSE_SIGMA_PX))
    fx = max(1, int(sig_x / _SCATTER_COARSE_SIGMA_PX))
    ch, cw = math.ceil(h / fy), math.ceil(w / fx)
    x = primary.reshape(-1, 1, h, w)
    coarse = F.adaptive_avg_pool2d(x, (ch, cw)) if (ch, cw) != (h, w) else x
    coarse = coarse[:, 0]
    coarse = _blur_axis(coarse, sig_y * ch / h, 1)
    coarse = _blur_axis(coarse, sig_x * cw / w, 2)
    blurred = coarse.unsqueeze(1)
    if (ch, cw) != (h, w):
        blurred = F.interpolate(blurred, size=(h, w), mode="bilinear", align_corners=False)
    blurred = blurred.reshape(primary.shape)
    mean_p = primary.mean(dim=(-2, -1), keepdim=True)
    mean_b = blurred.mean(dim=(-2, -1), keepdim=True)
    scale = torch.where(
        mean_b > 0, scatter_to_primary * mean_p / mean_b.clamp_min(torch.finfo(mean_b.dtype).tiny), 0
    )
    return blurred * scale


def heel_profile(
    shape: tuple[int, int],
    heel_effect: float,
    axis: Literal["rows", "cols"] = "rows",
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Relative incident fluence ``1 + heel_effect·t`` of the heel effect, shape ``(H, W)``.

    ``t`` runs linearly from −1/2 at the first row (``axis="rows"``) or column (``"cols"``) to +1/2 at the last,
    so the fluence is 1 at the detector centre and the last-to-first edge ratio is
    ``(1 + heel_effect/2) / (1 − heel_effect/2)``.
    """
    h, w = shape
    n = h if axis == "rows" else w
    t = torch.arange(n, dtype=torch.float64, device=device)
    t = (t - (n - 1) / 2) / (n - 1) if n > 1 else torch.zeros_like(t)
    profile = (1.0 + heel_effect * t).to(dtype)
    return profile[:, None].expand(h, w) if axis == "rows" else profile[None, :].expand(h, w)


def collimator_mask(
    collimator: Collimator,
    shape: tuple[int, int],
    pixel_spacing_mm: float | tuple[float, float],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Transmission of the collimator at each pixel centre, ``(H, W)`` in ``[leakage, 1]``.

    With ``d`` the signed distance (mm) of the pixel centre from the field's edge (negative inside), the
    transmission is ``leakage + (1 − leakage)·clamp(1/2 − d/edge_width_mm, 0, 1)``: 1 inside, ``leakage``
    outside, a linear ramp of ``edge_width_mm`` centred on the edge (a hard step when it is 0; a pixel centre
    exactly on the edge is inside).
    """
    dy, dx = _validate_spacing(pixel_spacing_mm)
    h, w = shape
    y = (torch.arange(h, dtype=torch.float64, device=device) - (h - 1) / 2) * dy - collimator.center_mm[1]
    x = (torch.arange(w, dtype=torch.float64, device=device) - (w - 1) / 2) * dx - collimator.center_mm[0]
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    if isinstance(collimator, CircularCollimator):
        d = torch.sqrt(xx**2 + yy**2) - collimator.radius_mm
    else:
        qx = xx.abs() - collimator.half_width_mm
        qy = yy.abs() - collimator.half_height_mm
        outside = torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2)
        d = outside + torch.maximum(qx, qy).clamp_max(0)
    if collimator.edge_width_mm > 0:
        t = (0.5 - d / collimator.edge_width_mm).clamp(0.0, 1.0)
    else:
        t = (d <= 0).to(torch.float64)
    return (collimator.leakage + (1.0 - collimator.leakage) * t).to(dtype)


def quantize(image: torch.Tensor, bit_depth: int, value_range: tuple[float, float]) -> torch.Tensor:
    """Round ``image`` to the nearest of ``2**bit_depth`` equally spaced levels over ``value_range``.

    Level ``k`` is ``low + k·(high − low)/(2**bit_depth − 1)``; values outside ``[low, high]`` clip to the end
    levels (saturation). Returns float values (same dtype) on the levels, so the error inside the range is at
    most half a level (for bit depths above float32's 24-bit mantissa the levels themselves are rounded).
    """
    if isinstance(bit_depth, bool) or not isinstance(bit_depth, int) or not 1 <= bit_depth <= 32:
        raise InputError(f"bit_depth: expected an integer in 1..32, got {bit_depth!r}")
    low, high = float(value_range[0]), float(value_range[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InputError(f"value_range: expected finite (low, high) with low < high, got {value_range!r}")
    n = 2**bit_depth - 1
    step = (high - low) / n
    k = torch.round((image.double().clamp(low, high) - low) / step).clamp(0, n)
    return (low + k * step).to(image.dtype)


# --------------------------------------------------------------------------------------------------------------
# The pipeline


def simulate_detector(
    primary: torch.Tensor,
    pixel_spacing_mm: float | tuple[float, float],
    model: DetectorModel = DetectorModel(),
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Turn ideal primary transmission images into realistic detector images.

    Args:
        primary: ``(B, H, W)`` or ``(H, W)`` float tensor of ``I/I0`` in ``[0, 1]``: the fraction of the
            unattenuated beam reaching each pixel (values up to 1e-5 outside are clamped).
        pixel_spacing_mm: detector pixel spacing ``(dy, dx)`` in mm (row spacing, column spacing), or one value.
        model: the detector; the default ``DetectorModel()`` is a mobile C-arm flat panel.
        seed: seed of a fresh generator on the primary's device; the same seed gives bit-identical output.
        generator: a ``torch.Generator`` on the primary's device to draw the noise from (advanced by the call).
            Without ``seed`` and ``generator``, torch's default generator is used.

    Returns:
        Images of the input's shape, dtype and device: ``−ln(I/I0)`` (dimensionless, ``output="log"``) or
        ``I/I0`` (``output="intensity"``), where ``I/I0`` is the detected signal relative to the nominal open
        beam (``photons_per_pixel`` quanta), which may exceed 1 through scatter, noise and the heel effect;
        quantised to ``model.output_range`` when ``bit_depth`` is set.

    Raises:
        InputError: naming the offending argument, for a bad primary, spacing, model, seed or generator.
    """
    if not isinstance(model, DetectorModel):
        raise InputError(f"model: expected a DetectorModel, got {type(model).__name__}")
    x, squeeze = _validate_primary(primary)
    spacing = _validate_spacing(pixel_spacing_mm)
    gen = _resolve_generator(seed, generator, x.device)
    dtype, device = x.dtype, x.device
    h, w = x.shape[-2:]

    # 1. Incident fluence relative to the nominal open beam: heel effect × collimator transmission.
    fluence: torch.Tensor | None = None
    if model.heel_effect != 0:
        fluence = heel_profile((h, w), model.heel_effect, model.heel_axis, dtype=dtype, device=device)
    if model.collimator is not None:
        mask = collimator_mask(model.collimator, (h, w), spacing, dtype=dtype, device=device)
        fluence = mask if fluence is None else fluence * mask
    signal = x if fluence is None else x * fluence

    # 2. Primary + scatter (both from the same incident beam).
    if model.scatter_to_primary > 0:
        signal = signal + scatter_image(signal, spacing, model.scatter_to_primary, model.scatter_sigma_mm)

    # 3. Quantum noise on the expected counts; back to units of the open beam.
    if model.photons_per_pixel is not None:
        n0 = float(model.photons_per_pixel)
        expected = signal * n0
        if model.noise == "poisson":
            counts = torch.poisson(expected, generator=gen)
        else:
            z = torch.randn(expected.shape, generator=gen, dtype=dtype, device=device)
            counts = expected + expected.sqrt() * z
        signal = counts / n0

    # 4. Detector blur (acts on the noisy image: scintillator light spread correlates the noise).
    if model.psf_fwhm_mm > 0:
        signal = gaussian_blur(signal, spacing, model.psf_fwhm_mm)

    # 5. Log transform.
    out = -torch.log(signal.clamp_min(model.floor)) if model.output == "log" else signal

    # 6. Quantisation of the stored image.
    if model.bit_depth is not None:
        out = quantize(out, model.bit_depth, model.output_range)

    return out[0] if squeeze else out
