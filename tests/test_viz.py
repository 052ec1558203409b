"""Captioned panels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xraypose.errors import InputError
from xraypose.viz import panel_image, save_panels


def test_panels_window_each_image_and_caption(tmp_path):
    a = torch.linspace(0, 1, 400).reshape(20, 20)
    b = 1000.0 * a  # another scale: each panel is windowed on its own
    canvas = panel_image([a, b], ["a", "b"], gap=2)
    assert canvas.shape == (20 + 18, 42) and canvas.dtype == np.uint8
    np.testing.assert_array_equal(canvas[18:, :20], canvas[18:, 22:])
    assert canvas[:18].max() > 200  # caption text drawn (anti-aliased)
    path = save_panels(tmp_path / "p.png", [a, b], ["a", "b"], gap=2)
    with Image.open(path) as im:
        assert im.size == (42, 38)
    with pytest.raises(InputError, match="titles"):
        panel_image([a], ["x", "y"])
    with pytest.raises(InputError, match="2D"):
        panel_image([torch.zeros(2, 3, 4)])
    with pytest.raises(InputError, match=r"\.png"):
        save_panels(tmp_path / "p.jpg", [a])
