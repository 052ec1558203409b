"""The registration benchmark runner: every method on every case, level and initial pose of a benchmark file.

:func:`run_benchmark` reads a synthetic benchmark (``docs/benchmark-format.md``), loads the CT it was made from,
binds it to a :class:`~xraypose.registration.VolumeRenderer` and runs each registration method from each
initial pose, timing it; every run becomes a :class:`~xraypose.metrics.CaseResult` (mTRE, mPD, mRPE against the
file's landmarks and true pose, rotation and translation errors overall and per axis, double geodesic error,
seconds, iterations, stop reason, initial mTRE). :func:`write_results` writes the per-run CSV, a Markdown
summary, the run's metadata (JSON) and two plots.

A **method** is a callable ``method(renderer, target, intrinsics, init_pose, *, seed=0) -> RegistrationResult``
(``target`` ``(1, rows, cols)`` float32 ``−ln(I/I0)``, ``init_pose`` ``(1, 4, 4)`` float32 camera-to-world, both
on the renderer's device); the result needs ``pose`` and may have ``iterations``, ``stop_reason``, ``loss``,
``initial_loss``, ``diverged``, ``seconds``. The default methods are the registry ``METHODS`` of
:mod:`xraypose.registration.baselines`; ``method_table`` replaces it.

**Peer rows.** :func:`peer_method` (or the names of :data:`PEER_METHODS` with ``peer_python=``) runs a
DiffPose-style refinement on DiffDRR 0.6.1 or an xvr-style one on nanodrr 0.1.7, in the peers' own virtual
environment (one process per run, ``_peer_refine.py``), on the same cases; every geometric conversion is done
here through :mod:`xraypose.geometry.diffdrr`. Their rows record the recipe's settings and the optimisation's
own seconds (``docs/registration.md``, "Peer refinement").
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import torch

from .._atomic import atomic_write_text
from ..errors import FileFormatError, InputError, XrayposeError
from ..metrics import DEFAULT_THRESHOLDS_MM, CaseResult, Summary, mtre, pose_errors, summarize, summarize_by
from ..metrics import summary_markdown as _summary_table

__all__ = [
    "NETWORK_LEVEL",
    "OUTPUT_FILES",
    "PEER_METHODS",
    "PEER_SCRIPT",
    "BenchmarkResults",
    "MethodFn",
    "PeerRefinement",
    "PeerResult",
    "check_outputs",
    "default_method_table",
    "level_label",
    "load_benchmark_ct",
    "peer_method",
    "read_results",
    "report_markdown",
    "run_benchmark",
    "write_results",
]

#: A registration method: ``(renderer, target, intrinsics, init_pose, *, seed=0) -> RegistrationResult``.
MethodFn = Callable[..., Any]

#: The files :func:`write_results` writes in its output folder.
OUTPUT_FILES: tuple[str, ...] = (
    "cases.csv",
    "summary.md",
    "summary.json",
    "metadata.json",
    "success_vs_initial_error.png",
    "mtre_cdf.png",
)

_DEFAULT_CT_PREFIX = "xraypose default CT"

#: The level label of the runs of ``run_benchmark(init="model")``: one network initial pose per case.
NETWORK_LEVEL = "network"


class BenchmarkResults(list):  # type: ignore[type-arg]
    """The :class:`~xraypose.metrics.CaseResult` records of a run (a plain ``list``), with the run's
    ``metadata`` (a JSON-ready dict: benchmark file, methods, physics, seed, machine…) for :func:`write_results`."""

    def __init__(self, records: Iterable[CaseResult] = (), metadata: Mapping[str, Any] | None = None) -> None:
        super().__init__(records)
        self.metadata: dict[str, Any] = dict(metadata or {})


# ---------------------------------------------------------------------------------------------- peers
#: The peer-side script (package data): runs under the peers' Python, imports nothing from xraypose.
PEER_SCRIPT = Path(__file__).with_name("_peer_refine.py")

#: Method names that run a peer refinement: name → (recipe, peer renderer).
PEER_METHODS: dict[str, tuple[str, str]] = {
    "peer-diffpose": ("diffpose", "diffdrr"),
    "peer-xvr": ("xvr", "nanodrr"),
    "peer-xvr-diffdrr": ("xvr", "diffdrr"),
}

_SETUP_PEERS = "bash ../shared/tools/setup-peers.sh"
_TEMP_DIRS: list[str] = []


def _remove_temp_dirs() -> None:
    import shutil

    while _TEMP_DIRS:
        shutil.rmtree(_TEMP_DIRS.pop(), ignore_errors=True)


atexit.register(_remove_temp_dirs)


def _peer_module() -> Any:
    from . import _peer_refine

    return _peer_refine


def _peer_settings(recipe: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    mod = _peer_module()
    try:
        return mod.resolve_settings(recipe, dict(overrides))
    except mod.SpecError as exc:
        raise InputError(f"peer recipe {recipe!r}: {exc}") from None


def _probe_peer_python(python: Path) -> dict[str, Any]:
    """Versions of torch, diffdrr and nanodrr in the peer interpreter (``None`` where missing)."""
    code = (
        "import json, importlib.metadata as m\n"
        "def v(n):\n"
        "    try:\n"
        "        return m.version(n)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        "print(json.dumps({n: v(n) for n in ('torch', 'diffdrr', 'nanodrr')}))\n"
    )
    try:
        proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        raise InputError(
            f"peer Python {python} does not run ({exc}); set it up with `{_SETUP_PEERS}`"
        ) from None
    lines = proc.stdout.strip().splitlines()
    try:
        found = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    except ValueError:
        found = None
    if not isinstance(found, dict):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InputError(
            f"peer Python {python} failed (exit code {proc.returncode}: {tail[0]}); set it up with `{_SETUP_PEERS}`"
        )
    return found


@dataclass(frozen=True)
class PeerResult:
    """What a :class:`PeerRefinement` returns (the fields :func:`run_benchmark` reads).

    Attributes:
        pose: ``(1, 4, 4)`` float32 camera-to-world pose (CT RAS world, our camera frame), on the target's
            device.
        iterations: optimisation steps run (all stages).
        loss, initial_loss: the recipe's ``1 − similarity`` of the final and the initial pose at its last
            stage's detector.
        stop_reason: ``"iterations"``, ``"plateau"`` (xvr's early stop) or ``"diverged"``.
        diverged: whether a non-finite similarity stopped the run (its last finite pose is returned).
        seconds: the optimisation only, measured in the peer process (CT loading and process start excluded).
        extra: recorded in the run's ``extra``: recipe, renderer, stages actually run, the peer's load time,
            the wall time of the whole call, threads, device.
    """

    pose: torch.Tensor
    iterations: int
    loss: float
    initial_loss: float
    stop_reason: str
    diverged: bool
    seconds: float
    extra: dict[str, Any]


@dataclass(frozen=True)
class PeerRefinement:
    """A registration method run by a peer implementation in its own Python (a separate virtual environment).

    Each call writes a work folder (the target as ``.npy`` in the peer's pixel order, the spec JSON with the
    detector and the initial pose converted to the peer's conventions through
    :mod:`xraypose.geometry.diffdrr`, the CT's path), runs ``python script spec.json``, reads back the
    peer-convention pose and converts it to our camera-to-world pose. The peer process loads the CT on every
    call; the result's ``seconds`` are the optimisation alone, as timed by the peer (:attr:`own_timing`), and
    the call's wall time goes to ``extra["peer_wall_seconds"]``. Recipes and settings: the docstring of
    ``xraypose/registration/_peer_refine.py`` and :func:`peer_method`, which builds and checks instances.

    The CT must be bound (:meth:`bind_ct`, done by :func:`run_benchmark`, or ``peer_method(..., ct=)``).

    Attributes:
        name: the method name it reports, e.g. ``"peer-xvr"``.
        python: the peer environment's Python interpreter.
        script: the peer-side script (default :data:`PEER_SCRIPT`).
        recipe: ``"diffpose"`` or ``"xvr"``.
        settings: overrides of the recipe's settings (``renderer``, ``iterations``, ``sizes``,
            ``render_method``, ``n_samples``, …).
        threads: torch threads of the peer process (default: this process's ``torch.get_num_threads()``).
        device: the peer's torch device (default: the target's).
        timeout_s: wall-clock limit of one call.
        orientation: ``orientation`` given to ``diffdrr.data.read``.
        ct_path, ct_affine, ct_shape: the bound CT (file, RAS affine as 16 numbers, grid size).
        versions: the peer's torch / diffdrr / nanodrr versions (recorded in the metadata).
        keep_workdir: keep each call's work folder (its path goes to ``extra["peer_workdir"]``).
    """

    name: str
    python: Path
    script: Path = PEER_SCRIPT
    recipe: str = "diffpose"
    settings: Mapping[str, Any] = field(default_factory=dict)
    threads: int | None = None
    device: str | None = None
    timeout_s: float = 7200.0
    orientation: str = "AP"
    ct_path: Path | None = None
    ct_affine: tuple[float, ...] | None = None
    ct_shape: tuple[int, int, int] | None = None
    versions: Mapping[str, Any] = field(default_factory=dict)
    keep_workdir: bool = False

    #: :func:`run_benchmark` records the method's own ``seconds`` (not the call's wall time).
    own_timing: ClassVar[bool] = True
    #: No untimed warm-up run: every call is a fresh process, a warm-up would warm nothing.
    warmup: ClassVar[bool] = False

    def resolved_settings(self) -> dict[str, Any]:
        """The recipe's settings with :attr:`settings` applied (what the peer will run)."""
        return _peer_settings(self.recipe, self.settings)

    def bind_ct(self, volume: Any, path: str | Path | None = None) -> PeerRefinement:
        """A copy bound to the CT ``volume`` read from ``path``; without a path (e.g. the bundled CT) the
        volume is written to a temporary NIfTI (removed at exit) for the peer to read."""
        from ..io import write_volume

        if path is None or not Path(path).is_file():
            folder = tempfile.mkdtemp(prefix="xraypose-peer-ct-")
            _TEMP_DIRS.append(folder)
            path = write_volume(volume, Path(folder) / "ct.nii.gz")
        affine = tuple(float(v) for v in volume.affine.detach().cpu().reshape(-1).tolist())
        shape = tuple(int(s) for s in volume.shape)
        return replace(self, ct_path=Path(path).resolve(), ct_affine=affine, ct_shape=shape)  # type: ignore[arg-type]

    def describe(self) -> dict[str, Any]:
        """The method's record for the run's metadata: recipe, the settings it runs, peer, versions."""
        return {
            "name": self.name,
            "recipe": self.recipe,
            "settings": self.resolved_settings(),
            "python": str(self.python),
            "script": str(self.script),
            "versions": dict(self.versions),
            "threads": self.threads or torch.get_num_threads(),
            "device": self.device or "the target's (the runner's device)",
            "timeout_s": self.timeout_s,
            "orientation": self.orientation,
            "ct": None if self.ct_path is None else str(self.ct_path),
            "timing": "seconds = the peer's optimisation loop (CT loading and process start excluded); "
            "extra.peer_wall_seconds = the whole call",
        }

    # ------------------------------------------------------------------ conventions
    def _frame(self) -> tuple[Any, tuple[int, int, int]]:
        import numpy as np

        if self.ct_affine is None or self.ct_shape is None or self.ct_path is None:
            raise InputError(
                f"method {self.name!r}: no CT bound; use bind_ct(volume, path) (run_benchmark does) or "
                "peer_method(..., ct=path)"
            )
        return np.asarray(self.ct_affine, dtype=np.float64).reshape(4, 4), self.ct_shape

    def to_peer_pose(self, pose: torch.Tensor, renderer: str) -> torch.Tensor:
        """Our ``(1, 4, 4)`` camera-to-world pose → the peer's ``(4, 4)`` float64 pose: DiffDRR's pose matrix
        ``M`` (``diffdrr.pose``) or nanodrr's ``rt_inv``, both in DiffDRR's centred world."""
        from ..geometry.diffdrr import diffdrr_isocenter, diffdrr_params_to_matrix, world_pose_to_diffdrr

        affine, shape = self._frame()
        p = pose.detach().to(device="cpu", dtype=torch.float64).reshape(1, 4, 4)
        if renderer == "diffdrr":
            rot, trans = world_pose_to_diffdrr(p, "matrix", None, affine, shape, self.orientation)
            return diffdrr_params_to_matrix(rot, trans, "matrix", None)[0]
        out = p[0].clone()
        out[:3, 3] -= diffdrr_isocenter(affine, shape)
        return out

    def from_peer_pose(self, peer_pose: torch.Tensor, renderer: str) -> torch.Tensor:
        """Inverse of :meth:`to_peer_pose`: ``(1, 4, 4)`` float64 camera-to-world in the CT's RAS world."""
        from ..geometry.diffdrr import diffdrr_isocenter, diffdrr_pose_to_world

        affine, shape = self._frame()
        m = peer_pose.to(torch.float64).reshape(1, 4, 4)
        if renderer == "diffdrr":
            return diffdrr_pose_to_world(m, None, "matrix", None, affine, shape, self.orientation)
        out = m.clone()
        out[0, :3, 3] += diffdrr_isocenter(affine, shape)
        return out

    def spec(
        self,
        target: torch.Tensor,
        intrinsics: Any,
        init_pose: torch.Tensor,
        workdir: str | Path,
        *,
        seed: int = 0,
        mode: str = "refine",
    ) -> dict[str, Any]:
        """Write the target to ``workdir`` and return the peer's spec (see ``_peer_refine.py``)."""
        import numpy as np

        from ..geometry.diffdrr import DiffDRRGeometry

        settings = self.resolved_settings()
        renderer = settings["renderer"]
        self._frame()
        if not isinstance(target, torch.Tensor) or target.ndim != 3 or target.shape[0] != 1:
            raise InputError(
                f"method {self.name!r}: expected a (1, rows, cols) target, got {getattr(target, 'shape', target)}"
            )
        if tuple(target.shape[-2:]) != (intrinsics.rows, intrinsics.cols):
            raise InputError(
                f"method {self.name!r}: target {tuple(target.shape[-2:])} does not match the detector "
                f"({intrinsics.rows}, {intrinsics.cols})"
            )
        geom = DiffDRRGeometry.from_intrinsics(intrinsics, self.orientation)
        image = target[0].detach().to(device="cpu", dtype=torch.float32)
        if renderer == "diffdrr":
            image = geom.image_to_diffdrr(image)
        workdir = Path(workdir)
        target_path = workdir / "target.npy"
        np.save(target_path, image.contiguous().numpy())
        device = self.device or str(target.device)
        threads = self.threads or torch.get_num_threads()
        return {
            "mode": mode,
            "recipe": self.recipe,
            "settings": settings,
            "ct": str(self.ct_path),
            "orientation": self.orientation,
            "target": str(target_path),
            "intrinsics": intrinsics.to_dict(),
            "diffdrr_detector": geom.drr_kwargs(),
            "nanodrr_intrinsics": {
                "sdd": intrinsics.sdd,
                "delx": intrinsics.dx,
                "dely": intrinsics.dy,
                "x0": intrinsics.x0,  # nanodrr's pixel (v, u) is at ((u − (W−1)/2)·delx − x0, …): ours
                "y0": intrinsics.y0,
                "height": intrinsics.rows,
                "width": intrinsics.cols,
            },
            "init": self.to_peer_pose(init_pose, renderer).tolist(),
            "init_world": init_pose.detach().double().cpu().reshape(4, 4).tolist(),
            "device": device,
            "threads": threads,
            "seed": int(seed),
            "out": str(workdir / "result.json"),
            "out_image": str(workdir / "image.npy"),
        }

    def run_spec(self, spec: Mapping[str, Any], workdir: str | Path) -> dict[str, Any]:
        """Run the peer script on ``spec`` (written to ``workdir/spec.json``); return its result JSON.

        Raises:
            XrayposeError: the process timed out, failed, or wrote no result (the message has the peer's
                error and the tail of its stderr).
        """
        spec_path = Path(workdir) / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
        env = dict(os.environ)
        threads = str(spec.get("threads") or "")
        if threads:
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        cmd = [str(self.python), str(self.script), str(spec_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s, env=env)
        except subprocess.TimeoutExpired:
            raise XrayposeError(
                f"peer method {self.name!r} timed out after {self.timeout_s:g} s; lower its budget "
                "(iterations=, sizes=; --peer-iterations, --peer-sizes) or raise timeout_s (--peer-timeout)"
            ) from None
        except OSError as exc:
            raise InputError(f"peer method {self.name!r}: cannot run {self.python}: {exc}") from None
        out = Path(str(spec["out"]))
        result: dict[str, Any] | None = None
        if out.is_file():
            try:
                result = json.loads(out.read_text(encoding="utf-8"))
            except ValueError:
                result = None
        tail = " | ".join((proc.stderr or "").strip().splitlines()[-6:])
        if result is None:
            raise XrayposeError(
                f"peer method {self.name!r} failed (exit code {proc.returncode}) without a result; "
                f"stderr: {tail or '(empty)'}"
            )
        if not result.get("ok"):
            where = " | ".join(str(result.get("traceback", "")).strip().splitlines()[-4:-1])
            raise XrayposeError(
                f"peer method {self.name!r} failed: {result.get('error', 'unknown error')}"
                + (f" (at {where})" if where else "")
                + (f"; stderr: {tail}" if tail else "")
            )
        return result

    def render(self, intrinsics: Any, pose: torch.Tensor) -> torch.Tensor:
        """The peer's DRR of ``pose`` on the full detector (its own renderer and density), re-indexed onto
        our pixel grid, ``(1, rows, cols)`` float32 on the CPU: for checking the conventions end to end."""
        import shutil

        import numpy as np

        from ..geometry.diffdrr import DiffDRRGeometry

        workdir = tempfile.mkdtemp(prefix=f"xraypose-{self.name}-render-")
        try:
            blank = torch.zeros(1, intrinsics.rows, intrinsics.cols)
            spec = self.spec(blank, intrinsics, pose, workdir, mode="render")
            self.run_spec(spec, workdir)
            image = torch.from_numpy(np.load(spec["out_image"])).to(torch.float32)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if spec["settings"]["renderer"] == "diffdrr":
            image = DiffDRRGeometry.from_intrinsics(intrinsics, self.orientation).image_from_diffdrr(image)
        return image.reshape(1, intrinsics.rows, intrinsics.cols)

    def __call__(
        self, renderer: Any, target: torch.Tensor, intrinsics: Any, init_pose: torch.Tensor, *, seed: int = 0
    ) -> PeerResult:
        import shutil

        del renderer  # the peer renders the CT itself
        t0 = time.perf_counter()
        workdir = tempfile.mkdtemp(prefix=f"xraypose-{self.name}-")
        try:
            spec = self.spec(target, intrinsics, init_pose, workdir, seed=seed)
            result = self.run_spec(spec, workdir)
            peer_renderer = spec["settings"]["renderer"]
            try:
                peer_pose = torch.tensor(result["pose"], dtype=torch.float64).reshape(4, 4)
            except (KeyError, TypeError, ValueError, RuntimeError):
                raise XrayposeError(
                    f"peer method {self.name!r}: its result has no (4, 4) pose: {result.get('pose')!r}"
                ) from None
            pose = self.from_peer_pose(peer_pose, peer_renderer)
        finally:
            if not self.keep_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        wall = time.perf_counter() - t0
        extra = {
            "peer": self.name,
            "peer_recipe": self.recipe,
            "peer_renderer": peer_renderer,
            "peer_render_method": spec["settings"]["render_method"],
            "peer_stages": result.get("stages"),
            "peer_seconds": result.get("seconds"),
            "peer_load_seconds": result.get("load_seconds"),
            "peer_wall_seconds": wall,
            "peer_threads": result.get("threads"),
            "peer_device": spec["device"],
        }
        if self.keep_workdir:
            extra["peer_workdir"] = workdir
        return PeerResult(
            pose=pose.to(device=target.device, dtype=torch.float32),
            iterations=int(result.get("iterations", 0)),
            loss=float(result.get("loss", math.nan)),
            initial_loss=float(result.get("initial_loss", math.nan)),
            stop_reason=str(result.get("stop_reason", "")),
            diverged=bool(result.get("diverged", False)),
            seconds=float(result.get("seconds", math.nan)),
            extra=extra,
        )


def _parse_recipe(recipe: str, renderer: str | None) -> tuple[str, str | None, str]:
    """``recipe`` (``"diffpose"``, ``"xvr"`` or a :data:`PEER_METHODS` name) → (recipe, renderer, name)."""
    if recipe in PEER_METHODS:
        base, default_renderer = PEER_METHODS[recipe]
        if renderer is not None and renderer != default_renderer:
            raise InputError(f"peer method {recipe!r} runs on {default_renderer}, not {renderer!r}")
        return base, default_renderer, recipe
    if recipe not in _peer_module().RECIPES:
        known = ", ".join(sorted(_peer_module().RECIPES) + sorted(PEER_METHODS))
        raise InputError(f"unknown peer recipe {recipe!r}; expected one of {known}")
    renderer = renderer or _peer_module().RECIPES[recipe]["renderer"]
    name = next(
        (n for n, rr in PEER_METHODS.items() if rr == (recipe, renderer)), f"peer-{recipe}-{renderer}"
    )
    return recipe, renderer, name


def peer_method(
    recipe: str,
    python: str | Path,
    *,
    name: str | None = None,
    renderer: str | None = None,
    iterations: int | Sequence[int] | None = None,
    sizes: int | str | Sequence[int | str | None] | None = None,
    render_method: str | None = None,
    n_samples: int | None = None,
    options: Mapping[str, Any] | None = None,
    threads: int | None = None,
    device: str | None = None,
    timeout_s: float = 7200.0,
    ct: str | Path | Any | None = None,
    check: bool = True,
    keep_workdir: bool = False,
) -> PeerRefinement:
    """A peer refinement as a registration method for :func:`run_benchmark` (``method_table``).

    Args:
        recipe: ``"diffpose"`` (DiffPose on DiffDRR), ``"xvr"`` (xvr on nanodrr) or a :data:`PEER_METHODS`
            name (``"peer-diffpose"``, ``"peer-xvr"``, ``"peer-xvr-diffdrr"``).
        python: the peer environment's Python (``bash ../shared/tools/setup-peers.sh`` prints it).
        name: the reported method name (default from :data:`PEER_METHODS`).
        renderer: ``"diffdrr"`` or ``"nanodrr"`` (default: the recipe's).
        iterations: Adam steps, one number for every stage or one per stage (default: the recipe's, DiffPose
            500; xvr 150 + 100).
        sizes: detector rows per stage, one value or a list; ``"full"`` (or ``None`` in a list) is the
            benchmark's detector (default: the recipe's, DiffPose full; xvr 64 then 128).
        render_method: ``"siddon"`` or ``"trilinear"`` (DiffDRR; nanodrr is trilinear only).
        n_samples: trilinear samples per ray (default 500).
        options: any other recipe setting (``lr_rot``, ``lr_xyz``, ``bone_attenuation_multiplier``,
            ``patience``…; see ``_peer_refine.RECIPES``).
        threads: torch threads of the peer (default: this process's).
        device: the peer's torch device (default: the target's).
        timeout_s: wall-clock limit of one call.
        ct: the CT (a path or a :class:`~xraypose.io.Volume`) to bind now; :func:`run_benchmark` binds its
            own.
        check: check now that ``python`` runs and has the packages the recipe needs.
        keep_workdir: keep every call's work folder.

    Raises:
        InputError: unknown recipe or setting, peer Python missing or without its packages (the message says
            how to set it up), bad timeout.
    """
    base, renderer, default_name = _parse_recipe(recipe, renderer)
    overrides: dict[str, Any] = dict(options or {})
    for key, value in (
        ("renderer", renderer),
        ("iterations", iterations),
        ("render_method", render_method),
        ("n_samples", n_samples),
    ):
        if value is not None:
            overrides[key] = list(value) if isinstance(value, (list, tuple)) else value
    if sizes is not None:
        stages = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
        overrides["sizes"] = [None if s in (None, "full") else s for s in stages]
    _peer_settings(base, overrides)  # validates
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise InputError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads: expected a positive integer, got {threads!r}")
    py = Path(python).expanduser()
    found: dict[str, Any] = {}
    if check:
        if not py.exists():
            raise InputError(
                f"peer Python {py} not found; create the peer environment with `{_SETUP_PEERS}` (it prints "
                "the interpreter's path)"
            )
        found = _probe_peer_python(py)
        need = ["torch", "diffdrr"] + (["nanodrr"] if renderer == "nanodrr" else [])
        missing = [pkg for pkg in need if not found.get(pkg)]
        if missing:
            raise InputError(
                f"peer Python {py} lacks {', '.join(missing)} (needed by recipe {base!r} on {renderer}); "
                f"install the peers with `{_SETUP_PEERS}`"
            )
    method = PeerRefinement(
        name=name or default_name,
        python=py,
        recipe=base,
        settings=overrides,
        threads=threads,
        device=device,
        timeout_s=float(timeout_s),
        versions=found,
        keep_workdir=keep_workdir,
    )
    if ct is not None:
        from ..io import Volume, read_volume

        if isinstance(ct, Volume):
            method = method.bind_ct(ct)
        else:
            path = Path(ct)
            if not path.is_file():
                raise FileFormatError(f"{path}: CT not found")
            method = method.bind_ct(read_volume(path), path)
    return method


# ---------------------------------------------------------------------------------------------- helpers
def default_method_table() -> Mapping[str, MethodFn]:
    """The registered registration methods (``METHODS`` of :mod:`xraypose.registration.baselines`)."""
    try:
        from .baselines import METHODS
    except ImportError as exc:
        raise InputError(
            f"no registration methods are available (cannot import xraypose.registration.baselines: {exc})"
        ) from None
    return METHODS


def level_label(rotation_deg: float, translation_mm: float) -> str:
    """The label of a perturbation level in results and tables, e.g. ``"5°/10 mm"``."""
    return f"{rotation_deg:g}°/{translation_mm:g} mm"


def _select(
    name: str, given: Sequence[int] | None, n: int, what: str, labels: Sequence[str] | None = None
) -> list[int]:
    if given is None:
        return list(range(n))
    out: list[int] = []
    for i in given:
        if isinstance(i, bool) or not isinstance(i, int):
            raise InputError(f"{name}: expected integer {what} indices, got {i!r}")
        if not 0 <= i < n:
            have = (
                ", ".join(f"{j} = {lab}" for j, lab in enumerate(labels))
                if labels is not None
                else f"0–{n - 1}"
            )
            raise InputError(
                f"{name}: {what} index {i} is out of range; the benchmark has {n} {what}s: {have}"
            )
        if i in out:
            raise InputError(f"{name}: {what} index {i} is given twice")
        out.append(i)
    if not out:
        raise InputError(f"{name}: expected at least one {what} index")
    return out


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: {dev} requested but CUDA is not available")
    return dev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_benchmark_ct(bench: Any, ct: str | Path | None = None) -> tuple[Any, str]:
    """The CT of a benchmark read by :func:`~xraypose.datasets.read_synthetic_benchmark`, and where it came from.

    ``ct`` overrides the file's ``ct_source``; a relative recorded path is looked up from the current folder,
    then from the benchmark file's folder; the bundled CT is recognised by its description. The volume must
    match the benchmark's (grid size and the SHA-256 of its voxels, when recorded).

    Raises:
        FileFormatError: the CT cannot be found or read (the message names the path and suggests ``--ct``).
        InputError: the CT is not the one the benchmark was made from.
    """
    from ..io import load_default_ct, read_volume

    meta = bench.metadata
    source = str(meta.get("ct_source", ""))
    if ct is not None:
        path = Path(ct)
        if not path.exists():
            raise FileFormatError(f"{path}: CT not found")
        volume, origin = read_volume(path), str(path)
    elif source.startswith(_DEFAULT_CT_PREFIX):
        volume, origin = load_default_ct(with_labels=False), source
    else:
        if not source:
            raise FileFormatError(
                f"{bench.path}: the benchmark does not record its CT's path; pass the CT with ct= (--ct)"
            )
        recorded = Path(source)
        candidates = [recorded] if recorded.is_absolute() else [recorded, Path(bench.path).parent / recorded]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise FileFormatError(
                f"{bench.path}: the benchmark's CT {source} was not found; pass its path with ct= (--ct)"
            )
        volume, origin = read_volume(found), str(found)

    from ..datasets.synthetic import _sha256_array

    shape = meta.get("ct_shape")
    if shape is not None and tuple(int(s) for s in shape) != tuple(volume.shape):
        raise InputError(
            f"CT {origin}: grid {tuple(volume.shape)} differs from the benchmark's CT {tuple(shape)} "
            f"({bench.path}); pass the CT the benchmark was made from"
        )
    want = str(meta.get("ct_data_sha256", ""))
    if want and _sha256_array(volume.data) != want:
        raise InputError(
            f"CT {origin}: its voxels differ from those of the benchmark's CT (SHA-256 mismatch, "
            f"{bench.path}); pass the CT the benchmark was made from"
        )
    return volume, origin


def _machine(device: torch.device) -> dict[str, Any]:
    import numpy as np

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(-1)[0]) if value.numel() else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- runner
def run_benchmark(
    bench_path: str | Path,
    methods: Sequence[str] = ("diffpose",),
    *,
    ct: str | Path | None = None,
    levels: Sequence[int] | None = None,
    cases: Sequence[int] | None = None,
    max_cases: int | None = None,
    physics: str = "mono",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    method_table: Mapping[str, MethodFn] | None = None,
    device: str | torch.device | None = None,
    warmup: bool = True,
    peer_python: str | Path | None = None,
    peer_options: Mapping[str, Any] | None = None,
    init: str = "benchmark",
    model: str | Path | Any | None = None,
    allow_new_patient: bool = False,
) -> BenchmarkResults:
    """Run registration methods on a synthetic benchmark and score every run.

    Args:
        bench_path: an HDF5 file written by :func:`~xraypose.datasets.make_synthetic_benchmark`.
        methods: names of methods in ``method_table``, run in this order on every initial pose.
        ct: the CT the benchmark was made from; default the file's recorded ``ct_source`` (the bundled CT is
            recognised).
        levels: indices of the perturbation levels to run (default all).
        cases: indices of the cases to run (default all).
        max_cases: run at most this many of the selected cases (the first ones).
        physics: the renderer the methods optimise through, ``"mono"`` or ``"poly"``.
        seed: passed to every method call as ``seed=``.
        progress: called as ``progress(done, total)`` with 0 first and after every run; ``total`` =
            cases × levels × initial poses × methods.
        method_table: method name → callable; default :func:`default_method_table`.
        device: where to render (default CUDA when available, else the CPU).
        warmup: first run every method once, untimed and unscored, on the first selected initial pose, so
            that one-time costs (JIT compilation, CUDA context and kernel autotuning) are not charged to the
            first case (not peer methods: each of their calls is a fresh process).
        peer_python: the peer environment's Python; with it the names of :data:`PEER_METHODS`
            (``"peer-diffpose"``, ``"peer-xvr"``, ``"peer-xvr-diffdrr"``) that ``method_table`` lacks run
            :func:`peer_method` refinements, side by side with the other methods on the same cases.
        peer_options: keyword arguments of :func:`peer_method` for those (``iterations``, ``sizes``,
            ``render_method``, ``threads``, ``timeout_s``…).
        init: where the initial poses come from: ``"benchmark"`` (the file's perturbed poses, per level and
            initial pose) or ``"model"``: one initial pose per case, predicted from the case's X-ray by the
            trained network ``model`` (:class:`~xraypose.learning.NetworkInitializer`, its card checked against
            the benchmark's CT and detector); the runs' level is ``"network"``, their ``initial_mtre_mm`` is the
            network's, and ``extra`` adds the network's other errors (``initial_rot_deg``,
            ``initial_trans_mm``, ``initial_mpd_mm``, ``initial_mrpe_px``, ``initial_dgeo_mm``, per-axis
            ``initial_rot_deg_xyz`` / ``initial_trans_mm_xyz``), its pose (``initial_pose``) and its time
            (``network_seconds``, not included in ``seconds``).
        model: the trained model (its folder or a :class:`~xraypose.learning.TrainedModel`) for
            ``init="model"``.
        allow_new_patient: let a patient-agnostic model run on a CT it was not trained on (``init="model"``).
    Returns:
        A :class:`BenchmarkResults` list of :class:`~xraypose.metrics.CaseResult`, one per case × level ×
        initial pose × method (in that nesting order), with the run's ``metadata``. ``case`` is the case
        index (``"0007"``), ``level`` :func:`level_label`; ``extra`` holds the indices of the case, level and
        initial pose, the method's own final and initial loss, its reported seconds, and whether it diverged.
        Methods with ``own_timing`` (peers) are scored with their own ``seconds`` (the optimisation alone;
        ``extra["wall_seconds"]`` has the call's wall time) and add their ``extra`` (stages run…);
        ``metadata["peer_methods"]`` records each peer's recipe and the settings it ran.
    Raises:
        FileFormatError: unreadable benchmark, or its CT cannot be found (pass ``ct``).
        InputError: unknown method names (the message lists the known ones), bad levels, cases, physics or
            seed, or a CT that is not the benchmark's.
    """
    from .. import __version__
    from ..datasets.synthetic import _sha256_file, read_synthetic_benchmark
    from .renderers import VolumeRenderer

    names = [methods] if isinstance(methods, str) else list(methods)
    if not names:
        raise InputError("methods: expected at least one method name")
    table = dict(default_method_table() if method_table is None else method_table)
    for name in names:
        if name in PEER_METHODS and name not in table:
            if peer_python is None:
                raise InputError(
                    f"method {name!r} runs a peer implementation: pass peer_python (--peer-python), the Python "
                    f"of the peer environment (`{_SETUP_PEERS}` prints it)"
                )
            table[name] = peer_method(name, peer_python, **dict(peer_options or {}))
    unknown = [m for m in names if m not in table]
    if unknown:
        known = ", ".join(sorted(set(table) | set(PEER_METHODS))) or "none"
        raise InputError(f"unknown method(s) {', '.join(map(repr, unknown))}; available: {known}")
    if len(set(names)) != len(names):
        raise InputError(f"methods: a method is named twice in {names}")
    if physics not in ("mono", "poly"):
        raise InputError(f"physics: expected 'mono' or 'poly', got {physics!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed: expected a non-negative integer, got {seed!r}")
    if max_cases is not None and (
        isinstance(max_cases, bool) or not isinstance(max_cases, int) or max_cases < 1
    ):
        raise InputError(f"max_cases: expected a positive integer, got {max_cases!r}")
    if init not in ("benchmark", "model"):
        raise InputError(f"init: expected 'benchmark' or 'model', got {init!r}")
    if init == "model" and model is None:
        raise InputError("init='model' needs the trained model (model=MODEL_DIR, --model)")
    if init != "model" and (model is not None or allow_new_patient):
        raise InputError("model / allow_new_patient: only with init='model' (--init model)")
    if init == "model" and levels is not None:
        raise InputError(
            "levels: with init='model' the network gives one initial pose per case; the perturbation levels "
            "do not apply"
        )
    dev = _resolve_device(device)

    bench_path = Path(bench_path)
    bench = read_synthetic_benchmark(bench_path)
    level_values = bench.levels.tolist()
    level_ids = _select("levels", levels, bench.n_levels, "level", [level_label(*v) for v in level_values])
    case_ids = _select("cases", cases, len(bench), "case")
    if max_cases is not None:
        case_ids = case_ids[:max_cases]
    k_inits = bench.inits_per_level

    volume, ct_origin = load_benchmark_ct(bench, ct)
    initializer = None
    if init == "model":
        from ..learning import NetworkInitializer

        initializer = NetworkInitializer(
            model, volume, bench.intrinsics, allow_new_patient=allow_new_patient, device=dev
        )
    renderer = VolumeRenderer(volume, physics).to(dev)  # type: ignore[arg-type]
    ct_file = Path(ct_origin) if Path(ct_origin).is_file() else None  # None: the bundled CT
    for name in names:
        if hasattr(table[name], "bind_ct"):
            table[name] = table[name].bind_ct(volume, ct_file)
    del volume
    intr = bench.intrinsics
    landmarks = bench.landmarks_world
    radius = intr.sdd / 2  # DiffPose's radius of the double geodesic distance

    started = datetime.now(timezone.utc)
    t_start = time.perf_counter()
    runs_per_case = 1 if initializer is not None else len(level_ids) * k_inits
    total = len(case_ids) * runs_per_case * len(names)
    if progress is not None:
        progress(0, total)
    if warmup:
        first = bench[case_ids[0]]
        target0 = first.image[None].to(device=dev, dtype=torch.float32)
        if initializer is not None:
            init0 = initializer(first.image).pose.to(device=dev, dtype=torch.float32)
        else:
            init0 = first.inits[level_ids[0], 0][None].to(device=dev, dtype=torch.float32)
        for name in names:
            if getattr(table[name], "warmup", True) is False:
                continue
            try:
                table[name](renderer, target0, intr, init0, seed=seed)
            except XrayposeError:
                pass  # reported by the timed run
        _sync(dev)

    records: list[CaseResult] = []
    done = 0

    def run_methods(
        ci: int, target: torch.Tensor, start: torch.Tensor, truth: torch.Tensor, label: str, extra: dict
    ) -> None:
        nonlocal done
        # scored from the pose the methods receive (float32), so an unmoved pose scores exactly this
        initial = float(mtre(start.double().cpu(), truth, landmarks)[0])
        for name in names:
            records.append(
                _run_one(
                    table[name],
                    name,
                    renderer,
                    target,
                    intr,
                    start,
                    truth,
                    landmarks,
                    radius,
                    seed=seed,
                    device=dev,
                    case=f"{ci:04d}",
                    level=label,
                    initial_mtre=initial,
                    extra=dict(extra),
                )
            )
            done += 1
            if progress is not None:
                progress(done, total)

    for ci in case_ids:
        case = bench[ci]
        target = case.image[None].to(device=dev, dtype=torch.float32)
        truth = case.pose[None]
        if initializer is not None:
            net = initializer(case.image)
            start = net.pose.to(device=dev, dtype=torch.float32)
            extra = {"case_index": ci, "level_index": None, "init_index": None, "init": "model"}
            extra.update(_initial_errors(start, truth, landmarks, intr, radius))
            extra["network_seconds"] = net.seconds
            run_methods(ci, target, start, truth, NETWORK_LEVEL, extra)
            continue
        for li in level_ids:
            rot, trans = level_values[li]
            label = level_label(rot, trans)
            for k in range(k_inits):
                start = case.inits[li, k][None].to(device=dev, dtype=torch.float32)
                run_methods(
                    ci, target, start, truth, label, {"case_index": ci, "level_index": li, "init_index": k}
                )

    metadata = {
        "bench_file": str(bench_path.resolve()),
        "bench_sha256": _sha256_file(bench_path),
        "bench_format": {
            key: bench.metadata.get(key)
            for key in ("format", "format_version", "xraypose_version", "seed", "n", "inits_per_level")
        },
        "bench_renderer": bench.metadata.get("renderer"),
        "ct": ct_origin,
        "ct_data_sha256": bench.metadata.get("ct_data_sha256"),
        "methods": names,
        "peer_methods": {
            name: table[name].describe() for name in names if callable(getattr(table[name], "describe", None))
        },
        "physics": physics,
        "seed": seed,
        "init": init,
        "levels": [
            {
                "index": li,
                "rotation_deg": level_values[li][0],
                "translation_mm": level_values[li][1],
                "label": level_label(*level_values[li]),
            }
            for li in level_ids
        ]
        if initializer is None
        else [{"index": None, "rotation_deg": None, "translation_mm": None, "label": NETWORK_LEVEL}],
        "cases": case_ids,
        "inits_per_level": k_inits if initializer is None else 1,
        "runs": len(records),
        "warmup": warmup,
        "landmarks": int(landmarks.shape[0]),
        "detector": intr.to_dict(),
        "xraypose_version": __version__,
        "machine": _machine(dev),
        "started_utc": started.isoformat(timespec="seconds"),
        "total_seconds": time.perf_counter() - t_start,
    }
    if initializer is not None:
        metadata["model"] = _model_summary(initializer, model)
    return BenchmarkResults(records, metadata)


def _initial_errors(
    start: torch.Tensor, truth: torch.Tensor, landmarks: torch.Tensor, intr: Any, radius: float
) -> dict[str, Any]:
    """The network pose's errors (``extra`` keys ``initial_*``) and the pose itself."""
    pose = start.detach().double().cpu()
    e = pose_errors(pose, truth, landmarks, intr, radius_mm=radius)
    out: dict[str, Any] = {
        "initial_rot_deg": float(e.rot_deg[0]),
        "initial_trans_mm": float(e.trans_mm[0]),
        "initial_mpd_mm": None if e.mpd_mm is None else float(e.mpd_mm[0]),
        "initial_mrpe_px": None if e.mrpe_px is None else float(e.mrpe_px[0]),
        "initial_dgeo_mm": None if e.dgeo_mm is None else float(e.dgeo_mm[0]),
        "initial_rot_deg_xyz": [float(v) for v in e.rot_deg_xyz[0]],
        "initial_trans_mm_xyz": [float(v) for v in e.trans_mm_xyz[0]],
        "initial_pose": pose[0].tolist(),
    }
    return out


def _model_summary(initializer: Any, model: Any) -> dict[str, Any]:
    card = initializer.trained.card
    cfg = card.get("model_config", {})
    return {
        "path": str(initializer.trained.path) if initializer.trained.path is not None else str(model),
        "kind": card.get("kind", "patient-specific"),
        "patient_agnostic": bool(card.get("patient_agnostic", False)),
        "backbone": cfg.get("backbone"),
        "image_size": cfg.get("image_size"),
        "steps_done": card.get("steps_done"),
        "wall_time_s": card.get("wall_time_s"),
        "stopped_by": card.get("stopped_by"),
        "card_problems": list(initializer.problems),
    }


def _network_records(results: Sequence[CaseResult]) -> list[CaseResult]:
    """One record per case of a ``init="model"`` run: the network's initial pose scored as a result (its errors
    from ``extra``, ``seconds`` = the network's time), for the report's network table."""
    out: dict[str, CaseResult] = {}
    for r in results:
        x = r.extra
        if x.get("init") != "model" or r.case in out:
            continue
        xyz = {
            k: tuple(x[k]) if x.get(k) is not None else None
            for k in ("initial_rot_deg_xyz", "initial_trans_mm_xyz")
        }
        out[r.case] = CaseResult(
            case=r.case,
            level=r.level,
            method="network (initial pose)",
            mtre_mm=r.initial_mtre_mm if r.initial_mtre_mm is not None else math.nan,
            mpd_mm=x.get("initial_mpd_mm"),
            mrpe_px=x.get("initial_mrpe_px"),
            rot_deg=x.get("initial_rot_deg"),
            trans_mm=x.get("initial_trans_mm"),
            rot_deg_xyz=xyz["initial_rot_deg_xyz"],  # type: ignore[arg-type]
            trans_mm_xyz=xyz["initial_trans_mm_xyz"],  # type: ignore[arg-type]
            dgeo_mm=x.get("initial_dgeo_mm"),
            initial_mtre_mm=r.initial_mtre_mm,
            seconds=x.get("network_seconds"),
        )
    return list(out.values())


def _run_one(
    method: MethodFn,
    name: str,
    renderer: Any,
    target: torch.Tensor,
    intr: Any,
    init: torch.Tensor,
    truth: torch.Tensor,
    landmarks: torch.Tensor,
    radius: float,
    *,
    seed: int,
    device: torch.device,
    case: str,
    level: str,
    initial_mtre: float,
    extra: dict[str, Any],
) -> CaseResult:
    """One method on one initial pose, timed and scored. A method's :class:`XrayposeError` (bad geometry…) is
    recorded as a failed run (NaN errors, ``stop_reason = "error: …"``); any other exception propagates."""
    _sync(device)
    t0 = time.perf_counter()
    try:
        result = method(renderer, target, intr, init, seed=seed)
        error = None
    except XrayposeError as exc:
        result, error = None, exc
    _sync(device)
    seconds = wall = time.perf_counter() - t0
    own = _as_float(getattr(result, "seconds", None)) if getattr(method, "own_timing", False) else None
    if own is not None:
        seconds = own

    if result is None:
        pose = torch.full((1, 4, 4), math.nan, dtype=torch.float64)
    else:
        pose = getattr(result, "pose", None)
        if not isinstance(pose, torch.Tensor) or pose.shape[-2:] != (4, 4) or pose.numel() != 16:
            raise InputError(
                f"method {name!r}: expected a result with a (1, 4, 4) pose tensor, got "
                f"{type(result).__name__} with pose {getattr(pose, 'shape', pose)!r}"
            )
        pose = pose.detach().reshape(1, 4, 4).to(device="cpu", dtype=torch.float64)
    errors = pose_errors(pose, truth, landmarks, intr, radius_mm=radius)

    diverged = getattr(result, "diverged", None)
    info = dict(extra)
    info.update(
        loss=_as_float(getattr(result, "loss", None)),
        initial_loss=_as_float(getattr(result, "initial_loss", None)),
        method_seconds=_as_float(getattr(result, "seconds", None)),
        diverged=bool(diverged.any()) if isinstance(diverged, torch.Tensor) else diverged,
    )
    if own is not None:
        info["wall_seconds"] = wall
    more = getattr(result, "extra", None)
    if isinstance(more, Mapping):
        info.update(more)
    if error is not None:
        info["error"] = str(error)
    iterations = getattr(result, "iterations", None)
    converged = getattr(result, "converged", None)
    if isinstance(converged, torch.Tensor):
        converged = bool(converged.all())
    return errors.case_result(
        0,
        case=case,
        method=name,
        level=level,
        initial_mtre_mm=initial_mtre,
        seconds=seconds,
        iterations=int(iterations) if iterations is not None else None,
        converged=converged,
        stop_reason=f"error: {error}" if error is not None else getattr(result, "stop_reason", None),
        extra=info,
    )


# ---------------------------------------------------------------------------------------------- outputs
def check_outputs(out_dir: str | Path, force: bool = False) -> None:
    """Refuse (:class:`InputError`) when ``out_dir`` is a file, or holds result files and ``force`` is false."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: is a file; expected a folder for the results")
    existing = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if existing and not force:
        raise InputError(
            f"{out_dir}: result files exist ({', '.join(existing)}); pass force=True (--force) to overwrite them"
        )


_XYZ = ("rot_deg_xyz", "trans_mm_xyz")


def _csv_columns() -> list[str]:
    cols: list[str] = []
    for f in fields(CaseResult):
        if f.name in _XYZ:
            stem, unit = f.name[: -len("_xyz")].rsplit("_", 1)
            cols += [f"{stem}_{axis}_{unit}" for axis in "xyz"]
        else:
            cols.append(f.name)
    return cols


def _csv_text(results: Sequence[CaseResult]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_csv_columns())
    for r in results:
        row: list[Any] = []
        for f in fields(CaseResult):
            value = getattr(r, f.name)
            if f.name in _XYZ:
                row += ["", "", ""] if value is None else [repr(float(v)) for v in value]
            elif f.name == "extra":
                row.append(json.dumps(value, sort_keys=True))
            elif value is None:
                row.append("")
            elif isinstance(value, float):
                row.append(repr(value))
            else:
                row.append(value)
        writer.writerow(row)
    return buf.getvalue()


def read_results(path: str | Path) -> list[CaseResult]:
    """Read the ``cases.csv`` written by :func:`write_results` back into :class:`~xraypose.metrics.CaseResult`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileFormatError(f"{path}: results file not found") from None
    rows = list(csv.DictReader(io.StringIO(text)))
    expected = _csv_columns()
    if not rows or list(rows[0]) != expected:
        raise FileFormatError(f"{path}: not a benchmark results CSV (expected the columns {expected})")
    kinds = {f.name: f.type for f in fields(CaseResult)}
    out = []
    for row in rows:
        values: dict[str, Any] = {}
        for name, kind in kinds.items():
            if name in _XYZ:
                stem, unit = name[: -len("_xyz")].rsplit("_", 1)
                cells = [row[f"{stem}_{axis}_{unit}"] for axis in "xyz"]
                values[name] = None if "" in cells else tuple(float(c) for c in cells)
                continue
            cell = row[name]
            if name == "extra":
                values[name] = json.loads(cell) if cell else {}
            elif name in ("case", "level", "method"):
                values[name] = cell
            elif cell == "":
                values[name] = None
            elif "int" in str(kind):
                values[name] = int(cell)
            elif "bool" in str(kind):
                values[name] = cell == "True"
            elif "float" in str(kind):
                values[name] = float(cell)
            else:
                values[name] = cell
        out.append(CaseResult(**values))
    return out


def _ordered_summaries(results: Sequence[CaseResult]) -> list[Summary]:
    """Per (method, level) summaries, method-major in the order of first appearance."""
    methods = list(dict.fromkeys(r.method for r in results))
    levels = list(dict.fromkeys(r.level for r in results))
    groups = summarize_by(results, ("method", "level"), DEFAULT_THRESHOLDS_MM)
    return [groups[key] for key in sorted(groups, key=lambda k: (methods.index(k[0]), levels.index(k[1])))]


def _overall_summaries(results: Sequence[CaseResult]) -> list[Summary]:
    out = []
    for method in dict.fromkeys(r.method for r in results):
        s = summarize([r for r in results if r.method == method], DEFAULT_THRESHOLDS_MM)
        out.append(replace(s, level="all" if s.level == "mixed" else s.level))
    return out


def _peer_line(name: str, info: Mapping[str, Any]) -> str:
    """One line of the report describing what a peer method ran (its settings, so reduced budgets show)."""
    st = info.get("settings") or {}
    sizes = "→".join("full" if s is None else str(s) for s in st.get("sizes", []))
    iters = "+".join(str(n) for n in st.get("iterations", []))
    versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items() if v)
    return (
        f"- peer `{name}`: {info.get('recipe', '?')} recipe on {st.get('renderer', '?')} "
        f"({st.get('render_method', '?')}), detector rows {sizes}, Adam steps {iters}, lr {st.get('lr_rot', '?')} "
        f"rad / {st.get('lr_xyz', '?')} mm, similarity {st.get('similarity', '?')}"
        + (f"; {versions}" if versions else "")
        + "; s/case is the peer's optimisation time (CT loading excluded)"
    )


