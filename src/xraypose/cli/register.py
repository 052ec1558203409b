"""``xraypose register``: find the C-arm pose of one X-ray from an initial pose, given (``--init``) or predicted
by a trained network (``--model``, :func:`xraypose.learning.predict_initial_pose`), then refined (a thin layer
over :func:`xraypose.registration.register`)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import InputError, XrayposeError
from . import _check_out, _fail, _load_pose, _parse_prost_sigma, app, console


class RegisterPhysics(str, Enum):
    mono = "mono"
    poly = "poly"


class Refine(str, Enum):
    cmaes = "cmaes"
    gncc = "gncc"
    none = "none"


class Polarity(str, Enum):
    attenuation = "attenuation"
    intensity = "intensity"


def _prepare_xray(image: np.ndarray, polarity: Polarity) -> torch.Tensor:
    """X-ray values → the DRR's domain (bright = attenuating), as the network and the registration take them."""
    from ..io.images import to_line_integrals

    try:
        return to_line_integrals(image, polarity.value)
    except InputError as exc:
        raise InputError(f"--xray: {exc}") from None


def _euler_zyx_deg(R: torch.Tensor) -> list[float]:
    from ..geometry.rotations import matrix_to_euler

    return [math.degrees(float(a)) for a in matrix_to_euler(R.double(), "ZYX")]


