"""Run-keeping shared by the trainings of :mod:`xraypose.learning` (the pose regressor and the ProST similarity):
atomic checkpoints read back with ``weights_only=True``, the resume identity check, the CSV log, the progress
bar, RNG state, and the model card's CT / detector / version records."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_path, atomic_write_text
from ..errors import FileFormatError, InputError
from ..geometry.camera import Intrinsics
from ..io.volume import Volume

__all__ = [
    "append_log_row",
    "ct_record",
    "ct_sha256",
    "jsonable",
    "load_checkpoint",
    "physical_detector",
    "progress_bar",
    "restore_rng",
    "resume_from_checkpoint",
    "resume_mismatch",
    "rewrite_log",
    "rng_state",
    "save_checkpoint",
    "versions",
    "warmup_cosine",
]


def ct_sha256(ct: Volume) -> str:
    """SHA-256 (hex) of the CT's voxels as little-endian float32 HU in C order (shape and affine not included)."""
    data = ct.data.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return hashlib.sha256(data.astype("<f4", copy=False).tobytes()).hexdigest()


def ct_record(ct: Volume, sha: str | None = None) -> dict[str, Any]:
    """The model card's description of the training CT (checked by ``check_model_card``)."""
    return {
        "sha256": ct_sha256(ct) if sha is None else sha,
        "shape": list(ct.shape),
        "affine": ct.affine.detach().cpu().double().tolist(),
        "spacing_mm": ct.spacing.detach().cpu().tolist(),
        "source": ct.source,
    }


def versions() -> dict[str, str]:
    from .. import __version__

    out = {"xraypose": __version__, "torch": torch.__version__}
    try:
        import timm

        out["timm"] = timm.__version__
    except Exception:  # pragma: no cover - timm is a dependency
        out["timm"] = "unavailable"
    return out


def physical_detector(intr: Intrinsics) -> dict[str, float]:
    """The resolution-independent detector geometry (mm)."""
    return {
        "sdd": float(intr.sdd),
        "width_mm": intr.cols * intr.dx,
        "height_mm": intr.rows * intr.dy,
        "x0": float(intr.x0),
        "y0": float(intr.y0),
    }


def jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def save_checkpoint(path: Path, blob: dict[str, Any]) -> None:
    """Write ``blob`` (tensors and plain containers only) atomically."""
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_checkpoint(path: Path, device: torch.device, fmt: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``format == fmt`` (``weights_only=True``)."""
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise FileFormatError(
            f"{path}: cannot read the training checkpoint with torch.load(weights_only=True) ({exc}); delete it "
            "or train with resume=False"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise FileFormatError(f"{path}: not an xraypose training checkpoint")
    return blob


def resume_mismatch(
    blob: Mapping[str, Any], expected: Mapping[str, Any], resume_free: Iterable[str] = ()
) -> list[str]:
    """Keys of ``expected`` whose values differ in ``blob``; in ``"config"`` the fields in ``resume_free``
    (those that do not change the trained weights) are ignored and the differing fields are named."""
    free = set(resume_free)
    out = []
    for key, want in expected.items():
        have = blob.get(key)
        if key == "config" and isinstance(have, Mapping):
            have = {k: v for k, v in have.items() if k not in free}
            want = {k: v for k, v in want.items() if k not in free}
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            if diff:
                out.append("training config (" + ", ".join(diff) + ")")
        elif have != want:
            out.append(key)
    return out


def resume_from_checkpoint(
    path: Path,
    device: torch.device,
    fmt: str,
    identity: Mapping[str, Any],
    resume_free: Iterable[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> tuple[int, float, int | None, float]:
    """Load a checkpoint written by the same training into ``model``, ``optimizer``, ``scheduler`` and the
    RNG; ``(step, elapsed_s, resumed_from, last_loss)``, or ``(0, 0.0, None, nan)`` when there is none.

    A checkpoint of a different training (:func:`resume_mismatch` against ``identity``) is one clear error."""
    if not path.exists():
        return 0, 0.0, None, float("nan")
    blob = load_checkpoint(path, device, fmt)
    bad = resume_mismatch(blob, identity, resume_free)
    if bad:
        raise InputError(
            f"{path}: the checkpoint was written by a different training ({', '.join(bad)} differ); "
            "use another output folder or resume=False to start afresh"
        )
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    restore_rng(blob.get("rng", {}), device)
    start = int(blob["step"])
    return start, float(blob["elapsed_s"]), start, float(blob.get("last_loss", float("nan")))


def rewrite_log(path: Path, upto: int | None, fields: Sequence[str]) -> None:
    """Start the CSV log (``upto=None``) or keep the rows of steps ``<= upto`` of an existing one."""
    rows: list[dict[str, str]] = []
    if upto is not None and path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= upto]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in fields})
    atomic_write_text(path, buf.getvalue())


def append_log_row(path: Path, fields: Sequence[str], row: Mapping[str, Any]) -> None:
    with path.open("a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, fieldnames=list(fields), lineterminator="\n").writerow(row)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: Mapping[str, Any], device: torch.device) -> None:
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].cpu())
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


def progress_bar(label: str, *, enabled: bool, rate_unit: str = "img/s") -> Any:
    """A rich progress bar on stderr with ``loss`` and ``ips`` task fields (a no-op when not ``enabled``)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[ips]} " + rate_unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def budget_position(step: int, steps: int, elapsed_s: float, max_seconds: float) -> int:
    """The step a schedule of ``steps`` steps is at under a wall-clock budget of ``max_seconds`` (``<= 0``: no
    budget, ``step`` itself): the further along of ``step`` and ``steps · elapsed_s / max_seconds``, at most
    ``steps − 1``, so a run cut by its budget still ends its schedule."""
    if max_seconds <= 0:
        return step
    by_time = int(steps * min(1.0, max(0.0, elapsed_s) / max_seconds))
    return min(steps - 1, max(step, by_time))


def warmup_cosine(
    step: int, steps: int, warmup_steps: int, final_fraction: float, position: int | None = None
) -> float:
    """Learning-rate factor of ``step``: linear warm-up to 1 over ``warmup_steps``, then a cosine decay to
    ``final_fraction`` at the last step; the decay follows ``position`` instead where it is further along (a
    wall-clock budget's schedule position)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    pos = step if position is None else max(step, position)
    span = max(1, steps - warmup_steps - 1)
    t = min(1.0, (pos - warmup_steps) / span)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t))
