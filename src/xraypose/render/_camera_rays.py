"""Fused ray set-up for the CPU fast path: detector pixels → clipped rays in voxel-index space, and back.

For view ``b`` and pixel ``n`` the ray is ``src = M[b, :, 3]``, ``dirv = M[b, :, :3] @ p[n]`` where ``M`` is the
``(B, 3, 4)`` camera → voxel-index map (``affine⁻¹ · pose``) and ``p`` the pixel centres in camera mm. Doing this
in one parallel pass (instead of ~20 PyTorch operations over every ray) keeps the per-call overhead small.

The backward pass folds the integrals' gradients w.r.t. ``src``, ``dirv``, ``t0``, ``t1`` and the ray length in
mm into per-ray gradients w.r.t. ``src`` and ``dirv``, which the caller reduces to ``∂/∂M``. The interval
``[t0, t1]`` is the slab intersection with the box ``[lo, hi]`` clipped to ``[0, 1]``; ``t0`` depends on the ray
only through the axis that attains it (``t0 = (face − s_a)/d_a`` ⇒ ``∂t0/∂s_a = −1/d_a``,
``∂t0/∂d_a = −t0/d_a``), and not at all when the clip to 0 or 1 attains it or the ray misses.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["fold_ray_gradients", "setup_rays"]


@numba.njit(inline="always", cache=True, nogil=True)
def _slab(s, d, lo, hi, axis, enter, leave, a_in, a_out, empty):  # pragma: no cover - compiled
    """Intersect the running interval with one axis' slab ``[lo, hi]``."""
    if d == 0.0:
        if s < lo or s > hi:
            empty = True
        return enter, leave, a_in, a_out, empty
    ta = (lo - s) / d
    tb = (hi - s) / d
    if ta > tb:
        ta, tb = tb, ta
    if ta > enter:
        enter = ta
        a_in = axis
    if tb < leave:
        leave = tb
        a_out = axis
    return enter, leave, a_in, a_out, empty


@numba.njit(inline="always", cache=True, nogil=True)
def _walk_empty(s, d, t, limit, sign, occ, shift):  # pragma: no cover - compiled
    """Walk the ray ``s + t·d`` through the occupancy blocks of cells, from ``t`` towards ``limit`` (forward for
    ``sign = 1``, backward for ``-1``), while the blocks are empty.

    Block ``b`` holds the cells ``[b·2^shift, (b+1)·2^shift)`` of an axis (index coordinates
    ``[b·2^shift − ½, (b+1)·2^shift − ½)``). Returns the parameter of the face where the first occupied block
    is entered and the axis of that face (``-1``: ``t`` itself, already occupied), or ``limit`` and ``-2``
    when every block up to it is empty. A 3D DDA on the block grid: the block index is stepped, never
    recomputed, so rounding at a face can only cost a zero-length visit.
    """
    nb = occ.shape
    probe = t + sign * 1e-6 * abs(limit - t)
    b = np.empty(3, np.int64)
    tn = np.empty(3, np.float64)
    dtn = np.empty(3, np.float64)
    stp = np.empty(3, np.int64)
    for a in range(3):
        c = math.floor(s[a] + probe * d[a] + 0.5) >> shift
        b[a] = min(max(c, 0), nb[a] - 1)
        e = sign * d[a]
        if e == 0.0:
            tn[a] = np.inf
            dtn[a] = np.inf
            stp[a] = 0
        else:
            stp[a] = 1 if e > 0.0 else -1
            face = ((b[a] + (1 if e > 0.0 else 0)) << shift) - 0.5
            tn[a] = sign * (face - s[a]) / d[a]  # u = sign·t grows along the walk
            dtn[a] = (1 << shift) / abs(d[a])
    u = sign * t
    ulim = sign * limit
    axis = -1
    while True:
        if occ[b[0], b[1], b[2]] != 0:
            return sign * u, axis
        a = 0
        if tn[1] < tn[a]:
            a = 1
        if tn[2] < tn[a]:
            a = 2
        if tn[a] >= ulim:
            return limit, -2
        u = tn[a]
        axis = a
        b[a] += stp[a]
        if b[a] < 0 or b[a] >= nb[a]:
            return limit, -2
        tn[a] += dtn[a]


