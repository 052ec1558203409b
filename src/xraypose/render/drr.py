"""Digitally reconstructed radiographs: the public rendering API.

:func:`render` is the functional core (a density volume, its affine, a :class:`~xraypose.geometry.Camera`);
:class:`DRR` binds a CT and a detector once and renders poses, caching the attenuation volume and its
pyramid. Both return line integrals ``∫ μ ds`` (dimensionless when μ is in 1/mm), or Beer–Lambert intensity.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import GeometryError, InputError
from ..geometry.camera import Camera, Intrinsics, validate_pixels, validate_pose
from ._cache import DerivedCache
from .engine import (
    BACKENDS,
    METHODS,
    Backend,
    Method,
    _needs_create_graph,
    box_intersection,
    integrate_camera,
    integrate_rays,
    support_box,
)
from .transfer import Transfer

__all__ = [
    "DRR",
    "Output",
    "downsample_volume",
    "normalize_display",
    "pyramid_factors",
    "random_patch_pixels",
    "render",
]

Output = Literal["line_integral", "intensity"]
OUTPUTS: tuple[str, ...] = ("line_integral", "intensity")


def _validate_density(density: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if not isinstance(density, torch.Tensor):
        raise InputError(
            f"density: expected a torch.Tensor (I, J, K) or (C, I, J, K), got {type(density).__name__}"
        )
    if not density.is_floating_point():
        raise InputError(f"density: expected a float32 or float64 tensor, got dtype {density.dtype}")
    squeeze = density.ndim == 3
    if squeeze:
        density = density.unsqueeze(0)
    if density.ndim != 4:
        raise InputError(f"density: expected shape (I, J, K) or (C, I, J, K), got {tuple(density.shape)}")
    if min(density.shape[1:]) < 2:
        raise InputError(
            f"density: every spatial axis needs at least 2 voxels, got {tuple(density.shape[1:])}"
        )
    return density, squeeze


def _validate_affine(affine: torch.Tensor) -> torch.Tensor:
    if not isinstance(affine, torch.Tensor) or affine.shape != (4, 4) or not affine.is_floating_point():
        got = tuple(affine.shape) if isinstance(affine, torch.Tensor) else type(affine).__name__
        raise InputError(f"affine: expected a floating (4, 4) voxel-to-world matrix, got {got}")
    if not bool(torch.isfinite(affine).all()):
        raise InputError("affine: contains NaN or infinite values")
    spacing = affine[:3, :3].norm(dim=0)
    if bool((spacing <= 0).any()) or abs(float(torch.linalg.det(affine[:3, :3].double()))) < 1e-12:
        raise InputError(f"affine: zero or degenerate voxel spacing {spacing.tolist()} mm")
    return affine


# A pyramid level may be used while its voxels are at most this many detector-pixel footprints wide. A real
# detector element integrates over its area, so each DRR pixel "sees" a box of about one footprint; averaging
# the volume over boxes up to 1.5 footprints keeps the image within a few tenths of a percent of the full-
# resolution render (measured in benchmarks/render.py) at a fraction of the cost.
MULTIRES_FOOTPRINT_RATIO = 1.5


def pyramid_factors(
    spacing: tuple[float, float, float], footprint_mm: float, ratio: float = MULTIRES_FOOTPRINT_RATIO
) -> tuple[int, int, int]:
    """Per-axis power-of-two downsampling factors whose voxels stay within ``ratio`` pixel footprints.

    Args:
        spacing: voxel spacing per index axis, mm.
        footprint_mm: the detector pixel's footprint at the volume centre (pixel spacing × source-to-centre
            / source-to-detector distance), mm.
        ratio: largest allowed voxel size in footprints.
    """
    factors = []
    for s in spacing:
        f = 1
        while s * f * 2 <= ratio * footprint_mm * (1 + 1e-6):
            f *= 2
        factors.append(f)
    return tuple(factors)  # type: ignore[return-value]


def downsample_volume(
    density: torch.Tensor, affine: torch.Tensor, factors: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool a ``(C, I, J, K)`` volume by integer ``factors`` and update its affine.

    New voxel ``i'`` is the mean of old voxels ``f·i' … f·i' + f − 1`` (partial blocks at the end average what
    they contain), so its centre is at old index ``f·i' + (f − 1)/2``.
    """
    if factors == (1, 1, 1):
        return density, affine
    pooled = F.avg_pool3d(
        density.unsqueeze(0), kernel_size=factors, stride=factors, ceil_mode=True, count_include_pad=False
    )[0]
    return pooled, affine @ _block_centre_matrix(factors, affine)


