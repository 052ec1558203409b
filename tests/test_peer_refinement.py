"""Peer refinement in the benchmark runner (issue 4 item 5): DiffPose / xvr recipes run by DiffDRR / nanodrr in
the peers' own Python (``xraypose/registration/_peer_refine.py``), driven by
:class:`xraypose.registration.benchmark.PeerRefinement`.

Default tests need no peer: the recipe settings and geometry helpers of the peer script (importable with our
torch), the spec the runner writes (detector, target pixel order, the initial pose in the peer's conventions),
the pose round trip through a fake peer script, error messages, the runner and the CLI. ``-m slow`` runs the
real peers when ``XRAYPOSE_PEER_PYTHON`` or ``~/.cache/xraypose-peers/bin/python`` exists: their DRRs of a pose
against ours (pixel level, with the peers' own density models), the exact round trip of an unoptimised pose,
and tiny-budget refinements from a known perturbation.
"""

from __future__ import annotations

import ast
import json
import math
import os
import signal
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cli_helpers import assert_user_error, invoke
from xraypose.errors import InputError, XrayposeError
from xraypose.geometry import Camera, Intrinsics, carm_pose
from xraypose.geometry.diffdrr import (
    DiffDRRGeometry,
    diffdrr_isocenter,
    diffdrr_pose_to_world,
)
from xraypose.geometry.sampling import perturb_poses
from xraypose.io import Volume, load_default_ct
from xraypose.metrics import mtre
from xraypose.registration import _peer_refine as peer
from xraypose.registration import benchmark as runner
from xraypose.registration.benchmark import (
    PEER_METHODS,
    PEER_SCRIPT,
    PeerRefinement,
    peer_method,
    read_results,
    report_markdown,
    run_benchmark,
)

AFFINE = torch.tensor(
    [[-2.0, 0.0, 0.0, 40.0], [0.0, 2.5, 0.0, -30.0], [0.0, 0.0, 3.0, 12.0], [0.0, 0.0, 0.0, 1.0]],
    dtype=torch.float64,
)
INTR = Intrinsics(sdd=1020.0, rows=6, cols=8, dy=2.0, dx=1.5, x0=3.0, y0=-2.0)

FAKE_PEER = """
import json, os, sys, time
import numpy as np

spec = json.load(open(sys.argv[1]))
mode = os.environ.get("FAKE_PEER", "echo")
log = os.environ.get("FAKE_PEER_LOG")
if log:
    with open(log, "a") as fh:
        fh.write(spec["recipe"] + "\\n")
if mode == "crash":
    print("warming up", file=sys.stderr)
    print("boom: the peer fell over", file=sys.stderr)
    sys.exit(3)
if mode == "sleep":
    time.sleep(60)
if mode == "error":
    tb = "Traceback (most recent call last):\\n  File 'x.py', line 1\\n    refine()\\nRuntimeError: no luck\\n"
    json.dump({"ok": False, "error": "RuntimeError: no luck", "traceback": tb}, open(spec["out"], "w"))
    sys.exit(1)
target = np.load(spec["target"])
assert target.shape == (spec["intrinsics"]["rows"], spec["intrinsics"]["cols"]), target.shape
assert os.path.isfile(spec["ct"]), spec["ct"]
pose = [list(row) for row in spec["init"]]
pose[0][3] += 5.0  # the source 5 mm along the peer world's x axis (DiffDRR's centred world: RAS axes)
result = {
    "ok": True, "pose": pose, "seconds": 0.125, "load_seconds": 0.5, "iterations": 7, "loss": 0.1,
    "initial_loss": 0.3, "stop_reason": "iterations", "diverged": False, "threads": spec["threads"],
    "stages": [{"rows": target.shape[0], "cols": target.shape[1], "iterations": 7}],
    "settings": spec["settings"],
}
json.dump(result, open(spec["out"], "w"))
"""


def _volume() -> Volume:
    gen = torch.Generator().manual_seed(0)
    return Volume(data=torch.randn(10, 12, 14, generator=gen) * 300, affine=AFFINE)


@pytest.fixture
def fake_script(tmp_path: Path) -> Path:
    path = tmp_path / "fake_peer.py"
    path.write_text(FAKE_PEER)
    return path


def _fake(script: Path, recipe: str = "xvr", **kwargs) -> PeerRefinement:
    name = "peer-xvr" if recipe == "xvr" else "peer-diffpose"
    return PeerRefinement(name, Path(sys.executable), script, recipe=recipe, threads=1, **kwargs)


