"""Fused trilinear kernels for a :class:`~xraypose.render.transfer.ThresholdTransfer` (closed form, no table).

Each sample interpolates the scalar ``v`` once and evaluates, for up to four channels,
``f_c(v) = ρ(v) · (S_c(v) − S_{c+1}(v))`` with ``ρ(v) = max(min(a1·v + b1, a2·v + b2), 0)``,
``S_0 ≡ 1``, ``S_c`` a C¹ cubic smoothstep of width ``w`` at edge ``e_c`` and ``S_C ≡ 0`` (unused edges are
padded with a huge value, so their steps are 0). ``prm = [a1, b1, a2, b2, 1/w, e1, e2, e3]``.
A few flops and no memory traffic per sample: cheaper than a table lookup's float→int conversion and
dependent loads.
"""

from __future__ import annotations

import numba
import numpy as np

from .trilinear import _cell, _interp, _interp_grad, _scatter8, _store_ray_grads

__all__ = ["threshold_backward", "threshold_backward_volume", "threshold_forward"]

#: Edge value standing for "no edge" (its smoothstep is 0 for any finite HU).
NO_EDGE = 1e30


@numba.njit(inline="always", fastmath=True, cache=True)
def _step(v, e, inv_w):  # pragma: no cover - compiled
    u = min(max((v - e) * inv_w + 0.5, 0.0), 1.0)
    return u * u * (3.0 - 2.0 * u), 6.0 * u * (1.0 - u) * inv_w


@numba.njit(inline="always", fastmath=True, cache=True)
def _channels(v, prm):  # pragma: no cover - compiled
    rho = max(min(prm[0] * v + prm[1], prm[2] * v + prm[3]), 0.0)
    s1, _ = _step(v, prm[5], prm[4])
    s2, _ = _step(v, prm[6], prm[4])
    s3, _ = _step(v, prm[7], prm[4])
    return rho * (1.0 - s1), rho * (s1 - s2), rho * (s2 - s3), rho * s3


@numba.njit(inline="always", fastmath=True, cache=True)
def _weighted(v, prm, w0, w1, w2, w3):  # pragma: no cover - compiled
    """``Σ_c w_c f_c(v)`` and its derivative in ``v``."""
    l1 = prm[0] * v + prm[1]
    l2 = prm[2] * v + prm[3]
    if l1 < l2:
        m = l1
        dm = prm[0]
    else:
        m = l2
        dm = prm[2]
    if m > 0.0:
        rho = m
        drho = dm
    else:
        rho = 0.0
        drho = 0.0
    s1, d1 = _step(v, prm[5], prm[4])
    s2, d2 = _step(v, prm[6], prm[4])
    s3, d3 = _step(v, prm[7], prm[4])
    mix = w0 * (1.0 - s1) + w1 * (s1 - s2) + w2 * (s2 - s3) + w3 * s3
    dmix = (w1 - w0) * d1 + (w2 - w1) * d2 + (w3 - w2) * d3
    return rho * mix, drho * mix + rho * dmix


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _forward(volp, prm, src, dirv, t0, t1, nsamp, out):  # pragma: no cover - compiled
    _, _, Jp, Kp = volp.shape
    C = out.shape[1]
    sj = Kp
    si = Jp * Kp
    flat = volp.reshape(-1)
    for r in numba.prange(src.shape[0]):
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
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        for k in range(n):
            base, fx, fy, fz = _cell(sx, sy, sz, dx, dy, dz, a + (k + 0.5) * h, si, sj)
            c0, c1, c2, c3 = _channels(_interp(flat, base, si, sj, fx, fy, fz), prm)
            a0 += c0
            a1 += c1
            a2 += c2
            a3 += c3
        out[r, 0] = a0 * h
        if C > 1:
            out[r, 1] = a1 * h
        if C > 2:
            out[r, 2] = a2 * h
        if C > 3:
            out[r, 3] = a3 * h


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _backward(volp, prm, src, dirv, t0, t1, nsamp, grad_out, g_src, g_dirv, g_t0, g_t1):  # pragma: no cover
    # Same sums as trilinear._backward_tf: G = Σ ∇f, E = Σ c_k ∇f, S = Σ f, with f = Σ_c w_c f_c(v).
    _, _, Jp, Kp = volp.shape
    C = grad_out.shape[1]
    sj = Kp
    si = Jp * Kp
    flat = volp.reshape(-1)
    for r in numba.prange(src.shape[0]):
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
        w0 = grad_out[r, 0]
        w1 = grad_out[r, 1] if C > 1 else 0.0
        w2 = grad_out[r, 2] if C > 2 else 0.0
        w3 = grad_out[r, 3] if C > 3 else 0.0
        ax = 0.0
        ay = 0.0
        az = 0.0
        ex = 0.0
        ey = 0.0
        ez = 0.0
        sw = 0.0
        inv_n = 1.0 / n
        for k in range(n):
            ck = (k + 0.5) * inv_n
            base, fx, fy, fz = _cell(sx, sy, sz, dx, dy, dz, a + ck * (b - a), si, sj)
            v, gx, gy, gz = _interp_grad(flat, base, si, sj, fx, fy, fz)
            fv, slope = _weighted(v, prm, w0, w1, w2, w3)
            sw += fv
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


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _backward_volume(volp, prm, src, dirv, t0, t1, nsamp, grad_out, buffers):  # pragma: no cover
    nchunk, _, _, Jp, Kp = buffers.shape
    C = grad_out.shape[1]
    sj = Kp
    si = Jp * Kp
    vflat = volp.reshape(-1)
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
            for k in range(n):
                o, fx, fy, fz = _cell(sx, sy, sz, dx, dy, dz, a + (k + 0.5) * h, si, sj)
                _, slope = _weighted(_interp(vflat, o, si, sj, fx, fy, fz), prm, w0, w1, w2, w3)
                _scatter8(flat, o, si, sj, fx, fy, fz, slope * h)


def threshold_forward(volp, prm, src, dirv, t0, t1, nsamp, out) -> None:
    """Fill ``out`` (R, C ≤ 4) with the ray integrals of the threshold transfer of the scalar ``volp``."""
    _forward(volp, np.ascontiguousarray(prm, dtype=np.float64), src, dirv, t0, t1, nsamp, out)


def threshold_backward(volp, prm, src, dirv, t0, t1, nsamp, grad_out, g_src, g_dirv, g_t0, g_t1) -> None:
    """Ray-parameter gradients (in place), as :func:`xraypose.render.trilinear.trilinear_backward`."""
    _backward(volp, prm, src, dirv, t0, t1, nsamp, grad_out, g_src, g_dirv, g_t0, g_t1)


def threshold_backward_volume(volp, prm, src, dirv, t0, t1, nsamp, grad_out, buffers) -> None:
    """Scatter the scalar volume's gradient into per-thread ``buffers`` (padded layout)."""
    _backward_volume(volp, prm, src, dirv, t0, t1, nsamp, grad_out, buffers)
