"""Patient-agnostic pretraining over several CTs (weighted sampling, random crops), finetuning, time budgets."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import warnings
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before timm / huggingface_hub are imported

import pytest
import torch

from xraypose.datasets.synthetic import mobile_carm_intrinsics
from xraypose.errors import InputError
from xraypose.geometry import Camera
from xraypose.geometry.se3 import invert
from xraypose.io import Volume, find_cts, load_default_ct, write_volume
from xraypose.learning import (
    ModelCardWarning,
    PoseDataStream,
    PoseRegressor,
    PoseRegressorConfig,
    TrainingConfig,
    check_model_card,
    ct_sha256,
    load_trained_model,
    train,
)
from xraypose.registration import VolumeRenderer

SIZE = 32
SMALL = PoseRegressorConfig(backbone="resnet18", norm="group", head_hidden=32, image_size=SIZE)


@pytest.fixture(scope="module")
def cts() -> tuple[Volume, Volume, Volume]:
    """Three small, different CTs (5 mm): the default CT, a mirrored crop of it, and another crop."""
    base = load_default_ct(with_labels=False).resample(5.0)
    base = Volume(base.data, base.affine, source="ct-a")
    b = base.crop((4, 4, 8), (68, 68, 60))
    b = Volume(b.data.flip(0).contiguous(), b.affine, source="ct-b")
    c = base.crop((0, 6, 0), (70, 72, 56))
    return base, b, Volume(c.data, c.affine, source="ct-c")


@pytest.fixture(scope="module")
def intr():
    return mobile_carm_intrinsics(64)


def _config(**kw) -> TrainingConfig:
    base = dict(
        steps=3,
        batch_size=2,
        lr=1e-3,
        warmup_steps=1,
        image_size=SIZE,
        stages=((0.5, 0.5, 0.0), (0.5, 1.0, 1.0)),
        checkpoint_every=1,
        log_every=1,
        device="cpu",
        seed=2,
        crop_probability=0.5,
        crop_min_mm=80.0,
        tensorboard=False,
    )
    base.update(kw)
    return TrainingConfig(**base)


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


# --------------------------------------------------------------------------------------------------
# The stream over several CTs
# --------------------------------------------------------------------------------------------------


def test_stream_draws_cts_by_weight_in_their_own_frames(cts, intr):
    a, b, _ = cts
    s = PoseDataStream([a, b], intr, image_size=SIZE, batch_size=4, seed=1, ct_weights=(3, 1))
    assert s.ct_probabilities == (0.75, 0.25)
    ks = torch.cat([s.ct_indices(step) for step in range(400)])
    share = float((ks == 0).float().mean())
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / ks.numel()), share  # binomial, 4 sigma
    assert torch.equal(ks[:4], s.ct_indices(0))  # pure function of the step
    only_b = PoseDataStream([a, b], intr, image_size=SIZE, batch_size=4, seed=1, ct_weights=(0, 1))
    assert bool((torch.cat([only_b.ct_indices(i) for i in range(50)]) == 1).all())

    # a batch holding both CTs: each target is that CT's anatomy centre seen from the camera
    step = next(i for i in range(50) if set(s.ct_indices(i).tolist()) == {0, 1})
    batch = s.batch(step)
    assert torch.equal(batch.ct_index, s.ct_indices(step))
    assert not torch.allclose(s.centers[0], s.centers[1], atol=5.0)
    for j, k in enumerate(batch.ct_index.tolist()):
        centre = torch.cat([s.centers[k], torch.ones(1, dtype=torch.float64)])
        expect = (invert(batch.poses[j].double()) @ centre)[:3]
        torch.testing.assert_close(batch.targets[j, :3, 3].double(), expect, atol=1e-3, rtol=1e-5)
        # and its DRR is a view of that CT, not of the other
        own = s.render(batch.poses[j : j + 1].double(), k)
        torch.testing.assert_close(batch.drr[j : j + 1], own)
        assert not torch.allclose(batch.drr[j : j + 1], s.render(batch.poses[j : j + 1].double(), 1 - k))
    with pytest.raises(InputError, match="ct_weights"):
        PoseDataStream([a, b], intr, image_size=SIZE, ct_weights=(1,))
    with pytest.raises(InputError, match="CArmPoseDistribution"):
        from xraypose.learning import GaussianPoseDistribution

        PoseDataStream([a, b], intr, image_size=SIZE, distribution=GaussianPoseDistribution(torch.eye(4)))


def test_stream_with_crops_is_still_sharded_exactly(cts, intr):
    a, b, _ = cts
    kw = dict(image_size=SIZE, seed=4, ct_weights=(1, 1), crop_probability=0.7, crop_min_mm=60.0)
    r0 = PoseDataStream([a, b], intr, batch_size=2, rank=0, world_size=2, **kw).batch(2)
    r1 = PoseDataStream([a, b], intr, batch_size=2, rank=1, world_size=2, **kw).batch(2)
    whole = PoseDataStream([a, b], intr, batch_size=4, **kw).batch(2)
    again = PoseDataStream([a, b], intr, batch_size=4, **kw).batch(2)
    for name in ("drr", "poses", "targets", "ct_index", "crop_boxes"):
        both = torch.cat([getattr(r0, name), getattr(r1, name)])
        assert torch.equal(getattr(whole, name), both), name
        assert torch.equal(getattr(whole, name), getattr(again, name)), name


def test_crops_render_the_documented_sub_box(cts, intr):
    a, b, _ = cts
    s = PoseDataStream(
        [a, b], intr, image_size=SIZE, batch_size=4, seed=3, crop_probability=1.0, crop_min_mm=70.0
    )
    assert all(src.pyramid_factors == (1, 1, 1) for src in s._sources)  # 5 mm voxels at 32 px: full level
    cropped = 0
    for step in range(3):
        batch = s.batch(step)
        for j, k in enumerate(batch.ct_index.tolist()):
            ct = (a, b)[k]
            lo, hi = batch.crop_boxes[j].tolist()
            sides_mm = [(hi[i] - lo[i]) * float(ct.spacing[i]) for i in range(3)]
            assert all(0 <= lo[i] < hi[i] <= ct.shape[i] for i in range(3))
            assert all(sides_mm[i] >= min(70.0, ct.shape[i] * float(ct.spacing[i])) - 5.0 for i in range(3))
            centre = ct.world_to_index(s.centers[k]).round().tolist()
            assert all(lo[i] <= centre[i] < hi[i] for i in range(3))  # the anatomy centre stays in the box
            cropped += hi != list(ct.shape) or lo != [0, 0, 0]
            # the DRR is the full-resolution DRR of exactly that sub-volume (Volume.crop places it in the world)
            sub = VolumeRenderer(ct.crop(lo, hi), multires=False)
            with torch.no_grad():
                want = sub(Camera(s.train_intrinsics, batch.poses[j : j + 1]))
            torch.testing.assert_close(batch.drr[j], want.reshape(1, SIZE, SIZE), atol=1e-4, rtol=1e-4)
    assert cropped >= 10  # crops actually happen (12 samples, probability 1)


# --------------------------------------------------------------------------------------------------
# Pretraining, resume, model card
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(cts, intr, tmp_path_factory):
    a, b, _ = cts
    out = tmp_path_factory.mktemp("pretrained")
    result = train([a, b], intr, out, _config(), SMALL, ct_weights=(3, 1), progress=False)
    return out, result


def test_pretraining_writes_a_patient_agnostic_card_and_resumes_exactly(cts, intr, pretrained, tmp_path):
    a, b, _ = cts
    out, result = pretrained
    card = json.loads((out / "model_card.json").read_text())
    assert card["kind"] == "pretrained" and card["patient_agnostic"] is True and card["ct"] is None
    assert [c["sha256"] for c in card["cts"]] == [ct_sha256(a), ct_sha256(b)]
    assert [c["probability"] for c in card["cts"]] == [0.75, 0.25]
    assert card["poses"]["reference_frame"] is None and result.reference_frame is None
    assert card["pretrained_from"] is None and card["finetuned_on"] is None
    assert card["training_config"]["crop_probability"] == 0.5 and card["stopped_by"] == "steps"
    with (out / "log.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]
    # interrupted after one step and resumed: the same weights, bit for bit
    first = train([a, b], intr, tmp_path, _config(), SMALL, ct_weights=(3, 1), progress=False, stop_after=1)
    assert not first.finished and first.card["stopped_by"] == "stop_after"
    second = train([a, b], intr, tmp_path, _config(), SMALL, ct_weights=(3, 1), progress=False)
    assert second.resumed_from == 1 and second.finished
    assert _states_equal(second.model, result.model)
    with pytest.raises(InputError, match="differ"):  # other weights: another training
        train([a, b], intr, tmp_path, _config(), SMALL, ct_weights=(1, 1), progress=False)


def test_model_card_check_of_pretrained_and_patient_specific_models(cts, intr, pretrained, tmp_path):
    a, b, c = cts
    out, _ = pretrained
    assert check_model_card(out, a, intr) == [] and check_model_card(out, b, intr) == []
    with pytest.raises(InputError, match="allow_new_patient"):
        check_model_card(out, c, intr)
    with pytest.warns(ModelCardWarning, match="patient-agnostic"):
        assert check_model_card(out, c, intr, allow_new_patient=True) == []
    with pytest.raises(InputError, match="sdd"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ModelCardWarning)
        check_model_card(out, c, replace(intr, sdd=900.0), allow_new_patient=True)
    # the frame on a new CT is that CT's own anatomy frame; on a training CT the recorded one
    model = load_trained_model(out)
    card = model.card
    torch.testing.assert_close(
        model.reference_frame_for(b), torch.tensor(card["cts"][1]["reference_frame"], dtype=torch.float64)
    )
    from xraypose.datasets.synthetic import anatomy_center

    torch.testing.assert_close(model.reference_frame_for(c)[:3, 3], anatomy_center(c))
    with pytest.raises(InputError, match="several CTs"):
        model.predict(torch.zeros(1, SIZE, SIZE))
    # a patient-specific model is refused on another patient even with allow_new_patient
    specific = dict(card, kind="patient-specific", patient_agnostic=False, cts=card["cts"][:1])
    with pytest.raises(InputError, match="patient-specific"):
        check_model_card(specific, b, intr, allow_new_patient=True)


# --------------------------------------------------------------------------------------------------
# Finetuning
# --------------------------------------------------------------------------------------------------


def test_finetuning_starts_from_the_pretrained_weights_and_records_provenance(
    cts, intr, pretrained, tmp_path
):
    a, b, c = cts
    pre_dir, _ = pretrained
    source = load_trained_model(pre_dir)
    ft = tmp_path / "ft"
    cfg = _config(steps=2, crop_probability=0.0)
    zero = train(c, intr, ft, cfg, init_model=pre_dir, progress=False, stop_after=0)
    assert zero.steps == 0 and _states_equal(zero.model, source.model)  # step 0: the pretrained weights
    s = PoseDataStream(c, intr, image_size=SIZE, batch_size=2)
    drr = s.batch(0).drr
    frame = source.reference_frame_for(c)
    tuned0 = load_trained_model(ft)
    torch.testing.assert_close(
        tuned0.predict(drr), source.predict(drr, reference_frame=frame), rtol=0, atol=0
    )
    assert tuned0.normalizer == source.normalizer

    done = train(c, intr, ft, cfg, init_model=pre_dir, progress=False)
    assert done.resumed_from == 0 and done.steps == 2 and not _states_equal(done.model, source.model)
    card = json.loads((ft / "model_card.json").read_text())
    assert card["kind"] == "finetuned" and card["patient_agnostic"] is False
    src_card = json.loads((pre_dir / "model_card.json").read_text())
    canonical = json.dumps(src_card, sort_keys=True, separators=(",", ":")).encode()
    info = card["pretrained_from"]
    assert info["card_sha256"] == hashlib.sha256(canonical).hexdigest() and info["kind"] == "pretrained"
    assert [x["sha256"] for x in info["cts"]] == [ct_sha256(a), ct_sha256(b)] and len(
        info["weights_sha256"]
    ) == 64
    assert info["path"] == str(pre_dir) and info["steps_done"] == 3
    assert card["finetuned_on"]["ct_sha256"] == ct_sha256(c) and card["finetuned_on"]["steps"] == 2
    assert card["model_config"] == src_card["model_config"] and card["normalizer"] == src_card["normalizer"]
    # used on its patient only: not on the pretraining CTs, not even with allow_new_patient
    assert check_model_card(card, c, intr) == []
    with pytest.raises(InputError, match="CT voxels"):
        check_model_card(card, a, intr, allow_new_patient=True)

    # an incompatible architecture is one clear error
    with pytest.raises(
        InputError, match=r"architecture differs.*backbone: pretrained 'resnet18', given 'resnet34'"
    ):
        train(
            c,
            intr,
            tmp_path / "x",
            cfg,
            replace(SMALL, backbone="resnet34"),
            init_model=pre_dir,
            progress=False,
        )
    with pytest.raises(InputError, match="image_size"):
        train(c, intr, tmp_path / "y", _config(image_size=64), init_model=pre_dir, progress=False)


# --------------------------------------------------------------------------------------------------
# Time budget
# --------------------------------------------------------------------------------------------------


def test_schedule_follows_the_time_budget():
    steps = TrainingConfig(steps=100, warmup_steps=10, stages=((0.5, 0.25, 0.0), (0.5, 1.0, 1.0)))
    timed = replace(steps, max_seconds=60.0)
    assert steps.schedule_position(30, 1e9) == 30  # no budget: steps only
    assert timed.schedule_position(30, 15.0) == 30 and timed.schedule_position(30, 45.0) == 75
    assert timed.schedule_position(30, 600.0) == 99
    assert timed.stage_at(timed.schedule_position(5, 45.0))[1] == 1.0  # the last stage by time
    assert timed.lr_factor(5, 99) == steps.lr_factor(5)  # warm-up counts steps
    assert timed.lr_factor(50, 99) == pytest.approx(steps.final_lr_fraction)
    assert [steps.lr_factor(i) for i in range(100)] == [steps.lr_factor(i, i) for i in range(100)]
    with pytest.raises(InputError, match="max_seconds"):
        TrainingConfig(max_seconds=-1.0)


def test_training_stops_at_the_time_budget_and_writes_the_model(cts, intr, tmp_path):
    a, *_ = cts
    cfg = _config(steps=1000, max_seconds=0.05, crop_probability=0.0)
    result = train(a, intr, tmp_path, cfg, SMALL, progress=False)
    assert result.finished and 1 <= result.steps < 1000
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["stopped_by"] == "time_budget" and card["steps_done"] == result.steps
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == result.steps
    model, _ = PoseRegressor.load(tmp_path / "model.safetensors")
    assert _states_equal(model, result.model)
    with (tmp_path / "log.csv").open() as f:
        assert int(list(csv.DictReader(f))[-1]["step"]) == result.steps
    again = train(a, intr, tmp_path, cfg, SMALL, progress=False)  # the budget is spent: nothing more to do
    assert again.steps == result.steps and again.card["stopped_by"] == "time_budget"


# --------------------------------------------------------------------------------------------------
# Folders of CTs and the command line
# --------------------------------------------------------------------------------------------------


def test_find_cts(cts, tmp_path):
    a, b, _ = cts
    write_volume(a, tmp_path / "alpha.nii.gz")
    write_volume(Volume(torch.zeros(a.shape), a.affine), tmp_path / "alpha_labels.nii.gz")
    (tmp_path / "patient2").mkdir()
    write_volume(b, tmp_path / "patient2" / "ct.nrrd")
    write_volume(Volume(torch.zeros(b.shape), b.affine), tmp_path / "patient2" / "labels.nrrd")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    (tmp_path / "readme.md").write_text("x")
    assert find_cts(tmp_path) == [
        (tmp_path / "alpha.nii.gz", tmp_path / "alpha_labels.nii.gz"),
        (tmp_path / "patient2" / "ct.nrrd", tmp_path / "patient2" / "labels.nrrd"),
    ]
    from xraypose.errors import FileFormatError

    with pytest.raises(FileFormatError, match="no CT"):
        find_cts(tmp_path / "notes")


def test_cli_pretrain_and_finetune(cts, intr, tmp_path):
    from cli_helpers import assert_user_error, invoke

    a, b, c = cts
    folder = tmp_path / "cts"
    folder.mkdir()
    write_volume(a, folder / "a.nii.gz")
    write_volume(b, folder / "b.mha")
    write_volume(c, tmp_path / "c.nii.gz")
    intr.save(tmp_path / "camera.json")
    common = ("--camera", tmp_path / "camera.json", "--no-progress", "--device", "cpu", "--batch-size", 2)
    small = ("--image-size", SIZE, "--norm", "group", "--attention")
    pre = tmp_path / "pre"
    result = invoke(
        "train", "--ct-dir", folder, "--ct-weights", "1,3", "--steps", 1, *small, *common, "--out", pre
    )
    assert result.exit_code == 0, result.output
    assert "pretrained over 2 CTs" in " ".join(result.output.split())
    card = json.loads((pre / "model_card.json").read_text())
    assert [x["probability"] for x in card["cts"]] == [0.25, 0.75] and card["steps_done"] == 1
    ft = tmp_path / "ft"
    result = invoke(
        "train", "--ct", tmp_path / "c.nii.gz", "--init-model", pre, "--steps", 1, "--no-incremental", *common,
        "--out", ft,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    card = json.loads((ft / "model_card.json").read_text())
    assert card["kind"] == "finetuned" and card["model_config"]["image_size"] == SIZE
    assert card["model_config"]["attention"] is True  # the pretrained architecture, options included
    assert card["training_config"]["stages"] == [[1.0, 1.0, 1.0]]
    assert card["pretrained_from"]["path"] == str(pre)
    ct_c = ("--ct", tmp_path / "c.nii.gz")
    assert_user_error(
        invoke(
            "train", *ct_c, "--init-model", pre, "--backbone", "resnet34", *common, "--out", tmp_path / "x"
        ),
        "--backbone resnet34",
        "resnet18",
    )
    assert_user_error(
        invoke("train", *ct_c, "--init-model", pre, "--no-attention", *common, "--out", tmp_path / "v"),
        "attention",
    )
    assert_user_error(invoke("train", *common, "--out", tmp_path / "y"), "--ct")
    assert_user_error(
        invoke("train", "--ct-dir", folder, "--ct-weights", "1", *common, "--out", tmp_path / "z"),
        "--ct-weights",
    )
    assert_user_error(invoke("train", *ct_c, "--minutes", 0, *common, "--out", tmp_path / "w"), "--minutes")
