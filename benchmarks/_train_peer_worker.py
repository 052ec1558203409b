"""A DiffPose-style training loop on a peer renderer (DiffDRR 0.6.1 or nanodrr 0.1.7), in its own process.

Runs under the peers' Python (``bash ../shared/tools/setup-peers.sh`` prints it) and imports nothing from
xraypose: ``benchmarks/train_throughput.py`` converts the detector and the camera frame with
``xraypose.geometry.diffdrr`` and passes plain numbers here as JSON. Usage::

    PEER_PYTHON benchmarks/_train_peer_worker.py SPEC.json

``SPEC.json`` holds ``renderer`` ("diffdrr" | "nanodrr"), ``method`` ("siddon" | "trilinear"; nanodrr:
trilinear only), ``ct`` (path), ``device``, ``threads``, ``warmup``, ``steps``, ``batch_size``, ``image_size``,
``n_samples`` (trilinear points per ray), ``seed``, ``lr``, ``source_to_centre_mm``, ``rotation_sigma``
(rad, 3), ``translation_sigma`` (mm, 3), ``diffdrr_detector`` (``DRR`` keyword arguments),
``nanodrr_intrinsics`` (``sdd, delx, dely, x0, y0, height, width``), ``camera_frame_change`` (the 4 × 4 matrix
``C`` taking DiffDRR's re-oriented camera frame to nanodrr's, :func:`xraypose.geometry.diffdrr.
diffdrr_camera_frame_change` for ``"AP"``) and ``out_json``. The result JSON has ``ms_per_step`` (mean of the
timed steps), ``median_ms``, ``times_ms``, ``images_per_s``, ``n_params``, ``backbone_impl``, versions,
``peak_rss_mb`` (the process's ``ru_maxrss``) and ``ray_hit_fraction`` (fraction of pixels > 0 in the last batch of
raw DRRs: a check that the views see the CT).

One step (what ``train_throughput.py``'s docstring calls the peer loop):

1. **poses**: DiffPose's ``get_random_offset`` structure on DiffDRR's ``RigidTransform``: an offset
   ``se3_exp([v, ω])`` with ``ω ~ N(0, rotation_sigma)`` rad and ``v ~ N(0, translation_sigma)`` mm per axis,
   composed onto the AP isocentre pose (``euler_angles``/``ZXY`` rotation 0, source ``source_to_centre_mm``
   anterior of DiffDRR's world origin, the CT grid centre): ``pose = isocenter.compose(offset)``, i.e. the
   offset acts in the world frame (a rotation about the CT centre);
2. **render** ``batch_size`` DRRs at ``image_size²`` under ``torch.no_grad`` (DiffDRR ``DRR(subject,
   renderer=method, **diffdrr_detector)(pose)``, trilinear with ``n_points=n_samples``; nanodrr
   ``DRR.from_carm_intrinsics(...)(subject, pose.matrix @ C, n_samples=n_samples)``);
3. **normalise** as DiffPose's ``Transforms``: min–max over the batch, then ``(x − 0.3080) / 0.1494`` (its
   ``Resize`` is the identity at the rendering size and left out);
4. **network**: timm ``resnet18`` (``pretrained=False, num_classes=0, global_pool="", in_chans=1``; torchvision's
   ResNet-18 with a 1-channel stem if timm is missing), global average pooling, ``Linear(512, 256) → ReLU →
   Linear(256, 9)``: the layers of xraypose's default ``PoseRegressor``;
5. **loss**: geodesic angle between the 6D rotation (Gram–Schmidt) and the pose's rotation + the Euclidean error
   of the translation normalised by the sampling sigmas; backward; ``Adam`` step; ``loss.item()``.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
import traceback
from typing import Any

import torch
from torch import nn

from _peer_worker import set_threads  # the same thread setting as render.py's workers


def _rotation_6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """Zhou et al.'s Gram–Schmidt map (rows b1, b2, b3), as pytorch3d and DiffDRR."""
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = nn.functional.normalize(a1, dim=-1)
    b2 = nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    return torch.stack((b1, b2, torch.cross(b1, b2, dim=-1)), dim=-2)


class PoseNet(nn.Module):
    """ResNet-18 feature map → global average pool → MLP head with 9 outputs (xraypose's default layers)."""

    def __init__(self) -> None:
        super().__init__()
        try:
            import timm

            self.backbone = timm.create_model(
                "resnet18", pretrained=False, num_classes=0, global_pool="", in_chans=1
            )
            self.impl = f"timm {timm.__version__} resnet18"
        except ImportError:
            import torchvision

            net = torchvision.models.resnet18(weights=None)
            net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.backbone = nn.Sequential(*list(net.children())[:-2])
            self.impl = f"torchvision {torchvision.__version__} resnet18"
        self.head = nn.Sequential(nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Linear(256, 9))
        with torch.no_grad():
            self.head[-1].weight.mul_(1e-2)
            self.head[-1].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).mean(dim=(-2, -1)))


