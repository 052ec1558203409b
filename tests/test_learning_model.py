"""Pose regression network (xraypose.learning.model): shapes, options, gradients, weight files, no network."""

from __future__ import annotations

import json
import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before timm / huggingface_hub are imported

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from xraypose.errors import FileFormatError, InputError
from xraypose.learning import (
    PoseNormalizer,
    PoseOutput,
    PoseRegressor,
    PoseRegressorConfig,
    SpatialSelfAttention,
    available_backbones,
    sinusoidal_position_embedding_2d,
)
from xraypose.learning import model as model_module

SIZE = 64


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may open a network connection, and every timm model must be built with pretrained=False."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    real = timm.create_model
    calls: list[dict] = []

    def spy(name, *args, **kwargs):
        calls.append(kwargs)
        assert not args and kwargs.get("pretrained") is False, "timm.create_model must get pretrained=False"
        return real(name, *args, **kwargs)

    monkeypatch.setattr(model_module.timm, "create_model", spy)
    yield calls


def _config(**kw) -> PoseRegressorConfig:
    kw.setdefault("image_size", SIZE)
    return PoseRegressorConfig(**kw)


def _x(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_b0"])
@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("autoencoder", [False, True])
def test_forward_shapes_rotations_and_gradients(backbone, attention, autoencoder, _offline):
    torch.manual_seed(0)
    model = PoseRegressor(_config(backbone=backbone, attention=attention, autoencoder=autoencoder))
    assert _offline and all(c["pretrained"] is False for c in _offline)
    x = _x()
    out = model(x)
    assert isinstance(out, PoseOutput)
    assert out.rotation.shape == (2, 3, 3) and out.translation_norm.shape == (2, 3)
    R = out.rotation.detach()
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3).expand(2, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(2), atol=1e-5)
    if autoencoder:
        assert out.reconstruction is not None and out.reconstruction.shape == x.shape
        assert out.latent is not None and out.latent.shape[1] == model.feature_channels
    else:
        assert out.reconstruction is None and out.latent is None
    assert (model.attention is not None) == attention

    g = torch.Generator().manual_seed(1)
    loss = (out.rotation * torch.randn(2, 3, 3, generator=g)).sum()
    loss = (
        loss + (out.translation_norm * torch.randn(2, 3, generator=g)).sum() + model.autoencoder_loss(x, out)
    )
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
    assert any(p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_initial_prediction_is_identity_and_mean():
    torch.manual_seed(0)
    model = PoseRegressor(_config()).eval()
    with torch.no_grad():
        out = model(_x())
    assert torch.allclose(out.rotation, torch.eye(3).expand(2, 3, 3), atol=0.1)
    assert out.translation_norm.abs().max() < 0.5


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_b0"])
def test_groupnorm_replaces_every_batchnorm(backbone):
    model = PoseRegressor(_config(backbone=backbone, norm="group", autoencoder=True))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert groups and all(m.num_channels % m.num_groups == 0 for m in groups)
    if backbone == "resnet18":  # DiffPose's GroupNorm ResNet-18: 32 groups everywhere
        assert all(m.num_groups == 32 for m in model.backbone.modules() if isinstance(m, nn.GroupNorm))
    batch = PoseRegressor(_config(backbone=backbone))
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in batch.backbone.modules())
    out = model(_x())
    assert torch.isfinite(out.rotation).all()


def test_save_load_safetensors_identical_outputs(tmp_path):
    torch.manual_seed(0)
    config = _config(attention=True, autoencoder=True, norm="group")
    model = PoseRegressor(config).eval()
    norm = PoseNormalizer(mean=(1.0, -2.0, 300.0), scale=(10.0, 20.0, 30.0))
    path = tmp_path / "model.safetensors"
    model.save(path, normalizer=norm)

    loaded, loaded_norm = PoseRegressor.load(path)
    loaded.eval()
    assert loaded.config == config and loaded_norm == norm
    x = _x()
    with torch.no_grad():
        a, b = model(x), loaded(x)
        assert torch.equal(a.rotation, b.rotation)
        assert torch.equal(a.translation_norm, b.translation_norm)
        assert torch.equal(a.reconstruction, b.reconstruction)
        assert torch.equal(model.predict_pose(x, norm), loaded.predict_pose(x, loaded_norm))

    # The same file through the configuration's 'weights' entry.
    again = PoseRegressor(_config(attention=True, autoencoder=True, norm="group", weights=str(path))).eval()
    with torch.no_grad():
        assert torch.equal(again(x).rotation, a.rotation)