def _block_centre_matrix(factors: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
    """Index map of a pooled level: new voxel ``i'`` is centred at old index ``f·i' + (f − 1)/2``."""
    scale = torch.eye(4, dtype=like.dtype, device=like.device)
    for a, f in enumerate(factors):
        scale[a, a] = f
        scale[a, 3] = (f - 1) / 2
    return scale


# pyramid levels, support boxes and classified volumes of every level, physics model and transfer in use
_DERIVED = DerivedCache(capacity=32, max_bytes=2 << 30)


def _pyramid_level(
    density: torch.Tensor, affine: torch.Tensor, factors: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached :func:`downsample_volume`."""
    if factors == (1, 1, 1):
        return density, affine
    pooled = _DERIVED.get(density, ("level", factors), lambda: downsample_volume(density, affine, factors)[0])
    return pooled, affine @ _block_centre_matrix(factors, affine)


def _pixel_footprint(camera: Camera, affine: torch.Tensor, shape: tuple[int, ...]) -> float:
    """Pixel footprint (mm) at the volume centre, pixel size × (source-to-centre distance) / sdd, for the
    closest of the views (the finest footprint wins)."""
    k = camera.intrinsics
    center = affine[:3, :3] @ (torch.tensor(shape[-3:], dtype=affine.dtype, device=affine.device) - 1) / 2
    center = center + affine[:3, 3]
    src = camera.source_world().detach().to(affine.dtype)
    dist = max(float((src - center).norm(dim=-1).min()), 1e-3)
    return min(k.dx, k.dy) * dist / k.sdd


def render(
    density: torch.Tensor,
    affine: torch.Tensor,
    camera: Camera,
    *,
    method: Method = "trilinear",
    step_mm: float | None = None,
    n_samples: int | None = None,
    pixels: torch.Tensor | None = None,
    multires: bool | None = None,
    backend: Backend = "auto",
    output: Output = "line_integral",
    transfer: Transfer | None = None,
) -> torch.Tensor:
    """Render DRRs of a volume seen by a batch of cameras.

    Args:
        density: ``(I, J, K)`` or ``(C, I, J, K)`` values per voxel, e.g. linear attenuation in 1/mm (see
            :func:`xraypose.io.hu_to_mu`); several channels are integrated in one pass.
        affine: ``(4, 4)`` voxel-index → world (RAS, mm) matrix of ``density``.
        camera: detector intrinsics and ``B`` poses (camera-to-world).
        method: ``"siddon"`` — exact radiological path through voxel cells; ``"trilinear"`` — ray marching on
            the trilinear interpolant, limited to the ray's entry and exit of the volume.
        step_mm: trilinear sample spacing along each ray (mm); default: the geometric mean of the voxel
            spacing of the level rendered (about one sample per voxel crossed).
        n_samples: trilinear samples per ray inside the volume (overrides ``step_mm``).
        pixels: render only these detector pixels: flat indices ``row * cols + col`` as ``(N,)`` or ``(B, N)``
            (see :func:`random_patch_pixels`); cost is proportional to the rays rendered.
        multires: render from a coarser pyramid level (2× average pooling per axis) while its voxels stay
            within 1.5 detector-pixel footprints at the volume centre (see ``MULTIRES_FOOTPRINT_RATIO``).
            ``None`` (default): on for trilinear, off for Siddon (which stays exact).
        backend: ``"auto"`` (fused Numba kernels on CPU; Triton for trilinear on CUDA when installed; PyTorch
            otherwise, and inside :func:`~xraypose.render.double_differentiable`), ``"fused"`` or ``"reference"``.
        output: ``"line_integral"`` (``∫ μ ds``) or ``"intensity"`` (Beer–Lambert ``exp(−∫ μ ds)``).
        transfer: a :class:`~xraypose.render.transfer.Transfer` mapping a scalar ``density`` (e.g. HU)
            to ``C`` channels; trilinear applies it at every sample (post-classification, one pass over the
            rays for all channels), Siddon voxel by voxel. Used by the physics renderer for material channels.
    Returns:
        ``(B, rows, cols)`` (or ``(B, N)`` for ``pixels``), with a channel axis after ``B`` when ``density``
        has one or a ``transfer`` is given. Differentiable w.r.t. ``camera.pose`` and ``density``.
    """
    density, squeeze = _validate_density(density)
    affine = _validate_affine(affine)
    if not isinstance(camera, Camera):
        raise InputError(f"camera: expected a xraypose Camera, got {type(camera).__name__}")
    if method not in METHODS:
        raise InputError(f"method: expected one of {METHODS}, got {method!r}")
    if backend not in BACKENDS:
        raise InputError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if output not in OUTPUTS:
        raise InputError(f"output: expected one of {OUTPUTS}, got {output!r}")
    if step_mm is not None and not (math.isfinite(step_mm) and step_mm > 0):
        raise InputError(f"step_mm: expected a positive length in mm, got {step_mm!r}")
    if n_samples is not None and (not isinstance(n_samples, int) or n_samples < 1):
        raise InputError(f"n_samples: expected a positive integer, got {n_samples!r}")
    if transfer is not None:
        if not isinstance(transfer, Transfer):
            raise InputError(
                f"transfer: expected a Transfer (e.g. TransferFunction), got {type(transfer).__name__}"
            )
        if density.shape[0] != 1:
            raise InputError(
                f"density: a transfer function maps one scalar channel, got {density.shape[0]} channels"
            )
        squeeze = False
    dtype = density.dtype
    device = density.device
    affine = affine.to(dtype=dtype, device=device)
    pose = camera.pose.to(device)
    intr = camera.intrinsics

    if multires is None:
        multires = method == "trilinear"
    if multires:
        spacing = tuple(float(s) for s in affine[:3, :3].norm(dim=0))
        factors = pyramid_factors(spacing, _pixel_footprint(camera, affine.detach(), tuple(density.shape)))
        density, affine = _pyramid_level(density, affine, factors)
    shape = tuple(int(s) for s in density.shape[1:])

    # Rays in world, then in voxel-index coordinates of the level rendered.
    if pixels is not None:
        pixels = validate_pixels(pixels, intr).to(device)
        if pixels.ndim == 2 and pixels.shape[0] != pose.shape[0]:
            raise InputError(
                f"pixels: a (B, N) index tensor needs B = {pose.shape[0]} rows, got {pixels.shape[0]}"
            )
        if pixels.ndim not in (1, 2):
            raise InputError(f"pixels: expected shape (N,) or (B, N), got {tuple(pixels.shape)}")
    det_cam = intr.pixel_points(pixels, dtype=dtype, device=device)
    if det_cam.ndim == 2:
        det_cam = det_cam.unsqueeze(0)
    pose = pose.to(dtype)
    inv = torch.linalg.inv(affine)
    # camera mm → voxel index of the level rendered: a source at M[:, :, 3], ray directions M[:, :, :3] @ p
    M = (inv @ pose)[:, :3, :]
    lo, hi = -0.5, torch.tensor(shape, dtype=dtype, device=device) - 0.5
    inside = ((M[:, :, 3].detach() > lo) & (M[:, :, 3].detach() < hi)).all(-1)
    if bool(inside.any()):
        b = int(inside.nonzero()[0, 0])
        raise GeometryError(
            f"camera pose {b}: the X-ray source at {pose[b, :3, 3].detach().tolist()} mm (world) lies inside "
            "the volume; move the source outside the CT"
        )
    # Empty-space skipping: integrate only where the volume is non-zero (exact: zeros add nothing).
    if transfer is not None and method == "siddon":
        # piecewise-constant voxels: classifying each voxel first is exact (and cached for a fixed volume)
        level = density
        density = _DERIVED.get(level, ("classified", transfer), lambda: transfer.apply_to_volume(level))
        transfer = None
    if transfer is None:
        support = _DERIVED.get(density, "support", lambda: support_box(density))
    else:
        support = _DERIVED.get(density, ("support", transfer), lambda: _transfer_support(density, transfer))
    step = step_mm if step_mm is not None else float(torch.prod(affine[:3, :3].norm(dim=0)) ** (1 / 3))
    n_rays = det_cam.shape[1]
    if _use_fused(backend, density, affine):
        box = support if support is not None else ((-0.5,) * 3, tuple(n - 0.5 for n in shape))
        line = integrate_camera(
            density,
            M,
            det_cam,
            box,
            affine[:3, :3],
            method=method,
            step_mm=step,
            n_samples=n_samples,
            transfer=transfer,
        ).movedim(-1, 1)  # (B, C, N)
    else:
        src_r = M[:, None, :, 3].expand(-1, n_rays, -1).reshape(-1, 3)
        dir_r = (det_cam @ M[:, :, :3].transpose(-1, -2)).expand(M.shape[0], -1, -1).reshape(-1, 3)
        t0, t1 = box_intersection(src_r, dir_r, shape, support)  # type: ignore[arg-type]
        ray_mm = (dir_r @ affine[:3, :3].T).norm(dim=-1)  # mm per unit t
        nsamp = None
        if method == "trilinear":
            chord = ((t1 - t0) * ray_mm).detach()
            if n_samples is not None:
                nsamp = torch.full_like(chord, n_samples, dtype=torch.int32)
                nsamp[chord <= 0] = 0
            else:
                nsamp = torch.ceil(chord / step).to(torch.int32)
        integral = integrate_rays(
            density, src_r, dir_r, t0, t1, method=method, nsamp=nsamp, backend=backend, transfer=transfer
        )
        line = (integral * ray_mm[:, None]).reshape(pose.shape[0], n_rays, -1).movedim(-1, 1)  # (B, C, N)
    if pixels is None:
        line = line.reshape(pose.shape[0], -1, intr.rows, intr.cols)
    if squeeze:
        line = line[:, 0]
    if output == "intensity":
        return torch.exp(-line)
    return line


def _transfer_support(
    density: torch.Tensor, transfer: Transfer
) -> tuple[tuple[float, float, float], tuple[float, float, float]] | None:
    """Empty-space box for a scalar volume read through ``transfer``: voxels at or below the transfer's
    all-zero range cannot make a non-zero sample, since trilinear values stay within their corners' range."""
    below = transfer.zero_below
    if below is None:
        return None
    return support_box((density > below).to(density.dtype))


def _use_fused(backend: str, density: torch.Tensor, affine: torch.Tensor) -> bool:
    """Whether the fused CPU kernels (with in-kernel ray set-up) serve this call."""
    if backend == "reference":
        return False
    if backend == "fused":
        if density.device.type != "cpu":
            raise InputError(f"backend='fused' runs on CPU tensors; got a volume on {density.device}")
        return True
    # auto: CPU, first-order gradients, and a constant affine (the fused path does not differentiate it)
    return density.device.type == "cpu" and not _needs_create_graph() and not affine.requires_grad


def random_patch_pixels(
    intrinsics: Intrinsics,
    n_patches: int,
    patch_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Flat pixel indices of ``n_patches`` random square patches (``patch_size²`` pixels each), ``(N,)``.

    Patches lie fully inside the detector; overlapping pixels are kept once, sorted.
    """
    if patch_size < 1 or patch_size > min(intrinsics.rows, intrinsics.cols):
        raise InputError(
            f"patch_size: expected 1..{min(intrinsics.rows, intrinsics.cols)} pixels, got {patch_size}"
        )
    if n_patches < 1:
        raise InputError(f"n_patches: expected a positive count, got {n_patches}")
    r0 = torch.randint(0, intrinsics.rows - patch_size + 1, (n_patches,), generator=generator)
    c0 = torch.randint(0, intrinsics.cols - patch_size + 1, (n_patches,), generator=generator)
    off = torch.arange(patch_size)
    rr = r0[:, None, None] + off[None, :, None]
    cc = c0[:, None, None] + off[None, None, :]
    return torch.unique(rr * intrinsics.cols + cc).to(device)


def normalize_display(image: torch.Tensor, low: float = 0.5, high: float = 99.5) -> torch.Tensor:
    """Map an image (…, H, W) to [0, 1] by its ``low``–``high`` percentile window (per image)."""
    flat = image.detach().reshape(*image.shape[:-2], -1).float()
    lo = torch.quantile(flat, low / 100, dim=-1, keepdim=True).unsqueeze(-1)
    hi = torch.quantile(flat, high / 100, dim=-1, keepdim=True).unsqueeze(-1)
    return ((image - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


class DRR:
    """A CT bound to a detector: render DRRs for poses, re-using the prepared volume.

    Args:
        density: ``(I, J, K)`` or ``(C, I, J, K)`` attenuation (1/mm) — e.g. ``hu_to_mu(volume.data)``.
        affine: ``(4, 4)`` voxel → world (RAS mm).
        intrinsics: the detector.
        method, step_mm, n_samples, multires, backend, output, transfer: defaults for :func:`render`.
    """

    def __init__(
        self,
        density: torch.Tensor,
        affine: torch.Tensor,
        intrinsics: Intrinsics,
        *,
        method: Method = "trilinear",
        step_mm: float | None = None,
        n_samples: int | None = None,
        multires: bool | None = None,
        backend: Backend = "auto",
        output: Output = "line_integral",
        transfer: Transfer | None = None,
    ) -> None:
        self.density, _ = _validate_density(density)
        self._squeeze = density.ndim == 3
        self.affine = _validate_affine(affine).to(self.density.dtype)
        if not isinstance(intrinsics, Intrinsics):
            raise InputError(f"intrinsics: expected Intrinsics, got {type(intrinsics).__name__}")
        self.intrinsics = intrinsics
        self.options = dict(
            method=method,
            step_mm=step_mm,
            n_samples=n_samples,
            multires=multires,
            backend=backend,
            output=output,
            transfer=transfer,
        )

    @classmethod
    def from_volume(cls, volume, intrinsics: Intrinsics, *, attenuation=None, **options) -> DRR:
        """Bind a :class:`xraypose.io.Volume` (HU) converted to attenuation by ``attenuation`` (default model)."""
        from ..io.attenuation import AttenuationModel

        model = AttenuationModel() if attenuation is None else attenuation
        return cls(model(volume.data), volume.affine, intrinsics, **options)

    def __call__(
        self, pose: torch.Tensor, *, pixels: torch.Tensor | None = None, **overrides
    ) -> torch.Tensor:
        """Render ``pose`` (``(B, 4, 4)`` camera-to-world); keyword overrides replace the bound defaults."""
        pose = validate_pose(pose)
        opts = {**self.options, **overrides}
        density = self.density[0] if self._squeeze else self.density
        return render(density, self.affine, Camera(self.intrinsics, pose), pixels=pixels, **opts)
