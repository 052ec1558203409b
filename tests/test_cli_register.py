"""``xraypose register``: recovers a known pose through the same API, writes overlay and animation, fails cleanly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import assert_user_error, invoke
from xraypose.geometry import Camera, Intrinsics, carm_pose
from xraypose.geometry.sampling import perturb_poses
from xraypose.io import load_default_ct, write_volume
from xraypose.metrics import mtre
from xraypose.registration import VolumeRenderer


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("register")
    volume = load_default_ct(with_labels=False)
    ct = folder / "ct.nii.gz"
    write_volume(volume, ct)
    centre = volume.center_world.float()
    intr = Intrinsics(sdd=1020.0, rows=64, cols=64, dy=4.8, dx=4.8)
    truth = carm_pose(12.0, 6.0, 0.0, source_to_isocenter=620.0, isocenter=centre)
    with torch.no_grad():
        image = VolumeRenderer(volume)(Camera(intr, truth))[0]
    np.save(folder / "xray.npy", image.numpy())
    intr.save(folder / "camera.json")
    init = perturb_poses(
        truth.double(), 3.0, 6.0, centre.double(), generator=torch.Generator().manual_seed(1)
    )
    (folder / "init.json").write_text(json.dumps(init[0].tolist()))
    landmarks = centre + torch.tensor(
        [[x, y, z] for x in (-40, 40) for y in (-40, 40) for z in (-40, 40)], dtype=torch.float32
    )
    return folder, ct, truth, init.float(), landmarks


def test_register_recovers_the_pose_and_writes_pictures(case):
    folder, ct, truth, init, landmarks = case
    out, overlay, animation = folder / "result.json", folder / "overlay.png", folder / "steps.gif"
    result = invoke(
        "register", "--ct", ct, "--xray", folder / "xray.npy", "--camera", folder / "camera.json",
        "--init", folder / "init.json", "--out", out, "--overlay", overlay, "--animation", animation,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    pose = torch.tensor(record["pose_camera_to_world"], dtype=torch.float32)
    assert float(mtre(pose, truth, landmarks)[0]) < 0.5 < float(mtre(init, truth, landmarks)[0])
    assert record["loss"] < record["initial_loss"] and record["iterations"] > 0 and record["stop_reason"]
    assert len(record["rotation_euler_zyx_deg"]) == 3 and len(record["correction_se3_log"]["v_mm"]) == 3
    with Image.open(overlay) as im:
        assert im.size == (64 * 2 + 4, 64 + 18)
    with Image.open(animation) as im:
        assert im.n_frames > 2


def test_register_fine_preset(case, tmp_path: Path):
    """The ``fine`` preset (polychromatic Newton levels) runs through the CLI and keeps the pose."""
    folder, ct, truth, init, landmarks = case
    volume = load_default_ct(with_labels=False)
    intr = Intrinsics.load(folder / "camera.json")
    with torch.no_grad():  # a polychromatic X-ray, as real ones are
        image = VolumeRenderer(volume, "poly")(Camera(intr, truth))[0]
    np.save(tmp_path / "poly.npy", image.numpy())
    out = tmp_path / "fine.json"
    result = invoke(
        "register", "--ct", ct, "--xray", tmp_path / "poly.npy", "--camera", folder / "camera.json",
        "--init", folder / "init.json", "--out", out, "--preset", "fine",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["preset"] == "fine" and record["loss"] < record["initial_loss"]
    pose = torch.tensor(record["pose_camera_to_world"], dtype=torch.float32)
    assert float(mtre(pose, truth, landmarks)[0]) < 0.5 < float(mtre(init, truth, landmarks)[0])


def test_register_fine_preset_refuses_a_display_image(case, tmp_path: Path):
    """The ``fine`` preset's likelihood needs ``−ln(I/I0)``: an 8-bit display image is a clear user error."""
    folder, ct, *_ = case
    image = np.load(folder / "xray.npy")
    np.save(tmp_path / "display.npy", np.round(255 * image / image.max()).astype(np.float32))
    result = invoke(
        "register", "--ct", ct, "--xray", tmp_path / "display.npy", "--camera", folder / "camera.json",
        "--init", folder / "init.json", "--out", tmp_path / "r.json", "--preset", "fine",
    )  # fmt: skip
    assert_user_error(result, "natural-log units")
    assert not (tmp_path / "r.json").exists()
    # --loss replaces every level's loss, the fine preset's own too: an NCC-type loss takes the display scale
    result = invoke(
        "register", "--ct", ct, "--xray", tmp_path / "display.npy", "--camera", folder / "camera.json",
        "--init", folder / "init.json", "--out", tmp_path / "r.json", "--preset", "fine",
        "--loss", "0.5*mncc+0.5*gncc",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["loss_spec"] == "0.5*mncc+0.5*gncc"


def test_register_bad_input(case, tmp_path: Path):
    folder, ct, *_ = case
    args = ["--ct", ct, "--camera", folder / "camera.json", "--init", folder / "init.json"]
    np.save(tmp_path / "small.npy", np.zeros((10, 12), np.float32))
    assert_user_error(
        invoke("register", *args, "--xray", tmp_path / "small.npy", "--out", tmp_path / "r.json"), "pixels"
    )
    (tmp_path / "r.json").write_text("{}")
    assert_user_error(
        invoke("register", *args, "--xray", folder / "xray.npy", "--out", tmp_path / "r.json"), "--force"
    )
    assert_user_error(
        invoke(
            "register",
            *args,
            "--xray",
            folder / "xray.npy",
            "--out",
            tmp_path / "r2.json",
            "--loss",
            "0.5*xyz",
        ),
        "xyz",
    )
    assert_user_error(
        invoke(
            "register",
            *args,
            "--xray",
            folder / "xray.npy",
            "--out",
            tmp_path / "r3.json",
            "--preset",
            "best",
        ),
        "preset",
    )


# ---------------------------------------------------------------------------------------------- --model
@pytest.fixture(scope="module")
def tiny_model(case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pose regressor trained for two steps on the case's CT and camera (its poses are poor: the test is of
    the pipeline, not of the accuracy)."""
    from xraypose.learning import PoseRegressorConfig, TrainingConfig, train

    folder, *_ = case
    out = tmp_path_factory.mktemp("model")
    config = TrainingConfig(
        steps=2, batch_size=2, image_size=32, warmup_steps=1, device="cpu", tensorboard=False, seed=1
    )
    model_config = PoseRegressorConfig(norm="group", head_hidden=32, image_size=32)
    train(load_default_ct(with_labels=False), Intrinsics.load(folder / "camera.json"), out, config, model_config,
          progress=False)  # fmt: skip
    return out


def test_register_from_the_network_pose(case, tiny_model: Path):
    from xraypose.geometry.se3 import se3_exp
    from xraypose.learning import predict_initial_pose

    folder, ct, *_ = case
    out = folder / "result-model.json"
    result = invoke(
        "register", "--ct", ct, "--xray", folder / "xray.npy", "--camera", folder / "camera.json",
        "--model", tiny_model, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "network initial pose in" in result.output
    record = json.loads(out.read_text())
    init = record["initial_pose"]
    assert (
        init["source"] == "model"
        and init["model"] == str(tiny_model)
        and init["model_kind"] == "patient-specific"
    )
    assert 0 < record["network_seconds"] == init["seconds"] < 60
    # the initial pose is the library's prediction for this X-ray, CT and camera
    want = predict_initial_pose(
        tiny_model, np.load(folder / "xray.npy"), Intrinsics.load(folder / "camera.json"), load_default_ct()
    )
    pose0 = torch.tensor(init["pose_camera_to_world"], dtype=torch.float64)
    torch.testing.assert_close(pose0, want.pose[0], rtol=0, atol=1e-9)
    # …and the refinement started from it: pose = pose0 · exp(correction)
    log = record["correction_se3_log"]
    xi = torch.tensor(log["v_mm"] + log["omega_rad"], dtype=torch.float64)
    pose = torch.tensor(record["pose_camera_to_world"], dtype=torch.float64)
    torch.testing.assert_close(pose0.float().double() @ se3_exp(xi), pose, atol=1e-3, rtol=1e-4)
    assert record["iterations"] > 0 and math.isfinite(record["loss"])


def test_register_init_and_model_misuse(case, tiny_model: Path, tmp_path: Path):
    folder, ct, *_ = case
    args = ["--ct", ct, "--xray", folder / "xray.npy", "--camera", folder / "camera.json"]
    both = invoke(
        "register", *args, "--init", folder / "init.json", "--model", tiny_model, "--out", tmp_path / "a.json"
    )
    assert_user_error(both, "--init", "--model", "exactly one")
    assert_user_error(
        invoke("register", *args, "--out", tmp_path / "b.json"), "--init", "--model", "exactly one"
    )
    assert_user_error(
        invoke(
            "register",
            *args,
            "--init",
            folder / "init.json",
            "--allow-new-patient",
            "--out",
            tmp_path / "c.json",
        ),
        "--allow-new-patient",
    )
    other = tmp_path / "other.nii.gz"
    volume = load_default_ct(with_labels=False)
    write_volume(type(volume)(volume.data + 1.0, volume.affine), other)
    wrong_ct = ["--ct", other, *args[2:]]
    assert_user_error(
        invoke("register", *wrong_ct, "--model", tiny_model, "--out", tmp_path / "d.json"), "CT voxels"
    )
    assert_user_error(
        invoke("register", *args, "--model", tmp_path / "nowhere", "--out", tmp_path / "e.json"), "nowhere"
    )
    assert not any((tmp_path / n).exists() for n in ("a.json", "b.json", "c.json", "d.json", "e.json"))