def test_save_load_torch_file_weights_only(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = PoseRegressor(_config()).eval()
    path = tmp_path / "model.pt"
    model.save(path)
    blob = torch.load(path, weights_only=True)  # plain containers only
    assert blob["config"]["backbone"] == "resnet18" and blob["normalizer"] is None

    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded, norm = PoseRegressor.load(path)
    assert seen == [True] and norm is None
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).rotation, model(x).rotation)

    # A plain full-model state dict in a torch file loads through load_weights.
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    fresh = PoseRegressor(_config()).eval()
    fresh.load_weights(plain)
    with torch.no_grad():
        assert torch.equal(fresh(x).translation_norm, model(x).translation_norm)


def test_torch_file_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": PoseNormalizer()}, path)
    with pytest.raises(FileFormatError, match="weights_only"):
        PoseRegressor(_config()).load_weights(path)


def test_backbone_only_timm_weights(tmp_path):
    """A timm state dict (RGB stem, classifier) loads into the backbone: classifier dropped, stem adapted."""
    torch.manual_seed(0)
    rgb = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=3)
    path = tmp_path / "resnet18_rgb.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(path))
    model = PoseRegressor(_config(weights=str(path)))
    assert torch.allclose(model.backbone.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)

    # Backbone keys that do not match are reported, a few by name.
    state = rgb.state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    with pytest.raises(
        FileFormatError, match=r"missing keys: layer1\.0\.conv1\.weight.*unexpected keys: extra"
    ):
        PoseRegressor(_config()).load_weights(bad)


def test_missing_file_unknown_backbone_and_shape_mismatch(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileFormatError, match=r"nowhere\.safetensors"):
        PoseRegressor(_config(weights=str(missing)))
    with pytest.raises(FileFormatError, match=r"nowhere\.safetensors"):
        PoseRegressor.load(missing)

    with pytest.raises(InputError, match=r"unknown backbone 'resnet_does_not_exist'.*timm\.list_models"):
        PoseRegressor(_config(backbone="resnet_does_not_exist"))

    model = PoseRegressor(_config())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.2.weight"] = torch.zeros(7, 256)
    path = tmp_path / "shape.safetensors"
    save_file(state, str(path))
    with pytest.raises(FileFormatError, match=r"head\.2\.weight.*\(7, 256\).*\(9, 256\)"):
        model.load_weights(path)

    # Saved with attention, loaded without: the extra keys are named.
    att = tmp_path / "att.safetensors"
    PoseRegressor(_config(attention=True)).save(att)
    with pytest.raises(FileFormatError, match=r"unexpected keys: attention\."):
        model.load_weights(att)

    # Not a weights file at all.
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(FileFormatError, match=r"junk\.safetensors"):
        model.load_weights(junk)

    # A timm state dict carries no configuration.
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    with pytest.raises(FileFormatError, match="no xraypose configuration"):
        PoseRegressor.load(plain)


def test_input_and_config_validation():
    model = PoseRegressor(_config())
    with pytest.raises(InputError, match=r"\(B, 1, 64, 64\)"):
        model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(InputError, match=r"\(B, 1, 64, 64\)"):
        model(torch.zeros(2, 3, 64, 64))
    with pytest.raises(InputError, match="norm"):
        PoseRegressorConfig(norm="layer")
    with pytest.raises(InputError, match="image_size"):
        PoseRegressorConfig(image_size=16)
    with pytest.raises(InputError, match="heads"):
        PoseRegressor(_config(attention=True, attention_heads=3))
    with pytest.raises(InputError, match="PoseNormalizer"):
        model.predict_pose(_x(), None)


