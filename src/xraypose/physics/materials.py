"""Materials: HU → mass density, material fractions from HU or a label map, mass attenuation per energy.

**Density** (DeepDRR's piecewise-linear model, g/cm³)::

    ρ(HU) = max(min(0.001029·HU + 1.03, 0.0005886·HU + 1.03), 0)

**Materials from HU.** Air below ``air_max_hu`` (−800), soft tissue up to ``bone_min_hu`` (350), bone above, and
optionally a metal (titanium) above ``metal_min_hu``. Each boundary is a C¹ cubic smoothstep of width
``transition_hu`` (default 100 HU) instead of a hard threshold, so that the material fractions — and the
rendered images — are differentiable w.r.t. the HU values; the fractions sum to 1 everywhere. The density
channel of material ``m`` is ``ρ(HU) · w_m(HU)`` (g/cm³).

**Materials from a label map.** A mapping from label ids to material names assigns voxels outright; unmapped
labels fall back to the HU classification (see :meth:`MaterialModel.channels_from_labels`).

**Mass attenuation** ``μ/ρ(E)`` (cm²/g, coherent scattering included) of each material is computed locally
from the elemental cross-sections of ``xraydb`` (Elam, Ravel & Sieber 2002 tables, shipped with the package)
by the mixture rule ``μ/ρ = Σ_i w_i (μ/ρ)_i`` over the mass fractions ``w_i`` of the compositions below
(ICRU Report 44 for soft tissue and cortical bone, as used by the NIST XCOM/X-ray mass attenuation tables;
dry air near sea level; pure titanium). Nothing is downloaded.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..errors import InputError
from ..render.transfer import ThresholdTransfer, Transfer, TransferFunction

__all__ = [
    "MATERIALS",
    "Material",
    "MaterialModel",
    "hu_to_density",
    "mass_attenuation",
    "smoothstep",
]


@dataclass(frozen=True)
class Material:
    """A material: elemental mass fractions, nominal density (g/cm³) and where the composition comes from."""

    name: str
    composition: Mapping[str, float]
    density: float
    source: str


#: Materials known to the physics renderer.
MATERIALS: dict[str, Material] = {
    m.name: m
    for m in (
        Material(
            "air",
            {"C": 0.000124, "N": 0.755268, "O": 0.231781, "Ar": 0.012827},
            0.001205,
            "Air, dry (near sea level), NIST X-ray mass attenuation tables, Table 2",
        ),
        Material("water", {"H": 0.111894, "O": 0.888106}, 1.0, "Water, liquid (H2O)"),
        Material(
            "soft_tissue",
            {
                "H": 0.102,
                "C": 0.143,
                "N": 0.034,
                "O": 0.708,
                "Na": 0.002,
                "P": 0.003,
                "S": 0.003,
                "Cl": 0.002,
                "K": 0.003,
            },
            1.06,
            "Tissue, soft (ICRU-44)",
        ),
        Material(
            "bone",
            {
                "H": 0.034,
                "C": 0.155,
                "N": 0.042,
                "O": 0.435,
                "Na": 0.001,
                "Mg": 0.002,
                "P": 0.103,
                "S": 0.003,
                "Ca": 0.225,
            },
            1.92,
            "Bone, cortical (ICRU-44)",
        ),
        Material("titanium", {"Ti": 1.0}, 4.506, "Titanium (Z = 22)"),
    )
}


#: DeepDRR's density model as (a1, b1, a2, b2): ρ = max(min(a1·HU + b1, a2·HU + b2), 0) g/cm³.
DEEPDRR_DENSITY = (0.001029, 1.03, 0.0005886, 1.03)


def hu_to_density(hu: torch.Tensor) -> torch.Tensor:
    """Mass density (g/cm³) from HU: ``max(min(0.001029·HU + 1.03, 0.0005886·HU + 1.03), 0)``."""
    a1, b1, a2, b2 = DEEPDRR_DENSITY
    return torch.clamp(torch.minimum(a1 * hu + b1, a2 * hu + b2), min=0.0)


def smoothstep(x: torch.Tensor, edge: float, width: float) -> torch.Tensor:
    """C¹ cubic step from 0 (``x ≤ edge − width/2``) to 1 (``x ≥ edge + width/2``); a hard step if width is 0."""
    if width <= 0:
        return (x > edge).to(x.dtype)
    u = ((x - edge) / width + 0.5).clamp(0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


@lru_cache(maxsize=64)
def _mass_attenuation_cached(name: str, energies: tuple[float, ...]) -> np.ndarray:
    import xraydb

    mat = MATERIALS[name]
    e_ev = np.asarray(energies, dtype=np.float64) * 1000.0
    total = np.zeros_like(e_ev)
    for element, w in mat.composition.items():
        total += w * np.asarray(xraydb.mu_elam(element, e_ev), dtype=np.float64)
    return total


def mass_attenuation(material: str, energies_kev: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Mass attenuation coefficient ``μ/ρ`` (cm²/g) of a material at photon energies in keV (float64)."""
    if material not in MATERIALS:
        raise InputError(f"material: expected one of {sorted(MATERIALS)}, got {material!r}")
    e = np.asarray(torch.as_tensor(energies_kev, dtype=torch.float64).reshape(-1).numpy())
    if e.size == 0 or not np.all(np.isfinite(e)) or e.min() < 1.0 or e.max() > 1000.0:
        raise InputError(f"energies_kev: expected finite energies in [1, 1000] keV, got {e.tolist()[:5]}…")
    return _mass_attenuation_cached(material, tuple(float(x) for x in e)).copy()


