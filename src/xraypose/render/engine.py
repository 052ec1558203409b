"""The ray engine: one place where rays are clipped to the volume and their line integrals computed.

Every renderer of xraypose goes through :func:`integrate_rays`. It takes rays in continuous voxel-index
coordinates and returns, per ray and channel, ``∫_{t0}^{t1} vol(src + t·dirv) dt`` (the caller scales by the
ray length in mm). Two interchangeable backends compute it:

* ``"fused"`` — Numba kernels (:mod:`.trilinear`, :mod:`.siddon`), multithreaded over rays, with their own
  analytic backward (pose and volume gradients). CPU tensors only.
* ``"reference"`` — readable pure PyTorch, differentiated by autograd (also twice); runs on any device.

``backend="auto"`` picks ``"fused"`` for CPU tensors unless a higher-order gradient is requested, Triton
kernels (:mod:`._triton`) for trilinear marching on CUDA when Triton is installed, and ``"reference"``
elsewhere (see ``docs/design.md`` for why the CPU kernels are Numba).
"""

from __future__ import annotations

import threading
from typing import Literal

import numpy as np
import torch

from ..errors import InputError
from . import _camera_rays
from . import siddon as _siddon
from . import trilinear as _trilinear
from ._cache import DerivedCache
from ._triton import TritonThreshold, TritonTrilinear, triton_available
from .transfer import ThresholdTransfer, Transfer

__all__ = ["Backend", "Method", "box_intersection", "integrate_camera", "integrate_rays", "support_box"]

Method = Literal["siddon", "trilinear"]
Backend = Literal["auto", "fused", "reference"]
METHODS: tuple[str, ...] = ("siddon", "trilinear")
BACKENDS: tuple[str, ...] = ("auto", "fused", "reference")


