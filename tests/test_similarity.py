"""ProST's learned similarity: the geodesic target, the double-backward direction loss (against finite
differences), a few training steps on a fixed batch, and the training run (outputs, exact resume)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
import torch

from xraypose.datasets.synthetic import mobile_carm_intrinsics
from xraypose.errors import FileFormatError, InputError
from xraypose.geometry.se3 import compose, invert, se3_exp, se3_log
from xraypose.io import Volume, load_default_ct
from xraypose.learning import (
    AugmentConfig,
    LearnedSimilarity,
    PoseDataStream,
    SimilarityConfig,
    SimilarityTrainingConfig,
    check_model_card,
    direction_loss,
    geodesic_direction,
    load_similarity,
    prepare_volume,
    sample_pairs,
    train_similarity,
)
from xraypose.learning.similarity import pivot_frames

SMALL = SimilarityConfig(
    image_size=32,
    n_samples=32,
    volume_size=24,
    volume_channels=2,
    conv3d_channels=(4,),
    encoder_channels=(8, 16, 16),
    encoding_channels=16,
)


@pytest.fixture(scope="module")
def ct() -> Volume:
    return load_default_ct(with_labels=False)


@pytest.fixture(scope="module")
def intr():
    return mobile_carm_intrinsics(256)


def _tconfig(**kw) -> SimilarityTrainingConfig:
    base = dict(
        steps=4,
        batch_size=2,
        lr=1e-3,
        warmup_steps=1,
        augment=AugmentConfig(strength=0.5),
        checkpoint_every=2,
        log_every=1,
        device="cpu",
        seed=5,
    )
    base.update(kw)
    return SimilarityTrainingConfig(**base)


def _pairs(ct, intr, config, step=0):
    stream = PoseDataStream(
        ct, intr, image_size=SMALL.image_size, batch_size=config.batch_size, center_world=ct.center_world
    )
    pivot = ct.center_world.double()
    return stream, sample_pairs(stream, config, step, pivot), pivot


def test_default_network_is_close_to_the_paper():
    net = LearnedSimilarity()
    n = sum(p.numel() for p in net.parameters())
    assert 0.7e6 < n < 0.9e6, n
    # the residual block starts at zero: the feature volume starts as the CT (repeated per channel)
    vol = torch.rand(1, 6, 5, 4)
    torch.testing.assert_close(net.feature_volume(vol), vol.expand(3, -1, -1, -1))
    assert SimilarityConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(InputError, match="norm"):
        SimilarityConfig(norm="layer")  # type: ignore[arg-type]


def test_geodesic_direction_reaches_the_truth_and_start_poses_follow_sigma(ct, intr):
    config = _tconfig(batch_size=64, augment=AugmentConfig(strength=0.0))
    stream, pairs, pivot = _pairs(ct, intr, replace(config, batch_size=2))
    g = torch.Generator().manual_seed(0)
    truth = pairs.truth[:1].expand(32, -1, -1)
    start = compose(truth, se3_exp(torch.randn(32, 6, generator=g, dtype=torch.float64) * 0.2))
    xi = geodesic_direction(start, truth, pivot)
    P, Pinv = pivot_frames(start, pivot)
    torch.testing.assert_close(
        compose(start, P, se3_exp(xi), Pinv), truth, rtol=1e-6, atol=1e-4
    )  # float32 truth
    # start poses: T_gt · P · exp(ξ) · P⁻¹ with ξ ~ N(0, σ²) per axis in the true pose's pivot chart
    from xraypose.learning.similarity_training import _start_poses

    truth = pairs.truth[:1].expand(400, -1, -1).clone()
    start = _start_poses(truth, pivot, replace(config, batch_size=400), 0, stream._source_inside)
    P, Pinv = pivot_frames(truth, pivot)
    offsets = se3_log(compose(Pinv, invert(truth), start, P))
    std = offsets.std(0)
    assert torch.allclose(std[:3], torch.full((3,), 22.0, dtype=torch.float64), rtol=0.15)
    assert torch.allclose(std[3:], torch.full((3,), 9.5 * torch.pi / 180, dtype=torch.float64), rtol=0.15)


class _Quadratic(torch.nn.Module):
    """A similarity ½|ζ − ξ*|² with ζ the pose's twist in the start chart: its descent direction is ξ*."""

    def __init__(self, start, truth, pivot):
        super().__init__()
        self.start, self.pivot = start, pivot
        self.target = geodesic_direction(start, truth, pivot)

    def forward(self, features, affine, camera, fixed):
        P, Pinv = pivot_frames(self.start, self.pivot)
        zeta = se3_log(compose(Pinv, invert(self.start), camera.pose, P))
        return 0.5 * ((zeta - self.target) ** 2).sum(-1) * features.sum() / features.sum().detach()