@dataclass(frozen=True, eq=False)
class MaterialModel:
    """How HU become per-material density channels (see the module docstring for the model).

    Args:
        air_max_hu: air/soft-tissue boundary (HU).
        bone_min_hu: soft-tissue/bone boundary (HU).
        metal_min_hu: bone/metal boundary (HU); ``None`` (default) leaves metal out.
        transition_hu: width of each smooth boundary (HU); 0 gives hard thresholds (not differentiable).
        metal: the metal's material name (default titanium).
        table_step_hu: knot spacing (HU) of the tabulated transfer function used for hard thresholds.
        table_range_hu: HU range tabulated; beyond it the channels continue linearly.
    """

    air_max_hu: float = -800.0
    bone_min_hu: float = 350.0
    metal_min_hu: float | None = None
    transition_hu: float = 100.0
    metal: str = "titanium"
    table_step_hu: float = 2.0
    table_range_hu: tuple[float, float] = (-1100.0, 3200.0)

    def __post_init__(self) -> None:
        edges = [self.air_max_hu, self.bone_min_hu] + (
            [self.metal_min_hu] if self.metal_min_hu is not None else []
        )
        if not all(math.isfinite(e) for e in edges) or any(b <= a for a, b in itertools.pairwise(edges)):
            raise InputError(f"material thresholds: expected increasing finite HU values, got {edges}")
        if self.transition_hu < 0 or not math.isfinite(self.transition_hu):
            raise InputError(f"transition_hu: expected a width ≥ 0 HU, got {self.transition_hu}")
        if self.metal not in MATERIALS:
            raise InputError(f"metal: expected one of {sorted(MATERIALS)}, got {self.metal!r}")
        if not self.table_step_hu > 0:
            raise InputError(f"table_step_hu: expected a positive step in HU, got {self.table_step_hu}")

    @property
    def names(self) -> tuple[str, ...]:
        """Material names, one per channel, in channel order."""
        base = ("air", "soft_tissue", "bone")
        return (*base, self.metal) if self.metal_min_hu is not None else base

    def fractions(self, hu: torch.Tensor) -> torch.Tensor:
        """Material fractions ``(..., M)`` from HU; they sum to 1."""
        w = self.transition_hu
        not_air = smoothstep(hu, self.air_max_hu, w)
        bone_up = smoothstep(hu, self.bone_min_hu, w)
        parts = [1.0 - not_air, not_air - bone_up]
        if self.metal_min_hu is None:
            parts.append(bone_up)
        else:
            metal = smoothstep(hu, self.metal_min_hu, w)
            parts += [bone_up - metal, metal]
        return torch.stack(parts, -1)

    def channels(self, hu: torch.Tensor) -> torch.Tensor:
        """Per-material density ``ρ(HU)·w_m(HU)`` (g/cm³), ``(..., M)``; differentiable in HU."""
        return hu_to_density(hu).unsqueeze(-1) * self.fractions(hu)

    def transfer(self) -> Transfer:
        """The model as a transfer function for the ray engine (HU → M density channels, g/cm³).

        With smooth boundaries (``transition_hu > 0``) it is the closed-form
        :class:`~xraypose.render.transfer.ThresholdTransfer`, evaluated exactly at every sample; hard thresholds
        are tabulated every ``table_step_hu`` HU (:class:`~xraypose.render.transfer.TransferFunction`).
        """
        return _transfer_for(self)

    def channels_from_labels(
        self, hu: torch.Tensor, labels: torch.Tensor, mapping: Mapping[int, str]
    ) -> torch.Tensor:
        """Density channels ``(M, I, J, K)`` (g/cm³) with the voxels of the mapped labels assigned outright.

        Voxels whose label is in ``mapping`` get all their density ``ρ(HU)`` in that material's channel; the
        others are classified from HU. Every mapped material must be one of :attr:`names`.
        """
        if labels.shape != hu.shape:
            raise InputError(f"labels: expected the CT's shape {tuple(hu.shape)}, got {tuple(labels.shape)}")
        names = self.names
        for lab, mat in mapping.items():
            if mat not in names:
                raise InputError(f"mapping: label {lab} → {mat!r}, expected one of {names}")
        out = self.channels(hu).movedim(-1, 0).clone()
        rho = hu_to_density(hu)
        for lab, mat in mapping.items():
            sel = labels == int(lab)
            out[:, sel] = 0.0
            out[names.index(mat), sel] = rho[sel]
        return out


@lru_cache(maxsize=16)
def _transfer_key(model_key: tuple) -> Transfer:
    model = MaterialModel(*model_key[:-1], table_range_hu=model_key[-1])
    edges = (model.air_max_hu, model.bone_min_hu) + (
        (model.metal_min_hu,) if model.metal_min_hu is not None else ()
    )
    if model.transition_hu > 0:
        return ThresholdTransfer(DEEPDRR_DENSITY, edges, model.transition_hu, names=model.names)
    lo, hi = model.table_range_hu
    # knots aligned on multiples of the step so that the density model's kink at 0 HU is a knot
    lo = math.floor(lo / model.table_step_hu) * model.table_step_hu
    return TransferFunction.from_function(model.channels, lo, hi, model.table_step_hu, names=model.names)


def _transfer_for(model: MaterialModel) -> Transfer:
    key = (
        model.air_max_hu,
        model.bone_min_hu,
        model.metal_min_hu,
        model.transition_hu,
        model.metal,
        model.table_step_hu,
        tuple(model.table_range_hu),
    )
    return _transfer_key(key)
