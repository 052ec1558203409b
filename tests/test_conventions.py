"""Each convention written in docs/conventions.md, checked once."""

from __future__ import annotations

import torch

from xraypose.geometry import Camera, Intrinsics, ap_view, carm_pose
from xraypose.geometry.se3 import se3_exp
from xraypose.io import default_ct_structures, hu_to_mu, load_default_ct
from xraypose.render import render


def _ids(names: list[str]) -> list[int]:
    table = default_ct_structures()
    return [i for i, n in table.items() if n in names]


def test_ap_view_camera_axes_in_world():
    cam = ap_view((0.0, 0.0, 0.0), dtype=torch.float64)
    rot = cam.pose[0, :3, :3]
    expected = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(rot, expected)
    # source anterior (+y) of the isocentre, at sdd/2
    assert torch.allclose(cam.source_world()[0], torch.tensor([0.0, 510.0, 0.0], dtype=torch.float64))


def test_carm_angles_move_the_source_as_documented():
    iso = (10.0, -20.0, 30.0)
    ap = carm_pose(source_to_isocenter=500.0, isocenter=iso, dtype=torch.float64)[0, :3, 3]
    lao = carm_pose(30.0, source_to_isocenter=500.0, isocenter=iso, dtype=torch.float64)[0, :3, 3]
    cran = carm_pose(0.0, 20.0, source_to_isocenter=500.0, isocenter=iso, dtype=torch.float64)[0, :3, 3]
    assert float(lao[0] - ap[0]) < -200  # towards the patient's left = −x in RAS
    assert float(cran[2] - ap[2]) > 100  # towards the head = +z
    for src in (ap, lao, cran):  # isocentre stays source_to_isocenter ahead on the principal ray
        assert abs(float((src - torch.tensor(iso, dtype=torch.float64)).norm()) - 500.0) < 1e-9
    inplane = carm_pose(0.0, 0.0, 90.0, source_to_isocenter=500.0, dtype=torch.float64)[0, :3, :3]
    base = carm_pose(source_to_isocenter=500.0, dtype=torch.float64)[0, :3, :3]
    assert torch.allclose(inplane[:, 0], base[:, 1], atol=1e-12)  # x turns towards y


def test_pixel_positions_projection_and_projection_matrix():
    intr = Intrinsics(sdd=1000.0, rows=5, cols=7, dy=0.5, dx=0.25, x0=1.0, y0=-0.5)
    assert intr.cx == 3.0 + 4.0 and intr.cy == 2.0 - 1.0
    pts = intr.pixel_points(torch.tensor([0, 7 * 4 + 6]), dtype=torch.float64)
    assert torch.allclose(
        pts[0], torch.tensor([(0 - 7.0) * 0.25, (0 - 1.0) * 0.5, 1000.0], dtype=torch.float64)
    )
    assert torch.allclose(
        pts[1], torch.tensor([(6 - 7.0) * 0.25, (4 - 1.0) * 0.5, 1000.0], dtype=torch.float64)
    )
    pose = carm_pose(
        20.0, -10.0, 5.0, source_to_isocenter=400.0, isocenter=(3.0, 4.0, 5.0), dtype=torch.float64
    )
    cam = Camera(intr, pose)
    # a detector pixel centre projects back onto itself
    uv = cam.project(cam.detector_world(torch.tensor([7 * 4 + 6])))
    assert torch.allclose(uv[0, 0], torch.tensor([6.0, 4.0], dtype=torch.float64), atol=1e-9)
    world = torch.tensor([[10.0, -20.0, 30.0], [-50.0, 5.0, 0.0]], dtype=torch.float64)
    P = cam.projection_matrix()[0]
    h = torch.cat([world, torch.ones(2, 1, dtype=torch.float64)], 1) @ P.T
    assert torch.allclose(h[:, :2] / h[:, 2:], cam.project(world)[0], atol=1e-9)


def test_ap_view_shows_the_patient_right_on_the_image_left_and_head_up():
    cam = ap_view((0.0, 0.0, 0.0), dtype=torch.float64)
    k = cam.intrinsics
    uv = cam.project(torch.tensor([[50.0, 0.0, 0.0], [0.0, 0.0, 50.0]], dtype=torch.float64))[0]
    assert float(uv[0, 0]) < k.cx  # patient's right (+x) → image left
    assert float(uv[1, 1]) < k.cy  # superior (+z) → image top


def test_twist_is_translation_first():
    T = se3_exp(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(T[:3, 3], torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert torch.allclose(T[:3, :3], torch.eye(3, dtype=torch.float64))


def test_default_ct_ap_drr_has_heart_on_image_right_and_liver_low_left():
    """End to end: the RAS reader, the AP view and the renderer agree with anatomy."""
    ct = load_default_ct()
    assert ct.labels is not None
    cam = ap_view(tuple(ct.center_world.tolist()), rows=64)
    mu = hu_to_mu(ct.data)
    centroids = {}
    for organ in ("heart", "liver"):
        mask = torch.isin(ct.labels.long(), torch.tensor(_ids([organ])))
        img = render(mu * mask, ct.affine, cam)[0]
        rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        w = img / img.sum()
        centroids[organ] = (float((w * rows).sum()), float((w * cols).sum()))
    heart_row, heart_col = centroids["heart"]
    liver_row, liver_col = centroids["liver"]
    assert heart_col > cam.intrinsics.cx  # patient's left → image right
    assert liver_col < cam.intrinsics.cx  # patient's right → image left
    assert liver_row > heart_row  # liver below the heart
