"""The ``xraypose`` command line: thin wrappers over the public Python API.

Every command prints one clear ``error:`` line and exits with status 2 on bad input, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import torch
import typer
from rich.console import Console

from ..errors import FileFormatError, InputError, XrayposeError

if TYPE_CHECKING:
    from ..geometry import Intrinsics

app = typer.Typer(
    name="xraypose",
    help="2D/3D registration of X-ray images to CT: fast differentiable DRRs and C-arm geometry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"xraypose {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """2D/3D registration of X-ray images to CT: fast differentiable DRRs and C-arm geometry."""


class Method(str, Enum):
    trilinear = "trilinear"
    siddon = "siddon"


class Output(str, Enum):
    line_integral = "line_integral"
    intensity = "intensity"


class Physics(str, Enum):
    mono = "mono"
    poly = "poly"
    simulated = "simulated"


def _physics_images(volume, camera, *, method: str, kvp: float, seed: int) -> dict[str, torch.Tensor]:
    """Monochromatic, polychromatic and simulated-detector images of ``camera``'s first pose, each as
    ``−ln(I/I0)``-like line integrals (bright = attenuating), ``(rows, cols)``."""
    from ..io import AttenuationModel
    from ..physics import render_polychromatic, simulate_xray, tube_spectrum
    from ..render import render as render_drr

    spectrum = tube_spectrum(kvp)
    cam = camera[0:1]
    with torch.no_grad():
        mono = render_drr(AttenuationModel()(volume.data), volume.affine, cam, method=method)
        poly = render_polychromatic(
            volume.data, volume.affine, cam, spectrum=spectrum, output="line_integral", method=method
        )
        sim = simulate_xray(volume.data, volume.affine, cam, spectrum=spectrum, method=method, seed=seed)
    return {"mono": mono[0], "poly": poly[0], "simulated": sim[0]}


def _compare_titles(kvp: float) -> dict[str, str]:
    return {
        "mono": "monochromatic (mu from HU)",
        "poly": f"polychromatic {kvp:g} kVp",
        "simulated": "simulated X-ray (scatter, noise, blur)",
    }


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While the block runs, SIGTERM (``kill``, a batch scheduler's stop) raises ``SystemExit(143)`` instead of
    ending the process at once, so that cleanup runs: a peer process started by ``subprocess.run`` is killed
    with it (it would otherwise go on alone for minutes) and temporary folders are removed. Ctrl-C already
    reaches the whole process group. A no-op outside the main thread, where handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _floats(text: str) -> tuple[float, ...]:
    """``"1, 2,3"`` → ``(1.0, 2.0, 3.0)``; ``()`` when a part is not a number."""
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        return ()


def _parse_triple(text: str, name: str) -> tuple[float, float, float]:
    values = _floats(text)
    if len(values) != 3:
        raise InputError(f"{name}: expected three comma-separated numbers in mm like '0,0,0', got {text!r}")
    return values  # type: ignore[return-value]


#: ``--steps`` when only ``--minutes`` bounds a training: the time budget ends it and drives the schedule.
_BUDGET_STEPS = 1_000_000


def _training_budget(steps: int | None, minutes: float | None, default_steps: int) -> tuple[int, float]:
    """``(steps, max_seconds)`` of a training command's ``--steps`` and ``--minutes`` (``max_seconds`` 0: no
    budget); ``--steps`` defaults to ``default_steps``, or with ``--minutes`` alone to :data:`_BUDGET_STEPS`."""
    if minutes is not None and not minutes > 0:
        raise InputError(f"--minutes: expected a positive number of minutes, got {minutes:g}")
    if steps is None:
        steps = _BUDGET_STEPS if minutes is not None else default_steps
    return steps, 0.0 if minutes is None else 60.0 * minutes


def _parse_prost_sigma(text: str | None) -> tuple[float, ...] | None:
    """``--prost-sigma "5,5,10,15,15,30"`` → the CMA-ES σ of ProST's hand-over (°, °, °, mm, mm, mm)."""
    if text is None:
        return None
    values = _floats(text)
    if len(values) != 6 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(
            "--prost-sigma: expected six positive comma-separated numbers (rotation x, y, z in degrees, then "
            f"translation x, y, z in mm) like '5,5,10,15,15,30', got {text!r}"
        )
    return values


def _load_pose(path: Path) -> torch.Tensor:
    """A camera-to-world 4×4 matrix (or a stack) from .json (``{"pose": [[...]]}`` or a bare list), .npy, .txt."""
    from ..geometry.camera import validate_pose

    if not path.exists():
        raise FileFormatError(f"{path}: pose file not found")
    if path.suffix not in (".npy", ".json", ".txt", ".csv"):
        raise FileFormatError(f"{path}: unsupported pose file; expected .json, .npy, .txt or .csv")
    try:
        if path.suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            raw = json.loads(path.read_text())
            data = np.asarray(
                raw.get("pose", raw.get("matrix")) if isinstance(raw, dict) else raw, dtype=np.float64
            )
        else:
            data = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None)
    except (ValueError, OSError, json.JSONDecodeError, TypeError) as exc:
        raise FileFormatError(f"{path}: could not read a 4×4 pose matrix ({exc})") from None
    if data.shape[-2:] != (4, 4) or data.ndim not in (2, 3):
        raise InputError(f"{path}: expected a 4×4 camera-to-world matrix (or N×4×4), got shape {data.shape}")
    return validate_pose(torch.as_tensor(data, dtype=torch.float32), str(path))


