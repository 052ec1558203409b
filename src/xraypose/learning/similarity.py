"""ProST's learned similarity (Gao et al., MICCAI 2020 / IEEE TMI 2024): a network whose value, as a function of
the C-arm pose, is meant to descend along the SE(3) geodesic toward the true pose.

Architecture (:class:`LearnedSimilarity`, :class:`SimilarityConfig`; defaults close to the paper's, about
0.8 M parameters):

1. a small 3D convolutional block adds a residual to the CT volume (repeated to ``volume_channels``), giving a
   learned ``C``-channel feature volume ``F = x + f(x)`` (the block's last layer starts at zero, so ``F``
   starts as the CT);
2. the projective spatial transformer (:func:`xraypose.render.projective_transform`) projects ``F`` at the
   pose: ``C`` line-integral images;
3. two 2D encoders with their own weights, one for that *moving* projection (``C`` channels) and one for the
   *fixed* X-ray (1 channel), each image standardised per channel first (the ``−ln(I/I0)`` domain's scale is
   arbitrary);
4. the similarity ``S`` is the distance between the two encodings (mean squared difference, or one minus
   their cosine), ``(B,)``: lower is more similar.

The input volume (:func:`prepare_volume`) is the CT's linear attenuation (the default HU → μ model) average-
pooled by powers of two until every axis has at most ``volume_size`` voxels (ProST used 128³), divided by its
maximum.

Direction loss (:func:`direction_loss`): at a start pose ``T_s`` the pose is parameterised as the
registration engine does, ``T(ξ) = T_s · P_s · exp(ξ) · P_s⁻¹`` with ``ξ = (v mm, ω rad)`` and ``P_s`` the
translation to the pivot (the CT centre) in the start camera's frame. With ``g = ∂S/∂ξ`` at ``ξ = 0`` (taken
with ``create_graph=True``) and the geodesic's tangent toward the truth ``ξ* = log(P_s⁻¹ · T_s⁻¹ · T_gt · P_s)``
(so that ``T(ξ*) = T_gt``; :func:`xraypose.geometry.se3.se3_log`), the loss is

    ``L = 2 − cos∠(−g_ω, ξ*_ω) − cos∠(−g_v, ξ*_v)``  ∈ [0, 4],

zero when steepest descent of ``S`` points along the geodesic in rotation and in translation separately (each
part normalised, so units and scales do not matter; the engine's Adam also scales the two parts separately).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FileFormatError, InputError
from ..geometry.camera import Camera, Intrinsics
from ..geometry.se3 import compose, invert, se3_exp, se3_log, transform_points
from ..io.attenuation import AttenuationModel
from ..io.volume import Volume
from ..render.drr import downsample_volume
from ..render.engine import double_differentiable
from ..render.projective import ProjectiveGrid, projective_transform
from ._config import dataclass_from_dict

__all__ = [
    "LearnedSimilarity",
    "PreparedVolume",
    "SimilarityConfig",
    "direction_loss",
    "geodesic_direction",
    "pivot_frames",
    "prepare_volume",
]

_FORMAT = "xraypose.learned_similarity"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SimilarityConfig:
    """Architecture of :class:`LearnedSimilarity` (JSON round trip with :meth:`to_dict` / :meth:`from_dict`).

    Attributes:
        image_size: side of the (square-resampled) detector images, pixels.
        n_samples: transformer samples per ray.
        limits: transformer limits, ``"corners"`` (ProST) or ``"box"``.
        volume_size: largest number of voxels per axis of the input volume (:func:`prepare_volume`).
        volume_channels: channels ``C`` of the feature volume.
        conv3d_channels: hidden channels of the 3D residual block (3×3×3 convolutions, ReLU).
        encoder_channels: channels of the encoders' three stages (each: 3×3 convolution, bottleneck residual
            block, 2× max pooling).
        encoding_channels: channels of the encodings (a last 3×3 convolution).
        norm: ``"group"`` (GroupNorm, per sample, so that a sample's similarity does not depend on the others
            of its batch; the default) or ``"batch"`` (the paper's BatchNorm).
        distance: ``"mse"`` (the paper's) or ``"cosine"``.
    """

    image_size: int = 64
    n_samples: int = 96
    limits: Literal["corners", "box"] = "corners"
    volume_size: int = 64
    volume_channels: int = 3
    conv3d_channels: tuple[int, ...] = (4, 8, 16, 8)
    encoder_channels: tuple[int, int, int] = (16, 64, 128)
    encoding_channels: int = 64
    norm: Literal["group", "batch"] = "group"
    distance: Literal["mse", "cosine"] = "mse"

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> InputError:
            return InputError(f"SimilarityConfig.{name}: expected {expected}; got {getattr(self, name)!r}")

        for name, low in (
            ("image_size", 8),
            ("n_samples", 1),
            ("volume_size", 4),
            ("volume_channels", 1),
            ("encoding_channels", 1),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise bad(name, f"an integer >= {low}")
        for name, length in (("conv3d_channels", None), ("encoder_channels", 3)):
            try:
                v = tuple(int(c) for c in getattr(self, name))
            except (TypeError, ValueError):
                raise bad(name, "a list of positive integers") from None
            if (length is not None and len(v) != length) or not all(c >= 1 for c in v):
                raise bad(name, f"{length or 'a list of'} positive integers")
            object.__setattr__(self, name, v)
        if self.limits not in ("corners", "box"):
            raise bad("limits", "'corners' or 'box'")
        if self.norm not in ("group", "batch"):
            raise bad("norm", "'group' or 'batch'")
        if self.distance not in ("mse", "cosine"):
            raise bad("distance", "'mse' or 'cosine'")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["conv3d_channels"] = list(self.conv3d_channels)
        d["encoder_channels"] = list(self.encoder_channels)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimilarityConfig:
        return dataclass_from_dict(cls, data)


# --------------------------------------------------------------------------------------------------
# The input volume
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PreparedVolume:
    """The network's input volume: ``volume`` ``(1, I, J, K)`` float32 (μ / ``scale``, about [0, 1]), its
    ``affine`` (voxel → world mm), the pooling ``factors`` and ``scale`` (1/mm) used."""

    volume: torch.Tensor
    affine: torch.Tensor
    factors: tuple[int, int, int]
    scale: float

    def to(self, device: torch.device | str) -> PreparedVolume:
        return PreparedVolume(self.volume.to(device), self.affine.to(device), self.factors, self.scale)


def prepare_volume(ct: Volume, volume_size: int, *, scale: float | None = None) -> PreparedVolume:
    """μ of ``ct`` (default attenuation model) pooled by powers of two to at most ``volume_size`` voxels per
    axis, divided by ``scale`` (default: its maximum; pass the training value to reproduce a trained model's
    input exactly)."""
    if not isinstance(ct, Volume):
        raise InputError(f"prepare_volume: 'ct' must be a Volume; got {type(ct).__name__}")
    mu = AttenuationModel()(ct.data).to(torch.float32)
    factors = []
    for n in ct.shape:
        f = 1
        while math.ceil(n / f) > volume_size:
            f *= 2
        factors.append(f)
    vol, affine = downsample_volume(mu.unsqueeze(0), ct.affine.to(torch.float32), tuple(factors))  # type: ignore[arg-type]
    if min(vol.shape[1:]) < 2:
        raise InputError(
            f"prepare_volume: volume_size {volume_size} leaves an axis with fewer than 2 voxels ({tuple(vol.shape[1:])})"
        )
    if scale is None:
        scale = float(vol.max())
    if not (math.isfinite(scale) and scale > 0):
        raise InputError(f"prepare_volume: the CT has no attenuating voxels (scale {scale!r})")
    return PreparedVolume((vol / scale).contiguous(), affine, tuple(factors), float(scale))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(8, channels), channels)


class _Bottleneck(nn.Module):
    """1×1 → 3×3 → 1×1 convolutions with normalisation, plus the identity (a ResNet bottleneck, no expansion)."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False),
            _norm2d(norm, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            _norm2d(norm, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
            _norm2d(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def _encoder(in_channels: int, config: SimilarityConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = in_channels
    for c in config.encoder_channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), _Bottleneck(c, config.norm), nn.MaxPool2d(2)]
        c_in = c
    layers += [nn.Conv2d(c_in, config.encoding_channels, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def _standardize_channels(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit standard deviation per image and channel (twice differentiable)."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(-2, -1), keepdim=True)
    return (x - mean) / (var + eps * eps).sqrt()


class LearnedSimilarity(nn.Module):
    """ProST's similarity network (module docstring)."""

    def __init__(self, config: SimilarityConfig | None = None) -> None:
        super().__init__()
        config = SimilarityConfig() if config is None else config
        if not isinstance(config, SimilarityConfig):
            raise InputError(
                f"LearnedSimilarity: 'config' must be a SimilarityConfig; got {type(config).__name__}"
            )
        self.config = config
        layers: list[nn.Module] = []
        c_in = 1
        for c in config.conv3d_channels:
            layers += [nn.Conv3d(c_in, c, 3, padding=1), nn.ReLU()]
            c_in = c
        last = nn.Conv3d(c_in, config.volume_channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.residual3d = nn.Sequential(*layers, last)
        self.encode_moving = _encoder(config.volume_channels, config)
        self.encode_fixed = _encoder(1, config)
        self._grids: dict[tuple[Any, ...], ProjectiveGrid] = {}

    def feature_volume(self, volume: torch.Tensor) -> torch.Tensor:
        """``(1, I, J, K)`` input volume → ``(C, I, J, K)`` features ``x + f(x)``."""
        if volume.ndim != 4 or volume.shape[0] != 1:
            raise InputError(f"LearnedSimilarity: expected a (1, I, J, K) volume; got {tuple(volume.shape)}")
        x = volume.unsqueeze(0)
        return (x.expand(-1, self.config.volume_channels, -1, -1, -1) + self.residual3d(x))[0]

    def project(self, features: torch.Tensor, affine: torch.Tensor, camera: Camera) -> torch.Tensor:
        """Moving projections ``(B, C, rows, cols)`` of the feature volume (differentiable w.r.t. the pose,
        twice)."""
        intr = camera.intrinsics
        key = (intr, self.config.n_samples, features.dtype, features.device)
        if key not in self._grids:
            self._grids[key] = ProjectiveGrid(
                intr, self.config.n_samples, dtype=features.dtype, device=features.device
            )
        return projective_transform(
            features,
            affine,
            camera,
            n_samples=self.config.n_samples,
            limits=self.config.limits,
            grid=self._grids[key],
        )

    def encodings_distance(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """``S`` ``(B,)`` of moving projections ``(B, C, H, W)`` and fixed images ``(B, H, W)`` / ``(B, 1, H, W)``
        of the same size."""
        if fixed.ndim == 3:
            fixed = fixed.unsqueeze(1)
        em = self.encode_moving(_standardize_channels(moving))
        ef = self.encode_fixed(_standardize_channels(fixed.to(moving.dtype)))
        if self.config.distance == "mse":
            return ((em - ef) ** 2).flatten(1).mean(1)
        a, b = em.flatten(1), ef.flatten(1)
        cos = (a * b).sum(1) / ((a * a).sum(1) * (b * b).sum(1) + 1e-12).sqrt()
        return 1 - cos

    def forward(
        self, features: torch.Tensor, affine: torch.Tensor, camera: Camera, fixed: torch.Tensor
    ) -> torch.Tensor:
        """Similarity ``(B,)`` of the fixed images and the feature volume seen by ``camera`` (lower = closer)."""
        return self.encodings_distance(self.project(features, affine, camera), fixed)

    # ----------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
        """Write the weights and the configuration (``.safetensors``; ``extra`` JSON metadata is kept)."""
        import safetensors.torch

        state = {k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()}
        meta = {
            "format": _FORMAT,
            "version": str(_FORMAT_VERSION),
            "config": json.dumps(self.config.to_dict()),
        }
        if extra is not None:
            meta["extra"] = json.dumps(dict(extra))
        safetensors.torch.save_file(state, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[LearnedSimilarity, dict[str, Any]]:
        """Rebuild a network written by :meth:`save` (CPU, eval mode) and its ``extra`` metadata."""
        import safetensors
        import safetensors.torch

        p = Path(path)
        if not p.is_file():
            raise FileFormatError(f"similarity weights not found: '{p}' (xraypose never downloads weights)")
        try:
            state = safetensors.torch.load_file(str(p), device="cpu")
            with safetensors.safe_open(str(p), framework="pt") as f:
                raw = f.metadata() or {}
            if raw.get("format") != _FORMAT:
                raise ValueError(f"not a learned-similarity file (format {raw.get('format')!r})")
            config = SimilarityConfig.from_dict(json.loads(raw["config"]))
            extra = json.loads(raw["extra"]) if "extra" in raw else {}
        except (InputError, ValueError, KeyError, OSError) as err:
            raise FileFormatError(f"cannot read learned similarity '{p}': {err}") from None
        except Exception as err:  # safetensors' own errors
            raise FileFormatError(f"cannot read learned similarity '{p}': {err}") from None
        model = cls(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise FileFormatError(f"'{p}': weights do not match the stored configuration ({err})") from None
        model.eval()
        return model, extra


# --------------------------------------------------------------------------------------------------
# Geometry of the direction loss
# --------------------------------------------------------------------------------------------------


def pivot_frames(pose: torch.Tensor, pivot_world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, P⁻¹)``, ``(B, 4, 4)``: the translation to the pivot (world mm) in each camera's frame, as in the
    registration engine's pose model ``T(ξ) = T · P · exp(ξ) · P⁻¹``."""
    B = pose.shape[0]
    pw = pivot_world.to(pose).reshape(1, 1, 3).expand(B, 1, 3)
    P = torch.eye(4, dtype=pose.dtype, device=pose.device).repeat(B, 1, 1)
    P[:, :3, 3] = transform_points(invert(pose), pw)[:, 0]
    return P, invert(P)


def geodesic_direction(start: torch.Tensor, truth: torch.Tensor, pivot_world: torch.Tensor) -> torch.Tensor:
    """``ξ* = log(P_s⁻¹ · T_s⁻¹ · T_gt · P_s)`` ``(B, 6)`` (mm, rad): the twist in the start pose's pivot chart
    whose exponential reaches the truth, ``T_s · P_s · exp(ξ*) · P_s⁻¹ = T_gt`` (float64)."""
    start, truth = start.double(), truth.double()
    P, Pinv = pivot_frames(start, pivot_world.double())
    return se3_log(compose(Pinv, invert(start), truth, P))


def _cos(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return (a * b).sum(-1) / ((a * a).sum(-1) * (b * b).sum(-1) + eps).sqrt()


def direction_loss(
    model: LearnedSimilarity,
    features: torch.Tensor,
    affine: torch.Tensor,
    camera_intrinsics: Intrinsics,
    fixed: torch.Tensor,
    start: torch.Tensor,
    truth: torch.Tensor,
    pivot_world: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """ProST's double-backward loss of a batch (module docstring).

    Args:
        model: the network.
        features: ``(C, I, J, K)`` its feature volume (:meth:`LearnedSimilarity.feature_volume`).
        affine: ``(4, 4)`` of the features.
        camera_intrinsics: the (training-size) detector.
        fixed: ``(B, 1, S, S)`` fixed images (DRRs / X-rays at the true poses).
        start, truth: ``(B, 4, 4)`` camera-to-world poses.
        pivot_world: ``(3,)`` rotation centre of the pose chart (world mm).
    Returns:
        ``{"loss": mean L (differentiable w.r.t. the network), "cos_rotation", "cos_translation": mean cosines,
        "similarity": mean S at the start}`` (detached but ``loss``).
    """
    dtype = features.dtype
    target = geodesic_direction(start, truth, pivot_world).to(dtype)
    start = start.to(dtype)
    P, Pinv = pivot_frames(start, pivot_world.to(dtype))
    xi = torch.zeros(start.shape[0], 6, dtype=dtype, device=start.device, requires_grad=True)
    pose = compose(start, P, se3_exp(xi), Pinv)
    with double_differentiable():  # every render on the twice-differentiable path
        sim = model(features, affine, Camera(camera_intrinsics, pose), fixed)
        (grad,) = torch.autograd.grad(sim.sum(), xi, create_graph=True)
    descent = -grad
    cos_t = _cos(descent[:, :3], target[:, :3])
    cos_r = _cos(descent[:, 3:], target[:, 3:])
    loss = (2 - cos_r - cos_t).mean()
    return {
        "loss": loss,
        "cos_rotation": cos_r.detach().mean(),
        "cos_translation": cos_t.detach().mean(),
        "similarity": sim.detach().mean(),
    }
