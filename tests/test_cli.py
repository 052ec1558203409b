"""Tests of the ``xraypose`` command line: outputs equal the Python API's, and bad input gives one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner, Result

from cli_helpers import assert_user_error, invoke
from xraypose.cli import _fit_detector, app
from xraypose.geometry import Camera, Intrinsics, carm_pose
from xraypose.io import Volume, hu_to_mu, read_volume, write_volume
from xraypose.render import render

SHAPE = (24, 20, 16)
SPACING = 4.0
SDD = 1020.0
SIZE = 24  # detector pixels per side in the render tests (small: fast)


def _affine() -> np.ndarray:
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = (-46.0, -38.0, 12.0)
    return affine


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic CT: air around a water box holding two bone boxes (labels 1 and 2; water is label 3)."""
    folder = tmp_path_factory.mktemp("cli-ct")
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    labels = np.zeros(SHAPE, dtype=np.int16)
    hu[2:22, 3:17, 2:14] = 0.0
    labels[2:22, 3:17, 2:14] = 3
    for label, i in ((1, slice(4, 9)), (2, slice(15, 20))):  # side by side along x: different image columns
        hu[i, 6:14, 4:12] = 1000.0
        labels[i, 6:14, 4:12] = label
    volume = Volume(torch.from_numpy(hu), torch.from_numpy(_affine()), labels=torch.from_numpy(labels))
    write_volume(volume, folder / "ct.nii.gz", labels_path=folder / "labels.nii.gz")
    return folder / "ct.nii.gz"


def ok(result: Result) -> None:
    assert result.exit_code == 0, result.output
    assert result.exception is None


def expected(
    ct_path: Path,
    *,
    lao: float = 0.0,
    cranial: float = 0.0,
    method: str = "trilinear",
    intr: Intrinsics | None = None,
    select: tuple[int, ...] | None = None,
) -> np.ndarray:
    """What ``xraypose render`` should write: the Python API with the CLI's default geometry."""
    labels = ct_path.parent / "labels.nii.gz" if select is not None else None
    volume = read_volume(ct_path, labels=labels)
    if intr is None:
        side = _fit_detector(volume, SDD, None)
        intr = Intrinsics(sdd=SDD, rows=SIZE, cols=SIZE, dy=side / SIZE, dx=side / SIZE)
    pose = carm_pose(
        lao, cranial, source_to_isocenter=intr.sdd / 2, isocenter=tuple(volume.center_world.tolist())
    )
    mu = hu_to_mu(volume.data)
    if select is not None:
        assert volume.labels is not None
        mu = mu * torch.isin(volume.labels.long(), torch.tensor(select))
    return render(mu, volume.affine, Camera(intr, pose), method=method)[0].detach().numpy()


def assert_close(actual: np.ndarray, want: np.ndarray, rtol: float = 1e-5) -> None:
    assert actual.shape == want.shape
    assert actual.dtype == np.float32
    assert float(np.abs(want).max()) > 0
    assert float(np.abs(actual - want).max()) <= rtol * float(np.abs(want).max())


# ---------------------------------------------------------------------------------------------- demo
def test_demo_writes_three_views_and_respects_force(tmp_path: Path) -> None:
    out = tmp_path / "tmp" / "demo.png"
    out.parent.mkdir()
    ok(invoke("demo", "--size", 32, "--out", out))
    with Image.open(out) as im:
        assert im.size == (96, 32)  # (width, height): three 32×32 views side by side
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    tiles = [pixels[:, 32 * v : 32 * (v + 1)] for v in range(3)]
    for tile in tiles:
        assert tile.max() > tile.min()
    assert not np.array_equal(tiles[0], tiles[1])  # AP and LAO 30° differ
    first = out.read_bytes()

    again = invoke("demo", "--size", 32, "--out", out)
    assert_user_error(again, "--force", str(out))
    assert out.read_bytes() == first

    out.write_bytes(b"stale")
    ok(invoke("demo", "--size", 32, "--out", out, "--force"))
    with Image.open(out) as im:
        assert im.size == (96, 32)
        assert np.array_equal(np.asarray(im.convert("L"), dtype=np.float64), pixels)


