"""The synthetic registration benchmark: simulated C-arm images of a CT at known poses, with initial poses.

:func:`make_synthetic_benchmark` draws ``n`` ground-truth C-arm poses around the CT's anatomy, renders a target
image for each, picks 3D landmarks (label centroids or bone points) for target-registration-error, and draws
initial poses at controlled distances from the truth (one or more per perturbation level). Everything goes to
one HDF5 file, written atomically; :func:`read_synthetic_benchmark` reads it back and checks it. The layout
is documented in ``docs/benchmark-format.md``; frames and units are those of ``docs/conventions.md`` (world =
the CT's RAS mm, poses camera-to-world).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_path
from ..errors import FileFormatError, InputError
from ..geometry.camera import Camera, Intrinsics, validate_pose
from ..geometry.sampling import CArmPoseDistribution, perturb_poses, sample_carm
from ..io.volume import Volume

__all__ = [
    "DEFAULT_LEVELS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "BenchmarkCase",
    "SyntheticBenchmark",
    "anatomy_center",
    "make_synthetic_benchmark",
    "mobile_carm_intrinsics",
    "read_label_names",
    "read_synthetic_benchmark",
]

#: Value of the root attribute ``format`` of a benchmark file.
FORMAT_NAME = "xraypose-synthetic-benchmark"
#: Layout version (root attribute ``format_version``); bumped on any incompatible change.
FORMAT_VERSION = 1
#: Default perturbation levels of the initial poses: ``(rotation degrees, translation mm)``.
DEFAULT_LEVELS: tuple[tuple[float, float], ...] = ((2.0, 5.0), (5.0, 10.0), (10.0, 20.0), (20.0, 40.0))
#: Poses rendered per call of the renderer.
RENDER_BATCH = 16
#: CT values above this (HU) count as bone (anatomy centre and bone landmarks without labels).
BONE_HU = 300.0
#: Number of bone landmarks drawn when the CT has no labels.
DEFAULT_BONE_LANDMARKS = 20

# A mobile C-arm's flat-panel detector: 1536 × 1536 pixels of 0.194 mm, 1020 mm from the source.
_CARM_SDD_MM = 1020.0
_CARM_PIXELS = 1536
_CARM_PIXEL_MM = 0.194


def mobile_carm_intrinsics(size: int = 256) -> Intrinsics:
    """A mobile C-arm detector binned to ``size × size`` pixels.

    Source-to-detector 1020 mm, a 298 mm square flat panel (1536 × 1536 pixels of 0.194 mm), principal point at
    the detector centre; ``size`` pixels span the same panel (256 → 1.164 mm pixels).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"size: expected a positive integer pixel count, got {size!r}")
    full = Intrinsics(
        sdd=_CARM_SDD_MM, rows=_CARM_PIXELS, cols=_CARM_PIXELS, dy=_CARM_PIXEL_MM, dx=_CARM_PIXEL_MM
    )
    return full if size == _CARM_PIXELS else full.resized(size)


# ---------------------------------------------------------------------------------------------- anatomy
def _bone_centroid(volume: Volume) -> torch.Tensor | None:
    """World centroid (mm) of the voxels above :data:`BONE_HU`, or ``None`` if there are none."""
    mask = (volume.data > BONE_HU).to(torch.float64)
    total = float(mask.sum())
    if total == 0:
        return None
    ijk = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        marginal = mask.sum(dim=other)
        idx = torch.arange(marginal.shape[0], dtype=torch.float64, device=marginal.device)
        ijk.append(float((marginal * idx).sum()) / total)
    return volume.index_to_world(torch.tensor(ijk, dtype=torch.float64)).cpu()


@dataclass(frozen=True)
class _LabelStats:
    """Per-label voxel counts and world centroids of a label map (computed once per benchmark)."""

    counts: np.ndarray  # counts[id] = number of voxels of label id
    centroids: dict[int, torch.Tensor]  # id → (3,) float64 world mm, non-zero labels present


