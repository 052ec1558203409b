"""Ablation of the pose regressor's options, shaped like the Diff-DeepDRR poster's table (issue 5, item 7).

Rows (each a separate ``xraypose train`` run on the same CT, camera, seed and step budget, then
``xraypose benchmark --init model`` on the same benchmark cases):

- ``A``: the plain regressor (timm backbone + pose head), one training stage at the full pose range;
- ``A+B``: with the regularised autoencoder branch (``--autoencoder``);
- ``A+C``: with multi-head self-attention and 2D positional embedding (``--attention``);
- ``A+B+C``: both;
- ``+incremental``: both, trained with the incremental schedule (stages widening the pose range and the
  augmentation; ``xraypose train``'s default);
- ``+refinement``: the ``+incremental`` network's pose refined by ``diffpose`` (``register`` with its defaults).

The network rows are scored by ``--method none`` (the network's pose as it is), so every row sees exactly the
same X-rays. Errors are the benchmark runner's (mTRE over the benchmark's landmarks, mm; rotation and
translation of the camera pose, degrees and mm; success = mTRE strictly below 1, 5 and 10 mm).

A fixed ``--steps`` budget (not wall-clock) keeps the rows comparable when the machine is shared. Finished
rows are reused (training resumes from its checkpoint; an evaluated row's ``summary.json`` is read back), so an
interrupted run continues where it stopped.

Example::

    python benchmarks/learning_ablation.py --bench pelvis-200.h5 --ct ../shared/data/pelvis-ct/ct.nii.gz \\
        --labels ../shared/data/pelvis-ct/labels.nii.gz --camera camera256.json --steps 800 --max-cases 20 \\
        --out ablation-pelvis/
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: (row name, ``xraypose train`` flags); ``+refinement`` reuses the last network.
ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("A", ("--no-autoencoder", "--no-attention", "--no-incremental")),
    ("A+B", ("--autoencoder", "--no-attention", "--no-incremental")),
    ("A+C", ("--no-autoencoder", "--attention", "--no-incremental")),
    ("A+B+C", ("--autoencoder", "--attention", "--no-incremental")),
    ("+incremental", ("--autoencoder", "--attention", "--incremental")),
)


def _xraypose() -> list[str]:
    exe = shutil.which("xraypose", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "xraypose.cli"]


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _row_stats(summary: dict, method: str) -> dict:
    rows = [r for r in summary["per_method_level"] if r["method"] == method]
    if len(rows) != 1:
        raise SystemExit(f"summary.json: expected one row of method {method!r}, got {len(rows)}")
    r = rows[0]
    sr = {float(k): v["fraction"] * 100 for k, v in r["success"].items()}
    return {
        "n": r["n_cases"],
        "mtre_median": r["mtre_mm"]["median"],
        "mtre_mean": r["mtre_mm"]["mean"],
        "rot_median": r["rot_deg"]["median"],
        "trans_median": r["trans_mm"]["median"],
        "sr1": sr[1.0],
        "sr5": sr[5.0],
        "sr10": sr[10.0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, required=True, help="benchmark file (xraypose make-benchmark)")
    ap.add_argument("--ct", type=Path, required=True, help="the benchmark's CT")
    ap.add_argument("--labels", type=Path, default=None, help="its label map (anatomy centre)")
    ap.add_argument("--camera", type=Path, required=True, help="detector intrinsics JSON")
    ap.add_argument("--steps", type=int, default=800, help="training steps per row")
    ap.add_argument("--max-cases", type=int, default=20, help="benchmark cases scored per row")
    ap.add_argument("--backbone", default=None, help="timm backbone (default: xraypose train's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, required=True, help="folder of the models, evaluations and table")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    exe = _xraypose()
    results: list[tuple[str, dict, float | None]] = []
    for name, flags in ROWS:
        slug = name.replace("+", "plus-").strip("-") or name
        model, evaluation = args.out / f"model-{slug}", args.out / f"eval-{slug}"
        last = name == ROWS[-1][0]
        train_seconds = None
        if not (model / "model.safetensors").is_file():
            t0 = time.perf_counter()
            cmd = [*exe, "train", "--ct", str(args.ct), "--camera", str(args.camera), "--out", str(model)]
            cmd += [
                "--steps",
                str(args.steps),
                "--seed",
                str(args.seed),
                "--device",
                args.device,
                "--no-progress",
            ]
            cmd += ["--labels", str(args.labels)] if args.labels else []
            cmd += ["--backbone", args.backbone] if args.backbone else []
            _run([*cmd, *flags])
            train_seconds = time.perf_counter() - t0
        if not (evaluation / "summary.json").is_file():
            cmd = [*exe, "benchmark", "--bench", str(args.bench), "--ct", str(args.ct), "--init", "model"]
            cmd += ["--model", str(model), "--method", "none"] + (["--method", "diffpose"] if last else [])
            cmd += ["--max-cases", str(args.max_cases), "--seed", str(args.seed), "--device", args.device]
            _run([*cmd, "--out", str(evaluation), "--force"])
        summary = json.loads((evaluation / "summary.json").read_text())
        results.append((name, _row_stats(summary, "none"), train_seconds))
        if last:
            results.append(("+refinement", _row_stats(summary, "diffpose"), None))

    lines = [
        f"Ablation on `{args.bench.name}` ({args.steps} training steps per row, seed {args.seed}, "
        f"first {args.max_cases} cases)",
        "",
        "| row | n | mTRE median (mm) | mTRE mean (mm) | rot median (°) | trans median (mm) | SR@1 mm (%) "
        "| SR@5 mm (%) | SR@10 mm (%) | training s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s, secs in results:
        lines.append(
            f"| {name} | {s['n']} | {s['mtre_median']:.2f} | {s['mtre_mean']:.2f} | {s['rot_median']:.2f} | "
            f"{s['trans_median']:.1f} | {s['sr1']:.1f} | {s['sr5']:.1f} | {s['sr10']:.1f} | "
            f"{'—' if secs is None else f'{secs:.0f}'} |"
        )
    table = "\n".join(lines)
    print(table)
    (args.out / "ablation.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
