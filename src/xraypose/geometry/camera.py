"""The C-arm as a pinhole X-ray camera: intrinsics, extrinsics (pose), projection and standard views.

Frames and units are defined in ``docs/conventions.md``: the source is the camera origin, +z is the principal
ray towards the detector plane ``z = sdd`` (mm), +x runs along detector columns and +y along rows. The pose of
a camera is ``T_world_from_camera``, a ``(B, 4, 4)`` rigid transform into the CT's RAS world (mm).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_write_text
from ..errors import FileFormatError, GeometryError, InputError
from .rotations import axis_angle_to_matrix
from .se3 import invert, make_transform, transform_points

__all__ = ["Camera", "Intrinsics", "ap_view", "carm_pose", "validate_pose"]

# Rotation taking camera axes to world axes for the AP view (columns = camera x, y, z in world RAS).
_R_AP = ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, -1.0, 0.0))


@dataclass(frozen=True)
class Intrinsics:
    """Detector geometry of a cone-beam X-ray camera.

    Attributes:
        sdd: source-to-detector distance along the principal ray, mm (> 0).
        rows: detector height in pixels (image rows, ≥ 1).
        cols: detector width in pixels (image columns, ≥ 1).
        dy: pixel spacing between rows, mm (> 0).
        dx: pixel spacing between columns, mm (> 0).
        x0: principal-point offset along columns, mm: the principal point is at column
            ``(cols - 1)/2 + x0/dx``.
        y0: principal-point offset along rows, mm: the principal point is at row ``(rows - 1)/2 + y0/dy``.
    """

    sdd: float
    rows: int
    cols: int
    dy: float
    dx: float
    x0: float = 0.0
    y0: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"Intrinsics.{name}: expected a positive integer pixel count, got {value!r}")
        for name in ("sdd", "dy", "dx"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InputError(f"Intrinsics.{name}: expected a positive finite length in mm, got {value!r}")
        for name in ("x0", "y0"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"Intrinsics.{name}: expected a finite offset in mm, got {value!r}")

    @property
    def cx(self) -> float:
        """Column coordinate of the principal point, pixels."""
        return (self.cols - 1) / 2 + self.x0 / self.dx

    @property
    def cy(self) -> float:
        """Row coordinate of the principal point, pixels."""
        return (self.rows - 1) / 2 + self.y0 / self.dy

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)``."""
        return (self.rows, self.cols)

    @property
    def num_pixels(self) -> int:
        return self.rows * self.cols

    def matrix(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The 3×3 intrinsic matrix ``K`` (pixels)."""
        return torch.tensor(
            [[self.sdd / self.dx, 0.0, self.cx], [0.0, self.sdd / self.dy, self.cy], [0.0, 0.0, 1.0]],
            dtype=dtype,
            device=device,
        )

    def resized(self, rows: int, cols: int | None = None) -> Intrinsics:
        """The same physical detector (extent and principal point) sampled on ``rows × cols`` pixels."""
        cols = rows if cols is None else cols
        return Intrinsics(
            sdd=self.sdd,
            rows=rows,
            cols=cols,
            dy=self.dy * self.rows / rows,
            dx=self.dx * self.cols / cols,
            x0=self.x0,
            y0=self.y0,
        )

    def pixel_points(
        self,
        pixels: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Camera-frame coordinates (mm) of detector pixel centres.

        Args:
            pixels: flat pixel indices ``row * cols + col``, any shape ``(...)``; all pixels in row-major
                order when ``None``.
        Returns:
            ``(..., 3)`` points on the plane ``z = sdd``.
        """
        if pixels is None:
            pixels = torch.arange(self.num_pixels, device=device)
        else:
            pixels = validate_pixels(pixels, self)
            device = pixels.device
        r = torch.div(pixels, self.cols, rounding_mode="floor").to(dtype)
        c = (pixels % self.cols).to(dtype)
        x = (c - self.cx) * self.dx
        y = (r - self.cy) * self.dy
        return torch.stack([x, y, torch.full_like(x, self.sdd)], dim=-1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "intrinsics") -> Intrinsics:
        known = {"sdd", "rows", "cols", "dy", "dx", "x0", "y0"}
        missing = {"sdd", "rows", "cols", "dy", "dx"} - set(data)
        if missing:
            raise InputError(
                f"{source}: missing intrinsics field(s) {sorted(missing)}; expected {sorted(known)}"
            )
        unknown = set(data) - known
        if unknown:
            raise InputError(
                f"{source}: unknown intrinsics field(s) {sorted(unknown)}; expected {sorted(known)}"
            )
        return cls(**{k: data[k] for k in known if k in data})

    def save(self, path: str | Path) -> None:
        """Write the intrinsics as JSON (atomic)."""
        atomic_write_text(Path(path), json.dumps({"intrinsics": self.to_dict()}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Intrinsics:
        """Read intrinsics from a camera JSON file (``{"intrinsics": {...}}`` or the fields at top level)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileFormatError(f"{path}: camera file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FileFormatError(f"{path}: not a readable camera JSON file ({exc})") from None
        if not isinstance(data, dict):
            raise FileFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data.get("intrinsics", data), source=str(path))


def validate_pixels(pixels: torch.Tensor, intrinsics: Intrinsics) -> torch.Tensor:
    """Check flat pixel indices (integer tensor within ``[0, rows*cols)``)."""
    if not isinstance(pixels, torch.Tensor):
        raise InputError(
            f"pixels: expected an integer torch.Tensor of flat indices, got {type(pixels).__name__}"
        )
    if pixels.dtype == torch.bool:
        raise InputError("pixels: got a boolean mask; convert it with mask.flatten().nonzero().squeeze(-1)")
    if pixels.is_floating_point() or pixels.is_complex():
        raise InputError(f"pixels: expected an integer tensor of flat indices, got dtype {pixels.dtype}")
    if pixels.numel() and (int(pixels.min()) < 0 or int(pixels.max()) >= intrinsics.num_pixels):
        raise InputError(
            f"pixels: flat indices must lie in [0, {intrinsics.num_pixels}) for a "
            f"{intrinsics.rows}×{intrinsics.cols} detector, got [{int(pixels.min())}, {int(pixels.max())}]"
        )
    return pixels.long()


def validate_pose(pose: torch.Tensor, name: str = "pose") -> torch.Tensor:
    """Check a pose tensor: floating ``(4, 4)`` or ``(B, 4, 4)``, finite, rigid; returns ``(B, 4, 4)``."""
    if not isinstance(pose, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor of shape (B, 4, 4), got {type(pose).__name__}")
    if not pose.is_floating_point():
        raise InputError(f"{name}: expected a float32 or float64 tensor, got dtype {pose.dtype}")
    if pose.ndim == 2:
        pose = pose.unsqueeze(0)
    if pose.ndim != 3 or pose.shape[-2:] != (4, 4):
        raise InputError(f"{name}: expected shape (B, 4, 4) or (4, 4), got {tuple(pose.shape)}")
    if not bool(torch.isfinite(pose).all()):
        raise InputError(f"{name}: contains NaN or infinite values")
    rot = pose[:, :3, :3].detach().double()
    eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
    err = (rot.transpose(-1, -2) @ rot - eye).abs().amax()
    tol = 1e-3 if pose.dtype == torch.float32 else 1e-6
    if float(err) > tol or bool((torch.linalg.det(rot) < 0).any()):
        raise InputError(f"{name}: the 3×3 block is not a rotation matrix (‖RᵀR − I‖max = {float(err):.2e})")
    bottom = pose[:, 3].detach()
    if float((bottom - bottom.new_tensor([0.0, 0.0, 0.0, 1.0])).abs().amax()) > 1e-6:
        raise InputError(f"{name}: last row must be [0, 0, 0, 1], got {bottom[0].tolist()}")
    return pose


@dataclass
class Camera:
    """A batch of C-arm views sharing one detector.

    Attributes:
        intrinsics: the detector geometry.
        pose: ``(B, 4, 4)`` ``T_world_from_camera`` (camera-to-world); a ``(4, 4)`` tensor is promoted to B = 1.
    """

    intrinsics: Intrinsics
    pose: torch.Tensor = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.intrinsics, Intrinsics):
            raise InputError(f"Camera.intrinsics: expected Intrinsics, got {type(self.intrinsics).__name__}")
        self.pose = validate_pose(self.pose, "Camera.pose")

    @property
    def batch_size(self) -> int:
        return self.pose.shape[0]

    def source_world(self) -> torch.Tensor:
        """X-ray source positions in world mm, ``(B, 3)``."""
        return self.pose[:, :3, 3]

    def detector_world(self, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """World coordinates (mm) of detector pixel centres, ``(B, N, 3)``.

        Args:
            pixels: flat indices ``row * cols + col`` as ``(N,)`` (same pixels for every view) or ``(B, N)``;
                all pixels when ``None``.
        """
        pts = self.intrinsics.pixel_points(pixels, dtype=self.pose.dtype, device=self.pose.device)
        if pts.ndim == 2:
            pts = pts.unsqueeze(0)
        return transform_points(self.pose, pts)

    def world_to_camera(self) -> torch.Tensor:
        """``T_camera_from_world`` (the extrinsic matrix), ``(B, 4, 4)``."""
        return invert(self.pose)

    def project(self, points_world: torch.Tensor) -> torch.Tensor:
        """Project world points (mm) to pixel coordinates ``(u = col, v = row)``.

        Args:
            points_world: ``(N, 3)`` or ``(B, N, 3)``.
        Returns:
            ``(B, N, 2)``; points behind the source get NaN.
        """
        if points_world.ndim == 2:
            points_world = points_world.unsqueeze(0)
        cam = transform_points(self.world_to_camera(), points_world.to(self.pose.dtype))
        z = cam[..., 2]
        k = self.intrinsics
        u = (k.sdd / k.dx) * cam[..., 0] / z + k.cx
        v = (k.sdd / k.dy) * cam[..., 1] / z + k.cy
        uv = torch.stack([u, v], dim=-1)
        return torch.where((z > 0).unsqueeze(-1), uv, torch.full_like(uv, float("nan")))

    def projection_matrix(self) -> torch.Tensor:
        """3×4 world→pixel projection matrices ``P = K [Rᵀ | −Rᵀ t]``, ``(B, 3, 4)``."""
        k = self.intrinsics.matrix(self.pose.dtype, self.pose.device)
        return k @ self.world_to_camera()[:, :3, :]

    def __getitem__(self, index: int | slice) -> Camera:
        pose = self.pose[index]
        return Camera(self.intrinsics, pose if pose.ndim == 3 else pose.unsqueeze(0))


def carm_pose(
    lao_deg: float | torch.Tensor = 0.0,
    cranial_deg: float | torch.Tensor = 0.0,
    inplane_deg: float | torch.Tensor = 0.0,
    *,
    source_to_isocenter: float,
    isocenter: torch.Tensor | tuple[float, float, float] = (0.0, 0.0, 0.0),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Camera-to-world pose from C-arm angles about an isocentre (see ``docs/conventions.md``).

    ``R = R_z(lao) · R_x(cranial) · R_AP · R_z(inplane)``, ``t = isocenter − source_to_isocenter · R e_z``.
    Angle arguments broadcast; returns ``(B, 4, 4)``.
    """
    if not math.isfinite(float(source_to_isocenter)) or float(source_to_isocenter) <= 0:
        raise GeometryError(
            f"source_to_isocenter: expected a positive distance in mm, got {source_to_isocenter!r}"
        )
    angles = torch.broadcast_tensors(
        *(
            torch.as_tensor(a, dtype=dtype, device=device).reshape(-1)
            for a in (lao_deg, cranial_deg, inplane_deg)
        )
    )
    lao, cran, inpl = (torch.deg2rad(a) for a in angles)
    zero = torch.zeros_like(lao)
    r_lao = axis_angle_to_matrix(torch.stack([zero, zero, lao], -1))
    r_cran = axis_angle_to_matrix(torch.stack([cran, zero, zero], -1))
    r_in = axis_angle_to_matrix(torch.stack([zero, zero, inpl], -1))
    r_ap = torch.tensor(_R_AP, dtype=dtype, device=device)
    rot = r_lao @ r_cran @ r_ap @ r_in
    iso = torch.as_tensor(isocenter, dtype=dtype, device=device).reshape(-1, 3)
    t = iso - float(source_to_isocenter) * rot[..., :, 2]
    return make_transform(rot, t)


def ap_view(
    isocenter: torch.Tensor | tuple[float, float, float],
    *,
    sdd: float = 1020.0,
    source_to_isocenter: float | None = None,
    rows: int = 256,
    cols: int | None = None,
    detector_mm: float = 384.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Camera:
    """A sensible anterior–posterior view centred on ``isocenter`` (e.g. a CT's centre).

    Defaults model a mobile C-arm: source-to-detector 1020 mm, isocentre half-way (magnification 2), a square
    detector of ``detector_mm`` side sampled on ``rows × cols`` pixels.
    """
    cols = rows if cols is None else cols
    sid = sdd / 2 if source_to_isocenter is None else source_to_isocenter
    if sid >= sdd:
        raise GeometryError(f"source_to_isocenter ({sid} mm) must be smaller than sdd ({sdd} mm)")
    intr = Intrinsics(sdd=sdd, rows=rows, cols=cols, dy=detector_mm / rows, dx=detector_mm / cols)
    pose = carm_pose(source_to_isocenter=sid, isocenter=isocenter, dtype=dtype, device=device)
    return Camera(intr, pose)