def _label_stats(volume: Volume) -> _LabelStats | None:
    if volume.labels is None:
        return None
    counts = np.bincount(volume.labels.detach().cpu().numpy().reshape(-1).astype(np.int64))
    centroids = {i: c.cpu() for i, c in volume.label_centroids().items()}
    return _LabelStats(counts, centroids)


def _anatomy_center(
    volume: Volume, label_ids: Sequence[int] | None, stats: _LabelStats | None
) -> torch.Tensor:
    if stats is not None:
        present = sorted(stats.centroids)
        ids = [i for i in (present if label_ids is None else label_ids) if i in stats.centroids]
        if ids:
            weights = torch.tensor([float(stats.counts[i]) for i in ids], dtype=torch.float64)
            points = torch.stack([stats.centroids[i] for i in ids]).to(torch.float64)
            return (weights[:, None] * points).sum(0) / weights.sum()
    bone = _bone_centroid(volume)
    if bone is not None:
        return bone
    return volume.center_world.cpu()


def anatomy_center(volume: Volume, label_ids: Sequence[int] | None = None) -> torch.Tensor:
    """The centre of the anatomy (world RAS mm, ``(3,)`` float64), around which C-arm views are aimed.

    The centroid of the labelled voxels (of ``label_ids`` only, when given) if the volume has labels; else the
    centroid of bone (voxels above 300 HU); else the centre of the volume's box.
    """
    return _anatomy_center(volume, label_ids, _label_stats(volume))


