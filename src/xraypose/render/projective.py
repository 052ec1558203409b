"""The projective spatial transformer (ProST, Gao et al. 2020): projections of a multi-channel volume on a
fixed cone-beam grid, differentiable (twice) with respect to the pose and the volume.

ProST turns a spatial transformer into a DRR: a grid of 3D sample points is generated **once** in a canonical
source frame from the camera intrinsics, **moved by the pose** as one batched rigid transform into the
volume, trilinearly sampled (any number of channels ``C``: a learned 3D feature volume projects like a CT)
and integrated along each ray. It runs on the ray engine's pieces: the rays are those of
:func:`~xraypose.render.render` (the camera → voxel-index map ``M = affine⁻¹ · pose`` applied to the pixel
centres), the samples are read by the engine's gather-based trilinear sampler (edge-replicated inside the
volume box ``[-½, n − ½]``, zero outside, as the engine's trilinear renderer), and every sample is weighted
by its step length in mm, so the result is the line integral ``∫ vol ds`` (dimensionless for μ in 1/mm), not
a bare sum.

Frames and units
----------------
The canonical grid lives in the camera frame (``docs/conventions.md``): the source at the origin, pixel
``(r, c)`` at ``p_n = ((c − cx)·dx, (r − cy)·dy, sdd)`` mm. Ray ``n`` is ``t ↦ t·p_n`` with ``t = 0`` at the
source and ``t = 1`` at the detector, so its depth is ``t·sdd`` for every pixel and one set of parameters
``t_k`` is a set of planes parallel to the detector shared by all rays of a view. ``limits`` chooses them:

* ``"corners"`` (ProST): ``[t_near, t_far]`` spans the depths of the 8 corners of the posed volume box
  (``t = z / sdd``, clipped to the source–detector segment ``[0, 1]``), ``K`` midpoints
  ``t_k = t_near + (k + ½)(t_far − t_near)/K``; a sample outside the box contributes nothing. The limits
  follow the pose (they are differentiable: the function is smooth where no corner changes rank), but the
  grid itself is the same ``u_k = (k + ½)/K`` for every call: ``grid · diag`` scaling, then ``M``.
* ``"box"``: every ray clipped to the volume box (:func:`~xraypose.render.box_intersection`) and sampled at
  ``K`` midpoints of its own chord: exactly the engine's trilinear marching with ``n_samples = K``
  (:func:`~xraypose.render.integrate_rays`), so on one channel this equals
  ``render(..., method="trilinear", n_samples=K, multires=False)``. It runs on the engine's fused CPU kernels
  when no higher-order gradient is needed and on its PyTorch reference otherwise.

Each sample of ray ``n`` is weighted by ``h_n = Δt · |A · M_lin · p_n|`` mm (``A`` the voxel → mm linear map;
``|p_n|`` for a rigid pose), ``Δt = (t_far − t_near)/K``.

Gradients
---------
Pure PyTorch (``"corners"``, and ``"box"`` inside :func:`~xraypose.render.double_differentiable`), so autograd
differentiates it with respect to the pose, the volume and the affine, to any order: ProST's double-backward
training takes ``∂S/∂pose`` with ``create_graph=True`` and backpropagates a loss of it into the network that
made the volume. Memory is ``O(B · pixels · K · C)``; keep detectors and ``K`` small on the CPU.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..errors import GeometryError, InputError
from ..geometry.camera import Camera, Intrinsics
from .engine import Backend, _needs_create_graph, box_intersection, integrate_rays
from .trilinear import _sample_trilinear

__all__ = ["Limits", "ProjectiveGrid", "projective_transform"]

Limits = Literal["corners", "box"]
LIMITS: tuple[str, ...] = ("corners", "box")


class ProjectiveGrid:
    """The canonical cone-beam grid of a detector: pixel centres (camera mm, ``t = 1``) and ``K`` normalised
    sample positions ``u_k = (k + ½)/K`` along each ray; built once, reused for every pose.

    Args:
        intrinsics: the detector.
        n_samples: samples ``K`` per ray between the near and far limits.
        dtype, device: of the stored grid.
    """

    def __init__(
        self,
        intrinsics: Intrinsics,
        n_samples: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(intrinsics, Intrinsics):
            raise InputError(
                f"ProjectiveGrid: 'intrinsics' must be Intrinsics; got {type(intrinsics).__name__}"
            )
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise InputError(f"ProjectiveGrid: 'n_samples' must be a positive integer; got {n_samples!r}")
        self.intrinsics = intrinsics
        self.n_samples = n_samples
        self.pixels = intrinsics.pixel_points(None, dtype=dtype, device=device)  # (N, 3) camera mm
        self.u = (torch.arange(n_samples, dtype=dtype, device=device) + 0.5) / n_samples  # (K,)

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> ProjectiveGrid:
        """This grid in another dtype / on another device (a new object unless nothing changes)."""
        if self.pixels.dtype == dtype and (device is None or self.pixels.device == torch.device(device)):
            return self
        return ProjectiveGrid(
            self.intrinsics, self.n_samples, dtype=dtype, device=device or self.pixels.device
        )


def _box_corners(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 8 corners of the index box ``[-½, n − ½]³`` as homogeneous ``(8, 4)`` points."""
    lo = torch.full((3,), -0.5, dtype=dtype, device=device)
    hi = torch.tensor(shape, dtype=dtype, device=device) - 0.5
    idx = torch.tensor([[(i >> a) & 1 for a in range(3)] for i in range(8)], dtype=torch.bool, device=device)
    pts = torch.where(idx, hi, lo)
    return torch.cat([pts, torch.ones(8, 1, dtype=dtype, device=device)], -1)


