"""Tests of xraypose.io: Volume, readers and writers (NIfTI, NRRD, MetaImage, DICOM), HU → μ, images."""

from __future__ import annotations

import gzip
import math
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from PIL import Image

from xraypose.errors import FileFormatError, InputError
from xraypose.io import (
    AttenuationModel,
    Volume,
    hu_to_mu,
    load_default_ct,
    load_image,
    read_labels,
    read_volume,
    save_image,
    write_volume,
)
from xraypose.io.default import default_ct_structures

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def chest(shared_data: Path) -> Volume:
    d = shared_data / "chest-ct"
    return read_volume(d / "ct.nii.gz", labels=d / "labels.nii.gz")


# ---------------------------------------------------------------------------------------------- helpers
def _rotation(a: float, b: float, c: float) -> np.ndarray:
    """R_z(a) · R_x(b) · R_y(c)."""
    ca, sa, cb, sb, cc, sc = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(c), math.sin(c)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cb, -sb], [0, sb, cb]])
    ry = np.array([[cc, 0, sc], [0, 1, 0], [-sc, 0, cc]])
    return rz @ rx @ ry


def _affine(spacing: tuple[float, float, float], flip: bool = False) -> np.ndarray:
    a = np.eye(4)
    r = _rotation(0.4, 0.3, -0.2)
    if flip:  # a left-handed (LAS-like) index frame
        r = r @ np.diag([-1.0, 1.0, 1.0])
    a[:3, :3] = r @ np.diag(spacing)
    a[:3, 3] = (12.5, -40.25, 101.0)
    return a


def _synthetic(shape=(6, 5, 4), spacing=(0.8, 1.1, 2.0), flip: bool = False, seed: int = 0) -> Volume:
    """Even integer HU (exactly representable in every format, also with DICOM slope 2)."""
    rng = np.random.default_rng(seed)
    data = (2 * rng.integers(-500, 1000, size=shape)).astype(np.float32)
    labels = rng.integers(0, 4, size=shape).astype(np.int16)
    return Volume(torch.from_numpy(data), torch.from_numpy(_affine(spacing, flip)), torch.from_numpy(labels))


def _sitk_affine_ras(img: sitk.Image) -> np.ndarray:
    """RAS affine computed independently from a SimpleITK image's LPS geometry."""
    d = np.array(img.GetDirection()).reshape(3, 3)
    a = np.eye(4)
    a[:3, :3] = d @ np.diag(img.GetSpacing())
    a[:3, 3] = img.GetOrigin()
    return LPS_RAS @ a


