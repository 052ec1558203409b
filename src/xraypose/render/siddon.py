"""Exact Siddon radiological path: fused CPU kernels (Numba) and a readable PyTorch reference.

Low-level interface shared by every ray-integration method of the engine (see also :mod:`.trilinear`):

* ``vol`` — ``(C, I, J, K)`` cell values (C channels accumulated in one pass), C-contiguous;
* ``src``, ``dirv`` — ``(R, 3)`` ray origin and direction in **continuous voxel-index coordinates**
  (voxel ``(i, j, k)`` is the cell ``[i − ½, i + ½] × [j − ½, j + ½] × [k − ½, k + ½]``, so the volume is the
  box ``[−½, n − ½]`` along each axis); a point of ray ``r`` is ``src[r] + t · dirv[r]``;
* ``t0``, ``t1`` — ``(R,)`` the parameter interval to integrate (normally already clipped by the caller to
  the volume box and to ``[0, 1]``; an empty interval ``t1 ≤ t0`` gives 0).

The result is the **exact** integral in the t-parameter of the piecewise-constant volume,
``out[r, c] = ∫_{t0}^{t1} vol[c](src + t·dirv) dt`` (unitless t; the caller multiplies by the ray's length in
mm). The volume is zero outside its box, so an interval that sticks out of the box is integrated only where
it is inside. Along an axis with ``dirv == 0`` the ray lies in the cell ``floor(src + ½)`` (a ray exactly on
a cell face belongs to the cell on its upper side; exactly on the upper box face ``n − ½`` it is outside).

Gradients (:func:`siddon_backward`): the integral is a sum over the cells crossed; a crossing of the plane
``x_a = p`` (``p`` half-integer) at ``t_c = (p − s_a)/d_a`` moves it by ``(value_before − value_after)·dt_c``
with ``∂t_c/∂s_a = −1/d_a`` and ``∂t_c/∂d_a = −t_c/d_a``; ``∂/∂t0 = −value`` of the entry cell and
``∂/∂t1 = +value`` of the exit cell (0 where ``t0``/``t1`` lie outside the box, in which case the box-face
crossing carries the gradient instead). ``t0`` and ``t1`` are independent inputs: the caller chains its own
clipping. At a kink (``t0`` or ``t1`` exactly on a cell face) the kernel returns one of the one-sided
derivatives; the total through a caller that clips ``t0``/``t1`` to the box is the same either way.

Kernels are compiled by Numba on first use per dtype (float32 or float64, all arrays of a call alike) and
cached on disk (``cache=True``). Each ray is accumulated in float64; float32 volumes are loaded as float32.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from xraypose.errors import InputError

__all__ = [
    "cell_occupancy",
    "siddon_backward",
    "siddon_backward_volume",
    "siddon_forward",
    "siddon_reference",
]

Array = np.ndarray | torch.Tensor

# Rays per work item of the forward / backward kernels: consecutive rays (neighbouring detector pixels)
# cross the same cache lines, so each thread walks a contiguous run of them.
_CHUNK = 64
# Volume gradient: below this many rays per thread it runs single-threaded; otherwise the volume is cut into
# this many i-slabs per thread.
_MIN_RAYS_PER_THREAD = 128
_SLABS_PER_THREAD = 4

_JIT = dict(cache=True, nogil=True, fastmath=False, error_model="numpy", boundscheck=False)


# --------------------------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
def _slab(s, d, lo, hi):  # pragma: no cover - compiled
    """Entry/exit parameters of the line ``s + t·d`` with the slab ``[lo, hi]``, 1/d and the step sign."""
    if d > 0.0:
        inv = 1.0 / d
        return (lo - s) * inv, (hi - s) * inv, inv, 1
    if d < 0.0:
        inv = 1.0 / d
        return (hi - s) * inv, (lo - s) * inv, inv, -1
    if s >= lo and s < hi:
        return -np.inf, np.inf, 0.0, 0
    return np.inf, -np.inf, 0.0, 0


@numba.njit(**_JIT)
def _cell(s, d, t, sg, first, last):  # pragma: no cover - compiled
    """Index of the cell the ray occupies just after ``t`` (direction-aware on faces), clamped to
    ``[first, last]``."""
    x = s + t * d if sg != 0 else s
    f = math.floor(x + 0.5) if sg >= 0 else math.ceil(x + 0.5) - 1.0
    if f < first:
        f = first
    elif f > last:
        f = last
    return int(f)


@numba.njit(**_JIT)
def _next_t(s, idx, sg, inv):  # pragma: no cover - compiled
    """Parameter of the next face crossing along an axis (+inf if the ray is parallel to it)."""
    if sg == 0:
        return np.inf
    return (idx + 0.5 * sg - s) * inv


@numba.njit(**_JIT)
def _setup(src, dirv, t0, t1, r, ilo, ihi, nJ, nK):  # pragma: no cover - compiled
    """Clip ray r to the box ``[ilo − ½, ihi − ½] × [−½, nJ − ½] × [−½, nK − ½]``; find its first cell.

    Returns ``(ok, ta, tb, entry_axis, i, j, k, si, sj, sk, inv_i, inv_j, inv_k, tn_i, tn_j, tn_k)``:
    ``ta`` the start (``max(t0, box entry)``), ``tb = t1`` (the traversal stops at ``t1`` or on leaving the
    box), ``entry_axis`` the axis whose box face the ray enters through after ``t0`` (−1 if ``t0`` itself is
    inside the box), ``s*`` step signs, ``inv*`` = 1/d, ``tn*`` the next crossing parameters.
    """
    sx = np.float64(src[r, 0])
    sy = np.float64(src[r, 1])
    sz = np.float64(src[r, 2])
    dx = np.float64(dirv[r, 0])
    dy = np.float64(dirv[r, 1])
    dz = np.float64(dirv[r, 2])
    ta = np.float64(t0[r])
    tb = np.float64(t1[r])
    lo_i, hi_i, inv_i, si = _slab(sx, dx, ilo - 0.5, ihi - 0.5)
    lo_j, hi_j, inv_j, sj = _slab(sy, dy, -0.5, nJ - 0.5)
    lo_k, hi_k, inv_k, sk = _slab(sz, dz, -0.5, nK - 0.5)
    entry_axis = -1
    if lo_i > ta:
        ta = lo_i
        entry_axis = 0
    if lo_j > ta:
        ta = lo_j
        entry_axis = 1
    if lo_k > ta:
        ta = lo_k
        entry_axis = 2
    hi = min(hi_i, hi_j, hi_k)
    ok = ta < tb and ta < hi  # False for NaNs too
    i = 0
    j = 0
    k = 0
    tn_i = np.inf
    tn_j = np.inf
    tn_k = np.inf
    if ok:
        i = _cell(sx, dx, ta, si, ilo, ihi - 1)
        j = _cell(sy, dy, ta, sj, 0, nJ - 1)
        k = _cell(sz, dz, ta, sk, 0, nK - 1)
        tn_i = _next_t(sx, i, si, inv_i)
        tn_j = _next_t(sy, j, sj, inv_j)
        tn_k = _next_t(sz, k, sk, inv_k)
    return ok, ta, tb, entry_axis, i, j, k, si, sj, sk, inv_i, inv_j, inv_k, tn_i, tn_j, tn_k


@numba.njit(inline="always", **_JIT)
def _weighted(flat, w, lin, N, C):  # pragma: no cover - compiled
    """Σ_c w[c] · vol[c, cell] for the cell at flat offset ``lin``."""
    if C == 1:
        return w[0] * flat[lin]
    acc = 0.0
    for c in range(C):
        acc += w[c] * flat[c * N + lin]
    return acc


@numba.njit(parallel=True, **_JIT)
def _forward_kernel(vol, src, dirv, t0, t1, out):  # pragma: no cover - compiled
    C, nI, nJ, nK = vol.shape
    N = nI * nJ * nK
    flat = vol.reshape(-1)
    R = src.shape[0]
    nchunk = (R + _CHUNK - 1) // _CHUNK
    for ch in numba.prange(nchunk):
        acc = np.empty(C, np.float64)
        r_end = min(R, (ch + 1) * _CHUNK)
        for r in range(ch * _CHUNK, r_end):
            (ok, t, tb, _e, i, j, k, si, sj, sk, inv_i, inv_j, inv_k, tn_i, tn_j, tn_k) = _setup(
                src, dirv, t0, t1, r, 0, nI, nJ, nK
            )
            if not ok:
                for c in range(C):
                    out[r, c] = 0.0
                continue
            dt_i = abs(inv_i)
            dt_j = abs(inv_j)
            dt_k = abs(inv_k)
            st_i = si * nJ * nK
            st_j = sj * nK
            lin = (i * nJ + j) * nK + k
            if C == 1:  # scalar accumulator: the common case, kept free of the channel loop
                a0 = 0.0
                while True:
                    if tn_i <= tn_j and tn_i <= tn_k:
                        tc = tn_i
                        ax = 0
                    elif tn_j <= tn_k:
                        tc = tn_j
                        ax = 1
                    else:
                        tc = tn_k
                        ax = 2
                    if tc >= tb:
                        a0 += flat[lin] * (tb - t)
                        break
                    a0 += flat[lin] * (tc - t)
                    t = tc
                    if ax == 0:
                        i += si
                        if i < 0 or i >= nI:
                            break
                        lin += st_i
                        tn_i += dt_i
                    elif ax == 1:
                        j += sj
                        if j < 0 or j >= nJ:
                            break
                        lin += st_j
                        tn_j += dt_j
                    else:
                        k += sk
                        if k < 0 or k >= nK:
                            break
                        lin += sk
                        tn_k += dt_k
                out[r, 0] = a0
                continue
            for c in range(C):
                acc[c] = 0.0
            while True:
                if tn_i <= tn_j and tn_i <= tn_k:
                    tc = tn_i
                    ax = 0
                elif tn_j <= tn_k:
                    tc = tn_j
                    ax = 1
                else:
                    tc = tn_k
                    ax = 2
                last = tc >= tb
                seg = (tb - t) if last else (tc - t)
                for c in range(C):
                    acc[c] += flat[c * N + lin] * seg
                if last:
                    break
                t = tc
                if ax == 0:
                    i += si
                    if i < 0 or i >= nI:
                        break
                    lin += st_i
                    tn_i += dt_i
                elif ax == 1:
                    j += sj
                    if j < 0 or j >= nJ:
                        break
                    lin += st_j
                    tn_j += dt_j
                else:
                    k += sk
                    if k < 0 or k >= nK:
                        break
                    lin += sk
                    tn_k += dt_k
            for c in range(C):
                out[r, c] = acc[c]


@numba.njit(parallel=True, **_JIT)
def _backward_kernel(vol, src, dirv, t0, t1, grad_out, g_src, g_dirv, g_t0, g_t1):  # pragma: no cover
    C, nI, nJ, nK = vol.shape
    N = nI * nJ * nK
    flat = vol.reshape(-1)
    R = src.shape[0]
    nchunk = (R + _CHUNK - 1) // _CHUNK
    for ch in numba.prange(nchunk):
        go = np.empty(C, np.float64)
        r_end = min(R, (ch + 1) * _CHUNK)
        for r in range(ch * _CHUNK, r_end):
            (ok, ta, tb, entry, i, j, k, si, sj, sk, inv_i, inv_j, inv_k, tn_i, tn_j, tn_k) = _setup(
                src, dirv, t0, t1, r, 0, nI, nJ, nK
            )
            # Per axis a: W_a = Σ (u_after − u_before) and T_a = Σ (u_after − u_before)·t_c over the
            # crossings of that axis, where u = Σ_c grad_out[c]·vol[c] of a cell (0 outside the box).
            # Since d out/d t_c = u_before − u_after, ∂t_c/∂s_a = −1/d_a and ∂t_c/∂d_a = −t_c/d_a:
            # g_src[a] = W_a / d_a and g_dirv[a] = T_a / d_a.
            w_i = 0.0
            w_j = 0.0
            w_k = 0.0
            m_i = 0.0
            m_j = 0.0
            m_k = 0.0
            gt0 = 0.0
            gt1 = 0.0
            if ok:
                for c in range(C):
                    go[c] = grad_out[r, c]
                dt_i = abs(inv_i)
                dt_j = abs(inv_j)
                dt_k = abs(inv_k)
                st_i = si * nJ * nK
                st_j = sj * nK
                lin = (i * nJ + j) * nK + k
                u = _weighted(flat, go, lin, N, C)
                # Entry: either t0 inside the box, or a crossing of a box face (0 → u) at ta.
                if entry == -1:
                    gt0 = -u
                elif entry == 0:
                    w_i += u
                    m_i += u * ta
                elif entry == 1:
                    w_j += u
                    m_j += u * ta
                else:
                    w_k += u
                    m_k += u * ta
                while True:
                    if tn_i <= tn_j and tn_i <= tn_k:
                        tc = tn_i
                        if tc >= tb:
                            gt1 = u
                            break
                        i += si
                        if i < 0 or i >= nI:
                            w_i -= u
                            m_i -= u * tc
                            break
                        lin += st_i
                        tn_i += dt_i
                        un = _weighted(flat, go, lin, N, C)
                        w_i += un - u
                        m_i += (un - u) * tc
                    elif tn_j <= tn_k:
                        tc = tn_j
                        if tc >= tb:
                            gt1 = u
                            break
                        j += sj
                        if j < 0 or j >= nJ:
                            w_j -= u
                            m_j -= u * tc
                            break
                        lin += st_j
                        tn_j += dt_j
                        un = _weighted(flat, go, lin, N, C)
                        w_j += un - u
                        m_j += (un - u) * tc
                    else:
                        tc = tn_k
                        if tc >= tb:
                            gt1 = u
                            break
                        k += sk
                        if k < 0 or k >= nK:
                            w_k -= u
                            m_k -= u * tc
                            break
                        lin += sk
                        tn_k += dt_k
                        un = _weighted(flat, go, lin, N, C)
                        w_k += un - u
                        m_k += (un - u) * tc
                    u = un
            g_src[r, 0] = w_i * inv_i
            g_src[r, 1] = w_j * inv_j
            g_src[r, 2] = w_k * inv_k
            g_dirv[r, 0] = m_i * inv_i
            g_dirv[r, 1] = m_j * inv_j
            g_dirv[r, 2] = m_k * inv_k
            g_t0[r] = gt0
            g_t1[r] = gt1


@numba.njit(**_JIT)
def _scatter_rays(src, dirv, t0, t1, grad_out, gflat, ilo, ihi, nI, nJ, nK):  # pragma: no cover
    """gflat[c·N + cell] += grad_out[r, c] · (t-length of ray r in cell), for the cells with
    ``ilo ≤ i < ihi`` only (every ray)."""
    C = grad_out.shape[1]
    N = nI * nJ * nK
    for r in range(src.shape[0]):
        (ok, t, tb, _e, i, j, k, si, sj, sk, inv_i, inv_j, inv_k, tn_i, tn_j, tn_k) = _setup(
            src, dirv, t0, t1, r, ilo, ihi, nJ, nK
        )
        if not ok:
            continue
        dt_i = abs(inv_i)
        dt_j = abs(inv_j)
        dt_k = abs(inv_k)
        st_i = si * nJ * nK
        st_j = sj * nK
        lin = (i * nJ + j) * nK + k
        while True:
            if tn_i <= tn_j and tn_i <= tn_k:
                tc = tn_i
                ax = 0
            elif tn_j <= tn_k:
                tc = tn_j
                ax = 1
            else:
                tc = tn_k
                ax = 2
            last = tc >= tb
            seg = (tb - t) if last else (tc - t)
            if C == 1:
                gflat[lin] += grad_out[r, 0] * seg
            else:
                for c in range(C):
                    gflat[c * N + lin] += grad_out[r, c] * seg
            if last:
                break
            t = tc
            if ax == 0:
                i += si
                if i < ilo or i >= ihi:
                    break
                lin += st_i
                tn_i += dt_i
            elif ax == 1:
                j += sj
                if j < 0 or j >= nJ:
                    break
                lin += st_j
                tn_j += dt_j
            else:
                k += sk
                if k < 0 or k >= nK:
                    break
                lin += sk
                tn_k += dt_k


@numba.njit(parallel=True, **_JIT)
def _backward_volume_kernel(src, dirv, t0, t1, grad_out, grad_vol, nthreads, per_thread):  # pragma: no cover
    _, nI, nJ, nK = grad_vol.shape
    gflat = grad_vol.reshape(-1)
    nparts = nthreads * per_thread
    if nparts <= 1:
        _scatter_rays(src, dirv, t0, t1, grad_out, gflat, 0, nI, nI, nJ, nK)
        return
    # The volume is cut into nparts slabs of i; every part walks all rays clipped to its slab, so the parts
    # write disjoint cells. Numba's static schedule hands thread t the iterations [t·m, (t + 1)·m); they are
    # mapped to the interleaved slabs t, t + T, t + 2T, … to balance rays that cover only part of the volume.
    for p in numba.prange(nparts):
        slab = (p % per_thread) * nthreads + p // per_thread
        ilo = slab * nI // nparts
        ihi = (slab + 1) * nI // nparts
        if ihi > ilo:
            _scatter_rays(src, dirv, t0, t1, grad_out, gflat, ilo, ihi, nI, nJ, nK)


# --------------------------------------------------------------------------------------------------------------
# Typed, validating wrappers
# --------------------------------------------------------------------------------------------------------------


def _np(x: Array, name: str, *, writable: bool = False) -> np.ndarray:
    """View ``x`` (ndarray or CPU tensor) as a NumPy array without copying; check float dtype and layout."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise InputError(f"{name} must be on the CPU for the Numba Siddon kernels, got device {x.device}")
        x = x.detach().numpy()
    if not isinstance(x, np.ndarray):
        raise InputError(f"{name} must be a numpy array or a CPU torch tensor, got {type(x).__name__}")
    if x.dtype not in (np.float32, np.float64):
        raise InputError(f"{name} must be float32 or float64, got {x.dtype}")
    if not x.flags.c_contiguous:
        raise InputError(f"{name} must be C-contiguous (use np.ascontiguousarray / .contiguous())")
    if writable and not x.flags.writeable:
        raise InputError(f"{name} is an output and must be writable")
    return x


