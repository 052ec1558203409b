"""ProST's capture range against CMA-ES alone (issue 6), on the same cases in one run.

Runs, on every selected case and perturbation level of a benchmark file, in this order: ``cmaes`` (the xReg-style
CMA-ES + BOBYQA baseline), ``prost-cmaes`` (learned-similarity descent, then that CMA-ES with ProST's hand-over
σ: ``--prost-sigma`` as on ``xraypose benchmark``, default ``registration.prost.HANDOVER_SIGMA`` = 5°, 5°, 10°,
15, 15, 30 mm; after the descent the pose is closer, so CMA-ES starts with a smaller search distribution),
``prost-cmaes-wide`` (the same
hand-over with the baseline's σ = 15°, 15°, 30°, 50, 50, 100 mm), ``prost-gncc`` (descent, then gradient-NCC
descent) and ``diffpose`` (the engine's default: multi-start search + se(3) descent). Writes the
runner's usual outputs (``cases.csv``, ``summary.md``, the capture-range plot ``success_vs_initial_error.png``…)
to ``--out`` and prints success at 10 mm (the paper's criterion) per method and level with the ratio of each
ProST → CMA-ES variant to CMA-ES alone.

Example::

    xraypose make-benchmark --ct ../shared/data/pelvis-ct/ct.nii.gz \\
        --labels ../shared/data/pelvis-ct/labels.nii.gz --n 40 --seed 0 --levels 10/20,20/40,30/60 \\
        --out pelvis-wide.h5
    xraypose train-similarity --ct ../shared/data/pelvis-ct/ct.nii.gz --camera camera256.json \\
        --out sim-pelvis --minutes 45 --no-progress
    python benchmarks/prost_capture_range.py --bench pelvis-wide.h5 --ct ../shared/data/pelvis-ct/ct.nii.gz \\
        --similarity sim-pelvis --max-cases 12 --out res-prost-pelvis
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xraypose.cli import _parse_prost_sigma
from xraypose.cli.benchmark import _parse_levels
from xraypose.errors import InputError
from xraypose.learning import load_similarity
from xraypose.metrics import summarize_by
from xraypose.registration import CMAESConfig, ProSTConfig
from xraypose.registration.benchmark import default_method_table, run_benchmark, write_results
from xraypose.registration.prost import HANDOVER_SIGMA, ProSTMethod

METHODS = ("cmaes", "prost-cmaes", "prost-cmaes-wide", "prost-gncc", "diffpose")


def _argtype(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` from one of the CLI's parsers (one parser for both; its error as argparse's)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, required=True, help="benchmark file (xraypose make-benchmark)")
    ap.add_argument("--ct", type=Path, default=None, help="its CT (default: the path recorded in it)")
    ap.add_argument("--similarity", type=Path, required=True, help="xraypose train-similarity folder")
    ap.add_argument("--max-cases", type=int, default=10, help="the first N cases of every level")
    ap.add_argument(
        "--levels",
        type=_argtype(_parse_levels),
        default=None,
        help="comma-separated indices of the file's perturbation levels to run (default: all), e.g. '1,2'",
    )
    ap.add_argument(
        "--prost-sigma",
        type=_argtype(_parse_prost_sigma),
        default=HANDOVER_SIGMA,
        help="CMA-ES σ of prost-cmaes: degrees ×3, mm ×3 (default 5,5,10,15,15,30)",
    )
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True, help="output folder (must not hold a run)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := sorted(set(methods) - set(METHODS)):
        ap.error(f"--methods: unknown {unknown}; choose from {METHODS}")

    trained = load_similarity(args.similarity)
    table = dict(default_method_table())
    table["prost-cmaes"] = ProSTMethod(
        trained, "cmaes", ProSTConfig(cmaes=CMAESConfig(sigma=args.prost_sigma))
    )
    table["prost-cmaes-wide"] = ProSTMethod(trained, "cmaes", ProSTConfig(cmaes=CMAESConfig()))
    table["prost-gncc"] = ProSTMethod(trained, "gncc")

    start = time.perf_counter()
    results = run_benchmark(
        args.bench,
        methods,
        ct=args.ct,
        max_cases=args.max_cases,
        levels=args.levels,
        method_table=table,
        device=args.device,
        progress=lambda done, total: print(f"\r{done}/{total} runs", end="", flush=True),
    )
    print()
    results.metadata["prost_cmaes_sigma"] = list(args.prost_sigma)
    results.metadata["prost_cmaes_wide_sigma"] = list(CMAESConfig().sigma)
    results.metadata["similarity"] = str(args.similarity)
    write_results(results, args.out)

    summaries = summarize_by(results)
    levels = list(dict.fromkeys(level for _, level in summaries))
    print(f"\n{len(results)} runs in {time.perf_counter() - start:.0f} s; success = mTRE < 10 mm\n")
    print("| method | " + " | ".join(f"{lv}: SR@10 · median mTRE (mm)" for lv in levels) + " | s/case |")
    print("|---|" + "---:|" * (len(levels) + 1))
    for m in methods:
        cells = []
        seconds = []
        for lv in levels:
            s = summaries[(m, lv)]
            sr = s.success[10.0]
            cells.append(f"{sr.successes}/{sr.total} · {s.mtre_mm.median:.2f}")
            if s.seconds is not None:
                seconds.append(s.seconds.median)
        span = f"{min(seconds):.1f}–{max(seconds):.1f}" if seconds else "—"
        print(f"| {m} | " + " | ".join(cells) + f" | {span} |")
    print()
    for m in ("prost-cmaes", "prost-cmaes-wide"):
        if m not in methods or "cmaes" not in methods:
            continue
        ratios = []
        for lv in levels:
            base = summaries[("cmaes", lv)].success[10.0].fraction
            got = summaries[(m, lv)].success[10.0].fraction
            ratios.append(f"{lv}: {got / base:.2f}×" if base > 0 else f"{lv}: — (CMA-ES 0 %)")
        print(f"{m} ÷ cmaes (SR@10 mm): " + ", ".join(ratios))
    print(f"\nwrote {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