def _write_dicom_series(vol: Volume, folder: Path, uid: str = "1.2.826.0.1.3680043.2.1125.1", slope: int = 2):
    """Write ``vol`` as DICOM slices (raw = (HU + 1024) / slope), files named in a scrambled order."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS_RAS @ vol.affine.numpy()
    sp = vol.spacing.numpy()
    d = lps[:3, :3] / sp
    nk = vol.shape[2]
    order = np.random.default_rng(1).permutation(nk)
    for k in range(nk):
        sl = sitk.GetImageFromArray(vol.data[:, :, k].numpy().T.astype(np.int16))  # [row j, col i]
        sl.SetSpacing((float(sp[0]), float(sp[1])))
        ipp = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]
        tags = {
            "0008|0060": "CT",
            "0020|000d": uid + ".9",
            "0020|000e": uid,
            "0020|0013": str(int(order[k]) + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in ipp),
            "0020|0037": "\\".join(f"{v:.8f}" for v in (*d[:, 0], *d[:, 1])),
            "0018|0050": f"{sp[2]:.6f}",
            "0028|1052": "-1024",
            "0028|1053": str(slope),
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(str(folder / f"IM{order[k]:04d}_{uid[-3:]}.dcm"))
        w.Execute(sl)


# ---------------------------------------------------------------------------------------------- Volume
def test_volume_geometry_hand_computed() -> None:
    a = torch.tensor([[-2.0, 0, 0, 10], [0, 1.5, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]], dtype=torch.float64)
    v = Volume(torch.zeros(4, 3, 2), a)
    assert v.shape == (4, 3, 2)
    assert v.data.dtype == torch.float32 and v.affine.dtype == torch.float64
    assert torch.allclose(v.spacing, torch.tensor([2.0, 1.5, 3.0], dtype=torch.float64))
    assert torch.allclose(v.origin, torch.tensor([10.0, -20.0, 5.0], dtype=torch.float64))
    # centre index (1.5, 1, 0.5) -> (10 - 3, -20 + 1.5, 5 + 1.5)
    assert torch.allclose(v.center_world, torch.tensor([7.0, -18.5, 6.5], dtype=torch.float64))
    assert torch.allclose(
        v.index_to_world([1.0, 2.0, 1.0]), torch.tensor([8.0, -17.0, 8.0], dtype=torch.float64)
    )
    pts = torch.randn(5, 2, 3, dtype=torch.float64)
    assert torch.allclose(v.world_to_index(v.index_to_world(pts)), pts, atol=1e-12)
    # box [-0.5, n - 0.5]: x from 10 - 2*3.5 = 3 to 10 + 1 = 11, y from -20.75 to -16.25, z from 3.5 to 9.5
    b = v.bounds_world()
    assert torch.allclose(b, torch.tensor([[3.0, -20.75, 3.5], [11.0, -16.25, 9.5]], dtype=torch.float64))
    c = v.corners_world()
    assert c.shape == (8, 3)
    assert torch.allclose(c.mean(dim=0), v.center_world)


def test_volume_validation_names_the_field() -> None:
    eye = torch.eye(4, dtype=torch.float64)
    with pytest.raises(InputError, match=r"Volume\.data.*3D.*got 2D"):
        Volume(torch.zeros(4, 4), eye)
    nan = torch.zeros(3, 3, 3)
    nan[0, 1, 2] = float("nan")
    nan[2, 2, 2] = float("inf")
    with pytest.raises(InputError, match=r"Volume\.data.*2 NaN/inf"):
        Volume(nan, eye)
    with pytest.raises(InputError, match=r"Volume\.affine.*\(4, 4\).*\(3, 4\)"):
        Volume(torch.zeros(2, 2, 2), eye[:3])
    bad_row = eye.clone()
    bad_row[3, 0] = 1.0
    with pytest.raises(InputError, match=r"Volume\.affine.*last row"):
        Volume(torch.zeros(2, 2, 2), bad_row)
    zero = eye.clone()
    zero[1, 1] = 0.0
    with pytest.raises(InputError, match=r"Volume\.affine.*spacing > 0"):
        Volume(torch.zeros(2, 2, 2), zero)
    singular = eye.clone()
    singular[:3, 1] = singular[:3, 0]
    with pytest.raises(InputError, match=r"Volume\.affine.*invertible"):
        Volume(torch.zeros(2, 2, 2), singular)
    with pytest.raises(InputError, match=r"Volume\.labels.*\(2, 2, 2\).*\(2, 2, 3\)"):
        Volume(torch.zeros(2, 2, 2), eye, labels=torch.zeros(2, 2, 3, dtype=torch.int16))
    with pytest.raises(InputError, match=r"Volume\.labels.*>= 0"):
        Volume(torch.zeros(2, 2, 2), eye, labels=-torch.ones(2, 2, 2, dtype=torch.int32))


def test_volume_labels_crop_to_centroids() -> None:
    v = _synthetic(shape=(8, 6, 5))
    labels = torch.zeros(8, 6, 5, dtype=torch.uint8)
    labels[2:4, 1:3, 0] = 3  # centroid index (2.5, 1.5, 0)
    labels[7, 5, 4] = 200
    v = v.with_labels(labels)
    assert v.labels is not None and v.labels.dtype == torch.int16
    cents = v.label_centroids()
    assert sorted(cents) == [3, 200]
    assert torch.allclose(cents[3], v.index_to_world([2.5, 1.5, 0.0]), atol=1e-9)
    assert torch.allclose(cents[200], v.index_to_world([7.0, 5.0, 4.0]), atol=1e-9)
    c = v.crop((2, 1, 0), (5, 6, 3))
    assert c.shape == (3, 5, 3)
    assert torch.equal(c.data, v.data[2:5, 1:6, 0:3])
    assert torch.allclose(c.index_to_world([0.0, 0.0, 0.0]), v.index_to_world([2.0, 1.0, 0.0]), atol=1e-9)
    assert torch.allclose(c.label_centroids()[3], cents[3], atol=1e-9)
    with pytest.raises(InputError, match=r"Volume\.crop"):
        v.crop((0, 0, 0), (9, 1, 1))
    v64 = v.to(dtype=torch.float64)
    assert v64.data.dtype == torch.float64 and v64.labels is not None and v64.labels.dtype == torch.int16
    assert v.with_labels(None).labels is None


# ---------------------------------------------------------------------------------------------- resample
def test_resample_factor_two_equals_average_pooling_and_keeps_box() -> None:
    v = _synthetic(shape=(8, 6, 4), spacing=(1.0, 1.5, 2.0))
    r = v.resample((2.0, 3.0, 4.0))
    assert r.shape == (4, 3, 2)
    expected = F.avg_pool3d(v.data[None, None], kernel_size=2)[0, 0]
    assert torch.allclose(r.data, expected, atol=1e-3)
    assert torch.allclose(r.corners_world(), v.corners_world(), atol=1e-9)
    assert torch.allclose(r.spacing, torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64))


def test_resample_non_integer_ratio_keeps_box_and_mean() -> None:
    v = _synthetic(shape=(10, 7, 5), spacing=(1.0, 1.0, 1.0), flip=True)
    r = v.resample(2.5)
    assert r.shape == (4, 3, 2)  # round(10/2.5), round(7/2.5), round(5/2.5)
    assert torch.allclose(r.spacing, torch.tensor([2.5, 7 / 3, 2.5], dtype=torch.float64))
    assert torch.allclose(r.corners_world(), v.corners_world(), atol=1e-9)
    assert torch.allclose(r.center_world, v.center_world, atol=1e-9)
    assert r.data.double().mean().item() == pytest.approx(v.data.double().mean().item(), rel=1e-5)
    # labels: nearest neighbour -> each new label is the old label at the nearest old voxel centre
    assert r.labels is not None and v.labels is not None
    old_idx = v.world_to_index(r.index_to_world(torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)))
    i, j, k = (math.floor(x + 0.5) for x in old_idx[0].tolist())
    assert int(r.labels[1, 2, 0]) == int(v.labels[i, j, k])


def test_resample_upsampling_equals_trilinear_interpolate() -> None:
    v = _synthetic(shape=(5, 4, 3), spacing=(1.0, 2.0, 2.0))
    r = v.resample((0.5, 1.0, 0.5))
    assert r.shape == (10, 8, 12)
    expected = F.interpolate(v.data[None, None], size=(10, 8, 12), mode="trilinear", align_corners=False)[
        0, 0
    ]
    assert torch.allclose(r.data, expected, atol=1e-3)
    assert torch.allclose(r.corners_world(), v.corners_world(), atol=1e-9)


def test_resample_exact_spacing_is_centred() -> None:
    v = _synthetic(shape=(10, 7, 5), spacing=(1.0, 1.0, 1.0))
    r = v.resample(2.5, exact_spacing=True)
    assert torch.allclose(r.spacing, torch.full((3,), 2.5, dtype=torch.float64))
    assert torch.allclose(r.center_world, v.center_world, atol=1e-9)
    with pytest.raises(InputError, match="spacing_mm"):
        v.resample(0.0)


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
@pytest.mark.parametrize("flip", [False, True])
def test_write_read_round_trip(tmp_path: Path, ext: str, flip: bool) -> None:
    v = _synthetic(flip=flip)
    path = tmp_path / f"vol{ext}"
    lab_path = tmp_path / f"lab{ext}"
    assert write_volume(v, path, labels_path=lab_path) == path
    back = read_volume(path, labels=lab_path)
    assert back.shape == v.shape
    assert torch.equal(back.data, v.data)
    assert torch.allclose(back.affine, v.affine, atol=1e-4)
    assert back.labels is not None and torch.equal(back.labels, v.labels)
    assert back.source == str(path)
    # the file's own geometry (LPS, read independently) puts voxel (1, 2, 3) at the same world point
    img = sitk.ReadImage(str(path))
    lps = np.array(img.TransformContinuousIndexToPhysicalPoint((1.0, 2.0, 3.0)))
    assert np.allclose(lps * [-1, -1, 1], v.index_to_world([1.0, 2.0, 3.0]).numpy(), atol=1e-4)
    assert sitk.GetArrayFromImage(img)[3, 2, 1] == v.data[1, 2, 3].item()
    # atomic writes leave no temporary files behind
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_write_int16_and_overwrite(tmp_path: Path) -> None:
    v = _synthetic()
    path = tmp_path / "v.nii.gz"
    write_volume(v, path)
    v2 = Volume(v.data + 2.0, v.affine)
    write_volume(v2, path, dtype="int16")
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkInt16
    assert torch.equal(read_volume(path).data, v2.data)
    with pytest.raises(InputError, match="int16"):
        write_volume(Volume(torch.full((2, 2, 2), 1e6), v.affine), tmp_path / "big.nii.gz", dtype="int16")
    with pytest.raises(FileFormatError, match=r"v\.png.*\.nii\.gz"):
        write_volume(v, tmp_path / "v.png")
    with pytest.raises(InputError, match="no labels"):
        write_volume(Volume(v.data, v.affine), path, labels_path=tmp_path / "l.nii.gz")


def test_dicom_series_round_trip_rotated_scrambled_rescaled(tmp_path: Path) -> None:
    v = _synthetic(shape=(6, 5, 4), spacing=(0.8, 1.1, 2.0))
    _write_dicom_series(v, tmp_path / "series", slope=2)
    back = read_volume(tmp_path / "series")
    assert back.shape == v.shape
    assert torch.equal(back.data, v.data)  # stored (HU + 1024) / 2, read back as HU
    assert torch.allclose(back.affine, v.affine, atol=1e-4)


def test_dicom_folder_with_two_series_reads_the_largest(tmp_path: Path) -> None:
    big = _synthetic(shape=(6, 5, 4))
    small = _synthetic(shape=(6, 5, 2), seed=3)
    _write_dicom_series(big, tmp_path, uid="1.2.826.0.1.3680043.2.1125.111")
    _write_dicom_series(small, tmp_path, uid="1.2.826.0.1.3680043.2.1125.222")
    with pytest.warns(UserWarning, match="2 DICOM series"):
        back = read_volume(tmp_path)
    assert back.shape == (6, 5, 4)
    assert torch.equal(back.data, big.data)


# ---------------------------------------------------------------------------------------------- real data
def test_chest_ct_las_orientation(chest: Volume, shared_data: Path) -> None:
    path = shared_data / "chest-ct" / "ct.nii.gz"
    assert chest.shape == (512, 512, 133)
    assert torch.allclose(chest.spacing, torch.tensor([0.703125, 0.703125, 2.5], dtype=torch.float64))
    # LAS: index i runs to the patient's left (-x), j anterior (+y), k superior (+z)
    d = chest.direction
    assert torch.allclose(d, torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)), atol=1e-6)
    # against SimpleITK's LPS header, flipped
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    lps = np.eye(4)
    lps[:3, :3] = np.array(r.GetDirection()).reshape(3, 3) @ np.diag(r.GetSpacing())
    lps[:3, 3] = r.GetOrigin()
    assert np.allclose(chest.affine.numpy(), LPS_RAS @ lps, atol=1e-4)
    # against the NIfTI sform itself (RAS by definition of the format)
    with gzip.open(path, "rb") as f:
        hdr = f.read(348)
    assert struct.unpack("<h", hdr[254:256])[0] > 0
    srow = np.array(struct.unpack("<12f", hdr[280:328])).reshape(3, 4)
    assert np.allclose(chest.affine.numpy()[:3], srow, atol=1e-3)
    # data[i, j, k] is SimpleITK's array[k, j, i]
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    for i, j, k in [(0, 0, 0), (511, 3, 7), (100, 300, 132), (256, 256, 66)]:
        assert chest.data[i, j, k].item() == arr[k, j, i]
    assert chest.labels is not None and chest.labels.shape == chest.shape


def test_labels_on_another_grid_are_rejected(tmp_path: Path) -> None:
    small = _synthetic()
    ref_path = tmp_path / "ref_ct.mha"
    write_volume(small, ref_path)
    ref = read_volume(ref_path)
    other = tmp_path / "wrong_grid_labels.nii.gz"
    write_volume(_synthetic(shape=(6, 5, 3)), other)
    with pytest.raises(InputError, match=r"wrong_grid_labels\.nii\.gz.*ref_ct\.mha.*shape"):
        read_labels(other, like=ref)
    # same shape, origin moved by 1 mm
    shifted = small.affine.clone()
    shifted[0, 3] += 1.0
    lab = tmp_path / "shifted_labels.mha"
    write_volume(Volume(small.data.abs(), shifted), lab, dtype="int16")
    with pytest.raises(InputError, match=r"shifted_labels\.mha.*ref_ct\.mha.*1 mm"):
        read_volume(ref_path, labels=lab)
    # the same grid up to float rounding is accepted
    same = tmp_path / "same_grid_labels.nii.gz"
    nearly = small.affine.clone()
    nearly[:3] += 1e-5 * torch.rand(3, 4, dtype=torch.float64)
    write_volume(Volume(small.data.abs(), nearly), same)
    assert torch.equal(read_labels(same, like=ref), small.data.abs().to(torch.int16))


def test_dicom_series_real(shared_data: Path) -> None:
    folder = shared_data / "dicom-ct-series"
    v = read_volume(folder)
    assert v.shape == (512, 512, 20)
    assert torch.allclose(
        v.spacing, torch.tensor([0.9765625, 0.9765625, 2.0], dtype=torch.float64), atol=1e-6
    )
    # axial slices: LPS identity directions -> RAS diag(-1, -1, 1); slices sorted by increasing z
    assert torch.allclose(v.direction, torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)))
    positions = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith("CT."):
            r = sitk.ImageFileReader()
            r.SetFileName(str(f))
            r.ReadImageInformation()
            positions.append((float(r.GetMetaData("0020|0032").split("\\")[2]), f))
    positions.sort()
    assert v.origin[2].item() == pytest.approx(positions[0][0], abs=1e-3)
    assert v.index_to_world([0.0, 0.0, 19.0])[2].item() == pytest.approx(positions[-1][0], abs=1e-3)
    ipp0 = [float(x) for x in sitk.ReadImage(str(positions[0][1])).GetOrigin()]
    assert v.origin[:2].tolist() == pytest.approx([-ipp0[0], -ipp0[1]], abs=1e-3)
    # slice k is the file at the k-th position
    sl5 = sitk.GetArrayFromImage(sitk.ReadImage(str(positions[5][1])))[0]
    assert np.array_equal(v.data[:, :, 5].numpy(), sl5.T.astype(np.float32))
    # HU: outside air at -1024/-1000, lots of soft tissue near 0-100
    d = v.data
    assert -1100 <= float(torch.quantile(d[::4, ::4].flatten(), 0.02)) <= -950
    soft = ((d > -100) & (d < 150)).float().mean().item()
    assert soft > 0.1
    assert float(d.max()) < 4000


# ---------------------------------------------------------------------------------------------- default CT
def test_default_ct() -> None:
    v = load_default_ct()
    assert v.shape == (144, 144, 133)
    assert torch.allclose(v.spacing, torch.full((3,), 2.5, dtype=torch.float64), atol=1e-4)
    assert v.labels is not None and v.labels.shape == v.shape
    assert -1024 <= float(v.data.min()) and float(v.data.max()) <= 3071
    lab = v.labels
    lung = v.data[(lab >= 10) & (lab <= 14)]
    vertebrae = v.data[(lab >= 29) & (lab <= 46)]
    liver = v.data[lab == 5]
    assert float(lung.mean()) < -700
    assert float(vertebrae.mean()) > 150
    assert -50 < float(liver.mean()) < 150
    names = default_ct_structures()
    assert names[5] == "liver" and names[36] == "vertebrae_T8"
    c = v.label_centroids()
    # RAS: liver (patient's right) has larger x than spleen; heart anterior (+y) of T8; T1 superior of T12
    assert c[5][0] > c[1][0] + 50
    assert c[51][1] > c[36][1] + 50
    assert c[43][2] > c[32][2] + 150
    assert load_default_ct(with_labels=False).labels is None


def test_default_ct_matches_original(chest: Volume) -> None:
    v = load_default_ct()
    assert torch.allclose(v.center_world, chest.center_world, atol=1.0)
    assert torch.allclose(v.bounds_world(), chest.bounds_world(), atol=1.0)
    assert torch.allclose(v.direction, chest.direction, atol=1e-6)
    t8 = 36
    full = chest.label_centroids()[t8]
    assert torch.linalg.vector_norm(v.label_centroids()[t8] - full).item() < 2.5


# ---------------------------------------------------------------------------------------------- bad files
def _nifti_with_zero_pixdim(path: Path) -> None:
    tmp = path.with_name("ok.nii")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32)), str(tmp))
    b = bytearray(tmp.read_bytes())
    b[80:84] = struct.pack("<f", 0.0)  # pixdim[1]
    b[252:256] = struct.pack("<hh", 0, 0)  # no qform, no sform
    path.write_bytes(bytes(b))


def _mha_with_zero_spacing(path: Path) -> None:
    header = (
        "ObjectType = Image\nNDims = 3\nDimSize = 6 5 4\nElementSpacing = 0 1 1\n"
        "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + np.zeros(120, np.float32).tobytes())


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match=r"nope\.nii\.gz.*no such file"):
        read_volume(tmp_path / "nope.nii.gz")


def test_read_unsupported_extension(tmp_path: Path) -> None:
    p = tmp_path / "volume.xyz"
    p.write_bytes(b"hello")
    with pytest.raises(FileFormatError, match=r"volume\.xyz.*'\.xyz'.*\.nii\.gz.*\.nrrd.*\.mha.*DICOM"):
        read_volume(p)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_read_corrupt_bytes(tmp_path: Path, ext: str) -> None:
    p = tmp_path / f"corrupt{ext}"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(FileFormatError, match=f"corrupt{re.escape(ext)}"):
        read_volume(p)


def test_read_truncated_file(tmp_path: Path) -> None:
    good = tmp_path / "good.nii.gz"
    write_volume(_synthetic(shape=(20, 20, 20)), good)
    p = tmp_path / "truncated.nii.gz"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FileFormatError, match=r"truncated\.nii\.gz"):
        read_volume(p)


def test_read_2d_image(tmp_path: Path) -> None:
    p = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.float32)), str(p))
    with pytest.raises(FileFormatError, match=r"flat\.nii\.gz.*3D.*got a 2D image of size 6 × 5"):
        read_volume(p)


def test_read_4d_image(tmp_path: Path) -> None:
    p = tmp_path / "series4d.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False), str(p))
    with pytest.raises(FileFormatError, match=r"series4d\.nii\.gz.*got a 4D image of size 5 × 4 × 3 × 2"):
        read_volume(p)


@pytest.mark.parametrize("name", ["nans.mha", "nans.nrrd", "nans.nii", "nans.nii.gz"])
def test_read_nan_voxels(tmp_path: Path, name: str) -> None:
    """NaN/inf voxels are reported for every format, NIfTI included (ITK's NIfTI reader turns NaN into 0)."""
    arr = np.zeros((4, 5, 6), np.float32)
    arr[0, 0, 0] = np.nan
    arr[1, 2, 3] = np.nan
    arr[3, 4, 5] = np.inf
    p = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(p))
    with pytest.raises(InputError, match=name.replace(".", r"\.") + r".*3 of 120 voxels are NaN or infinite"):
        read_volume(p)


