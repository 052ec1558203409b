"""Trilinear ray marching on CUDA in Triton: fused forward and backward kernels.

Same contract as :mod:`.trilinear` (see its module docstring): ``vol`` ``(C, I, J, K)``, rays ``src + t·dirv`` in
continuous voxel-index coordinates, midpoint rule ``t_k = t0 + (k + ½)(t1 − t0)/n`` with weight ``(t1 − t0)/n``,
trilinear on voxel centres with edge replication, result ``(R, C)`` in the t-parameter. Rays with ``n ≤ 0`` or
``t1 ≤ t0`` give 0 and zero gradients.

Design:

* one program per block of ``_BLOCK`` consecutive rays (neighbouring detector pixels), looping over samples up
  to the block's largest ``n`` with a mask; all ``C`` channels are gathered in the same pass as a
  ``(rays, channels)`` tile;
* the volume is padded on the device by one replicated voxel (``F.pad(..., mode="replicate")``, cached per
  volume while it is unchanged), so a sample anywhere in the box ``[−½, n − ½]`` has its 8 neighbours in
  memory; the position is additionally clamped to the padded grid (a no-op inside the box, 6 min/max per
  sample) so that points outside the box replicate the edge like :func:`.trilinear.trilinear_reference`
  instead of reading out of bounds;
* the backward kernel recomputes the samples (memory O(rays)) and gives, per ray, the gradients w.r.t.
  ``src``, ``dirv``, ``t0`` and ``t1`` (formulas in :func:`.trilinear.trilinear_backward`) and, when asked,
  scatters the volume gradient with ``tl.atomic_add`` into a padded buffer folded back afterwards (the adjoint
  of the padding). Atomic float additions make the volume gradient non-deterministic at the last bit. At a
  kink of the interpolant (a sample exactly on a voxel-centre plane) the derivative is the one-sided one from
  above, as in the CPU kernels.

float32 and float64 are supported (accumulation in the volume's dtype; float64 is slow on consumer GPUs).
Triton is imported lazily, the first time a kernel is needed, so that ``TRITON_INTERPRET=1`` set before that
moment runs the kernels on CPU tensors (how the tests validate them without a GPU); this module imports
cleanly without Triton, and :func:`triton_available` tells whether it can be used.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

from ._cache import DerivedCache
from .trilinear import fold_padding

__all__ = ["TritonThreshold", "TritonTrilinear", "triton_available"]

_BLOCK = 64  # rays per program
_NUM_WARPS = 4
_LAYOUTS = DerivedCache(capacity=16, max_bytes=2 << 30)  # GPU copies: a tighter byte budget


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (it then runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - broken installation
        return False
    return True


# The kernels are written as plain functions and turned into Triton JIT functions by :func:`_kernels` on first
# use (rebinding these module globals, through which the kernels call their helpers): Triton decides at
# decoration time whether to compile or to interpret (``TRITON_INTERPRET``), and is not imported before.
tl: Any = None  # triton.language, set by _kernels()


def _sample_setup(src, dirv, t0, t1, nsamp, rows, rmask):
    n = tl.load(nsamp + rows, mask=rmask, other=0)
    a = tl.load(t0 + rows, mask=rmask, other=0.0)
    b = tl.load(t1 + rows, mask=rmask, other=0.0)
    live = rmask & (n > 0) & (b > a)
    n = tl.where(live, n, 0)
    sx = tl.load(src + rows * 3 + 0, mask=rmask, other=0.0) + 1.0  # padded index space
    sy = tl.load(src + rows * 3 + 1, mask=rmask, other=0.0) + 1.0
    sz = tl.load(src + rows * 3 + 2, mask=rmask, other=0.0) + 1.0
    dx = tl.load(dirv + rows * 3 + 0, mask=rmask, other=0.0)
    dy = tl.load(dirv + rows * 3 + 1, mask=rmask, other=0.0)
    dz = tl.load(dirv + rows * 3 + 2, mask=rmask, other=0.0)
    return n, a, b, live, sx, sy, sz, dx, dy, dz


def _locate(t, sx, sy, sz, dx, dy, dz, lim_x, lim_y, lim_z, si, sj, BIG: tl.constexpr):
    # clamp to [0, n_padded − 2]: a no-op inside the box, edge replication outside, never out of bounds
    x = tl.minimum(tl.maximum(sx + t * dx, 0.0), lim_x)
    y = tl.minimum(tl.maximum(sy + t * dy, 0.0), lim_y)
    z = tl.minimum(tl.maximum(sz + t * dz, 0.0), lim_z)
    i0 = x.to(tl.int32)
    j0 = y.to(tl.int32)
    k0 = z.to(tl.int32)
    fx = x - i0
    fy = y - j0
    fz = z - k0
    if BIG:
        base = i0.to(tl.int64) * si + j0.to(tl.int64) * sj + k0
    else:
        base = i0 * si + j0 * sj + k0
    return base, fx, fy, fz


def _forward_kernel(
    volp,
    src,
    dirv,
    t0,
    t1,
    nsamp,
    out,
    R,
    C,
    sc,
    si,
    sj,
    lim_x,
    lim_y,
    lim_z,
    CP: tl.constexpr,
    BLOCK: tl.constexpr,
    BIG: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < R
    n, a, b, _, sx, sy, sz, dx, dy, dz = _sample_setup(src, dirv, t0, t1, nsamp, rows, rmask)
    h = (b - a) / tl.maximum(n, 1)
    chan = tl.arange(0, CP)
    cmask = chan < C
    if BIG:
        coff = chan.to(tl.int64) * sc
    else:
        coff = chan * sc
    acc = tl.zeros([BLOCK, CP], dtype=a.dtype)
    nmax = tl.max(n, axis=0)
    for k in range(0, nmax):
        act = k < n
        t = a + (k + 0.5) * h
        base, fx, fy, fz = _locate(t, sx, sy, sz, dx, dy, dz, lim_x, lim_y, lim_z, si, sj, BIG)
        m2 = act[:, None] & cmask[None, :]
        p = volp + base[:, None] + coff[None, :]
        fx2 = fx[:, None]
        fy2 = fy[:, None]
        fz2 = fz[:, None]
        v0 = tl.load(p, mask=m2, other=0.0)
        v1 = tl.load(p + 1, mask=m2, other=0.0)
        v2 = tl.load(p + sj, mask=m2, other=0.0)
        v3 = tl.load(p + sj + 1, mask=m2, other=0.0)
        v4 = tl.load(p + si, mask=m2, other=0.0)
        v5 = tl.load(p + si + 1, mask=m2, other=0.0)
        v6 = tl.load(p + si + sj, mask=m2, other=0.0)
        v7 = tl.load(p + si + sj + 1, mask=m2, other=0.0)
        c00 = v0 + (v1 - v0) * fz2
        c01 = v2 + (v3 - v2) * fz2
        c10 = v4 + (v5 - v4) * fz2
        c11 = v6 + (v7 - v6) * fz2
        c0 = c00 + (c01 - c00) * fy2
        c1 = c10 + (c11 - c10) * fy2
        acc += tl.where(m2, c0 + (c1 - c0) * fx2, 0.0)
    omask = rmask[:, None] & cmask[None, :]
    tl.store(out + rows[:, None] * C + chan[None, :], acc * h[:, None], mask=omask)


def _backward_kernel(
    volp,
    src,
    dirv,
    t0,
    t1,
    nsamp,
    grad_out,
    g_src,
    g_dirv,
    g_t0,
    g_t1,
    g_volp,
    R,
    C,
    sc,
    si,
    sj,
    lim_x,
    lim_y,
    lim_z,
    CP: tl.constexpr,
    BLOCK: tl.constexpr,
    BIG: tl.constexpr,
    NEED_POSE: tl.constexpr,
    NEED_VOL: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < R
    n, a, b, live, sx, sy, sz, dx, dy, dz = _sample_setup(src, dirv, t0, t1, nsamp, rows, rmask)
    nf = tl.maximum(n, 1).to(a.dtype)
    h = (b - a) / nf
    chan = tl.arange(0, CP)
    cmask = chan < C
    if BIG:
        coff = chan.to(tl.int64) * sc
    else:
        coff = chan * sc
    w = tl.load(grad_out + rows[:, None] * C + chan[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    wh = w * h[:, None]
    zero = tl.zeros([BLOCK], dtype=a.dtype)
    ax = zero  # Σ_k ∇f(p_k)
    ay = zero
    az = zero
    bx = zero  # Σ_k t_k ∇f(p_k)
    by = zero
    bz = zero
    cc = zero  # Σ_k c_k ∇f(p_k)·d
    sw = zero  # Σ_k f(p_k)
    nmax = tl.max(n, axis=0)
    for k in range(0, nmax):
        act = k < n
        ck = (k + 0.5) / nf
        t = a + ck * (b - a)
        base, fx, fy, fz = _locate(t, sx, sy, sz, dx, dy, dz, lim_x, lim_y, lim_z, si, sj, BIG)
        m2 = act[:, None] & cmask[None, :]
        fx2 = fx[:, None]
        fy2 = fy[:, None]
        fz2 = fz[:, None]
        off = base[:, None] + coff[None, :]
        if NEED_POSE:
            p = volp + off
            v0 = tl.load(p, mask=m2, other=0.0)
            v1 = tl.load(p + 1, mask=m2, other=0.0)
            v2 = tl.load(p + sj, mask=m2, other=0.0)
            v3 = tl.load(p + sj + 1, mask=m2, other=0.0)
            v4 = tl.load(p + si, mask=m2, other=0.0)
            v5 = tl.load(p + si + 1, mask=m2, other=0.0)
            v6 = tl.load(p + si + sj, mask=m2, other=0.0)
            v7 = tl.load(p + si + sj + 1, mask=m2, other=0.0)
            c00 = v0 + (v1 - v0) * fz2
            c01 = v2 + (v3 - v2) * fz2
            c10 = v4 + (v5 - v4) * fz2
            c11 = v6 + (v7 - v6) * fz2
            c0 = c00 + (c01 - c00) * fy2
            c1 = c10 + (c11 - c10) * fy2
            d0 = (v1 - v0) + ((v3 - v2) - (v1 - v0)) * fy2
            d1 = (v5 - v4) + ((v7 - v6) - (v5 - v4)) * fy2
            wm = tl.where(m2, w, 0.0)
            fv = tl.sum(wm * (c0 + (c1 - c0) * fx2), axis=1)
            gx = tl.sum(wm * (c1 - c0), axis=1)
            gy = tl.sum(wm * ((c01 - c00) + ((c11 - c10) - (c01 - c00)) * fx2), axis=1)
            gz = tl.sum(wm * (d0 + (d1 - d0) * fx2), axis=1)
            ax += gx
            ay += gy
            az += gz
            bx += t * gx
            by += t * gy
            bz += t * gz
            cc += ck * (gx * dx + gy * dy + gz * dz)
            sw += fv
        if NEED_VOL:
            q = g_volp + off
            ex = 1.0 - fx2
            ey = 1.0 - fy2
            ez = 1.0 - fz2
            tl.atomic_add(q, wh * (ex * ey * ez), mask=m2)
            tl.atomic_add(q + 1, wh * (ex * ey * fz2), mask=m2)
            tl.atomic_add(q + sj, wh * (ex * fy2 * ez), mask=m2)
            tl.atomic_add(q + sj + 1, wh * (ex * fy2 * fz2), mask=m2)
            tl.atomic_add(q + si, wh * (fx2 * ey * ez), mask=m2)
            tl.atomic_add(q + si + 1, wh * (fx2 * ey * fz2), mask=m2)
            tl.atomic_add(q + si + sj, wh * (fx2 * fy2 * ez), mask=m2)
            tl.atomic_add(q + si + sj + 1, wh * (fx2 * fy2 * fz2), mask=m2)
    if NEED_POSE:
        tl.store(g_src + rows * 3 + 0, h * ax, mask=rmask)
        tl.store(g_src + rows * 3 + 1, h * ay, mask=rmask)
        tl.store(g_src + rows * 3 + 2, h * az, mask=rmask)
        tl.store(g_dirv + rows * 3 + 0, h * bx, mask=rmask)
        tl.store(g_dirv + rows * 3 + 1, h * by, mask=rmask)
        tl.store(g_dirv + rows * 3 + 2, h * bz, mask=rmask)
        ad = ax * dx + ay * dy + az * dz
        tl.store(g_t0 + rows, tl.where(live, -sw / nf + h * (ad - cc), 0.0), mask=rmask)
        tl.store(g_t1 + rows, tl.where(live, sw / nf + h * cc, 0.0), mask=rmask)


def _thr_weighted(v, a1, b1, a2, b2, inv_w, e1, e2, e3, w0, w1, w2, w3):
    # Σ_c w_c f_c(v) and its derivative for the threshold transfer (see render._threshold)
    l1 = a1 * v + b1
    l2 = a2 * v + b2
    m = tl.minimum(l1, l2)
    dm = tl.where(l1 < l2, a1, a2)
    pos = m > 0.0
    rho = tl.where(pos, m, 0.0)
    drho = tl.where(pos, dm, 0.0)
    u1 = tl.minimum(tl.maximum((v - e1) * inv_w + 0.5, 0.0), 1.0)
    u2 = tl.minimum(tl.maximum((v - e2) * inv_w + 0.5, 0.0), 1.0)
    u3 = tl.minimum(tl.maximum((v - e3) * inv_w + 0.5, 0.0), 1.0)
    s1 = u1 * u1 * (3.0 - 2.0 * u1)
    s2 = u2 * u2 * (3.0 - 2.0 * u2)
    s3 = u3 * u3 * (3.0 - 2.0 * u3)
    d1 = 6.0 * u1 * (1.0 - u1) * inv_w
    d2 = 6.0 * u2 * (1.0 - u2) * inv_w
    d3 = 6.0 * u3 * (1.0 - u3) * inv_w
    mix = w0 * (1.0 - s1) + w1 * (s1 - s2) + w2 * (s2 - s3) + w3 * s3
    dmix = (w1 - w0) * d1 + (w2 - w1) * d2 + (w3 - w2) * d3
    return rho * mix, drho * mix + rho * dmix


def _thr_channels(v, a1, b1, a2, b2, inv_w, e1, e2, e3):
    # the four material channels ρ(v)·(S_c − S_{c+1}) of the threshold transfer
    rho = tl.maximum(tl.minimum(a1 * v + b1, a2 * v + b2), 0.0)
    u1 = tl.minimum(tl.maximum((v - e1) * inv_w + 0.5, 0.0), 1.0)
    u2 = tl.minimum(tl.maximum((v - e2) * inv_w + 0.5, 0.0), 1.0)
    u3 = tl.minimum(tl.maximum((v - e3) * inv_w + 0.5, 0.0), 1.0)
    s1 = u1 * u1 * (3.0 - 2.0 * u1)
    s2 = u2 * u2 * (3.0 - 2.0 * u2)
    s3 = u3 * u3 * (3.0 - 2.0 * u3)
    return rho * (1.0 - s1), rho * (s1 - s2), rho * (s2 - s3), rho * s3


def _interp8(volp, base, si, sj, fx, fy, fz, act):
    v0 = tl.load(volp + base, mask=act, other=0.0)
    v1 = tl.load(volp + base + 1, mask=act, other=0.0)
    v2 = tl.load(volp + base + sj, mask=act, other=0.0)
    v3 = tl.load(volp + base + sj + 1, mask=act, other=0.0)
    v4 = tl.load(volp + base + si, mask=act, other=0.0)
    v5 = tl.load(volp + base + si + 1, mask=act, other=0.0)
    v6 = tl.load(volp + base + si + sj, mask=act, other=0.0)
    v7 = tl.load(volp + base + si + sj + 1, mask=act, other=0.0)
    c00 = v0 + (v1 - v0) * fz
    c01 = v2 + (v3 - v2) * fz
    c10 = v4 + (v5 - v4) * fz
    c11 = v6 + (v7 - v6) * fz
    c0 = c00 + (c01 - c00) * fy
    c1 = c10 + (c11 - c10) * fy
    d0 = (v1 - v0) + ((v3 - v2) - (v1 - v0)) * fy
    d1 = (v5 - v4) + ((v7 - v6) - (v5 - v4)) * fy
    value = c0 + (c1 - c0) * fx
    gx = c1 - c0
    gy = (c01 - c00) + ((c11 - c10) - (c01 - c00)) * fx
    gz = d0 + (d1 - d0) * fx
    return value, gx, gy, gz


def _thr_forward_kernel(
    volp, src, dirv, t0, t1, nsamp, out, R, C, a1, b1, a2, b2, inv_w, e1, e2, e3,
    si, sj, lim_x, lim_y, lim_z, BLOCK: tl.constexpr, BIG: tl.constexpr,
):  # fmt: skip
    # scalar volume; each sample's value is mapped to up to four material channels in closed form
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < R
    n, a, b, _, sx, sy, sz, dx, dy, dz = _sample_setup(src, dirv, t0, t1, nsamp, rows, rmask)
    h = (b - a) / tl.maximum(n, 1)
    zero = tl.zeros([BLOCK], dtype=a.dtype)
    acc0 = zero
    acc1 = zero
    acc2 = zero
    acc3 = zero
    nmax = tl.max(n, axis=0)
    for k in range(0, nmax):
        act = k < n
        t = a + (k + 0.5) * h
        base, fx, fy, fz = _locate(t, sx, sy, sz, dx, dy, dz, lim_x, lim_y, lim_z, si, sj, BIG)
        v, _gx, _gy, _gz = _interp8(volp, base, si, sj, fx, fy, fz, act)
        f0, f1, f2, f3 = _thr_channels(v, a1, b1, a2, b2, inv_w, e1, e2, e3)
        acc0 += tl.where(act, f0, 0.0)
        acc1 += tl.where(act, f1, 0.0)
        acc2 += tl.where(act, f2, 0.0)
        acc3 += tl.where(act, f3, 0.0)
    tl.store(out + rows * C, acc0 * h, mask=rmask)
    tl.store(out + rows * C + 1, acc1 * h, mask=rmask & (C > 1))
    tl.store(out + rows * C + 2, acc2 * h, mask=rmask & (C > 2))
    tl.store(out + rows * C + 3, acc3 * h, mask=rmask & (C > 3))


def _thr_backward_kernel(
    volp, src, dirv, t0, t1, nsamp, grad_out, g_src, g_dirv, g_t0, g_t1, g_volp, R, C,
    a1, b1, a2, b2, inv_w, e1, e2, e3, si, sj, lim_x, lim_y, lim_z,
    BLOCK: tl.constexpr, BIG: tl.constexpr, NEED_POSE: tl.constexpr, NEED_VOL: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < R
    n, a, b, live, sx, sy, sz, dx, dy, dz = _sample_setup(src, dirv, t0, t1, nsamp, rows, rmask)
    nf = tl.maximum(n, 1).to(a.dtype)
    h = (b - a) / nf
    w0 = tl.load(grad_out + rows * C, mask=rmask, other=0.0)
    w1 = tl.load(grad_out + rows * C + 1, mask=rmask & (C > 1), other=0.0)
    w2 = tl.load(grad_out + rows * C + 2, mask=rmask & (C > 2), other=0.0)
    w3 = tl.load(grad_out + rows * C + 3, mask=rmask & (C > 3), other=0.0)
    zero = tl.zeros([BLOCK], dtype=a.dtype)
    ax = zero
    ay = zero
    az = zero
    bx = zero
    by = zero
    bz = zero
    cc = zero
    sw = zero
    nmax = tl.max(n, axis=0)
    for k in range(0, nmax):
        act = k < n
        ck = (k + 0.5) / nf
        t = a + ck * (b - a)
        base, fx, fy, fz = _locate(t, sx, sy, sz, dx, dy, dz, lim_x, lim_y, lim_z, si, sj, BIG)
        v, vx, vy, vz = _interp8(volp, base, si, sj, fx, fy, fz, act)
        fv, slope = _thr_weighted(v, a1, b1, a2, b2, inv_w, e1, e2, e3, w0, w1, w2, w3)
        fv = tl.where(act, fv, 0.0)
        slope = tl.where(act, slope, 0.0)
        if NEED_POSE:
            gx = slope * vx
            gy = slope * vy
            gz = slope * vz
            ax += gx
            ay += gy
            az += gz
            bx += t * gx
            by += t * gy
            bz += t * gz
            cc += ck * (gx * dx + gy * dy + gz * dz)
            sw += fv
        if NEED_VOL:
            q = g_volp + base
            wh = slope * h
            ex = 1.0 - fx
            ey = 1.0 - fy
            ez = 1.0 - fz
            tl.atomic_add(q, wh * (ex * ey * ez), mask=act)
            tl.atomic_add(q + 1, wh * (ex * ey * fz), mask=act)
            tl.atomic_add(q + sj, wh * (ex * fy * ez), mask=act)
            tl.atomic_add(q + sj + 1, wh * (ex * fy * fz), mask=act)
            tl.atomic_add(q + si, wh * (fx * ey * ez), mask=act)
            tl.atomic_add(q + si + 1, wh * (fx * ey * fz), mask=act)
            tl.atomic_add(q + si + sj, wh * (fx * fy * ez), mask=act)
            tl.atomic_add(q + si + sj + 1, wh * (fx * fy * fz), mask=act)
    if NEED_POSE:
        tl.store(g_src + rows * 3 + 0, h * ax, mask=rmask)
        tl.store(g_src + rows * 3 + 1, h * ay, mask=rmask)
        tl.store(g_src + rows * 3 + 2, h * az, mask=rmask)
        tl.store(g_dirv + rows * 3 + 0, h * bx, mask=rmask)
        tl.store(g_dirv + rows * 3 + 1, h * by, mask=rmask)
        tl.store(g_dirv + rows * 3 + 2, h * bz, mask=rmask)
        ad = ax * dx + ay * dy + az * dz
        tl.store(g_t0 + rows, tl.where(live, -sw / nf + h * (ad - cc), 0.0), mask=rmask)
        tl.store(g_t1 + rows, tl.where(live, sw / nf + h * cc, 0.0), mask=rmask)


@functools.cache
def _threshold_kernels() -> tuple[Any, Any]:
    """JIT the threshold-transfer kernels (once); see :func:`_kernels`."""
    global _thr_weighted, _thr_channels, _interp8, _thr_forward_kernel, _thr_backward_kernel
    _kernels()  # imports Triton and JITs the shared helpers
    import triton

    _thr_weighted = triton.jit(_thr_weighted)
    _thr_channels = triton.jit(_thr_channels)
    _interp8 = triton.jit(_interp8)
    _thr_forward_kernel = triton.jit(_thr_forward_kernel)
    _thr_backward_kernel = triton.jit(_thr_backward_kernel)
    return _thr_forward_kernel, _thr_backward_kernel


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Import Triton, JIT the kernels (once) and return the forward and backward kernels."""
    global tl, _sample_setup, _locate, _forward_kernel, _backward_kernel
    import triton
    import triton.language

    tl = triton.language
    _sample_setup = triton.jit(_sample_setup)
    _locate = triton.jit(_locate)
    _forward_kernel = triton.jit(_forward_kernel)
    _backward_kernel = triton.jit(_backward_kernel)
    return _forward_kernel, _backward_kernel


