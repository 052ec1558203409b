"""The registration benchmark runner: runs, scores, writes tables/plots, and the ``benchmark`` command."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import h5py
import pytest
import torch
from PIL import Image

from cli_helpers import assert_user_error, invoke
from xraypose.datasets import make_synthetic_benchmark, mobile_carm_intrinsics, read_synthetic_benchmark
from xraypose.errors import FileFormatError, InputError
from xraypose.io import Volume, load_default_ct, write_volume
from xraypose.metrics import CaseResult, mtre, summarize_by
from xraypose.registration import RegistrationConfig, Scale, register
from xraypose.registration import benchmark as runner
from xraypose.registration.benchmark import (
    OUTPUT_FILES,
    read_results,
    run_benchmark,
    write_results,
)
from xraypose.viz import plot_error_cdf, plot_success_vs_initial_error

LEVELS = ((2.0, 5.0), (5.0, 10.0))
LABELS = ("2°/5 mm", "5°/10 mm")
FAST = RegistrationConfig(scales=(Scale(16, 15), Scale(32, 10)), search=None)


def fast(renderer, target, intrinsics, init_pose, *, seed=0):
    return register(renderer, target, intrinsics, init_pose, FAST)


def identity(renderer, target, intrinsics, init_pose, *, seed=0):
    """Returns the initial pose unchanged: its errors are the initial errors."""
    return SimpleNamespace(pose=init_pose.clone(), iterations=0, stop_reason="identity")


TABLE = {"fast": fast, "identity": identity}


@pytest.fixture(scope="module")
def volume():
    return load_default_ct(with_labels=False)


@pytest.fixture(scope="module")
def bench_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "bench.h5"
    return make_synthetic_benchmark(
        load_default_ct(), 2, 5, out, intrinsics=mobile_carm_intrinsics(64), levels=LEVELS, inits_per_level=1
    )


@pytest.fixture(scope="module")
def run(bench_path: Path):
    calls: list[tuple[int, int]] = []
    results = run_benchmark(
        bench_path,
        ("fast", "identity"),
        method_table=TABLE,
        progress=lambda done, total: calls.append((done, total)),
        device="cpu",
    )
    return results, calls


@pytest.fixture(scope="module")
def written(run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results") / "results"
    paths = write_results(run[0], out)
    assert set(paths) == set(OUTPUT_FILES)
    return out


# ---------------------------------------------------------------------------------------------- runner
def test_runs_every_case_level_init_and_method(run, bench_path: Path) -> None:
    results, calls = run
    bench = read_synthetic_benchmark(bench_path)
    assert len(results) == 2 * 2 * 1 * 2
    assert all(isinstance(r, CaseResult) for r in results)
    assert [(r.case, r.level, r.method) for r in results] == [
        (f"{c:04d}", LABELS[lv], m) for c in range(2) for lv in range(2) for m in ("fast", "identity")
    ]
    assert calls[0] == (0, 8) and calls[-1] == (8, 8)
    assert [d for d, _ in calls] == list(range(9))

    for r in results:
        ci, li, k = r.extra["case_index"], r.extra["level_index"], r.extra["init_index"]
        assert (f"{ci:04d}", LABELS[li], k) == (r.case, r.level, 0)
        # the initial error is that of this case's initial pose at this level, from the file
        want = float(mtre(bench.init_poses[ci, li, k], bench.poses[ci], bench.landmarks_world)[0])
        assert r.initial_mtre_mm == pytest.approx(want, abs=1e-3)
        assert r.seconds is not None and r.seconds >= 0
        for value in (r.mtre_mm, r.mpd_mm, r.mrpe_px, r.rot_deg, r.trans_mm, r.dgeo_mm):
            assert value is not None and math.isfinite(value)
        assert r.rot_deg_xyz is not None and r.trans_mm_xyz is not None
        if r.method == "identity":
            assert r.mtre_mm == r.initial_mtre_mm  # exact: the unmoved pose is scored like the initial one
            assert r.rot_deg == pytest.approx(LEVELS[li][0], abs=1e-3)
            assert (r.iterations, r.stop_reason) == (0, "identity")
        else:
            assert r.iterations == 25 and r.stop_reason in ("iterations", "plateau")
            assert math.isfinite(r.extra["loss"]) and r.extra["loss"] <= r.extra["initial_loss"]
    fast_err = [r.mtre_mm for r in results if r.method == "fast"]
    init_err = [r.initial_mtre_mm for r in results if r.method == "fast"]
    assert sum(fast_err) < sum(init_err)  # the fast method does register

    meta = results.metadata
    assert meta["methods"] == ["fast", "identity"] and meta["physics"] == "mono" and meta["seed"] == 0
    assert meta["cases"] == [0, 1] and [lv["label"] for lv in meta["levels"]] == list(LABELS)
    assert meta["bench_sha256"] == hashlib.sha256(bench_path.read_bytes()).hexdigest()
    assert meta["bench_format"]["format"] == "xraypose-synthetic-benchmark"
    assert meta["machine"]["device"] == "cpu" and meta["machine"]["torch_threads"] >= 1


def test_selection_of_levels_and_cases(bench_path: Path) -> None:
    results = run_benchmark(bench_path, ["identity"], method_table=TABLE, levels=[1], max_cases=1)
    assert [(r.case, r.level) for r in results] == [("0000", LABELS[1])]
    results = run_benchmark(bench_path, ["identity"], method_table=TABLE, cases=[1], levels=[0], warmup=False)
    assert [(r.case, r.level) for r in results] == [("0001", LABELS[0])]


def test_method_errors_are_recorded_as_failed_runs(bench_path: Path) -> None:
    def broken(renderer, target, intrinsics, init_pose, *, seed=0):
        raise InputError("cannot register this one")

    (r,) = run_benchmark(bench_path, ["broken"], method_table={"broken": broken}, levels=[0], max_cases=1)
    assert math.isnan(r.mtre_mm) and r.stop_reason == "error: cannot register this one"
    assert math.isfinite(r.initial_mtre_mm)


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"methods": ["nope"]}, ("'nope'", "fast", "identity")),
        ({"methods": []}, ("at least one",)),
        ({"levels": [2]}, ("levels", "2°/5 mm", "5°/10 mm")),
        ({"cases": [7]}, ("cases", "7")),
        ({"max_cases": 0}, ("max_cases",)),
        ({"physics": "spectral"}, ("physics",)),
        ({"seed": -1}, ("seed",)),
    ],
)
def test_bad_arguments(bench_path: Path, kwargs: dict, needles: tuple) -> None:
    args = {"methods": ["identity"], "method_table": TABLE, **kwargs}
    with pytest.raises(InputError) as info:
        run_benchmark(bench_path, **args)
    for needle in needles:
        assert needle in str(info.value)


def test_default_method_table_is_checked(bench_path: Path) -> None:
    # with or without xraypose.registration.baselines, an unregistered name is a clear InputError
    with pytest.raises(InputError, match=r"no-such-method|no registration methods"):
        run_benchmark(bench_path, ["no-such-method"])


def test_ct_location(bench_path: Path, volume, tmp_path: Path) -> None:
    moved = tmp_path / "moved.h5"
    shutil.copyfile(bench_path, moved)
    with h5py.File(moved, "r+") as f:
        f.attrs["ct_source"] = str(tmp_path / "gone" / "ct.nii.gz")
    with pytest.raises(FileFormatError) as info:
        run_benchmark(moved, ["identity"], method_table=TABLE)
    assert str(tmp_path / "gone" / "ct.nii.gz") in str(info.value) and "--ct" in str(info.value)

    ct = tmp_path / "ct.nii.gz"
    write_volume(volume, ct)
    (r,) = run_benchmark(moved, ["identity"], method_table=TABLE, ct=ct, levels=[0], max_cases=1)
    assert r.mtre_mm == r.initial_mtre_mm
    with h5py.File(moved, "r+") as f:  # a relative path is also looked up beside the benchmark file
        f.attrs["ct_source"] = "ct.nii.gz"
    assert len(run_benchmark(moved, ["identity"], method_table=TABLE, levels=[0], max_cases=1)) == 1

    other = tmp_path / "other.nii.gz"
    write_volume(Volume(data=volume.data + 1.0, affine=volume.affine), other)
    with pytest.raises(InputError, match="differ"):
        run_benchmark(moved, ["identity"], method_table=TABLE, ct=other)
    with pytest.raises(FileFormatError, match=r"missing\.nii\.gz"):
        run_benchmark(moved, ["identity"], method_table=TABLE, ct=tmp_path / "missing.nii.gz")


# ---------------------------------------------------------------------------------------------- outputs
def test_results_csv(run, written: Path) -> None:
    results = run[0]
    with (written / "cases.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(results)
    columns = set(rows[0])
    for f in fields(CaseResult):
        if f.name.endswith("_xyz"):
            stem, unit = f.name[:-4].rsplit("_", 1)
            assert {f"{stem}_{a}_{unit}" for a in "xyz"} <= columns
        else:
            assert f.name in columns
    assert {r["method"] for r in rows} == {"fast", "identity"} and {r["level"] for r in rows} == set(LABELS)
    assert float(rows[1]["mtre_mm"]) == results[1].mtre_mm
    assert read_results(written / "cases.csv") == list(results)  # lossless round trip


def test_summary_markdown_and_json(run, written: Path) -> None:
    text = (written / "summary.md").read_text(encoding="utf-8")
    for needle in ("fast", "identity", *LABELS, "SR@1 mm", "SR@2 mm", "SR@5 mm", "SR@10 mm"):
        assert needle in text
    for needle in ("mTRE median (mm)", "mTRE mean (mm)", "rot median (°)", "trans median (mm)", "s/case"):
        assert needle in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| fast |") or ln.startswith("| identity |")]
    assert len(rows) == 2 * 2 + 2  # method × level, then one row per method over all levels
    # identity never moves: SR@1 is 0 % at every level
    assert all(" 0.0 |" in ln for ln in rows if ln.startswith("| identity |"))

    summary = json.loads((written / "summary.json").read_text())
    groups = summarize_by(run[0], ("method", "level"))
    assert len(summary["per_method_level"]) == len(groups) == 4
    first = summary["per_method_level"][0]
    assert (first["method"], first["level"]) == ("fast", LABELS[0])
    assert first["mtre_mm"]["median"] == pytest.approx(groups[("fast", LABELS[0])].mtre_mm.median)


def test_metadata_json(written: Path, bench_path: Path) -> None:
    meta = json.loads((written / "metadata.json").read_text())
    assert meta["bench_file"] == str(bench_path.resolve())
    assert meta["bench_sha256"] == hashlib.sha256(bench_path.read_bytes()).hexdigest()
    assert meta["methods"] == ["fast", "identity"] and meta["physics"] == "mono" and meta["seed"] == 0
    assert meta["xraypose_version"] and meta["bench_format"]["format_version"] == 1
    machine = meta["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] >= 1 and machine["device"] == "cpu"
    assert meta["runs"] == 8 and meta["outputs"] == list(OUTPUT_FILES)


def test_plots_are_valid_images(written: Path) -> None:
    for name in ("success_vs_initial_error.png", "mtre_cdf.png"):
        with Image.open(written / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
            im.verify()
    assert not [p.name for p in written.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_refuses_to_overwrite(run, written: Path) -> None:
    before = {name: (written / name).read_bytes() for name in OUTPUT_FILES}
    with pytest.raises(InputError, match="--force"):
        write_results(run[0], written)
    assert {name: (written / name).read_bytes() for name in OUTPUT_FILES} == before
    copy = written.parent / "again"
    shutil.copytree(written, copy)
    write_results(run[0][:4], copy, force=True)
    assert len(read_results(copy / "cases.csv")) == 4
    with pytest.raises(InputError, match="is a file"):
        write_results(run[0], written / "cases.csv")


def test_plot_functions_directly(run, tmp_path: Path) -> None:
    results = list(run[0])
    nan = CaseResult(case="x", level=LABELS[0], method="fast", mtre_mm=math.nan, initial_mtre_mm=3.0)
    zero = CaseResult(case="y", level=LABELS[0], method="fast", mtre_mm=0.0, initial_mtre_mm=3.0)
    assert plot_error_cdf([*results, nan, zero], tmp_path / "cdf.png").is_file()
    rows = list(summarize_by(results, ("method", "level")).values())
    assert plot_success_vs_initial_error(rows, tmp_path / "sr.png", thresholds=(2.0, 5.0)).is_file()
    with pytest.raises(InputError):
        plot_error_cdf([], tmp_path / "empty.png")
    with pytest.raises(InputError):
        plot_success_vs_initial_error([], tmp_path / "empty.png")
    with pytest.raises(InputError, match="format"):
        plot_error_cdf(results, tmp_path / "cdf.xyz")
    assert not (tmp_path / "empty.png").exists()


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def cli_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "default_method_table", lambda: TABLE)


def test_cli_benchmark(bench_path: Path, tmp_path: Path, cli_methods) -> None:
    out = tmp_path / "res"
    args = ("benchmark", "--bench", bench_path, "--method", "identity", "--method", "fast", "--out", out)
    result = invoke(*args, "--levels", "1", "--max-cases", 1, "--seed", 3, "--physics", "mono")
    assert result.exit_code == 0, result.output
    assert "| identity | 5°/10 mm |" in result.output and "| fast | 5°/10 mm |" in result.output
    assert "wrote" in result.output
    assert all((out / name).is_file() for name in OUTPUT_FILES)
    records = read_results(out / "cases.csv")
    assert [(r.case, r.level, r.method) for r in records] == [
        ("0000", LABELS[1], "identity"),
        ("0000", LABELS[1], "fast"),
    ]
    assert records[0].mtre_mm == records[0].initial_mtre_mm
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["seed"] == 3 and meta["methods"] == ["identity", "fast"]

    before = (out / "cases.csv").read_bytes()
    assert_user_error(invoke(*args), "--force", str(out))
    assert (out / "cases.csv").read_bytes() == before
    result = invoke(*args, "--force", "--levels", "0", "--max-cases", 1)
    assert result.exit_code == 0, result.output
    assert {r.level for r in read_results(out / "cases.csv")} == {LABELS[0]}


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (("--bench", "missing.h5"), ("missing.h5", "not found")),
        (("--method", "cmaes"), ("cmaes", "fast, identity")),
        (("--levels", "a,b"), ("--levels", "0,1")),
        (("--levels", "4"), ("levels", "4", "5°/10 mm")),
        (("--max-cases", 0), ("--max-cases",)),
        (("--seed", -1), ("--seed",)),
    ],
)
def test_cli_errors(bench_path: Path, tmp_path: Path, cli_methods, extra: tuple, needles: tuple) -> None:
    args = {"--bench": bench_path, "--out": tmp_path / "out", "--method": "identity"}
    args.update(dict(zip(extra[::2], extra[1::2], strict=True)))
    if args["--bench"] == "missing.h5":
        args["--bench"] = tmp_path / "missing.h5"
    flat = [x for kv in args.items() for x in kv]
    assert_user_error(invoke("benchmark", *flat), *needles)
    assert not (tmp_path / "out" / "cases.csv").exists()


def test_cli_missing_ct(bench_path: Path, tmp_path: Path, cli_methods) -> None:
    moved = tmp_path / "moved.h5"
    shutil.copyfile(bench_path, moved)
    with h5py.File(moved, "r+") as f:
        f.attrs["ct_source"] = "/nowhere/ct.nii.gz"
    assert_user_error(
        invoke("benchmark", "--bench", moved, "--method", "identity", "--out", tmp_path / "o"),
        "/nowhere/ct.nii.gz",
        "--ct",
    )


def test_identity_pose_is_untouched(bench_path: Path) -> None:
    """The runner hands the method the file's initial pose (float32) on the target's device."""
    seen = {}

    def spy(renderer, target, intrinsics, init_pose, *, seed=0):
        seen.update(target=target, init=init_pose, seed=seed, intrinsics=intrinsics)
        return identity(renderer, target, intrinsics, init_pose)

    run_benchmark(bench_path, ["spy"], method_table={"spy": spy}, levels=[1], cases=[1], seed=4, warmup=False)
    bench = read_synthetic_benchmark(bench_path)
    assert seen["seed"] == 4 and seen["intrinsics"] == bench.intrinsics
    assert seen["init"].dtype == torch.float32 and seen["init"].shape == (1, 4, 4)
    assert torch.equal(seen["init"][0].cpu(), bench.init_poses[1, 1, 0].float())
    assert torch.equal(seen["target"].cpu(), bench.images[1:2])


# ---------------------------------------------------------------------------------------------- --init model
@pytest.fixture(scope="module")
def tiny_model(bench_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pose regressor trained for two steps on the benchmark's CT and detector (poor poses: the test is of
    the pipeline)."""
    from xraypose.learning import PoseRegressorConfig, TrainingConfig, train

    out = tmp_path_factory.mktemp("model")
    config = TrainingConfig(
        steps=2, batch_size=2, image_size=32, warmup_steps=1, device="cpu", tensorboard=False, seed=1
    )
    model_config = PoseRegressorConfig(norm="group", head_hidden=32, image_size=32)
    intr = read_synthetic_benchmark(bench_path).intrinsics
    train(load_default_ct(with_labels=False), intr, out, config, model_config, progress=False)
    return out