def read_label_names(path: str | Path) -> dict[int, str]:
    """Label id → structure name from a ``.csv`` (columns ``id`` and ``structure`` or ``name``, e.g. the
    TotalSegmentator ``structures.csv``) or a ``.json`` object ``{"id": "name"}``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileFormatError(f"{path}: label-names file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"{path}: unreadable label-names file ({exc})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object {id: name}")
            return {int(k): str(v) for k, v in data.items()}
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(io.StringIO(text)))
            if not rows or "id" not in rows[0]:
                raise ValueError("expected a header with an 'id' column")
            key = "structure" if "structure" in rows[0] else "name"
            if key not in rows[0]:
                raise ValueError("expected a 'structure' or 'name' column")
            return {int(row["id"]): str(row[key]) for row in rows}
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{path}: not a label-names file ({exc})") from None
    raise FileFormatError(f"{path}: unsupported label-names file; expected .csv or .json")


@dataclass(frozen=True)
class _Landmarks:
    points: torch.Tensor  # (L, 3) float64 world mm
    ids: np.ndarray  # (L,) int64, −1 where not a label
    names: list[str]
    source: str


def _bone_points(volume: Volume, k: int, generator: torch.Generator) -> _Landmarks:
    flat = torch.nonzero((volume.data > BONE_HU).reshape(-1).cpu()).squeeze(-1)
    if flat.numel() == 0:
        raise InputError(
            f"landmarks: the CT has no bone (no voxel above {BONE_HU:g} HU) to sample landmarks from; "
            "pass label ids with a label map, or world points"
        )
    pick = flat[torch.randperm(flat.numel(), generator=generator)[: min(k, flat.numel())]]
    pick = torch.sort(pick).values
    _, nj, nk = volume.shape
    ijk = torch.stack([pick // (nj * nk), (pick // nk) % nj, pick % nk], dim=-1).to(torch.float64)
    points = volume.index_to_world(ijk).cpu()
    m = points.shape[0]
    return _Landmarks(points, np.full(m, -1, np.int64), [f"bone_point_{i}" for i in range(m)], "bone")


def _label_landmarks(
    stats: _LabelStats | None, ids: Sequence[int] | None, names: Mapping[int, str] | None
) -> _Landmarks:
    if stats is None:
        raise InputError("landmarks: label ids were given but the volume has no label map")
    centroids = stats.centroids
    if ids is None:
        ids = sorted(centroids)
    else:
        missing = [i for i in ids if i not in centroids]
        if missing:
            raise InputError(
                f"landmarks: label id(s) {missing} are not in the label map; present: {sorted(centroids)}"
            )
    if not ids:
        raise InputError("landmarks: the label map is empty (no non-zero label)")
    points = torch.stack([centroids[i].cpu() for i in ids]).to(torch.float64)
    names = names or {}
    return _Landmarks(points, np.asarray(ids, np.int64), [names.get(i, "") for i in ids], "labels")


def _select_landmarks(
    volume: Volume,
    landmarks: Sequence[int] | int | torch.Tensor | np.ndarray | None,
    names: Mapping[int, str] | None,
    generator: torch.Generator,
    stats: _LabelStats | None,
) -> _Landmarks:
    if landmarks is None:
        if stats is not None and stats.centroids:
            return _label_landmarks(stats, None, names)
        return _bone_points(volume, DEFAULT_BONE_LANDMARKS, generator)
    if isinstance(landmarks, bool):
        raise InputError(f"landmarks: expected label ids, a count or world points, got {landmarks!r}")
    if isinstance(landmarks, int):
        if landmarks < 1:
            raise InputError(f"landmarks: expected a positive number of bone points, got {landmarks}")
        return _bone_points(volume, landmarks, generator)
    arr = landmarks.detach().cpu().numpy() if isinstance(landmarks, torch.Tensor) else np.asarray(landmarks)
    if arr.ndim == 2 and arr.shape[1] == 3 and arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError("landmarks: world points must be finite")
        m = arr.shape[0]
        return _Landmarks(
            torch.from_numpy(arr.astype(np.float64)), np.full(m, -1, np.int64), [""] * m, "given points"
        )
    if arr.ndim == 1 and (arr.dtype.kind in "iu" or arr.size == 0):
        return _label_landmarks(stats, [int(i) for i in arr], names)
    raise InputError(
        "landmarks: expected None, a count of bone points, a sequence of label ids or an (L, 3) float array "
        f"of world points (mm), got an array of shape {arr.shape} and dtype {arr.dtype}"
    )


# ---------------------------------------------------------------------------------------------- rendering
#: How ``_render_targets`` makes images (stored as the ``renderer`` attribute); change it together with the function.
RENDERER_DESCRIPTION = (
    "xraypose.physics.simulate_xray: polychromatic material-decomposed DRR (air/soft tissue/bone from HU, "
    "DeepDRR density, xraydb mu/rho), SpekPy W-anode 90 kVp 2.5 mm Al in 20 bins, energy-integrating "
    "detector; then DetectorModel() defaults: heel-free fluence, scatter-to-primary 0.2 (sigma 40 mm), "
    "Poisson noise at 1e4 quanta/pixel, Gaussian PSF FWHM 0.5 mm, -ln(I/I0), 12-bit quantisation"
)


def _render_targets(volume: Volume, camera: Camera, *, generator: torch.Generator) -> torch.Tensor:
    """Target X-ray images of ``volume`` seen by every pose of ``camera``: ``(B, H, W)`` float32 on the CPU.

    The single place where benchmark images are made: realistic X-rays from
    :func:`xraypose.physics.simulate_xray` (a more complete physical model than the monochromatic renderer a
    registration method optimises through, so benchmarks do not flatter it). ``generator`` seeds the
    detector noise, so that a benchmark is reproducible from its seed.
    """
    from ..physics import simulate_xray

    with torch.no_grad():
        image = simulate_xray(volume.data, volume.affine, camera, generator=generator)
    return image.to(device="cpu", dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- writer
def _generators(seed: int) -> dict[str, torch.Generator]:
    """Independent CPU generators per stream, so that e.g. more initial poses do not change the poses."""
    names = ("poses", "landmarks", "inits", "render")
    children = np.random.SeedSequence(seed).spawn(len(names))
    out = {}
    for name, child in zip(names, children, strict=True):
        state = int(child.generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF
        out[name] = torch.Generator(device="cpu").manual_seed(state)
    return out


def _check_levels(levels: object) -> np.ndarray:
    try:
        arr = np.asarray(levels, dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.empty((0,))
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 1:
        raise InputError(
            f"levels: expected a non-empty sequence of (rotation degrees, translation mm) pairs, got {levels!r}"
        )
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr[:, 0] > 180).any():
        raise InputError(
            f"levels: rotations must lie in [0, 180] degrees and translations be >= 0 mm, got {levels!r}"
        )
    return arr


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_array(t: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes()).hexdigest()


def _landmarks_arg(landmarks: object) -> object:
    """A JSON-ready description of the ``landmarks`` argument."""
    if landmarks is None or isinstance(landmarks, int):
        return landmarks
    arr = landmarks.detach().cpu().numpy() if isinstance(landmarks, torch.Tensor) else np.asarray(landmarks)
    return arr.tolist()


def make_synthetic_benchmark(
    volume: Volume,
    n: int,
    seed: int,
    out_path: str | Path,
    *,
    intrinsics: Intrinsics | None = None,
    distribution: CArmPoseDistribution | None = None,
    levels: Sequence[tuple[float, float]] = DEFAULT_LEVELS,
    inits_per_level: int = 1,
    landmarks: Sequence[int] | int | torch.Tensor | np.ndarray | None = None,
    label_names: Mapping[int, str] | None = None,
    center_world: torch.Tensor | Sequence[float] | None = None,
    progress: Callable[[int, int], None] | None = None,
    force: bool = False,
) -> Path:
    """Write a synthetic 2D/3D registration benchmark of ``volume`` to the HDF5 file ``out_path``.

    Args:
        volume: the CT (HU), with an optional label map.
        n: number of cases (ground-truth poses and target images), ≥ 1.
        seed: non-negative integer; the same seed and arguments give the same poses, images and landmarks.
        out_path: the HDF5 file to write (atomically: a temporary file in the same folder, then renamed).
        intrinsics: the detector; default :func:`mobile_carm_intrinsics` (256 × 256).
        distribution: the C-arm pose distribution; default :class:`CArmPoseDistribution` (LAO/RAO ±30°,
            cranial/caudal ±20°, in-plane ±10°, isocentre ±30 mm per axis around the anatomy centre, source
            620 mm from the isocentre).
        levels: perturbation levels of the initial poses, ``(rotation degrees, translation mm)``: each initial
            pose is the ground truth moved by exactly that rotation about an axis through the anatomy centre
            and exactly that translation (:func:`~xraypose.geometry.sampling.perturb_poses`).
        inits_per_level: initial poses per case and level, ≥ 1.
        landmarks: 3D landmarks (world mm) for target registration error. ``None``: the centroids of every
            label of the label map, or 20 random bone voxels (> 300 HU) without one; a sequence of label ids:
            their centroids; an ``int`` k: k random bone voxels; an ``(L, 3)`` float array: these world points.
        label_names: label id → structure name, stored with label landmarks.
        center_world: the anatomy centre (world mm) the views aim at; default :func:`anatomy_center` (of the
            landmark labels when label ids are given).
        progress: called as ``progress(done, n)`` after each batch of rendered images (and once with 0).
        force: overwrite an existing ``out_path``.
    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.
    Raises:
        InputError: bad arguments, or ``out_path`` exists and ``force`` is false.
        GeometryError: a sampled X-ray source lies inside the CT (reduce the isocentre offset or increase
            ``source_to_isocenter_mm``).
    """
    import h5py

    from .. import __version__

    out_path = Path(out_path)
    if not isinstance(volume, Volume):
        raise InputError(f"volume: expected a xraypose Volume, got {type(volume).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n: expected a positive number of cases, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed: expected a non-negative integer, got {seed!r}")
    if isinstance(inits_per_level, bool) or not isinstance(inits_per_level, int) or inits_per_level < 1:
        raise InputError(f"inits_per_level: expected a positive integer, got {inits_per_level!r}")
    level_arr = _check_levels(levels)
    intr = mobile_carm_intrinsics() if intrinsics is None else intrinsics
    if not isinstance(intr, Intrinsics):
        raise InputError(f"intrinsics: expected Intrinsics, got {type(intr).__name__}")
    dist = CArmPoseDistribution() if distribution is None else distribution
    if not isinstance(dist, CArmPoseDistribution):
        raise InputError(f"distribution: expected a CArmPoseDistribution, got {type(dist).__name__}")
    if dist.source_to_isocenter_mm >= intr.sdd:
        raise InputError(
            f"distribution.source_to_isocenter_mm ({dist.source_to_isocenter_mm:g} mm) must be smaller than "
            f"the source-to-detector distance ({intr.sdd:g} mm)"
        )
    if out_path.is_dir():
        raise InputError(f"{out_path}: is a folder; expected a file path for the benchmark")
    if out_path.exists() and not force:
        raise InputError(f"{out_path}: file exists; pass force=True (--force) to overwrite it")

    gens = _generators(seed)
    stats = _label_stats(volume)
    marks = _select_landmarks(volume, landmarks, label_names, gens["landmarks"], stats)
    if center_world is None:
        label_ids = (
            [int(i) for i in marks.ids] if marks.source == "labels" and landmarks is not None else None
        )
        center = _anatomy_center(volume, label_ids, stats)
    else:
        center = torch.as_tensor(center_world, dtype=torch.float64).cpu()
        if center.shape != (3,) or not bool(torch.isfinite(center).all()):
            raise InputError(f"center_world: expected a finite (x, y, z) point in mm, got {center_world!r}")

    sample = sample_carm(dist, n, center, generator=gens["poses"])
    poses = sample.poses
    inits = torch.stack(
        [
            perturb_poses(
                poses[:, None].expand(n, inits_per_level, 4, 4),
                float(rot),
                float(trans),
                center,
                generator=gens["inits"],
            )
            for rot, trans in level_arr
        ],
        dim=1,
    )  # (n, n_levels, inits_per_level, 4, 4)

    source_file = Path(volume.source) if volume.source else None
    file_hash = _sha256_file(source_file) if source_file is not None and source_file.is_file() else ""
    creation_args = {
        "n": n,
        "seed": seed,
        "intrinsics": intr.to_dict(),
        "distribution": dist.to_dict(),
        "levels": level_arr.tolist(),
        "inits_per_level": inits_per_level,
        "landmarks": _landmarks_arg(landmarks),
        "center_world": None if center_world is None else center.tolist(),
        "render_batch": RENDER_BATCH,
    }

    if progress is not None:
        progress(0, n)
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as f:
            attrs = f.attrs
            attrs["format"] = FORMAT_NAME
            attrs["format_version"] = FORMAT_VERSION
            attrs["xraypose_version"] = __version__
            attrs["seed"] = seed
            attrs["n"] = n
            attrs["inits_per_level"] = inits_per_level
            attrs["creation_args"] = json.dumps(creation_args)
            attrs["intrinsics"] = json.dumps(intr.to_dict())
            attrs["distribution"] = json.dumps(dist.to_dict())
            attrs["renderer"] = RENDERER_DESCRIPTION
            attrs["ct_source"] = volume.source or ""
            attrs["ct_file_sha256"] = file_hash
            attrs["ct_data_sha256"] = _sha256_array(volume.data)
            attrs["ct_shape"] = np.asarray(volume.shape, np.int64)
            attrs["landmark_source"] = marks.source

            small = (
                ("poses", poses.numpy(), "mm", "ground-truth camera-to-world poses (T_world_from_camera)"),
                ("carm_angles", sample.angles_deg.numpy(), "deg", "C-arm angles (lao, cranial, inplane)"),
                ("isocenters", sample.isocenters.numpy(), "mm", "C-arm isocentre of each pose, world RAS"),
                ("init_poses", inits.numpy(), "mm", "initial camera-to-world poses [case, level, k]"),
                ("levels", level_arr, "deg, mm", "(rotation deg, translation mm) of each init level"),
                ("landmarks_world", marks.points.numpy(), "mm", "3D landmarks, world RAS"),
                ("landmark_ids", marks.ids, "", "label id of each landmark (-1: not a label centroid)"),
                ("center_world", center.numpy(), "mm", "anatomy centre: pose and perturbation centre"),
                ("ct_affine", volume.affine.detach().cpu().numpy(), "mm", "CT voxel index -> world RAS"),
            )
            for name, data, units, description in small:
                ds = f.create_dataset(name, data=data)
                ds.attrs["units"] = units
                ds.attrs["description"] = description
            ds = f.create_dataset("landmark_names", data=marks.names, dtype=h5py.string_dtype("utf-8"))
            ds.attrs["description"] = "structure name of each landmark ('' when unknown)"

            images = f.create_dataset(
                "images",
                shape=(n, intr.rows, intr.cols),
                dtype=np.float32,
                chunks=(1, intr.rows, intr.cols),
                compression="gzip",
                compression_opts=4,
                shuffle=True,
            )
            images.attrs["units"] = "I/I0"
            images.attrs["description"] = "target X-ray images (rows, cols), one per pose"
            for start in range(0, n, RENDER_BATCH):
                stop = min(start + RENDER_BATCH, n)
                camera = Camera(intr, poses[start:stop].to(volume.data.dtype))
                batch = _render_targets(volume, camera, generator=gens["render"])
                images[start:stop] = batch.numpy()
                if progress is not None:
                    progress(stop, n)
    return out_path


# ---------------------------------------------------------------------------------------------- reader
@dataclass(frozen=True, eq=False)
class BenchmarkCase:
    """One case of a :class:`SyntheticBenchmark`.

    Attributes:
        index: the case number.
        intrinsics: the detector.
        image: ``(rows, cols)`` float32 target image.
        pose: ``(4, 4)`` float64 ground-truth camera-to-world pose (world RAS mm).
        inits: ``(n_levels, inits_per_level, 4, 4)`` float64 initial poses.
        levels: ``(n_levels, 2)`` float64 ``(rotation deg, translation mm)`` of each level.
        carm_angles: ``(3,)`` float64 ``(lao, cranial, inplane)`` degrees of ``pose``.
        landmarks_world: ``(L, 3)`` float64 landmarks, world RAS mm (shared by all cases).
    """

    index: int
    intrinsics: Intrinsics
    image: torch.Tensor = field(repr=False)
    pose: torch.Tensor = field(repr=False)
    inits: torch.Tensor = field(repr=False)
    levels: torch.Tensor = field(repr=False)
    carm_angles: torch.Tensor = field(repr=False)
    landmarks_world: torch.Tensor = field(repr=False)

    def camera(self) -> Camera:
        """The ground-truth camera (batch of one)."""
        return Camera(self.intrinsics, self.pose[None])

    def init_camera(self, level: int, k: int = 0) -> Camera:
        """The ``k``-th initial camera of perturbation level ``level`` (batch of one)."""
        return Camera(self.intrinsics, self.inits[level, k][None])


@dataclass(frozen=True, eq=False)
class SyntheticBenchmark:
    """A synthetic benchmark read by :func:`read_synthetic_benchmark` (all arrays in memory, CPU tensors).

    Attributes:
        path: the file read.
        intrinsics: the detector.
        images: ``(n, rows, cols)`` float32 target images.
        poses: ``(n, 4, 4)`` float64 ground-truth camera-to-world poses (world RAS mm).
        init_poses: ``(n, n_levels, inits_per_level, 4, 4)`` float64 initial poses.
        levels: ``(n_levels, 2)`` float64 ``(rotation deg, translation mm)``.
        carm_angles: ``(n, 3)`` float64 ``(lao, cranial, inplane)`` degrees.
        isocenters: ``(n, 3)`` float64 C-arm isocentres, world mm.
        landmarks_world: ``(L, 3)`` float64 landmarks, world mm.
        landmark_ids: ``(L,)`` int64 label ids (−1 where a landmark is not a label centroid).
        landmark_names: ``L`` structure names ('' when unknown).
        center_world: ``(3,)`` float64 anatomy centre, world mm.
        ct_affine: ``(4, 4)`` float64 voxel → world of the CT the benchmark was made from.
        metadata: the root attributes (JSON ones decoded): format, versions, seed, creation arguments, CT source
            and hashes…
    """

    path: Path
    intrinsics: Intrinsics
    images: torch.Tensor = field(repr=False)
    poses: torch.Tensor = field(repr=False)
    init_poses: torch.Tensor = field(repr=False)
    levels: torch.Tensor = field(repr=False)
    carm_angles: torch.Tensor = field(repr=False)
    isocenters: torch.Tensor = field(repr=False)
    landmarks_world: torch.Tensor = field(repr=False)
    landmark_ids: torch.Tensor = field(repr=False)
    landmark_names: tuple[str, ...] = field(repr=False)
    center_world: torch.Tensor = field(repr=False)
    ct_affine: torch.Tensor = field(repr=False)
    metadata: dict[str, Any] = field(repr=False)

    def __len__(self) -> int:
        return int(self.poses.shape[0])

    @property
    def n_levels(self) -> int:
        return int(self.levels.shape[0])

    @property
    def inits_per_level(self) -> int:
        return int(self.init_poses.shape[2])

    def __getitem__(self, index: int) -> BenchmarkCase:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"benchmark cases are indexed by int, got {type(index).__name__}")
        n = len(self)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"case {index} out of range for a benchmark of {n} cases")
        return BenchmarkCase(
            index=i,
            intrinsics=self.intrinsics,
            image=self.images[i],
            pose=self.poses[i],
            inits=self.init_poses[i],
            levels=self.levels,
            carm_angles=self.carm_angles[i],
            landmarks_world=self.landmarks_world,
        )

    def __iter__(self) -> Iterator[BenchmarkCase]:
        for i in range(len(self)):
            yield self[i]

    def camera(self) -> Camera:
        """All ground-truth cameras as one batch."""
        return Camera(self.intrinsics, self.poses)


_JSON_ATTRS = ("creation_args", "intrinsics", "distribution")


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_synthetic_benchmark(path: str | Path) -> SyntheticBenchmark:
    """Read and check a benchmark written by :func:`make_synthetic_benchmark`.

    Raises:
        FileFormatError: the file is missing or not HDF5; its ``format`` is not :data:`FORMAT_NAME` or its
            ``format_version`` not :data:`FORMAT_VERSION`; an attribute or dataset is missing, has the wrong
            shape or type, or holds invalid values. The message names the file and the field.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: benchmark file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FileFormatError(f"{path}: not a readable HDF5 file ({exc})") from None

    def bad(message: str) -> FileFormatError:
        return FileFormatError(f"{path}: {message}")

    def attr(name: str) -> Any:
        if name not in f.attrs:
            raise bad(f"missing root attribute '{name}'")
        return _decode(f.attrs[name])

    def dataset(name: str, shape: tuple[int | None, ...], kind: str) -> np.ndarray:
        if name not in f:
            raise bad(f"missing dataset '{name}'")
        ds = f[name]
        if not isinstance(ds, h5py.Dataset):
            raise bad(f"'{name}' is not a dataset")
        if len(ds.shape) != len(shape) or any(
            w is not None and w != s for s, w in zip(ds.shape, shape, strict=True)
        ):
            want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
            raise bad(f"dataset '{name}' has shape {ds.shape}, expected {want}")
        if kind == "str":
            if h5py.check_string_dtype(ds.dtype) is None:
                raise bad(f"dataset '{name}' has dtype {ds.dtype}, expected strings")
            return ds.asstr()[()]
        if ds.dtype.kind not in kind:
            raise bad(
                f"dataset '{name}' has dtype {ds.dtype}, expected {'float' if kind == 'f' else 'integer'}"
            )
        data = ds[()]
        if kind == "f" and not np.isfinite(data).all():
            raise bad(f"dataset '{name}' holds NaN or infinite values")
        return data

    with f:
        fmt = attr("format")
        if fmt != FORMAT_NAME:
            raise bad(f"attribute 'format' is {fmt!r}, expected {FORMAT_NAME!r}: not an xraypose benchmark")
        version = attr("format_version")
        if version != FORMAT_VERSION:
            raise bad(
                f"attribute 'format_version' is {version!r}, this xraypose reads version {FORMAT_VERSION}"
            )
        metadata: dict[str, Any] = {k: _decode(v) for k, v in f.attrs.items()}
        for key in _JSON_ATTRS:
            raw = attr(key)
            try:
                metadata[key] = json.loads(raw)
            except (TypeError, json.JSONDecodeError):
                raise bad(f"attribute '{key}' is not valid JSON") from None
        try:
            intr = Intrinsics.from_dict(metadata["intrinsics"], source="intrinsics")
        except (InputError, TypeError, AttributeError) as exc:
            raise bad(f"attribute 'intrinsics' is invalid ({exc})") from None
        n = attr("n")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise bad(f"attribute 'n' is {n!r}, expected a positive integer")
        k = attr("inits_per_level")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise bad(f"attribute 'inits_per_level' is {k!r}, expected a positive integer")

        images = dataset("images", (n, intr.rows, intr.cols), "f")
        poses = dataset("poses", (n, 4, 4), "f")
        levels = dataset("levels", (None, 2), "f")
        init_poses = dataset("init_poses", (n, levels.shape[0], k, 4, 4), "f")
        carm_angles = dataset("carm_angles", (n, 3), "f")
        isocenters = dataset("isocenters", (n, 3), "f")
        landmarks = dataset("landmarks_world", (None, 3), "f")
        n_marks = landmarks.shape[0]
        ids = dataset("landmark_ids", (n_marks,), "iu")
        names = dataset("landmark_names", (n_marks,), "str")
        center = dataset("center_world", (3,), "f")
        ct_affine = dataset("ct_affine", (4, 4), "f")

    for name, value in (("poses", poses), ("init_poses", init_poses)):
        try:
            validate_pose(torch.from_numpy(value.astype(np.float64)).reshape(-1, 4, 4), name)
        except InputError as exc:
            raise bad(f"dataset '{name}' holds invalid poses ({exc})") from None

    return SyntheticBenchmark(
        path=path,
        intrinsics=intr,
        images=torch.from_numpy(images.astype(np.float32, copy=False)),
        poses=torch.from_numpy(poses.astype(np.float64, copy=False)),
        init_poses=torch.from_numpy(init_poses.astype(np.float64, copy=False)),
        levels=torch.from_numpy(levels.astype(np.float64, copy=False)),
        carm_angles=torch.from_numpy(carm_angles.astype(np.float64, copy=False)),
        isocenters=torch.from_numpy(isocenters.astype(np.float64, copy=False)),
        landmarks_world=torch.from_numpy(landmarks.astype(np.float64, copy=False)),
        landmark_ids=torch.from_numpy(ids.astype(np.int64, copy=False)),
        landmark_names=tuple(str(s) for s in names),
        center_world=torch.from_numpy(center.astype(np.float64, copy=False)),
        ct_affine=torch.from_numpy(ct_affine.astype(np.float64, copy=False)),
        metadata=metadata,
    )