def _pose(volume: Volume, deg: float = 20.0) -> torch.Tensor:
    centre = volume.center_world.float()
    return carm_pose(
        torch.tensor([deg]), torch.tensor([-7.0]), 3.0, source_to_isocenter=600.0, isocenter=centre
    )


# ---------------------------------------------------------------------------------------------- peer script
def test_recipe_defaults_and_overrides() -> None:
    d = peer.resolve_settings("diffpose")
    assert (d["renderer"], d["render_method"], d["sizes"], d["iterations"]) == (
        "diffdrr",
        "siddon",
        [None],
        [500],
    )
    assert (d["lr_rot"], d["lr_xyz"], d["step_size"], d["gamma"]) == (7.5e-3, 7.5, 25, 0.9)
    assert (d["similarity"], d["parameterization"]) == ("mncc13", "se3_log_map")
    x = peer.resolve_settings("xvr")
    assert (x["renderer"], x["sizes"], x["iterations"], x["lr_rot"], x["lr_xyz"]) == (
        "nanodrr",
        [64, 128],
        [150, 100],
        1e-2,
        1.0,
    )
    assert (x["similarity"], x["scheduler"], x["patience"], x["max_n_plateaus"]) == ("gmncc", "plateau", 5, 2)
    # overrides: one number for every stage; stages from sizes; xvr on DiffDRR uses DiffDRR's se3_log_map
    r = peer.resolve_settings("diffpose", {"sizes": [128], "iterations": 100, "render_method": "trilinear"})
    assert (r["sizes"], r["iterations"], r["render_method"]) == ([128], [100], "trilinear")
    assert peer.resolve_settings("xvr", {"iterations": 3})["iterations"] == [3, 3]
    assert peer.resolve_settings("xvr", {"renderer": "diffdrr"})["parameterization"] == "se3_log_map"
    assert peer.RECIPES["diffpose"]["iterations"] == [500]  # not mutated


@pytest.mark.parametrize(
    ("recipe", "overrides", "needle"),
    [
        ("dippose", {}, "unknown recipe"),
        ("xvr", {"lr": 1.0}, "unknown setting 'lr'"),
        ("xvr", {"sizes": [64]}, "give one per stage"),
        ("xvr", {"render_method": "siddon"}, "trilinear only"),
        ("diffpose", {"renderer": "pytorch3d"}, "renderer"),
        ("diffpose", {"sizes": [4]}, "sizes"),
        ("diffpose", {"sizes": []}, "at least one stage"),
        ("diffpose", {"iterations": -1}, "non-negative"),
        ("diffpose", {"n_samples": 1}, "n_samples"),
    ],
)
def test_recipe_errors(recipe: str, overrides: dict, needle: str) -> None:
    with pytest.raises(peer.SpecError, match=needle):
        peer.resolve_settings(recipe, overrides)


def test_stage_detector_keeps_the_physical_detector() -> None:
    det = {"sdd": 1020.0, "height": 256, "width": 192, "delx": 1.2, "dely": 1.1, "x0": 4.0, "y0": -3.0}
    assert peer.stage_detector(det, None) == det
    small = peer.stage_detector(det, 64)
    assert (small["height"], small["width"]) == (64, 48)
    assert math.isclose(small["height"] * small["dely"], 256 * 1.1)
    assert math.isclose(small["width"] * small["delx"], 192 * 1.2)
    assert (small["x0"], small["y0"], small["sdd"]) == (4.0, -3.0, 1020.0)


def test_target_preparation() -> None:
    img = torch.rand(1, 1, 32, 24) * 5 + 2
    out = peer.prepare_target(img, "xvr", 16, 12)
    assert out.shape == (1, 1, 16, 12)
    full = peer.prepare_target(img, "xvr", 32, 24)  # no resize: min-max, then (x − 0.15)/0.1
    assert torch.allclose(full, (peer.minmax(img, 1e-6) - 0.15) / 0.1)
    assert math.isclose(float(full.min()), -1.5, abs_tol=1e-5)
    same = peer.prepare_target(img, "diffpose", 32, 24)
    assert torch.allclose(same, (peer.minmax(img, 1e-6) - 0.3080) / 0.1494)
    assert peer.prepare_render(img, "diffpose") is img
    with pytest.raises(peer.SpecError):
        peer.prepare_target(img, "other", 8, 8)