def test_init_model_starts_every_case_from_the_network(
    bench_path: Path, tiny_model: Path, tmp_path: Path
) -> None:
    from xraypose.learning import predict_initial_pose
    from xraypose.metrics import pose_errors

    results = run_benchmark(
        bench_path, ["identity", "fast"], method_table=TABLE, init="model", model=tiny_model, device="cpu"
    )
    bench = read_synthetic_benchmark(bench_path)
    assert [(r.case, r.level, r.method) for r in results] == [
        (f"{c:04d}", "network", m) for c in range(2) for m in ("identity", "fast")
    ]
    volume = load_default_ct(with_labels=False)
    for r in results:
        ci = r.extra["case_index"]
        net = predict_initial_pose(tiny_model, bench.images[ci], bench.intrinsics, volume)
        torch.testing.assert_close(
            torch.tensor(r.extra["initial_pose"], dtype=torch.float64), net.pose[0].float().double()
        )
        want = pose_errors(
            net.pose.float().double(), bench.poses[ci][None], bench.landmarks_world, bench.intrinsics
        )
        assert r.initial_mtre_mm == pytest.approx(float(want.mtre_mm[0]), rel=1e-6)
        assert r.extra["initial_rot_deg"] == pytest.approx(float(want.rot_deg[0]), rel=1e-6)
        assert r.extra["initial_trans_mm"] == pytest.approx(float(want.trans_mm[0]), rel=1e-6)
        assert r.extra["init"] == "model" and r.extra["network_seconds"] > 0
        if r.method == "identity":  # unmoved: its errors are the network's
            assert (r.mtre_mm, r.rot_deg, r.trans_mm) == (
                r.initial_mtre_mm,
                pytest.approx(r.extra["initial_rot_deg"]),
                pytest.approx(r.extra["initial_trans_mm"]),
            )
    meta = results.metadata
    assert meta["init"] == "model" and meta["model"]["path"] == str(tiny_model) and meta["runs"] == 4
    assert [lv["label"] for lv in meta["levels"]] == ["network"]

    paths = write_results(results, tmp_path / "res")
    text = paths["summary.md"].read_text(encoding="utf-8")
    assert "## Network initial pose" in text
    (row,) = [ln for ln in text.splitlines() if ln.startswith("| network (initial pose) |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    initial = [r.initial_mtre_mm for r in results if r.method == "identity"]
    assert cells[1:4] == ["network", "2", f"{sum(initial) / 2:.2f}"]  # the median of two is their mean
    assert read_results(paths["cases.csv"]) == list(results)

    with pytest.raises(InputError, match="model"):
        run_benchmark(bench_path, ["identity"], method_table=TABLE, init="model")
    with pytest.raises(InputError, match="levels"):
        run_benchmark(
            bench_path, ["identity"], method_table=TABLE, init="model", model=tiny_model, levels=[0]
        )
    with pytest.raises(InputError, match="init"):
        run_benchmark(bench_path, ["identity"], method_table=TABLE, model=tiny_model)


def test_benchmark_mode_is_unchanged_by_the_model_mode(run, written: Path) -> None:
    assert run[0].metadata["init"] == "benchmark" and "model" not in run[0].metadata
    assert all("init" not in r.extra and "initial_rot_deg" not in r.extra for r in run[0])
    assert "Network initial pose" not in (written / "summary.md").read_text(encoding="utf-8")


def test_cli_benchmark_init_model(bench_path: Path, tiny_model: Path, tmp_path: Path, cli_methods) -> None:
    out = tmp_path / "res"
    args = ("benchmark", "--bench", bench_path, "--method", "identity", "--out", out)
    result = invoke(*args, "--init", "model", "--model", tiny_model, "--max-cases", 1)
    assert result.exit_code == 0, result.output
    assert "| network (initial pose) |" in result.output and "| identity | network |" in result.output
    (r,) = read_results(out / "cases.csv")
    assert r.level == "network" and r.mtre_mm == r.initial_mtre_mm and r.extra["init"] == "model"
    assert_user_error(invoke(*args, "--init", "model", "--force"), "--init model", "--model")
    assert_user_error(invoke(*args, "--model", tiny_model, "--force"), "--model", "--init model")
    assert_user_error(
        invoke(*args, "--init", "model", "--model", tiny_model, "--levels", "0", "--force"), "--levels"
    )