@numba.njit(parallel=True, cache=True, nogil=True)
def _setup(
    M, pix, lo, hi, A, step, fixed_n, occ, shift, src, dirv, t0, t1, ax0, ax1, ray_mm, nsamp
):  # pragma: no cover
    B = M.shape[0]
    N = pix.shape[1]
    shared = pix.shape[0] == 1
    for r in numba.prange(B * N):
        b = r // N
        n = r - b * N
        pb = 0 if shared else b
        px = pix[pb, n, 0]
        py = pix[pb, n, 1]
        pz = pix[pb, n, 2]
        s0 = M[b, 0, 3]
        s1 = M[b, 1, 3]
        s2 = M[b, 2, 3]
        d0 = M[b, 0, 0] * px + M[b, 0, 1] * py + M[b, 0, 2] * pz
        d1 = M[b, 1, 0] * px + M[b, 1, 1] * py + M[b, 1, 2] * pz
        d2 = M[b, 2, 0] * px + M[b, 2, 1] * py + M[b, 2, 2] * pz
        src[r, 0] = s0
        src[r, 1] = s1
        src[r, 2] = s2
        dirv[r, 0] = d0
        dirv[r, 1] = d1
        dirv[r, 2] = d2
        enter = -np.inf
        leave = np.inf
        a_in = -1
        a_out = -1
        empty = False
        enter, leave, a_in, a_out, empty = _slab(s0, d0, lo[0], hi[0], 0, enter, leave, a_in, a_out, empty)
        enter, leave, a_in, a_out, empty = _slab(s1, d1, lo[1], hi[1], 1, enter, leave, a_in, a_out, empty)
        enter, leave, a_in, a_out, empty = _slab(s2, d2, lo[2], hi[2], 2, enter, leave, a_in, a_out, empty)
        if enter < 0.0:
            enter = 0.0
            a_in = -1
        if leave > 1.0:
            leave = 1.0
            a_out = -1
        e0 = A[0, 0] * d0 + A[0, 1] * d1 + A[0, 2] * d2
        e1 = A[1, 0] * d0 + A[1, 1] * d1 + A[1, 2] * d2
        e2 = A[2, 0] * d0 + A[2, 1] * d1 + A[2, 2] * d2
        length = math.sqrt(e0 * e0 + e1 * e1 + e2 * e2)
        ray_mm[r] = length
        if shift < 30 and not empty and leave > enter:  # clip to the occupied blocks (exact: cells are zero)
            sv = src[r]
            dv = dirv[r]
            e2, a2 = _walk_empty(sv, dv, enter, leave, 1.0, occ, shift)
            if a2 == -2:
                empty = True
            else:
                if a2 >= 0:
                    enter = e2
                    a_in = a2
                l2, a3 = _walk_empty(sv, dv, leave, enter, -1.0, occ, shift)
                if a3 >= 0:
                    leave = l2
                    a_out = a3
        if empty or leave <= enter:
            t0[r] = 0.0 if empty else enter
            t1[r] = t0[r]
            ax0[r] = -1
            ax1[r] = -1
            nsamp[r] = 0
            continue
        t0[r] = enter
        t1[r] = leave
        ax0[r] = a_in
        ax1[r] = a_out
        if fixed_n > 0:
            nsamp[r] = fixed_n
        else:
            nsamp[r] = max(1, math.ceil((leave - enter) * length / step))


@numba.njit(parallel=True, cache=True, nogil=True)
def _fold(src, dirv, t0, t1, ax0, ax1, ray_mm, A2, g_src, g_dirv, g_t0, g_t1, g_len):  # pragma: no cover
    # In place: g_src, g_dirv become the total gradients of the ray (t0, t1 and length folded in).
    for r in numba.prange(src.shape[0]):
        a = ax0[r]
        if a >= 0:
            inv = 1.0 / dirv[r, a]
            g_src[r, a] -= g_t0[r] * inv
            g_dirv[r, a] -= g_t0[r] * t0[r] * inv
        a = ax1[r]
        if a >= 0:
            inv = 1.0 / dirv[r, a]
            g_src[r, a] -= g_t1[r] * inv
            g_dirv[r, a] -= g_t1[r] * t1[r] * inv
        if ray_mm[r] > 0.0 and g_len[r] != 0.0:
            scale = g_len[r] / ray_mm[r]
            for q in range(3):
                g_dirv[r, q] += scale * (
                    A2[q, 0] * dirv[r, 0] + A2[q, 1] * dirv[r, 1] + A2[q, 2] * dirv[r, 2]
                )


_NO_CELLS = (np.ones((1, 1, 1), dtype=np.uint8), 30)


def setup_rays(
    M: np.ndarray,
    pix: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    A: np.ndarray,
    step: float,
    fixed_n: int,
    cells: tuple[np.ndarray, int] | None = None,
) -> tuple[np.ndarray, ...]:
    """Build the rays of ``M`` (B, 3, 4) and pixels ``pix`` (1 or B, N, 3), clipped to the box ``[lo, hi]``.

    ``A`` (3, 3) maps index-space directions to mm (the affine's linear part, in the same axis order as ``M``'s
    rows). Returns ``src, dirv (R, 3), t0, t1 (R,), ax0, ax1 (R,) int8, ray_mm (R,), nsamp (R,) int32`` with
    ``R = B·N``; ``nsamp`` is ``fixed_n`` when positive, else ``ceil(chord_mm / step)``. ``cells``, an
    occupancy map of cell blocks (:func:`xraypose.render.siddon.cell_occupancy`), further clips each ray to
    the faces of its first and last occupied block (exact for piecewise-constant cells: the rest is zero).
    """
    B, N = M.shape[0], pix.shape[1]
    R = B * N
    dtype = M.dtype
    src = np.empty((R, 3), dtype)
    dirv = np.empty((R, 3), dtype)
    t0 = np.empty(R, dtype)
    t1 = np.empty(R, dtype)
    ax0 = np.empty(R, np.int8)
    ax1 = np.empty(R, np.int8)
    ray_mm = np.empty(R, dtype)
    nsamp = np.empty(R, np.int32)
    occ, shift = cells if cells is not None else _NO_CELLS
    _setup(
        M, pix, lo, hi, A, float(step), int(fixed_n), occ, shift, src, dirv, t0, t1, ax0, ax1, ray_mm, nsamp
    )
    return src, dirv, t0, t1, ax0, ax1, ray_mm, nsamp


def fold_ray_gradients(
    rays: tuple[np.ndarray, ...],
    A: np.ndarray,
    g_src: np.ndarray,
    g_dirv: np.ndarray,
    g_t0: np.ndarray,
    g_t1: np.ndarray,
    g_len: np.ndarray,
) -> None:
    """Fold ``∂/∂t0``, ``∂/∂t1`` and ``∂/∂ray_mm`` into ``g_src``, ``g_dirv`` (in place); see the module doc."""
    src, dirv, t0, t1, ax0, ax1, ray_mm, _ = rays
    A2 = np.ascontiguousarray(A.T @ A)
    _fold(src, dirv, t0, t1, ax0, ax1, ray_mm, A2, g_src, g_dirv, g_t0, g_t1, g_len)
