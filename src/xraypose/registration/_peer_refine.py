"""Peer refinement: a DiffPose- or xvr-style test-time pose optimisation on DiffDRR 0.6.1 or nanodrr 0.1.7.

A standalone script, run by :class:`xraypose.registration.benchmark.PeerRefinement` with the peers' Python
(``bash ../shared/tools/setup-peers.sh`` prints it). It imports only the standard library, numpy, torch and
(inside the functions that need them) diffdrr / nanodrr and their own dependencies, never xraypose: every
geometric quantity is computed by xraypose (:mod:`xraypose.geometry.diffdrr`) and arrives here in the peer's
own conventions. Usage::

    PEER_PYTHON _peer_refine.py SPEC.json

``SPEC.json`` (written by the parent):

- ``mode``: ``"refine"`` (default) or ``"render"`` (render the initial pose once, for convention checks);
- ``recipe`` (``"diffpose"`` | ``"xvr"``), ``renderer`` (``"diffdrr"`` | ``"nanodrr"``) and ``settings``
  (the recipe's settings with the parent's overrides, see :data:`RECIPES` and :func:`resolve_settings`);
- ``ct``: path of the CT file (HU) and ``orientation`` (given to ``diffdrr.data.read``, ``"AP"``);
- ``target``: ``.npy`` float32 ``(rows, cols)`` ``−ln(I/I0)`` image in the peer's own pixel order;
- ``diffdrr_detector``: ``DRR`` keyword arguments of the full detector (``sdd, height, width, delx, dely, x0,
  y0, reverse_x_axis``); ``nanodrr_intrinsics``: ``sdd, delx, dely, x0, y0, height, width``;
- ``init``: the initial pose, ``(4, 4)``: for DiffDRR its pose matrix ``M`` (``diffdrr.pose`` convention, in
  DiffDRR's centred world), for nanodrr the camera-to-world ``rt_inv`` in the same centred world;
- ``device``, ``threads``, ``seed``; ``out`` (result JSON) and, for ``render``, ``out_image`` (``.npy``).

The result JSON (written atomically) has ``ok``; on success ``pose`` (``(4, 4)``, same convention as
``init``), ``seconds`` (the optimisation only: from the first rendered step to the final pose, CT loading
excluded), ``load_seconds``, ``iterations``, ``loss`` and ``initial_loss`` (``1 − similarity`` of the final
and the initial pose at the last stage's detector), ``stop_reason``, ``diverged``, ``stages`` (per stage:
detector size, steps run, last loss), ``settings`` (what actually ran), ``versions``, ``trace`` (the
similarity of every step, before its update) and, when the spec asks with ``trace_poses: true``, the pose
before every step (same convention as ``init``); on failure ``error`` and ``traceback``.

Recipes (:data:`RECIPES`):

- ``diffpose``: DiffPose's test-time optimisation (``experiments/deepfluoro/register.py``): the full pose in
  DiffDRR's ``se3_log_map`` parameters (the global chart, as DiffPose's ``SparseRegistration``), Adam
  (maximise) with lr 7.5e-3 (rotation) and 7.5 (translation), StepLR ×0.9 every 25 steps, 500 steps,
  full-detector Siddon renders, similarity ``0.5 NCC + 0.5 NCC over 13×13 patches`` (DiffDRR's
  ``MultiscaleNormalizedCrossCorrelation2d([None, 13], [0.5, 0.5])``), DiffDRR density with DiffPose's
  DeepFluoro bone attenuation multiplier 2.5; the last pose is returned.
- ``xvr``: xvr's multiscale refinement (``xvr register``; nanodrr's ``Registration``): a correction
  ``T = rt_inv · P · exp(so3_log ω, t) · P⁻¹`` about the volume's centre ``P``, stages of 64 then 128 detector
  rows with 150 and 100 Adam steps (maximise), lr 1e-2 rad and 1 mm divided by 2^stage, ReduceLROnPlateau
  (factor 0.1, patience 5, threshold 1e-4) and a stage's early stop at its second reduction (xvr's count,
  ``max_n_plateaus = 2``), images standardised, resized and normalised (``XrayTransforms``: min-max, bilinear
  antialiased resize, (x − 0.15)/0.1),
  similarity ``0.5 mNCC([None, 9]) + 0.5 gradient NCC over 11×11 patches`` (σ = 0), trilinear renders with
  500 samples per ray, nanodrr's HU → μ; the last pose is returned. On DiffDRR (``renderer="diffdrr"``) the
  pose is DiffDRR's ``se3_log_map`` of the full pose (xvr's DiffDRR-era ``Pose``) and the density DiffDRR's.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
import time
import traceback
from typing import Any

import numpy as np
import torch

#: Default settings of each recipe (see the module docstring); ``sizes`` are detector rows per stage (``None``:
#: the full detector), ``iterations`` Adam steps per stage.
RECIPES: dict[str, dict[str, Any]] = {
    "diffpose": {
        "renderer": "diffdrr",
        "render_method": "siddon",
        "n_samples": 500,  # trilinear only
        "sizes": [None],
        "iterations": [500],
        "lr_rot": 7.5e-3,
        "lr_xyz": 7.5,
        "lr_stage_divisor": 1.0,
        "scheduler": "step",
        "step_size": 25,
        "gamma": 0.9,
        "similarity": "mncc13",
        "parameterization": "se3_log_map",
        "bone_attenuation_multiplier": 2.5,
        "image_transform": "diffpose",
    },
    "xvr": {
        "renderer": "nanodrr",
        "render_method": "trilinear",
        "n_samples": 500,
        "sizes": [64, 128],
        "iterations": [150, 100],
        "lr_rot": 1e-2,
        "lr_xyz": 1.0,
        "lr_stage_divisor": 2.0,
        "scheduler": "plateau",
        "factor": 0.1,
        "patience": 5,
        "threshold": 1e-4,
        "max_n_plateaus": 2,
        "similarity": "gmncc",
        "parameterization": "so3_log_about_centre",
        "bone_attenuation_multiplier": 1.0,  # DiffDRR density (renderer="diffdrr" only)
        "image_transform": "xvr",
    },
}

RENDERERS = ("diffdrr", "nanodrr")
RENDER_METHODS = ("siddon", "trilinear")


class SpecError(ValueError):
    """A spec or a setting the script cannot run."""


# --------------------------------------------------------------------------------------------------
# Settings and geometry (no peer package needed)
# --------------------------------------------------------------------------------------------------


def resolve_settings(recipe: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings a recipe runs with: :data:`RECIPES` updated by ``overrides``, checked and normalised.

    ``iterations`` may be one integer (every stage) or one per stage; ``sizes`` a list of detector rows (or
    ``None`` for the full detector) per stage, or one value. With ``renderer="diffdrr"`` an xvr recipe uses
    DiffDRR's ``se3_log_map`` chart; nanodrr renders trilinear only.

    Raises:
        SpecError: unknown recipe or setting, inconsistent stages, a renderer/method the peer lacks.
    """
    if recipe not in RECIPES:
        raise SpecError(f"unknown recipe {recipe!r}; expected one of {sorted(RECIPES)}")
    out = copy.deepcopy(RECIPES[recipe])
    for key, value in (overrides or {}).items():
        if key not in out:
            raise SpecError(f"recipe {recipe!r}: unknown setting {key!r}; known: {sorted(out)}")
        if value is not None:
            out[key] = value
    if out["renderer"] not in RENDERERS:
        raise SpecError(f"renderer: expected one of {RENDERERS}, got {out['renderer']!r}")
    if out["render_method"] not in RENDER_METHODS:
        raise SpecError(f"render_method: expected one of {RENDER_METHODS}, got {out['render_method']!r}")
    if out["renderer"] == "nanodrr" and out["render_method"] != "trilinear":
        raise SpecError("nanodrr renders trilinear only (render_method='trilinear')")
    if recipe == "xvr" and out["renderer"] == "diffdrr":
        out["parameterization"] = "se3_log_map"
    sizes = out["sizes"]
    sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
    if not sizes:
        raise SpecError("sizes: expected at least one stage")
    for s in sizes:
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 8):
            raise SpecError(f"sizes: expected detector rows >= 8 (or None for the full detector), got {s!r}")
    iters = out["iterations"]
    iters = list(iters) if isinstance(iters, (list, tuple)) else [iters] * len(sizes)
    if len(iters) != len(sizes):
        raise SpecError(
            f"iterations: {len(iters)} value(s) {iters} for {len(sizes)} stage(s) {sizes}; give one per stage "
            "or a single number"
        )
    for n in iters:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise SpecError(f"iterations: expected non-negative integers, got {n!r}")
    n_samples = out["n_samples"]
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise SpecError(f"n_samples: expected an integer >= 2, got {n_samples!r}")
    out["sizes"], out["iterations"] = sizes, iters
    return out