def box_intersection(
    src: torch.Tensor,
    dirv: torch.Tensor,
    shape: tuple[int, int, int],
    support: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters ``t0 ≤ t1`` where rays ``src + t·dirv`` cross a box in index space, clipped to [0, 1].

    The box is the whole volume ``[-½, n-½]³`` or, when given, ``support = (lo, hi)`` (index coordinates), the
    part of the volume outside which every value is zero (see :func:`support_box`). Differentiable w.r.t.
    ``src`` and ``dirv`` (piecewise, like the slab method it implements). Rays that miss get ``t0 = t1``.
    """
    if support is None:
        lo = torch.full((3,), -0.5, dtype=src.dtype, device=src.device)
        hi = torch.tensor(shape, dtype=src.dtype, device=src.device) - 0.5
    else:
        lo = torch.tensor(support[0], dtype=src.dtype, device=src.device)
        hi = torch.tensor(support[1], dtype=src.dtype, device=src.device)
    parallel = dirv == 0
    safe = torch.where(parallel, torch.ones_like(dirv), dirv)
    ta = (lo - src) / safe
    tb = (hi - src) / safe
    tmin = torch.minimum(ta, tb)
    tmax = torch.maximum(ta, tb)
    inside = (src >= lo) & (src <= hi)
    big = float("inf")
    # An axis the ray is parallel to does not bound t when the ray lies inside that slab, and empties the
    # interval when it does not.
    tmin = torch.where(parallel, torch.where(inside, -big, big), tmin)
    tmax = torch.where(parallel, torch.where(inside, big, -big), tmax)
    t0 = tmin.amax(-1).clamp(0.0, 1.0)
    t1 = tmax.amin(-1).clamp(0.0, 1.0)
    t1 = torch.maximum(t0, t1)
    return t0, t1


def support_box(vol: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]] | None:
    """Index-space box outside which ``vol`` (C, I, J, K) is zero in every channel, for empty-space skipping.

    The box spans the non-zero voxels' cells plus one voxel of margin (so trilinear ramps are kept), clipped
    to the volume's box. ``None`` when the volume has no zero margin worth skipping.
    """
    shape = vol.shape[1:]
    nz = (vol.detach() != 0).any(0)
    if not bool(nz.any()):
        return ((-0.5,) * 3, (-0.5,) * 3)  # type: ignore[return-value]
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = nz.any(dim=other).nonzero().squeeze(-1)
        lo.append(max(-0.5, float(idx[0]) - 1.5))
        hi.append(min(shape[axis] - 0.5, float(idx[-1]) + 1.5))
    full = all(lo_ == -0.5 for lo_ in lo) and all(h == n - 0.5 for h, n in zip(hi, shape, strict=True))
    return None if full else (tuple(lo), tuple(hi))  # type: ignore[return-value]


# kernel layouts (a permuted, padded copy per volume level and ray order) and their occupancy maps
_LAYOUTS = DerivedCache(capacity=24, max_bytes=3 << 30)


def _kernel_layout(vol: torch.Tensor, perm: tuple[int, ...], pad: bool) -> np.ndarray:
    """``vol`` permuted by ``perm`` (marching axis last), C-contiguous, padded for trilinear when ``pad``."""
    if not pad and perm == tuple(range(vol.ndim)) and vol.is_contiguous():
        return vol.detach().numpy()

    def make() -> np.ndarray:
        arr = np.ascontiguousarray(vol.detach().permute(*perm).numpy())
        return _trilinear.pad_volume(arr) if pad else arr

    return _LAYOUTS.get(vol, ("layout", perm, pad), make)


def _kernel_occupancy(
    vol: torch.Tensor, vperm: tuple[int, ...], vol_np: np.ndarray
) -> tuple[np.ndarray, int] | None:
    """Empty-space blocks of the padded kernel layout ``vol_np`` (cached with it); ``None`` (no skipping) for
    volumes being optimised, whose zeros change every step."""
    if vol.requires_grad:
        return None
    return _LAYOUTS.get(vol, ("occupancy", vperm), lambda: _trilinear.occupancy(vol_np))


def _marching_perm(extent: np.ndarray) -> list[int]:
    """Spatial-axis order putting the dominant marching axis (largest of ``extent``, per axis) last, so that
    rays stream through contiguous memory."""
    axis = int(np.argmax(extent)) if extent.size else 2
    return [a for a in (0, 1, 2) if a != axis] + [axis]


def _kernel_forward(method: str, vol_np, src, dirv, t0, t1, nsamp, tf=None, occ=None) -> np.ndarray:
    """Run the method's forward kernel → ``(R, C)`` t-integrals (``tf``: transfer-table arrays, trilinear;
    ``occ``: empty-space blocks of a plain trilinear volume)."""
    channels = vol_np.shape[0] if tf is None else tf[3]
    out = np.empty((src.shape[0], channels), dtype=vol_np.dtype)
    if method == "trilinear":
        _trilinear.trilinear_forward(vol_np, src, dirv, t0, t1, nsamp, out, tf, occ)
    else:
        _siddon.siddon_forward(vol_np, src, dirv, t0, t1, out)
    return out


def _kernel_ray_grads(
    method: str, vol_np, src, dirv, t0, t1, nsamp, go, tf=None, occ=None
) -> tuple[np.ndarray, ...]:
    """Gradients of ``Σ go · out`` w.r.t. ``src, dirv, t0, t1`` from the method's backward kernel."""
    gs = np.empty_like(src)
    gd = np.empty_like(dirv)
    g0 = np.empty_like(t0)
    g1 = np.empty_like(t1)
    if method == "trilinear":
        _trilinear.trilinear_backward(vol_np, src, dirv, t0, t1, nsamp, go, gs, gd, g0, g1, tf, occ)
    else:
        _siddon.siddon_backward(vol_np, src, dirv, t0, t1, go, gs, gd, g0, g1)
    return gs, gd, g0, g1


def _kernel_volume_grad(method: str, vol_np, vperm, src, dirv, t0, t1, nsamp, go, tf=None) -> torch.Tensor:
    """Gradient of ``Σ go · out`` w.r.t. the volume, back in the caller's axis order."""
    if method == "trilinear":
        shape = (vol_np.shape[0], *(n - 2 for n in vol_np.shape[1:]))  # unpadded
        gv = _trilinear.trilinear_backward_volume(shape, src, dirv, t0, t1, nsamp, go, tf, vol_np)
    else:
        gv = np.zeros(vol_np.shape, dtype=vol_np.dtype)
        _siddon.siddon_backward_volume(src, dirv, t0, t1, go, gv)
    return torch.from_numpy(gv).permute(*np.argsort(vperm).tolist()).contiguous()


