"""Patient-specific pose regression network: an X-ray (or DRR) in, a C-arm pose out.

Architecture (DiffPose, Gopalakrishnan et al. 2024, with the options of the Diff-DeepDRR poster):

- a `timm <https://huggingface.co/docs/timm>`_ CNN backbone chosen by name (``resnet18`` by default, as
  DiffPose; ``efficientnet_b0`` as the poster), built with ``pretrained=False`` **always**: weights come
  only from a local file (:attr:`PoseRegressorConfig.weights`), nothing is ever downloaded. The backbone
  returns its last feature map ``(B, C, h, w)`` (``h = H / 32`` for the listed backbones);
- optionally (``norm="group"``) every BatchNorm of the backbone replaced by a GroupNorm (DiffPose trains a
  GroupNorm ResNet-18; batch statistics of a few DRRs of one patient are poor);
- optionally (``attention=True``) one pre-norm transformer block (multi-head self-attention over the
  ``h * w`` feature-map tokens, then an MLP, both residual) with a **fixed sinusoidal 2D positional
  embedding** added to the tokens: it has no parameters and is defined for any ``h, w``;
- global average pooling and an MLP head predicting 9 numbers: a 6D rotation (Zhou et al. 2019, turned into
  a matrix by :func:`xraypose.geometry.rotations.rotation_6d_to_matrix`) and a translation ``t_norm`` in a
  normalised frame, ``t_mm = mean + scale * t_norm`` (:class:`PoseNormalizer`). The last layer is
  initialised near zero with a bias giving the identity rotation and ``t_norm = 0``;
- optionally (``autoencoder=True``) a regularised autoencoder branch: a small upsampling decoder
  reconstructs the input image from the backbone feature map (before attention), trained with
  :meth:`PoseRegressor.autoencoder_loss` (weighted reconstruction MSE plus an L2 penalty on the latent
  feature map, the "RAE-L2" regulariser of Ghosh et al. 2020).

The network predicts the 4x4 transform ``[R | t_mm]`` (:meth:`PoseRegressor.predict_pose`) in whatever frame
the training targets were given in (training defines poses relative to a reference pose; the model does not
know about it). Inputs are ``(B, in_chans, image_size, image_size)`` float images, normalised by the caller
the same way in training and inference.

Saving and loading: :meth:`PoseRegressor.save` writes ``.safetensors`` (configuration and normaliser as JSON
metadata) or a torch file of plain containers (loadable with ``torch.load(..., weights_only=True)``);
:meth:`PoseRegressor.load` reads either back. A backbone-only timm state dict can be loaded into the backbone
(``weights=`` in the configuration or :meth:`PoseRegressor.load_weights`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import safetensors
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from torch import nn

from xraypose.errors import FileFormatError, InputError
from xraypose.geometry.rotations import rotation_6d_to_matrix
from xraypose.geometry.se3 import make_transform
from xraypose.learning._config import dataclass_from_dict

__all__ = [
    "PoseNormalizer",
    "PoseOutput",
    "PoseRegressor",
    "PoseRegressorConfig",
    "SpatialSelfAttention",
    "available_backbones",
    "sinusoidal_position_embedding_2d",
]

# Backbones checked to build offline (timm 1.0.31, ``pretrained=False``), to return a feature map with
# ``in_chans=1``, to take the GroupNorm conversion and to train with every option on 64x64 inputs.
_BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
    "efficientnet_b1",
    "convnext_atto",
    "convnext_tiny",
    "mobilenetv3_large_100",
    "regnety_004",
    "densenet121",
)

_FORMAT = "xraypose.pose_regressor"
_FORMAT_VERSION = 1


def available_backbones() -> tuple[str, ...]:
    """Backbone names known to work (built offline and tested); any other timm CNN name may be tried."""
    return _BACKBONES


# --------------------------------------------------------------------------------------------------
# Configuration and translation normalisation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoseRegressorConfig:
    """Architecture of a :class:`PoseRegressor` (JSON-serialisable with :meth:`to_dict` / :meth:`from_dict`).

    Attributes:
        backbone: timm model name (see :func:`available_backbones`).
        in_chans: image channels (1 for X-rays).
        norm: ``"batch"`` keeps the backbone's BatchNorm; ``"group"`` replaces every BatchNorm by a GroupNorm
            (32 groups where the channel count allows, else the largest divisor <= 32 leaving >= 2 channels
            per group); backbones without BatchNorm (ConvNeXt: LayerNorm) are unchanged. Also the decoder's.
        attention: add the self-attention block on the feature map.
        attention_heads: its number of heads (must divide the backbone's feature channels).
        autoencoder: add the decoder branch reconstructing the input.
        autoencoder_weight: weight of the autoencoder loss (:meth:`PoseRegressor.autoencoder_loss`).
        autoencoder_latent_weight: weight of the latent L2 penalty inside it.
        head_hidden: width of the hidden layer of the pose head.
        image_size: side of the square input images the model takes (>= 32).
        weights: optional local weights file (full model or backbone only) loaded at construction.
    """

    backbone: str = "resnet18"
    in_chans: int = 1
    norm: Literal["batch", "group"] = "batch"
    attention: bool = False
    attention_heads: int = 4
    autoencoder: bool = False
    autoencoder_weight: float = 1.0
    autoencoder_latent_weight: float = 1e-4
    head_hidden: int = 256
    image_size: int = 256
    weights: str | None = None

    def __post_init__(self) -> None:
        def bad(field: str, expected: str) -> InputError:
            return InputError(
                f"PoseRegressorConfig: '{field}' must be {expected}; got {getattr(self, field)!r}"
            )

        if not isinstance(self.backbone, str) or not self.backbone:
            raise bad("backbone", "a timm model name")
        for field, low in (("in_chans", 1), ("attention_heads", 1), ("head_hidden", 1), ("image_size", 32)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(field, f"an integer >= {low}")
        if self.norm not in ("batch", "group"):
            raise bad("norm", "'batch' or 'group'")
        for field in ("attention", "autoencoder"):
            if not isinstance(getattr(self, field), bool):
                raise bad(field, "a bool")
        for field in ("autoencoder_weight", "autoencoder_latent_weight"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(field, "a finite number >= 0")
            if value < 0:
                raise bad(field, "a finite number >= 0")
        if self.weights is not None and not isinstance(self.weights, (str, os.PathLike)):
            raise bad("weights", "a file path or None")
        if self.weights is not None:
            object.__setattr__(self, "weights", os.fspath(self.weights))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of JSON types."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoseRegressorConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`InputError`, missing ones take defaults."""
        return dataclass_from_dict(cls, data)


@dataclass(frozen=True)
class PoseNormalizer:
    """Translation normalisation: ``t_mm = mean + scale * t_norm`` per axis (mm).

    Attributes:
        mean: ``(3,)`` translation mean in mm.
        scale: ``(3,)`` positive scales in mm (typically the per-axis standard deviation of the training poses).
    """

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        for field in ("mean", "scale"):
            value = getattr(self, field)
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError) as err:
                raise InputError(f"PoseNormalizer: '{field}' must be 3 numbers; got {value!r}") from err
            if len(value) != 3 or not all(math.isfinite(v) for v in value):
                raise InputError(f"PoseNormalizer: '{field}' must be 3 finite numbers; got {value!r}")
            object.__setattr__(self, field, value)
        if not all(s > 0 for s in self.scale):
            raise InputError(f"PoseNormalizer: 'scale' must be positive; got {self.scale!r}")

    @classmethod
    def from_translations(cls, t_mm: torch.Tensor, *, min_scale: float = 1.0) -> PoseNormalizer:
        """Mean and per-axis standard deviation (at least ``min_scale`` mm) of ``(N, 3)`` translations."""
        if not isinstance(t_mm, torch.Tensor) or t_mm.ndim != 2 or t_mm.shape[-1] != 3 or t_mm.shape[0] < 1:
            raise InputError(
                "PoseNormalizer.from_translations: 't_mm' must be a tensor of shape (N, 3), N >= 1; got "
                f"{tuple(t_mm.shape) if isinstance(t_mm, torch.Tensor) else type(t_mm).__name__}"
            )
        t = t_mm.detach().double().cpu()
        std = t.std(dim=0, unbiased=False) if t.shape[0] > 1 else torch.zeros(3, dtype=torch.float64)
        return cls(tuple(t.mean(dim=0).tolist()), tuple(std.clamp_min(min_scale).tolist()))

    def _tensors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kw = {"dtype": like.dtype, "device": like.device}
        return torch.tensor(self.mean, **kw), torch.tensor(self.scale, **kw)

    def normalize(self, t_mm: torch.Tensor) -> torch.Tensor:
        """``(..., 3)`` mm to normalised units."""
        mean, scale = self._tensors(t_mm)
        return (t_mm - mean) / scale

    def denormalize(self, t_norm: torch.Tensor) -> torch.Tensor:
        """``(..., 3)`` normalised units to mm."""
        mean, scale = self._tensors(t_norm)
        return mean + scale * t_norm

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoseNormalizer:
        if not isinstance(data, Mapping) or set(data) != {"mean", "scale"}:
            raise InputError(f"PoseNormalizer.from_dict: expected keys 'mean' and 'scale'; got {data!r}")
        return cls(tuple(data["mean"]), tuple(data["scale"]))