# ---------------------------------------------------------------------------------------------- render
def test_render_npy_and_tif_equal_the_api(ct: Path, tmp_path: Path) -> None:
    want = expected(ct)
    ok(invoke("render", "--ct", ct, "--out", tmp_path / "ap.npy", "--size", SIZE))
    ap = np.load(tmp_path / "ap.npy")
    assert_close(ap, want)
    assert (ap > 0).mean() > 0.2 and (ap == 0).any()  # the CT's shadow lies inside the view, with margin

    ok(invoke("render", "--ct", ct, "--out", tmp_path / "ap.tif", "--size", SIZE))
    tif = tifffile.imread(tmp_path / "ap.tif")
    assert tif.dtype == np.float32
    np.testing.assert_array_equal(tif, ap)


def test_render_physics_equal_the_api(ct: Path, tmp_path: Path) -> None:
    from xraypose.physics import render_polychromatic, simulate_xray, tube_spectrum

    volume = read_volume(ct)
    side = _fit_detector(volume, SDD, None)
    intr = Intrinsics(sdd=SDD, rows=SIZE, cols=SIZE, dy=side / SIZE, dx=side / SIZE)
    cam = Camera(
        intr, carm_pose(0.0, 0.0, source_to_isocenter=SDD / 2, isocenter=tuple(volume.center_world.tolist()))
    )
    spectrum = tube_spectrum(70.0)
    ok(
        invoke(
            "render",
            "--ct",
            ct,
            "--out",
            tmp_path / "p.npy",
            "--size",
            SIZE,
            "--physics",
            "poly",
            "--kvp",
            70,
        )
    )
    want = render_polychromatic(volume.data, volume.affine, cam, spectrum=spectrum, output="line_integral")
    assert_close(np.load(tmp_path / "p.npy"), want[0].numpy())
    ok(
        invoke(
            "render",
            "--ct",
            ct,
            "--out",
            tmp_path / "s.npy",
            "--size",
            SIZE,
            "--physics",
            "simulated",
            "--kvp",
            70,
            "--seed",
            3,
        )
    )
    sim = simulate_xray(volume.data, volume.affine, cam, spectrum=spectrum, seed=3)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), sim[0].numpy())
    # side by side: three captioned panels, each with the CT's shadow
    ok(invoke("render", "--ct", ct, "--out", tmp_path / "c.png", "--size", SIZE, "--compare"))
    with Image.open(tmp_path / "c.png") as im:
        assert im.size[0] == 3 * SIZE + 2 * 4 and im.size[1] > SIZE
    # options that only mean something for the monochromatic renderer are refused
    assert_user_error(
        invoke(
            "render", "--ct", ct, "--out", tmp_path / "x.npy", "--physics", "poly", "--output", "intensity"
        ),
        "--physics mono",
    )
    assert_user_error(
        invoke("render", "--ct", ct, "--out", tmp_path / "y.npy", "--physics", "poly", "--kvp", 500), "--kvp"
    )
    assert_user_error(invoke("render", "--ct", ct, "--out", tmp_path / "z.npy", "--compare"), ".png")


def test_demo_compare_shows_three_physics_models(tmp_path: Path) -> None:
    out = tmp_path / "demo.png"
    ok(invoke("demo", "--size", 32, "--compare", "--out", out))
    with Image.open(out) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.shape[1] == 3 * 32 + 2 * 4
    caption = pixels.shape[0] - 32
    tiles = [pixels[caption:, (32 + 4) * v : (32 + 4) * v + 32] for v in range(3)]
    assert all(t.max() > t.min() for t in tiles)
    assert not np.array_equal(tiles[0], tiles[1]) and not np.array_equal(tiles[1], tiles[2])


def test_render_siddon_and_angles(ct: Path, tmp_path: Path) -> None:
    ok(invoke("render", "--ct", ct, "--out", tmp_path / "s.npy", "--size", SIZE, "--method", "siddon"))
    assert_close(np.load(tmp_path / "s.npy"), expected(ct, method="siddon"))

    ok(invoke("render", "--ct", ct, "--out", tmp_path / "lao.npy", "--size", SIZE, "--lao", 30))
    lao = np.load(tmp_path / "lao.npy")
    assert_close(lao, expected(ct, lao=30.0))
    ap = expected(ct)
    assert float(np.abs(lao - ap).max()) > 0.1 * float(ap.max())