def test_config_and_normalizer_json_round_trip():
    config = PoseRegressorConfig(
        backbone="efficientnet_b0",
        norm="group",
        attention=True,
        attention_heads=8,
        autoencoder=True,
        image_size=128,
        weights="/tmp/w.safetensors",
    )
    assert PoseRegressorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert PoseRegressorConfig.from_dict({}) == PoseRegressorConfig()
    with pytest.raises(InputError, match="unknown keys"):
        PoseRegressorConfig.from_dict({"backbone": "resnet18", "depth": 3})

    norm = PoseNormalizer(mean=(1.0, 2.0, 3.0), scale=(4.0, 5.0, 6.0))
    assert PoseNormalizer.from_dict(json.loads(json.dumps(norm.to_dict()))) == norm
    t = torch.tensor([[1.0, 2.0, 3.0], [5.0, 7.0, 9.0]], dtype=torch.float64)
    assert torch.allclose(norm.denormalize(norm.normalize(t)), t)
    assert torch.allclose(norm.normalize(t)[1], torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    fitted = PoseNormalizer.from_translations(t, min_scale=0.5)
    assert fitted.mean == (3.0, 4.5, 6.0) and fitted.scale == (2.0, 2.5, 3.0)
    with pytest.raises(InputError):
        PoseNormalizer(scale=(1.0, 0.0, 1.0))


def test_predict_pose_is_rigid_in_mm():
    torch.manual_seed(0)
    model = PoseRegressor(_config()).eval()
    norm = PoseNormalizer(mean=(10.0, -20.0, 600.0), scale=(5.0, 5.0, 50.0))
    x = _x()
    with torch.no_grad():
        T = model.predict_pose(x, norm)
        out = model(x)
    assert T.shape == (2, 4, 4)
    assert torch.equal(T[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(2, 4))
    assert torch.allclose(T[:, :3, :3], out.rotation)
    expected = torch.tensor([10.0, -20.0, 600.0]) + torch.tensor([5.0, 5.0, 50.0]) * out.translation_norm
    assert torch.allclose(T[:, :3, 3], expected)


def test_positional_embedding_distinguishes_positions():
    emb = sinusoidal_position_embedding_2d(4, 5, 32)
    assert emb.shape == (20, 32)
    d = torch.cdist(emb, emb)
    assert (d + torch.eye(20) * 1e9).min() > 1e-3  # every position has its own embedding
    # Rows and columns are encoded separately: same row, different column differ only in the second half.
    assert torch.equal(emb[0, :16], emb[1, :16]) and not torch.equal(emb[0, 16:], emb[1, 16:])
    with pytest.raises(InputError):
        sinusoidal_position_embedding_2d(2, 2, 30)


def test_attention_depends_on_spatial_position():
    """Self-attention alone is permutation-equivariant; with the positional embedding, permuting the tokens
    spatially changes the result (and its pooled mean, which the head reads)."""
    torch.manual_seed(0)
    block = SpatialSelfAttention(32, 4).eval()
    f = torch.randn(2, 32, 3, 4)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))

    def permute(t):
        return t.flatten(2)[..., perm].reshape(t.shape)

    with torch.no_grad():
        y, y_perm = block(f), block(permute(f))
        assert not torch.allclose(y_perm, permute(y), atol=1e-4)
        assert not torch.allclose(y_perm.mean((-2, -1)), y.mean((-2, -1)), atol=1e-4)

        # Control: without the embedding the block would not see positions.
        real = model_module.sinusoidal_position_embedding_2d
        try:
            model_module.sinusoidal_position_embedding_2d = lambda h, w, c, **kw: torch.zeros(h * w, c)
            assert torch.allclose(block(permute(f)), permute(block(f)), atol=1e-5)
        finally:
            model_module.sinusoidal_position_embedding_2d = real


def test_available_backbones():
    names = available_backbones()
    assert names[0] == "resnet18" and "efficientnet_b0" in names and "convnext_atto" in names
    assert all(timm.is_model(n) for n in names)
    model = PoseRegressor(_config(backbone="convnext_atto", attention=True, autoencoder=True))
    assert model(_x()).reconstruction.shape == (2, 1, SIZE, SIZE)