def test_direction_loss_is_zero_along_the_geodesic(ct, intr):
    _, pairs, pivot = _pairs(ct, intr, _tconfig(augment=AugmentConfig(strength=0.0)))
    feats = torch.ones(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    model = _Quadratic(pairs.start, pairs.truth, pivot)
    terms = direction_loss(model, feats, torch.eye(4), intr, pairs.fixed, pairs.start, pairs.truth, pivot)  # type: ignore[arg-type]
    assert terms["loss"].item() == pytest.approx(0.0, abs=1e-5)  # float32-rounded poses
    assert terms["cos_rotation"].item() == pytest.approx(1.0, abs=1e-5)
    assert terms["cos_translation"].item() == pytest.approx(1.0, abs=1e-5)
    model.target = -model.target  # a similarity whose descent points away from the truth
    away = direction_loss(model, feats, torch.eye(4), intr, pairs.fixed, pairs.start, pairs.truth, pivot)  # type: ignore[arg-type]
    assert away["loss"].item() == pytest.approx(4.0, abs=1e-5)


@pytest.mark.parametrize("limits", ["corners", "box"])
def test_double_backward_gradient_against_finite_differences(ct, intr, limits):
    """d(direction loss)/d(network weights), which runs through ∂S/∂pose taken with create_graph=True, equals
    central finite differences of the loss (float64, tiny volume, network and detector), for both limits."""
    tiny = SimilarityConfig(
        limits=limits,
        image_size=8,
        n_samples=6,
        volume_size=5,
        volume_channels=2,
        conv3d_channels=(2,),
        encoder_channels=(2, 4, 4),
        encoding_channels=2,
    )
    torch.manual_seed(0)
    model = LearnedSimilarity(tiny).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    vol = prepare_volume(ct, tiny.volume_size)
    volume, affine = vol.volume.double(), vol.affine.double()
    small_intr = intr.resized(tiny.image_size)
    config = _tconfig(augment=AugmentConfig(strength=0.0))
    stream = PoseDataStream(ct, intr, image_size=tiny.image_size, batch_size=2, center_world=ct.center_world)
    pivot = ct.center_world.double()
    pairs = sample_pairs(stream, config, 0, pivot)
    fixed = pairs.fixed.double()
    full = _Full(model)
    names = ["net.residual3d.2.bias", "net.residual3d.0.bias", "net.encode_moving.0.bias"]
    named = dict(full.named_parameters())

    def loss_of(*values):
        override = dict(zip(names, values, strict=True))

        def similarity(volume, affine, camera, fixed):
            return torch.func.functional_call(full, override, (volume, affine, camera, fixed))

        return direction_loss(similarity, volume, affine, small_intr, fixed, pairs.start, pairs.truth, pivot)[
            "loss"
        ]  # type: ignore[arg-type]

    inputs = tuple(named[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


class _Full(torch.nn.Module):
    """The similarity from the input volume (feature volume included), for a functional call."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, volume, affine, camera, fixed):
        return self.net(self.net.feature_volume(volume), affine, camera, fixed)


def test_a_few_steps_reduce_the_direction_loss_on_a_fixed_batch(ct, intr):
    small = replace(SMALL, n_samples=24, volume_size=16, encoder_channels=(8, 8, 8), encoding_channels=8)
    config = _tconfig(batch_size=3, augment=AugmentConfig(strength=0.0), seed=1)
    stream = PoseDataStream(ct, intr, image_size=32, batch_size=3, center_world=ct.center_world)
    pivot = ct.center_world.double()
    pairs = sample_pairs(stream, config, 0, pivot)
    torch.manual_seed(1)
    model = LearnedSimilarity(small)
    vol = prepare_volume(ct, small.volume_size)
    small_intr = intr.resized(small.image_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def loss() -> torch.Tensor:
        feats = model.feature_volume(vol.volume)
        return direction_loss(
            model, feats, vol.affine, small_intr, pairs.fixed, pairs.start, pairs.truth, pivot
        )["loss"]

    before = loss()
    for _ in range(8):
        opt.zero_grad()
        loss().backward()
        opt.step()
    after = loss().item()
    # measured 2.19 → 1.40 (seeds 2, 3 of the batch and the initialisation: 1.32 → 0.97, 1.70 → 1.08)
    assert after < before.item() - 0.3, (before.item(), after)


@pytest.fixture(scope="module")
def reference_run(ct, intr, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim_ref")
    result = train_similarity(ct, intr, out, _tconfig(), SMALL, center_world=ct.center_world, progress=False)
    return out, result


def _weights(out):
    model, _ = LearnedSimilarity.load(out / "similarity.safetensors")
    return model.state_dict()


def test_training_writes_outputs_and_loads(ct, intr, reference_run):
    out, result = reference_run
    assert result.finished and result.steps == 4
    for name in ("checkpoint.pt", "similarity.safetensors", "model_card.json", "log.csv"):
        assert (out / name).is_file(), name
    with (out / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert {"loss", "cos_rotation", "cos_translation", "similarity", "lr", "pairs_per_s"} <= set(rows[0])
    card = json.loads((out / "model_card.json").read_text())
    assert card["kind"] == "prost_similarity" and card["steps_done"] == 4
    assert check_model_card(card, ct, intr.resized(128)) == []
    loaded = load_similarity(out)
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, result.model.state_dict()[k], rtol=0, atol=0)
    torch.testing.assert_close(loaded.pivot_world, ct.center_world.double())
    assert loaded.prepare(ct).scale == result.volume.scale
    with pytest.raises(FileFormatError):
        load_similarity(out / "log.csv")


def test_training_stops_at_the_time_budget(ct, intr, tmp_path):
    base = _tconfig(steps=1000)
    timed = _tconfig(steps=1000, max_seconds=0.05)
    assert timed.schedule_position(3, 0.025) == 500 and base.schedule_position(3, 1e9) == 3
    assert timed.lr_factor(0, 999) == base.lr_factor(0)  # warm-up counts steps
    assert timed.lr_factor(10, 999) == pytest.approx(base.final_lr_fraction)
    result = train_similarity(ct, intr, tmp_path, timed, SMALL, center_world=ct.center_world, progress=False)
    assert result.finished and 1 <= result.steps < 1000
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["stopped_by"] == "time_budget" and card["steps_done"] == result.steps
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == result.steps
    with (tmp_path / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert int(rows[-1]["step"]) == result.steps
    again = train_similarity(ct, intr, tmp_path, timed, SMALL, center_world=ct.center_world, progress=False)
    assert again.steps == result.steps and again.card["stopped_by"] == "time_budget"
    with pytest.raises(InputError, match="max_seconds"):
        _tconfig(max_seconds=-1.0)


def test_resume_is_exact(ct, intr, reference_run, tmp_path):
    ref_out, _ = reference_run
    first = train_similarity(
        ct, intr, tmp_path, _tconfig(), SMALL, center_world=ct.center_world, progress=False, stop_after=2
    )
    assert not first.finished and first.steps == 2
    second = train_similarity(
        ct, intr, tmp_path, _tconfig(checkpoint_every=3), SMALL, center_world=ct.center_world, progress=False
    )
    assert second.resumed_from == 2 and second.finished
    want, got = _weights(ref_out), _weights(tmp_path)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)  # bitwise
    with (tmp_path / "log.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    with pytest.raises(InputError, match="rotation_sigma_deg"):
        train_similarity(
            ct,
            intr,
            tmp_path,
            _tconfig(rotation_sigma_deg=5.0),
            SMALL,
            center_world=ct.center_world,
            progress=False,
        )
