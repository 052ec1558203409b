"""Patient-specific training (xraypose.learning.data / augment / train): tiny runs on the bundled CT."""

from __future__ import annotations

import csv
import json
import os
import socket
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before timm / huggingface_hub are imported

import pytest
import torch

from xraypose.datasets.synthetic import mobile_carm_intrinsics
from xraypose.errors import InputError
from xraypose.geometry.se3 import invert, is_rigid
from xraypose.io import Volume, load_default_ct
from xraypose.learning import (
    AugmentConfig,
    PoseDataStream,
    PoseRegressor,
    PoseRegressorConfig,
    TrainingConfig,
    augment,
    check_model_card,
    load_trained_model,
    pose_losses,
    pose_to_target,
    standardize,
    target_to_pose,
    train,
)

SIZE = 32
_PROBS = ("p_collimation", "p_detector", "p_blur", "p_noise", "p_poisson", "p_gamma", "p_window")
SMALL = PoseRegressorConfig(backbone="resnet18", norm="group", head_hidden=32, image_size=SIZE)


@pytest.fixture(scope="module")
def ct() -> Volume:
    return load_default_ct(with_labels=False)


@pytest.fixture(scope="module")
def intr():
    return mobile_carm_intrinsics(256)


def _stream(ct, intr, **kw) -> PoseDataStream:
    kw.setdefault("image_size", 32)
    kw.setdefault("batch_size", 2)
    return PoseDataStream(ct, intr, center_world=ct.center_world, **kw)


def _config(**kw) -> TrainingConfig:
    base = dict(
        steps=6,
        batch_size=2,
        lr=1e-3,
        warmup_steps=2,
        image_size=SIZE,
        stages=((0.5, 0.5, 0.0), (0.5, 1.0, 1.0)),
        checkpoint_every=2,
        log_every=1,
        device="cpu",
        seed=3,
    )
    base.update(kw)
    return TrainingConfig(**base)


# --------------------------------------------------------------------------------------------------
# Data stream
# --------------------------------------------------------------------------------------------------


def test_stream_is_a_pure_function_of_seed_rank_step(ct, intr):
    r0 = _stream(ct, intr, seed=5, rank=0, world_size=2)
    r1 = _stream(ct, intr, seed=5, rank=1, world_size=2)
    a, b = r0.batch(3), _stream(ct, intr, seed=5, rank=0, world_size=2).batch(3)
    assert torch.equal(a.images, b.images) and torch.equal(a.poses, b.poses)
    assert a.images.shape == (2, 1, 32, 32) and a.images.dtype == torch.float32
    assert a.poses.dtype == torch.float32 and a.targets.shape == (2, 4, 4)
    assert not torch.equal(r0.batch(4).poses, a.poses)  # another step
    c = r1.batch(3)
    assert not torch.allclose(c.poses, a.poses)  # another rank
    # world_size ranks of batch b see exactly the samples of one process with batch world_size * b
    whole = _stream(ct, intr, seed=5, batch_size=4).batch(3)
    assert torch.equal(whole.poses, torch.cat([a.poses, c.poses]))
    assert torch.equal(whole.drr, torch.cat([a.drr, c.drr]))
    # another seed
    assert not torch.allclose(_stream(ct, intr, seed=6, rank=0, world_size=2).batch(3).poses, a.poses)


def test_stream_targets_and_images(ct, intr):
    s = _stream(ct, intr, batch_size=4)
    batch = s.batch(0)
    poses = batch.poses.double()
    # target translation = the anatomy centre in camera coordinates; T = F · Y⁻¹ round trip
    centre = torch.cat([s.center, torch.ones(1, dtype=torch.float64)])
    expect = (invert(poses) @ centre)[:, :3]
    torch.testing.assert_close(batch.targets[:, :3, 3].double(), expect, atol=1e-3, rtol=1e-5)
    # (float32 rotations are orthonormal to ~1e-7 only: the rigid inverse is exact to ~1e-5 mm)
    torch.testing.assert_close(
        target_to_pose(pose_to_target(poses, s.frame), s.frame), poses, atol=1e-4, rtol=0
    )
    assert float(expect[:, 2].mean()) == pytest.approx(620.0, abs=60.0)  # source-to-isocentre distance
    torch.testing.assert_close(batch.translation_norm, s.normalizer.normalize(batch.targets[:, :3, 3]))
    # standardised images; raw DRRs with enough foreground
    torch.testing.assert_close(batch.images, standardize(batch.drr))
    m = batch.images.mean(dim=(1, 2, 3))
    torch.testing.assert_close(m, torch.zeros_like(m), atol=1e-5, rtol=0)
    assert bool(((batch.drr > s.foreground_level).float().mean(dim=(1, 2, 3)) >= s.min_foreground).all())
    # a smaller pose scale keeps the poses nearer the reference frame's axes (target rotation near I)
    eye = torch.eye(3)
    near = s.batch(0, pose_scale=0.1).targets[:, :3, :3]
    assert float((near - eye).abs().amax()) < float((batch.targets[:, :3, :3] - eye).abs().amax())


