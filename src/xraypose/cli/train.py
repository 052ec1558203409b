"""``xraypose train``: train a patient-specific pose regression network on DRRs of one CT (a thin layer over
:func:`xraypose.learning.training.train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError, XrayposeError
from . import _fail, app, console


@app.command("train")
def train_command(
    ct: Annotated[
        Path, typer.Option("--ct", help="CT volume: NIfTI, NRRD, MHA/MHD or a DICOM series folder.")
    ],
    camera: Annotated[
        Path, typer.Option("--camera", help="Detector intrinsics JSON (as written by Intrinsics.save).")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Output folder: model.safetensors, model_card.json, checkpoint.pt, log.csv."
        ),
    ],
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 10000,
    backbone: Annotated[str, typer.Option(help="timm CNN backbone name, e.g. resnet18, efficientnet_b0.")] = (
        "resnet18"
    ),
    batch_size: Annotated[int, typer.Option(help="Global batch size (DRRs per step).")] = 8,
    image_size: Annotated[int, typer.Option(help="Training image side, pixels.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    norm: Annotated[str, typer.Option(help="'batch' or 'group' normalisation in the backbone.")] = "batch",
    checkpoint_every: Annotated[int, typer.Option(help="Write the checkpoint every N steps.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation, poses and augmentation.")] = 0,
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")] = "auto",
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue from OUT/checkpoint.pt when present.")
    ] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train a patient-specific pose regressor (DiffPose-style) on DRRs of --ct rendered at random C-arm poses."""
    from ..geometry import Intrinsics
    from ..io import read_volume
    from ..learning import PoseRegressorConfig, TrainingConfig, train

    try:
        config = TrainingConfig(
            steps=steps,
            batch_size=batch_size,
            image_size=image_size,
            lr=lr,
            checkpoint_every=checkpoint_every,
            seed=seed,
            device=device,
            warmup_steps=min(100, max(0, steps // 10)),
        )
        model_config = PoseRegressorConfig(backbone=backbone, norm=norm, image_size=image_size)  # type: ignore[arg-type]
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a folder")
        intr = Intrinsics.load(camera)
        volume = read_volume(ct)
        result = train(volume, intr, out, config, model_config, resume=resume, progress=progress)
    except XrayposeError as exc:
        _fail(str(exc))
    console.print(
        f"wrote {out / 'model.safetensors'}: {result.steps} steps"
        + (f" (resumed at {result.resumed_from})" if result.resumed_from is not None else "")
        + f", final loss {result.final_loss:.4f}, {result.wall_time_s:.1f} s",
        soft_wrap=True,
    )