def test_render_pose_file_reproduces_angles(ct: Path, tmp_path: Path) -> None:
    volume = read_volume(ct)
    pose = carm_pose(20.0, 10.0, source_to_isocenter=SDD / 2, isocenter=tuple(volume.center_world.tolist()))
    pose_file = tmp_path / "pose.json"
    pose_file.write_text(json.dumps({"pose": pose[0].tolist()}))
    ok(invoke("render", "--ct", ct, "--out", tmp_path / "pose.npy", "--size", SIZE, "--pose", pose_file))
    angles = tmp_path / "angles.npy"
    ok(invoke("render", "--ct", ct, "--out", angles, "--size", SIZE, "--lao", 20, "--cranial", 10))
    np.testing.assert_allclose(np.load(tmp_path / "pose.npy"), np.load(angles), rtol=0, atol=1e-6)
    assert_close(np.load(angles), expected(ct, lao=20.0, cranial=10.0))


def test_render_camera_file(ct: Path, tmp_path: Path) -> None:
    intr = Intrinsics(sdd=900.0, rows=12, cols=20, dy=12.0, dx=9.0, x0=5.0)
    intr.save(tmp_path / "cam.json")
    ok(invoke("render", "--ct", ct, "--out", tmp_path / "cam.npy", "--camera", tmp_path / "cam.json"))
    image = np.load(tmp_path / "cam.npy")
    assert image.shape == (12, 20)
    assert_close(image, expected(ct, intr=intr))


def test_render_selected_labels(ct: Path, tmp_path: Path) -> None:
    labels = ct.parent / "labels.nii.gz"
    out = tmp_path / "sel.npy"
    ok(invoke("render", "--ct", ct, "--labels", labels, "--select", "1", "--out", out, "--size", SIZE))
    sel = np.load(out)
    assert_close(sel, expected(ct, select=(1,)))
    full = expected(ct)
    only_two = expected(ct, select=(2,))
    shadow_of_two = (only_two > 0.5 * only_two.max()) & (expected(ct, select=(1,)) == 0)
    assert shadow_of_two.sum() >= 4
    assert np.all(sel[shadow_of_two] == 0)  # label 2 and the water (label 3) are not rendered
    assert np.all(full[shadow_of_two] > 0)
    assert float(sel.max()) > 0


# ---------------------------------------------------------------------------------------------- errors
def _write_2d(d: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9), np.float32)), str(d / "slice.nii.gz"))
    return d / "slice.nii.gz"


def _write_nan(d: Path) -> Path:
    # MetaImage keeps NaN on disk (ITK's NIfTI reader turns NaN voxels into 0).
    hu = np.zeros((6, 5, 4), np.float32)
    hu[1, 2, 3] = np.nan
    hu[4, 0, 0] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(hu), str(d / "nan.mha"))
    return d / "nan.mha"