def stage_detector(detector: dict[str, Any], rows: int | None) -> dict[str, Any]:
    """The full detector ``detector`` (``height, width, delx, dely`` and the rest) re-sampled to ``rows``
    rows (``None``: unchanged): the same physical extent and principal point, ``width`` rounded to keep the
    aspect ratio, pixel spacings scaled so that ``height·dely`` and ``width·delx`` stay the same."""
    out = dict(detector)
    if rows is None or rows == detector["height"]:
        return out
    h, w = int(detector["height"]), int(detector["width"])
    cols = max(1, round(w * rows / h))
    out.update(
        height=int(rows),
        width=cols,
        delx=float(detector["delx"]) * w / cols,
        dely=float(detector["dely"]) * h / rows,
    )
    return out


def resize_image(image: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``(B, 1, H, W)`` → ``(B, 1, rows, cols)``, bilinear with antialiasing (torchvision ``Resize``)."""
    if tuple(image.shape[-2:]) == (rows, cols):
        return image
    return torch.nn.functional.interpolate(
        image, size=(rows, cols), mode="bilinear", align_corners=False, antialias=True
    )


def minmax(image: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x − min) / (max − min + eps)`` over the whole tensor (DiffPose's / xvr's ``Standardize``)."""
    return (image - image.min()) / (image.max() - image.min() + eps)


def prepare_target(target: torch.Tensor, transform: str, rows: int, cols: int) -> torch.Tensor:
    """The target as the recipe compares it: DiffPose min-max normalises, resizes and standardises
    ((x − 0.3080)/0.1494) the X-ray only; xvr standardises, resizes and normalises ((x − 0.15)/0.1)."""
    if transform == "diffpose":
        return (resize_image(minmax(target, 1e-6), rows, cols) - 0.3080) / 0.1494
    if transform == "xvr":
        return (resize_image(minmax(target, 1e-6), rows, cols) - 0.15) / 0.1
    raise SpecError(f"image_transform: expected 'diffpose' or 'xvr', got {transform!r}")


def prepare_render(image: torch.Tensor, transform: str) -> torch.Tensor:
    """A rendered DRR as the recipe compares it (DiffPose: raw; xvr: the same transform as the target)."""
    if transform == "xvr":
        return (minmax(image, 1e-6) - 0.15) / 0.1
    return image


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file in the same folder and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, allow_nan=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def versions() -> dict[str, str | None]:
    """Installed versions of torch and the peers (``None`` where missing), without importing them."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "diffdrr", "nanodrr"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------------------------------
# Similarities
# --------------------------------------------------------------------------------------------------


def similarity(name: str, renderer: str, device: torch.device) -> torch.nn.Module:
    """The recipe's image similarity (higher is better), from the package it was published with."""
    if name == "mncc13":
        from diffdrr.metrics import MultiscaleNormalizedCrossCorrelation2d

        return MultiscaleNormalizedCrossCorrelation2d([None, 13], [0.5, 0.5]).to(device)
    if name == "gmncc":
        if renderer == "nanodrr":
            from nanodrr.metrics import GradientNormalizedCrossCorrelation2d as GNCC
            from nanodrr.metrics import MultiscaleNormalizedCrossCorrelation2d as MNCC
        else:
            from diffdrr.metrics import GradientNormalizedCrossCorrelation2d as GNCC
            from diffdrr.metrics import MultiscaleNormalizedCrossCorrelation2d as MNCC

        class GradientMultiscaleNCC(torch.nn.Module):
            """xvr's ``gmncc``: ``0.5 · mNCC([None, 9], [0.5, 0.5]) + 0.5 · gradient NCC(11×11, σ = 0)``."""

            def __init__(self) -> None:
                super().__init__()
                self.mncc = MNCC([None, 9], [0.5, 0.5])
                self.gncc = GNCC(11, 0.0)

            def forward(self, true: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
                return 0.5 * self.mncc(true, pred) + 0.5 * self.gncc(true, pred)

        return GradientMultiscaleNCC().to(device)
    raise SpecError(f"similarity: expected 'mncc13' or 'gmncc', got {name!r}")


# --------------------------------------------------------------------------------------------------
# Peers: a stage model renders the current pose at a stage's detector and exposes its parameters
# --------------------------------------------------------------------------------------------------


class _DiffDRRModel:
    """DiffDRR: the pose ``(rotation, translation)`` in a DiffDRR parameterization of the full pose."""

    def __init__(self, spec: dict[str, Any], settings: dict[str, Any], device: torch.device) -> None:
        from diffdrr.data import read
        from diffdrr.pose import RigidTransform

        self.settings = settings
        self.device = device
        self.subject = read(
            spec["ct"],
            orientation=spec.get("orientation", "AP"),
            bone_attenuation_multiplier=float(settings["bone_attenuation_multiplier"]),
        )
        self.detector = dict(spec["diffdrr_detector"])
        self.parameterization = settings["parameterization"]
        self.convention = "ZXY" if self.parameterization == "euler_angles" else None
        init = torch.tensor(spec["init"], dtype=torch.float32, device=device).reshape(1, 4, 4)
        rot, xyz = RigidTransform(init).convert(self.parameterization, self.convention)
        self.rot = torch.nn.Parameter(rot.detach().clone())
        self.xyz = torch.nn.Parameter(xyz.detach().clone())
        self.drr: Any = None
        self.render_kwargs: dict[str, Any] = {}

    def set_stage(self, rows: int | None) -> tuple[int, int]:
        from diffdrr.drr import DRR

        det = stage_detector(self.detector, rows)
        self.render_kwargs = {}
        if self.settings["render_method"] == "trilinear":
            self.render_kwargs = {"n_points": int(self.settings["n_samples"])}
        self.drr = DRR(self.subject, renderer=self.settings["render_method"], **det).to(self.device)
        return int(det["height"]), int(det["width"])

    def parameters(self) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        return self.rot, self.xyz

    def render(self) -> torch.Tensor:
        return self.drr(
            self.rot,
            self.xyz,
            parameterization=self.parameterization,
            convention=self.convention,
            **self.render_kwargs,
        )

    def pose(self) -> torch.Tensor:
        from diffdrr.pose import convert

        with torch.no_grad():
            return convert(
                self.rot, self.xyz, parameterization=self.parameterization, convention=self.convention
            ).matrix


class _NanoDRRModel:
    """nanodrr: its ``Registration`` module (a correction about the volume's centre, ``so3_log``)."""

    def __init__(self, spec: dict[str, Any], settings: dict[str, Any], device: torch.device) -> None:
        from diffdrr.data import read
        from nanodrr.data import Subject
        from nanodrr.registration import Registration
        from torchio import ScalarImage

        self.settings = settings
        self.device = device
        # DiffDRR's centred world (the one the parent converted the pose to), the CT's HU and nanodrr's own
        # HU → μ conversion (as xvr's load_subject).
        dd = read(spec["ct"], orientation=spec.get("orientation", "AP"))
        image = ScalarImage(tensor=dd.volume.data, affine=dd.volume.affine)
        self.subject = Subject.from_images(image).to(device)
        k = dict(spec["nanodrr_intrinsics"])
        self.detector = {
            "sdd": float(k["sdd"]),
            "height": int(k["height"]),
            "width": int(k["width"]),
            "delx": float(k["delx"]),
            "dely": float(k["dely"]),
            "x0": float(k["x0"]),
            "y0": float(k["y0"]),
        }
        rt_inv = torch.tensor(spec["init"], dtype=torch.float32, device=device).reshape(1, 4, 4)
        k_inv = self._k_inv(self.detector)
        sdd = torch.tensor([self.detector["sdd"]], dtype=torch.float32, device=device)
        self.reg = Registration(
            self.subject, rt_inv, k_inv, sdd, self.detector["height"], self.detector["width"]
        ).to(device)

    def _k_inv(self, det: dict[str, Any]) -> torch.Tensor:
        from nanodrr.camera import make_k_inv

        return make_k_inv(
            det["sdd"], det["delx"], det["dely"], det["x0"], det["y0"], det["height"], det["width"]
        ).to(dtype=torch.float32, device=self.device)

    def set_stage(self, rows: int | None) -> tuple[int, int]:
        det = stage_detector(self.detector, rows)
        with torch.no_grad():
            self.reg.k_inv.copy_(self._k_inv(det))
        self.reg.height, self.reg.width = int(det["height"]), int(det["width"])
        return self.reg.height, self.reg.width

    def parameters(self) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        return self.reg._rot, self.reg._xyz

    def render(self) -> torch.Tensor:
        return self.reg(n_samples=int(self.settings["n_samples"]))

    def pose(self) -> torch.Tensor:
        with torch.no_grad():
            return self.reg.pose


def _model(spec: dict[str, Any], settings: dict[str, Any], device: torch.device) -> Any:
    if settings["renderer"] == "diffdrr":
        return _DiffDRRModel(spec, settings, device)
    return _NanoDRRModel(spec, settings, device)


# --------------------------------------------------------------------------------------------------
# The optimisation
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def refine(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the spec's recipe; return the result fields (see the module docstring)."""
    settings = resolve_settings(spec["recipe"], spec.get("settings"))
    device = torch.device(spec.get("device") or "cpu")
    torch.manual_seed(int(spec.get("seed", 0)))
    target_np = np.load(spec["target"]).astype(np.float32)
    if target_np.ndim != 2:
        raise SpecError(f"target: expected a 2D image, got shape {target_np.shape}")
    target = torch.from_numpy(target_np).to(device)[None, None]

    t0 = time.perf_counter()
    model = _model(spec, settings, device)
    _sync(device)
    load_seconds = time.perf_counter() - t0

    sim = similarity(settings["similarity"], settings["renderer"], device)
    transform = settings["image_transform"]
    rot, xyz = model.parameters()
    stages: list[dict[str, Any]] = []
    stop_reason, diverged, total = "iterations", False, 0
    trace: list[float] = []
    trace_poses: list[Any] | None = [] if spec.get("trace_poses") else None
    last_good = (rot.detach().clone(), xyz.detach().clone())

    _sync(device)
    t_start = time.perf_counter()
    for stage, (rows, n_iters) in enumerate(zip(settings["sizes"], settings["iterations"], strict=True)):
        h, w = model.set_stage(rows)
        true = prepare_target(target, transform, h, w)
        scale = float(settings["lr_stage_divisor"]) ** stage
        optimizer = torch.optim.Adam(
            [
                {"params": [rot], "lr": float(settings["lr_rot"]) / scale},
                {"params": [xyz], "lr": float(settings["lr_xyz"]) / scale},
            ],
            maximize=True,
        )
        if settings["scheduler"] == "step":
            scheduler: Any = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=int(settings["step_size"]), gamma=float(settings["gamma"])
            )
        else:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                "max",
                float(settings["factor"]),
                int(settings["patience"]),
                float(settings["threshold"]),
            )
        current_lr, n_plateaus, steps, value = math.inf, 0, 0, math.nan
        stage_stop = "iterations"
        for _ in range(n_iters):
            optimizer.zero_grad()
            score = sim(true, prepare_render(model.render(), transform)).mean()
            value = float(score.detach())
            if not math.isfinite(value):
                with torch.no_grad():
                    rot.copy_(last_good[0])
                    xyz.copy_(last_good[1])
                stage_stop, diverged = "diverged", True
                break
            last_good = (rot.detach().clone(), xyz.detach().clone())
            trace.append(value)
            if trace_poses is not None:
                trace_poses.append(model.pose().double().cpu().reshape(4, 4).tolist())
            score.backward()
            optimizer.step()
            steps += 1
            if settings["scheduler"] == "step":
                scheduler.step()
            else:
                scheduler.step(score.detach())
                lr = min(scheduler.get_last_lr())
                if lr < current_lr:
                    current_lr = lr
                    n_plateaus += 1
                if n_plateaus > int(settings["max_n_plateaus"]):
                    stage_stop = "plateau"
                    break
        total += steps
        stages.append({"rows": h, "cols": w, "iterations": steps, "similarity": value, "stop": stage_stop})
        stop_reason = stage_stop
        if diverged:
            break
    pose = model.pose()
    _sync(device)
    seconds = time.perf_counter() - t_start

    # Untimed: the recipe's loss of the initial and the final pose at the last stage's detector.
    with torch.no_grad():
        final = float(sim(true, prepare_render(model.render(), transform)).mean())
        rot0, xyz0 = _initial_params(spec, model)
        rot.copy_(rot0)
        xyz.copy_(xyz0)
        initial = float(sim(true, prepare_render(model.render(), transform)).mean())
    return {
        "pose": pose.double().cpu().reshape(4, 4).tolist(),
        "seconds": seconds,
        "load_seconds": load_seconds,
        "iterations": total,
        "loss": 1.0 - final,
        "initial_loss": 1.0 - initial,
        "stop_reason": stop_reason,
        "diverged": diverged,
        "stages": stages,
        "settings": settings,
        "trace": trace,
        **({"trace_poses": trace_poses} if trace_poses is not None else {}),
    }


def _initial_params(spec: dict[str, Any], model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameters of the initial pose in the model's chart."""
    if isinstance(model, _NanoDRRModel):
        return torch.zeros_like(model.reg._rot), torch.zeros_like(model.reg._xyz)
    from diffdrr.pose import RigidTransform

    init = torch.tensor(spec["init"], dtype=torch.float32, device=model.device).reshape(1, 4, 4)
    rot, xyz = RigidTransform(init).convert(model.parameterization, model.convention)
    return rot, xyz


def render_initial(spec: dict[str, Any]) -> dict[str, Any]:
    """Render the initial pose at the full detector with the recipe's renderer (convention checks)."""
    settings = resolve_settings(spec["recipe"], spec.get("settings"))
    device = torch.device(spec.get("device") or "cpu")
    model = _model(spec, settings, device)
    model.set_stage(None)
    with torch.no_grad():
        image = model.render()
    np.save(spec["out_image"], image.detach().float().cpu().numpy().reshape(image.shape[-2:]))
    return {"settings": settings, "pose": model.pose().double().cpu().reshape(4, 4).tolist()}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} SPEC.json", file=sys.stderr)
        return 2
    try:
        with open(argv[1]) as fh:
            spec = json.load(fh)
        out = spec["out"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"{argv[1]}: cannot read the spec: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"ok": False, "versions": versions()}
    try:
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        result["threads"] = torch.get_num_threads()
        if spec.get("mode", "refine") == "render":
            result.update(render_initial(spec))
        else:
            result.update(refine(spec))
        result["ok"] = True
    except Exception as exc:  # reported to the parent, which raises it as an XrayposeError
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    write_json_atomic(out, result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