def test_json_written_atomically(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    peer.write_json_atomic(str(out), {"a": [1, 2], "b": math.nan})
    assert json.loads(out.read_text())["a"] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_script_main_reports_errors(tmp_path: Path) -> None:
    assert peer.main(["_peer_refine.py"]) == 2
    assert peer.main(["_peer_refine.py", str(tmp_path / "missing.json")]) == 2
    spec = {"recipe": "nope", "out": str(tmp_path / "result.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert peer.main(["_peer_refine.py", str(tmp_path / "spec.json")]) == 1
    result = json.loads((tmp_path / "result.json").read_text())
    assert not result["ok"] and "unknown recipe" in result["error"] and "Traceback" in result["traceback"]


def test_script_is_package_data_and_imports_no_xraypose() -> None:
    assert PEER_SCRIPT.is_file()
    assert (files("xraypose.registration") / "_peer_refine.py").is_file()
    tree = ast.parse(PEER_SCRIPT.read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in the peer script"
            roots.add(str(node.module).split(".")[0])
    allowed = {"__future__", "copy", "json", "math", "os", "sys", "tempfile", "time", "traceback", "typing"}
    allowed |= {"importlib", "numpy", "torch", "diffdrr", "nanodrr", "torchio"}
    assert roots <= allowed, roots - allowed


# ---------------------------------------------------------------------------------------------- the spec
@pytest.mark.parametrize("orientation", ["AP", "PA"])
@pytest.mark.parametrize("renderer", ["diffdrr", "nanodrr"])
def test_pose_conventions_round_trip(renderer: str, orientation: str) -> None:
    vol = _volume()
    method = _fake(Path("x.py"), orientation=orientation).bind_ct(vol, None)
    pose = _pose(vol).double()
    there = method.to_peer_pose(pose, renderer)
    assert there.shape == (4, 4)
    assert torch.allclose(method.from_peer_pose(there, renderer), pose, atol=1e-9)
    c = diffdrr_isocenter(AFFINE, vol.shape)
    if renderer == "diffdrr":  # DiffDRR's M: our pose = Trans(c) · M · C (xraypose.geometry.diffdrr)
        back = diffdrr_pose_to_world(there[None], None, "matrix", None, AFFINE, vol.shape, orientation)
        assert torch.allclose(back, pose, atol=1e-9)
    else:  # nanodrr's rt_inv: our camera frame, in DiffDRR's centred world
        assert torch.allclose(there[:3, :3], pose[0, :3, :3])
        assert torch.allclose(there[:3, 3], pose[0, :3, 3] - c)


@pytest.mark.parametrize("orientation", ["AP", "PA"])
def test_spec_contents(tmp_path: Path, orientation: str) -> None:
    vol = _volume()
    method = _fake(Path("x.py"), "diffpose", orientation=orientation, settings={"sizes": [32]}).bind_ct(vol)
    assert method.ct_path is not None and method.ct_path.is_file()  # the volume written to a temporary NIfTI
    target = torch.arange(48, dtype=torch.float32).reshape(1, 6, 8)
    pose = _pose(vol)
    spec = method.spec(target, INTR, pose, tmp_path, seed=5)
    geom = DiffDRRGeometry.from_intrinsics(INTR, orientation)
    assert spec["diffdrr_detector"] == geom.drr_kwargs()
    assert spec["settings"]["sizes"] == [32] and spec["settings"]["renderer"] == "diffdrr"
    assert (spec["seed"], spec["threads"], spec["device"], spec["orientation"]) == (5, 1, "cpu", orientation)
    assert spec["nanodrr_intrinsics"] == {
        "sdd": 1020.0,
        "delx": 1.5,
        "dely": 2.0,
        "x0": 3.0,
        "y0": -2.0,
        "height": 6,
        "width": 8,
    }
    stored = torch.from_numpy(np.load(spec["target"]))
    assert torch.equal(stored, geom.image_to_diffdrr(target[0]))
    assert torch.equal(stored, target[0].flip(-1) if orientation == "PA" else target[0])
    m = torch.tensor(spec["init"], dtype=torch.float64)
    world = diffdrr_pose_to_world(m[None], None, "matrix", None, AFFINE, vol.shape, orientation)
    assert torch.allclose(world, pose.double(), atol=1e-5)
    # nanodrr gets our pixel order
    spec = _fake(Path("x.py"), "xvr").bind_ct(vol).spec(target, INTR, pose, tmp_path)
    assert torch.equal(torch.from_numpy(np.load(spec["target"])), target[0])
    assert spec["settings"]["renderer"] == "nanodrr"


def test_spec_checks(tmp_path: Path) -> None:
    vol = _volume()
    unbound = _fake(Path("x.py"))
    with pytest.raises(InputError, match="no CT bound"):
        unbound.spec(torch.zeros(1, 6, 8), INTR, _pose(vol), tmp_path)
    bound = unbound.bind_ct(vol)
    with pytest.raises(InputError, match="does not match the detector"):
        bound.spec(torch.zeros(1, 5, 8), INTR, _pose(vol), tmp_path)
    with pytest.raises(InputError, match=r"\(1, rows, cols\)"):
        bound.spec(torch.zeros(2, 6, 8), INTR, _pose(vol), tmp_path)


# ---------------------------------------------------------------------------------------------- fake peer
@pytest.mark.parametrize("recipe", ["xvr", "diffpose"])
def test_fake_peer_round_trip(fake_script: Path, recipe: str) -> None:
    vol = _volume()
    method = _fake(fake_script, recipe).bind_ct(vol)
    init = _pose(vol)
    result = method(None, torch.zeros(1, 6, 8), INTR, init)
    expected = init.clone()
    expected[0, 0, 3] += 5.0  # the fake peer moved the source +5 mm along x of its world (RAS axes)
    assert result.pose.shape == (1, 4, 4) and result.pose.dtype == torch.float32
    assert torch.allclose(result.pose, expected, atol=1e-4)
    assert (result.iterations, result.loss, result.initial_loss, result.seconds) == (7, 0.1, 0.3, 0.125)
    assert result.stop_reason == "iterations" and result.diverged is False
    ex = result.extra
    assert ex["peer_recipe"] == recipe and ex["peer_renderer"] == (
        "nanodrr" if recipe == "xvr" else "diffdrr"
    )
    assert ex["peer_seconds"] == 0.125 and ex["peer_load_seconds"] == 0.5 and ex["peer_wall_seconds"] > 0
    assert ex["peer_threads"] == 1 and ex["peer_stages"][0]["iterations"] == 7


@pytest.mark.parametrize(
    ("mode", "needles"),
    [
        ("crash", ("exit code 3", "boom: the peer fell over")),
        ("error", ("RuntimeError: no luck", "refine()")),
    ],
)
def test_fake_peer_failures(fake_script, monkeypatch: pytest.MonkeyPatch, mode: str, needles: tuple) -> None:
    monkeypatch.setenv("FAKE_PEER", mode)
    vol = _volume()
    method = _fake(fake_script).bind_ct(vol)
    with pytest.raises(XrayposeError) as info:
        method(None, torch.zeros(1, 6, 8), INTR, _pose(vol))
    for needle in ("'peer-xvr'", *needles):
        assert needle in str(info.value), (needle, str(info.value))


def test_fake_peer_timeout(fake_script, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_PEER", "sleep")
    vol = _volume()
    method = _fake(fake_script, timeout_s=1.0).bind_ct(vol)
    with pytest.raises(XrayposeError, match=r"timed out after 1 s.*--peer-iterations"):
        method(None, torch.zeros(1, 6, 8), INTR, _pose(vol))


# ---------------------------------------------------------------------------------------------- factory
def _fake_python(tmp_path: Path, stdout: str, code: int = 0) -> Path:
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\necho '{stdout}'\nexit {code}\n")
    path.chmod(0o755)
    return path


def test_peer_method_checks(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"not found.*setup-peers\.sh"):
        peer_method("xvr", tmp_path / "nowhere" / "python")
    lacking = _fake_python(tmp_path, '{"torch": "2.14.1", "diffdrr": "0.6.1", "nanodrr": null}')
    with pytest.raises(InputError, match=r"lacks nanodrr.*setup-peers\.sh"):
        peer_method("peer-xvr", lacking)
    ok = peer_method("diffpose", lacking, iterations=100, sizes=128)  # DiffDRR is there
    assert ok.name == "peer-diffpose" and ok.versions["diffdrr"] == "0.6.1"
    assert ok.resolved_settings()["sizes"] == [128] and ok.resolved_settings()["iterations"] == [100]
    (tmp_path / "b").mkdir()
    broken = _fake_python(tmp_path / "b", "oops", code=1)
    with pytest.raises(InputError, match="exit code 1"):
        peer_method("diffpose", broken)
    with pytest.raises(InputError, match="unknown peer recipe"):
        peer_method("elastix", lacking, check=False)
    with pytest.raises(InputError, match="runs on nanodrr"):
        peer_method("peer-xvr", lacking, renderer="diffdrr", check=False)
    with pytest.raises(InputError, match="timeout_s"):
        peer_method("xvr", lacking, timeout_s=0, check=False)
    with pytest.raises(InputError, match="unknown setting"):
        peer_method("xvr", lacking, options={"momentum": 0.9}, check=False)
    full = peer_method("xvr", lacking, sizes=["full", 64], iterations=[1, 2], check=False)
    assert full.resolved_settings()["sizes"] == [None, 64]
    assert peer_method("xvr", lacking, renderer="diffdrr", check=False).name == "peer-xvr-diffdrr"
    assert set(PEER_METHODS) == {"peer-diffpose", "peer-xvr", "peer-xvr-diffdrr"}


def test_describe_and_report_line() -> None:
    method = PeerRefinement("peer-diffpose", Path("py"), recipe="diffpose", settings={"sizes": [128]})
    info = method.describe()
    assert info["recipe"] == "diffpose" and info["settings"]["sizes"] == [128]
    assert "optimisation" in info["timing"]
    line = runner._peer_line("peer-diffpose", info)
    assert "diffpose recipe on diffdrr (siddon)" in line and "detector rows 128" in line and "500" in line


# ---------------------------------------------------------------------------------------------- runner, CLI
@pytest.fixture(scope="module")
def bench_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xraypose.datasets import make_synthetic_benchmark, mobile_carm_intrinsics

    out = tmp_path_factory.mktemp("bench") / "bench.h5"
    return make_synthetic_benchmark(
        load_default_ct(),
        1,
        5,
        out,
        intrinsics=mobile_carm_intrinsics(32),
        levels=((2.0, 5.0),),
        inits_per_level=1,
    )


def test_runner_with_a_fake_peer(fake_script, bench_path: Path, tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_PEER_LOG", str(log))
    method = _fake(fake_script, "diffpose", settings={"sizes": [16], "iterations": 3})
    results = run_benchmark(
        bench_path, ["peer-diffpose"], method_table={"peer-diffpose": method}, device="cpu"
    )
    assert len(log.read_text().splitlines()) == 1  # one run, no warm-up call
    (rec,) = results
    assert rec.method == "peer-diffpose" and rec.seconds == 0.125 and rec.iterations == 7
    assert rec.extra["wall_seconds"] > 0 and rec.extra["peer_recipe"] == "diffpose"
    assert rec.extra["loss"] == 0.1 and rec.extra["method_seconds"] == 0.125
    assert rec.mtre_mm > 0  # moved 5 mm off the initial pose
    meta = results.metadata["peer_methods"]["peer-diffpose"]
    assert meta["settings"]["sizes"] == [16] and meta["settings"]["iterations"] == [3]
    assert meta["ct"] and Path(meta["ct"]).name == "ct.nii.gz"  # the bundled CT, written for the peer
    text = report_markdown(results, results.metadata)
    assert (
        "- peer `peer-diffpose`: diffpose recipe on diffdrr (siddon), detector rows 16, Adam steps 3" in text
    )
    out = runner.write_results(results, tmp_path / "out")
    assert read_results(out["cases.csv"])[0].extra["peer_stages"][0]["iterations"] == 7


def test_runner_resolves_peer_names(bench_path: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"peer_python \(--peer-python\)"):
        run_benchmark(bench_path, ["peer-xvr"], method_table={}, device="cpu")
    with pytest.raises(InputError, match="not found"):
        run_benchmark(bench_path, ["peer-xvr"], method_table={}, device="cpu", peer_python=tmp_path / "py")
    with pytest.raises(InputError, match="peer-xvr"):
        run_benchmark(bench_path, ["nope"], method_table={}, device="cpu")


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (("--method", "peer-xvr"), ("--peer-python", "setup-peers.sh")),
        (("--method", "peer-xvr", "--peer-python", "/nowhere/python"), ("/nowhere/python", "not found")),
        (("--method", "peer-xvr", "--peer-python", "PY", "--peer-iterations", "a"), ("--peer-iterations",)),
        (("--method", "peer-xvr", "--peer-python", "PY", "--peer-sizes", "64,x"), ("--peer-sizes", "full")),
        (("--method", "peer-xvr", "--peer-python", "PY", "--peer-sizes", "64"), ("one per stage",)),
        (
            ("--method", "peer-xvr", "--peer-python", "PY", "--peer-render-method", "siddon"),
            ("trilinear only",),
        ),
        (("--method", "diffpose", "--peer-sizes", "64"), ("--peer-sizes", "only for peer methods")),
    ],
)
def test_cli_peer_errors(bench_path: Path, tmp_path: Path, monkeypatch, extra: tuple, needles: tuple) -> None:
    monkeypatch.delenv("XRAYPOSE_PEER_PYTHON", raising=False)
    python = _fake_python(tmp_path, '{"torch": "2.14.1", "diffdrr": "0.6.1", "nanodrr": "0.1.7"}')
    args = [str(python) if a == "PY" else a for a in extra]
    result = invoke("benchmark", "--bench", bench_path, "--out", tmp_path / "out", *args)
    assert_user_error(result, *needles)
    assert not (tmp_path / "out" / "cases.csv").exists()


def test_cli_runs_a_peer_row(fake_script, bench_path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("XRAYPOSE_PEER_PYTHON", raising=False)
    real = runner.peer_method

    def with_fake_script(*args, **kwargs):  # the CLI builds the method; swap its script for the fake peer
        from dataclasses import replace

        return replace(real(*args, check=False, **kwargs), script=fake_script)

    monkeypatch.setattr(runner, "peer_method", with_fake_script)
    out = tmp_path / "res"
    result = invoke(
        "benchmark", "--bench", bench_path, "--out", out, "--method", "peer-xvr",
        "--peer-python", sys.executable, "--peer-iterations", "2,3", "--peer-sizes", "16,full",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| peer-xvr |" in result.output and "detector rows 16→full, Adam steps 2+3" in result.output
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["peer_methods"]["peer-xvr"]["settings"]["sizes"] == [16, None]
    assert meta["peer_methods"]["peer-xvr"]["settings"]["iterations"] == [2, 3]


# ---------------------------------------------------------------------------------------------- real peers
def _peer_python() -> Path | None:
    given = os.environ.get("XRAYPOSE_PEER_PYTHON")
    path = Path(given) if given else Path.home() / ".cache" / "xraypose-peers" / "bin" / "python"
    return path if path.exists() else None


@pytest.fixture(scope="module")
def scene():
    """The default CT, a 64² detector, a true pose, our monochromatic DRR of it, a start 3°/6 mm away and
    landmarks on an 80 mm cube about the CT's centre."""
    from xraypose.registration import VolumeRenderer

    torch.set_num_threads(1)
    vol = load_default_ct(with_labels=False)
    renderer = VolumeRenderer(vol)
    centre = vol.center_world.float()
    intr = Intrinsics(sdd=1020.0, rows=64, cols=64, dy=4.8, dx=4.8)
    truth = carm_pose(
        torch.tensor([10.0]), torch.tensor([5.0]), 0.0, source_to_isocenter=620.0, isocenter=centre
    )
    with torch.no_grad():
        target = renderer(Camera(intr, truth))
    gen = torch.Generator().manual_seed(0)
    init = perturb_poses(truth.double(), 3.0, 6.0, centre.double(), generator=gen).float()
    offsets = torch.tensor([[x, y, z] for x in (-40, 40) for y in (-40, 40) for z in (-40, 40)])
    return SimpleNamespace(
        vol=vol,
        renderer=renderer,
        intr=intr,
        truth=truth,
        target=target,
        init=init,
        landmarks=centre + offsets,
    )


def _mtre(pose: torch.Tensor, scene) -> float:
    return float(mtre(pose.double(), scene.truth.double(), scene.landmarks.double())[0])


@pytest.mark.slow
def test_real_peers_render_our_geometry(scene) -> None:
    """The peers' DRRs of a pose on an anisotropic, off-centre detector equal ours pixel by pixel when our
    renderer integrates the same density (DiffDRR's, nanodrr's HU → μ); a mirrored image would be ~14 % off."""
    python = _peer_python()
    if python is None:
        pytest.skip("no peer Python (XRAYPOSE_PEER_PYTHON or ~/.cache/xraypose-peers; setup-peers.sh)")
    from xraypose.geometry.diffdrr import diffdrr_density
    from xraypose.io import hu_to_mu
    from xraypose.render import render

    vol = scene.vol
    intr = Intrinsics(sdd=1020.0, rows=48, cols=64, dy=5.0, dx=4.5, x0=12.0, y0=-7.0)
    pose = carm_pose(
        torch.tensor([25.0]), torch.tensor([10.0]), 0.0, source_to_isocenter=620.0, isocenter=vol.center_world
    )
    cam = Camera(intr, pose)
    nano_mu = hu_to_mu(
        vol.data, mu_water=0.0192, bone_threshold_hu=0.0, bone_scale=(0.0573 - 0.0192) / 0.0192
    )
    with torch.no_grad():
        ours = {
            "diffdrr": render(diffdrr_density(vol.data), vol.affine, cam),
            "nanodrr": render(nano_mu, vol.affine, cam),
        }
    for name, kwargs in (("peer-xvr-diffdrr", {"render_method": "siddon"}), ("peer-xvr", {})):
        method = peer_method(name, python, ct=vol, threads=1, **kwargs)
        image = method.render(intr, pose)
        ref = ours[method.resolved_settings()["renderer"]]
        rel = float((image - ref).abs().mean() / ref.abs().max())
        mirrored = float((image.flip(-1) - ref).abs().mean() / ref.abs().max())
        assert rel < 0.01 and mirrored > 0.05, (name, rel, mirrored)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["peer-xvr", "peer-diffpose"])
def test_real_peers_refine(scene, name: str) -> None:
    python = _peer_python()
    if python is None:
        pytest.skip("no peer Python (XRAYPOSE_PEER_PYTHON or ~/.cache/xraypose-peers; setup-peers.sh)")
    budget = {"sizes": [32, 64], "iterations": [20, 20]} if name == "peer-xvr" else {"iterations": 30}
    method = peer_method(name, python, ct=scene.vol, threads=1, **budget)
    # unoptimised, the pose makes the round trip through the peer's own pose utilities exactly
    unmoved = peer_method(name, python, ct=scene.vol, threads=1, iterations=0)
    still = unmoved(scene.renderer, scene.target, scene.intr, scene.truth)
    assert _mtre(still.pose, scene) < 1e-2 and still.iterations == 0
    start = _mtre(scene.init, scene)
    result = method(scene.renderer, scene.target, scene.intr, scene.init)
    assert _mtre(result.pose, scene) < 0.8 * start, (start, _mtre(result.pose, scene))
    assert result.seconds > 0 and result.extra["peer_wall_seconds"] > result.seconds
    assert result.loss < result.initial_loss
    if name == "peer-xvr":  # xvr's small steps stay at the truth; DiffPose's Adam (7.5 mm) wanders a few mm
        stay = method(scene.renderer, scene.target, scene.intr, scene.truth)
        assert _mtre(stay.pose, scene) < 1.0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_cli_sigterm_stops_the_peer_process(bench_path: Path, tmp_path: Path) -> None:
    """``kill`` (SIGTERM) of ``xraypose benchmark`` ends the peer process it is waiting on, instead of leaving
    it to run alone."""
    pidfile = tmp_path / "peer.pid"
    python = tmp_path / "python"
    versions = '{"torch": "2.14.1", "diffdrr": "0.6.1", "nanodrr": "0.1.7"}'
    python.write_text(
        f'#!/bin/sh\nif [ "$1" = "-c" ]; then echo \'{versions}\'; exit 0; fi\n'
        f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}\nexec sleep 120\n"
    )
    python.chmod(0o755)
    cmd = [sys.executable, "-c", "from xraypose.cli import main; main()", "benchmark", "--bench", str(bench_path),
           "--out", str(tmp_path / "out"), "--method", "peer-xvr", "--peer-python", str(python)]  # fmt: skip
    cli = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not pidfile.exists():
            assert cli.poll() is None, cli.communicate()[0]
            assert time.monotonic() < deadline, "the fake peer never started"
            time.sleep(0.1)
        peer_pid = int(pidfile.read_text())
        cli.send_signal(signal.SIGTERM)
        output, _ = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 128 + signal.SIGTERM, output
    for _ in range(100):
        try:
            os.kill(peer_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(peer_pid, signal.SIGKILL)
        pytest.fail("the peer process outlived the benchmark it belonged to")
    assert not (tmp_path / "out" / "cases.csv").exists()
