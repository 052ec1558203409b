"""``xraypose benchmark``: run registration methods on a synthetic benchmark and write tables and plots
(a thin layer over :mod:`xraypose.registration.benchmark`).

Registered on :data:`xraypose.cli.app` by an import at the end of ``xraypose/cli/__init__.py``.
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import FileFormatError, InputError, XrayposeError
from . import _fail, _parse_prost_sigma, _sigterm_as_exit, app, console


class BenchPhysics(str, Enum):
    mono = "mono"
    poly = "poly"


class InitSource(str, Enum):
    benchmark = "benchmark"
    model = "model"


class PeerRenderMethod(str, Enum):
    siddon = "siddon"
    trilinear = "trilinear"


def _parse_ints(option: str, text: str | None, *, full: bool = False) -> list[int | None] | None:
    """``"150,100"`` → ``[150, 100]``; with ``full``, ``"full"`` entries become ``None``."""
    if text is None:
        return None
    values: list[int | None] = []
    for part in text.replace(" ", "").split(","):
        if full and part == "full":
            values.append(None)
            continue
        try:
            values.append(int(part))
        except ValueError:
            values = []
            break
    if not values:
        example = "'64,128' or 'full'" if full else "'150,100' or '100'"
        raise InputError(f"{option}: expected comma-separated integers like {example}, got {text!r}")
    return values


def _parse_levels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if not values:
        raise InputError(f"--levels: expected comma-separated level indices like '0,1', got {text!r}")
    return values


@app.command("benchmark")
def benchmark_command(
    bench: Annotated[
        Path, typer.Option("--bench", help="Benchmark file (.h5) written by 'xraypose make-benchmark'.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Results folder: cases.csv, summary.md, summary.json, metadata.json and two PNG plots.",
        ),
    ],
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="Registration method (repeat for several); default diffpose. Peer rows: peer-diffpose "
            "(DiffPose on DiffDRR), peer-xvr (xvr on nanodrr), peer-xvr-diffdrr; they need --peer-python. "
            "ProST: prost-cmaes, prost-gncc, prost (learned similarity only); they need --similarity.",
            show_default=False,
        ),
    ] = None,
    ct: Annotated[
        Path | None,
        typer.Option("--ct", help="The CT the benchmark was made from (default: the path recorded in it)."),
    ] = None,
    levels: Annotated[
        str | None, typer.Option(help="Perturbation levels to run, as indices, e.g. '0,1' (default all).")
    ] = None,
    max_cases: Annotated[int | None, typer.Option(help="Run at most this many cases (the first).")] = None,
    physics: Annotated[
        BenchPhysics, typer.Option(help="Renderer the methods optimise through.")
    ] = BenchPhysics.mono,
    seed: Annotated[int, typer.Option(help="Seed passed to every method (non-negative).")] = 0,
    device: Annotated[
        str | None, typer.Option(help="Torch device, e.g. 'cpu' or 'cuda' (default: CUDA when available).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite result files in --out.")] = False,
    similarity: Annotated[
        Path | None,
        typer.Option(
            "--similarity",
            help="A train-similarity folder (trained on the benchmark's CT) for the prost-* methods.",
        ),
    ] = None,
    prost_sigma: Annotated[
        str | None,
        typer.Option(
            help="For prost-cmaes: the CMA-ES hand-over's initial σ, six numbers 'rx,ry,rz,tx,ty,tz' in degrees "
            "and mm (default '5,5,10,15,15,30'; the cmaes baseline's is '15,15,30,50,50,100').",
        ),
    ] = None,
    peer_python: Annotated[
        Path | None,
        typer.Option(
            "--peer-python",
            envvar="XRAYPOSE_PEER_PYTHON",
            help="Python of the peer environment (DiffDRR, nanodrr) for the peer-* methods; "
            "'bash ../shared/tools/setup-peers.sh' creates it and prints its path.",
        ),
    ] = None,
    peer_iterations: Annotated[
        str | None,
        typer.Option(
            "--peer-iterations",
            help="Peer Adam steps: one number for every stage or one per stage, e.g. '100' or '150,100' "
            "(default: the recipe's, DiffPose 500, xvr 150,100).",
        ),
    ] = None,
    peer_sizes: Annotated[
        str | None,
        typer.Option(
            "--peer-sizes",
            help="Peer detector rows per stage, e.g. '128' or '64,128'; 'full' is the benchmark's detector "
            "(default: the recipe's, DiffPose full, xvr 64,128).",
        ),
    ] = None,
    peer_render_method: Annotated[
        PeerRenderMethod | None,
        typer.Option(
            "--peer-render-method", help="DiffDRR's renderer for the peers (nanodrr: trilinear only)."
        ),
    ] = None,
    peer_timeout: Annotated[
        float, typer.Option("--peer-timeout", help="Seconds one peer run may take before it is stopped.")
    ] = 7200.0,
    init: Annotated[
        InitSource,
        typer.Option(
            "--init",
            help="Initial poses: 'benchmark' (the file's perturbed poses per level) or 'model' (one per case, "
            "predicted from the case's X-ray by --model).",
        ),
    ] = InitSource.benchmark,
    model: Annotated[
        Path | None, typer.Option("--model", help="Trained model folder (xraypose train) for --init model.")
    ] = None,
    allow_new_patient: Annotated[
        bool,
        typer.Option(
            "--allow-new-patient",
            help="With --init model: run a patient-agnostic model on a CT it was not trained on.",
        ),
    ] = False,
) -> None:
    """Run registration methods on every case, level and initial pose of a benchmark; write tables and plots."""
    from ..registration import benchmark as runner

    start = time.perf_counter()
    methods = list(method) if method else ["diffpose"]
    try:
        if not bench.is_file():
            raise FileFormatError(f"--bench {bench}: benchmark file not found")
        runner.check_outputs(out, force)
        if init is InitSource.model and model is None:
            raise InputError("--init model: give the trained network with --model MODEL_DIR")
        if init is InitSource.benchmark and model is not None:
            raise InputError("--model: only with --init model (the network then predicts the initial poses)")
        if init is InitSource.benchmark and allow_new_patient:
            raise InputError("--allow-new-patient: only with --init model")
        if init is InitSource.model and levels is not None:
            raise InputError("--levels: not with --init model (one network initial pose per case)")
        level_ids = _parse_levels(levels)
        if max_cases is not None and max_cases < 1:
            raise InputError(f"--max-cases: expected a positive integer, got {max_cases}")
        if seed < 0:
            raise InputError(f"--seed: expected a non-negative integer, got {seed}")
        table = dict(runner.default_method_table())
        from ..registration.prost import PROST_METHODS, prost_method_table

        prost = [m for m in methods if m in PROST_METHODS and m not in table]
        if prost and similarity is None:
            raise InputError(
                f"--method {prost[0]}: the ProST methods need --similarity DIR (a 'xraypose train-similarity' "
                "folder trained on the benchmark's CT)"
            )
        if similarity is not None and not prost:
            raise InputError(
                "--similarity: only for the ProST methods (--method prost-cmaes, prost-gncc, prost)"
            )
        sigma = _parse_prost_sigma(prost_sigma)
        if sigma is not None and "prost-cmaes" not in prost:
            raise InputError("--prost-sigma: only with --method prost-cmaes (the CMA-ES hand-over)")
        if prost:
            assert similarity is not None
            prost_config = None
            if sigma is not None:
                from ..registration import CMAESConfig, ProSTConfig

                prost_config = ProSTConfig(cmaes=CMAESConfig(sigma=sigma))
            table.update(prost_method_table(similarity, prost, prost_config))
        unknown = [m for m in methods if m not in table and m not in runner.PEER_METHODS]
        if unknown:
            known = ", ".join(sorted(set(table) | set(runner.PEER_METHODS) | set(PROST_METHODS)))
            raise InputError(f"--method: unknown method(s) {', '.join(unknown)}; choose from {known}")
        peers = [m for m in methods if m in runner.PEER_METHODS and m not in table]
        given = [
            flag
            for flag, value in (
                ("--peer-iterations", peer_iterations),
                ("--peer-sizes", peer_sizes),
                ("--peer-render-method", peer_render_method),
            )
            if value is not None
        ]
        if given and not peers:
            raise InputError(f"{', '.join(given)}: only for peer methods (--method peer-xvr, peer-diffpose…)")
        if peers and peer_python is None:
            raise InputError(
                f"--method {peers[0]}: peer methods need --peer-python PATH (or XRAYPOSE_PEER_PYTHON), the "
                "Python of the peer environment that 'bash ../shared/tools/setup-peers.sh' creates"
            )
        iterations = _parse_ints("--peer-iterations", peer_iterations)
        sizes = _parse_ints("--peer-sizes", peer_sizes, full=True)
        for name in peers:
            assert peer_python is not None
            table[name] = runner.peer_method(
                name,
                peer_python,
                iterations=iterations,  # type: ignore[arg-type]
                sizes=sizes,
                render_method=None if peer_render_method is None else peer_render_method.value,
                timeout_s=peer_timeout,
            )
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("runs"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("registering", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            with _sigterm_as_exit():
                results = runner.run_benchmark(
                    bench,
                    methods,
                    ct=ct,
                    levels=level_ids,
                    max_cases=max_cases,
                    physics=physics.value,
                    seed=seed,
                    progress=progress,
                    method_table=table,
                    device=device,
                    init=init.value,
                    model=model,
                    allow_new_patient=allow_new_patient,
                )
        paths = runner.write_results(results, out, force=force)
        report = paths["summary.md"].read_text(encoding="utf-8")
    except XrayposeError as exc:
        _fail(str(exc))
    typer.echo(report)
    elapsed = time.perf_counter() - start
    console.print(f"wrote {out}/ ({len(results)} runs of {', '.join(methods)}) in {elapsed:.1f} s")