def _renderer(spec: dict[str, Any], device: torch.device) -> Any:
    """``render(pose: RigidTransform) -> (B, 1, H, W)`` for the spec's peer and method."""
    from diffdrr.data import read

    subject = read(spec["ct"], orientation="AP", bone_attenuation_multiplier=1.0)
    n = int(spec["n_samples"])
    if spec["renderer"] == "diffdrr":
        from diffdrr.drr import DRR

        drr = DRR(subject, renderer=spec["method"], **spec["diffdrr_detector"]).to(device)
        kwargs = {"n_points": n} if spec["method"] == "trilinear" else {}
        return lambda pose: drr(pose, **kwargs)
    if spec["renderer"] == "nanodrr":
        if spec["method"] != "trilinear":
            raise ValueError("nanodrr has no Siddon renderer")
        from nanodrr.data import Subject
        from nanodrr.drr import DRR as NanoDRR
        from torchio import ScalarImage

        # Same density and centred affine as DiffDRR's subject; no HU -> mu conversion.
        image = ScalarImage(tensor=subject.density.data, affine=subject.density.affine)
        nsub = Subject.from_images(image, convert_to_mu=False).to(device)
        k = spec["nanodrr_intrinsics"]
        nano = NanoDRR.from_carm_intrinsics(
            k["sdd"], k["delx"], k["dely"], k["x0"], k["y0"], k["height"], k["width"],
            dtype=torch.float32, device=device,
        )  # fmt: skip
        frame = torch.tensor(spec["camera_frame_change"], dtype=torch.float32, device=device)
        return lambda pose: nano(nsub, pose.matrix @ frame, n_samples=n, backend="auto")
    raise ValueError(f"unknown peer renderer {spec['renderer']!r}")


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from diffdrr.pose import convert

    threads = set_threads(spec.get("threads"))
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    render = _renderer(spec, device)
    b = int(spec["batch_size"])
    gen = torch.Generator().manual_seed(int(spec["seed"]))
    rot_sigma = torch.tensor(spec["rotation_sigma"], dtype=torch.float32)
    trans_sigma = torch.tensor(spec["translation_sigma"], dtype=torch.float32)
    d = float(spec["source_to_centre_mm"])
    iso = convert(
        torch.zeros(1, 3, device=device),
        torch.tensor([[0.0, d, 0.0]], device=device),
        parameterization="euler_angles",
        convention="ZXY",
    )
    iso = type(iso)(iso.matrix.expand(b, 4, 4).contiguous())
    t_mean = iso.matrix[:, :3, 3]
    t_scale = trans_sigma.to(device)

    torch.manual_seed(int(spec["seed"]))
    model = PoseNet().to(device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=float(spec["lr"]))
    last: dict[str, torch.Tensor] = {}

    def step() -> float:
        # 1. poses (DiffPose's get_random_offset, then isocenter_pose.compose(offset))
        rot = (torch.randn(b, 3, generator=gen) * rot_sigma).to(device)
        xyz = (torch.randn(b, 3, generator=gen) * trans_sigma).to(device)
        pose = iso.compose(convert(rot, xyz, parameterization="se3_log_map"))
        # 2. render
        with torch.no_grad():
            drr = render(pose).float()
        last["drr"] = drr
        # 3. normalise (DiffPose's Transforms)
        x = (drr - drr.min()) / (drr.max() - drr.min() + 1e-6)
        x = (x - 0.3080) / 0.1494
        # 4. network and 5. loss, backward, Adam
        out = model(x)
        r_pred = _rotation_6d_to_matrix(out[:, :6])
        r_true = pose.matrix[:, :3, :3]
        cos = ((r_pred.transpose(-1, -2) @ r_true).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
        geodesic = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
        t_true = (pose.matrix[:, :3, 3] - t_mean) / t_scale
        loss = geodesic.mean() + (out[:, 6:] - t_true).norm(dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.item())

    for _ in range(int(spec["warmup"])):
        step()
    times = []
    losses = []
    for _ in range(int(spec["steps"])):
        t0 = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    ms = sum(times) / len(times)
    import diffdrr

    versions = {"torch": torch.__version__, "diffdrr": diffdrr.__version__}
    if spec["renderer"] == "nanodrr":
        import importlib.metadata as md

        versions["nanodrr"] = md.version("nanodrr")
    return {
        "ok": True,
        "threads": threads,
        "ms_per_step": ms,
        "median_ms": statistics.median(times),
        "times_ms": times,
        "images_per_s": 1e3 * b / ms,
        "losses": losses,
        "n_params": sum(p.numel() for p in model.parameters()),
        "backbone_impl": model.impl,
        "versions": versions,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ray_hit_fraction": float((last["drr"] > 0).float().mean()),
    }


def main(spec_path: str) -> int:
    with open(spec_path) as fh:
        spec = json.load(fh)
    try:
        result = run(spec)
    except Exception as exc:  # reported to the parent, which prints it
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    with open(spec["out_json"], "w") as fh:
        json.dump(result, fh)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} SPEC.json")
    sys.exit(main(sys.argv[1]))
