"""Reading and writing CT volumes (NIfTI, NRRD, MetaImage, DICOM series) with SimpleITK.

Every reader returns data indexed ``[i, j, k]`` with a voxel→world affine in **RAS+ mm** (the project's world
frame). SimpleITK works in LPS for every format (it converts NIfTI's RAS header on reading), so the first two
world axes are flipped on the way in and out: ``affine_ras = diag(-1, -1, 1, 1) · affine_lps``.
``sitk.GetArrayFromImage`` returns ``[k, j, i]``; it is transposed so that index ``i`` runs along the image's
first physical axis.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from xraypose.errors import FileFormatError, InputError
from xraypose.io.volume import Volume

__all__ = ["SUPPORTED_EXTENSIONS", "WRITABLE_EXTENSIONS", "read_labels", "read_volume", "write_volume"]

PathLike = str | os.PathLike[str]

#: File extensions :func:`read_volume` accepts (a folder is read as a DICOM series).
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
#: File extensions :func:`write_volume` can write.
WRITABLE_EXTENSIONS: tuple[str, ...] = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
_WRITE_DTYPES = {"float32": np.float32, "float64": np.float64, "int16": np.int16, "int32": np.int32}


# ---------------------------------------------------------------------------------------------- helpers
def _extension(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _supported_text() -> str:
    return ", ".join(SUPPORTED_EXTENSIONS) + ", or a folder holding a DICOM series"


def _itk_reason(exc: BaseException) -> str:
    """The informative part of a SimpleITK/ITK exception message (first error line, plus the last detail)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK")]
    lines = [ln for ln in lines if not ln.startswith("Reason: No such file")]  # stale errno from ITK
    if not lines:
        return type(exc).__name__
    first = re.sub(r"^.*?ERROR:\s*(?:[\w:]+\(0x[0-9a-fA-F]+\):\s*)?", "", lines[0]) or lines[0]
    last = lines[-1]
    return first if len(lines) == 1 or last == first else f"{first} ({last})"


def _reverse_axes(arr: np.ndarray) -> np.ndarray:
    """C-contiguous copy of a 3D array with its axes reversed (``[k, j, i]`` ↔ ``[i, j, k]``).

    Copies in slabs along the input's first axis: several times faster than one big strided transpose.
    """
    out = np.empty(arr.shape[::-1], dtype=arr.dtype)
    step = 16
    for s in range(0, arr.shape[0], step):
        out[:, :, s : s + step] = arr[s : s + step].transpose(2, 1, 0)
    return out


def _check_file(path: Path) -> str:
    """Check that ``path`` exists with a supported extension; return the extension ('' for a folder)."""
    if not path.exists():
        raise FileFormatError(f"{path}: no such file or folder")
    if path.is_dir():
        return ""
    ext = _extension(path)
    if ext not in SUPPORTED_EXTENSIONS:
        raise FileFormatError(
            f"{path}: unsupported file extension {ext or '(none)'!r}; supported: {_supported_text()}"
        )
    return ext


def _nifti_data_problem(path: Path, ext: str, hdr: bytes, end: str) -> str | None:
    """Check that a NIfTI file holds all its voxel bytes (ITK silently zero-fills truncated NIfTI data).

    For ``.nii.gz`` the gzip trailer (uncompressed size mod 2³²) is compared first; only if it disagrees (a
    truncated or multi-member file) is the stream decompressed to count the bytes.
    """
    dims = struct.unpack(end + "8h", hdr[40:56])
    bitpix = struct.unpack(end + "h", hdr[72:74])[0]
    vox_offset = int(struct.unpack(end + "f", hdr[108:112])[0])
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1 : ndim + 1]):
        return None  # let the reader report it
    expected = max(vox_offset, 348) + int(np.prod(dims[1 : ndim + 1], dtype=np.int64)) * bitpix // 8
    if ext == ".nii":
        got = path.stat().st_size
    else:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if struct.unpack("<I", f.read(4))[0] == expected % 2**32:
                return None
        got = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    got += len(chunk)
                    if got >= expected:
                        return None
        except (EOFError, OSError, zlib.error) as exc:
            return f"the compressed data is truncated or corrupt ({exc}); got {got} of {expected} bytes"
    if got < expected:
        return f"the file is truncated: {got} of {expected} bytes of header + voxel data"
    return None