@pytest.mark.parametrize(
    "maker,name", [(_nifti_with_zero_pixdim, "zero.nii"), (_mha_with_zero_spacing, "zero.mha")]
)
def test_read_zero_spacing(tmp_path: Path, maker, name: str) -> None:
    p = tmp_path / name
    maker(p)
    with pytest.raises(FileFormatError, match=re.escape(name) + ".*zero.*spacing"):
        read_volume(p)


def test_read_empty_dicom_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not dicom")
    with pytest.raises(FileFormatError, match=r"empty.*no DICOM series"):
        read_volume(tmp_path / "empty")
    _write_dicom_series(_synthetic(shape=(6, 5, 1)), tmp_path / "single")
    with pytest.raises(FileFormatError, match=r"single.*1 slice"):
        read_volume(tmp_path / "single")


# ---------------------------------------------------------------------------------------------- HU -> mu
def test_hu_to_mu_hand_computed() -> None:
    hu = torch.tensor([-2000.0, -1000.0, 0.0, 1000.0], dtype=torch.float64)
    mu = hu_to_mu(hu)
    assert mu.tolist() == pytest.approx([0.0, 0.0, 0.0193, 0.0386], abs=1e-12)
    assert hu_to_mu(hu.float()).tolist() == pytest.approx([0.0, 0.0, 0.0193, 0.0386], abs=1e-8)
    # mu_air = 0.001: -1000 HU -> 0.001, 0 -> 0.0193, 1000 -> 0.0193 + 0.0183
    assert hu_to_mu(hu, mu_air=0.001).tolist() == pytest.approx([0.0, 0.001, 0.0193, 0.0376], abs=1e-9)
    # bone scaling above 350 HU: mu(350) = 0.0193 * 1.35; at 1000: mu(350) + 2 * 0.0193 * 0.65
    bone = hu_to_mu(torch.tensor([350.0, 1000.0]), bone_scale=2.0)
    assert bone.tolist() == pytest.approx([0.026055, 0.026055 + 2 * 0.0193 * 0.65], abs=1e-7)
    model = AttenuationModel(bone_scale=2.0)
    assert torch.allclose(model(torch.tensor([350.0, 1000.0])), bone)
    assert hu_to_mu(np.array([0.0])).dtype == torch.float32
    assert hu_to_mu(torch.tensor([0.0], dtype=torch.float64)).dtype == torch.float64