def _check_rays(
    src: Array, dirv: Array, t0: Array, t1: Array
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    src_, dirv_, t0_, t1_ = _np(src, "src"), _np(dirv, "dirv"), _np(t0, "t0"), _np(t1, "t1")
    if src_.ndim != 2 or src_.shape[1] != 3:
        raise InputError(f"src must have shape (R, 3), got {src_.shape}")
    R = src_.shape[0]
    if dirv_.shape != (R, 3):
        raise InputError(f"dirv must have shape ({R}, 3) like src, got {dirv_.shape}")
    if t0_.shape != (R,) or t1_.shape != (R,):
        raise InputError(f"t0 and t1 must have shape ({R},), got {t0_.shape} and {t1_.shape}")
    return src_, dirv_, t0_, t1_, R


def _check_vol(vol: Array, name: str, *, writable: bool = False) -> np.ndarray:
    v = _np(vol, name, writable=writable)
    if v.ndim != 4 or min(v.shape) < 1:
        raise InputError(f"{name} must have shape (C, I, J, K) with all sizes ≥ 1, got {v.shape}")
    return v


def _same_dtype(arrays: dict[str, np.ndarray]) -> None:
    dtypes = {a.dtype for a in arrays.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{k}: {a.dtype}" for k, a in arrays.items())
        raise InputError(f"all arrays of a Siddon kernel call must share one float dtype; got {listing}")


def _check_rc(x: np.ndarray, name: str, R: int, C: int) -> None:
    if x.shape != (R, C):
        raise InputError(f"{name} must have shape ({R}, {C}) (rays, channels), got {x.shape}")


def cell_occupancy(vol: np.ndarray, shift: int = 2) -> tuple[np.ndarray, int] | None:
    """Blocks of ``2^shift`` cells per axis holding a non-zero cell (any channel) of ``(C, I, J, K)``, for
    clipping rays to them (:func:`xraypose.render._camera_rays.setup_rays`); ``None`` when more than 95 % of
    the blocks are occupied (nothing worth clipping)."""
    from .trilinear import MAX_OCCUPIED_FRACTION, block_any

    occ = (vol != 0).any(0)
    for axis in range(3):
        occ = block_any(occ, axis, 1 << shift, overlap=False)
    if occ.mean() > MAX_OCCUPIED_FRACTION:
        return None
    return np.ascontiguousarray(occ, dtype=np.uint8), shift


def siddon_forward(vol: Array, src: Array, dirv: Array, t0: Array, t1: Array, out: Array) -> None:
    """Exact radiological path of each ray through the piecewise-constant volume, written into ``out``.

    Args:
        vol: ``(C, I, J, K)`` cell values (e.g. μ in 1/mm), C-contiguous.
        src: ``(R, 3)`` ray origins, continuous voxel-index coordinates.
        dirv: ``(R, 3)`` ray directions (index units per unit t); zero components allowed.
        t0: ``(R,)`` start parameter (unitless).
        t1: ``(R,)`` end parameter; ``t1 ≤ t0`` gives 0.
        out: ``(R, C)`` output, overwritten with ``∫_{t0}^{t1} vol[c](src + t·dirv) dt`` (value × t-length;
            multiply by the ray's length ``|dirv|`` in mm for a line integral).

    All arrays are NumPy arrays or CPU tensors (shared memory, no copy) of one dtype, float32 or float64.
    Cost O(cells crossed) per ray, parallel over rays with Numba threads.
    """
    v = _check_vol(vol, "vol")
    s, d, a, b, R = _check_rays(src, dirv, t0, t1)
    o = _np(out, "out", writable=True)
    _check_rc(o, "out", R, v.shape[0])
    _same_dtype({"vol": v, "src": s, "dirv": d, "t0": a, "t1": b, "out": o})
    if R:
        _forward_kernel(v, s, d, a, b, o)


def siddon_backward(
    vol: Array,
    src: Array,
    dirv: Array,
    t0: Array,
    t1: Array,
    grad_out: Array,
    g_src: Array,
    g_dirv: Array,
    g_t0: Array,
    g_t1: Array,
) -> None:
    """Gradient of ``Σ_{r,c} grad_out[r, c] · out[r, c]`` w.r.t. the ray parameters (written, not added).

    Args:
        vol, src, dirv, t0, t1: as in :func:`siddon_forward`.
        grad_out: ``(R, C)`` upstream gradient.
        g_src: ``(R, 3)`` output, gradient w.r.t. ``src`` (per index unit).
        g_dirv: ``(R, 3)`` output, gradient w.r.t. ``dirv``.
        g_t0: ``(R,)`` output, gradient w.r.t. ``t0`` (``−Σ_c grad_out·vol`` of the entry cell, or 0 if
            ``t0`` is outside the box).
        g_t1: ``(R,)`` output, gradient w.r.t. ``t1`` (``+Σ_c grad_out·vol`` of the exit cell, or 0 if
            ``t1`` is outside the box).

    ``t0`` and ``t1`` are treated as independent inputs (see the module docstring for the formulas).
    """
    v = _check_vol(vol, "vol")
    s, d, a, b, R = _check_rays(src, dirv, t0, t1)
    go = _np(grad_out, "grad_out")
    _check_rc(go, "grad_out", R, v.shape[0])
    gs = _np(g_src, "g_src", writable=True)
    gd = _np(g_dirv, "g_dirv", writable=True)
    ga = _np(g_t0, "g_t0", writable=True)
    gb = _np(g_t1, "g_t1", writable=True)
    if gs.shape != (R, 3) or gd.shape != (R, 3):
        raise InputError(f"g_src and g_dirv must have shape ({R}, 3), got {gs.shape} and {gd.shape}")
    if ga.shape != (R,) or gb.shape != (R,):
        raise InputError(f"g_t0 and g_t1 must have shape ({R},), got {ga.shape} and {gb.shape}")
    _same_dtype(
        {"vol": v, "src": s, "dirv": d, "t0": a, "t1": b, "grad_out": go}
        | {"g_src": gs, "g_dirv": gd, "g_t0": ga, "g_t1": gb}
    )
    if R:
        _backward_kernel(v, s, d, a, b, go, gs, gd, ga, gb)


def siddon_backward_volume(
    src: Array, dirv: Array, t0: Array, t1: Array, grad_out: Array, grad_vol: Array
) -> None:
    """Accumulate the gradient w.r.t. the volume: ``grad_vol[c] += Σ_r grad_out[r, c] · (t-length in cell)``.

    Args:
        src, dirv, t0, t1: as in :func:`siddon_forward`.
        grad_out: ``(R, C)`` upstream gradient.
        grad_vol: ``(C, I, J, K)`` output, **added to** (zero it first for a plain gradient).

    Race-free without private buffers (no extra memory): the volume is cut along ``i`` into
    ``4 × numba.get_num_threads()`` slabs, interleaved over the threads, and each slab walks every ray clipped
    to it (an extra clip per ray and slab), so each cell is written by one thread only. The sum for each cell
    is taken over the rays in order, so the result is deterministic; thread counts differ only by the rounding
    of the t-parameters at slab faces (~1e-16 relative). With fewer than 128 rays per thread it runs on one
    thread. Load balance relies on the rays being spread along ``i``; a fan confined to a few ``i``-slabs
    runs on fewer threads.
    """
    s, d, a, b, R = _check_rays(src, dirv, t0, t1)
    gv = _check_vol(grad_vol, "grad_vol", writable=True)
    go = _np(grad_out, "grad_out")
    _check_rc(go, "grad_out", R, gv.shape[0])
    _same_dtype({"src": s, "dirv": d, "t0": a, "t1": b, "grad_out": go, "grad_vol": gv})
    if R:
        # (numba.get_num_threads() inside the kernel would stop it from being cached on disk)
        nthreads = max(1, min(numba.get_num_threads(), R // _MIN_RAYS_PER_THREAD))
        per_thread = _SLABS_PER_THREAD if nthreads > 1 else 1
        _backward_volume_kernel(s, d, a, b, go, gv, nthreads, per_thread)


# --------------------------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------------------------


def siddon_reference(
    vol: torch.Tensor, src: torch.Tensor, dirv: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor
) -> torch.Tensor:
    """Readable pure-PyTorch Siddon integral ``(R, C)`` with autograd (same semantics as :func:`siddon_forward`).

    Classic formulation: the parameters of all crossings of the ray with the ``n + 1`` faces ``−½ … n − ½`` of
    each axis are clamped to ``[t0, t1]`` and sorted together with ``t0`` and ``t1``; every consecutive pair
    is a segment lying in one cell, found from its midpoint (``floor(x + ½)``, zero outside the box), and the
    result is ``Σ value · Δt``. Differentiable w.r.t. ``vol`` (through the gather) and ``src``, ``dirv``,
    ``t0``, ``t1`` (through the crossing parameters ``t = (p − s)/d``), which reproduces the kernel
    gradients. Memory ``O(R · (I + J + K) · C)``: meant for tests and small problems.
    """
    if vol.ndim != 4:
        raise InputError(f"vol must have shape (C, I, J, K), got {tuple(vol.shape)}")
    if src.ndim != 2 or src.shape[1] != 3 or dirv.shape != src.shape:
        raise InputError(f"src and dirv must have shape (R, 3), got {tuple(src.shape)}, {tuple(dirv.shape)}")
    R = src.shape[0]
    if t0.shape != (R,) or t1.shape != (R,):
        raise InputError(f"t0 and t1 must have shape ({R},), got {tuple(t0.shape)} and {tuple(t1.shape)}")
    C, nI, nJ, nK = vol.shape
    t1 = torch.where(t1 > t0, t1, t0)  # empty interval → all segments of length 0
    lo, hi = t0[:, None], t1[:, None]
    ts = [lo]
    for a, n in enumerate((nI, nJ, nK)):
        planes = torch.arange(n + 1, dtype=src.dtype, device=src.device) - 0.5
        s, d = src[:, a : a + 1], dirv[:, a : a + 1]
        parallel = d == 0
        t = (planes - s) / torch.where(parallel, torch.ones_like(d), d)
        t = torch.where(parallel, lo, t)  # no crossings along this axis: dummy copies of t0
        ts.append(torch.minimum(torch.maximum(t, lo), hi))
    ts.append(hi)
    tt = torch.sort(torch.cat(ts, dim=1), dim=1).values  # (R, S + 1)
    seg = tt[:, 1:] - tt[:, :-1]  # (R, S)
    with torch.no_grad():
        mid = 0.5 * (tt[:, 1:] + tt[:, :-1])
        x = src[:, None, :] + mid[..., None] * dirv[:, None, :]  # (R, S, 3)
        idx = torch.floor(x + 0.5).long()
        size = torch.tensor([nI, nJ, nK], device=src.device)
        inside = ((idx >= 0) & (idx < size)).all(dim=-1)
        idx = torch.minimum(idx.clamp(min=0), size - 1)
        lin = (idx[..., 0] * nJ + idx[..., 1]) * nK + idx[..., 2]  # (R, S)
    vals = vol.reshape(C, -1)[:, lin] * inside.to(vol.dtype)  # (C, R, S)
    return (vals * seg).sum(dim=-1).transpose(0, 1)