def _padded(vol: torch.Tensor) -> torch.Tensor:
    """``vol`` (C, I, J, K) padded by one replicated voxel on every spatial side, contiguous (cached)."""

    def make() -> torch.Tensor:
        return F.pad(vol.detach().unsqueeze(0), (1, 1, 1, 1, 1, 1), mode="replicate").squeeze(0).contiguous()

    return _LAYOUTS.get(vol, ("triton-pad",), make)


def _geometry(volp: torch.Tensor) -> dict[str, Any]:
    C, Ip, Jp, Kp = volp.shape
    return dict(
        C=C,
        sc=Ip * Jp * Kp,
        si=Jp * Kp,
        sj=Kp,
        lim_x=float(Ip - 2),
        lim_y=float(Jp - 2),
        lim_z=float(Kp - 2),
        CP=max(1, 1 << (C - 1).bit_length()),
        BLOCK=_BLOCK,
        BIG=volp.numel() >= 2**31,
    )


class TritonTrilinear(torch.autograd.Function):
    """``TritonTrilinear.apply(vol, src, dirv, t0, t1, nsamp)`` → ``(R, C)``, the Triton twin of the fused
    trilinear path, with its own backward (once differentiable) w.r.t. ``vol``, ``src``, ``dirv``, ``t0``, ``t1``.
    """

    @staticmethod
    def forward(ctx, vol, src, dirv, t0, t1, nsamp):  # type: ignore[override]
        if vol.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"TritonTrilinear: float32 or float64 volume expected, got {vol.dtype}")
        dtype, device = vol.dtype, vol.device
        volp = _padded(vol)
        src_ = src.detach().to(device=device, dtype=dtype).contiguous()
        dir_ = dirv.detach().to(device=device, dtype=dtype).contiguous()
        t0_ = t0.detach().to(device=device, dtype=dtype).contiguous()
        t1_ = t1.detach().to(device=device, dtype=dtype).contiguous()
        n_ = nsamp.detach().to(device=device, dtype=torch.int32).contiguous()
        R = src_.shape[0]
        out = torch.empty((R, vol.shape[0]), dtype=dtype, device=device)
        if R:
            fwd, _ = _kernels()
            geo = _geometry(volp)
            grid = ((R + _BLOCK - 1) // _BLOCK,)
            fwd[grid](volp, src_, dir_, t0_, t1_, n_, out, R, **geo, num_warps=_NUM_WARPS)
        ctx.save_for_backward(volp, src_, dir_, t0_, t1_, n_)
        ctx.dtypes = (src.dtype, dirv.dtype, t0.dtype, t1.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        volp, src_, dir_, t0_, t1_, n_ = ctx.saved_tensors
        need_vol, need_src, need_dir, need_t0, need_t1 = ctx.needs_input_grad[:5]
        need_pose = need_src or need_dir or need_t0 or need_t1
        R = src_.shape[0]
        go = grad_out.detach().to(volp.dtype).contiguous()
        gs = torch.zeros_like(src_)
        gd = torch.zeros_like(dir_)
        g0 = torch.zeros_like(t0_)
        g1 = torch.zeros_like(t1_)
        gvp = torch.zeros_like(volp) if need_vol else gs
        if R and (need_pose or need_vol):
            _, bwd = _kernels()
            geo = _geometry(volp)
            grid = ((R + _BLOCK - 1) // _BLOCK,)
            bwd[grid](
                volp,
                src_,
                dir_,
                t0_,
                t1_,
                n_,
                go,
                gs,
                gd,
                g0,
                g1,
                gvp,
                R,
                **geo,
                NEED_POSE=need_pose,
                NEED_VOL=need_vol,
                num_warps=_NUM_WARPS,
            )
        return (
            fold_padding(gvp) if need_vol else None,
            gs.to(ctx.dtypes[0]) if need_src else None,
            gd.to(ctx.dtypes[1]) if need_dir else None,
            g0.to(ctx.dtypes[2]) if need_t0 else None,
            g1.to(ctx.dtypes[3]) if need_t1 else None,
            None,
        )


class TritonThreshold(torch.autograd.Function):
    """``TritonThreshold.apply(vol, params, C, src, dirv, t0, t1, nsamp)`` → ``(R, C)``: trilinear marching of a
    scalar ``vol`` (1, I, J, K) through a threshold transfer (``params`` as in
    ``ThresholdTransfer.kernel_spec``), with its own backward w.r.t. ``vol``, ``src``, ``dirv``, ``t0``, ``t1``."""

    @staticmethod
    def forward(ctx, vol, params, C, src, dirv, t0, t1, nsamp):  # type: ignore[override]
        if vol.dtype not in (torch.float32, torch.float64) or vol.shape[0] != 1:
            raise TypeError(
                f"TritonThreshold: a float32/float64 scalar volume expected, got {vol.dtype} {tuple(vol.shape)}"
            )
        dtype, device = vol.dtype, vol.device
        volp = _padded(vol)
        src_ = src.detach().to(device=device, dtype=dtype).contiguous()
        dir_ = dirv.detach().to(device=device, dtype=dtype).contiguous()
        t0_ = t0.detach().to(device=device, dtype=dtype).contiguous()
        t1_ = t1.detach().to(device=device, dtype=dtype).contiguous()
        n_ = nsamp.detach().to(device=device, dtype=torch.int32).contiguous()
        R = src_.shape[0]
        out = torch.empty((R, C), dtype=dtype, device=device)
        prm = [float(x) for x in params]
        if R:
            fwd, _ = _threshold_kernels()
            geo = _geometry(volp)
            grid = ((R + _BLOCK - 1) // _BLOCK,)
            fwd[grid](
                volp, src_, dir_, t0_, t1_, n_, out, R, C, *prm,
                geo["si"], geo["sj"], geo["lim_x"], geo["lim_y"], geo["lim_z"],
                BLOCK=_BLOCK, BIG=geo["BIG"], num_warps=_NUM_WARPS,
            )  # fmt: skip
        ctx.save_for_backward(volp, src_, dir_, t0_, t1_, n_)
        ctx.prm = prm
        ctx.C = C
        ctx.dtypes = (src.dtype, dirv.dtype, t0.dtype, t1.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        volp, src_, dir_, t0_, t1_, n_ = ctx.saved_tensors
        need_vol = ctx.needs_input_grad[0]
        need_src, need_dir, need_t0, need_t1 = ctx.needs_input_grad[3:7]
        need_pose = need_src or need_dir or need_t0 or need_t1
        R = src_.shape[0]
        go = grad_out.detach().to(volp.dtype).contiguous()
        gs = torch.zeros_like(src_)
        gd = torch.zeros_like(dir_)
        g0 = torch.zeros_like(t0_)
        g1 = torch.zeros_like(t1_)
        gvp = torch.zeros_like(volp) if need_vol else gs
        if R and (need_pose or need_vol):
            _, bwd = _threshold_kernels()
            geo = _geometry(volp)
            grid = ((R + _BLOCK - 1) // _BLOCK,)
            bwd[grid](
                volp, src_, dir_, t0_, t1_, n_, go, gs, gd, g0, g1, gvp, R, ctx.C, *ctx.prm,
                geo["si"], geo["sj"], geo["lim_x"], geo["lim_y"], geo["lim_z"],
                BLOCK=_BLOCK, BIG=geo["BIG"], NEED_POSE=need_pose, NEED_VOL=need_vol, num_warps=_NUM_WARPS,
            )  # fmt: skip
        return (
            fold_padding(gvp) if need_vol else None,
            None,
            None,
            gs.to(ctx.dtypes[0]) if need_src else None,
            gd.to(ctx.dtypes[1]) if need_dir else None,
            g0.to(ctx.dtypes[2]) if need_t0 else None,
            g1.to(ctx.dtypes[3]) if need_t1 else None,
            None,
        )
