"""The synthetic registration benchmark: HDF5 writer, reader and the ``make-benchmark`` command."""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cli_helpers import assert_user_error, invoke
from xraypose._atomic import new_file_mode
from xraypose.datasets import (
    DEFAULT_LEVELS,
    FORMAT_NAME,
    FORMAT_VERSION,
    SyntheticBenchmark,
    make_synthetic_benchmark,
    mobile_carm_intrinsics,
    read_label_names,
    read_synthetic_benchmark,
    synthetic,
)
from xraypose.datasets.synthetic import _render_targets
from xraypose.errors import FileFormatError, InputError
from xraypose.geometry import Camera
from xraypose.geometry.sampling import CArmPoseDistribution, carm_angles_from_pose
from xraypose.geometry.se3 import invert, rotation_distance, transform_points
from xraypose.io import default_ct_structures, load_default_ct
from xraypose.io.default import DEFAULT_CT_FILE, DEFAULT_LABELS_FILE, DEFAULT_STRUCTURES_FILE

N = 4
SIZE = 64
SEED = 11


@pytest.fixture(scope="module")
def volume():
    return load_default_ct()


@pytest.fixture(scope="module")
def bench_path(volume, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "bench.h5"
    calls: list[tuple[int, int]] = []
    path = make_synthetic_benchmark(
        volume,
        N,
        SEED,
        out,
        intrinsics=mobile_carm_intrinsics(SIZE),
        inits_per_level=2,
        label_names=default_ct_structures(),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert path == out
    assert calls[0] == (0, N) and calls[-1] == (N, N)
    return path


@pytest.fixture(scope="module")
def bench(bench_path: Path) -> SyntheticBenchmark:
    return read_synthetic_benchmark(bench_path)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.h5"
    shutil.copyfile(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------- content
def test_mobile_carm_intrinsics() -> None:
    full = mobile_carm_intrinsics(1536)
    assert (full.sdd, full.rows, full.cols, full.dx, full.dy) == (1020.0, 1536, 1536, 0.194, 0.194)
    k = mobile_carm_intrinsics()
    assert (k.rows, k.cols) == (256, 256)
    assert k.dx == pytest.approx(0.194 * 6) and k.dx * k.cols == pytest.approx(0.194 * 1536)
    with pytest.raises(InputError, match="size"):
        mobile_carm_intrinsics(0)


def test_round_trip(bench_path: Path, bench: SyntheticBenchmark, volume) -> None:
    assert len(bench) == N
    assert bench.intrinsics == mobile_carm_intrinsics(SIZE)
    assert bench.images.shape == (N, SIZE, SIZE) and bench.images.dtype == torch.float32
    assert bench.poses.shape == (N, 4, 4) and bench.poses.dtype == torch.float64
    assert bench.init_poses.shape == (N, len(DEFAULT_LEVELS), 2, 4, 4)
    assert bench.levels.tolist() == [list(lv) for lv in DEFAULT_LEVELS]
    with h5py.File(bench_path, "r") as f:
        for name in (
            "images",
            "poses",
            "init_poses",
            "levels",
            "carm_angles",
            "landmarks_world",
            "ct_affine",
        ):
            np.testing.assert_array_equal(f[name][()], getattr(bench, name).numpy())
        assert f["images"].compression == "gzip"
        assert f.attrs["format"] == FORMAT_NAME and f.attrs["format_version"] == FORMAT_VERSION
    meta = bench.metadata
    assert meta["seed"] == SEED and meta["n"] == N
    assert meta["creation_args"]["inits_per_level"] == 2
    assert meta["creation_args"]["distribution"] == CArmPoseDistribution().to_dict()
    assert meta["ct_shape"] == list(volume.shape)
    assert len(meta["ct_data_sha256"]) == 64
    np.testing.assert_array_equal(bench.ct_affine.numpy(), volume.affine.numpy())
    # the stored angles are those of the poses
    torch.testing.assert_close(carm_angles_from_pose(bench.poses), bench.carm_angles, atol=1e-9, rtol=0)
    # images are what the renderer gives for the stored poses with the seed's render stream (one batch)
    assert N <= synthetic.RENDER_BATCH
    gen = synthetic._generators(SEED)["render"]
    again = _render_targets(volume, Camera(bench.intrinsics, bench.poses.float()), generator=gen)
    torch.testing.assert_close(again, bench.images)
    # …and another noise stream gives other images (the noise is real)
    other = _render_targets(
        volume, Camera(bench.intrinsics, bench.poses.float()), generator=torch.Generator().manual_seed(1)
    )
    assert not torch.equal(other, bench.images)
    # landmarks: the centroids of every label present, with their names
    centroids = volume.label_centroids()
    assert bench.landmark_ids.tolist() == sorted(centroids)
    names = default_ct_structures()
    assert list(bench.landmark_names) == [names[i] for i in sorted(centroids)]
    torch.testing.assert_close(bench.landmarks_world, torch.stack([centroids[i] for i in sorted(centroids)]))


def test_cases(bench: SyntheticBenchmark) -> None:
    case = bench[1]
    assert case.index == 1 and bench[-1].index == N - 1
    assert torch.equal(case.image, bench.images[1]) and torch.equal(case.pose, bench.poses[1])
    assert case.inits.shape == (len(DEFAULT_LEVELS), 2, 4, 4)
    cam = case.camera()
    assert isinstance(cam, Camera) and cam.batch_size == 1 and torch.equal(cam.pose[0], case.pose)
    assert torch.equal(case.init_camera(2, 1).pose[0], bench.init_poses[1, 2, 1])
    assert [c.index for c in bench] == list(range(N))
    with pytest.raises(IndexError):
        bench[N]


def test_landmarks_reproject_inside_the_image(bench: SyntheticBenchmark) -> None:
    uv_center = bench.camera().project(bench.center_world[None])[:, 0]
    assert bool(((uv_center > 0) & (uv_center < SIZE - 1)).all())  # every view aims at the anatomy
    near = (bench.landmarks_world - bench.center_world).norm(dim=-1) < 60.0  # within the field of view
    assert int(near.sum()) >= 3
    uv = bench.camera().project(bench.landmarks_world[near])
    inside = ((uv >= -0.5) & (uv <= SIZE - 0.5)).all(-1)  # (N, L)
    assert int((inside.float().mean(-1) >= 0.8).sum()) >= N - 1  # most cases see (nearly) all of them


def test_target_images_are_not_empty(bench: SyntheticBenchmark) -> None:
    images = bench.images
    assert bool(torch.isfinite(images).all())
    # simulated detector images: −ln(I/I0) on 12-bit levels, ≥ 0 (quantisation clips the open beam's noise)
    assert float(images.min()) >= 0.0 and float(images.max()) < 15.0
    levels = torch.unique(images)
    assert len(levels) <= 2**12
    for image in images:
        assert float(image.std()) > 0.05 * float(image.mean())  # structure, not a flat field
        assert float(image.max()) > 1.0  # the patient attenuates: I/I0 < e^-1 somewhere
    assert not torch.equal(images[0], images[1])


def test_init_perturbations_match_levels(bench: SyntheticBenchmark) -> None:
    gt = bench.poses[:, None, None].expand_as(bench.init_poses)
    rot = rotation_distance(gt, bench.init_poses, degrees=True)
    c = bench.center_world.expand(*bench.init_poses.shape[:3], 1, 3)
    moved = (transform_points(invert(bench.init_poses), c) - transform_points(invert(gt), c)).norm(dim=-1)[
        ..., 0
    ]
    for level, (deg, mm) in enumerate(DEFAULT_LEVELS):
        torch.testing.assert_close(rot[:, level], torch.full_like(rot[:, level], deg), atol=1e-9, rtol=0)
        torch.testing.assert_close(moved[:, level], torch.full_like(moved[:, level], mm), atol=1e-9, rtol=0)
    assert not torch.equal(bench.init_poses[:, :, 0], bench.init_poses[:, :, 1])  # independent draws


# ---------------------------------------------------------------------------------------------- reproducibility
def test_seeded_reproducibility(bench: SyntheticBenchmark, volume, tmp_path: Path) -> None:
    same = read_synthetic_benchmark(
        make_synthetic_benchmark(
            volume, N, SEED, tmp_path / "a.h5", intrinsics=mobile_carm_intrinsics(SIZE), inits_per_level=2
        )
    )
    for name in ("poses", "images", "init_poses", "landmarks_world", "carm_angles"):
        assert torch.equal(getattr(same, name), getattr(bench, name)), name
    ids = [int(i) for i in bench.landmark_ids[:3]]
    other = read_synthetic_benchmark(
        make_synthetic_benchmark(
            volume, 2, SEED + 1, tmp_path / "c.h5", intrinsics=mobile_carm_intrinsics(16), landmarks=ids
        )
    )
    assert not torch.equal(other.poses, bench.poses[:2])
    assert other.landmark_ids.tolist() == ids
    assert list(other.landmark_names) == [""] * 3  # no names given


def test_bone_landmarks_without_labels(tmp_path: Path) -> None:
    ct = load_default_ct(with_labels=False)
    kwargs = dict(intrinsics=mobile_carm_intrinsics(16), levels=((1, 1),))
    a = read_synthetic_benchmark(make_synthetic_benchmark(ct, 1, 5, tmp_path / "a.h5", **kwargs))
    b = read_synthetic_benchmark(make_synthetic_benchmark(ct, 1, 5, tmp_path / "b.h5", landmarks=7, **kwargs))
    assert a.landmarks_world.shape == (20, 3) and b.landmarks_world.shape == (7, 3)
    assert a.landmark_ids.tolist() == [-1] * 20 and a.metadata["landmark_source"] == "bone"
    hu = ct.data[tuple(ct.world_to_index(b.landmarks_world).round().long().T)]
    assert bool((hu > 300).all())


# ---------------------------------------------------------------------------------------------- errors
def test_refuses_to_overwrite(bench_path: Path, volume, tmp_path: Path) -> None:
    out = tmp_path / "exists.h5"
    out.write_bytes(b"keep me")
    with pytest.raises(InputError, match="exists"):
        make_synthetic_benchmark(volume, 1, 0, out, intrinsics=mobile_carm_intrinsics(16))
    assert out.read_bytes() == b"keep me"
    make_synthetic_benchmark(volume, 1, 0, out, intrinsics=mobile_carm_intrinsics(16), force=True)
    assert len(read_synthetic_benchmark(out)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.h5"]  # no temporary file left
    assert out.stat().st_mode & 0o777 == new_file_mode()  # not mkstemp's private 0600


def test_failed_write_leaves_nothing(volume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(synthetic, "_render_targets", boom)
    out = tmp_path / "old.h5"
    out.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="renderer failed"):
        make_synthetic_benchmark(volume, 1, 0, out, intrinsics=mobile_carm_intrinsics(16), force=True)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.h5"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(n=0), "n:"),
        (dict(seed=-1), "seed"),
        (dict(levels=((1, 2, 3),)), "levels"),
        (dict(inits_per_level=0), "inits_per_level"),
        (dict(landmarks=[9999]), "9999"),
        (dict(distribution=CArmPoseDistribution(source_to_isocenter_mm=2000.0)), "source_to_isocenter"),
    ],
)
def test_bad_arguments(volume, tmp_path: Path, kwargs: dict, needle: str) -> None:
    args = dict(n=1, seed=0, intrinsics=mobile_carm_intrinsics(16)) | kwargs
    with pytest.raises(InputError, match=needle):
        make_synthetic_benchmark(volume, out_path=tmp_path / "x.h5", **args)
    assert not (tmp_path / "x.h5").exists()


def _edit(path: Path, action) -> None:
    with h5py.File(path, "r+") as f:
        action(f)


def _set(name: str, value):
    def act(f):
        f.attrs[name] = value

    return act


def _delete(name: str):
    def act(f):
        del f[name]

    return act


def _replace(name: str, data):
    def act(f):
        del f[name]
        f.create_dataset(name, data=data)

    return act


@pytest.mark.parametrize(
    ("action", "needles"),
    [
        (_set("format", "something-else"), ("'format'", "something-else")),
        (_set("format_version", 99), ("'format_version'", "99")),
        (_delete("poses"), ("missing dataset 'poses'",)),
        (_delete("landmark_names"), ("missing dataset 'landmark_names'",)),
        (_replace("images", np.zeros((N, SIZE, SIZE + 1), np.float32)), ("'images'", "shape")),
        (_replace("init_poses", np.zeros((N, 2, 2, 4, 4))), ("'init_poses'", "shape")),
        (_replace("poses", np.zeros((N, 4, 4))), ("'poses'", "invalid poses")),
        (_replace("landmark_ids", np.zeros(3, np.int64)), ("'landmark_ids'", "shape")),
        (_set("intrinsics", "{not json"), ("'intrinsics'", "JSON")),
        (_set("intrinsics", '{"sdd": 1}'), ("'intrinsics'",)),
    ],
)
def test_bad_files_raise_file_format_error(bench_path: Path, tmp_path: Path, action, needles) -> None:
    path = _copy(bench_path, tmp_path)
    _edit(path, action)
    with pytest.raises(FileFormatError) as info:
        read_synthetic_benchmark(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_missing_and_non_hdf5_files(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="not found"):
        read_synthetic_benchmark(tmp_path / "nope.h5")
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(FileFormatError, match="not a readable HDF5 file"):
        read_synthetic_benchmark(text)


def test_read_label_names(tmp_path: Path) -> None:
    assert read_label_names(_resource(DEFAULT_STRUCTURES_FILE)) == default_ct_structures()
    (tmp_path / "labels.json").write_text('{"1": "femur_left", "17": "sacrum"}')
    assert read_label_names(tmp_path / "labels.json") == {1: "femur_left", 17: "sacrum"}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(FileFormatError, match=r"bad\.json"):
        read_label_names(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------- CLI
def _resource(name: str) -> Path:
    path = Path(str(files("xraypose") / "data" / name))  # the package is installed from its source folder
    assert path.is_file(), path
    return path


def test_cli_make_benchmark(tmp_path: Path) -> None:
    ct, labels = _resource(DEFAULT_CT_FILE), tmp_path / "labels.nii.gz"
    shutil.copyfile(_resource(DEFAULT_LABELS_FILE), labels)
    shutil.copyfile(_resource(DEFAULT_STRUCTURES_FILE), tmp_path / "structures.csv")  # found beside --labels
    out = tmp_path / "cli.h5"
    args = ("make-benchmark", "--ct", ct, "--labels", labels, "--n", 2, "--size", 16)
    result = invoke(*args, "--seed", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    bench = read_synthetic_benchmark(out)
    assert len(bench) == 2 and bench.images.shape == (2, 16, 16)
    assert bench.metadata["seed"] == 3
    assert bench.landmark_names[0] == default_ct_structures()[int(bench.landmark_ids[0])]
    # same as the Python API
    api = make_synthetic_benchmark(
        load_default_ct(), 2, 3, tmp_path / "api.h5", intrinsics=mobile_carm_intrinsics(16)
    )
    ref = read_synthetic_benchmark(api)
    assert torch.equal(ref.poses, bench.poses) and torch.equal(ref.images, bench.images)

    custom = tmp_path / "levels.h5"
    assert invoke(*args, "--levels", "10/20, 30/60", "--out", custom).exit_code == 0
    assert read_synthetic_benchmark(custom).levels.tolist() == [[10.0, 20.0], [30.0, 60.0]]

    before = out.read_bytes()
    assert_user_error(invoke(*args, "--out", out), "--force", str(out))
    assert out.read_bytes() == before
    assert invoke(*args, "--out", out, "--force", "--seed", 4).exit_code == 0
    assert read_synthetic_benchmark(out).metadata["seed"] == 4


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (("--ct", "missing.nii.gz"), ("missing.nii.gz",)),
        (("--n", 0), ("--n",)),
        (("--size", 0), ("--size",)),
        (("--seed", -2), ("--seed",)),
        (("--out", "bench.txt"), ("bench.txt", ".h5")),
        (("--levels", "10/20,30"), ("--levels", "'30'")),
        (("--levels", "10/20,200/40"), ("levels", "180")),
    ],
)
def test_cli_errors(tmp_path: Path, extra: tuple, needles: tuple) -> None:
    args = {"--ct": _resource(DEFAULT_CT_FILE), "--out": tmp_path / "e.h5", "--n": 1, "--size": 8}
    args.update(dict(zip(extra[::2], extra[1::2], strict=True)))
    if "--out" in extra:
        args["--out"] = tmp_path / str(args["--out"])
    flat = [x for kv in args.items() for x in kv]
    assert_user_error(invoke("make-benchmark", *flat), *needles)
    assert not (tmp_path / "e.h5").exists()
