"""The :class:`Volume` container: a CT on a regular grid placed in the RAS+ world frame.

Conventions (see ``docs/conventions.md``):

- ``data[i, j, k]`` is the value (HU) of the voxel whose **centre** is at index ``(i, j, k)``;
  the volume occupies the box ``[-0.5, n - 0.5]`` along each index axis.
- ``affine`` (4×4, float64) maps voxel indices to world RAS+ millimetres:
  ``(x, y, z, 1)ᵀ = affine · (i, j, k, 1)ᵀ``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from xraypose.errors import InputError

__all__ = ["Volume"]

_Device = torch.device | str | None


def _as_tensor(value: object, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"Volume.{name}: expected a tensor or array, got {type(value).__name__}") from exc


def _check_labels(labels: object, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Validate a label map and return it as int16 (small ids) or int32, on ``device``."""
    lab = _as_tensor(labels, "labels")
    if tuple(lab.shape) != shape:
        raise InputError(f"Volume.labels: expected shape {shape} (same grid as data), got {tuple(lab.shape)}")
    if lab.is_floating_point():
        if not bool(torch.isfinite(lab).all()):
            raise InputError("Volume.labels: expected integer label ids, got non-finite values")
        if not bool((lab == torch.round(lab)).all()):
            raise InputError(f"Volume.labels: expected integer label ids, got non-integer {lab.dtype} values")
    elif lab.is_complex():
        raise InputError(f"Volume.labels: expected an integer tensor, got {lab.dtype}")
    if lab.numel() and int(lab.min()) < 0:
        raise InputError(f"Volume.labels: expected label ids >= 0, got minimum {int(lab.min())}")
    max_id = int(lab.max()) if lab.numel() else 0
    if max_id > torch.iinfo(torch.int32).max:
        raise InputError(f"Volume.labels: expected label ids <= 2**31 - 1, got {max_id}")
    if lab.dtype in (torch.int16, torch.int32):
        target = lab.dtype
    else:
        target = torch.int16 if max_id <= torch.iinfo(torch.int16).max else torch.int32
    return lab.to(device=device, dtype=target)