class _FusedIntegral(torch.autograd.Function):
    @staticmethod
    def forward(ctx, method, vol, src, dirv, t0, t1, nsamp, transfer):  # type: ignore[override]
        perm = _marching_perm(dirv.detach().abs().mean(0).numpy() if dirv.shape[0] else np.zeros(0))
        vperm = (0, *(p + 1 for p in perm))
        dtype = vol.dtype
        vol_np = _kernel_layout(vol, vperm, pad=method == "trilinear")
        src_np = np.ascontiguousarray(src.detach().to(dtype)[:, list(perm)].numpy())
        dir_np = np.ascontiguousarray(dirv.detach().to(dtype)[:, list(perm)].numpy())
        t0_np = t0.detach().to(dtype).contiguous().numpy()
        t1_np = t1.detach().to(dtype).contiguous().numpy()
        n_np = nsamp.to(torch.int32).contiguous().numpy() if method == "trilinear" else None
        tf = transfer.kernel_spec(dtype) if transfer is not None else None
        occ = _kernel_occupancy(vol, vperm, vol_np) if method == "trilinear" and tf is None else None
        out = _kernel_forward(method, vol_np, src_np, dir_np, t0_np, t1_np, n_np, tf, occ)
        ctx.occ = occ
        ctx.tf = tf
        ctx.method = method
        ctx.perm = perm
        ctx.vperm = vperm
        ctx.arrays = (vol_np, src_np, dir_np, t0_np, t1_np, n_np)
        ctx.vol_shape = tuple(vol.shape)
        ctx.dtypes = (src.dtype, dirv.dtype, t0.dtype, t1.dtype)
        return torch.from_numpy(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        vol_np, src_np, dir_np, t0_np, t1_np, n_np = ctx.arrays
        go = np.ascontiguousarray(grad_out.detach().to(torch.from_numpy(vol_np[:0, 0, 0, 0]).dtype).numpy())
        inv = np.argsort(ctx.perm)
        need_vol, need_src, need_dir, need_t0, need_t1 = ctx.needs_input_grad[1:6]
        g_vol = g_src = g_dir = g_t0 = g_t1 = None
        if need_src or need_dir or need_t0 or need_t1:
            gs, gd, g0, g1 = _kernel_ray_grads(
                ctx.method, vol_np, src_np, dir_np, t0_np, t1_np, n_np, go, ctx.tf, ctx.occ
            )
            g_src = torch.from_numpy(gs[:, inv]).to(ctx.dtypes[0]) if need_src else None
            g_dir = torch.from_numpy(gd[:, inv]).to(ctx.dtypes[1]) if need_dir else None
            g_t0 = torch.from_numpy(g0).to(ctx.dtypes[2]) if need_t0 else None
            g_t1 = torch.from_numpy(g1).to(ctx.dtypes[3]) if need_t1 else None
        if need_vol:
            g_vol = _kernel_volume_grad(
                ctx.method, vol_np, ctx.vperm, src_np, dir_np, t0_np, t1_np, n_np, go, ctx.tf
            )
        return None, g_vol, g_src, g_dir, g_t0, g_t1, None, None


class _FusedCameraIntegral(torch.autograd.Function):
    """Rays built from a camera → voxel map inside the kernels; returns line integrals ``(B, N, C)`` in mm."""

    @staticmethod
    def forward(ctx, method, vol, M, pix, lo, hi, A, step, fixed_n, tf):  # type: ignore[override]
        dtype = vol.dtype
        M_np = M.detach().to(dtype).numpy()
        # dominant marching axis from the mean ray direction of each view
        perm = _marching_perm(np.abs(M_np[:, :, :3] @ pix.mean(axis=(0, 1))).sum(0))
        vperm = (0, *(p + 1 for p in perm))
        vol_np = _kernel_layout(vol, vperm, pad=method == "trilinear")
        cells = None
        if method == "siddon" and not vol.requires_grad:  # trilinear skips inside its kernels instead
            cells = _LAYOUTS.get(vol, ("cells", vperm), lambda: _siddon.cell_occupancy(vol_np))
        rays = _camera_rays.setup_rays(
            np.ascontiguousarray(M_np[:, perm, :]),
            pix,
            lo[perm],
            hi[perm],
            np.ascontiguousarray(A[:, perm]),
            step,
            fixed_n,
            cells,
        )
        src, dirv, t0, t1, _, _, ray_mm, nsamp = rays
        occ = _kernel_occupancy(vol, vperm, vol_np) if method == "trilinear" and tf is None else None
        out = _kernel_forward(method, vol_np, src, dirv, t0, t1, nsamp, tf, occ)
        ctx.occ = occ
        ctx.tf = tf
        ctx.method = method
        ctx.perm = perm
        ctx.vperm = vperm
        ctx.rays = rays
        ctx.vol_np = vol_np
        ctx.out = out
        ctx.pix = pix
        ctx.A = np.ascontiguousarray(A[:, perm])
        ctx.M_dtype = M.dtype
        B, N = M_np.shape[0], pix.shape[1]
        return torch.from_numpy(out * ray_mm[:, None]).reshape(B, N, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_line):  # type: ignore[override]
        src, dirv, t0, t1, _, _, ray_mm, nsamp = ctx.rays
        vol_np = ctx.vol_np
        g = np.ascontiguousarray(grad_line.detach().to(torch.from_numpy(ctx.out[:0]).dtype).numpy())
        g = g.reshape(src.shape[0], -1)
        go = np.ascontiguousarray(g * ray_mm[:, None])  # gradient w.r.t. the t-integral
        need_vol, need_M = ctx.needs_input_grad[1:3]
        g_vol = g_M = None
        if need_M:
            gs, gd, g0, g1 = _kernel_ray_grads(
                ctx.method, vol_np, src, dirv, t0, t1, nsamp, go, ctx.tf, ctx.occ
            )
            g_len = np.ascontiguousarray((g * ctx.out).sum(1))
            _camera_rays.fold_ray_gradients(ctx.rays, ctx.A, gs, gd, g0, g1, g_len)
            B, N = grad_line.shape[0], grad_line.shape[1]
            gM_perm = np.zeros((B, 3, 4), dtype=gs.dtype)
            gM_perm[:, :, 3] = gs.reshape(B, N, 3).sum(1)
            pix = np.broadcast_to(ctx.pix, (B, N, 3))
            gM_perm[:, :, :3] = np.einsum("bnj,bnk->bjk", gd.reshape(B, N, 3), pix)
            gM = np.empty_like(gM_perm)
            gM[:, ctx.perm, :] = gM_perm
            g_M = torch.from_numpy(gM).to(ctx.M_dtype)
        if need_vol:
            g_vol = _kernel_volume_grad(ctx.method, vol_np, ctx.vperm, src, dirv, t0, t1, nsamp, go, ctx.tf)
        return None, g_vol, g_M, None, None, None, None, None, None, None


def integrate_camera(
    vol: torch.Tensor,
    M: torch.Tensor,
    pixels_camera: torch.Tensor,
    box: tuple[tuple[float, float, float], tuple[float, float, float]],
    affine_linear: torch.Tensor,
    *,
    method: Method,
    step_mm: float,
    n_samples: int | None,
    transfer: Transfer | None = None,
) -> torch.Tensor:
    """Fused CPU path: line integrals (mm-weighted) of the rays of a camera, ``(B, N, C)``.

    Args:
        vol: ``(C, I, J, K)`` CPU volume.
        M: ``(B, 3, 4)`` camera-mm → voxel-index map (``affine⁻¹ · pose``); differentiable.
        pixels_camera: ``(N, 3)`` or ``(B, N, 3)`` pixel centres in camera mm (constants).
        box: ``(lo, hi)`` index-space box to integrate in (the volume box or its non-zero support).
        affine_linear: ``(3, 3)`` index → mm linear map (constant).
        step_mm, n_samples: trilinear sampling (``n_samples`` wins when given).
        transfer: map the scalar ``vol`` (one channel) to channels at each sample (trilinear); for Siddon the
            map is applied voxel by voxel first.
    """
    vol, transfer = _classify_for(method, vol, transfer)
    dtype = vol.dtype
    pix = pixels_camera.detach().to(dtype)
    if pix.ndim == 2:
        pix = pix.unsqueeze(0)
    pix_np = np.ascontiguousarray(pix.numpy())
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    lo = np.asarray(box[0], dtype=np_dtype)
    hi = np.asarray(box[1], dtype=np_dtype)
    A = np.ascontiguousarray(affine_linear.detach().to(dtype).numpy())
    tf = transfer.kernel_spec(dtype) if transfer is not None else None
    return _FusedCameraIntegral.apply(
        method, vol, M.to(dtype), pix_np, lo, hi, A, step_mm, n_samples or 0, tf
    )


def _classify_for(
    method: str, vol: torch.Tensor, transfer: Transfer | None
) -> tuple[torch.Tensor, Transfer | None]:
    """Check a transfer function's input and, for Siddon (piecewise-constant voxels), apply it per voxel."""
    if transfer is None:
        return vol, None
    if vol.shape[0] != 1:
        raise InputError(f"transfer: expects a scalar volume (one channel), got {vol.shape[0]} channels")
    if method == "siddon":
        return transfer.apply_to_volume(vol), None
    return vol, transfer


def _reference(
    method: str,
    vol: torch.Tensor,
    src: torch.Tensor,
    dirv: torch.Tensor,
    t0: torch.Tensor,
    t1: torch.Tensor,
    nsamp: torch.Tensor | None,
    chunk: int,
    transfer: Transfer | None = None,
) -> torch.Tensor:
    outs = []
    for start in range(0, src.shape[0], chunk):
        sl = slice(start, start + chunk)
        if method == "trilinear":
            assert nsamp is not None
            outs.append(
                _trilinear.trilinear_reference(vol, src[sl], dirv[sl], t0[sl], t1[sl], nsamp[sl], transfer)
            )
        else:
            outs.append(_siddon.siddon_reference(vol, src[sl], dirv[sl], t0[sl], t1[sl]))
    if not outs:
        return vol.new_zeros((0, vol.shape[0] if transfer is None else transfer.channels))
    return torch.cat(outs, 0)


def integrate_rays(
    vol: torch.Tensor,
    src: torch.Tensor,
    dirv: torch.Tensor,
    t0: torch.Tensor,
    t1: torch.Tensor,
    *,
    method: Method = "trilinear",
    nsamp: torch.Tensor | None = None,
    backend: Backend = "auto",
    chunk: int = 4096,
    transfer: Transfer | None = None,
) -> torch.Tensor:
    """Integrate ``vol`` (C, I, J, K) along rays given in voxel-index coordinates → ``(R, C)``.

    Args:
        vol: values per voxel and channel (e.g. attenuation in 1/mm), float32 or float64.
        src, dirv: ``(R, 3)`` ray origins and directions (index units); points are ``src + t·dirv``.
        t0, t1: ``(R,)`` integration interval (see :func:`box_intersection`).
        method: ``"siddon"`` (exact for voxel cells) or ``"trilinear"`` (midpoint rule on the trilinear
            interpolant, ``nsamp`` samples per ray).
        nsamp: ``(R,)`` integer samples per ray (trilinear only).
        backend: ``"auto"``, ``"fused"`` or ``"reference"``.
        chunk: rays per chunk on the reference backend (bounds its memory).
        transfer: map a scalar ``vol`` to channels at each trilinear sample (post-classification; for Siddon
            it is applied voxel by voxel, which is the same thing for piecewise-constant voxels).
    Returns:
        ``(R, C)`` integrals in the t-parameter.
    """
    if method not in METHODS:
        raise InputError(f"method: expected one of {METHODS}, got {method!r}")
    if backend not in BACKENDS:
        raise InputError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if method == "trilinear" and nsamp is None:
        raise InputError("nsamp: required for the trilinear method")
    vol, transfer = _classify_for(method, vol, transfer)
    if backend == "auto":
        if (
            isinstance(transfer, ThresholdTransfer)
            and method == "trilinear"
            and vol.device.type == "cuda"
            and not _needs_create_graph()
            and triton_available()
        ):
            _, _, params, channels = transfer.kernel_spec(vol.dtype)
            return TritonThreshold.apply(vol, params, channels, src, dirv, t0, t1, nsamp)
        if (
            transfer is None
            and method == "trilinear"
            and vol.device.type == "cuda"
            and not _needs_create_graph()
            and triton_available()
        ):
            return TritonTrilinear.apply(vol, src, dirv, t0, t1, nsamp)
        backend = "fused" if vol.device.type == "cpu" and not _needs_create_graph() else "reference"
    if backend == "fused":
        if vol.device.type != "cpu":
            raise InputError(f"backend='fused' runs on CPU tensors; got a volume on {vol.device}")
        return _FusedIntegral.apply(method, vol, src, dirv, t0, t1, nsamp, transfer)
    return _reference(method, vol, src, dirv, t0, t1, nsamp, chunk, transfer)


_CREATE_GRAPH = threading.local()


def _needs_create_graph() -> bool:
    return bool(getattr(_CREATE_GRAPH, "value", False))


class double_differentiable:
    """Context manager: renders inside it use the autograd reference path, differentiable twice.

    Needed for losses built from gradients of the rendering (e.g. ProST's double-backward training).
    """

    def __enter__(self) -> None:
        self._prev = _needs_create_graph()
        _CREATE_GRAPH.value = True

    def __exit__(self, *exc: object) -> None:
        _CREATE_GRAPH.value = self._prev
