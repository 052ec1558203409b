"""Transfer functions: a scalar volume (e.g. HU) mapped to several channels *at each ray sample*.

Two kinds share one interface (:class:`Transfer`): a tabulated :class:`TransferFunction` (any shape) and the
closed-form :class:`ThresholdTransfer` (a piecewise-linear density split into materials by smooth
thresholds — the physics renderer's model, evaluated exactly and faster than a table lookup).

A :class:`TransferFunction` is a piecewise-linear map ``f: ℝ → ℝ^C`` tabulated on uniform knots
``x_k = x0 + k·dx`` (``k = 0 … K−1``), extended linearly beyond the end knots. The ray engine applies it
after trilinear interpolation of the scalar volume (*post-classification*): one pass over the rays
accumulates ``∫ f_c(v(s)) ds`` for every channel ``c``, at the cost of one interpolation per sample. The
physics renderer uses it to turn HU into one density channel per material (see
:mod:`xraypose.physics.materials`).

Siddon's voxels are piecewise constant, so for Siddon (and on the PyTorch reference path for Siddon) the
map is applied voxel by voxel before integrating, which is the same thing for that model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError

__all__ = ["ThresholdTransfer", "Transfer", "TransferFunction"]


class Transfer:
    """Interface of a per-sample map from a scalar to ``C`` channels (see the module docstring)."""

    names: tuple[str, ...]

    @property
    def channels(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def zero_below(self) -> float | None:  # pragma: no cover - abstract
        """Largest ``a`` such that every channel is zero for all ``v ≤ a`` (``None`` if there is none)."""
        raise NotImplementedError

    def __call__(self, values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Evaluate at ``values`` (any shape) → ``(..., C)``; differentiable w.r.t. ``values``."""
        raise NotImplementedError

    def kernel_spec(self, dtype: torch.dtype) -> tuple[int, np.ndarray, np.ndarray, int]:  # pragma: no cover
        """``(kind, table, params, C)`` for the fused kernels."""
        raise NotImplementedError

    def apply_to_volume(self, volume: torch.Tensor) -> torch.Tensor:
        """Classify a scalar ``(I, J, K)`` (or ``(1, I, J, K)``) volume voxel by voxel → ``(C, I, J, K)``."""
        if volume.ndim == 4:
            if volume.shape[0] != 1:
                raise InputError(f"transfer function: expected one scalar channel, got {volume.shape[0]}")
            volume = volume[0]
        return self(volume).movedim(-1, 0).contiguous()


@dataclass(frozen=True, eq=False)
class TransferFunction(Transfer):
    """Piecewise-linear map from a scalar (e.g. HU) to ``C`` channels.

    Args:
        x0: first knot, in the scalar's unit (e.g. HU).
        dx: knot spacing (> 0), same unit.
        table: ``(K, C)`` channel values at the knots (``K ≥ 2``), float64 (stored as given).
        names: optional channel names (length ``C``).
    """

    x0: float
    dx: float
    table: torch.Tensor
    names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not (math.isfinite(self.x0) and math.isfinite(self.dx) and self.dx > 0):
            raise InputError(
                f"transfer function: expected finite x0 and dx > 0, got x0={self.x0}, dx={self.dx}"
            )
        table = torch.as_tensor(self.table, dtype=torch.float64).detach().cpu()
        if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] < 1:
            raise InputError(f"transfer function: expected a (K ≥ 2, C ≥ 1) table, got {tuple(table.shape)}")
        if not bool(torch.isfinite(table).all()):
            raise InputError("transfer function: the table holds NaN or inf")
        if self.names and len(self.names) != table.shape[1]:
            raise InputError(
                f"transfer function: {len(self.names)} names for {table.shape[1]} channels: {self.names}"
            )
        object.__setattr__(self, "table", table.contiguous())
        object.__setattr__(self, "names", tuple(self.names))

    @classmethod
    def from_function(
        cls,
        fn: Callable[[torch.Tensor], torch.Tensor],
        lo: float,
        hi: float,
        dx: float,
        names: Sequence[str] = (),
    ) -> TransferFunction:
        """Tabulate ``fn`` (``(K,)`` float64 → ``(K, C)``) on knots ``lo, lo + dx, …`` up to at least ``hi``."""
        if not hi > lo:
            raise InputError(f"transfer function: expected hi > lo, got lo={lo}, hi={hi}")
        k = math.ceil((hi - lo) / dx - 1e-9) + 1
        x = lo + dx * torch.arange(max(k, 2), dtype=torch.float64)
        table = fn(x)
        if table.ndim == 1:
            table = table.unsqueeze(-1)
        return cls(float(lo), float(dx), table, tuple(names))

    @property
    def channels(self) -> int:
        return int(self.table.shape[1])

    @property
    def knots(self) -> torch.Tensor:
        """``(K,)`` knot positions."""
        return self.x0 + self.dx * torch.arange(self.table.shape[0], dtype=torch.float64)

    @property
    def zero_below(self) -> float | None:
        """Largest ``a`` such that every channel is zero for all ``v ≤ a`` (``None`` if there is none).

        Trilinear interpolation of values ``≤ a`` stays ``≤ a``, so voxels at or below it can be skipped as
        empty space.
        """
        nz = (self.table != 0).any(1)
        if bool(nz[0]) or bool(nz[1]):
            return None
        first = int(nz.nonzero()[0, 0]) if bool(nz.any()) else self.table.shape[0]
        return self.x0 + (first - 1) * self.dx

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """Evaluate at ``values`` (any shape) → ``(..., C)``; differentiable w.r.t. ``values``."""
        table = self.table.to(dtype=values.dtype, device=values.device)
        s = (values - self.x0) / self.dx
        i = s.detach().floor().clamp(0, table.shape[0] - 2).long()
        u = (s - i.to(values.dtype)).unsqueeze(-1)
        lo = table[i]
        return lo + (table[i + 1] - lo) * u

    def kernel_spec(self, dtype: torch.dtype) -> tuple[int, np.ndarray, np.ndarray, int]:
        """``(0, packed table, [x0, 1/dx], C)`` for the fused kernels.

        The packed table is ``(K, 2W)`` with ``W = 4`` for up to four channels (else ``W = C``): row ``k`` holds
        the channel values at knot ``k`` (zero-padded to ``W``), then their differences to knot ``k + 1`` (the
        last row repeats the previous differences), so one sample reads one contiguous row.
        """
        C = self.channels
        width = 4 if C <= 4 else C
        tab = self.table
        packed = torch.zeros((tab.shape[0], 2 * width), dtype=torch.float64)
        packed[:, :C] = tab
        diff = tab[1:] - tab[:-1]
        packed[:-1, width : width + C] = diff
        packed[-1, width : width + C] = diff[-1]
        params = np.array([float(self.x0), 1.0 / float(self.dx)])
        return 0, np.ascontiguousarray(packed.to(dtype).numpy()), params, C