@dataclass(frozen=True, eq=False)
class Volume:
    """A CT volume on a regular grid with its voxel→world transform.

    Attributes:
        data: ``(I, J, K)`` tensor of CT values in Hounsfield units (HU), float32 by default;
            ``data[i, j, k]`` is the voxel centred on index ``(i, j, k)``. Floating tensors keep their dtype
            (see :meth:`to`); integer tensors and numpy arrays are converted to float32.
        affine: ``(4, 4)`` float64 tensor mapping voxel index ``(i, j, k, 1)`` to world RAS+ mm
            ``(x, y, z, 1)``. Kept on the same device as ``data``.
        labels: optional ``(I, J, K)`` integer label map on the same grid (0 = background), stored as int16
            (or int32 for ids above 32767).
        source: where the volume came from (a file path or a description), for messages.

    Raises:
        InputError: ``data`` is not 3D, empty or not finite; ``affine`` is not a finite 4×4 matrix with
            last row ``(0, 0, 0, 1)``, has a zero-length column (zero spacing) or is singular; ``labels`` has
            another shape, negative or non-integer ids.
    """

    data: torch.Tensor
    affine: torch.Tensor
    labels: torch.Tensor | None = None
    source: str | None = field(default=None)

    def __post_init__(self) -> None:
        data = _as_tensor(self.data, "data")
        if data.ndim != 3:
            raise InputError(
                f"Volume.data: expected a 3D tensor (I, J, K), got {data.ndim}D shape {tuple(data.shape)}"
            )
        if min(data.shape) < 1:
            raise InputError(
                f"Volume.data: expected at least one voxel per axis, got shape {tuple(data.shape)}"
            )
        if data.is_complex() or data.dtype == torch.bool:
            raise InputError(f"Volume.data: expected real HU values, got dtype {data.dtype}")
        if not data.is_floating_point() or not isinstance(self.data, torch.Tensor):
            data = data.to(torch.float32)
        # Fast path: a finite sum means every voxel is finite (NaN/inf propagate; float32 HU cannot overflow).
        if not bool(torch.isfinite(data.sum())) and (n_bad := int((~torch.isfinite(data)).sum())):
            raise InputError(f"Volume.data: expected finite HU values, got {n_bad} NaN/inf voxels")

        affine = _as_tensor(self.affine, "affine")
        if tuple(affine.shape) != (4, 4):
            raise InputError(f"Volume.affine: expected shape (4, 4), got {tuple(affine.shape)}")
        affine = affine.to(device=data.device, dtype=torch.float64)
        if not bool(torch.isfinite(affine).all()):
            raise InputError("Volume.affine: expected finite values, got NaN/inf")
        last = affine[3].cpu()
        if not torch.equal(last, torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)):
            raise InputError(f"Volume.affine: expected last row (0, 0, 0, 1), got {tuple(last.tolist())}")
        lin = affine[:3, :3].cpu()
        spacing = torch.linalg.vector_norm(lin, dim=0)
        if not bool((spacing > 0).all()):
            raise InputError(
                f"Volume.affine: expected voxel spacing > 0 mm on every axis, got {tuple(spacing.tolist())}"
            )
        det = float(torch.linalg.det(lin))
        if abs(det) <= 1e-9 * float(spacing.prod()):
            raise InputError(f"Volume.affine: expected an invertible matrix, got determinant {det:.3g}")

        labels = None if self.labels is None else _check_labels(self.labels, tuple(data.shape), data.device)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "labels", labels)

    # ------------------------------------------------------------------ properties
    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing.tolist())
        lab = "none" if self.labels is None else f"{self.labels.dtype}"
        return (
            f"Volume(shape={self.shape}, spacing_mm=({sp}), device={self.data.device}, labels={lab}, "
            f"source={self.source!r})"
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid size ``(I, J, K)`` in voxels."""
        i, j, k = self.data.shape
        return (int(i), int(j), int(k))

    @property
    def device(self) -> torch.device:
        """Device of ``data`` (and of ``affine`` and ``labels``)."""
        return self.data.device

    @property
    def spacing(self) -> torch.Tensor:
        """``(3,)`` float64: voxel size in mm along index axes i, j, k (column norms of the affine)."""
        return torch.linalg.vector_norm(self.affine[:3, :3], dim=0)

    @property
    def direction(self) -> torch.Tensor:
        """``(3, 3)`` float64: unit world (RAS) direction of each index axis, as columns."""
        return self.affine[:3, :3] / self.spacing

    @property
    def origin(self) -> torch.Tensor:
        """``(3,)`` float64: world RAS mm position of the centre of voxel ``(0, 0, 0)``."""
        return self.affine[:3, 3].clone()

    @property
    def center_world(self) -> torch.Tensor:
        """``(3,)`` float64: world RAS mm position of the centre of the box (index ``(n - 1) / 2``)."""
        c = (torch.tensor(self.shape, dtype=torch.float64, device=self.affine.device) - 1.0) / 2.0
        return self.affine[:3, :3] @ c + self.affine[:3, 3]

    @property
    def extent_mm(self) -> torch.Tensor:
        """``(3,)`` float64: physical length of the box along each index axis, ``n · spacing`` (mm)."""
        return torch.tensor(self.shape, dtype=torch.float64, device=self.affine.device) * self.spacing

    def corners_world(self) -> torch.Tensor:
        """``(8, 3)`` float64: world RAS mm corners of the box ``[-0.5, n - 0.5]³`` (i slowest, k fastest)."""
        ni, nj, nk = (n - 0.5 for n in self.shape)
        ijk = torch.tensor(
            [[i, j, k] for i in (-0.5, ni) for j in (-0.5, nj) for k in (-0.5, nk)],
            dtype=torch.float64,
            device=self.affine.device,
        )
        return self.index_to_world(ijk)

    def bounds_world(self) -> torch.Tensor:
        """``(2, 3)`` float64: axis-aligned world bounding box, rows ``(min xyz, max xyz)`` in RAS mm."""
        c = self.corners_world()
        return torch.stack([c.min(dim=0).values, c.max(dim=0).values])

    # ------------------------------------------------------------------ coordinates
    def _prep_points(self, pts: object, name: str) -> tuple[torch.Tensor, torch.dtype, torch.device]:
        t = pts if isinstance(pts, torch.Tensor) else torch.as_tensor(np.asarray(pts, dtype=np.float64))
        if t.ndim < 1 or t.shape[-1] != 3:
            raise InputError(f"Volume.{name}: expected points of shape (..., 3), got {tuple(t.shape)}")
        out_dtype = t.dtype if t.is_floating_point() else torch.float64
        return t.to(device=self.affine.device, dtype=torch.float64), out_dtype, t.device

    def index_to_world(self, ijk: torch.Tensor | Sequence[float] | np.ndarray) -> torch.Tensor:
        """Map continuous voxel indices ``(..., 3)`` to world RAS+ mm ``(..., 3)``.

        Computed in float64; the result has the input's floating dtype (float64 for integer input) and device.
        """
        p, dt, dev = self._prep_points(ijk, "index_to_world")
        out = p @ self.affine[:3, :3].T + self.affine[:3, 3]
        return out.to(device=dev, dtype=dt)

    def world_to_index(self, xyz: torch.Tensor | Sequence[float] | np.ndarray) -> torch.Tensor:
        """Map world RAS+ mm points ``(..., 3)`` to continuous voxel indices ``(..., 3)``.

        Voxel centres are at integer indices; dtype/device handling as in :meth:`index_to_world`.
        """
        p, dt, dev = self._prep_points(xyz, "world_to_index")
        inv = torch.linalg.inv(self.affine)
        out = p @ inv[:3, :3].T + inv[:3, 3]
        return out.to(device=dev, dtype=dt)

    # ------------------------------------------------------------------ copies
    def to(self, device: _Device = None, dtype: torch.dtype | None = None) -> Volume:
        """Return a copy on ``device`` with ``data`` cast to the floating ``dtype`` (both optional).

        ``affine`` stays float64 (moved to the same device) and ``labels`` keep their integer dtype.
        """
        if dtype is not None and not dtype.is_floating_point:
            raise InputError(f"Volume.to: expected a floating dtype for data, got {dtype}")
        data = self.data.to(device=device, dtype=dtype)
        return Volume(
            data=data,
            affine=self.affine.to(device=data.device),
            labels=None if self.labels is None else self.labels.to(device=data.device),
            source=self.source,
        )

    def with_labels(self, labels: torch.Tensor | np.ndarray | None) -> Volume:
        """Return a copy with ``labels`` (``(I, J, K)`` integer ids on this grid; ``None`` drops them)."""
        return Volume(data=self.data, affine=self.affine, labels=labels, source=self.source)

    def crop(self, start: Sequence[int], stop: Sequence[int]) -> Volume:
        """Return the sub-volume ``data[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]``.

        Indices are voxel indices (Python slice semantics, no negative values); world positions are preserved
        (the affine's translation moves to the new first voxel).
        """
        if len(start) != 3 or len(stop) != 3:
            raise InputError(
                f"Volume.crop: expected 3 start and 3 stop indices, got {len(start)} and {len(stop)}"
            )
        lo = [int(s) for s in start]
        hi = [int(s) for s in stop]
        for a in range(3):
            if not 0 <= lo[a] < hi[a] <= self.shape[a]:
                raise InputError(
                    f"Volume.crop: expected 0 <= start < stop <= {self.shape[a]} on axis {a}, "
                    f"got start={lo[a]}, stop={hi[a]}"
                )
        sl = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        affine = self.affine.clone()
        affine[:3, 3] = self.index_to_world(torch.tensor(lo, dtype=torch.float64, device=self.affine.device))
        labels = None if self.labels is None else self.labels[sl]
        return Volume(data=self.data[sl], affine=affine, labels=labels, source=self.source)

    # ------------------------------------------------------------------ resampling
    def resample(self, spacing_mm: float | Sequence[float], *, exact_spacing: bool = False) -> Volume:
        """Resample to a new voxel spacing (mm), isotropic (a number) or per index axis (3 numbers).

        The new grid has ``m = max(1, round(n · spacing / spacing_mm))`` voxels per axis. By default the box
        (world positions of its faces) is kept exactly and the actual spacing is ``n · spacing / m`` — the
        closest to the request that fits the box. With ``exact_spacing=True`` the requested spacing is used
        exactly and the new box (``m · spacing_mm`` long) is centred on the old box's centre.

        HU: along each axis, area averaging (exact overlap weights of the voxel cells) when the voxel
        grows, linear interpolation (as ``F.interpolate(mode="trilinear", align_corners=False)``) when it
        shrinks.
        Labels: nearest neighbour. Both are differentiable torch operations on the volume's device; the
        direction of the axes does not change.
        """
        if isinstance(spacing_mm, numbers.Real):
            req = [float(spacing_mm)] * 3
        else:
            req = [float(s) for s in spacing_mm]
        if len(req) != 3 or not all(math.isfinite(s) and s > 0 for s in req):
            raise InputError(
                f"Volume.resample: expected spacing_mm > 0 (one or three numbers), got {spacing_mm!r}"
            )
        old_sp = self.spacing.tolist()
        data = self.data
        labels = self.labels
        scale = []  # new step in old index units, per axis
        offset = []  # old index of new voxel 0, per axis
        for a in range(3):
            n = self.shape[a]
            length = n * old_sp[a]
            m = max(1, round(length / req[a]))
            if exact_spacing:
                r = req[a] / old_sp[a]
                o = (n - 1) / 2.0 - r * (m - 1) / 2.0
            else:
                r = n / m
                o = -0.5 + 0.5 * r
            scale.append(r)
            offset.append(o)
            if m == n and abs(r - 1.0) < 1e-12 and abs(o) < 1e-12:
                continue
            w = _axis_weights(n, m, r, o, device=data.device)
            data = torch.movedim(torch.tensordot(data, w.to(data.dtype), dims=([a], [1])), -1, a)
            if labels is not None:
                idx = torch.clamp(torch.floor(o + r * torch.arange(m, dtype=torch.float64) + 0.5), 0, n - 1)
                labels = torch.index_select(labels, a, idx.to(device=labels.device, dtype=torch.long))
        step = torch.eye(4, dtype=torch.float64, device=self.affine.device)
        step[:3, :3] = torch.diag(torch.tensor(scale, dtype=torch.float64, device=self.affine.device))
        step[:3, 3] = torch.tensor(offset, dtype=torch.float64, device=self.affine.device)
        return Volume(data=data.contiguous(), affine=self.affine @ step, labels=labels, source=self.source)

    # ------------------------------------------------------------------ labels
    def label_centroids(self) -> dict[int, torch.Tensor]:
        """World RAS+ mm centroid ``(3,)`` float64 of every non-zero label present, as ``{label id: xyz}``.

        Raises:
            InputError: the volume has no labels.
        """
        if self.labels is None:
            raise InputError("Volume.labels: expected a label map for label_centroids(), got None")
        lab = self.labels.detach().cpu().numpy().reshape(-1)
        pos = np.flatnonzero(
            lab
        )  # foreground voxels only; numpy's bincount is much faster than torch's on CPU
        out: dict[int, torch.Tensor] = {}
        if pos.size == 0:
            return out
        ids = lab[pos].astype(np.int64)
        _, nj, nk = self.shape
        counts = np.bincount(ids)
        coords = (pos // (nj * nk), (pos // nk) % nj, pos % nk)
        sums = np.stack(
            [np.bincount(ids, weights=c.astype(np.float64), minlength=counts.size) for c in coords]
        )
        present = np.flatnonzero(counts)
        ijk = torch.from_numpy((sums[:, present] / counts[present]).T.copy())
        xyz = self.index_to_world(ijk.to(self.affine.device))
        for row, lid in enumerate(present.tolist()):
            out[int(lid)] = xyz[row]
        return out


def _axis_weights(n: int, m: int, r: float, o: float, *, device: torch.device) -> torch.Tensor:
    """``(m, n)`` float64 matrix resampling one axis of ``n`` cells to ``m`` cells.

    New cell ``p`` is centred at old index ``o + r·p`` and is ``r`` old cells wide. For ``r > 1`` the weights
    are the overlap lengths of the new cell with the old cells (area average, normalised to 1 inside the box);
    otherwise linear interpolation between neighbouring old centres, clamped at the edges.
    """
    p = np.arange(m, dtype=np.float64)
    centre = o + r * p
    w = np.zeros((m, n), dtype=np.float64)
    if r > 1.0:
        lo = centre - r / 2.0
        hi = centre + r / 2.0
        q = np.arange(n, dtype=np.float64)
        overlap = np.minimum(hi[:, None], q[None, :] + 0.5) - np.maximum(lo[:, None], q[None, :] - 0.5)
        w = np.clip(overlap, 0.0, None)
        tot = w.sum(axis=1)
        for row in np.nonzero(tot <= 0)[0]:  # a new cell wholly outside the box: nearest old cell
            w[row, int(np.clip(np.floor(centre[row] + 0.5), 0, n - 1))] = 1.0
        w /= w.sum(axis=1, keepdims=True)
    else:
        src = np.clip(centre, 0.0, n - 1)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        f = src - i0
        rows = np.arange(m)
        np.add.at(w, (rows, i0), 1.0 - f)
        np.add.at(w, (rows, i1), f)
    return torch.from_numpy(w).to(device)
