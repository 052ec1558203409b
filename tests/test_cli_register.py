"""``xraypose register``: recovers a known pose through the same API, writes overlay and animation, fails cleanly."""

from __future__ import annotations

import json
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
