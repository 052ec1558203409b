"""``xraypose train-similarity``: train ProST's learned similarity on DRRs of one CT (a thin layer over
:func:`xraypose.learning.train_similarity`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError, XrayposeError
from . import _fail, _training_budget, app, console


@app.command("train-similarity")
def train_similarity_command(
    ct: Annotated[
        Path, typer.Option("--ct", help="CT volume: NIfTI, NRRD, MHA/MHD or a DICOM series folder.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Output folder: similarity.safetensors, model_card.json, checkpoint.pt, log.csv."
        ),
    ],
    camera: Annotated[
        Path | None,
        typer.Option(
            "--camera",
            help="Detector intrinsics JSON (Intrinsics.save); default the synthetic benchmark's mobile C-arm "
            "(1020 mm, 298 mm panel).",
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Optimiser steps [default: 2000; with --minutes alone, the budget ends training]."),
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option(
            help="Wall-clock budget (resumptions included): stop, checkpoint and write the model when spent; "
            "the learning-rate decay follows the time."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="(start, truth) pose pairs per step.")] = 4,
    image_size: Annotated[int, typer.Option(help="Detector images resampled to this side, pixels.")] = 64,
    volume_size: Annotated[int, typer.Option(help="Largest voxels per axis of the network's CT.")] = 64,
    n_samples: Annotated[int, typer.Option(help="Projective-transformer samples per ray.")] = 96,
    channels: Annotated[int, typer.Option(help="Channels of the learned feature volume.")] = 3,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2e-4,
    rotation_sigma: Annotated[
        float, typer.Option(help="Start-pose rotation offset, std per axis, degrees.")
    ] = 9.5,
    translation_sigma: Annotated[
        float, typer.Option(help="Start-pose translation offset, std per axis, mm.")
    ] = 22.0,
    augment_strength: Annotated[
        float, typer.Option(help="Domain randomisation of the fixed DRRs (0: none, 1: nominal).")
    ] = 1.0,
    checkpoint_every: Annotated[int, typer.Option(help="Write the checkpoint every N steps.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation, poses and augmentation.")] = 0,
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")] = "auto",
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue from OUT/checkpoint.pt when present.")
    ] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train ProST's learned similarity (double-backward direction loss) on DRRs of --ct around C-arm poses."""
    from ..datasets.synthetic import mobile_carm_intrinsics
    from ..geometry import Intrinsics
    from ..io import read_volume
    from ..learning import AugmentConfig, SimilarityConfig, SimilarityTrainingConfig, train_similarity

    try:
        steps, max_seconds = _training_budget(steps, minutes, 2000)
        config = SimilarityTrainingConfig(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=min(50, max(0, steps // 10)),
            rotation_sigma_deg=rotation_sigma,
            translation_sigma_mm=translation_sigma,
            augment=AugmentConfig(strength=augment_strength),
            checkpoint_every=checkpoint_every,
            seed=seed,
            device=device,
            max_seconds=max_seconds,
        )
        model_config = SimilarityConfig(
            image_size=image_size, volume_size=volume_size, n_samples=n_samples, volume_channels=channels
        )
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a folder")
        intr = mobile_carm_intrinsics(256) if camera is None else Intrinsics.load(camera)
        volume = read_volume(ct)
        result = train_similarity(volume, intr, out, config, model_config, resume=resume, progress=progress)
    except XrayposeError as exc:
        _fail(str(exc))
    console.print(
        f"wrote {out / 'similarity.safetensors'}: {result.steps} steps"
        + (f" (resumed at {result.resumed_from})" if result.resumed_from is not None else "")
        + (", time budget spent" if result.card.get("stopped_by") == "time_budget" else "")
        + f", final direction loss {result.final_loss:.4f}, {result.wall_time_s:.1f} s",
        soft_wrap=True,
    )
