"""Test-session set-up shared by all test modules."""

import os

import pytest
import torch

# Triton kernels (the CUDA fast path) are validated on machines without a GPU through Triton's interpreter,
# which must be selected before Triton is first imported (torch._inductor, roma… import it early).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def registration_scene():
    """Build (once per detector size) a registration problem on the default CT: two known C-arm poses, their
    monochromatic DRRs as targets, initial poses 5°/10 mm away and landmarks on a 80 mm cube around the
    centre. Returns ``make(size) -> (renderer, intrinsics, truth, target, init, landmarks)``."""
    from xraypose.geometry import Camera, Intrinsics, carm_pose
    from xraypose.geometry.sampling import perturb_poses
    from xraypose.io import load_default_ct
    from xraypose.registration import VolumeRenderer

    scenes: dict[int, tuple] = {}

    def make(size: int) -> tuple:
        if size not in scenes:
            vol = load_default_ct(with_labels=False)
            renderer = VolumeRenderer(vol)
            centre = vol.center_world.float()
            pixel = 307.2 / size  # the same physical detector at every size
            intr = Intrinsics(sdd=1020.0, rows=size, cols=size, dy=pixel, dx=pixel)
            truth = carm_pose(
                torch.tensor([10.0, -20.0]),
                torch.tensor([5.0, 10.0]),
                0.0,
                source_to_isocenter=620.0,
                isocenter=centre,
            )
            with torch.no_grad():
                target = renderer(Camera(intr, truth))
            init = perturb_poses(
                truth.double(), 5.0, 10.0, centre.double(), generator=torch.Generator().manual_seed(0)
            ).float()
            offsets = torch.tensor(
                [[x, y, z] for x in (-40, 40) for y in (-40, 40) for z in (-40, 40)], dtype=torch.float32
            )
            scenes[size] = (renderer, intr, truth, target, init, centre + offsets)
        return scenes[size]

    return make
