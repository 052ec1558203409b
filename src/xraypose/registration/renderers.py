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

#: Render options that only the polychromatic model takes.
_POLY_OPTIONS = ("materials", "spectrum", "detector")


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

    :meth:`with_physics` gives the same CT under the other model (the HU volume stays referenced for it; the
    other model's volume is built on first use and then kept), so
    one registration can run its coarse levels monochromatically and its last level polychromatically
    (:class:`~xraypose.registration.Scale`'s ``physics``).
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
        if physics == "mono" and (extra := sorted(set(render_options) & set(_POLY_OPTIONS))):
            raise InputError(f"render options {', '.join(extra)}: only the 'poly' physics takes them")
        self.physics = physics
        self.affine = volume.affine.to(dtype)
        self.options = render_options
        self._ct = volume
        self._dtype = dtype
        self._views: dict[str, VolumeRenderer] = {physics: self}
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
        """Move the bound volume (in place, with any :meth:`with_physics` views) and return ``self``."""
        for view in self._views.values():
            view.volume = view.volume.to(device)
            view.affine = view.affine.to(device)
        return self

    def with_physics(self, physics: Physics) -> VolumeRenderer:
        """The same CT, device and shared render options under ``physics`` (``self`` when it is already
        that model; built once, then cached). The polychromatic view gets the default materials and
        spectrum unless this renderer was given its own."""
        if physics not in ("mono", "poly"):
            raise InputError(f"physics: expected 'mono' or 'poly', got {physics!r}")
        if physics not in self._views:
            options = {k: v for k, v in self.options.items() if physics == "poly" or k not in _POLY_OPTIONS}
            view = VolumeRenderer(self._ct, physics, dtype=self._dtype, **options).to(self.device)
            view._views = self._views  # one cache shared by every view
            self._views[physics] = view
        return self._views[physics]

    def __call__(self, camera: Camera, pixels: torch.Tensor | None = None) -> torch.Tensor:
        if self.physics == "mono":
            return render(self.volume, self.affine, camera, pixels=pixels, **self.options)
        from ..physics import render_polychromatic

        return render_polychromatic(
            self.volume, self.affine, camera, pixels=pixels, output="line_integral", **self.options
        )