def _nifti_nonfinite(path: Path) -> int:
    """Count NaN/inf voxels stored in a floating-point NIfTI-1 file.

    ITK's NIfTI reader replaces NaN by 0 without a word, so the stored bytes are checked directly (only for
    float32/float64 data; integer data cannot hold NaN). Returns 0 when the header cannot be parsed.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            hdr = f.read(348)
            for end in ("<", ">"):
                if len(hdr) == 348 and struct.unpack(end + "i", hdr[:4])[0] == 348:
                    break
            else:
                return 0
            datatype = struct.unpack(end + "h", hdr[70:72])[0]
            dtype = {16: "f4", 64: "f8"}.get(datatype)
            if dtype is None:
                return 0
            dims = struct.unpack(end + "8h", hdr[40:56])
            count = int(np.prod(dims[1 : dims[0] + 1], dtype=np.int64))
            vox_offset = int(struct.unpack(end + "f", hdr[108:112])[0])
            f.read(max(vox_offset, 348) - 348)
            data = np.frombuffer(f.read(count * int(dtype[1])), dtype=end + dtype)
    except (OSError, ValueError, struct.error, EOFError, zlib.error):
        return 0
    return int(np.count_nonzero(~np.isfinite(data)))


def _header_problem(path: Path, ext: str) -> str | None:
    """Look for zero/negative voxel spacing in the raw header (some readers silently replace it by 1) and for
    truncated NIfTI data (ITK silently fills it with zeros).

    Returns a description of the problem, or ``None`` (also when the header cannot be parsed: the reader then
    reports the problem). NRRD may legitimately store negative ``spacings`` (an axis flip); only zero is
    rejected there.
    """
    try:
        if ext in (".nii", ".nii.gz"):
            opener = gzip.open if ext == ".nii.gz" else open
            with opener(path, "rb") as f:
                hdr = f.read(348)
            if len(hdr) < 348:
                return None
            for end in ("<", ">"):
                if struct.unpack(end + "i", hdr[:4])[0] == 348:
                    break
            else:
                return None  # NIfTI-2 or not NIfTI: leave it to the reader
            ndim = struct.unpack(end + "h", hdr[40:42])[0]
            pixdim = struct.unpack(end + "8f", hdr[76:108])
            sform_code = struct.unpack(end + "h", hdr[254:256])[0]
            if sform_code > 0:
                srow = np.array(struct.unpack(end + "12f", hdr[280:328]), dtype=np.float64).reshape(3, 4)
                norms = np.linalg.norm(srow[:, :3], axis=0)
                if np.any(norms <= 0):
                    return (
                        f"zero voxel spacing in the sform (column lengths {tuple(norms.round(6).tolist())})"
                    )
            else:
                sp = pixdim[1 : 1 + min(max(ndim, 1), 3)]
                if any(not (s > 0) for s in sp):
                    return f"zero or negative voxel spacing pixdim[1:4] = {tuple(round(s, 6) for s in sp)}"
            return _nifti_data_problem(path, ext, hdr, end)
        if ext in (".mha", ".mhd"):
            with open(path, "rb") as f:
                head = f.read(8192).decode("latin-1", errors="replace")
            for line in head.splitlines():
                key, _, value = line.partition("=")
                if key.strip() in ("ElementSpacing", "ElementSize"):
                    sp = [float(v) for v in value.split()]
                    if any(not (s > 0) for s in sp):
                        return f"zero or negative voxel spacing {key.strip()} = {tuple(sp)}"
                if key.strip() == "ElementDataFile":
                    break
            return None
        if ext in (".nrrd", ".nhdr"):
            with open(path, "rb") as f:
                head = f.read(8192).decode("latin-1", errors="replace")
            for line in head.splitlines():
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                if key.strip() == "spacings":
                    sp = [float(v) for v in value.split() if v.lower() != "nan"]
                    if any(s == 0 for s in sp):
                        return f"zero voxel spacing 'spacings: {value.strip()}'"
                if key.strip() == "space directions":
                    for vec in re.findall(r"\(([^)]*)\)", value):
                        if all(float(c) == 0 for c in vec.split(",")):
                            return f"zero voxel spacing 'space directions: {value.strip()}'"
            return None
    except (OSError, ValueError, struct.error, EOFError, zlib.error):
        return None
    return None


def _read_file_image(path: Path, ext: str) -> sitk.Image:
    problem = _header_problem(path, ext)
    if problem:
        hint = "; voxel spacing must be > 0 mm" if "spacing" in problem else ""
        raise FileFormatError(f"{path}: {problem}{hint}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = _itk_reason(exc)
        if "Zero-valued spacing" in str(exc):
            raise FileFormatError(
                f"{path}: zero voxel spacing in the header; spacing must be > 0 mm"
            ) from exc
        raise FileFormatError(f"{path}: cannot read the file (corrupt or not {ext}): {reason}") from exc


def _slice_position(file: str, normal: np.ndarray | None) -> tuple[float, np.ndarray | None]:
    r = sitk.ImageFileReader()
    r.SetFileName(file)
    r.ReadImageInformation()
    ipp = np.array([float(v) for v in r.GetMetaData("0020|0032").split("\\")], dtype=np.float64)
    if normal is None:
        iop = np.array([float(v) for v in r.GetMetaData("0020|0037").split("\\")], dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:6])
    return float(ipp @ normal), normal


def _read_dicom_series(folder: Path) -> sitk.Image:
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise FileFormatError(
            f"{folder}: cannot scan the folder for DICOM files: {_itk_reason(exc)}"
        ) from exc
    if not series:
        raise FileFormatError(
            f"{folder}: no DICOM series found in this folder; a folder must hold DICOM slices "
            f"(files may be given with extensions {', '.join(SUPPORTED_EXTENSIONS)})"
        )
    files_by_series = {
        uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in series
    }
    uid = max(files_by_series, key=lambda u: len(files_by_series[u]))
    files = files_by_series[uid]
    if len(series) > 1:
        sizes = ", ".join(f"{u or '(no UID)'}: {len(f)} files" for u, f in files_by_series.items())
        warnings.warn(
            f"{folder}: {len(series)} DICOM series found ({sizes}); reading the largest, {uid or '(no UID)'}",
            stacklevel=4,
        )
    if len(files) < 2:
        raise FileFormatError(
            f"{folder}: the DICOM series has 1 slice (a 2D image); expected a 3D volume of several slices"
        )
    # Sort by position along the slice normal (GDCM usually does; make sure) and check the slice step.
    uneven = False
    steps = np.zeros(0)
    try:
        normal = None
        pos = []
        for f in files:
            p, normal = _slice_position(f, normal)
            pos.append(p)
    except (RuntimeError, ValueError, IndexError):
        pos = []  # no usable position tags: keep GDCM's order
    if pos:
        order = np.argsort(pos, kind="stable")
        files = [files[i] for i in order]
        steps = np.diff(np.asarray(pos)[order])
        if np.any(steps < 1e-6):
            raise FileFormatError(
                f"{folder}: {int(np.sum(steps < 1e-6))} DICOM slices share a position; "
                "the series is not a single regular volume"
            )
        uneven = steps.max() - steps.min() > 0.01 * float(np.median(steps)) + 1e-3
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        # GDCM applies RescaleSlope/RescaleIntercept, so the pixel values are HU.
        img = reader.Execute()
    except RuntimeError as exc:
        raise FileFormatError(f"{folder}: cannot read the DICOM series: {_itk_reason(exc)}") from exc
    if uneven:
        warnings.warn(
            f"{folder}: uneven DICOM slice steps ({steps.min():.3f} … {steps.max():.3f} mm); the volume "
            f"assumes a regular step of {img.GetSpacing()[2]:.3f} mm",
            stacklevel=4,
        )
    return img


def _read_image(path: Path) -> sitk.Image:
    ext = _check_file(path)
    return _read_dicom_series(path) if ext == "" else _read_file_image(path, ext)


def _image_to_numpy(img: sitk.Image, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(array [i, j, k], affine RAS 4×4 float64)`` for a 3D scalar image."""
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp != 1:
        raise FileFormatError(f"{path}: {ncomp} components per voxel (e.g. RGB); expected a scalar image")
    dim = img.GetDimension()
    size = tuple(img.GetSize())
    arr = sitk.GetArrayFromImage(img)  # reversed index order: [.., k, j, i]
    spacing = np.array(img.GetSpacing(), dtype=np.float64)
    origin = np.array(img.GetOrigin(), dtype=np.float64)
    direction = np.array(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    if dim > 3 and all(s == 1 for s in size[3:]):  # 4D with a single time point
        arr = arr.reshape(arr.shape[dim - 3 :])
        spacing, origin, direction = spacing[:3], origin[:3], direction[:3, :3]
    elif dim != 3:
        raise FileFormatError(
            f"{path}: expected a 3D volume, got a {dim}D image of size {' × '.join(str(s) for s in size)}"
        )
    if np.any(~(spacing > 0)):
        raise FileFormatError(f"{path}: voxel spacing must be > 0 mm, got {tuple(spacing.tolist())}")
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = origin
    return _reverse_axes(arr), _LPS_RAS @ lps


# ---------------------------------------------------------------------------------------------- public API
def read_volume(path: PathLike, labels: PathLike | None = None) -> Volume:
    """Read a CT volume (HU) into a :class:`Volume` in the RAS+ world frame.

    Args:
        path: a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) or
            3D DICOM (``.dcm``) file, or a folder holding a DICOM series (slices sorted by position along the
            slice normal; RescaleSlope/Intercept applied, so values are HU; if the folder holds several series
            the largest is read and a ``UserWarning`` says so).
        labels: optional label map on the same grid (any of the file formats); see :func:`read_labels`.

    Returns:
        ``Volume`` with float32 ``data`` ``[i, j, k]`` in HU, float64 ``affine`` voxel→world RAS mm, and
        ``source = str(path)``.

    Raises:
        FileFormatError: missing path, unsupported extension, corrupt/unreadable file, not a 3D scalar image
            (2D, 4D, RGB), zero or negative voxel spacing in the header. The message names the file.
        InputError: NaN/inf voxels (counted), or a label map that is not on the CT's grid.
    """
    p = Path(path)
    img = _read_image(p)
    arr, affine = _image_to_numpy(img, p)
    data = arr.astype(np.float32, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if not bad and _extension(p) in (".nii", ".nii.gz"):
        bad = _nifti_nonfinite(p)
    if bad:
        raise InputError(f"{p}: {bad} of {data.size} voxels are NaN or infinite; expected finite HU values")
    try:
        vol = Volume(data=torch.from_numpy(data), affine=torch.from_numpy(affine), source=str(p))
    except InputError as exc:
        raise InputError(f"{p}: {exc}") from exc
    if labels is not None:
        vol = vol.with_labels(read_labels(labels, like=vol))
    return vol


def read_labels(path: PathLike, like: Volume) -> torch.Tensor:
    """Read a label map that lies on the grid of ``like`` (same shape, affine within 1e-3 mm).

    Returns:
        ``(I, J, K)`` int16 tensor (int32 if an id exceeds 32767) of label ids ≥ 0, on ``like``'s device.

    Raises:
        FileFormatError: as :func:`read_volume`.
        InputError: another grid (shape, or any box corner more than 1e-3 mm away) — the message names both
            files —, or non-integer/negative ids.
    """
    p = Path(path)
    arr, affine = _image_to_numpy(_read_image(p), p)
    other = like.source or "the volume"
    if arr.shape != like.shape:
        raise InputError(
            f"labels {p} are not on the grid of {other}: expected shape {like.shape}, got {arr.shape}"
        )
    ref = like.affine.detach().cpu().numpy()
    n = np.array(like.shape, dtype=np.float64)
    corners = np.array(
        [[i, j, k, 1.0] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5) for k in (-0.5, n[2] - 0.5)]
    )
    dev = float(np.abs(corners @ (affine - ref).T).max())
    if dev > 1e-3:
        raise InputError(
            f"labels {p} are not on the grid of {other}: the affines differ by up to {dev:.4g} mm "
            f"at the box corners (tolerance 1e-3 mm)"
        )
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise InputError(f"labels {p}: expected integer label ids, got non-integer {arr.dtype} values")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"labels {p}: expected integer label ids, got dtype {arr.dtype}")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < 0:
        raise InputError(f"labels {p}: expected label ids >= 0, got minimum {lo:g}")
    if hi > np.iinfo(np.int32).max:
        raise InputError(f"labels {p}: expected label ids <= 2**31 - 1, got {hi:g}")
    out = arr.astype(np.int16 if hi <= np.iinfo(np.int16).max else np.int32)
    return torch.from_numpy(out).to(like.data.device)


