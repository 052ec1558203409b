"""X-ray source spectra, computed locally with SpekPy and binned for the polychromatic renderer.

:func:`tube_spectrum` models a tungsten-anode tube at a given peak voltage (kVp), anode angle and filtration
with SpekPy (Poludniowski et al., Med. Phys. 2021; its physics data ship with the package, nothing is
downloaded), then groups the spectrum into ``n_bins`` equal-width energy bins. Each bin is represented by its
fluence-weighted mean energy and carries the bin's total fluence, so the binned spectrum keeps the photon
count and the mean energy of the full one exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..errors import InputError

__all__ = ["Spectrum", "monoenergetic", "tube_spectrum"]


@dataclass(frozen=True, eq=False)
class Spectrum:
    """A discrete photon spectrum.

    Args:
        energies_kev: ``(E,)`` bin energies, keV (increasing).
        fluence: ``(E,)`` relative photon fluence per bin (any positive scale; see :attr:`weights`).
        description: how it was made (for plots and file metadata).
    """

    energies_kev: np.ndarray
    fluence: np.ndarray
    description: str = ""

    def __post_init__(self) -> None:
        e = np.asarray(self.energies_kev, dtype=np.float64).reshape(-1)
        f = np.asarray(self.fluence, dtype=np.float64).reshape(-1)
        if e.size == 0 or e.shape != f.shape:
            raise InputError(
                f"spectrum: expected equal non-empty energies and fluence, got {e.shape}, {f.shape}"
            )
        if (
            not (np.all(np.isfinite(e)) and np.all(np.isfinite(f)))
            or e.min() <= 0
            or f.min() < 0
            or f.sum() <= 0
        ):
            raise InputError(
                "spectrum: energies must be positive and fluence non-negative with a positive sum"
            )
        if np.any(np.diff(e) <= 0):
            raise InputError("spectrum: energies must increase")
        object.__setattr__(self, "energies_kev", e)
        object.__setattr__(self, "fluence", f)

    @property
    def n_bins(self) -> int:
        return int(self.energies_kev.size)

    @property
    def mean_energy_kev(self) -> float:
        return float((self.energies_kev * self.fluence).sum() / self.fluence.sum())

    def weights(self, detector: str = "energy_integrating") -> np.ndarray:
        """Normalised detector weights per bin (sum 1): fluence × energy for an energy-integrating detector
        (flat panels, film), fluence alone for a photon-counting one."""
        if detector == "energy_integrating":
            w = self.fluence * self.energies_kev
        elif detector == "photon_counting":
            w = self.fluence.copy()
        else:
            raise InputError(
                f"detector: expected 'energy_integrating' or 'photon_counting', got {detector!r}"
            )
        return w / w.sum()

    def as_tensors(
        self, detector: str = "energy_integrating", *, dtype: torch.dtype = torch.float32, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(energies_kev, weights)`` as tensors."""
        return (
            torch.as_tensor(self.energies_kev, dtype=dtype, device=device),
            torch.as_tensor(self.weights(detector), dtype=dtype, device=device),
        )


def monoenergetic(energy_kev: float) -> Spectrum:
    """A single-energy spectrum."""
    return Spectrum(np.array([float(energy_kev)]), np.array([1.0]), f"monoenergetic {energy_kev:g} keV")


@lru_cache(maxsize=32)
def _spekpy_spectrum(kvp: float, anode_angle: float, al_mm: float, cu_mm: float, dk: float):
    import spekpy

    spec = spekpy.Spek(kvp=kvp, th=anode_angle, dk=dk)
    if al_mm > 0:
        spec.filter("Al", al_mm)
    if cu_mm > 0:
        spec.filter("Cu", cu_mm)
    k, f = spec.get_spectrum()
    return np.asarray(k, dtype=np.float64), np.asarray(f, dtype=np.float64)


def tube_spectrum(
    kvp: float = 90.0,
    *,
    filtration_mm_al: float = 2.5,
    filtration_mm_cu: float = 0.0,
    anode_angle_deg: float = 12.0,
    n_bins: int = 20,
    min_energy_kev: float = 10.0,
) -> Spectrum:
    """Spectrum of a tungsten-anode X-ray tube (SpekPy), grouped into ``n_bins`` equal-width bins.

    Args:
        kvp: peak tube voltage, kV (20–150).
        filtration_mm_al: total aluminium filtration, mm (inherent + added).
        filtration_mm_cu: added copper filtration, mm (fluoroscopy often adds 0.1–0.3 mm).
        anode_angle_deg: anode target angle, degrees.
        n_bins: number of energy bins (≥ 1); the renderer's cost grows only slightly with it.
        min_energy_kev: energies below are dropped (after filtration they carry a negligible fluence).
    """
    if not (20.0 <= kvp <= 150.0):
        raise InputError(f"kvp: expected a tube voltage in [20, 150] kV, got {kvp}")
    if filtration_mm_al < 0 or filtration_mm_cu < 0:
        raise InputError(
            f"filtration: expected thicknesses ≥ 0 mm, got Al {filtration_mm_al}, Cu {filtration_mm_cu}"
        )
    if not (isinstance(n_bins, int) and n_bins >= 1):
        raise InputError(f"n_bins: expected a positive integer, got {n_bins!r}")
    if not (0 < anode_angle_deg < 45):
        raise InputError(f"anode_angle_deg: expected an angle in (0, 45) degrees, got {anode_angle_deg}")
    if not (1.0 <= min_energy_kev < kvp):
        raise InputError(f"min_energy_kev: expected a value in [1, kvp) keV, got {min_energy_kev}")
    k, f = _spekpy_spectrum(
        float(kvp), float(anode_angle_deg), float(filtration_mm_al), float(filtration_mm_cu), 0.5
    )
    keep = (k >= min_energy_kev) & (f > 0)
    k, f = k[keep], f[keep]
    edges = np.linspace(min_energy_kev, kvp, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, k, side="right") - 1, 0, n_bins - 1)
    flu = np.bincount(idx, weights=f, minlength=n_bins)
    ek = np.bincount(idx, weights=f * k, minlength=n_bins)
    nz = flu > 0
    energies = ek[nz] / flu[nz]
    desc = (
        f"W anode {kvp:g} kVp, {anode_angle_deg:g}° anode, {filtration_mm_al:g} mm Al"
        + (f" + {filtration_mm_cu:g} mm Cu" if filtration_mm_cu else "")
        + f", {int(nz.sum())} bins (SpekPy)"
    )
    if not math.isfinite(float(energies.sum())):
        raise InputError("spectrum: SpekPy returned a non-finite spectrum")
    return Spectrum(energies, flu[nz], desc)
