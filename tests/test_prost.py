"""Registration with ProST's learned similarity (the engine's loss interface, the ProST → CMA-ES / gradient-NCC
pipeline, the benchmark method) and the command line (train-similarity, register --similarity)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import assert_user_error, invoke
from xraypose.datasets.synthetic import make_synthetic_benchmark, mobile_carm_intrinsics
from xraypose.errors import InputError
from xraypose.geometry import Camera, carm_pose
from xraypose.geometry.sampling import perturb_poses
from xraypose.io import load_default_ct, write_volume
from xraypose.learning import AugmentConfig, SimilarityConfig, SimilarityTrainingConfig, train_similarity
from xraypose.registration import (
    CMAESConfig,
    LearnedSimilarityLoss,
    LearnedSimilarityRenderer,
    ProSTConfig,
    RegistrationConfig,
    Scale,
    VolumeRenderer,
    prost_method_table,
    register_prost,
)
from xraypose.registration.benchmark import run_benchmark
from xraypose.registration.prost import PROST_LEVEL

TINY = SimilarityConfig(
    image_size=32,
    n_samples=24,
    volume_size=16,
    volume_channels=2,
    conv3d_channels=(4,),
    encoder_channels=(8, 8, 8),
    encoding_channels=8,
)
FAST_CMAES = CMAESConfig(population=6, generations=3, downsample=2, local="none")
FAST_GNCC = RegistrationConfig(scales=(Scale(16, 5),), loss="gncc", search=None)
FAST = ProSTConfig(iterations=6, patience=3, cmaes=FAST_CMAES, gncc=FAST_GNCC)


@pytest.fixture(scope="module")
def ct():
    return load_default_ct(with_labels=False)


@pytest.fixture(scope="module")
def sim_dir(ct, tmp_path_factory):
    out = tmp_path_factory.mktemp("similarity")
    config = SimilarityTrainingConfig(
        steps=2, batch_size=1, warmup_steps=0, augment=AugmentConfig(strength=0.0), device="cpu"
    )
    train_similarity(ct, mobile_carm_intrinsics(256), out, config, TINY, progress=False)
    return out


@pytest.fixture(scope="module")
def problem(ct):
    intr = mobile_carm_intrinsics(32)
    centre = ct.center_world.float()
    truth = carm_pose(10.0, 5.0, 0.0, source_to_isocenter=620.0, isocenter=centre)
    renderer = VolumeRenderer(ct)
    with torch.no_grad():
        target = renderer(Camera(intr, truth))
    init = perturb_poses(
        truth.double(), 5.0, 10.0, centre.double(), generator=torch.Generator().manual_seed(0)
    )
    return renderer, intr, target, init.float()


def test_learned_similarity_in_the_engine(ct, sim_dir, problem):
    from xraypose.learning import load_similarity

    renderer, intr, target, init = problem
    trained = load_similarity(sim_dir)
    sim = LearnedSimilarityRenderer(trained, ct)
    moving = sim(Camera(intr, init))
    assert moving.shape == (1, 2, 32, 32)
    loss = LearnedSimilarityLoss(trained.model)
    assert loss(moving, target).shape == (1,)
    with pytest.raises(InputError, match="sparse"):
        sim(Camera(intr, init), pixels=torch.arange(4))
    result = register_prost(
        renderer, target, intr, init, sim, ProSTConfig(iterations=6, patience=3, refine="none")
    )
    assert {s.level for s in result.trajectory} == {PROST_LEVEL} and 0 < result.iterations <= 6
    assert torch.isfinite(result.pose).all()
    with torch.no_grad():  # the reported loss is the learned similarity of the returned pose
        again = loss(sim(Camera(intr, result.pose)), target)
    torch.testing.assert_close(result.loss, again.to(result.loss.dtype), rtol=1e-5, atol=1e-6)
    assert float(result.loss[0]) <= float(result.initial_loss[0]) + 1e-6


@pytest.mark.parametrize("refine", ["gncc", "cmaes"])
def test_pipeline_hands_over_to_the_refinement(ct, sim_dir, problem, refine):
    from xraypose.learning import load_similarity

    renderer, intr, target, init = problem
    sim = LearnedSimilarityRenderer(load_similarity(sim_dir), ct)
    result = register_prost(
        renderer, target, intr, init, sim, ProSTConfig(**{**FAST.__dict__, "refine": refine})
    )
    levels = [s.level for s in result.trajectory]
    assert levels[0] == PROST_LEVEL and levels[-1] >= 0 and levels == sorted(levels)
    assert result.poses.shape[1:] == (1, 4, 4) and result.poses.shape[0] >= len(levels) - 1
    assert torch.isfinite(result.pose).all() and result.seconds > 0
    # the refinement's loss (gradient NCC at 16 px) of the returned pose and of the initial one
    assert float(result.loss[0]) <= float(result.initial_loss[0]) + 1e-6


def test_benchmark_method(ct, sim_dir, tmp_path):
    bench = make_synthetic_benchmark(
        ct, 1, 3, tmp_path / "bench.h5", intrinsics=mobile_carm_intrinsics(32), levels=((5.0, 10.0),)
    )
    table = prost_method_table(sim_dir, ["prost-gncc"], FAST)
    results = run_benchmark(bench, ["prost-gncc"], method_table=table, device="cpu", warmup=False)
    (record,) = list(results)
    assert record.method == "prost-gncc" and np.isfinite(record.mtre_mm)
    assert not str(record.stop_reason).startswith("error"), record.stop_reason
    with pytest.raises(InputError, match="unknown"):
        prost_method_table(sim_dir, ["prost-nope"])


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_train_similarity_and_register(ct, problem, tmp_path):
    _, intr, target, init = problem
    write_volume(ct, tmp_path / "ct.nii.gz")
    args = ("train-similarity", "--ct", tmp_path / "ct.nii.gz", "--no-progress", "--device", "cpu")
    small = ("--steps", 2, "--batch-size", 1, "--image-size", 32, "--volume-size", 16, "--n-samples", 16)
    result = invoke(*args, "--out", tmp_path / "sim", *small, "--channels", 1, "--augment-strength", 0)
    assert result.exit_code == 0, result.output
    assert "similarity.safetensors: 2 steps" in " ".join(result.output.split())
    card = json.loads((tmp_path / "sim" / "model_card.json").read_text())
    assert card["kind"] == "prost_similarity" and card["model_config"]["volume_channels"] == 1
    # resumes (nothing left to do) and refuses a different training in the same folder
    again = invoke(*args, "--out", tmp_path / "sim", *small, "--channels", 1, "--augment-strength", 0)
    assert again.exit_code == 0 and "resumed at 2" in " ".join(again.output.split()), again.output

    np.save(tmp_path / "xray.npy", target[0].numpy())
    intr.save(tmp_path / "camera.json")
    (tmp_path / "init.json").write_text(json.dumps(init[0].double().tolist()))
    reg = ("register", "--ct", tmp_path / "ct.nii.gz", "--xray", tmp_path / "xray.npy")
    reg += ("--camera", tmp_path / "camera.json", "--init", tmp_path / "init.json")
    out = tmp_path / "result.json"
    result = invoke(
        *reg, "--out", out, "--similarity", tmp_path / "sim", "--refine", "none", "--prost-iterations", 4
    )
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["method"] == "prost-none" and 0 < record["iterations"] <= 4
    assert len(record["pose_camera_to_world"]) == 4


def test_cli_bad_input(ct, sim_dir, problem, tmp_path):
    write_volume(ct, tmp_path / "ct.nii.gz")
    args = ("train-similarity", "--ct", tmp_path / "ct.nii.gz", "--no-progress")
    assert_user_error(
        invoke("train-similarity", "--ct", tmp_path / "missing.nii.gz", "--out", tmp_path / "o"), "missing"
    )
    assert_user_error(invoke(*args, "--out", tmp_path / "o", "--image-size", 4), "image_size")
    assert_user_error(invoke(*args, "--out", tmp_path / "o", "--steps", 0), "steps")
    assert_user_error(invoke(*args, "--out", tmp_path / "o", "--minutes", 0), "--minutes")
    assert_user_error(invoke(*args, "--out", tmp_path / "o", "--rotation-sigma", -1), "rotation_sigma_deg")
    (tmp_path / "file").write_text("x")
    assert_user_error(invoke(*args, "--out", tmp_path / "file"), "not a folder")
    (tmp_path / "cam.json").write_text("{}")
    assert_user_error(invoke(*args, "--out", tmp_path / "o", "--camera", tmp_path / "cam.json"), "cam.json")
    # register: --refine without --similarity, a folder that is no similarity, another CT's similarity
    _, intr, target, init = problem
    np.save(tmp_path / "xray.npy", target[0].numpy())
    intr.save(tmp_path / "camera.json")
    (tmp_path / "init.json").write_text(json.dumps(init[0].double().tolist()))
    reg = (
        "register",
        "--ct",
        tmp_path / "ct.nii.gz",
        "--xray",
        tmp_path / "xray.npy",
        "--out",
        tmp_path / "r.json",
    )
    reg += ("--camera", tmp_path / "camera.json", "--init", tmp_path / "init.json")
    assert_user_error(invoke(*reg, "--refine", "gncc"), "--refine", "--similarity")
    assert_user_error(invoke(*reg, "--similarity", tmp_path), "similarity")
    assert_user_error(invoke(*reg, "--prost-sigma", "5,5,10,15,15,30"), "--prost-sigma", "--similarity")
    assert_user_error(invoke(*reg, "--similarity", sim_dir, "--prost-sigma", "5,5,10"), "six positive")
    assert_user_error(
        invoke(*reg, "--similarity", sim_dir, "--refine", "gncc", "--prost-sigma", "5,5,10,15,15,30"),
        "--refine cmaes",
    )
    other = tmp_path / "other.nii.gz"
    shifted = load_default_ct(with_labels=False)
    shifted.data[0, 0, 0] += 1.0
    write_volume(shifted, other)
    bad = ("register", "--ct", other, *reg[3:])
    assert_user_error(invoke(*bad, "--similarity", sim_dir), "CT voxels differ")


def test_parse_prost_sigma():
    from xraypose.cli import _parse_prost_sigma

    assert _parse_prost_sigma(None) is None
    assert _parse_prost_sigma("5, 5, 10, 15, 15, 30") == (5.0, 5.0, 10.0, 15.0, 15.0, 30.0)
    for bad in ("5,5,10,15,15", "5,5,10,15,15,0", "a,b,c,d,e,f", "5,5,10,15,15,inf"):
        with pytest.raises(InputError, match="--prost-sigma"):
            _parse_prost_sigma(bad)


def test_cli_benchmark_needs_similarity(tmp_path):
    bench = tmp_path / "b.h5"
    bench.write_bytes(b"")
    assert_user_error(
        invoke("benchmark", "--bench", bench, "--out", tmp_path / "res", "--method", "prost-cmaes"),
        "--similarity",
    )
    assert_user_error(
        invoke("benchmark", "--bench", bench, "--out", tmp_path / "res", "--similarity", tmp_path),
        "--similarity",
    )
    assert_user_error(
        invoke(
            "benchmark",
            "--bench",
            bench,
            "--out",
            tmp_path / "res",
            "--method",
            "prost-gncc",
            "--similarity",
            tmp_path,
            "--prost-sigma",
            "5,5,10,15,15,30",
        ),
        "--prost-sigma",
        "prost-cmaes",
    )


def test_default_handover_is_the_cmaes_baseline_with_a_narrower_sigma():
    from dataclasses import replace

    from xraypose.registration import CMAESConfig
    from xraypose.registration.prost import HANDOVER_SIGMA

    handover = ProSTConfig().cmaes
    assert handover.sigma == HANDOVER_SIGMA == (5.0, 5.0, 10.0, 15.0, 15.0, 30.0)
    baseline = CMAESConfig()
    assert all(a < b for a, b in zip(handover.sigma, baseline.sigma, strict=True))
    assert replace(handover, sigma=baseline.sigma) == baseline
