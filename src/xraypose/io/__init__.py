"""Input/output: CT volumes (:class:`Volume`, readers/writers), HU → μ conversion, 2D images, default CT.

World frame: RAS+ mm; ``Volume.affine`` maps voxel index ``(i, j, k, 1)`` to world ``(x, y, z, 1)``.
"""

from xraypose.io.attenuation import AttenuationModel, hu_to_mu
from xraypose.io.default import default_ct_structures, load_default_ct
from xraypose.io.images import load_image, save_image
from xraypose.io.readers import find_cts, read_labels, read_volume, write_volume
from xraypose.io.volume import Volume

__all__ = [
    "AttenuationModel",
    "Volume",
    "default_ct_structures",
    "find_cts",
    "hu_to_mu",
    "load_default_ct",
    "load_image",
    "read_labels",
    "read_volume",
    "save_image",
    "write_volume",
]
