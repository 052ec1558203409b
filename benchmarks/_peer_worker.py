"""One benchmark case with a peer renderer (DiffDRR 0.6.1 or nanodrr 0.1.7), in its own process.

Runs under the peers' Python (``bash ../shared/tools/setup-peers.sh`` prints it) and imports nothing from
xraypose: ``benchmarks/render.py`` computes every geometric quantity through
``xraypose.geometry.diffdrr`` and passes it here as JSON. Usage::

    PEER_PYTHON benchmarks/_peer_worker.py SPEC.json

``SPEC.json`` holds ``renderer`` ("diffdrr" | "nanodrr"), ``method`` ("siddon" | "trilinear"), ``mode``
("forward" | "forward+backward"), ``ct`` (path), ``device``, ``warmup``, ``repeats``, ``threads``,
``diffdrr_detector`` (``DRR`` keyword arguments), ``rotation``/``translation`` (DiffDRR ``euler_angles``
``ZXY`` parameters, rad/mm), ``rt_inv_centred`` (our camera-to-world poses in DiffDRR's centred world,
which is nanodrr's camera convention), ``nanodrr_intrinsics`` (``sdd, delx, dely, x0, y0, height, width``),
``n_samples`` and the output paths ``out_json`` / ``out_npz``. The result JSON has ``ms`` (median),
``times_ms``, ``peak_mb`` and ``memory`` (how it was measured); the npz the first forward image
``(B, H, W)`` in the peer's own pixel order.

The timing and memory helpers here are also used by ``render.py`` for xraypose itself, so all renderers are
measured the same way.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

# --------------------------------------------------------------------------------------------------
# Measurement (shared with render.py)
# --------------------------------------------------------------------------------------------------


def _proc_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), e.g. VmRSS, VmHWM."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def set_threads(threads: int | None) -> int:
    """Use ``threads`` (default: all cores) for torch intra-op parallelism."""
    n = int(threads or os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def measure(
    step: Callable[[], torch.Tensor], warmup: int, repeats: int, device: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run ``step`` ``warmup`` times, then time ``repeats`` runs; return its first output and the stats.

    Memory: the extra memory of rendering, ``peak − baseline`` in MiB, over the warm-up and timed runs.
    On CUDA it is ``torch.cuda.max_memory_allocated`` above the allocation at the start. On CPU it is the
    resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` right after the case
    was set up; fallback ``getrusage().ru_maxrss``) minus the RSS at that moment. This is only meaningful
    because every case runs in a fresh process (the high-water mark is per process, and torch's allocator
    and glibc keep freed memory); ``tracemalloc`` would miss torch's C++ allocations entirely.
    """
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gc.collect()
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        how = "cuda max_memory_allocated"
    else:
        base_kb = _proc_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reset = _reset_peak_rss()
        how = "VmHWM - VmRSS (clear_refs)" if reset else "ru_maxrss delta"
    first = step()
    sync()
    for _ in range(max(warmup - 1, 0)):
        step()
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        hwm = _proc_kb("VmHWM") if reset else None
        peak_kb = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = max(peak_kb - base_kb, 0) / 1024
    stats = {
        "ms": statistics.median(times) if times else float("nan"),
        "times_ms": times,
        "peak_mb": peak_mb,
        "memory": how,
    }
    return first, stats


def run_protocol(spec_path: str, build: Callable[[dict[str, Any]], Callable[[], torch.Tensor]]) -> int:
    """Read the JSON spec, build the case's step function, measure it and write the results."""
    with open(spec_path) as fh:
        spec = json.load(fh)
    result: dict[str, Any] = {"ok": False}
    try:
        result["threads"] = set_threads(spec.get("threads"))
        step = build(spec)
        first, stats = measure(step, int(spec["warmup"]), int(spec["repeats"]), spec["device"])
        result.update(stats, ok=True)
        np.savez(spec["out_npz"], image=first.detach().float().cpu().numpy())
    except Exception as exc:  # reported to the parent, which prints it
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    with open(spec["out_json"], "w") as fh:
        json.dump(result, fh)
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------------


def _build_diffdrr(spec: dict[str, Any]) -> Callable[[], torch.Tensor]:
    from diffdrr.data import read
    from diffdrr.drr import DRR

    device = torch.device(spec["device"])
    subject = read(spec["ct"], orientation="AP", bone_attenuation_multiplier=1.0)
    drr = DRR(subject, renderer=spec["method"], **spec["diffdrr_detector"]).to(device)
    rot0 = torch.tensor(spec["rotation"], dtype=torch.float32, device=device)
    xyz0 = torch.tensor(spec["translation"], dtype=torch.float32, device=device)
    kwargs = {"n_points": int(spec["n_samples"])} if spec["method"] == "trilinear" else {}

    if spec["mode"] == "forward":

        def step() -> torch.Tensor:
            with torch.no_grad():
                return drr(rot0, xyz0, parameterization="euler_angles", convention="ZXY", **kwargs)[:, 0]

    else:

        def step() -> torch.Tensor:
            rot = rot0.clone().requires_grad_(True)
            xyz = xyz0.clone().requires_grad_(True)
            img = drr(rot, xyz, parameterization="euler_angles", convention="ZXY", **kwargs)[:, 0]
            img.sum().backward()
            return img

    return step


def _build_nanodrr(spec: dict[str, Any]) -> Callable[[], torch.Tensor]:
    from diffdrr.data import read
    from nanodrr.data import Subject
    from nanodrr.drr import DRR
    from torchio import ScalarImage

    device = torch.device(spec["device"])
    # Same density and centred affine as DiffDRR's subject; no HU -> mu conversion.
    dd = read(spec["ct"], orientation="AP", bone_attenuation_multiplier=1.0)
    image = ScalarImage(tensor=dd.density.data, affine=dd.density.affine)
    subject = Subject.from_images(image, convert_to_mu=False).to(device)
    k = spec["nanodrr_intrinsics"]
    drr = DRR.from_carm_intrinsics(
        k["sdd"],
        k["delx"],
        k["dely"],
        k["x0"],
        k["y0"],
        k["height"],
        k["width"],
        dtype=torch.float32,
        device=device,
    )
    rt0 = torch.tensor(spec["rt_inv_centred"], dtype=torch.float32, device=device)
    n = int(spec["n_samples"])
    backend = "auto"  # triton on CUDA when eligible, torch otherwise

    if spec["mode"] == "forward":

        def step() -> torch.Tensor:
            with torch.no_grad():
                return drr(subject, rt0, n_samples=n, backend=backend)[:, 0]

    else:

        def step() -> torch.Tensor:
            rt = rt0.clone().requires_grad_(True)
            img = drr(subject, rt, n_samples=n, backend=backend)[:, 0]
            img.sum().backward()
            return img

    return step


def build(spec: dict[str, Any]) -> Callable[[], torch.Tensor]:
    if spec["renderer"] == "diffdrr":
        return _build_diffdrr(spec)
    if spec["renderer"] == "nanodrr":
        return _build_nanodrr(spec)
    raise ValueError(f"unknown peer renderer {spec['renderer']!r}")


def peer_modules(python: str) -> dict[str, bool]:
    """Which peer renderers (diffdrr, nanodrr) the interpreter ``python`` can import (run on the xraypose side)."""
    code = (
        "import importlib.util as u, json; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in ('diffdrr', 'nanodrr')}))"
    )
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"diffdrr": False, "nanodrr": False}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} SPEC.json")
    sys.exit(run_protocol(sys.argv[1], build))