@dataclass(frozen=True, eq=False)
class ThresholdTransfer(Transfer):
    """A piecewise-linear density split into up to four ordered materials by C¹ smooth thresholds.

    ``f_c(v) = ρ(v) · (S_c(v) − S_{c+1}(v))`` with ``ρ(v) = max(min(a1·v + b1, a2·v + b2), 0)``, ``S_0 ≡ 1``,
    ``S_C ≡ 0`` and ``S_c`` the cubic smoothstep rising from 0 at ``e_c − w/2`` to 1 at ``e_c + w/2``. The
    channels sum to ``ρ``. Evaluated in closed form in the kernels (no table).

    Args:
        density: ``(a1, b1, a2, b2)``, slopes per unit of ``v`` and intercepts (both slopes > 0).
        edges: ``C − 1`` increasing thresholds (unit of ``v``), ``1 ≤ C ≤ 4``.
        width: transition width ``w > 0`` (unit of ``v``).
        names: optional channel names.
    """

    density: tuple[float, float, float, float]
    edges: tuple[float, ...]
    width: float
    names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        d = tuple(float(x) for x in self.density)
        e = tuple(float(x) for x in self.edges)
        if len(d) != 4 or not all(math.isfinite(x) for x in d) or d[0] <= 0 or d[2] <= 0:
            raise InputError(
                f"threshold transfer: expected density (a1, b1, a2, b2) with a1, a2 > 0, got {d}"
            )
        if (
            len(e) > 3
            or not all(math.isfinite(x) for x in e)
            or any(b <= a for a, b in itertools.pairwise(e))
        ):
            raise InputError(f"threshold transfer: expected up to 3 increasing finite edges, got {e}")
        if not (math.isfinite(self.width) and self.width > 0):
            raise InputError(f"threshold transfer: expected a width > 0, got {self.width}")
        if self.names and len(self.names) != len(e) + 1:
            raise InputError(f"threshold transfer: {len(self.names)} names for {len(e) + 1} channels")
        object.__setattr__(self, "density", d)
        object.__setattr__(self, "edges", e)
        object.__setattr__(self, "width", float(self.width))
        object.__setattr__(self, "names", tuple(self.names))

    @property
    def channels(self) -> int:
        return len(self.edges) + 1

    @property
    def zero_below(self) -> float | None:
        a1, b1, a2, b2 = self.density
        return max(-b1 / a1, -b2 / a2)

    def _step(self, values: torch.Tensor, edge: float) -> torch.Tensor:
        u = ((values - edge) / self.width + 0.5).clamp(0.0, 1.0)
        return u * u * (3.0 - 2.0 * u)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        a1, b1, a2, b2 = self.density
        rho = torch.clamp(torch.minimum(a1 * values + b1, a2 * values + b2), min=0.0)
        steps = (
            [torch.ones_like(values)]
            + [self._step(values, e) for e in self.edges]
            + [torch.zeros_like(values)]
        )
        return torch.stack([rho * (steps[c] - steps[c + 1]) for c in range(self.channels)], -1)

    def kernel_spec(self, dtype: torch.dtype) -> tuple[int, np.ndarray, np.ndarray, int]:
        """``(1, unused table, [a1, b1, a2, b2, 1/w, e1, e2, e3], C)``; missing edges are 1e30 (steps of 0)."""
        edges = list(self.edges) + [1e30] * (3 - len(self.edges))
        params = np.array([*self.density, 1.0 / self.width, *edges], dtype=np.float64)
        return 1, np.zeros((2, 8), dtype=torch.empty(0, dtype=dtype).numpy().dtype), params, self.channels