def _check_out(out: Path, force: bool, allowed: tuple[str, ...]) -> None:
    if out.suffix.lower() not in allowed:
        raise InputError(
            f"--out {out}: unsupported extension {out.suffix!r}; expected one of {', '.join(allowed)}"
        )
    if out.exists() and not force:
        raise InputError(f"--out {out}: file exists; pass --force to overwrite it")


def _save(image: np.ndarray, out: Path) -> None:
    from ..io.images import save_image

    if out.suffix.lower() == ".png":
        from ..render import normalize_display

        image = normalize_display(torch.as_tensor(image)).numpy()
    save_image(image.astype(np.float32), out)


def _check_distance(value: float | None, name: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise InputError(f"{name}: expected a positive finite distance in mm, got {value:g}")


def _check_size(size: int) -> None:
    if size < 1:
        raise InputError(f"--size: expected a positive integer pixel count, got {size}")


def _square_detector(sdd: float, size: int, side: float) -> Intrinsics:
    """A ``size × size`` detector ``side`` mm wide (``size`` is checked before dividing by it)."""
    from ..geometry import Intrinsics

    _check_size(size)
    return Intrinsics(sdd=sdd, rows=size, cols=size, dy=side / size, dx=side / size)


def _fit_detector(volume, sdd: float, sid: float | None) -> float:
    """Detector side (mm) that shows the CT's largest extent, magnified to the detector, with 10 % margin."""
    sid = sdd / 2 if sid is None else sid
    return 1.1 * float(volume.extent_mm.max()) * sdd / sid


@app.command()
def render(
    ct: Annotated[
        Path, typer.Option("--ct", help="CT volume: NIfTI, NRRD, MHA/MHD or a DICOM series folder.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Output image: .png (display), .npy or .tif (raw float32).")
    ],
    labels: Annotated[Path | None, typer.Option(help="Label map on the CT's grid.")] = None,
    select: Annotated[
        str | None, typer.Option(help="Render only these label ids, e.g. '18,19,20' (needs --labels).")
    ] = None,
    pose: Annotated[
        Path | None,
        typer.Option(help="Camera-to-world 4×4 pose (.json/.npy/.txt) in the CT's RAS world, mm."),
    ] = None,
    lao: Annotated[float, typer.Option(help="LAO (+) / RAO (−) angle, degrees.")] = 0.0,
    cranial: Annotated[float, typer.Option(help="Cranial (+) / caudal (−) angle, degrees.")] = 0.0,
    inplane: Annotated[float, typer.Option(help="In-plane detector rotation, degrees.")] = 0.0,
    isocenter: Annotated[
        str | None, typer.Option(help="Isocentre 'x,y,z' in world mm (default: the CT's centre).")
    ] = None,
    sid: Annotated[
        float | None, typer.Option(help="Source-to-isocentre distance, mm (default sdd/2).")
    ] = None,
    camera: Annotated[
        Path | None, typer.Option(help="Camera JSON with intrinsics (overrides detector options).")
    ] = None,
    sdd: Annotated[float, typer.Option(help="Source-to-detector distance, mm.")] = 1020.0,
    size: Annotated[int, typer.Option(help="Detector rows and columns, pixels.")] = 256,
    detector_mm: Annotated[
        float | None, typer.Option(help="Detector side length, mm (default: fit the whole CT in the view).")
    ] = None,
    method: Annotated[Method, typer.Option(help="Ray integration method.")] = Method.trilinear,
    output: Annotated[
        Output, typer.Option(help="Line integrals or Beer–Lambert intensity.")
    ] = Output.line_integral,
    physics: Annotated[
        Physics,
        typer.Option(
            help="mono: line integrals of μ(HU); poly: polychromatic materials × spectrum; simulated: poly plus "
            "the detector model (scatter, noise, blur, log, 12 bits)."
        ),
    ] = Physics.mono,
    kvp: Annotated[float, typer.Option(help="Tube voltage for --physics poly/simulated, kV.")] = 90.0,
    seed: Annotated[int, typer.Option(help="Noise seed for --physics simulated.")] = 0,
    compare: Annotated[
        bool, typer.Option(help="Write mono | poly | simulated side by side (PNG) instead of one image.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Overwrite --out if it exists.")] = False,
) -> None:
    """Render a DRR of a CT for one C-arm pose (default: an AP view centred on the CT)."""
    from ..geometry import Camera, Intrinsics, carm_pose
    from ..io import AttenuationModel, read_volume
    from ..render import render as render_drr

    try:
        _check_out(out, force, (".png",) if compare else (".png", ".npy", ".tif", ".tiff"))
        if not 20.0 <= kvp <= 150.0:
            raise InputError(f"--kvp: expected a tube voltage in [20, 150] kV, got {kvp:g}")
        if physics is not Physics.mono and (select is not None or output is not Output.line_integral):
            raise InputError("--select and --output apply to --physics mono only")
        for name, value in (("--sdd", sdd), ("--sid", sid), ("--detector-mm", detector_mm)):
            _check_distance(value, name)
        volume = read_volume(ct, labels=labels)
        if camera is not None:
            intr = Intrinsics.load(camera)
        else:
            side = detector_mm if detector_mm is not None else _fit_detector(volume, sdd, sid)
            intr = _square_detector(sdd, size, side)
        if pose is not None:
            pose_t = _load_pose(pose)
        else:
            iso = (
                _parse_triple(isocenter, "--isocenter") if isocenter else tuple(volume.center_world.tolist())
            )
            pose_t = carm_pose(
                lao,
                cranial,
                inplane,
                source_to_isocenter=sid if sid is not None else intr.sdd / 2,
                isocenter=iso,
            )
        if compare or physics is not Physics.mono:
            start = time.perf_counter()
            images = _physics_images(volume, Camera(intr, pose_t), method=method.value, kvp=kvp, seed=seed)
            elapsed = time.perf_counter() - start
            if compare:
                from ..viz import save_panels

                titles = _compare_titles(kvp)
                save_panels(out, list(images.values()), [titles[k] for k in images])
            else:
                _save(images[physics.value].numpy(), out)
            what = "mono | poly | simulated" if compare else physics.value
            console.print(f"wrote {out} ({intr.rows}×{intr.cols}, {what}, {1000 * elapsed:.0f} ms)")
            return
        density = AttenuationModel()(volume.data)
        if select is not None:
            if volume.labels is None:
                raise InputError("--select needs --labels")
            try:
                ids = torch.tensor([int(v) for v in select.split(",")])
            except ValueError:
                raise InputError(
                    f"--select: expected comma-separated integer label ids, got {select!r}"
                ) from None
            density = density * torch.isin(volume.labels.long(), ids)
        start = time.perf_counter()
        image = render_drr(
            density, volume.affine, Camera(intr, pose_t), method=method.value, output=output.value
        ).detach()
        elapsed = time.perf_counter() - start
        _save(image[0].numpy(), out)
    except XrayposeError as exc:
        _fail(str(exc))
    console.print(f"wrote {out} ({intr.rows}×{intr.cols}, {method.value}, {1000 * elapsed:.0f} ms)")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output PNG.")] = Path("xraypose-demo.png"),
    size: Annotated[int, typer.Option(help="Detector rows and columns, pixels.")] = 256,
    compare: Annotated[
        bool,
        typer.Option(
            help="Show the AP view as mono | polychromatic | simulated X-ray instead of three angles."
        ),
    ] = False,
    force: Annotated[bool, typer.Option(help="Overwrite --out if it exists.")] = False,
) -> None:
    """Render the built-in chest CT from three C-arm angles (or three physics models) side by side."""
    from ..geometry import Camera, carm_pose
    from ..io import AttenuationModel, load_default_ct
    from ..render import normalize_display
    from ..render import render as render_drr

    try:
        _check_out(out, force, (".png",))
        _check_size(size)
        volume = load_default_ct(with_labels=False)
        intr = _square_detector(1020.0, size, _fit_detector(volume, 1020.0, 510.0))
        angles = torch.tensor([[0.0, 0.0], [30.0, 0.0], [-20.0, 15.0]])
        poses = carm_pose(
            angles[:, 0],
            angles[:, 1],
            source_to_isocenter=510.0,
            isocenter=tuple(volume.center_world.tolist()),
        )
        if compare:
            from ..viz import save_panels

            start = time.perf_counter()
            physics_images = _physics_images(
                volume, Camera(intr, poses[:1]), method="trilinear", kvp=90.0, seed=0
            )
            elapsed = time.perf_counter() - start
            titles = _compare_titles(90.0)
            save_panels(out, list(physics_images.values()), [titles[k] for k in physics_images])
            console.print(
                f"wrote {out}: default chest CT, AP view, mono / polychromatic / simulated X-ray, "
                f"{size}×{size} px, in {1000 * elapsed:.0f} ms"
            )
            return
        density = AttenuationModel()(volume.data)
        start = time.perf_counter()
        images = render_drr(density, volume.affine, Camera(intr, poses))
        elapsed = time.perf_counter() - start
        tiles = normalize_display(images).numpy()
        from ..io.images import save_image

        save_image(np.concatenate(list(tiles), axis=1), out)
    except XrayposeError as exc:
        _fail(str(exc))
    console.print(
        f"wrote {out}: default chest CT, AP / LAO 30° / RAO 20° cranial 15°, {size}×{size} px, "
        f"3 views in {1000 * elapsed:.0f} ms"
    )


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)


from . import benchmark as _benchmark  # noqa: E402,F401
from . import make_benchmark as _make_benchmark  # noqa: E402,F401
from . import register as _register  # noqa: E402,F401
from . import train as _train  # noqa: E402,F401
from . import train_similarity as _train_similarity  # noqa: E402,F401
