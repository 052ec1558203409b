"""Trilinear ray marching: fused CPU kernels (Numba) and a readable PyTorch reference.

Low-level interface shared by every ray-integration method of the engine (see also :mod:`.siddon`):

* ``vol`` — ``(C, I, J, K)`` values on the voxel grid (C channels accumulated in one pass);
* ``src``, ``dirv`` — ``(R, 3)`` ray origin and direction in **continuous voxel-index coordinates**;
  a point of ray ``r`` is ``src[r] + t * dirv[r]``;
* ``t0``, ``t1`` — ``(R,)`` the parameter interval to integrate, already clipped to the volume box;
* ``nsamp`` — ``(R,)`` int32, number of samples of each ray (midpoint rule).

The result is the integral **in the t-parameter**, ``out[r, c] ≈ ∫_{t0}^{t1} vol[c](src + t·dirv) dt``; the caller
multiplies by the ray's length in mm. The midpoint rule places sample ``k`` of ``n`` at
``t_k = t0 + (k + ½)(t1 − t0)/n`` and weights every sample by ``(t1 − t0)/n``.

Sampling is trilinear on voxel centres; a point outside ``[0, n−1]`` along an axis takes the value of the
outermost voxel (edge replication), so that a cell's value extends to the box face ``n − ½`` exactly as in
Siddon's piecewise-constant model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numba
import numpy as np
import torch

__all__ = [
    "fold_padding",
    "occupancy",
    "pad_volume",
    "trilinear_backward",
    "trilinear_backward_volume",
    "trilinear_forward",
    "trilinear_reference",
]


@numba.njit(inline="always", fastmath=True, cache=True)
def _cell(sx, sy, sz, dx, dy, dz, t, si, sj):  # pragma: no cover - compiled
    """Flat offset of the lower corner of the cell holding ``s + t·d`` (padded grid) and the fractions."""
    x = sx + t * dx
    y = sy + t * dy
    z = sz + t * dz
    i0 = int(x)
    j0 = int(y)
    k0 = int(z)
    return i0 * si + j0 * sj + k0, x - i0, y - j0, z - k0


@numba.njit(inline="always", fastmath=True, cache=True)
def _interp(flat, o, si, sj, fx, fy, fz):  # pragma: no cover - compiled
    """Trilinear value from the 8 voxels at flat offset ``o``."""
    c00 = flat[o] + (flat[o + 1] - flat[o]) * fz
    c01 = flat[o + sj] + (flat[o + sj + 1] - flat[o + sj]) * fz
    c10 = flat[o + si] + (flat[o + si + 1] - flat[o + si]) * fz
    c11 = flat[o + si + sj] + (flat[o + si + sj + 1] - flat[o + si + sj]) * fz
    c0 = c00 + (c01 - c00) * fy
    c1 = c10 + (c11 - c10) * fy
    return c0 + (c1 - c0) * fx


@numba.njit(inline="always", fastmath=True, cache=True)
def _interp_grad(flat, o, si, sj, fx, fy, fz):  # pragma: no cover - compiled
    """Trilinear value and its gradient w.r.t. the sample position (index units)."""
    v000 = flat[o]
    v001 = flat[o + 1]
    v010 = flat[o + sj]
    v011 = flat[o + sj + 1]
    v100 = flat[o + si]
    v101 = flat[o + si + 1]
    v110 = flat[o + si + sj]
    v111 = flat[o + si + sj + 1]
    c00 = v000 + (v001 - v000) * fz
    c01 = v010 + (v011 - v010) * fz
    c10 = v100 + (v101 - v100) * fz
    c11 = v110 + (v111 - v110) * fz
    c0 = c00 + (c01 - c00) * fy
    c1 = c10 + (c11 - c10) * fy
    d0 = (v001 - v000) + ((v011 - v010) - (v001 - v000)) * fy
    d1 = (v101 - v100) + ((v111 - v110) - (v101 - v100)) * fy
    value = c0 + (c1 - c0) * fx
    gx = c1 - c0
    gy = (c01 - c00) + ((c11 - c10) - (c01 - c00)) * fx
    gz = d0 + (d1 - d0) * fx
    return value, gx, gy, gz


@numba.njit(inline="always", fastmath=True, cache=True)
def _next_block(sx, sy, sz, dx, dy, dz, ix, iy, iz, a, h, k, n, occ, shift):  # pragma: no cover - compiled
    """The occupancy block holding sample ``k`` of a ray (padded index space): whether it is occupied, and
    the index of the first sample at or beyond the ray's exit from it (at least ``k + 1``, at most ``n``).

    ``ix, iy, iz`` are ``1/d`` per axis (0 where ``d`` is 0: that axis never bounds the block). The exit index
    is rounded down by a hundredth of a step, so a sample is never skipped across a block boundary by
    rounding; a sample left in the block is simply looked at again.
    """
    t = a + (k + 0.5) * h
    bi = int(sx + t * dx) >> shift
    bj = int(sy + t * dy) >> shift
    bk = int(sz + t * dz) >> shift
    te = np.inf
    if ix != 0.0:
        face = (bi + (1 if ix > 0.0 else 0)) << shift
        te = min(te, (face - sx) * ix)
    if iy != 0.0:
        face = (bj + (1 if iy > 0.0 else 0)) << shift
        te = min(te, (face - sy) * iy)
    if iz != 0.0:
        face = (bk + (1 if iz > 0.0 else 0)) << shift
        te = min(te, (face - sz) * iz)
    u = (te - a) / h - 0.51
    kend = n if u >= n else max(k + 1, math.ceil(u))
    return occ[bi, bj, bk] != 0, kend


@numba.njit(inline="always", fastmath=True, cache=True)
def _inverse(d):  # pragma: no cover - compiled
    return 1.0 / d if d != 0.0 else 0.0


@numba.njit(inline="always", fastmath=True, cache=True)
def _occupied_span(sx, sy, sz, dx, dy, dz, a, h, n, occ, shift):  # pragma: no cover - compiled
    """Samples ``[k0, k1)`` of a ray between its first and last sample in an occupied block.

    The ray is walked block by block from its start, then from its end (as the mirrored ray
    ``s + (a + b)·d − t·d``, whose sample ``n − 1 − k`` is sample ``k``), so only the empty blocks at both ends
    are visited. The samples in between stay one contiguous loop, which the compiler vectorises.
    """
    ix = _inverse(dx)
    iy = _inverse(dy)
    iz = _inverse(dz)
    k0 = 0
    while k0 < n:
        busy, kend = _next_block(sx, sy, sz, dx, dy, dz, ix, iy, iz, a, h, k0, n, occ, shift)
        if busy:
            break
        k0 = kend
    if k0 >= n:
        return n, n
    ab = 2.0 * a + n * h
    rx = sx + ab * dx
    ry = sy + ab * dy
    rz = sz + ab * dz
    m = n - k0  # the first occupied sample bounds the backward walk
    j = 0
    while j < m:
        busy, kend = _next_block(rx, ry, rz, -dx, -dy, -dz, -ix, -iy, -iz, a, h, j, m, occ, shift)
        if busy:
            break
        j = kend
    return k0, n - j


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _forward(volp, occ, shift, src, dirv, t0, t1, nsamp, out):  # pragma: no cover - compiled
    # volp is the volume padded by one replicated voxel on every side, so a sample anywhere in the box
    # [-1/2, n-1/2] has all 8 neighbours in memory: no clamping or branch in the inner loop.
    C, Ip, Jp, Kp = volp.shape
    sj = Kp
    si = Jp * Kp
    sc = Ip * Jp * Kp
    flat = volp.reshape(-1)
    R = src.shape[0]
    for r in numba.prange(R):
        n = nsamp[r]
        a = t0[r]
        b = t1[r]
        if n <= 0 or b <= a:
            for c in range(C):
                out[r, c] = 0.0
            continue
        h = (b - a) / n
        # positions in padded index space: p = src + 1 + t * dirv
        sx = src[r, 0] + 1.0
        sy = src[r, 1] + 1.0
        sz = src[r, 2] + 1.0
        dx = dirv[r, 0]
        dy = dirv[r, 1]
        dz = dirv[r, 2]
        k0, k1 = _occupied_span(sx, sy, sz, dx, dy, dz, a, h, n, occ, shift)
        if C == 1:  # scalar accumulator: the common case, kept free of the channel loop
            acc = 0.0
            for k in range(k0, k1):
                base, fx, fy, fz = _cell(sx, sy, sz, dx, dy, dz, a + (k + 0.5) * h, si, sj)
                acc += _interp(flat, base, si, sj, fx, fy, fz)
            out[r, 0] = acc * h
        else:
            accs = np.zeros(C, dtype=np.float64)
            for k in range(k0, k1):
                base, fx, fy, fz = _cell(sx, sy, sz, dx, dy, dz, a + (k + 0.5) * h, si, sj)
                for c in range(C):
                    accs[c] += _interp(flat, base + c * sc, si, sj, fx, fy, fz)
            for c in range(C):
                out[r, c] = accs[c] * h


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _backward(
    volp, occ, shift, src, dirv, t0, t1, nsamp, grad_out, g_src, g_dirv, g_t0, g_t1
):  # pragma: no cover
    C, Ip, Jp, Kp = volp.shape
    sj = Kp
    si = Jp * Kp
    sc = Ip * Jp * Kp
    flat = volp.reshape(-1)
    R = src.shape[0]
    for r in numba.prange(R):
        n = nsamp[r]
        a = t0[r]
        b = t1[r]
        for q in range(3):
            g_src[r, q] = 0.0
            g_dirv[r, q] = 0.0
        g_t0[r] = 0.0
        g_t1[r] = 0.0
        if n <= 0 or b <= a:
            continue
        h = (b - a) / n
        sx = src[r, 0] + 1.0
        sy = src[r, 1] + 1.0
        sz = src[r, 2] + 1.0
        dx = dirv[r, 0]
        dy = dirv[r, 1]
        dz = dirv[r, 2]
        ax = 0.0  # Σ_k g_k
        ay = 0.0
        az = 0.0
        bx = 0.0  # Σ_k t_k g_k
        by = 0.0
        bz = 0.0
        cc = 0.0  # Σ_k c_k (g_k · d)
        sw = 0.0  # Σ_k Σ_c w_c f_ck
        inv_n = 1.0 / n
        w0 = grad_out[r, 0]
        k0, k1 = _occupied_span(sx, sy, sz, dx, dy, dz, a, h, n, occ, shift)
        for k in range(k0, k1):  # leading and trailing empty samples add exactly zero to every sum
            ck = (k + 0.5) * inv_n
            t = a + ck * (b - a)
            base, fx, fy, fz = _cell(sx, sy, sz, dx, dy, dz, t, si, sj)
            if C == 1:
                fv, gx, gy, gz = _interp_grad(flat, base, si, sj, fx, fy, fz)
            else:
                gx = 0.0
                gy = 0.0
                gz = 0.0
                fv = 0.0
                for c in range(C):
                    w = grad_out[r, c] / w0 if w0 != 0.0 else grad_out[r, c]
                    f_c, gx_c, gy_c, gz_c = _interp_grad(flat, base + c * sc, si, sj, fx, fy, fz)
                    fv += w * f_c
                    gx += w * gx_c
                    gy += w * gy_c
                    gz += w * gz_c
            ax += gx
            ay += gy
            az += gz
            bx += t * gx
            by += t * gy
            bz += t * gz
            cc += ck * (gx * dx + gy * dy + gz * dz)
            sw += fv
        # the sums above are per unit of grad_out[r, 0] (or raw when it is 0): scale once here
        scale = w0 if (C == 1 or w0 != 0.0) else 1.0
        ax *= scale
        ay *= scale
        az *= scale
        bx *= scale
        by *= scale
        bz *= scale
        cc *= scale
        sw *= scale
        g_src[r, 0] = h * ax
        g_src[r, 1] = h * ay
        g_src[r, 2] = h * az
        g_dirv[r, 0] = h * bx
        g_dirv[r, 1] = h * by
        g_dirv[r, 2] = h * bz
        ad = ax * dx + ay * dy + az * dz
        g_t0[r] = -sw / n + h * (ad - cc)
        g_t1[r] = sw / n + h * cc


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _backward_volume(src, dirv, t0, t1, nsamp, grad_out, buffers):  # pragma: no cover - compiled
    # buffers: (chunks, C, I+2, J+2, K+2), padded like the forward volume
    nchunk, C, Ip, Jp, Kp = buffers.shape
    sj = Kp
    si = Jp * Kp
    sc = Ip * Jp * Kp
    R = src.shape[0]
    per = (R + nchunk - 1) // nchunk
    for chunk in numba.prange(nchunk):
        flat = buffers[chunk].reshape(-1)
        for r in range(chunk * per, min(R, (chunk + 1) * per)):
            n = nsamp[r]
            a = t0[r]
            b = t1[r]
            if n <= 0 or b <= a:
                continue
            h = (b - a) / n
            sx = src[r, 0] + 1.0
            sy = src[r, 1] + 1.0
            sz = src[r, 2] + 1.0
            for k in range(n):
                base, fx, fy, fz = _cell(
                    sx, sy, sz, dirv[r, 0], dirv[r, 1], dirv[r, 2], a + (k + 0.5) * h, si, sj
                )
                for c in range(C):
                    w = grad_out[r, c] * h
                    o = base + c * sc
                    flat[o] += w * (1 - fx) * (1 - fy) * (1 - fz)
                    flat[o + 1] += w * (1 - fx) * (1 - fy) * fz
                    flat[o + sj] += w * (1 - fx) * fy * (1 - fz)
                    flat[o + sj + 1] += w * (1 - fx) * fy * fz
                    flat[o + si] += w * fx * (1 - fy) * (1 - fz)
                    flat[o + si + 1] += w * fx * (1 - fy) * fz
                    flat[o + si + sj] += w * fx * fy * (1 - fz)
                    flat[o + si + sj + 1] += w * fx * fy * fz


@numba.njit(inline="always", fastmath=True, cache=True)
def _lut_row(v, x0, inv_dx, K, W):  # pragma: no cover - compiled
    """Flat offset of the packed table row of the knot segment holding ``v``, and the fraction in it.

    The fraction is not clamped, so values beyond the end knots extend the end segments linearly.
    """
    s = (v - x0) * inv_dx
    i = int(min(max(s, 0.0), K - 2.0))
    return i * 2 * W, s - i


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _forward_tf(volp, lut, x0, inv_dx, src, dirv, t0, t1, nsamp, out):  # pragma: no cover - compiled
    # volp: (1, I+2, J+2, K+2) scalar volume; lut: packed transfer table (K, 2W), row k = [values at knot k,
    # differences to knot k+1], W ≥ C channels. Each sample interpolates the scalar once, then maps it to
    # every channel (post-classification). W = 4 runs four fixed accumulators (one SIMD-friendly row).
    _, _, Jp, Kp = volp.shape
    K = lut.shape[0]
    W = lut.shape[1] // 2
    C = out.shape[1]
    sj = Kp
    si = Jp * Kp
    flat = volp.reshape(-1)
    tab = lut.reshape(-1)
    R = src.shape[0]
    for r in numba.prange(R):
        n = nsamp[r]
        a = t0[r]
        b = t1[r]
        if n <= 0 or b <= a:
            for c in range(C):
                out[r, c] = 0.0
            continue
        h = (b - a) / n
        sx = src[r, 0] + 1.0
        sy = src[r, 1] + 1.0
        sz = src[r, 2] + 1.0
        dx = dirv[r, 0]
        dy = dirv[r, 1]
        dz = dirv[r, 2]
        if W == 4:
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            a3 = 0.0
            for k in range(n):
                base, fx, fy, fz = _cell(sx, sy, sz, dx, dy, dz, a + (k + 0.5) * h, si, sj)
                v = _interp(flat, base, si, sj, fx, fy, fz)
                o, u = _lut_row(v, x0, inv_dx, K, 4)
                a0 += tab[o] + tab[o + 4] * u
                a1 += tab[o + 1] + tab[o + 5] * u
                a2 += tab[o + 2] + tab[o + 6] * u
                a3 += tab[o + 3] + tab[o + 7] * u
            out[r, 0] = a0 * h
            if C > 1:
                out[r, 1] = a1 * h
            if C > 2:
                out[r, 2] = a2 * h
            if C > 3:
                out[r, 3] = a3 * h
        else:
            for c in range(C):
                out[r, c] = 0.0
            for k in range(n):
                base, fx, fy, fz = _cell(sx, sy, sz, dx, dy, dz, a + (k + 0.5) * h, si, sj)
                v = _interp(flat, base, si, sj, fx, fy, fz)
                o, u = _lut_row(v, x0, inv_dx, K, W)
                for c in range(C):
                    out[r, c] += tab[o + c] + tab[o + W + c] * u
            for c in range(C):
                out[r, c] *= h


@numba.njit(inline="always", fastmath=True, cache=True)
def _store_ray_grads(
    r, n, a, b, dx, dy, dz, ax, ay, az, ex, ey, ez, sw, g_src, g_dirv, g_t0, g_t1
):  # pragma: no cover
    """Write one ray's gradients from ``G = (ax, ay, az) = Σ∇f``, ``E = (ex, ey, ez) = Σ c_k ∇f`` and
    ``S = sw = Σ f`` (see :func:`trilinear_backward`; ``B = a·G + (b − a)·E`` and ``H·d = E·d``)."""
    h = (b - a) / n
    L = b - a
    g_src[r, 0] = h * ax
    g_src[r, 1] = h * ay
    g_src[r, 2] = h * az
    g_dirv[r, 0] = h * (a * ax + L * ex)
    g_dirv[r, 1] = h * (a * ay + L * ey)
    g_dirv[r, 2] = h * (a * az + L * ez)
    ad = ax * dx + ay * dy + az * dz
    cc = ex * dx + ey * dy + ez * dz
    g_t0[r] = -sw / n + h * (ad - cc)
    g_t1[r] = sw / n + h * cc


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _backward_tf(
    volp, lut, x0, inv_dx, src, dirv, t0, t1, nsamp, grad_out, g_src, g_dirv, g_t0, g_t1
):  # pragma: no cover
    # As _backward, for f(p) = Σ_c w_c · lut_c(v(p)): value Σ_c w_c lut_c(v), gradient Σ_c w_c lut_c'(v) ∇v.
    # Accumulates G = Σ ∇f and E = Σ c_k ∇f only (B = a·G + (b − a)·E and H·d = E·d follow at the end), to
    # keep the loop's live values within the CPU's registers.
    _, _, Jp, Kp = volp.shape
    K = lut.shape[0]
    W = lut.shape[1] // 2
    C = grad_out.shape[1]
    sj = Kp
    si = Jp * Kp
    flat = volp.reshape(-1)
    tab = lut.reshape(-1)
    R = src.shape[0]
    for r in numba.prange(R):
        n = nsamp[r]
        a = t0[r]
        b = t1[r]
        for q in range(3):
            g_src[r, q] = 0.0
            g_dirv[r, q] = 0.0
        g_t0[r] = 0.0
        g_t1[r] = 0.0
        if n <= 0 or b <= a:
            continue
        sx = src[r, 0] + 1.0
        sy = src[r, 1] + 1.0
        sz = src[r, 2] + 1.0
        dx = dirv[r, 0]
        dy = dirv[r, 1]
        dz = dirv[r, 2]
        ax = 0.0
        ay = 0.0
        az = 0.0
        ex = 0.0
        ey = 0.0
        ez = 0.0
        sw = 0.0
        inv_n = 1.0 / n
        w0 = grad_out[r, 0]
        w1 = grad_out[r, 1] if C > 1 else 0.0
        w2 = grad_out[r, 2] if C > 2 else 0.0
        w3 = grad_out[r, 3] if C > 3 else 0.0
        # The channel count is tested outside the sample loop: a branch inside it costs a third of the time.
        if W == 4:  # one packed row against the ray's four channel weights
            for k in range(n):
                ck = (k + 0.5) * inv_n
                base, fx, fy, fz = _cell(sx, sy, sz, dx, dy, dz, a + ck * (b - a), si, sj)
                v, gx, gy, gz = _interp_grad(flat, base, si, sj, fx, fy, fz)
                o, u = _lut_row(v, x0, inv_dx, K, 4)
                dv = w0 * tab[o] + w1 * tab[o + 1] + w2 * tab[o + 2] + w3 * tab[o + 3]
                ds = w0 * tab[o + 4] + w1 * tab[o + 5] + w2 * tab[o + 6] + w3 * tab[o + 7]
                sw += dv + ds * u
                slope = ds * inv_dx
                gx *= slope
                gy *= slope
                gz *= slope
                ax += gx
                ay += gy
                az += gz
                ex += ck * gx
                ey += ck * gy
                ez += ck * gz
        else:
            for k in range(n):
                ck = (k + 0.5) * inv_n
                base, fx, fy, fz = _cell(sx, sy, sz, dx, dy, dz, a + ck * (b - a), si, sj)
                v, gx, gy, gz = _interp_grad(flat, base, si, sj, fx, fy, fz)
                o, u = _lut_row(v, x0, inv_dx, K, W)
                dv = 0.0
                ds = 0.0
                for c in range(C):
                    dv += grad_out[r, c] * tab[o + c]
                    ds += grad_out[r, c] * tab[o + W + c]
                sw += dv + ds * u
                slope = ds * inv_dx
                gx *= slope
                gy *= slope
                gz *= slope
                ax += gx
                ay += gy
                az += gz
                ex += ck * gx
                ey += ck * gy
                ez += ck * gz
        _store_ray_grads(r, n, a, b, dx, dy, dz, ax, ay, az, ex, ey, ez, sw, g_src, g_dirv, g_t0, g_t1)


@numba.njit(inline="always", fastmath=True, cache=True)
def _scatter8(flat, o, si, sj, fx, fy, fz, w):  # pragma: no cover - compiled
    """Add ``w`` to the 8 voxels at flat offset ``o`` with trilinear weights (adjoint of :func:`_interp`)."""
    flat[o] += w * (1 - fx) * (1 - fy) * (1 - fz)
    flat[o + 1] += w * (1 - fx) * (1 - fy) * fz
    flat[o + sj] += w * (1 - fx) * fy * (1 - fz)
    flat[o + sj + 1] += w * (1 - fx) * fy * fz
    flat[o + si] += w * fx * (1 - fy) * (1 - fz)
    flat[o + si + 1] += w * fx * (1 - fy) * fz
    flat[o + si + sj] += w * fx * fy * (1 - fz)
    flat[o + si + sj + 1] += w * fx * fy * fz


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _backward_volume_tf(
    volp, lut, x0, inv_dx, src, dirv, t0, t1, nsamp, grad_out, buffers
):  # pragma: no cover
    # d/dv of Σ_c w_c lut_c(v) at each sample is Σ_c w_c lut_c'(v); scatter it trilinearly (scalar volume).
    nchunk, _, _, Jp, Kp = buffers.shape
    K = lut.shape[0]
    W = lut.shape[1] // 2
    C = grad_out.shape[1]
    sj = Kp
    si = Jp * Kp
    vflat = volp.reshape(-1)
    tab = lut.reshape(-1)
    R = src.shape[0]
    per = (R + nchunk - 1) // nchunk
    for chunk in numba.prange(nchunk):
        flat = buffers[chunk].reshape(-1)
        for r in range(chunk * per, min(R, (chunk + 1) * per)):
            n = nsamp[r]
            a = t0[r]
            b = t1[r]
            if n <= 0 or b <= a:
                continue
            h = (b - a) / n
            w0 = grad_out[r, 0]
            w1 = grad_out[r, 1] if C > 1 else 0.0
            w2 = grad_out[r, 2] if C > 2 else 0.0
            w3 = grad_out[r, 3] if C > 3 else 0.0
            sx = src[r, 0] + 1.0
            sy = src[r, 1] + 1.0
            sz = src[r, 2] + 1.0
            dx = dirv[r, 0]
            dy = dirv[r, 1]
            dz = dirv[r, 2]
            if W == 4:  # channel count tested outside the sample loop (see _backward_tf)
                for k in range(n):
                    o, fx, fy, fz = _cell(sx, sy, sz, dx, dy, dz, a + (k + 0.5) * h, si, sj)
                    v = _interp(vflat, o, si, sj, fx, fy, fz)
                    row, _u = _lut_row(v, x0, inv_dx, K, 4)
                    slope = w0 * tab[row + 4] + w1 * tab[row + 5] + w2 * tab[row + 6] + w3 * tab[row + 7]
                    _scatter8(flat, o, si, sj, fx, fy, fz, slope * inv_dx * h)
            else:
                for k in range(n):
                    o, fx, fy, fz = _cell(sx, sy, sz, dx, dy, dz, a + (k + 0.5) * h, si, sj)
                    v = _interp(vflat, o, si, sj, fx, fy, fz)
                    row, _u = _lut_row(v, x0, inv_dx, K, W)
                    slope = 0.0
                    for c in range(C):
                        slope += grad_out[r, c] * tab[row + W + c]
                    _scatter8(flat, o, si, sj, fx, fy, fz, slope * inv_dx * h)


#: Occupancy blocks are ``2**BLOCK_SHIFT`` padded voxels on a side (4: tight around the anatomy, cheap to walk).
BLOCK_SHIFT = 2
#: Above this fraction of occupied blocks, skipping saves less than walking the blocks costs: one block is used.
MAX_OCCUPIED_FRACTION = 0.95
_NO_SKIP = (np.ones((1, 1, 1), dtype=np.uint8), 30)


def block_any(a: np.ndarray, axis: int, size: int, overlap: bool) -> np.ndarray:
    """``out[b] = any(a[b·size : b·size + size])`` along ``axis``, plus the next plane when ``overlap``."""
    n = a.shape[axis]
    nb = -(-n // size)
    a = np.moveaxis(a, axis, 0)
    padded = np.zeros((nb * size + 1, *a.shape[1:]), dtype=bool)
    padded[:n] = a
    core = padded[: nb * size].reshape(nb, size, *a.shape[1:]).any(1)
    return np.moveaxis(core | padded[size::size] if overlap else core, 0, axis)


def occupancy(volp: np.ndarray, shift: int = BLOCK_SHIFT) -> tuple[np.ndarray, int]:
    """Empty-space map of a padded ``(C, I+2, J+2, K+2)`` volume for the pose kernels: ``(occ, shift)``.

    ``occ[bi, bj, bk]`` is 0 when every voxel a trilinear sample in block ``(bi, bj, bk)`` can read is zero in
    every channel (cells with lower corner in ``[b·2^shift, (b+1)·2^shift)`` per axis, i.e. voxels up to
    ``(b+1)·2^shift`` inclusive), so skipping that block's samples changes neither the integral nor its pose
    gradient. Volumes that are almost everywhere occupied get a single block (no skipping, no overhead).
    The volume gradient kernels never skip: zero voxels have non-zero gradients.
    """
    size = 1 << shift
    occ = (volp != 0).any(0)
    for axis in range(3):
        occ = block_any(occ, axis, size, overlap=True)
    if occ.mean() > MAX_OCCUPIED_FRACTION:
        return _NO_SKIP
    return np.ascontiguousarray(occ, dtype=np.uint8), shift


def pad_volume(vol: np.ndarray) -> np.ndarray:
    """Pad the spatial axes of ``(C, I, J, K)`` by one replicated voxel on each side (the kernels' layout)."""
    return np.pad(vol, ((0, 0), (1, 1), (1, 1), (1, 1)), mode="edge")


def fold_padding(grad: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`pad_volume` for ``(C, I+2, J+2, K+2)`` gradients: each pad voxel's gradient is added to
    the edge voxel it replicates (in place), and the unpadded ``(C, I, J, K)`` part is returned."""
    for axis in (1, 2, 3):
        grad.select(axis, 1).add_(grad.select(axis, 0))
        grad.select(axis, -2).add_(grad.select(axis, -1))
    return grad[:, 1:-1, 1:-1, 1:-1].contiguous()


def trilinear_forward(
    volp: np.ndarray,
    src: np.ndarray,
    dirv: np.ndarray,
    t0: np.ndarray,
    t1: np.ndarray,
    nsamp: np.ndarray,
    out: np.ndarray,
    transfer: tuple[int, np.ndarray, np.ndarray, int] | None = None,
    occupied: tuple[np.ndarray, int] | None = None,
) -> None:
    """Fill ``out`` (R, C) with the midpoint-rule integrals of each ray (see the module docstring).

    ``volp`` is the volume padded by :func:`pad_volume`; ray coordinates refer to the unpadded grid. With a
    ``transfer`` spec ``(kind, table, params, C)`` (see ``kernel_spec`` of the classes in
    :mod:`xraypose.render.transfer`), ``volp`` is one scalar channel and each sample is mapped to ``C``
    channels before accumulating: kind 0 reads a packed table, kind 1 evaluates a threshold transfer.
    ``occupied`` (from :func:`occupancy`, plain volumes only) lets the kernel skip empty blocks exactly.
    """
    if transfer is None:
        occ, shift = occupied if occupied is not None else _NO_SKIP
        _forward(volp, occ, shift, src, dirv, t0, t1, nsamp, out)
    elif transfer[0] == 0:
        _forward_tf(volp, transfer[1], transfer[2][0], transfer[2][1], src, dirv, t0, t1, nsamp, out)
    else:
        from ._threshold import threshold_forward

        threshold_forward(volp, transfer[2], src, dirv, t0, t1, nsamp, out)


def trilinear_backward(
    volp: np.ndarray,
    src: np.ndarray,
    dirv: np.ndarray,
    t0: np.ndarray,
    t1: np.ndarray,
    nsamp: np.ndarray,
    grad_out: np.ndarray,
    g_src: np.ndarray,
    g_dirv: np.ndarray,
    g_t0: np.ndarray,
    g_t1: np.ndarray,
    transfer: tuple[int, np.ndarray, np.ndarray, int] | None = None,
    occupied: tuple[np.ndarray, int] | None = None,
) -> None:
    """Gradient of ``Σ grad_out · out`` w.r.t. ``src``, ``dirv``, ``t0`` and ``t1`` (written in place).

    With ``L = (t1 − t0)/n``, ``G = Σ_k ∇f(p_k)``, ``B = Σ_k t_k ∇f(p_k)`` and ``H = Σ_k c_k ∇f(p_k)``
    (``c_k = (k + ½)/n``), the integral ``L Σ_k f(p_k)`` has ``∂/∂src = L·G``, ``∂/∂dirv = L·B``,
    ``∂/∂t0 = −S/n + L (G − H)·d`` and ``∂/∂t1 = S/n + L H·d`` where ``S = Σ_k f(p_k)``.
    """
    if transfer is None:
        occ, shift = occupied if occupied is not None else _NO_SKIP
        _backward(volp, occ, shift, src, dirv, t0, t1, nsamp, grad_out, g_src, g_dirv, g_t0, g_t1)
    elif transfer[0] == 0:
        lut, (x0, inv_dx) = transfer[1], transfer[2]
        _backward_tf(volp, lut, x0, inv_dx, src, dirv, t0, t1, nsamp, grad_out, g_src, g_dirv, g_t0, g_t1)
    else:
        from ._threshold import threshold_backward

        threshold_backward(volp, transfer[2], src, dirv, t0, t1, nsamp, grad_out, g_src, g_dirv, g_t0, g_t1)


def trilinear_backward_volume(
    shape: tuple[int, int, int, int],
    src: np.ndarray,
    dirv: np.ndarray,
    t0: np.ndarray,
    t1: np.ndarray,
    nsamp: np.ndarray,
    grad_out: np.ndarray,
    transfer: tuple[int, np.ndarray, np.ndarray, int] | None = None,
    volp: np.ndarray | None = None,
) -> np.ndarray:
    """Gradient of ``Σ grad_out · out`` w.r.t. the (unpadded) volume of shape ``shape = (C, I, J, K)``.

    With ``transfer`` the volume is the padded scalar ``volp`` (needed to evaluate the table's slope) and
    ``shape`` is ``(1, I, J, K)``.

    Rays are split into one chunk per Numba thread, each scattering into a private buffer (memory:
    threads × volume size) that are summed at the end, so the result is deterministic and race-free.
    """
    nthreads = numba.get_num_threads() if src.shape[0] >= 4096 else 1
    C, I, J, K = shape
    buffers = np.zeros((nthreads, C, I + 2, J + 2, K + 2), dtype=grad_out.dtype)
    if transfer is None:
        _backward_volume(src, dirv, t0, t1, nsamp, grad_out, buffers)
    elif transfer[0] == 0:
        assert volp is not None
        lut, (x0, inv_dx) = transfer[1], transfer[2]
        _backward_volume_tf(volp, lut, x0, inv_dx, src, dirv, t0, t1, nsamp, grad_out, buffers)
    else:
        from ._threshold import threshold_backward_volume

        assert volp is not None
        threshold_backward_volume(volp, transfer[2], src, dirv, t0, t1, nsamp, grad_out, buffers)
    total = buffers.sum(axis=0) if nthreads > 1 else buffers[0]
    return fold_padding(torch.from_numpy(total)).numpy()


def _sample_trilinear(vol: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of ``vol`` (C, I, J, K) at index-space ``points`` (..., 3) → (..., C)."""
    C, I, J, K = vol.shape
    sizes = points.new_tensor([I, J, K])
    p = torch.minimum(torch.clamp(points, min=0.0), sizes - 1)
    base = torch.minimum(p.detach().floor(), sizes - 2).long()
    frac = p - base
    out = 0
    flat = vol.reshape(C, -1)
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                idx = ((base[..., 0] + di) * J + (base[..., 1] + dj)) * K + (base[..., 2] + dk)
                w = (
                    (frac[..., 0] if di else 1 - frac[..., 0])
                    * (frac[..., 1] if dj else 1 - frac[..., 1])
                    * (frac[..., 2] if dk else 1 - frac[..., 2])
                )
                vals = flat.index_select(1, idx.reshape(-1)).reshape(C, *idx.shape)  # deterministic backward
                out = out + w.unsqueeze(0) * vals
    return out.movedim(0, -1)


def trilinear_reference(
    vol: torch.Tensor,
    src: torch.Tensor,
    dirv: torch.Tensor,
    t0: torch.Tensor,
    t1: torch.Tensor,
    nsamp: torch.Tensor,
    transfer: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Readable pure-PyTorch version of :func:`trilinear_forward` → ``(R, C)``.

    Differentiable (twice) w.r.t. every floating input through autograd; memory ``O(R · max(nsamp))``.
    ``transfer`` maps the sampled scalar ``(R, n, 1)`` values to ``(R, n, C)`` channels (post-classification).
    """
    nmax = int(nsamp.max()) if nsamp.numel() else 0
    k = torch.arange(nmax, device=src.device, dtype=src.dtype)
    n = nsamp.to(src.dtype).clamp(min=1).unsqueeze(-1)
    valid = (k.unsqueeze(0) < nsamp.unsqueeze(-1)) & (t1 > t0).unsqueeze(-1)
    ck = (k + 0.5) / n  # (R, nmax)
    t = t0.unsqueeze(-1) + ck * (t1 - t0).unsqueeze(-1)
    points = src.unsqueeze(1) + t.unsqueeze(-1) * dirv.unsqueeze(1)  # (R, nmax, 3)
    values = _sample_trilinear(vol, points)  # (R, nmax, C)
    if transfer is not None:
        values = transfer(values[..., 0])
    h = ((t1 - t0) / n.squeeze(-1)).unsqueeze(-1)
    return (values * valid.unsqueeze(-1)).sum(1) * h
