"""Renderers for registration: a CT bound once, rendering any camera (any detector size, sparse pixels).

Both return ``−ln(I/I0)``-like line integrals (bright = attenuating), the quantity X-ray targets are compared
with after their log transform; similarity measures used for registration are invariant to an affine change
of intensity, so the monochromatic model's scale does not matter.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch

from ..errors import InputError
from ..geometry.camera import Camera
from ..io.attenuation import AttenuationModel
from ..io.volume import Volume
from ..render import render

__all__ = ["Physics", "Renderer", "VolumeRenderer"]

Physics = Literal["mono", "poly"]


class Renderer(Protocol):
    """Anything that renders ``(B, rows, cols)`` images (or ``(B, N)`` for ``pixels``) of a camera."""

    def __call__(self, camera: Camera, pixels: torch.Tensor | None = None) -> torch.Tensor: ...


class VolumeRenderer:
    """A CT (HU) bound to a physics model and render options.

    Args:
        volume: the CT.
        physics: ``"mono"`` (μ from :class:`~xraypose.io.AttenuationModel`) or ``"poly"``
            (:func:`~xraypose.physics.render_polychromatic`, default materials and spectrum).
        dtype: working precision of the volume (float32 default).
        render_options: passed to the renderer (method, step_mm, n_samples, multires, backend; for poly also
            materials, spectrum, detector).
    """

    def __init__(
        self,
        volume: Volume,
        physics: Physics = "mono",
        *,
        dtype: torch.dtype = torch.float32,
        **render_options: Any,
    ) -> None:
        if physics not in ("mono", "poly"):
            raise InputError(f"physics: expected 'mono' or 'poly', got {physics!r}")
        self.physics = physics
        self.affine = volume.affine.to(dtype)
        self.options = render_options
        if physics == "mono":
            self.volume = AttenuationModel()(volume.data).to(dtype)
        else:
            from ..physics import tube_spectrum

            self.volume = volume.data.to(dtype)
            self.options.setdefault("spectrum", tube_spectrum())

    @property
    def device(self) -> torch.device:
        return self.volume.device

    def to(self, device: torch.device | str) -> VolumeRenderer:
        """Move the bound volume (in place) and return ``self``."""
        self.volume = self.volume.to(device)
        self.affine = self.affine.to(device)
        return self

    def __call__(self, camera: Camera, pixels: torch.Tensor | None = None) -> torch.Tensor:
        if self.physics == "mono":
            return render(self.volume, self.affine, camera, pixels=pixels, **self.options)
        from ..physics import render_polychromatic

        return render_polychromatic(
            self.volume, self.affine, camera, pixels=pixels, output="line_integral", **self.options
        )