def test_hu_to_mu_continuous_and_differentiable() -> None:
    hu = torch.tensor([349.999, 350.001, 0.0, 1000.0], dtype=torch.float64, requires_grad=True)
    mu = hu_to_mu(hu, bone_scale=1.5)
    assert abs(mu[1].item() - mu[0].item()) < 1e-7
    mu.sum().backward()
    assert hu.grad is not None
    assert hu.grad.tolist() == pytest.approx([0.0193e-3, 1.5 * 0.0193e-3, 0.0193e-3, 1.5 * 0.0193e-3])
    with pytest.raises(InputError, match="mu_water"):
        hu_to_mu(hu, mu_water=0.0)
    with pytest.raises(InputError, match="bone_scale"):
        AttenuationModel(bone_scale=-1.0)


# ---------------------------------------------------------------------------------------------- 2D images
def test_image_round_trips(tmp_path: Path) -> None:
    img = torch.linspace(-5.0, 5.0, 12, dtype=torch.float64).reshape(3, 4)
    expected8 = np.round((img.numpy() + 5.0) / 10.0 * 255.0)
    save_image(img, tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), expected8.astype(np.float32))
    save_image(img, tmp_path / "b.png", bits=16)
    assert np.array_equal(
        load_image(tmp_path / "b.png"), np.round((img.numpy() + 5) / 10 * 65535).astype(np.float32)
    )
    save_image(img, tmp_path / "w.png", window=(0.0, 1.0))
    w = load_image(tmp_path / "w.png")
    assert w[0, 0] == 0.0 and w[-1, -1] == 255.0
    for ext in (".npy", ".tif", ".tiff"):
        save_image(img.float(), tmp_path / f"c{ext}")
        back = load_image(tmp_path / f"c{ext}")
        assert back.dtype == np.float32 and np.array_equal(back, img.float().numpy())
    Image.fromarray(np.full((6, 7), 100, np.uint8)).save(tmp_path / "d.jpg", quality=95)
    assert np.abs(load_image(tmp_path / "d.jpg") - 100.0).max() <= 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a.png", "b.png", "w.png", "c.npy", "c.tif", "c.tiff", "d.jpg"]
    )


