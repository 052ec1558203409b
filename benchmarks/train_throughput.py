"""Training throughput (images/s): ``xraypose train``'s step against a DiffPose-style loop on DiffDRR / nanodrr.

Issue 5, item 7: steady-state images/s of self-supervised pose-regression training on one CT
(``--ct pelvis|chest``: ``../shared/data/{pelvis,chest}-ct/ct.nii.gz``), measured for every loop in the same
run, each in a fresh subprocess with torch threads = all cores (``--threads``), ``--warmup`` untimed steps, then
``--steps`` timed steps; ``ms/step`` is their mean (``median_ms`` and every step's time are in ``--json``),
``images/s = batch / (ms/step)``, ``ratio = xraypose images/s ÷ peer images/s`` (> 1: xraypose is faster).

**xraypose** (this venv): :func:`xraypose.learning.train` itself, as ``xraypose train`` calls it — CT read with
:func:`xraypose.io.read_volume` (no label map: the anatomy centre is the bone centroid), the mobile C-arm
detector :func:`xraypose.datasets.mobile_carm_intrinsics` (sdd 1020 mm, 298 mm panel) on ``image_size²``
pixels, ``TrainingConfig(steps=warmup + steps, batch_size, image_size, stages=((1, 1, 1),))`` and the default
``PoseRegressorConfig`` (timm ResNet-18, BatchNorm, no attention, no autoencoder). One step of ``train`` is: a
:class:`~xraypose.learning.PoseDataStream` batch (poses from the default C-arm distribution — LAO/RAO ±30°,
cranial/caudal ±20°, in-plane ±10°, isocentre ±30 mm about the anatomy centre, source 620 mm from it —, DRRs
rendered under ``no_grad`` by the fused engine at the training size on its fixed pyramid level, near-empty views
and sources inside the CT redrawn), domain randomisation (:func:`~xraypose.learning.augment`, full strength),
per-image standardisation, the network's forward, the pose loss (geodesic + normalised translation + double
geodesic), backward, gradient-norm clipping, AdamW and the LR scheduler, plus ``train``'s own bookkeeping (loss
accumulation, a ``log.csv`` row every 10 steps; ``checkpoint_every`` 500, so no checkpoint falls inside the
timed steps unless ``warmup + steps >= 500``). The single stage at full pose range and full augmentation is
the last, most expensive stage of the default incremental schedule; the ``callback`` of ``train`` time-stamps the end of every step (it runs after the optimiser step and
a ``tolist()`` that synchronises), the first ``warmup`` steps are discarded.

**Peers** (the peers' venv, ``--peer-python``; ``benchmarks/_train_peer_worker.py``, JSON in / JSON out, no
xraypose import there): a DiffPose-style loop (Gopalakrishnan & Golland, DiffPose, CVPR 2024,
its DeepFluoro training script, reduced to the work both loops share). Per step:
``batch_size`` poses ``isocenter_pose.compose(offset)`` as DiffPose's ``get_random_offset`` (an ``se3_log_map``
offset acting in the world frame, i.e. a rotation about the CT centre; rotation sigmas DiffPose's 0.2, 0.1,
0.25 rad; translations N(0, 30 mm) per axis instead of its DeepFluoro-specific means and sigmas) about an AP
view with the source 620 mm anterior of the CT grid centre; DRRs rendered under ``no_grad`` by DiffDRR 0.6.1's
``DRR`` (``--peer-renderer``: its default Siddon, and/or its trilinear with ``--n-samples`` points per ray) or
nanodrr 0.1.7's trilinear (``nanodrr``), on **the same physical detector** at the same ``image_size²`` (our
detector converted by :meth:`xraypose.geometry.diffdrr.DiffDRRGeometry.from_intrinsics`, density
``diffdrr.data.read(..., orientation="AP")``); DiffPose's normalisation (min–max, then ``(x − 0.3080) /
0.1494``); **the same network** (timm ``resnet18`` with ``in_chans=1`` and the same 512 → 256 → 9 head: the
parameter counts of both sides are compared); a geodesic + translation loss; backward; ``Adam`` step.

What the peer loop leaves out (so its images/s is an upper bound on DiffPose's own loop): DiffPose's published
loop also renders a second DRR *at the predicted pose* with gradients and adds an NCC term, draws a random bone
contrast per batch (``bone_attenuation_multiplier``, a per-read setting in DiffDRR 0.6.1) and clips gradients
adaptively; it has no augmentation, no redraw of empty views and no logging. Apart from rendering, xraypose's
step does at least the peer's work, plus augmentation, redraws, gradient clipping and its log.

Examples::

    python benchmarks/train_throughput.py --ct pelvis --peer-python ~/.cache/xraypose-peers/bin/python
    python benchmarks/train_throughput.py --ct chest --steps 30 --warmup 5 --peer-renderer all --json
    python benchmarks/train_throughput.py --ct pelvis --steps 2 --warmup 1 --image-size 64 --batch-size 2 \\
        --no-peers   # smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
CTS = {"chest": SHARED / "chest-ct" / "ct.nii.gz", "pelvis": SHARED / "pelvis-ct" / "ct.nii.gz"}
#: DiffPose's rotation sigmas of ``get_random_offset`` (rad) and our translation sigmas (mm) for the peer loop.
PEER_ROTATION_SIGMA = (0.2, 0.1, 0.25)
PEER_TRANSLATION_SIGMA = (30.0, 30.0, 30.0)
#: ``--peer-renderer`` choices and the (peer, method) loops they run.
PEER_LOOPS = {
    "siddon": [("diffdrr", "siddon")],
    "trilinear": [("diffdrr", "trilinear")],
    "both": [("diffdrr", "siddon"), ("diffdrr", "trilinear")],
    "nanodrr": [("nanodrr", "trilinear")],
    "all": [("diffdrr", "siddon"), ("diffdrr", "trilinear"), ("nanodrr", "trilinear")],
}


# --------------------------------------------------------------------------------------------------
# xraypose worker: train() itself, time-stamped by its callback
# --------------------------------------------------------------------------------------------------


def run_xraypose(spec: dict[str, Any]) -> dict[str, Any]:
    import resource
    import statistics
    import time

    import torch

    sys.path.insert(0, str(HERE))
    from _peer_worker import set_threads
    from xraypose import __version__
    from xraypose.geometry.camera import Intrinsics
    from xraypose.io import read_volume
    from xraypose.learning import PoseRegressorConfig, TrainingConfig, train

    threads = set_threads(spec.get("threads"))
    warmup, steps, size = int(spec["warmup"]), int(spec["steps"]), int(spec["image_size"])
    vol = read_volume(spec["ct"])
    intr = Intrinsics(**spec["intrinsics"])
    total = warmup + steps
    config = TrainingConfig(
        steps=total,
        batch_size=int(spec["batch_size"]),
        image_size=size,
        warmup_steps=min(100, max(0, total // 10)),  # as `xraypose train`
        stages=((1.0, 1.0, 1.0),),
        seed=int(spec["seed"]),
        device=spec["device"],
    )
    model_config = PoseRegressorConfig(image_size=size)
    stamps: list[float] = []
    losses: list[float] = []

    def callback(step: int, terms: dict[str, float]) -> None:
        stamps.append(time.perf_counter())
        losses.append(terms["loss"])

    with tempfile.TemporaryDirectory(prefix="xraypose-train-bench-") as out:
        result = train(vol, intr, out, config, model_config, resume=False, progress=False, callback=callback)
    times = [1e3 * (b - a) for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True)]
    ms = sum(times) / len(times)
    return {
        "ok": True,
        "threads": threads,
        "ms_per_step": ms,
        "median_ms": statistics.median(times),
        "times_ms": times,
        "images_per_s": 1e3 * config.batch_size / ms,
        "losses": losses[warmup:],
        "n_params": sum(p.numel() for p in result.model.parameters()),
        "backbone_impl": f"timm {__import__('timm').__version__} {model_config.backbone}",
        "versions": {"torch": torch.__version__, "xraypose": __version__},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps_done": result.steps,
    }


def _worker_main(spec_path: str) -> int:
    import traceback

    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run_xraypose(spec)
    except Exception as exc:  # reported to the parent
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    Path(spec["out_json"]).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


def base_spec(args: argparse.Namespace) -> dict[str, Any]:
    """Everything both sides need, computed here with xraypose (plain numbers for the peers)."""
    from xraypose.datasets import mobile_carm_intrinsics
    from xraypose.geometry.diffdrr import DiffDRRGeometry, diffdrr_camera_frame_change
    from xraypose.geometry.sampling import CArmPoseDistribution

    intr = mobile_carm_intrinsics(args.image_size)
    geom = DiffDRRGeometry.from_intrinsics(intr, orientation="AP")
    return {
        "ct": str(CTS[args.ct]),
        "device": args.device,
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "seed": args.seed,
        "lr": 1e-3,
        "intrinsics": intr.to_dict(),
        "n_samples": args.n_samples,
        "source_to_centre_mm": CArmPoseDistribution().source_to_isocenter_mm,
        "rotation_sigma": list(PEER_ROTATION_SIGMA),
        "translation_sigma": list(PEER_TRANSLATION_SIGMA),
        "diffdrr_detector": geom.drr_kwargs(),
        "nanodrr_intrinsics": {
            "sdd": intr.sdd,
            "delx": intr.dx,
            "dely": intr.dy,
            "x0": intr.x0,
            "y0": intr.y0,
            "height": intr.rows,
            "width": intr.cols,
        },
        "camera_frame_change": diffdrr_camera_frame_change("AP").tolist(),
    }


def run_loop(cmd: list[str], spec: dict[str, Any], tag: str, tmp: Path, timeout: float) -> dict[str, Any]:
    spec = dict(spec, out_json=str(tmp / f"{tag}.json"))
    spec_path = tmp / f"{tag}-spec.json"
    spec_path.write_text(json.dumps(spec))
    try:
        proc = subprocess.run([*cmd, str(spec_path)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    out = Path(spec["out_json"])
    if not out.exists():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
        return {"ok": False, "error": f"exit code {proc.returncode} (killed for memory?) {tail[0]}"}
    return json.loads(out.read_text())


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    spec = base_spec(args)
    loops = [] if args.no_peers else PEER_LOOPS[args.peer_renderer]
    if args.peer_python:
        sys.path.insert(0, str(HERE))
        from _peer_worker import peer_modules

        have = peer_modules(args.peer_python)
        python = {m: args.peer_python if ok else None for m, ok in have.items()}
    else:
        python = {
            m: sys.executable if importlib.util.find_spec(m) is not None else None
            for m in ("diffdrr", "nanodrr")
        }
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="xraypose-train-bench-") as tmpdir:
        tmp = Path(tmpdir)
        plan: list[tuple[str, str, list[str], dict[str, Any]]] = [
            (
                "xraypose",
                "xraypose (fused, train())",
                [sys.executable, str(Path(__file__).resolve()), "--_worker"],
                spec,
            )
        ]
        for peer, method in loops:
            py = python["diffdrr"] if peer == "diffdrr" else python["nanodrr"] and python["diffdrr"]
            label = f"{'DiffDRR' if peer == 'diffdrr' else 'nanodrr'} {method}" + (
                f" ({args.n_samples} pts)" if method == "trilinear" else ""
            )
            if py is None:
                notes.append(f"{label}: skipped ({peer} not importable; pass --peer-python)")
                continue
            cmd = [py, str(HERE / "_train_peer_worker.py")]
            plan.append((f"{peer}-{method}", label, cmd, dict(spec, renderer=peer, method=method)))
        for tag, label, cmd, loop_spec in plan:
            if not args.json:
                print(f"running {label} …", file=sys.stderr, flush=True)
            res = run_loop(cmd, loop_spec, tag, tmp, args.timeout)
            row: dict[str, Any] = {
                "loop": label,
                "ct": args.ct,
                "image_size": args.image_size,
                "batch": args.batch_size,
                "steps": args.steps,
                "warmup": args.warmup,
                **{k: res.get(k) for k in ("ms_per_step", "median_ms", "images_per_s", "n_params")},
                **{k: res.get(k) for k in ("backbone_impl", "threads", "peak_rss_mb", "versions")},
                "ray_hit_fraction": res.get("ray_hit_fraction"),
                "times_ms": res.get("times_ms"),
                "ratio": None,
            }
            if not res.get("ok"):
                row["error"] = res.get("error")
                row["traceback"] = res.get("traceback")
            rows.append(row)
            if not args.json:
                print(f"  {label}: {_fmt(row['ms_per_step'])} ms/step" + (
                    f", error {row['error']}" if row.get("error") else ""
                ), file=sys.stderr, flush=True)  # fmt: skip
    ours = rows[0]["images_per_s"]
    for row in rows[1:]:
        if ours and row["images_per_s"]:
            row["ratio"] = ours / row["images_per_s"]
    counts = {r["n_params"] for r in rows if r["n_params"] is not None}
    if len(counts) > 1:
        notes.append(f"WARNING: the networks differ in parameter count ({sorted(counts)})")
    meta = {
        "ct": args.ct,
        "device": args.device,
        "threads": rows[0].get("threads"),
        "warmup": args.warmup,
        "steps": args.steps,
        "n_params": sorted(counts),
        "peer_pose_rotation_sigma_rad": list(PEER_ROTATION_SIGMA),
        "peer_pose_translation_sigma_mm": list(PEER_TRANSLATION_SIGMA),
        "detector": {k: spec["intrinsics"][k] for k in ("sdd", "rows", "cols", "dx", "dy")},
        "notes": notes,
    }
    return rows, meta


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    headers = ["loop", "CT", "image size", "batch", "ms/step", "images/s", "ratio"]
    body = [
        [
            r["loop"], r["ct"], f"{r['image_size']}²", str(r["batch"]), _fmt(r["ms_per_step"]),
            _fmt(r["images_per_s"], 2), "—" if r is rows[0] else _fmt(r["ratio"], 2),
        ]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    line = "  ".join(
        h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for b in body:
        print(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths, strict=True))
            )
        )
    impl = sorted({r["backbone_impl"] for r in rows if r.get("backbone_impl")})
    print(
        f"device {meta['device']}, {meta['threads']} threads; mean of {meta['steps']} steps after "
        f"{meta['warmup']} warm-up, each loop in its own process, same run; network: {'; '.join(impl)} "
        f"({', '.join(str(n) for n in meta['n_params'])} parameters); ratio = xraypose images/s ÷ loop images/s"
    )
    for note in meta["notes"]:
        print(note)
    for r in rows:
        if r.get("error"):
            print(f"{r['loop']}: {r['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct", choices=sorted(CTS), default="pelvis")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--peer-renderer",
        choices=sorted(PEER_LOOPS),
        default="both",
        help="peer loops: DiffDRR siddon / trilinear / both, nanodrr (trilinear), or all",
    )
    parser.add_argument("--n-samples", type=int, default=500, help="peers' trilinear points per ray")
    parser.add_argument("--peer-python", help="Python with diffdrr 0.6.1 / nanodrr 0.1.7 (setup-peers.sh)")
    parser.add_argument("--no-peers", action="store_true", help="time xraypose only")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per loop")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--save", type=Path, help="also write the JSON results to this file")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        return _worker_main(args._worker)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if args.image_size < 32:
        parser.error("--image-size must be >= 32 (TrainingConfig)")
    rows, meta = run(args)
    doc = {"rows": rows, "meta": meta}
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(doc, indent=2))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(rows, meta)
    return 0 if all(not r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
