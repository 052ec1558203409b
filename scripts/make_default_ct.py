"""Build the bundled default CT (``src/xraypose/data/chest_ct_2.5mm*.nii.gz``) from the shared chest CT.

Usage (from the project root)::

    python scripts/make_default_ct.py [path/to/chest-ct]   # default: ../shared/data/chest-ct

Steps: read ``ct.nii.gz`` (HU) and ``labels.nii.gz``; clamp HU below −1024 (the −2048 padding outside the
scanner's field of view) to −1024 (air); resample to 2.5 mm keeping the box (area-averaged HU,
nearest-neighbour labels); write int16 HU and uint8 labels as gzipped NIfTI; copy ``structures.csv``; write
the data README with the CC BY 4.0 attribution. Fails if a NIfTI file exceeds 5 MB.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from xraypose.io.readers import read_volume, write_volume
from xraypose.io.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = ROOT.parent / "shared" / "data" / "chest-ct"
OUT = ROOT / "src" / "xraypose" / "data"
SPACING_MM = 2.5
AIR_HU = -1024.0
MAX_BYTES = 5 * 1024 * 1024


def _attribution(readme: Path) -> str:
    """The source/licence paragraph of the chest-ct README."""
    paragraphs = [p.strip() for p in readme.read_text(encoding="utf-8").split("\n\n")]
    for p in paragraphs:
        if p.startswith("Source:"):
            return p
    raise SystemExit(f"{readme}: no 'Source:' paragraph with the attribution found")


def main(src: Path = DEFAULT_SRC) -> None:
    vol = read_volume(src / "ct.nii.gz", labels=src / "labels.nii.gz")
    n_pad = int((vol.data < AIR_HU).sum())
    clamped = Volume(
        data=torch.clamp(vol.data, min=AIR_HU), affine=vol.affine, labels=vol.labels, source=vol.source
    )
    small = clamped.resample(SPACING_MM)
    OUT.mkdir(parents=True, exist_ok=True)
    ct_path = OUT / "chest_ct_2.5mm.nii.gz"
    lab_path = OUT / "chest_ct_2.5mm_labels.nii.gz"
    write_volume(small, ct_path, dtype="int16", labels_path=lab_path)
    shutil.copyfile(src / "structures.csv", OUT / "chest_ct_structures.csv")

    sizes = {p.name: p.stat().st_size for p in (ct_path, lab_path)}
    for name, size in sizes.items():
        if size > MAX_BYTES:
            raise SystemExit(f"{name}: {size} bytes exceeds the 5 MB limit")
    sp = ", ".join(f"{s:.4g}" for s in small.spacing.tolist())
    osp = ", ".join(f"{s:.4g}" for s in vol.spacing.tolist())
    readme = f"""# Bundled data

## Default CT (`load_default_ct()`)

- `chest_ct_2.5mm.nii.gz` — a real chest CT, {" × ".join(map(str, small.shape))} voxels at {sp} mm, \
Hounsfield units stored as int16, NIfTI, orientation LAS (world frame of `xraypose`: RAS+ mm).
- `chest_ct_2.5mm_labels.nii.gz` — its TotalSegmentator label map on the same grid (uint8; 0 = background).
- `chest_ct_structures.csv` — label id → structure name (`group,original_idx,structure,id`).

### Attribution (CC BY 4.0)

{_attribution(src / "README.md")}

These files are a derivative of that case (downsampled; HU clamped), distributed under the same licence:
CC BY 4.0, https://creativecommons.org/licenses/by/4.0/. Changes were made as described below.

### How the files were made

`scripts/make_default_ct.py` from `chest-ct/ct.nii.gz` ({" × ".join(map(str, vol.shape))} voxels at \
{osp} mm) and `chest-ct/labels.nii.gz`:

1. HU below {AIR_HU:g} ({n_pad} voxels, the −2048 padding outside the scanner's field of view) were set to \
{AIR_HU:g} (air).
2. Resampled to {SPACING_MM} mm keeping the volume's box (360 × 360 × 332.5 mm) exactly: HU by area \
averaging (exact overlap weights, `Volume.resample`), labels by nearest neighbour.
3. HU rounded to int16; labels stored as uint8; `structures.csv` copied unchanged.
"""
    (OUT / "README.md").write_text(readme, encoding="utf-8")
    print(f"wrote {small} to {OUT}")
    for name, size in sizes.items():
        print(f"  {name}: {size / 1e6:.2f} MB")
    print(f"  HU range {small.data.min():.0f} … {small.data.max():.0f}, mean {small.data.mean():.1f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SRC)
