"""X-ray physics: materials, spectra, the polychromatic renderer and the realistic detector simulator.

* :mod:`.materials` — HU → density, material fractions (smooth thresholds or a label map), mass attenuation;
* :mod:`.spectrum` — tube spectra (SpekPy) in energy bins;
* :mod:`.polychromatic` — the Diff-DeepDRR renderer on the shared ray engine;
* :mod:`.detector` — quantum noise, blur, scatter, heel effect, collimation, log, quantisation;
* :mod:`.simulate` — all of it in one call, for benchmark targets.
"""

from .detector import CircularCollimator, DetectorModel, RectangularCollimator, simulate_detector
from .materials import MATERIALS, Material, MaterialModel, hu_to_density, mass_attenuation
from .polychromatic import PolychromaticDRR, attenuate, material_path_lengths, render_polychromatic
from .simulate import simulate_xray
from .spectrum import Spectrum, monoenergetic, tube_spectrum

__all__ = [
    "MATERIALS",
    "CircularCollimator",
    "DetectorModel",
    "Material",
    "MaterialModel",
    "PolychromaticDRR",
    "RectangularCollimator",
    "Spectrum",
    "attenuate",
    "hu_to_density",
    "mass_attenuation",
    "material_path_lengths",
    "monoenergetic",
    "render_polychromatic",
    "simulate_detector",
    "simulate_xray",
    "tube_spectrum",
]
