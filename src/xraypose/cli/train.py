"""``xraypose train``: train a pose regression network on DRRs of one CT (patient-specific), of several CTs
(patient-agnostic pretraining) or finetune a trained one on a new CT (a thin layer over
:func:`xraypose.learning.training.train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError, XrayposeError
from . import _fail, _training_budget, app, console


def _parse_weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise InputError(
            f"--ct-weights: expected {n} comma-separated numbers (one per CT, in the order --ct then --ct-dir), "
            f"got {text!r}"
        )
    return values


def _resolve(name: str, given: object, pretrained: object | None, default: object) -> object:
    """An architecture option: the given value, else the pretrained model's, else the default; a given value
    that differs from the pretrained model's is an error."""
    if pretrained is not None and given is not None and given != pretrained:
        raise InputError(
            f"--{name.replace('_', '-')} {given}: the model of --init-model has {name} {pretrained}; finetuning "
            "keeps the pretrained architecture (leave the option out)"
        )
    if given is not None:
        return given
    return pretrained if pretrained is not None else default


@app.command("train")
def train_command(
    camera: Annotated[
        Path, typer.Option("--camera", help="Detector intrinsics JSON (as written by Intrinsics.save).")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Output folder: model.safetensors, model_card.json, checkpoint.pt, log.csv."
        ),
    ],
    ct: Annotated[
        list[Path] | None,
        typer.Option(
            "--ct",
            help="CT volume: NIfTI, NRRD, MHA/MHD or a DICOM series folder; repeat (or add --ct-dir) to pretrain "
            "over several CTs.",
            show_default=False,
        ),
    ] = None,
    ct_dir: Annotated[
        Path | None,
        typer.Option(
            "--ct-dir",
            help="Folder of CTs for patient-agnostic pretraining: volume files, <name>/ct.nii.gz subfolders "
            "(labels.nii.gz beside), DICOM series folders.",
        ),
    ] = None,
    ct_weights: Annotated[
        str | None,
        typer.Option(
            "--ct-weights", help="Sampling weights of the CTs, e.g. '2,1,1' (order: --ct, then --ct-dir's)."
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="Label map of the (single) --ct: the anatomy centre is the labels' centroid."),
    ] = None,
    init_model: Annotated[
        Path | None,
        typer.Option(
            "--init-model", help="Finetune this trained model folder (its weights, normaliser, poses)."
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            help="Optimiser steps [default: 10000; with --minutes alone, the budget ends training]."
        ),
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option(
            help="Wall-clock budget (resumptions included): stop, checkpoint and write the model when spent; "
            "the learning-rate decay and the stages follow the time."
        ),
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(help="timm CNN backbone, e.g. resnet18, efficientnet_b0 [default: resnet18]."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Global batch size (DRRs per step).")] = 8,
    image_size: Annotated[
        int | None, typer.Option(help="Training image side, pixels [default: 128].")
    ] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    norm: Annotated[
        str | None, typer.Option(help="'batch' or 'group' normalisation in the backbone [default: batch].")
    ] = None,
    attention: Annotated[
        bool | None,
        typer.Option(
            "--attention/--no-attention",
            help="Self-attention block with 2D positional embedding on the feature map [default: off].",
            show_default=False,
        ),
    ] = None,
    autoencoder: Annotated[
        bool | None,
        typer.Option(
            "--autoencoder/--no-autoencoder",
            help="Regularised autoencoder branch (decoder reconstructs the input) [default: off].",
            show_default=False,
        ),
    ] = None,
    incremental: Annotated[
        bool,
        typer.Option(
            "--incremental/--no-incremental",
            help="Incremental stages (pose range and augmentation widen); off: one stage at full range.",
        ),
    ] = True,
    crop_probability: Annotated[
        float, typer.Option(help="Probability of rendering a random sub-box of the CT.")
    ] = 0.0,
    crop_min_mm: Annotated[float, typer.Option(help="Smallest side of a crop box, mm.")] = 100.0,
    checkpoint_every: Annotated[int, typer.Option(help="Write the checkpoint every N steps.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation, poses and augmentation.")] = 0,
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")] = "auto",
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue from OUT/checkpoint.pt when present.")
    ] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train a pose regressor (DiffPose-style) on DRRs rendered at random C-arm poses: on one CT, pretrained over
    several (--ct-dir / repeated --ct), or finetuned from --init-model."""
    from ..geometry import Intrinsics
    from ..io import find_cts, read_volume
    from ..learning import PoseRegressorConfig, TrainingConfig, load_trained_model, train

    try:
        paths: list[tuple[Path, Path | None]] = [(p, None) for p in (ct or [])]
        if ct_dir is not None:
            paths += find_cts(ct_dir)
        if not paths:
            raise InputError(
                "give the CT with --ct CT (repeat it, or use --ct-dir DIR, to pretrain over several)"
            )
        if labels is not None:
            if len(paths) != 1 or ct_dir is not None:
                raise InputError(
                    "--labels: only with a single --ct (CTs of --ct-dir take labels.<ext> beside them)"
                )
            paths = [(paths[0][0], labels)]
        weights = _parse_weights(ct_weights, len(paths))
        if weights is not None and len(paths) == 1:
            raise InputError("--ct-weights: only with several CTs")
        steps, max_seconds = _training_budget(steps, minutes, 10000)
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a folder")
        pretrained = load_trained_model(init_model) if init_model is not None else None
        pre = pretrained.model.config if pretrained is not None else None
        size = _resolve("image_size", image_size, pre.image_size if pre else None, 128)
        config = TrainingConfig(
            steps=steps,
            batch_size=batch_size,
            image_size=size,  # type: ignore[arg-type]
            lr=lr,
            checkpoint_every=checkpoint_every,
            seed=seed,
            device=device,
            warmup_steps=min(100, max(0, steps // 10)),
            crop_probability=crop_probability,
            crop_min_mm=crop_min_mm,
            **({} if incremental else {"stages": ((1.0, 1.0, 1.0),)}),
            max_seconds=max_seconds,
        )
        model_config = PoseRegressorConfig(
            backbone=_resolve("backbone", backbone, pre.backbone if pre else None, "resnet18"),  # type: ignore[arg-type]
            norm=_resolve("norm", norm, pre.norm if pre else None, "batch"),  # type: ignore[arg-type]
            attention=_resolve("attention", attention, pre.attention if pre else None, False),  # type: ignore[arg-type]
            autoencoder=_resolve("autoencoder", autoencoder, pre.autoencoder if pre else None, False),  # type: ignore[arg-type]
            image_size=size,  # type: ignore[arg-type]
            **(
                {}
                if pre is None
                else {
                    k: getattr(pre, k)
                    for k in (
                        "in_chans",
                        "attention_heads",
                        "autoencoder_weight",
                        "autoencoder_latent_weight",
                        "head_hidden",
                    )
                }
            ),
        )
        intr = Intrinsics.load(camera)
        volumes = [read_volume(p, labels=lab) for p, lab in paths]
        result = train(
            volumes[0] if len(volumes) == 1 else volumes,
            intr,
            out,
            config,
            model_config,
            ct_weights=weights,
            init_model=pretrained,
            resume=resume,
            progress=progress,
        )
    except XrayposeError as exc:
        _fail(str(exc))
    card = result.card
    what = {
        "pretrained": f"pretrained over {len(card['cts'])} CTs",
        "finetuned": "finetuned",
        "patient-specific": "patient-specific",
    }[card["kind"]]
    console.print(
        f"wrote {out / 'model.safetensors'}: {result.steps} steps, {what}"
        + (f", resumed at {result.resumed_from}" if result.resumed_from is not None else "")
        + (", time budget spent" if card.get("stopped_by") == "time_budget" else "")
        + f", final loss {result.final_loss:.4f}, {result.wall_time_s:.1f} s",
        soft_wrap=True,
    )