@app.command("register")
def register_command(
    ct: Annotated[
        Path, typer.Option("--ct", help="CT volume: NIfTI, NRRD, MHA/MHD or a DICOM series folder.")
    ],
    xray: Annotated[Path, typer.Option("--xray", help="X-ray image: PNG/TIFF/NPY or single-frame DICOM.")],
    camera: Annotated[
        Path, typer.Option("--camera", help="Detector intrinsics JSON (as written by Intrinsics.save).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Result JSON.")],
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Initial camera-to-world 4×4 pose (.json/.npy/.txt), CT RAS world, mm (or give --model).",
        ),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            help="Trained model folder (xraypose train): the network predicts the initial pose (or give --init).",
        ),
    ] = None,
    allow_new_patient: Annotated[
        bool,
        typer.Option(
            "--allow-new-patient",
            help="With --model: use a patient-agnostic (pretrained) model on a CT it was not trained on.",
        ),
    ] = False,
    overlay: Annotated[
        Path | None, typer.Option(help="PNG: DRR edges on the X-ray before and after.")
    ] = None,
    animation: Annotated[Path | None, typer.Option(help="GIF: the optimisation, DRR edges per step.")] = None,
    physics: Annotated[
        RegisterPhysics, typer.Option(help="Renderer optimised through.")
    ] = RegisterPhysics.mono,
    polarity: Annotated[
        Polarity,
        typer.Option(
            help="attenuation: bright = attenuating (log-transformed / displayed radiographs); intensity: raw "
            "detector values, −log is taken."
        ),
    ] = Polarity.attenuation,
    loss: Annotated[
        str | None, typer.Option(help="ImageLoss spec for every level (default: the preset's).")
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            help="Registration settings: 'default' (search at 32 px, then 64 → 128 px) or 'fine' "
            "(polychromatic 128 and 256 px levels with Newton steps on the Poisson likelihood with a fitted "
            "scatter background: more accurate; needs −ln(I/I0) X-rays or --polarity intensity)."
        ),
    ] = "default",
    similarity: Annotated[
        Path | None,
        typer.Option(
            "--similarity",
            help="A train-similarity folder: descend ProST's learned similarity first, then --refine.",
        ),
    ] = None,
    refine: Annotated[
        Refine, typer.Option(help="With --similarity: hand over to CMA-ES, gradient-NCC descent or nothing.")
    ] = Refine.cmaes,
    prost_iterations: Annotated[
        int, typer.Option(help="With --similarity: at most this many learned-similarity steps.")
    ] = 200,
    prost_sigma: Annotated[
        str | None,
        typer.Option(
            help="With --similarity and --refine cmaes: the CMA-ES hand-over's initial σ, six numbers "
            "'rx,ry,rz,tx,ty,tz' in degrees and mm (default '5,5,10,15,15,30'; the cmaes baseline's is '15,15,30,50,50,100').",
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite outputs if they exist.")] = False,
) -> None:
    """Register an X-ray to a CT: optimise the C-arm pose from --init (or from the pose a trained --model predicts)
    and write it with the final similarity."""
    from ..geometry import Camera, Intrinsics
    from ..geometry.se3 import invert, se3_log
    from ..io import read_volume
    from ..io.images import load_image
    from ..registration import VolumeRenderer, register, register_prost
    from ..registration import preset as registration_preset

    try:
        if (init is None) == (model is None):
            raise InputError(
                "--init and --model are mutually exclusive: give exactly one (--init POSE.json, or --model "
                "MODEL_DIR to let a trained network predict the initial pose)"
            )
        if allow_new_patient and model is None:
            raise InputError("--allow-new-patient: only with --model")
        sigma = _parse_prost_sigma(prost_sigma)
        if sigma is not None and similarity is None:
            raise InputError("--prost-sigma: only with --similarity (the ProST pipeline)")
        if sigma is not None and refine is not Refine.cmaes:
            raise InputError("--prost-sigma: only with --refine cmaes (the CMA-ES hand-over)")
        _check_out(out, force, (".json",))
        if overlay is not None:
            _check_out(overlay, force, (".png",))
        if animation is not None:
            _check_out(animation, force, (".gif",))
        volume = read_volume(ct)
        intr = Intrinsics.load(camera)
        target = _prepare_xray(load_image(xray), polarity)
        if tuple(target.shape) != (intr.rows, intr.cols):
            raise InputError(
                f"--xray {xray}: image is {tuple(target.shape)} pixels but the camera {camera} has "
                f"{(intr.rows, intr.cols)} (rows, cols)"
            )
        network: dict[str, object] | None = None
        if model is not None:
            import warnings

            from ..learning import NetworkInitializer

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                initializer = NetworkInitializer(model, volume, intr, allow_new_patient=allow_new_patient)
            predicted = initializer(target)  # the X-ray already in the DRRs' polarity
            for w in caught:
                console.print(f"[yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)
            pose0 = predicted.pose.float()
            network = {
                "source": "model",
                "model": str(model),
                "pose_camera_to_world": predicted.pose[0].tolist(),
                "seconds": predicted.seconds,
                "model_kind": initializer.trained.card.get("kind", "patient-specific"),
            }
        else:
            assert init is not None
            pose0 = _load_pose(init)
        renderer = VolumeRenderer(volume, physics.value)
        prost = None
        if similarity is not None:
            from ..learning import check_model_card, load_similarity
            from ..registration import LearnedSimilarityRenderer, ProSTConfig

            trained = load_similarity(similarity)
            check_model_card(trained.card, volume, intr)
            prost = LearnedSimilarityRenderer(trained, volume)
            prost_config = ProSTConfig(refine=refine.value, iterations=prost_iterations)
            if sigma is not None:
                prost_config = replace(prost_config, cmaes=replace(prost_config.cmaes, sigma=sigma))
            if loss is not None:
                prost_config = replace(
                    prost_config,
                    cmaes=replace(prost_config.cmaes, loss=loss),
                    gncc=replace(prost_config.gncc, loss=loss),
                )
        elif refine is not Refine.cmaes:
            raise InputError("--refine: only with --similarity (the ProST pipeline)")
        config = registration_preset(preset)
        if loss is not None:  # the given loss for every level, also those with their own (the fine preset's)
            config = replace(config, loss=loss, scales=tuple(replace(s, loss=None) for s in config.scales))
        total = sum(s.iterations for s in config.scales)
        if config.search is not None:
            total += config.search.iterations
        with Progress(
            TextColumn("registering"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=console, transient=True,
        ) as bar:  # fmt: skip
            task = bar.add_task("register", total=None if prost is not None else total, loss="—")

            def tick(step, pose) -> None:
                bar.update(task, advance=1, loss=f"{float(step.loss[0]):.4f}")

            if prost is not None:
                result = register_prost(renderer, target, intr, pose0, prost, prost_config, callback=tick)
            else:
                result = register(renderer, target, intr, pose0, config, callback=tick)
        pose = result.pose[0].double()
        delta = invert(pose0[0].double()) @ pose
        record = {
            "pose_camera_to_world": pose.tolist(),
            "units": "mm (translations), degrees (angles); world = the CT's RAS frame",
            "translation_mm": pose[:3, 3].tolist(),
            "rotation_euler_zyx_deg": _euler_zyx_deg(pose[:3, :3]),
            "correction_se3_log": {
                "v_mm": se3_log(delta)[:3].tolist(),
                "omega_rad": se3_log(delta)[3:].tolist(),
            },
            "loss": float(result.loss[0]),
            "initial_loss": float(result.initial_loss[0]),
            "loss_spec": config.loss if isinstance(config.loss, str) else "custom",
            "preset": preset if prost is None else None,
            "method": "register" if prost is None else f"prost-{refine.value}",
            "similarity": None if similarity is None else str(similarity),
            "iterations": result.iterations,
            "seconds": result.seconds,
            "stop_reason": result.stop_reason,
            "diverged": bool(result.diverged[0]) if result.diverged is not None else False,
            "physics": physics.value,
            "ct": str(ct),
            "xray": str(xray),
            "initial_pose": network
            if network is not None
            else {"source": "file", "path": str(init), "pose_camera_to_world": pose0[0].double().tolist()},
        }
        if network is not None:
            record["network_seconds"] = network["seconds"]
        from .._atomic import atomic_write_text

        atomic_write_text(out, json.dumps(record, indent=2))
        if overlay is not None or animation is not None:
            from ..viz.overlay import save_overlay, save_registration_animation

            with torch.no_grad():
                if overlay is not None:
                    before = renderer(Camera(intr, pose0.float()))[0]
                    after = renderer(Camera(intr, result.pose.float()))[0]
                    save_overlay(overlay, target, before, after)
                if animation is not None:
                    idx = np.unique(np.linspace(0, result.poses.shape[0] - 1, 24).round().astype(int))
                    frames = [renderer(Camera(intr, result.poses[i].float()))[0] for i in idx]
                    labels = [f"step {i}" for i in idx]
                    save_registration_animation(animation, target, frames, labels=labels)
    except XrayposeError as exc:
        _fail(str(exc))
    console.print(
        (f"network initial pose in {record['network_seconds']:.2f} s; " if model is not None else "")
        + f"wrote {out}: loss {record['initial_loss']:.4f} → {record['loss']:.4f} in {result.iterations} steps, "
        f"{result.seconds:.1f} s ({result.stop_reason})"
    )
