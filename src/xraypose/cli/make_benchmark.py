"""``xraypose make-benchmark``: write a synthetic registration benchmark (HDF5) from a CT.

Registered on :data:`xraypose.cli.app` by an import at the end of ``xraypose/cli/__init__.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import InputError, XrayposeError
from . import _check_out, _fail, app, console

_LABEL_NAME_FILES = ("structures.csv", "labels.json")


def _find_label_names(labels: Path | None) -> Path | None:
    """A label-names file beside the label map (``structures.csv`` or ``labels.json``), if any."""
    if labels is None:
        return None
    for name in _LABEL_NAME_FILES:
        candidate = labels.parent / name
        if candidate.is_file():
            return candidate
    return None


def _parse_levels(text: str) -> tuple[tuple[float, float], ...]:
    """``'10/20,20/40'`` → ``((10.0, 20.0), (20.0, 40.0))``; a clear error naming the bad entry."""
    pairs = []
    for item in text.split(","):
        parts = item.strip().split("/")
        try:
            if len(parts) != 2:
                raise ValueError
            pairs.append((float(parts[0]), float(parts[1])))
        except ValueError:
            raise InputError(
                f"--levels: expected 'degrees/mm' pairs separated by commas (e.g. '10/20,20/40'), got {item!r}"
            ) from None
    return tuple(pairs)


@app.command("make-benchmark")
def make_benchmark(
    ct: Annotated[
        Path, typer.Option("--ct", help="CT volume: NIfTI, NRRD, MHA/MHD or a DICOM series folder.")
    ],
    labels: Annotated[
        Path | None, typer.Option(help="Label map on the CT's grid: its centroids become the landmarks.")
    ] = None,
    label_names: Annotated[
        Path | None,
        typer.Option(
            help="Label id → name file (.csv with id,structure columns or .json); default: structures.csv or "
            "labels.json beside --labels."
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Number of cases (poses and target images).")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed (non-negative).")] = 0,
    out: Annotated[Path, typer.Option("--out", help="Output HDF5 file (.h5 or .hdf5).")] = Path("bench.h5"),
    size: Annotated[int, typer.Option(help="Detector rows and columns, pixels (mobile C-arm panel).")] = 256,
    inits_per_level: Annotated[int, typer.Option(help="Initial poses per case and perturbation level.")] = 1,
    levels: Annotated[
        str | None,
        typer.Option(
            help="Perturbation levels of the initial poses, 'degrees/mm' pairs separated by commas, e.g. "
            "'10/20,20/40,30/60' [default: 2/5,5/10,10/20,20/40]."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite --out if it exists.")] = False,
) -> None:
    """Write a synthetic 2D/3D registration benchmark: random C-arm poses, target images, landmarks, inits."""
    from ..datasets.synthetic import (
        DEFAULT_LEVELS,
        make_synthetic_benchmark,
        mobile_carm_intrinsics,
        read_label_names,
    )
    from ..io import read_volume

    start = time.perf_counter()
    try:
        _check_out(out, force, (".h5", ".hdf5"))
        if n < 1:
            raise InputError(f"--n: expected a positive number of cases, got {n}")
        if seed < 0:
            raise InputError(f"--seed: expected a non-negative integer, got {seed}")
        if inits_per_level < 1:
            raise InputError(f"--inits-per-level: expected a positive integer, got {inits_per_level}")
        if size < 1:
            raise InputError(f"--size: expected a positive integer pixel count, got {size}")
        level_pairs = DEFAULT_LEVELS if levels is None else _parse_levels(levels)
        intr = mobile_carm_intrinsics(size)
        names_file = label_names if label_names is not None else _find_label_names(labels)
        names = read_label_names(names_file) if names_file is not None else None
        volume = read_volume(ct, labels=labels)
        with Progress(
            TextColumn("rendering"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("render", total=n)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            make_synthetic_benchmark(
                volume,
                n,
                seed,
                out,
                intrinsics=intr,
                inits_per_level=inits_per_level,
                levels=level_pairs,
                label_names=names,
                progress=progress,
                force=force,
            )
    except XrayposeError as exc:
        _fail(str(exc))
    elapsed = time.perf_counter() - start
    console.print(f"wrote {out}: {n} cases, {size}×{size} px, seed {seed}, in {elapsed:.1f} s")