def _write_other_grid(d: Path) -> Path:
    """A label map with half the CT's voxels per axis (same corner, 8 mm voxels)."""
    affine = _affine()
    affine[:3, :3] *= 2.0
    half = tuple(n // 2 for n in SHAPE)
    write_volume(Volume(torch.zeros(half), torch.from_numpy(affine)), d / "coarse.nii.gz", dtype="int16")
    return d / "coarse.nii.gz"


def _write(d: Path, name: str, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        (d / name).write_bytes(content)
    else:
        (d / name).write_text(content)
    return d / name


def _scaled_pose() -> str:
    pose = carm_pose(source_to_isocenter=510.0)[0].double()
    pose[:3, :3] *= 2.0
    return json.dumps({"pose": pose.tolist()})


Args = Callable[[Path, Path], list[object]]
ERROR_CASES: dict[str, tuple[Args, tuple[str, ...]]] = {
    "missing CT": (lambda ct, d: ["--ct", d / "none.nii.gz"], ("none.nii.gz", "no such file")),
    "corrupt CT": (
        lambda ct, d: ["--ct", _write(d, "junk.nii.gz", np.random.default_rng(0).bytes(300))],
        ("junk.nii.gz", "cannot read"),
    ),
    "unsupported CT": (
        lambda ct, d: ["--ct", _write(d, "ct.xyz", "x")],
        ("ct.xyz", "unsupported file extension '.xyz'"),
    ),
    "2D image": (lambda ct, d: ["--ct", _write_2d(d)], ("slice.nii.gz", "expected a 3D volume", "2D")),
    "NaN voxels": (lambda ct, d: ["--ct", _write_nan(d)], ("nan.mha", "2 of 120 voxels are NaN or infinite")),
    "labels on another grid": (
        lambda ct, d: ["--ct", ct, "--labels", _write_other_grid(d)],
        ("coarse.nii.gz", "not on the grid", "ct.nii.gz", "(12, 10, 8)"),
    ),
    "unsupported output": (lambda ct, d: ["--ct", ct, "--out", d / "x.bmp"], ("x.bmp", "'.bmp'", ".npy")),
    "3×3 pose": (
        lambda ct, d: ["--ct", ct, "--pose", _write(d, "p.json", json.dumps(np.eye(3).tolist()))],
        ("p.json", "4×4", "(3, 3)"),
    ),
    "pose not JSON": (
        lambda ct, d: ["--ct", ct, "--pose", _write(d, "p.json", "{pose: [[1, 0]")],
        ("p.json", "could not read a 4×4 pose matrix"),
    ),
    "non-rigid pose": (
        lambda ct, d: ["--ct", ct, "--pose", _write(d, "p.json", _scaled_pose())],
        ("p.json", "not a rotation matrix"),
    ),
    "pose extension": (
        lambda ct, d: ["--ct", ct, "--pose", _write(d, "p.yaml", "[]")],
        ("p.yaml: unsupported pose file",),
    ),
    "size 0": (lambda ct, d: ["--ct", ct, "--size", 0], ("--size", "got 0")),
    "source inside CT": (lambda ct, d: ["--ct", ct, "--sid", 5], ("source", "inside the volume")),
    "sid 0": (lambda ct, d: ["--ct", ct, "--sid", 0], ("--sid", "positive")),
    "sdd 0": (lambda ct, d: ["--ct", ct, "--sdd", 0], ("--sdd", "positive")),
    "detector-mm negative": (lambda ct, d: ["--ct", ct, "--detector-mm", -3], ("--detector-mm",)),
    "select without labels": (lambda ct, d: ["--ct", ct, "--select", "1,2"], ("--select needs --labels",)),
    "select not integers": (
        lambda ct, d: ["--ct", ct, "--labels", ct.parent / "labels.nii.gz", "--select", "1,x"],
        ("--select", "'1,x'"),
    ),
    "isocenter with two numbers": (
        lambda ct, d: ["--ct", ct, "--isocenter", "1,2"],
        ("--isocenter", "three comma-separated numbers", "'1,2'"),
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_render_bad_input(case: str, ct: Path, tmp_path: Path) -> None:
    make_args, needles = ERROR_CASES[case]
    args = make_args(ct, tmp_path)
    if "--out" not in args:
        args += ["--out", tmp_path / "drr.npy"]
    result = invoke("render", *args)
    assert_user_error(result, *needles)
    assert not (tmp_path / "drr.npy").exists()


def test_render_refuses_to_overwrite(ct: Path, tmp_path: Path) -> None:
    out = tmp_path / "drr.npy"
    np.save(out, np.zeros((2, 2), np.float32))
    before = out.read_bytes()
    assert_user_error(invoke("render", "--ct", ct, "--out", out, "--size", 8), "--force")
    assert out.read_bytes() == before
    ok(invoke("render", "--ct", ct, "--out", out, "--size", 8, "--force"))
    assert np.load(out).shape == (8, 8)


def test_demo_bad_size(tmp_path: Path) -> None:
    assert_user_error(invoke("demo", "--size", 0, "--out", tmp_path / "d.png"), "--size", "got 0")
    assert not (tmp_path / "d.png").exists()


# ---------------------------------------------------------------------------------------------- console script
def test_console_script_help() -> None:
    exe = Path(sys.executable).parent / "xraypose"
    assert exe.is_file(), f"console script {exe} is not installed"
    proc = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "120"}
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in ("render", "demo", "2D/3D registration"):
        assert word in proc.stdout


def test_version_option_prints_the_package_version():

    import xraypose

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"xraypose {xraypose.__version__}"
