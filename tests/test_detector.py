"""The realistic detector simulator: every stage against its physical definition, seeding, validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from xraypose.errors import InputError
from xraypose.physics.detector import (
    FWHM_PER_SIGMA,
    CircularCollimator,
    DetectorModel,
    RectangularCollimator,
    collimator_mask,
    quantize,
    simulate_detector,
)

# Every stage off: the "intensity" output is then the primary image itself.
QUIET = DetectorModel(
    photons_per_pixel=None,
    psf_fwhm_mm=0.0,
    scatter_to_primary=0.0,
    heel_effect=0.0,
    collimator=None,
    output="intensity",
    bit_depth=None,
)


def quiet(**changes) -> DetectorModel:
    return dataclasses.replace(QUIET, **changes)


def phantom(h: int = 96, w: int = 112, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """A structured transmission image in [0.05, 1]: a body ellipse, a dense insert, fine texture."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(-1, 1, h, dtype=dtype)[:, None]
    x = torch.linspace(-1, 1, w, dtype=dtype)[None, :]
    mu = 1.5 * ((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1).to(dtype)
    mu = mu + 1.0 * (((x - 0.2) / 0.15) ** 2 + (y / 0.3) ** 2 < 1).to(dtype)
    mu = mu + 0.1 * torch.rand(h, w, generator=g, dtype=dtype)
    return torch.exp(-mu).clamp(0.05, 1.0)


def pixel_coords(h: int, w: int, dy: float, dx: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Detector coordinates (y along rows, x along cols) of pixel centres, mm from the detector centre."""
    y = (torch.arange(h, dtype=torch.float64) - (h - 1) / 2) * dy
    x = (torch.arange(w, dtype=torch.float64) - (w - 1) / 2) * dx
    return torch.meshgrid(y, x, indexing="ij")


def high_frequency_energy(img: torch.Tensor, cutoff: float = 0.1) -> float:
    """Spectral energy above ``cutoff`` cycles/pixel (radial) of a 2D image."""
    spec = torch.fft.fft2(img - img.mean()).abs() ** 2
    fy = torch.fft.fftfreq(img.shape[-2], dtype=img.dtype)[:, None]
    fx = torch.fft.fftfreq(img.shape[-1], dtype=img.dtype)[None, :]
    return float(spec[(fy**2 + fx**2).sqrt() > cutoff].sum())


# ------------------------------------------------------------------------------------------------ noise


@pytest.mark.parametrize("noise", ["poisson", "gaussian"])
def test_noise_mean_and_variance_match_photon_count(noise):
    n0, level = 1e4, 0.3
    primary = torch.full((256, 256), level, dtype=torch.float64)
    out = simulate_detector(primary, 0.2, quiet(photons_per_pixel=n0, noise=noise), seed=7)
    counts = out * n0
    expected = n0 * level
    n = counts.numel()
    assert abs(float(counts.mean()) - expected) < 5 * math.sqrt(expected / n)
    # Var of the sample variance ≈ 2σ⁴/n: relative standard error sqrt(2/n) ≈ 0.55 %.
    assert float(counts.var()) / expected == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))
    if noise == "poisson":
        assert torch.allclose(counts, counts.round(), atol=1e-6)  # whole quanta
    else:
        assert not torch.allclose(counts, counts.round(), atol=1e-3)


def test_noise_scales_with_photon_count():
    primary = torch.full((128, 128), 0.5, dtype=torch.float64)
    rel_var = []
    for n0 in (1e2, 1e4):
        out = simulate_detector(primary, 0.2, quiet(photons_per_pixel=n0), seed=1)
        rel_var.append(float(out.var()))  # variance of I/I0 = level / n0
    assert rel_var[0] / rel_var[1] == pytest.approx(100.0, rel=0.05)
    assert rel_var[1] == pytest.approx(0.5 / 1e4, rel=0.05)


def test_same_seed_identical_different_seed_different():
    primary = phantom(dtype=torch.float32)
    a = simulate_detector(primary, 0.3, seed=3)
    b = simulate_detector(primary, 0.3, seed=3)
    c = simulate_detector(primary, 0.3, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float((a - c).abs().mean()) > 1e-3
    # A generator seeded the same way draws the same noise; it is advanced by the call.
    g = torch.Generator().manual_seed(3)
    assert torch.equal(simulate_detector(primary, 0.3, generator=g), a)
    assert not torch.equal(simulate_detector(primary, 0.3, generator=g), a)


def test_default_generator_used_without_seed():
    primary = phantom()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        a = simulate_detector(primary, 0.3)
        torch.manual_seed(11)
        b = simulate_detector(primary, 0.3)
        c = simulate_detector(primary, 0.3)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_no_noise_when_disabled():
    primary = phantom()
    out = simulate_detector(primary, 0.3, QUIET, seed=1)
    assert torch.equal(out, primary)
    model = dataclasses.replace(DetectorModel(), photons_per_pixel=None)
    assert torch.equal(
        simulate_detector(primary, 0.3, model, seed=1), simulate_detector(primary, 0.3, model, seed=2)
    )


# ------------------------------------------------------------------------------------------------- blur


def _half_max_width(profile: torch.Tensor, spacing: float) -> float:
    """FWHM (mm) of a single-peaked profile by linear interpolation of the half-maximum crossings."""
    p = profile.double()
    peak = int(p.argmax())
    half = float(p[peak]) / 2

    def crossing(indices):
        prev = peak
        for i in indices:
            if float(p[i]) < half:
                f = (float(p[prev]) - half) / (float(p[prev]) - float(p[i]))
                return prev + f * (i - prev)
            prev = i
        raise AssertionError("profile never falls below half maximum")

    right = crossing(range(peak + 1, p.numel()))
    left = crossing(range(peak - 1, -1, -1))
    return (right - left) * spacing


def test_blur_of_a_delta_has_the_requested_fwhm_and_preserves_signal():
    dy, dx, fwhm = 0.2, 0.25, 2.0  # sigma = 4.2 and 3.4 pixels
    h, w = 121, 101
    delta = torch.zeros(h, w, dtype=torch.float64)
    delta[h // 2, w // 2] = 1.0
    out = simulate_detector(delta, (dy, dx), quiet(psf_fwhm_mm=fwhm))
    assert float(out.sum()) == pytest.approx(1.0, rel=1e-12)
    assert int(out.argmax()) == (h // 2) * w + w // 2
    # Second moments of the marginals, in mm.
    y, x = pixel_coords(h, w, dy, dx)
    var_y = float((out * y**2).sum() / out.sum())
    var_x = float((out * x**2).sum() / out.sum())
    assert FWHM_PER_SIGMA * math.sqrt(var_y) == pytest.approx(fwhm, rel=2e-3)
    assert FWHM_PER_SIGMA * math.sqrt(var_x) == pytest.approx(fwhm, rel=2e-3)
    # Half-maximum widths of the central profiles.
    assert _half_max_width(out[:, w // 2], dy) == pytest.approx(fwhm, rel=0.02)
    assert _half_max_width(out[h // 2, :], dx) == pytest.approx(fwhm, rel=0.02)


def test_blur_zero_fwhm_is_identity_and_blur_preserves_flat_images():
    primary = phantom()
    assert torch.equal(simulate_detector(primary, 0.3, quiet(psf_fwhm_mm=0.0)), primary)
    flat = torch.full((40, 50), 0.7, dtype=torch.float64)  # reflect padding: no darkening at the borders
    assert torch.allclose(simulate_detector(flat, 0.3, quiet(psf_fwhm_mm=3.0)), flat, atol=1e-12)


def test_blur_acts_on_the_noise():
    """The scintillator blur comes after the quanta noise: the variance falls by Σk² ≈ 1/(4π σy σx)."""
    n0, level, spacing, fwhm = 1e4, 0.5, 0.1, 0.5
    primary = torch.full((192, 192), level, dtype=torch.float64)
    out = simulate_detector(primary, spacing, quiet(photons_per_pixel=n0, psf_fwhm_mm=fwhm), seed=5)
    sigma_px = fwhm / FWHM_PER_SIGMA / spacing
    expected_var = level / n0 / (4 * math.pi * sigma_px**2)
    assert float(out.var()) == pytest.approx(expected_var, rel=0.08)
    assert float(out.mean()) == pytest.approx(level, rel=1e-3)


# ---------------------------------------------------------------------------------------------- scatter


@pytest.mark.parametrize("spr", [0.1, 0.5])
def test_scatter_mean_is_spr_times_mean_primary(spr):
    primary = torch.stack([phantom(seed=0), phantom(seed=1).flip(-1) * 0.5])
    out = simulate_detector(primary, 0.5, quiet(scatter_to_primary=spr, scatter_sigma_mm=40.0))
    scatter = out - primary
    for b in range(2):  # per image of the batch
        assert float(scatter[b].mean()) == pytest.approx(spr * float(primary[b].mean()), rel=1e-6)
    assert float(scatter.min()) > 0


def test_scatter_is_smooth_and_follows_the_primary():
    primary = phantom(128, 160)
    out = simulate_detector(primary, 0.5, quiet(scatter_to_primary=0.3, scatter_sigma_mm=20.0))
    scatter = out - primary
    assert high_frequency_energy(scatter) < 1e-4 * high_frequency_energy(primary)
    # Low-frequency: more scatter at the bright image border than behind the body.
    assert float(scatter[:, :8].mean()) > float(scatter[56:72, 72:88].mean())
    # A broader kernel gives a flatter scatter field.
    broad = simulate_detector(primary, 0.5, quiet(scatter_to_primary=0.3, scatter_sigma_mm=200.0)) - primary
    assert float(broad.std()) < 0.5 * float(scatter.std())


# ------------------------------------------------------------------------------------------------- heel


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_heel_effect_edge_ratio(axis):
    heel = 0.1
    primary = torch.ones(60, 80, dtype=torch.float64)
    out = simulate_detector(primary, 0.3, quiet(heel_effect=heel, heel_axis=axis))
    if axis == "rows":
        first, last, across = out[0], out[-1], out[:, 0]
    else:
        first, last, across = out[:, 0], out[:, -1], out[0]
    assert torch.allclose(first, torch.full_like(first, 1 - heel / 2), atol=1e-12)
    assert torch.allclose(last, torch.full_like(last, 1 + heel / 2), atol=1e-12)
    assert float(last[0] / first[0]) == pytest.approx((1 + heel / 2) / (1 - heel / 2), rel=1e-12)
    assert float(out.mean()) == pytest.approx(1.0, rel=1e-12)  # unchanged at the detector centre, on average
    assert torch.all(across.diff() > 0)
    # The heel also modulates the scatter (it comes from the same beam): scatter is brighter at the last edge.
    with_scatter = simulate_detector(
        primary, 0.3, quiet(heel_effect=heel, heel_axis=axis, scatter_to_primary=0.2)
    )
    scatter = with_scatter - out
    s_first, s_last = (scatter[0], scatter[-1]) if axis == "rows" else (scatter[:, 0], scatter[:, -1])
    assert float(s_last.mean()) > float(s_first.mean())


# ------------------------------------------------------------------------------------------- collimation


def test_circular_collimator_blocks_outside_leaves_inside():
    dy, dx, h, w = 0.5, 0.4, 81, 101
    col = CircularCollimator(radius_mm=12.0, center_mm=(3.0, -2.0))
    primary = phantom(h, w)
    out = simulate_detector(primary, (dy, dx), quiet(collimator=col))
    y, x = pixel_coords(h, w, dy, dx)
    r = ((x - 3.0) ** 2 + (y + 2.0) ** 2).sqrt()
    inside, outside = r <= 12.0, r > 12.0
    assert int(inside.sum()) > 1000 and int(outside.sum()) > 1000
    assert torch.equal(out[inside], primary[inside])
    assert torch.all(out[outside] == 0)
    # Leakage: a fraction of the primary gets through outside.
    leaky = simulate_detector(primary, (dy, dx), quiet(collimator=dataclasses.replace(col, leakage=0.05)))
    assert torch.allclose(leaky[outside], 0.05 * primary[outside], rtol=1e-12)
    assert torch.equal(leaky[inside], primary[inside])


def test_rectangular_collimator_and_soft_edge():
    dy, dx, h, w = 0.25, 0.25, 80, 96
    col = RectangularCollimator(half_width_mm=6.0, half_height_mm=4.0, center_mm=(-1.0, 1.5))
    primary = phantom(h, w)
    y, x = pixel_coords(h, w, dy, dx)
    inside = ((x + 1.0).abs() <= 6.0) & ((y - 1.5).abs() <= 4.0)
    out = simulate_detector(primary, (dy, dx), quiet(collimator=col))
    assert torch.equal(out[inside], primary[inside])
    assert torch.all(out[~inside] == 0)
    # Soft edge 2 mm: untouched 1 mm inside, blocked 1 mm outside, a linear ramp in between.
    soft = dataclasses.replace(col, edge_width_mm=2.0)
    mask = collimator_mask(soft, (h, w), (dy, dx), dtype=torch.float64)
    deep = ((x + 1.0).abs() <= 5.0) & ((y - 1.5).abs() <= 3.0)
    far = ((x + 1.0).abs() >= 7.0) | ((y - 1.5).abs() >= 5.0)
    assert torch.all(mask[deep] == 1) and torch.all(mask[far] == 0)
    ramp = mask[~deep & ~far]
    assert float(ramp.min()) >= 0 and float(ramp.max()) <= 1 and bool(((ramp > 0) & (ramp < 1)).any())
    # Along the central row, the ramp over x ∈ [5, 7] mm from the field centre is linear: 1/2 − d/2mm.
    row = round(1.5 / dy + (h - 1) / 2)
    d = (x[row] + 1.0).abs() - 6.0
    expected = (0.5 - d / 2.0).clamp(0, 1)
    assert torch.allclose(mask[row], expected, atol=1e-12)


def test_collimator_with_noise_and_scatter():
    """Blocked pixels get no quanta; scatter only comes from the irradiated field and spills past its edge."""
    h, w, spacing = 96, 96, 0.5
    primary = phantom(h, w)
    col = CircularCollimator(radius_mm=10.0)
    model = quiet(collimator=col, photons_per_pixel=1e4)
    out = simulate_detector(primary, spacing, model, seed=0)
    y, x = pixel_coords(h, w, spacing, spacing)
    outside = (x**2 + y**2).sqrt() > 10.0
    assert torch.all(out[outside] == 0)
    open_field = simulate_detector(primary, spacing, quiet(scatter_to_primary=0.3)) - primary
    collimated = simulate_detector(primary, spacing, quiet(scatter_to_primary=0.3, collimator=col))
    scatter = collimated - primary * (~outside).to(primary.dtype)
    blocked_primary = primary * (~outside).to(primary.dtype)
    assert float(scatter.mean()) == pytest.approx(0.3 * float(blocked_primary.mean()), rel=1e-6)
    assert float(scatter.mean()) < 0.5 * float(open_field.mean())
    assert float(scatter[outside].max()) > 0


# -------------------------------------------------------------------------------------------------- log


def test_log_is_finite_for_zero_counts():
    primary = torch.zeros(2, 32, 32)
    primary[:, :16] = 1e-6
    for noise in ("poisson", "gaussian"):
        model = DetectorModel(noise=noise, bit_depth=None, scatter_to_primary=0.0)
        out = simulate_detector(primary, 0.3, model, seed=2)
        assert bool(torch.isfinite(out).all())
        assert float(out.max()) == pytest.approx(-math.log(0.5 / 1e4), rel=1e-6)
    out = simulate_detector(torch.zeros(16, 16), 0.3, quiet(output="log"))
    assert torch.allclose(out, torch.full_like(out, -math.log(1e-6)))


def test_log_output_is_minus_log_of_intensity_output():
    primary = phantom()
    model = quiet(
        psf_fwhm_mm=0.8, scatter_to_primary=0.2, heel_effect=0.1, collimator=CircularCollimator(12.0)
    )
    intensity = simulate_detector(primary, 0.3, model)
    log = simulate_detector(primary, 0.3, dataclasses.replace(model, output="log"))
    valid = intensity > model.floor
    assert bool(valid.float().mean() > 0.5)
    assert torch.allclose(log[valid], -torch.log(intensity[valid]), rtol=0, atol=1e-12)
    assert torch.allclose(log[~valid], torch.full_like(log[~valid], -math.log(model.floor)))
    # Noise-free with everything else off, the log output is the line integral of the primary.
    assert torch.allclose(simulate_detector(primary, 0.3, quiet(output="log")), -torch.log(primary))


# --------------------------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("bits", [1, 4, 12])
def test_quantisation_levels_and_error(bits):
    primary = phantom(dtype=torch.float64)
    base = quiet(photons_per_pixel=1e3, scatter_to_primary=0.1, output="log")
    exact = simulate_detector(primary, 0.3, base, seed=9)
    model = dataclasses.replace(base, bit_depth=bits)
    out = simulate_detector(primary, 0.3, model, seed=9)
    low, high = model.output_range
    assert (low, high) == (0.0, pytest.approx(-math.log(0.5 / 1e3)))
    assert out.unique().numel() <= 2**bits
    step = (high - low) / (2**bits - 1)
    levels = (out - low) / step
    assert torch.allclose(levels, levels.round(), atol=1e-9)
    in_range = (exact >= low) & (exact <= high)
    assert float((out[in_range] - exact[in_range]).abs().max()) <= step / 2 * (1 + 1e-9)
    assert torch.all(out[exact < low] == low)  # brighter than the open beam: saturates at 0


def test_quantisation_of_intensity_and_default_model():
    primary = phantom(dtype=torch.float32)
    out = simulate_detector(
        primary, 0.3, quiet(output="intensity", bit_depth=8, photons_per_pixel=1e4), seed=0
    )
    assert out.unique().numel() <= 256
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    default = simulate_detector(primary, 0.3, seed=0)  # log, 12 bits over [0, ln(2e4)]
    assert default.unique().numel() <= 4096
    step = math.log(2e4) / 4095
    assert torch.allclose(default.double() / step, (default.double() / step).round(), atol=1e-3)
    x = torch.tensor([-1.0, 0.1, 0.49, 0.51, 2.0], dtype=torch.float64)
    assert quantize(x, 1, (0.0, 1.0)).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: DetectorModel(photons_per_pixel=-1.0), "photons_per_pixel"),
        (lambda: DetectorModel(photons_per_pixel=float("nan")), "photons_per_pixel"),
        (lambda: DetectorModel(noise="uniform"), "noise"),
        (lambda: DetectorModel(psf_fwhm_mm=-0.1), "psf_fwhm_mm"),
        (lambda: DetectorModel(scatter_to_primary=float("nan")), "scatter_to_primary"),
        (lambda: DetectorModel(scatter_to_primary=-0.2), "scatter_to_primary"),
        (lambda: DetectorModel(scatter_sigma_mm=0.0), "scatter_sigma_mm"),
        (lambda: DetectorModel(heel_effect=2.5), "heel_effect"),
        (lambda: DetectorModel(heel_axis="diagonal"), "heel_axis"),
        (lambda: DetectorModel(collimator="circle"), "collimator"),
        (lambda: DetectorModel(output="linear"), "output"),
        (lambda: DetectorModel(intensity_floor=0.0), "intensity_floor"),
        (lambda: DetectorModel(bit_depth=0), "bit_depth"),
        (lambda: DetectorModel(bit_depth=33), "bit_depth"),
        (lambda: DetectorModel(bit_depth=12.0), "bit_depth"),
        (lambda: DetectorModel(quantization_range=(1.0, 0.0)), "quantization_range"),
        (lambda: CircularCollimator(radius_mm=-1.0), "radius_mm"),
        (lambda: CircularCollimator(radius_mm=5.0, center_mm=(0.0, float("nan"))), "center_mm"),
        (lambda: CircularCollimator(radius_mm=5.0, edge_width_mm=-1.0), "edge_width_mm"),
        (lambda: CircularCollimator(radius_mm=5.0, leakage=1.5), "leakage"),
        (lambda: RectangularCollimator(half_width_mm=0.0, half_height_mm=3.0), "half_width_mm"),
        (lambda: RectangularCollimator(half_width_mm=2.0, half_height_mm=float("inf")), "half_height_mm"),
        (lambda: simulate_detector(torch.full((4, 4), float("nan")), 0.3), "primary"),
        (lambda: simulate_detector(torch.rand(4), 0.3), "primary"),
        (lambda: simulate_detector(torch.rand(1, 1, 4, 4), 0.3), "primary"),
        (lambda: simulate_detector(torch.rand(4, 4) + 1.0, 0.3), "primary"),
        (lambda: simulate_detector(-torch.rand(4, 4) - 0.1, 0.3), "primary"),
        (lambda: simulate_detector(torch.ones(4, 4, dtype=torch.int64), 0.3), "primary"),
        (lambda: simulate_detector([[0.5]], 0.3), "primary"),
        (lambda: simulate_detector(torch.rand(4, 4), 0.0), "pixel_spacing_mm"),
        (lambda: simulate_detector(torch.rand(4, 4), (0.3,)), "pixel_spacing_mm"),
        (lambda: simulate_detector(torch.rand(4, 4), (0.3, float("nan"))), "pixel_spacing_mm"),
        (lambda: simulate_detector(torch.rand(4, 4), 0.3, "default"), "model"),
        (lambda: simulate_detector(torch.rand(4, 4), 0.3, seed=1, generator=torch.Generator()), "seed"),
        (lambda: simulate_detector(torch.rand(4, 4), 0.3, seed=-1), "seed"),
        (lambda: simulate_detector(torch.rand(4, 4), 0.3, seed=1.5), "seed"),
        (lambda: simulate_detector(torch.rand(4, 4), 0.3, generator=1), "generator"),
    ],
)
def test_bad_input_raises_input_error_naming_the_parameter(make, name):
    with pytest.raises(InputError, match=rf"^(\w+\.)?{name}: expected .*got") as info:
        make()
    assert isinstance(info.value, ValueError)


def test_primary_within_tolerance_is_accepted():
    primary = torch.full((8, 8), 1.0 + 1e-7, dtype=torch.float64)
    primary[0, 0] = -1e-7
    out = simulate_detector(primary, 0.3, QUIET)
    assert float(out.max()) == 1.0 and float(out.min()) == 0.0


# ------------------------------------------------------------------------------------------- dtype, batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape_are_kept(dtype):
    primary = phantom(dtype=dtype)
    for model in (DetectorModel(), DetectorModel(noise="gaussian", output="intensity", heel_effect=0.1)):
        out2 = simulate_detector(primary, 0.3, model, seed=0)
        out3 = simulate_detector(primary.unsqueeze(0), 0.3, model, seed=0)
        assert out2.dtype == dtype and out2.shape == primary.shape
        assert out3.shape == (1, *primary.shape)
        assert torch.equal(out2, out3[0])  # (H, W) is the batch of one


def test_batch_images_are_independent():
    a, b = phantom(seed=0), phantom(seed=1).flip(0) * 0.3
    model = quiet(psf_fwhm_mm=0.6, scatter_to_primary=0.3, heel_effect=0.05, output="log", bit_depth=14)
    batch = simulate_detector(torch.stack([a, b]), 0.3, model)
    assert torch.equal(batch[0], simulate_detector(a, 0.3, model))
    assert torch.equal(batch[1], simulate_detector(b, 0.3, model))
    noisy = simulate_detector(torch.stack([a, a]), 0.3, DetectorModel(), seed=0)
    assert not torch.equal(noisy[0], noisy[1])  # each image draws its own noise


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_is_seedable():
    primary = phantom(dtype=torch.float64)
    model = dataclasses.replace(DetectorModel(), photons_per_pixel=None, bit_depth=None)
    cpu = simulate_detector(primary, 0.3, model)
    gpu = simulate_detector(primary.cuda(), 0.3, model)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-10)
    a = simulate_detector(primary.cuda(), 0.3, seed=1)
    assert torch.equal(a, simulate_detector(primary.cuda(), 0.3, seed=1))
    with pytest.raises(InputError, match="generator"):
        simulate_detector(primary.cuda(), 0.3, generator=torch.Generator())