def test_stream_rejects_views_that_miss_the_ct(ct, intr):
    far = ct.center_world + torch.tensor([2000.0, 0.0, 0.0], dtype=torch.float64)
    s = PoseDataStream(ct, intr, image_size=32, batch_size=2, center_world=far, max_redraws=2)
    with pytest.raises(InputError, match="near-empty"):
        s.batch(0)


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------


def test_augment_identity_at_strength_zero_and_seeded(ct, intr):
    drr = _stream(ct, intr, batch_size=4, image_size=SIZE).batch(1).drr
    assert torch.equal(augment(drr, AugmentConfig(strength=0.0), torch.Generator().manual_seed(0)), drr)
    every = AugmentConfig(
        strength=1.0,
        p_collimation=1.0,
        p_detector=1.0,
        p_blur=1.0,
        p_noise=1.0,
        p_poisson=1.0,
        p_gamma=1.0,
        p_window=1.0,
        p_invert=0.5,
    )
    spacing = (intr.dy * intr.rows / SIZE, intr.dx * intr.cols / SIZE)
    out1 = augment(drr, every, torch.Generator().manual_seed(1), pixel_spacing_mm=spacing)
    out2 = augment(drr, every, torch.Generator().manual_seed(1), pixel_spacing_mm=spacing)
    out3 = augment(drr, every, torch.Generator().manual_seed(2), pixel_spacing_mm=spacing)
    assert out1.shape == drr.shape and out1.dtype == drr.dtype and bool(torch.isfinite(out1).all())
    assert torch.equal(out1, out2)
    assert not torch.allclose(out1, out3)
    assert float((standardize(out1) - standardize(drr)).abs().mean()) > 0.05
    # the magnitudes scale with the strength (same generator: same operations on the same images)
    strong = replace(every, p_invert=0.0)
    d_strong = augment(drr, strong, torch.Generator().manual_seed(1), pixel_spacing_mm=spacing) - drr
    d_weak = (
        augment(drr, strong.scaled(0.05), torch.Generator().manual_seed(1), pixel_spacing_mm=spacing) - drr
    )
    assert 0 < float(d_weak.abs().mean()) < float(d_strong.abs().mean())
    # inversion alone: max + min - x
    inv = augment(
        drr, AugmentConfig(**{k: 0.0 for k in _PROBS}, p_invert=1.0), torch.Generator().manual_seed(0)
    )
    lo, hi = drr.amin(dim=(1, 2, 3), keepdim=True), drr.amax(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(inv, hi + lo - drr)
    with pytest.raises(InputError, match="p_noise"):
        AugmentConfig(p_noise=1.5)


# --------------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------------


def test_network_overfits_a_fixed_batch(ct, intr):
    stream = _stream(ct, intr, batch_size=4, image_size=SIZE, seed=1)
    batch = stream.batch(0)
    torch.manual_seed(0)
    model = PoseRegressor(SMALL)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(150):  # 60 steps sufficed with earlier timm/numpy builds; a fresh install needs more
        out = model(batch.images)
        terms = pose_losses(out, batch.targets, stream.normalizer, radius_mm=intr.sdd / 2)
        loss = terms["rotation"] + terms["translation"] + terms["double_geodesic"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


# --------------------------------------------------------------------------------------------------
# Training runs: resume, atomic checkpoints, model card
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(ct, intr, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_ref")
    result = train(ct, intr, out, _config(), SMALL, center_world=ct.center_world, progress=False)
    return out, result


def _state(path: Path) -> dict[str, torch.Tensor]:
    model, _ = PoseRegressor.load(path / "model.safetensors")
    return model.state_dict()


def test_training_writes_outputs(reference_run):
    out, result = reference_run
    assert result.finished and result.steps == 6 and result.resumed_from is None
    for name in ("checkpoint.pt", "model.safetensors", "model_card.json", "log.csv"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name]
    with (out / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert {"loss", "rotation", "translation", "double_geodesic", "lr", "images_per_s", "seconds"} <= set(
        rows[0]
    )
    assert float(rows[0]["augment_strength"]) == 0.0 and float(rows[-1]["augment_strength"]) == 1.0
    blob = torch.load(out / "checkpoint.pt", weights_only=True)
    assert blob["step"] == 6 and blob["config"]["steps"] == 6
    for k, v in _state(out).items():
        torch.testing.assert_close(v, result.model.state_dict()[k].cpu(), rtol=0, atol=0)


def test_resume_is_exact(ct, intr, reference_run, tmp_path):
    ref_out, _ = reference_run
    first = train(
        ct, intr, tmp_path, _config(), SMALL, center_world=ct.center_world, progress=False, stop_after=3
    )
    assert not first.finished and first.steps == 3
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3
    # the interrupted run logged a step past its checkpoint: the resumption drops it
    with (tmp_path / "log.csv").open("a") as f:
        f.write("4,999,0,0,0,0,0,1,1,0,0\n")
    second = train(
        ct, intr, tmp_path, _config(checkpoint_every=5), SMALL, center_world=ct.center_world, progress=False
    )
    assert second.resumed_from == 3 and second.finished and second.steps == 6
    want, got = _state(ref_out), _state(tmp_path)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)  # bitwise
    with (tmp_path / "log.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 7))
    # a different training refuses the checkpoint
    with pytest.raises(InputError, match="lr"):
        train(ct, intr, tmp_path, _config(lr=5e-4), SMALL, center_world=ct.center_world, progress=False)


def test_checkpoint_write_is_atomic(ct, intr, tmp_path, monkeypatch):
    train(
        ct,
        intr,
        tmp_path,
        _config(steps=4),
        SMALL,
        center_world=ct.center_world,
        progress=False,
        stop_after=2,
    )
    good = (tmp_path / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(3)}, f)  # a partial file…
        raise OSError("disk full")  # …then a failure

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(ct, intr, tmp_path, _config(steps=4), SMALL, center_world=ct.center_world, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(ct, intr, fresh, _config(steps=2), SMALL, center_world=ct.center_world, progress=False)
    assert not (fresh / "checkpoint.pt").exists()
    assert not [p for p in fresh.iterdir() if ".tmp" in p.name]


def test_model_card_round_trip_and_checks(ct, intr, reference_run):
    out, result = reference_run
    card = json.loads((out / "model_card.json").read_text())
    assert card["ct"]["shape"] == list(ct.shape) and len(card["ct"]["sha256"]) == 64
    assert card["steps_done"] == 6 and card["intrinsics"] == intr.to_dict()
    assert {"xraypose", "torch", "timm"} <= set(card["versions"])
    assert card["poses"]["distribution"]["kind"] == "carm"
    assert card["normalizer"] == result.normalizer.to_dict()
    assert card["model_config"]["backbone"] == "resnet18" and card["training_config"]["seed"] == 3
    assert "tensorboard" in card
    assert check_model_card(card, ct, intr) == []
    assert check_model_card(out, ct, intr.resized(128)) == []  # same physical detector, other pixel count
    with pytest.raises(InputError, match="sdd"):
        check_model_card(card, ct, replace(intr, sdd=1100.0))
    other = Volume(ct.data + 1.0, ct.affine)
    with pytest.raises(InputError, match="CT voxels"):
        check_model_card(card, other, intr)
    problems = check_model_card(card, other, replace(intr, dx=intr.dx * 2), allow_mismatch=True)
    assert len(problems) == 2
    # inference from the folder
    trained = load_trained_model(out)
    batch = _stream(ct, intr, image_size=SIZE, batch_size=2).batch(0)
    poses = trained.predict(batch.drr)
    assert poses.shape == (2, 4, 4) and bool(is_rigid(poses, atol=1e-4).all())


# --------------------------------------------------------------------------------------------------
# Distributed data parallel (2 CPU processes, gloo)
# --------------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, out: str, cfg: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    ct = load_default_ct(with_labels=False)
    train(
        ct,
        mobile_carm_intrinsics(256),
        out,
        TrainingConfig.from_dict(cfg),
        SMALL,
        center_world=ct.center_world,
        progress=False,
    )


def test_ddp_two_ranks_match_one_process(ct, intr, tmp_path):
    # ~25 s on one core: in the default run, so CI checks DDP with 2 gloo processes (the env torchrun sets)
    import torch.multiprocessing as mp

    cfg = _config(steps=3, batch_size=4, stages=((1.0, 1.0, 0.0),))
    single = tmp_path / "single"
    train(ct, intr, single, cfg, SMALL, center_world=ct.center_world, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ddp = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, port, str(ddp), cfg.to_dict()), nprocs=2, join=True)
    card = json.loads((ddp / "model_card.json").read_text())
    assert card["world_size"] == 2 and card["steps_done"] == 3
    want, got = _state(single), _state(ddp)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def test_cli_train(ct, intr, tmp_path):
    from cli_helpers import assert_user_error, invoke
    from xraypose.io import write_volume

    write_volume(ct, tmp_path / "ct.nii.gz")
    intr.save(tmp_path / "camera.json")
    args = ("train", "--ct", tmp_path / "ct.nii.gz", "--camera", tmp_path / "camera.json", "--no-progress")
    common = ("--steps", 2, "--batch-size", 2, "--image-size", 32, "--norm", "group", "--device", "cpu")
    result = invoke(*args, "--out", tmp_path / "model", *common)
    assert result.exit_code == 0, result.output
    assert "model.safetensors: 2 steps" in " ".join(result.output.split())
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["steps_done"] == 2 and card["model_config"]["image_size"] == 32
    assert check_model_card(card, ct, intr) == []
    assert_user_error(invoke(*args, "--out", tmp_path / "m2", *common, "--backbone", "nope"), "nope")
    assert_user_error(invoke(*args, "--out", tmp_path / "m3", "--steps", 0), "steps")