class PoseOutput(NamedTuple):
    """What :meth:`PoseRegressor.forward` returns.

    Attributes:
        rotation: ``(B, 3, 3)`` rotation matrices.
        translation_norm: ``(B, 3)`` normalised translations (see :class:`PoseNormalizer`).
        reconstruction: ``(B, C, H, W)`` reconstructed input (autoencoder branch), else ``None``.
        latent: ``(B, C', h, w)`` backbone feature map the decoder read (autoencoder branch), else ``None``.
    """

    rotation: torch.Tensor
    translation_norm: torch.Tensor
    reconstruction: torch.Tensor | None = None
    latent: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def sinusoidal_position_embedding_2d(
    h: int, w: int, dim: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Fixed 2D sine-cosine positional embedding (as MAE's), ``(h * w, dim)`` in row-major token order.

    The first half of the channels encodes the row, the second half the column, each as
    ``sin(p * f_k), cos(p * f_k)`` with ``f_k = 10000^(-k / (dim / 4))``, ``p`` the grid index.
    ``dim`` must be divisible by 4.
    """
    if dim % 4 != 0 or dim <= 0:
        raise InputError(
            f"sinusoidal_position_embedding_2d: 'dim' must be a positive multiple of 4; got {dim}"
        )
    quarter = dim // 4
    freq = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    ay = ys.reshape(-1, 1) * freq
    ax = xs.reshape(-1, 1) * freq
    emb = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    return emb.to(dtype=dtype, device=device)


class SpatialSelfAttention(nn.Module):
    """Pre-norm transformer block over the tokens of a ``(B, C, h, w)`` feature map, returning the same shape.

    ``tokens = x + P`` (``P``: :func:`sinusoidal_position_embedding_2d`), then
    ``tokens += MHSA(LN(tokens))`` and ``tokens += MLP(LN(tokens))``.
    """

    def __init__(self, channels: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if channels % heads != 0 or channels % 4 != 0:
            raise InputError(
                f"SpatialSelfAttention: the feature channels ({channels}) must be divisible by the number of "
                f"heads ({heads}) and by 4 (positional embedding)"
            )
        self.channels = channels
        self.norm1 = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(channels)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pos = sinusoidal_position_embedding_2d(h, w, c, dtype=x.dtype, device=x.device)
        t = x.flatten(2).transpose(1, 2) + pos
        q = self.norm1(t)
        t = t + self.attn(q, q, q, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


def _group_count(channels: int) -> int:
    """32 groups where possible, else the largest divisor <= 32 leaving at least 2 channels per group."""
    for g in range(min(32, max(channels // 2, 1)), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _norm2d(channels: int, kind: str) -> nn.Module:
    return nn.GroupNorm(_group_count(channels), channels) if kind == "group" else nn.BatchNorm2d(channels)


def _batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    """Replace (in place, recursively) every BatchNorm2d, including timm's BatchNormAct2d, by a GroupNorm."""
    from timm.layers import BatchNormAct2d, GroupNormAct

    for name, child in module.named_children():
        if isinstance(child, BatchNormAct2d):
            gn = GroupNormAct(
                child.num_features,
                _group_count(child.num_features),
                eps=child.eps,
                affine=child.affine,
                apply_act=False,
            )
            gn.act, gn.drop = child.act, child.drop
            setattr(module, name, gn)
        elif isinstance(child, nn.BatchNorm2d):
            n = child.num_features
            setattr(module, name, nn.GroupNorm(_group_count(n), n, eps=child.eps, affine=child.affine))
        else:
            _batchnorm_to_groupnorm(child)
    return module


class _Decoder(nn.Module):
    """Feature map to image: 1x1 conv, ``n_up`` x (2x bilinear upsampling, 3x3 conv, norm, ReLU), 3x3 conv,
    and a final bilinear resize to the exact input size."""

    def __init__(self, channels: int, out_chans: int, n_up: int, norm: str) -> None:
        super().__init__()
        width = min(256, channels)
        self.proj = nn.Conv2d(channels, width, 1)
        blocks: list[nn.Module] = []
        for _ in range(n_up):
            nxt = max(16, width // 2)
            blocks += [
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(width, nxt, 3, padding=1, bias=False),
                _norm2d(nxt, norm),
                nn.ReLU(inplace=True),
            ]
            width = nxt
        self.up = nn.Sequential(*blocks)
        self.out = nn.Conv2d(width, out_chans, 3, padding=1)

    def forward(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = self.out(self.up(self.proj(z)))
        if tuple(y.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y


def _create_backbone(config: PoseRegressorConfig) -> nn.Module:
    name = config.backbone
    if not timm.is_model(name):
        raise InputError(
            f"PoseRegressor: unknown backbone {name!r}; tested names: {', '.join(_BACKBONES)} "
            "(any CNN of timm.list_models() may be tried)"
        )
    # pretrained=False always: weights come only from a local file, never from the network.
    model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", in_chans=config.in_chans)
    if config.norm == "group":
        _batchnorm_to_groupnorm(model)
    return model


# --------------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------------


def _read_weight_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and xraypose metadata (config/normalizer dicts, possibly empty) of a weights file."""
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(
            f"weights file not found: '{p}' (expected a local .safetensors or torch state-dict file; "
            "xraypose never downloads weights)"
        )
    meta: dict[str, Any] = {}
    if p.suffix == ".safetensors":
        try:
            state = safetensors.torch.load_file(str(p), device="cpu")
            with safetensors.safe_open(str(p), framework="pt") as f:
                raw = f.metadata() or {}
        except Exception as err:
            raise FileFormatError(f"cannot read safetensors file '{p}': {err}") from err
        if raw.get("format") == _FORMAT:
            try:
                meta = {k: json.loads(raw[k]) for k in ("config", "normalizer") if k in raw}
            except json.JSONDecodeError as err:
                raise FileFormatError(f"'{p}': invalid JSON metadata: {err}") from err
        return state, meta
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:
        raise FileFormatError(
            f"cannot read torch weights file '{p}' with torch.load(weights_only=True) (expected a state dict "
            f"of tensors, or a dict with a 'state_dict' entry; pickled objects are refused): {err}"
        ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        if obj.get("format") == _FORMAT:
            meta = {k: obj[k] for k in ("config", "normalizer") if obj.get(k) is not None}
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise FileFormatError(
            f"'{p}' does not hold a state dict (a mapping of parameter names to tensors, or a dict with a "
            "'state_dict' entry)"
        )
    return dict(obj), meta


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, … ({len(keys)} in all)" if len(keys) > n else shown


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: str, what: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        raise FileFormatError(
            f"weights file '{path}' does not match the {what}: "
            + "; ".join(parts)
            + " (was it saved with a different backbone, norm, attention or autoencoder setting?)"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise FileFormatError(
                f"weights file '{path}': tensor '{k}' has shape {tuple(state[k].shape)}, the {what} expects "
                f"{tuple(v.shape)}"
            )
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------


class PoseRegressor(nn.Module):
    """CNN pose regressor (see the module docstring). Build with a :class:`PoseRegressorConfig`."""

    def __init__(self, config: PoseRegressorConfig | None = None) -> None:
        super().__init__()
        config = PoseRegressorConfig() if config is None else config
        if not isinstance(config, PoseRegressorConfig):
            raise InputError(
                f"PoseRegressor: 'config' must be a PoseRegressorConfig; got {type(config).__name__}"
            )
        self.config = config
        self.backbone = _create_backbone(config)

        # Probe the feature map: channels and downsampling factor.
        probe = min(config.image_size, 64)
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            feats = self.backbone(torch.zeros(1, config.in_chans, probe, probe))
        self.backbone.train(was_training)
        if feats.ndim != 4:
            raise InputError(
                f"PoseRegressor: backbone {config.backbone!r} returns a {feats.ndim}D tensor, not a (B, C, h, w) "
                f"feature map (transformers return tokens); use a CNN, e.g. one of {', '.join(_BACKBONES)}"
            )
        self.feature_channels = int(feats.shape[1])
        self.feature_stride = probe / int(feats.shape[-1])

        self.attention = (
            SpatialSelfAttention(self.feature_channels, config.attention_heads) if config.attention else None
        )
        self.head = nn.Sequential(
            nn.Linear(self.feature_channels, config.head_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(config.head_hidden, 9),
        )
        last = self.head[-1]
        with torch.no_grad():  # start at the identity rotation and the mean translation
            last.weight.mul_(1e-2)
            last.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
        if config.autoencoder:
            n_up = max(0, round(math.log2(max(self.feature_stride, 1.0))))
            self.decoder: _Decoder | None = _Decoder(
                self.feature_channels, config.in_chans, n_up, config.norm
            )
        else:
            self.decoder = None
        if config.weights is not None:
            self.load_weights(config.weights)

    # ----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> PoseOutput:
        """Images ``(B, in_chans, image_size, image_size)`` to a :class:`PoseOutput`."""
        c, s = self.config.in_chans, self.config.image_size
        if (
            not isinstance(x, torch.Tensor)
            or not x.is_floating_point()
            or x.ndim != 4
            or tuple(x.shape[1:]) != (c, s, s)
        ):
            got = (
                f"shape {tuple(x.shape)}, dtype {x.dtype}"
                if isinstance(x, torch.Tensor)
                else type(x).__name__
            )
            raise InputError(
                f"PoseRegressor: input must be a float tensor of shape (B, {c}, {s}, {s}); got {got}"
            )
        z = self.backbone(x)
        feats = self.attention(z) if self.attention is not None else z
        out = self.head(feats.mean(dim=(-2, -1)))
        rotation = rotation_6d_to_matrix(out[:, :6])
        if self.decoder is None:
            return PoseOutput(rotation, out[:, 6:])
        return PoseOutput(rotation, out[:, 6:], self.decoder(z, (s, s)), z)

    def predict_pose(self, x: torch.Tensor, normalizer: PoseNormalizer) -> torch.Tensor:
        """``(B, 4, 4)`` transforms ``[R | t_mm]``, ``t_mm = normalizer.denormalize(t_norm)``.

        The frame is the one the training targets used (e.g. relative to a reference pose). Differentiable;
        call ``model.eval()`` (and ``torch.no_grad()``) for inference.
        """
        if not isinstance(normalizer, PoseNormalizer):
            raise InputError(
                f"predict_pose: 'normalizer' must be a PoseNormalizer; got {type(normalizer).__name__}"
            )
        out = self(x)
        return make_transform(out.rotation, normalizer.denormalize(out.translation_norm))

    def autoencoder_loss(self, x: torch.Tensor, output: PoseOutput) -> torch.Tensor:
        """Weighted regularised-autoencoder loss,
        ``autoencoder_weight * (mean((recon - x)^2) + autoencoder_latent_weight * mean(latent^2))``;
        a zero scalar when the branch is off."""
        if output.reconstruction is None or output.latent is None:
            return x.new_zeros(())
        rec = F.mse_loss(output.reconstruction, x)
        reg = output.latent.square().mean()
        return self.config.autoencoder_weight * (rec + self.config.autoencoder_latent_weight * reg)

    # ----------------------------------------------------------------------------------------------

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a local weights file: a full model state dict (keys ``backbone.…``, ``head.…``), as written by
        :meth:`save`, or a backbone-only timm state dict. For the latter the timm classifier weights are
        dropped and the first convolution is adapted to ``in_chans`` (timm's ``adapt_input_conv``: e.g. RGB
        weights summed to one channel). Any other missing/unexpected key or shape mismatch raises
        :class:`FileFormatError`."""
        state, _ = _read_weight_file(path)
        path = os.fspath(path)
        if any(k.startswith("backbone.") for k in state):
            _load_strict(self, state, path, f"PoseRegressor ({self.config.backbone})")
            return
        state = dict(state)
        own = self.backbone.state_dict()
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        classifier = cfg.get("classifier")
        if isinstance(classifier, str):
            for k in [k for k in state if k.startswith(classifier + ".") and k not in own]:
                del state[k]
        first = cfg.get("first_conv")
        if isinstance(first, str) and f"{first}.weight" in state and f"{first}.weight" in own:
            key = f"{first}.weight"
            w, want = state[key], own[key]
            if w.ndim == 4 and w.shape[1] != want.shape[1] and w.shape[0] == want.shape[0]:
                from timm.models import adapt_input_conv

                state[key] = adapt_input_conv(self.config.in_chans, w.float(), base_chans=w.shape[1]).to(
                    w.dtype
                )
        _load_strict(self.backbone, state, path, f"{self.config.backbone} backbone")

    def save(self, path: str | os.PathLike, normalizer: PoseNormalizer | None = None) -> None:
        """Write the weights, the configuration and the normaliser: ``.safetensors`` (JSON metadata) or, for any
        other suffix, a torch file of plain containers readable with ``torch.load(..., weights_only=True)``."""
        p = Path(path)
        config = dataclasses.replace(self.config, weights=None).to_dict()
        state = {k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()}
        norm = normalizer.to_dict() if normalizer is not None else None
        if p.suffix == ".safetensors":
            meta = {"format": _FORMAT, "version": str(_FORMAT_VERSION), "config": json.dumps(config)}
            if norm is not None:
                meta["normalizer"] = json.dumps(norm)
            safetensors.torch.save_file(state, str(p), metadata=meta)
        else:
            blob = {
                "format": _FORMAT,
                "version": _FORMAT_VERSION,
                "config": config,
                "normalizer": norm,
                "state_dict": state,
            }
            torch.save(blob, str(p))

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[PoseRegressor, PoseNormalizer | None]:
        """Rebuild a model written by :meth:`save` (on the CPU) and its normaliser (``None`` if none was saved)."""
        state, meta = _read_weight_file(path)
        if "config" not in meta:
            raise FileFormatError(
                f"'{os.fspath(path)}' has no xraypose configuration (expected a file written by "
                "PoseRegressor.save); build the model from a PoseRegressorConfig and call load_weights instead"
            )
        try:
            config = PoseRegressorConfig.from_dict(meta["config"])
            normalizer = PoseNormalizer.from_dict(meta["normalizer"]) if "normalizer" in meta else None
        except InputError as err:
            raise FileFormatError(f"'{os.fspath(path)}': invalid metadata: {err}") from err
        model = cls(config)
        _load_strict(model, state, os.fspath(path), f"PoseRegressor ({config.backbone})")
        return model, normalizer