def near_far(
    affine: torch.Tensor, shape: tuple[int, int, int], pose: torch.Tensor, sdd: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray parameters ``(t_near, t_far)`` ``(B,)`` spanning the depths of the posed volume box's corners
    (``t = depth / sdd``), clipped to ``[0, 1]`` (source to detector). Differentiable w.r.t. the pose."""
    corners = _box_corners(shape, pose.dtype, pose.device) @ affine.to(pose.dtype).T  # (8, 4) world
    world_to_cam = torch.linalg.inv(pose)  # (B, 4, 4); differentiable, exact for rigid poses
    depth = corners @ world_to_cam[:, 2, :].unsqueeze(-1)  # (B, 8, 1)
    t = depth[..., 0] / sdd
    t_near = t.amin(-1).clamp(0.0, 1.0)
    t_far = t.amax(-1).clamp(0.0, 1.0)
    return t_near, torch.maximum(t_near, t_far)


def projective_transform(
    volume: torch.Tensor,
    affine: torch.Tensor,
    camera: Camera,
    *,
    n_samples: int = 128,
    limits: Limits = "corners",
    grid: ProjectiveGrid | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Project a ``(C, I, J, K)`` volume through a batch of cameras on ProST's canonical grid (module docstring).

    Args:
        volume: values per voxel and channel (e.g. μ in 1/mm, or learned features), float32 or float64; a
            ``(I, J, K)`` volume is one channel.
        affine: ``(4, 4)`` voxel-index → world (RAS mm) map of ``volume`` (any shape, spacing, orientation).
        camera: detector and ``B`` camera-to-world poses; differentiable w.r.t. ``camera.pose``.
        n_samples: ``K`` samples per ray.
        limits: ``"corners"`` (ProST's near/far planes from the posed box's corners) or ``"box"`` (each ray
            clipped to the box: the engine's trilinear marching).
        grid: a prebuilt :class:`ProjectiveGrid` of ``camera.intrinsics`` and ``n_samples`` (built if ``None``).
        backend: ``"box"`` only: the engine backend (``"auto"``: fused CPU kernels unless inside
            :func:`~xraypose.render.double_differentiable`, then the PyTorch reference).
    Returns:
        ``(B, C, rows, cols)`` line integrals ``Σ_k vol(p_k) · h`` (the volume's unit × mm).
    Raises:
        GeometryError: an X-ray source lies inside the volume box.
    """
    if not isinstance(volume, torch.Tensor) or not volume.is_floating_point() or volume.ndim not in (3, 4):
        got = tuple(volume.shape) if isinstance(volume, torch.Tensor) else type(volume).__name__
        raise InputError(f"projective_transform: 'volume' must be a float (C, I, J, K) tensor; got {got}")
    if volume.ndim == 3:
        volume = volume.unsqueeze(0)
    if min(volume.shape[1:]) < 2:
        raise InputError(
            f"projective_transform: every spatial axis needs at least 2 voxels; got {tuple(volume.shape[1:])}"
        )
    if not isinstance(affine, torch.Tensor) or affine.shape != (4, 4) or not affine.is_floating_point():
        raise InputError("projective_transform: 'affine' must be a floating (4, 4) voxel-to-world matrix")
    if not isinstance(camera, Camera):
        raise InputError(f"projective_transform: 'camera' must be a Camera; got {type(camera).__name__}")
    if limits not in LIMITS:
        raise InputError(f"projective_transform: 'limits' must be one of {LIMITS}; got {limits!r}")
    intr = camera.intrinsics
    if grid is None:
        grid = ProjectiveGrid(intr, n_samples, dtype=volume.dtype, device=volume.device)
    elif not isinstance(grid, ProjectiveGrid) or grid.intrinsics != intr or grid.n_samples != n_samples:
        raise InputError("projective_transform: 'grid' was built for another detector or sample count")
    grid = grid.to(volume.dtype, volume.device)
    dtype, device = volume.dtype, volume.device
    C = volume.shape[0]
    shape = tuple(int(s) for s in volume.shape[1:])
    affine = affine.to(dtype=dtype, device=device)
    pose = camera.pose.to(dtype=dtype, device=device)
    B = pose.shape[0]
    M = (torch.linalg.inv(affine) @ pose)[:, :3, :]  # camera mm → voxel index
    src = M[:, :, 3]  # (B, 3) the source in index coordinates
    hi = torch.tensor(shape, dtype=dtype, device=device) - 0.5
    inside = ((src.detach() > -0.5) & (src.detach() < hi)).all(-1)
    if bool(inside.any()):
        b = int(inside.nonzero()[0, 0])
        raise GeometryError(
            f"camera pose {b}: the X-ray source at {pose[b, :3, 3].detach().tolist()} mm (world) lies inside "
            "the volume; move the source outside the CT"
        )
    dirv = grid.pixels @ M[:, :, :3].transpose(-1, -2)  # (B, N, 3) index units per unit t
    ray_mm = (dirv @ affine[:3, :3].T).norm(dim=-1)  # (B, N) mm per unit t
    N = dirv.shape[1]
    if limits == "box":
        src_r = src[:, None, :].expand(B, N, 3).reshape(-1, 3)
        dir_r = dirv.reshape(-1, 3)
        t0, t1 = box_intersection(src_r, dir_r, shape)  # type: ignore[arg-type]
        nsamp = torch.full_like(t0, n_samples, dtype=torch.int32)
        nsamp[t1 <= t0] = 0
        if backend == "auto" and _needs_create_graph():
            backend = "reference"
        integral = integrate_rays(volume, src_r, dir_r, t0, t1, nsamp=nsamp, backend=backend)  # (BN, C)
        line = integral.reshape(B, N, C) * ray_mm[..., None]
        return line.movedim(-1, 1).reshape(B, C, intr.rows, intr.cols)
    t_near, t_far = near_far(affine, shape, pose, intr.sdd)  # (B,)
    t = t_near[:, None] + grid.u[None, :] * (t_far - t_near)[:, None]  # (B, K)
    # the canonical grid, scaled to this view's limits, moved by the pose as one batched transform
    canon = t[:, None, :, None] * grid.pixels[None, :, None, :]  # (B, N, K, 3) camera mm
    points = canon.reshape(B, -1, 3) @ M[:, :, :3].transpose(-1, -2) + src[:, None, :]  # (B, NK, 3)
    inside_box = ((points.detach() >= -0.5) & (points.detach() <= hi)).all(-1)  # (B, NK)
    values = _sample_trilinear(volume, points) * inside_box[..., None]  # (B, NK, C)
    h = ((t_far - t_near) / n_samples)[:, None] * ray_mm  # (B, N) mm per sample
    line = values.reshape(B, N, n_samples, C).sum(2) * h[..., None]  # (B, N, C)
    return line.movedim(-1, 1).reshape(B, C, intr.rows, intr.cols)
