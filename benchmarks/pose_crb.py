"""Cramér–Rao bound of the pose from one X-ray of a benchmark: the best mTRE any unbiased estimator can reach.

For each of the first ``--cases`` cases of a benchmark, the noise-free mean of its X-ray
(:func:`xraypose.physics.simulate_xray` with the benchmark's detector model, noise and quantisation off) is
differentiated in the six pose parameters by central differences (the camera-frame twist ``(v, ω)`` applied as
``T_world_from_camera · exp(ξ)``; steps 0.25 mm and 2.5 mrad); with Poisson quanta the variance of a pixel of
``−ln(I/I0)`` is ``1 / (N0 · I)`` (``N0`` = ``--photons`` per pixel of the open beam, ``I`` the mean transmission
with scatter), so the Fisher information is ``Jᵀ diag(N0 · I) J`` and its inverse bounds the covariance of the
pose. Poses drawn from that Gaussian are scored with :func:`xraypose.metrics.pose_errors` (the benchmark's own
mTRE): the table gives, per case, the bound's standard deviations and the median and mean mTRE an efficient
estimator would reach, and compares them with a registration run's ``cases.csv`` when ``--results`` is given.
It ignores the correlation the detector blur gives the noise and the 12-bit quantisation (both small here).

Example::

    python benchmarks/pose_crb.py --bench pelvis-200.h5 --ct ../shared/data/pelvis-ct/ct.nii.gz --cases 8 \\
        --results results/pelvis --method diffpose-fine
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import torch

from xraypose.datasets import read_synthetic_benchmark
from xraypose.geometry.camera import Camera
from xraypose.geometry.se3 import se3_exp
from xraypose.metrics import pose_errors
from xraypose.physics import simulate_xray
from xraypose.physics.detector import DetectorModel
from xraypose.registration.benchmark import load_benchmark_ct

#: Central-difference steps: translation (mm) and rotation (rad) of the camera-frame twist.
STEP_MM, STEP_RAD = 0.25, 2.5e-3


def fisher_information(bench, volume, case: int, photons: float) -> torch.Tensor:
    """``(6, 6)`` Fisher information of the twist ``(v mm, ω rad)`` about the true pose of ``case``."""
    intr = bench.intrinsics
    pose = bench.poses[case].double()
    steps = torch.tensor([STEP_MM] * 3 + [STEP_RAD] * 3, dtype=torch.float64)
    twists = torch.cat([torch.diag(steps), -torch.diag(steps)])
    poses = torch.cat([pose[None] @ se3_exp(twists), pose[None]])

    def simulate(model: DetectorModel) -> torch.Tensor:
        with torch.no_grad():
            out = simulate_xray(volume.data, volume.affine, Camera(intr, poses.float()), detector_model=model)
        return out.double().flatten(1)

    log_mean = simulate(DetectorModel(photons_per_pixel=None, bit_depth=None))
    transmission = simulate(DetectorModel(photons_per_pixel=None, bit_depth=None, output="intensity"))[-1]
    jac = (log_mean[:6] - log_mean[6:12]) / (2 * steps[:, None])
    inverse_variance = photons * transmission.clamp_min(1e-9)
    return (jac * inverse_variance) @ jac.T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, required=True, help="benchmark file (.h5)")
    ap.add_argument("--ct", type=Path, default=None, help="the benchmark's CT (default: its recorded path)")
    ap.add_argument("--cases", type=int, default=8, help="first N cases")
    ap.add_argument(
        "--photons", type=float, default=1e4, help="quanta per pixel of the open beam (benchmark: 1e4)"
    )
    ap.add_argument("--draws", type=int, default=2000, help="poses drawn from the bound per case")
    ap.add_argument(
        "--results", type=Path, default=None, help="an 'xraypose benchmark' folder to compare with"
    )
    ap.add_argument("--method", default="diffpose-fine", help="method of --results to compare")
    args = ap.parse_args()

    bench = read_synthetic_benchmark(args.bench)
    volume, _ = load_benchmark_ct(bench, args.ct)
    measured: dict[int, list[float]] = {}
    if args.results is not None:
        with (args.results / "cases.csv").open() as fh:
            for row in csv.DictReader(fh):
                if row["method"] == args.method:
                    measured.setdefault(int(row["case"]), []).append(float(row["mtre_mm"]))
    gen = torch.Generator().manual_seed(0)
    print(
        "| case | σ t x/y/z (mm) | σ r x/y/z (mrad) | bound: median mTRE (mm) | bound: mean mTRE (mm) | measured (mm) |"
    )
    print("|---:|---|---|---:|---:|---|")
    medians, means = [], []
    for case in range(min(args.cases, len(bench.poses))):
        cov = torch.linalg.inv(fisher_information(bench, volume, case, args.photons))
        twists = torch.randn(args.draws, 6, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
        truth = bench.poses[case].double()[None]
        drawn = truth @ se3_exp(twists)
        mtre = pose_errors(
            drawn, truth.expand(args.draws, 4, 4), bench.landmarks_world, bench.intrinsics
        ).mtre_mm
        sd = cov.diagonal().sqrt()
        medians.append(float(mtre.median()))
        means.append(float(mtre.mean()))
        seen = " / ".join(f"{x:.3f}" for x in measured.get(case, [])) or "–"
        print(
            f"| {case} | {' / '.join(f'{x:.3f}' for x in sd[:3].tolist())} | "
            f"{' / '.join(f'{1e3 * x:.2f}' for x in sd[3:].tolist())} | {medians[-1]:.3f} | {means[-1]:.3f} | {seen} |"
        )
    print(
        f"\nmedian over cases: bound median mTRE {statistics.median(medians):.3f} mm, "
        f"mean mTRE {statistics.median(means):.3f} mm ({len(medians)} cases, {args.photons:g} quanta/pixel)"
    )


if __name__ == "__main__":
    main()