def report_markdown(results: Sequence[CaseResult], metadata: Mapping[str, Any] | None = None) -> str:
    """The Markdown report of a run: run details, the initial errors per level, one row per method × level
    (median/mean mTRE, SR@1/2/5/10 mm, mPD, mRPE, rotation and translation errors with per-axis means, median
    seconds per run) and one row per method over all levels."""
    if not results:
        raise InputError("report_markdown: no results")
    meta = dict(metadata or {})
    lines = ["# Registration benchmark", ""]
    if meta:
        machine = meta.get("machine", {})
        lines += [
            f"- benchmark: `{meta.get('bench_file', '?')}` (sha256 `{str(meta.get('bench_sha256', '?'))[:16]}…`)",
            f"- cases: {len(meta.get('cases', []))}, initial poses per level: {meta.get('inits_per_level', '?')}, "
            f"runs: {meta.get('runs', len(results))}",
            f"- methods: {', '.join(meta.get('methods', []))}; physics: {meta.get('physics', '?')}; "
            f"seed: {meta.get('seed', '?')}",
            f"- device: {machine.get('cuda_device') or machine.get('device', '?')}; CPU threads: "
            f"{machine.get('torch_threads', '?')}; xraypose {meta.get('xraypose_version', '?')}",
        ]
        lines += [_peer_line(name, info) for name, info in (meta.get("peer_methods") or {}).items()]
        if meta.get("init") == "model":
            m = meta.get("model") or {}
            lines.append(
                f"- initial poses: the network `{m.get('path', '?')}` ({m.get('kind', '?')}, {m.get('backbone', '?')} "
                f"at {m.get('image_size', '?')} px, {m.get('steps_done', '?')} steps), one per case"
            )
        lines.append("")
    lines += ["## Initial error per level", "", "| level | runs | initial mTRE median (mm) | mean (mm) |"]
    lines.append("|---|---:|---:|---:|")
    first = next(iter(dict.fromkeys(r.method for r in results)))
    for lv in dict.fromkeys(r.level for r in results):
        s = summarize([r for r in results if r.method == first and r.level == lv])
        st = s.initial_mtre_mm
        med = "—" if st is None else f"{st.median:.2f}"
        mean = "—" if st is None else f"{st.mean:.2f}"
        lines.append(f"| {lv or '—'} | {s.n_cases} | {med} | {mean} |")
    network = _network_records(results)
    if network:
        lines += [
            "",
            "## Network initial pose",
            "",
            "The trained network's pose of each case before refinement, scored like a method (s/case is the "
            "network's time: preprocessing and forward pass).",
            "",
            _summary_table(_overall_summaries(network), per_axis=True).rstrip("\n"),
        ]
    lines += [
        "",
        "## Results per method and level",
        "",
        "SR@τ: share of runs with final mTRE strictly below τ mm (a diverged run fails). mPD is measured on the "
        "detector (mm), mRPE in pixels; rotation and translation errors are of the camera pose (°, mm), per-axis "
        "columns are mean absolute errors in the camera frame; s/case is the median wall time of one run.",
        "",
        _summary_table(_ordered_summaries(results), per_axis=True).rstrip("\n"),
        "",
        "## All levels",
        "",
        _summary_table(_overall_summaries(results)).rstrip("\n"),
        "",
    ]
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _json_clean(value: Any) -> Any:
    """NaN/inf → ``None`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    return value


def write_results(
    results: Sequence[CaseResult],
    out_dir: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Write a run's results to the folder ``out_dir`` (created if needed), every file atomically.

    Files (:data:`OUTPUT_FILES`):

    - ``cases.csv``: one row per case × level × initial pose × method, every :class:`CaseResult` field (per-axis
      errors as ``rot_x_deg``… ``trans_z_mm`` columns, ``extra`` as JSON); read back by :func:`read_results`;
    - ``summary.md``: :func:`report_markdown`;
    - ``summary.json``: the same summaries (``Summary.to_dict()``) per method × level and per method;
    - ``metadata.json``: ``metadata`` (default ``results.metadata`` of a :class:`BenchmarkResults`) with the
      machine and version;
    - ``success_vs_initial_error.png`` and ``mtre_cdf.png``: :mod:`xraypose.viz.plots`.

    Returns:
        file name → path of every file written.
    Raises:
        InputError: no results, or result files exist in ``out_dir`` and ``force`` is false (nothing is written).
    """
    from ..viz.plots import plot_error_cdf, plot_success_vs_initial_error

    records = list(results)
    if not records or not all(isinstance(r, CaseResult) for r in records):
        raise InputError("write_results: expected a non-empty sequence of CaseResult")
    out_dir = Path(out_dir)
    check_outputs(out_dir, force)
    meta = dict(getattr(results, "metadata", {}) if metadata is None else metadata)
    if "machine" not in meta:
        meta["machine"] = _machine(_resolve_device(None))
    if "xraypose_version" not in meta:
        from .. import __version__

        meta["xraypose_version"] = __version__
    meta["written_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta["outputs"] = list(OUTPUT_FILES)

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in OUTPUT_FILES}
    per_level = _ordered_summaries(records)
    atomic_write_text(paths["cases.csv"], _csv_text(records))
    atomic_write_text(paths["summary.md"], report_markdown(records, meta))
    summaries = {
        "per_method_level": [s.to_dict() for s in per_level],
        "per_method": [s.to_dict() for s in _overall_summaries(records)],
    }
    atomic_write_text(paths["summary.json"], json.dumps(_json_clean(summaries), indent=2) + "\n")
    atomic_write_text(
        paths["metadata.json"], json.dumps(_json_clean(meta), indent=2, default=_json_default) + "\n"
    )
    plot_success_vs_initial_error(per_level, paths["success_vs_initial_error.png"])
    plot_error_cdf(records, paths["mtre_cdf.png"])
    return paths