def test_load_single_frame_dicom(tmp_path: Path) -> None:
    arr = np.array([[-1000, 0, 250], [500, 1000, 2000]], np.int16)
    img = sitk.GetImageFromArray(arr)
    for key, value in {"0008|0060": "CR", "0028|1052": "-1024", "0028|1053": "2"}.items():
        img.SetMetaData(key, value)
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    w.SetFileName(str(tmp_path / "xray.dcm"))
    w.Execute(img)
    assert np.array_equal(load_image(tmp_path / "xray.dcm"), arr.astype(np.float32))


def test_image_errors(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match=r"gone\.png"):
        load_image(tmp_path / "gone.png")
    with pytest.raises(FileFormatError, match=r"pic\.bmp.*\.png"):
        save_image(np.zeros((2, 2)), tmp_path / "pic.bmp")
    (tmp_path / "pic.bmp").write_bytes(b"BM")
    with pytest.raises(FileFormatError, match=r"pic\.bmp.*unsupported"):
        load_image(tmp_path / "pic.bmp")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    with pytest.raises(FileFormatError, match=r"broken\.png"):
        load_image(tmp_path / "broken.png")
    (tmp_path / "broken.tif").write_bytes(bytes(64))
    with pytest.raises(FileFormatError, match=r"broken\.tif"):
        load_image(tmp_path / "broken.tif")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(FileFormatError, match=r"cube\.npy.*\(2, 3, 4\)"):
        load_image(tmp_path / "cube.npy")
    with pytest.raises(InputError, match=r"3d\.png.*2D.*\(2, 2, 2\)"):
        save_image(np.zeros((2, 2, 2)), tmp_path / "3d.png")
    with pytest.raises(InputError, match=r"nan\.png.*1 pixels"):
        save_image(np.array([[0.0, np.nan]]), tmp_path / "nan.png")
    with pytest.raises(FileFormatError, match="does not exist"):
        save_image(np.zeros((2, 2)), tmp_path / "no" / "dir.png")


def test_warnings_are_not_emitted_for_a_single_series(tmp_path: Path) -> None:
    _write_dicom_series(_synthetic(), tmp_path / "one")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_volume(tmp_path / "one").shape == (6, 5, 4)
