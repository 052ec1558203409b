"""Saving and loading 2D images (DRRs, X-ray images) as ``(H, W)`` arrays = ``(rows, cols)``.

Row 0 is the top of the image (see the camera conventions in ``docs/conventions.md``). Floating values are
stored raw in ``.npy`` and ``.tif``; ``.png`` stores a windowed 8- or 16-bit rendering for viewing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import tifffile
import torch
from PIL import Image, UnidentifiedImageError

from xraypose._atomic import atomic_path
from xraypose.errors import FileFormatError, InputError

__all__ = ["IMAGE_LOAD_EXTENSIONS", "IMAGE_SAVE_EXTENSIONS", "load_image", "save_image", "to_line_integrals"]

PathLike = str | os.PathLike[str]

#: Extensions :func:`save_image` writes.
IMAGE_SAVE_EXTENSIONS: tuple[str, ...] = (".png", ".npy", ".tif", ".tiff")
#: Extensions :func:`load_image` reads (plus extension-less files that start like DICOM).
IMAGE_LOAD_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".dcm", ".dicom")

_LUMA = np.array([0.299, 0.587, 0.114])


def _as_2d(image: torch.Tensor | np.ndarray, path: Path) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu().numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim != 2:
        raise InputError(f"save_image {path}: expected a 2D image (H, W), got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"save_image {path}: expected real pixel values, got dtype {arr.dtype}")
    return arr


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileFormatError(f"{path}: the folder {parent} does not exist")
    try:
        with atomic_path(path, suffix=path.suffix) as tmp:
            write(tmp)
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot write the file: {exc}") from exc


def save_image(
    image: torch.Tensor | np.ndarray,
    path: PathLike,
    *,
    window: tuple[float, float] | None = None,
    bits: int = 8,
) -> Path:
    """Save a 2D image ``(H, W)`` (rows, cols) atomically (temporary file in its folder + ``os.replace``).

    Formats by extension:

    - ``.png``: greyscale, ``bits`` = 8 or 16. Values are windowed linearly: ``window = (lo, hi)`` maps to
      ``(0, 2**bits − 1)`` with clipping; by default the image's own ``(min, max)`` (a constant image → 0).
      Requires finite values.
    - ``.npy``: raw float32 values (``np.save``).
    - ``.tif`` / ``.tiff``: raw float32 values (``tifffile``).

    Returns:
        The path written.

    Raises:
        FileFormatError: unsupported extension or the folder does not exist / is not writable.
        InputError: not 2D, non-finite values for PNG, bad ``window`` or ``bits``.
    """
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in IMAGE_SAVE_EXTENSIONS:
        raise FileFormatError(
            f"{p}: unsupported image extension {ext or '(none)'!r} for saving; "
            f"supported: {', '.join(IMAGE_SAVE_EXTENSIONS)}"
        )
    arr = _as_2d(image, p)
    if ext == ".npy":
        data32 = arr.astype(np.float32)

        def write_npy(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, data32, allow_pickle=False)

        _atomic(p, write_npy)
        return p
    if ext in (".tif", ".tiff"):
        data32 = arr.astype(np.float32)
        _atomic(p, lambda tmp: tifffile.imwrite(tmp, data32))
        return p
    # PNG
    if bits not in (8, 16):
        raise InputError(f"save_image bits: expected 8 or 16, got {bits}")
    x = arr.astype(np.float64)
    n_bad = int(np.count_nonzero(~np.isfinite(x)))
    if n_bad:
        raise InputError(f"save_image {p}: {n_bad} pixels are NaN or infinite; PNG needs finite values")
    lo, hi = (float(x.min()), float(x.max())) if window is None else (float(window[0]), float(window[1]))
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo or (window is not None and hi == lo):
        raise InputError(f"save_image window: expected finite (lo, hi) with lo < hi, got {(lo, hi)}")
    top = 2**bits - 1
    scaled = np.zeros_like(x) if hi == lo else np.clip((x - lo) / (hi - lo), 0.0, 1.0) * top
    out = np.round(scaled).astype(np.uint8 if bits == 8 else np.uint16)
    pil = Image.fromarray(out)
    _atomic(p, lambda tmp: pil.save(tmp, format="PNG"))
    return p


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _to_gray(arr: np.ndarray, path: Path, *, rgb: bool = False) -> np.ndarray:
    """Squeeze singleton axes; with ``rgb`` turn ``(H, W, 3|4)`` colour into luminance; require 2D."""
    if arr.ndim > 2:
        arr = np.squeeze(arr)
    if rgb and arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].astype(np.float64) @ _LUMA
    if arr.ndim != 2:
        raise FileFormatError(f"{path}: expected a single 2D image, got an array of shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biuf":
        raise FileFormatError(f"{path}: expected numeric pixel values, got dtype {arr.dtype}")
    return arr.astype(np.float32)


def load_image(path: PathLike) -> np.ndarray:
    """Load a 2D image as a float32 array ``(H, W)`` (rows, cols) of its stored values.

    Supported: PNG/JPEG (8/16-bit greyscale; colour → luminance 0.299 R + 0.587 G + 0.114 B), TIFF (any
    numeric type), ``.npy`` (2D numeric), and single-frame DICOM X-ray images (``.dcm``, ``.dicom`` or a file
    starting with the DICOM preamble; RescaleSlope/Intercept applied). Values are not normalised; for DICOM
    with PhotometricInterpretation MONOCHROME1 (low value = bright) a ``UserWarning`` says that they are not
    inverted.

    Raises:
        FileFormatError: missing file, unsupported extension, unreadable/corrupt file, not a single 2D image.
    """
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"{p}: no such file" if not p.exists() else f"{p}: is not a file")
    ext = p.suffix.lower()
    dicom = ext in (".dcm", ".dicom") or (ext not in IMAGE_LOAD_EXTENSIONS and _is_dicom(p))
    if ext not in IMAGE_LOAD_EXTENSIONS and not dicom:
        raise FileFormatError(
            f"{p}: unsupported image extension {ext or '(none)'!r}; "
            f"supported: {', '.join(IMAGE_LOAD_EXTENSIONS)} or DICOM"
        )
    rgb = False
    try:
        if dicom:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(p))
            img = reader.Execute()
            key = "0028|0004"
            if reader.HasMetaDataKey(key) and reader.GetMetaData(key).strip() == "MONOCHROME1":
                warnings.warn(f"{p}: MONOCHROME1 DICOM; values are returned as stored", stacklevel=2)
            arr = sitk.GetArrayFromImage(img)
            if arr.ndim == 3 and arr.shape[0] > 1 and img.GetNumberOfComponentsPerPixel() == 1:
                raise FileFormatError(
                    f"{p}: multi-frame DICOM with {arr.shape[0]} frames; expected one image"
                )
        elif ext == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif ext in (".tif", ".tiff"):
            with tifffile.TiffFile(p) as tif:
                if len(tif.pages) != 1:
                    raise FileFormatError(f"{p}: TIFF with {len(tif.pages)} pages; expected a single image")
                page = tif.pages[0]
                arr = page.asarray()
                rgb = page.photometric == tifffile.PHOTOMETRIC.RGB
        else:
            with Image.open(p) as im:
                im.load()
                if im.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr", "PA", "1"):
                    im = im.convert("L")
                arr = np.asarray(im)
    except FileFormatError:
        raise
    except RuntimeError as exc:  # SimpleITK
        first = [ln for ln in str(exc).splitlines() if ln.strip()][-1:]
        raise FileFormatError(f"{p}: cannot read the file (corrupt or not DICOM): {''.join(first)}") from exc
    except (OSError, ValueError, EOFError, UnidentifiedImageError, tifffile.TiffFileError) as exc:
        raise FileFormatError(
            f"{p}: cannot read the file (corrupt or not {ext or 'an image'}): {exc}"
        ) from exc
    return _to_gray(arr, p, rgb=rgb)


def to_line_integrals(image: torch.Tensor | np.ndarray, polarity: str = "attenuation") -> torch.Tensor:
    """X-ray values → the DRRs' domain, float32 (bright = attenuating).

    ``"attenuation"``: already ``−ln(I/I0)``-like (log-transformed or displayed radiographs), returned as is;
    ``"intensity"``: raw detector values (larger = more photons), mapped to ``−ln(x / max x)`` with values
    ``<= 0`` clamped to the smallest positive one.
    """
    if polarity not in ("attenuation", "intensity"):
        raise InputError(f"polarity: expected 'attenuation' or 'intensity'; got {polarity!r}")
    x = torch.as_tensor(image, dtype=torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise InputError("X-ray: the image holds NaN or inf values")
    if polarity == "intensity":
        lo = float(x[x > 0].min()) if bool((x > 0).any()) else 1.0
        x = -torch.log(x.clamp_min(lo) / float(x.max()))
    return x