def _to_sitk(array_ijk: np.ndarray, affine_ras: np.ndarray, what: str) -> sitk.Image:
    lps = _LPS_RAS @ affine_ras
    lin = lps[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    direction = lin / spacing[None, :]
    if np.abs(direction.T @ direction - np.eye(3)).max() > 1e-4:
        raise InputError(
            f"{what}: the affine has shear (its axes are not orthogonal); NIfTI/NRRD/MetaImage via SimpleITK "
            "store only orthonormal directions"
        )
    u, _, vt = np.linalg.svd(direction)  # nearest orthonormal matrix, removes float32 rounding
    direction = u @ vt
    img = sitk.GetImageFromArray(_reverse_axes(array_ijk))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in lps[:3, 3]))
    img.SetDirection(tuple(float(d) for d in direction.reshape(-1)))
    return img


def _atomic_write(img: sitk.Image, path: Path) -> None:
    """Write ``img`` into a temporary folder next to ``path``, then ``os.replace`` the file(s) into place.

    Detached-header formats (``.mhd``, ``.nhdr``) produce two files that refer to each other by name, so the
    temporary folder uses the final names; the data file is moved first and the header last.
    """
    ext = _extension(path)
    if ext not in WRITABLE_EXTENSIONS:
        raise FileFormatError(
            f"{path}: unsupported file extension {ext or '(none)'!r} for writing; supported: "
            f"{', '.join(WRITABLE_EXTENSIONS)}"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileFormatError(f"{path}: the folder {parent} does not exist")
    tmpdir = Path(tempfile.mkdtemp(prefix=".xraypose-write-", dir=parent))
    try:
        tmp = tmpdir / path.name
        try:
            sitk.WriteImage(img, str(tmp), useCompression=ext not in (".nii",))
        except RuntimeError as exc:
            raise FileFormatError(f"{path}: cannot write the file: {_itk_reason(exc)}") from exc
        for f in sorted(tmpdir.iterdir()):
            if f.name != path.name:
                os.replace(f, parent / f.name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_volume(
    volume: Volume,
    path: PathLike,
    *,
    dtype: str = "float32",
    labels_path: PathLike | None = None,
) -> Path:
    """Write ``volume`` (HU, RAS affine) to a NIfTI, NRRD or MetaImage file, atomically.

    The file is written under a temporary name in the same folder and moved into place with ``os.replace``,
    so readers never see a half-written file. The RAS affine is stored as the format's LPS geometry (NIfTI
    gets an equivalent RAS sform/qform through SimpleITK). Compressed where the format allows.

    Args:
        volume: the volume to write; its affine must have orthogonal axes (rotation × spacing, no shear).
        path: destination with one of :data:`WRITABLE_EXTENSIONS`.
        dtype: voxel type on disk: ``"float32"`` (default), ``"float64"``, ``"int16"`` or ``"int32"`` (HU are
            rounded; values outside the type's range raise :class:`InputError`).
        labels_path: if given, also write ``volume.labels`` there (uint8, int16 or int32: the smallest that
            fits).

    Returns:
        The path written.
    """
    p = Path(path)
    if dtype not in _WRITE_DTYPES:
        raise InputError(f"write_volume dtype: expected one of {sorted(_WRITE_DTYPES)}, got {dtype!r}")
    if labels_path is not None and volume.labels is None:
        raise InputError(f"write_volume labels_path={labels_path}: the volume has no labels to write")
    affine = volume.affine.detach().cpu().numpy()
    data = volume.data.detach().cpu().to(torch.float64).numpy()
    np_type = _WRITE_DTYPES[dtype]
    if np.issubdtype(np_type, np.integer):
        data = np.round(data)
        info = np.iinfo(np_type)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise InputError(
                f"write_volume {p}: HU range [{data.min():g}, {data.max():g}] does not fit dtype {dtype}"
            )
    _atomic_write(_to_sitk(data.astype(np_type), affine, f"write_volume {p}"), p)
    if labels_path is not None:
        assert volume.labels is not None
        lab = volume.labels.detach().cpu().numpy()
        hi = int(lab.max()) if lab.size else 0
        lab_type = np.uint8 if hi <= 255 else (np.int16 if hi <= np.iinfo(np.int16).max else np.int32)
        lp = Path(labels_path)
        _atomic_write(_to_sitk(lab.astype(lab_type), affine, f"write_volume {lp}"), lp)
    return p


# ---------------------------------------------------------------------------------------------- folders
_LABEL_WORDS = ("label", "seg", "mask")
_VOLUME_FILE_EXTENSIONS = tuple(e for e in SUPPORTED_EXTENSIONS if e != ".dcm")


def _volume_stem(path: Path) -> str:
    return path.name[: -len(_extension(path))]


def _is_label_name(path: Path) -> bool:
    return any(w in _volume_stem(path).lower() for w in _LABEL_WORDS)


def _holds_dicom_series(folder: Path) -> bool:
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on stderr when a folder has no series
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def find_cts(folder: PathLike) -> list[tuple[Path, Path | None]]:
    """The CTs of a folder, as ``(CT path, label map path or None)`` pairs in sorted order.

    A CT is

    - a volume file directly in ``folder`` (NIfTI, NRRD, MetaImage) whose name does not contain ``label``,
      ``seg`` or ``mask``; a file ``<stem>_labels.<ext>`` (or ``<stem>_seg``…) beside it is its label map;
    - a subfolder holding ``ct.<ext>`` (the layout ``<name>/ct.nii.gz``, ``<name>/labels.nii.gz``), with
      ``labels.<ext>`` beside it as its label map;
    - otherwise a subfolder holding a DICOM series.

    Other files and folders are ignored.

    Raises:
        FileFormatError: ``folder`` is not a folder, or holds no CT.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileFormatError(f"{root}: not a folder")
    found: list[tuple[Path, Path | None]] = []
    entries = sorted(root.iterdir())
    files = [p for p in entries if p.is_file() and _extension(p) in _VOLUME_FILE_EXTENSIONS]
    for p in files:
        if _is_label_name(p):
            continue
        stem = _volume_stem(p)
        labels = next(
            (
                q
                for q in files
                if q is not p and _is_label_name(q) and _volume_stem(q).lower().startswith(stem.lower() + "_")
            ),
            None,
        )
        found.append((p, labels))
    for sub in (p for p in entries if p.is_dir()):
        inner = sorted(q for q in sub.iterdir() if q.is_file() and _extension(q) in _VOLUME_FILE_EXTENSIONS)
        ct = next((q for q in inner if _volume_stem(q).lower() == "ct"), None)
        if ct is not None:
            labels = next((q for q in inner if _volume_stem(q).lower() == "labels"), None)
            found.append((ct, labels))
        elif _holds_dicom_series(sub):
            found.append((sub, None))
    if not found:
        raise FileFormatError(
            f"{root}: no CT found (expected volume files {', '.join(_VOLUME_FILE_EXTENSIONS)}, subfolders with "
            "ct.<ext>, or DICOM series folders)"
        )
    return found
