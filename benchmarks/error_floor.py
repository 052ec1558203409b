"""The error floor of a similarity: where the optimiser settles when it starts *at the true pose* (issue 4).

For each of the first ``--cases`` cases of a benchmark, one level of :func:`xraypose.registration.register`
(no search, ``--steps`` Adam steps at ``--size`` px, a tight stopping rule) is started from the case's
ground-truth pose; the mTRE of the pose it returns is how far the loss's minimum lies from the truth for that
X-ray. ``--target`` chooses the X-rays: the benchmark's own images, or the same poses re-simulated with
:func:`xraypose.physics.simulate_xray` under a detector model with parts switched off (noise, scatter, blur),
which shows what moves the minimum.

Example::

    python benchmarks/error_floor.py --bench pelvis-200.h5 --ct ../shared/data/pelvis-ct/ct.nii.gz \\
        --cases 8 --size 256 --physics poly --target benchmark --target nonoise \\
        --loss "0.5*mncc+0.5*gncc" --loss mncc --noise-weight 0 --noise-weight 1
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from xraypose.datasets import read_synthetic_benchmark
from xraypose.geometry.camera import Camera
from xraypose.metrics import pose_errors
from xraypose.physics import simulate_xray
from xraypose.physics.detector import DetectorModel
from xraypose.registration import RegistrationConfig, Scale, VolumeRenderer, register
from xraypose.registration.benchmark import load_benchmark_ct

#: ``--target`` names → detector model of the re-simulated X-rays (``None``: the benchmark's own images).
TARGETS: dict[str, DetectorModel | None] = {
    "benchmark": None,
    "default": DetectorModel(),
    "nonoise": DetectorModel(photons_per_pixel=None),
    "noscatter": DetectorModel(scatter_to_primary=0.0),
    "noblur": DetectorModel(psf_fwhm_mm=0.0),
    "clean": DetectorModel(photons_per_pixel=None, scatter_to_primary=0.0, psf_fwhm_mm=0.0, bit_depth=None),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, required=True, help="benchmark file (xraypose make-benchmark)")
    ap.add_argument("--ct", type=Path, default=None, help="its CT (default: the path recorded in it)")
    ap.add_argument("--cases", type=int, default=8, help="the first N cases")
    ap.add_argument("--size", type=int, default=256, help="detector rows of the level")
    ap.add_argument("--physics", choices=("mono", "poly"), default="poly")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rel-tol", type=float, default=1e-6, help="RegistrationConfig.rel_tol")
    ap.add_argument("--loss", action="append", default=None, help="ImageLoss spec (repeat for several)")
    ap.add_argument(
        "--noise-weight",
        action="append",
        type=float,
        default=None,
        help="Scale.noise_weight γ of the level (repeat for several; default 0: every pixel alike)",
    )
    ap.add_argument(
        "--target", action="append", default=None, choices=sorted(TARGETS), help="X-rays (repeat)"
    )
    args = ap.parse_args(argv)
    losses = args.loss or ["0.5*mncc+0.5*gncc"]
    weights = args.noise_weight or [0.0]
    targets = args.target or ["benchmark"]

    bench = read_synthetic_benchmark(args.bench)
    volume, _ = load_benchmark_ct(bench, args.ct)
    renderer = VolumeRenderer(volume, args.physics)
    intr = bench.intrinsics
    n = min(args.cases, len(bench))
    print(
        f"{args.bench.name}: first {n} cases, {args.size} px, {args.physics}, {args.steps} steps from the truth"
    )
    print("| target | loss | noise weight γ | mTRE median (mm) | mTRE mean (mm) | per case (mm) |")
    print("|---|---|---:|---:|---:|---|")
    for target_name in targets:
        model = TARGETS[target_name]
        images = []
        for i in range(n):
            if model is None:
                images.append(bench.images[i][None].float())
            else:
                generator = torch.Generator().manual_seed(i)
                camera = Camera(intr, bench.poses[i][None].float())
                image = simulate_xray(
                    volume.data, volume.affine, camera, detector_model=model, generator=generator
                )
                images.append(image.float())
        for loss, gamma in ((loss, gamma) for loss in losses for gamma in weights):
            config = RegistrationConfig(
                loss=loss,
                rel_tol=args.rel_tol,
                search=None,
                scales=(Scale(args.size, args.steps, 1e-3, 0.1, noise_weight=gamma),),
            )
            errors = []
            for i in range(n):
                truth = bench.poses[i][None]
                result = register(renderer, images[i], intr, truth.float(), config)
                scored = pose_errors(result.pose.double().cpu(), truth, bench.landmarks_world, intr)
                errors.append(float(scored.mtre_mm[0]))
            per_case = ", ".join(f"{e:.2f}" for e in errors)
            print(
                f"| {target_name} | `{loss}` | {gamma:g} | {statistics.median(errors):.3f} | "
                f"{statistics.mean(errors):.3f} "
                f"| {per_case} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
