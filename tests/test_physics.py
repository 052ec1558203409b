"""The polychromatic renderer: analytic Beer–Lambert, beam hardening, material channels, gradients, tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xraypose.errors import InputError
from xraypose.geometry import Camera, Intrinsics, ap_view, carm_pose
from xraypose.geometry.se3 import se3_exp
from xraypose.io import hu_to_mu, load_default_ct
from xraypose.physics.materials import (
    DEEPDRR_DENSITY,
    MATERIALS,
    MaterialModel,
    hu_to_density,
    mass_attenuation,
    smoothstep,
)
from xraypose.physics.polychromatic import (
    PolychromaticDRR,
    attenuate,
    material_path_lengths,
    render_polychromatic,
)
from xraypose.physics.spectrum import Spectrum, monoenergetic, tube_spectrum
from xraypose.render import render
from xraypose.render.transfer import ThresholdTransfer, TransferFunction


@pytest.fixture(scope="module")
def spectrum() -> Spectrum:
    return tube_spectrum(90.0, filtration_mm_al=2.5, n_bins=12)


def _box_chords(cam: Camera, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    src = cam.source_world()[:, None, :]
    d = cam.detector_world() - src
    ta, tb = (lo - src) / d, (hi - src) / d
    t0 = torch.minimum(ta, tb).amax(-1).clamp(0, 1)
    t1 = torch.maximum(ta, tb).amin(-1).clamp(0, 1)
    return ((t1 - t0).clamp_min(0) * d.norm(dim=-1)).reshape(-1, cam.intrinsics.rows, cam.intrinsics.cols)


# -- physical data -------------------------------------------------------------------------------------------


def test_mass_attenuation_matches_published_tables():
    """Mixture-rule μ/ρ from xraydb's elemental data against NIST's tables (Hubbell & Seltzer, Table 4)."""
    nist = {  # material: {keV: μ/ρ cm²/g}
        "water": {30.0: 0.3756, 60.0: 0.2059, 100.0: 0.1707},
        "soft_tissue": {60.0: 0.2048, 100.0: 0.1695},
        "bone": {60.0: 0.3148, 100.0: 0.1855},
        "air": {60.0: 0.1875, 100.0: 0.1541},
    }
    for name, table in nist.items():
        e = np.array(list(table))
        got = mass_attenuation(name, e)
        np.testing.assert_allclose(got, np.array(list(table.values())), rtol=0.02, err_msg=name)
    # titanium's K edge (4.97 keV) and photoelectric fall-off: μ/ρ decreases over the diagnostic range
    ti = mass_attenuation("titanium", np.linspace(20, 120, 11))
    assert np.all(np.diff(ti) < 0)
    with pytest.raises(InputError, match="material"):
        mass_attenuation("unobtainium", [60.0])
    with pytest.raises(InputError, match="energies_kev"):
        mass_attenuation("water", [0.1])


def test_spectrum_binning_keeps_mean_energy_and_hardens_with_filtration():
    import spekpy

    s = tube_spectrum(90.0, filtration_mm_al=2.5, n_bins=20)
    ref = spekpy.Spek(kvp=90.0, th=12.0, dk=0.5)
    ref.filter("Al", 2.5)
    assert s.n_bins == 20
    assert s.mean_energy_kev == pytest.approx(ref.get_emean(), rel=5e-3)
    assert s.energies_kev.max() < 90.0
    assert tube_spectrum(120.0).mean_energy_kev > tube_spectrum(70.0).mean_energy_kev
    assert tube_spectrum(90.0, filtration_mm_cu=0.2).mean_energy_kev > s.mean_energy_kev
    w = s.weights("energy_integrating")
    assert w.sum() == pytest.approx(1.0)
    assert (w / s.weights("photon_counting"))[-1] > (w / s.weights("photon_counting"))[0]
    with pytest.raises(InputError, match="kvp"):
        tube_spectrum(300.0)
    with pytest.raises(InputError, match="n_bins"):
        tube_spectrum(90.0, n_bins=0)
    with pytest.raises(InputError, match="detector"):
        s.weights("film")


def test_material_model_fractions_density_and_transfer():
    m = MaterialModel(metal_min_hu=2500.0)
    hu = torch.linspace(-1500, 4000, 2001, dtype=torch.float64)
    f = m.fractions(hu)
    assert m.names == ("air", "soft_tissue", "bone", "titanium")
    assert torch.allclose(f.sum(-1), torch.ones_like(hu))
    assert float(f.min()) >= 0.0 and float(f.max()) <= 1.0
    assert torch.allclose(
        m.fractions(torch.tensor([-1000.0, 0.0, 1000.0, 3000.0])), torch.eye(4)[[0, 1, 2, 3]]
    )
    # DeepDRR's density model
    assert float(hu_to_density(torch.tensor(0.0))) == pytest.approx(1.03)
    assert float(hu_to_density(torch.tensor(1000.0))) == pytest.approx(1.6186)
    assert float(hu_to_density(torch.tensor(-1000.0))) == pytest.approx(0.001, abs=1e-6)
    assert float(hu_to_density(torch.tensor(-2000.0))) == 0.0
    # smooth: the fractions have bounded derivatives (no jump) across each boundary
    h = hu.clone().requires_grad_(True)
    m.channels(h).sum().backward()
    assert torch.isfinite(h.grad).all()
    assert float(smoothstep(torch.tensor(349.0), 350.0, 0.0)) == 0.0
    # the tabulated transfer function reproduces the model
    tf = m.transfer()
    assert isinstance(tf, ThresholdTransfer) and tf.names == m.names
    assert torch.allclose(tf(hu), m.channels(hu), atol=1e-12)  # closed form: exact
    hard = MaterialModel(transition_hu=0.0).transfer()  # hard thresholds: tabulated every 2 HU
    assert isinstance(hard, TransferFunction) and hard.dx == 2.0
    assert tf is m.transfer()  # cached
    with pytest.raises(InputError, match="increasing"):
        MaterialModel(air_max_hu=500.0, bone_min_hu=300.0)


def test_channels_from_labels_assign_materials_outright():
    m = MaterialModel()
    hu = torch.tensor([[[0.0, 500.0], [-900.0, 100.0]]])
    labels = torch.tensor([[[1, 0], [0, 2]]])
    ch = m.channels_from_labels(hu, labels, {1: "bone", 2: "air"})
    rho = hu_to_density(hu)
    assert ch.shape == (3, 1, 2, 2)
    assert torch.allclose(ch.sum(0), rho)
    assert float(ch[2, 0, 0, 0]) == pytest.approx(float(rho[0, 0, 0]))  # label 1 → bone despite 0 HU
    assert float(ch[0, 0, 1, 1]) == pytest.approx(float(rho[0, 1, 1]))  # label 2 → air despite 100 HU
    assert torch.allclose(ch[:, 0, 0, 1], m.channels(hu[0, 0, 1]))  # unlabelled: from HU
    with pytest.raises(InputError, match="mapping"):
        m.channels_from_labels(hu, labels, {1: "titanium"})


# -- renderer against analytic physics -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
def test_water_slab_matches_analytic_beer_lambert(method, spectrum):
    """A block of water (ρ = 1 g/cm³): every pixel is Σ_E w_E exp(−μ/ρ(E) ρ ℓ) with ℓ its exact chord."""
    shape, spacing = (40, 24, 40), 5.0  # 200 × 120 × 200 mm; the beam crosses the 120 mm axis (AP)
    aff = torch.diag(torch.tensor([spacing] * 3 + [1.0], dtype=torch.float64))
    aff[:3, 3] = -(torch.tensor(shape, dtype=torch.float64) - 1) / 2 * spacing
    water = torch.ones((1, *shape), dtype=torch.float64)
    cam = ap_view(
        (0.0, 0.0, 0.0),
        sdd=1000.0,
        source_to_isocenter=600.0,
        rows=16,
        detector_mm=250.0,
        dtype=torch.float64,
    )
    img = render_polychromatic(water, aff, cam, materials=("water",), spectrum=spectrum, method=method)
    half = torch.tensor(shape, dtype=torch.float64) * spacing / 2
    chord_cm = _box_chords(cam, -half, half) / 10.0
    mu = torch.as_tensor(mass_attenuation("water", spectrum.energies_kev))
    w = torch.as_tensor(spectrum.weights())
    expect = (w[:, None, None, None] * torch.exp(-mu[:, None, None, None] * chord_cm)).sum(0)
    assert float(chord_cm[0, 8, 8]) == pytest.approx(12.0, rel=1e-3)  # the central ray crosses 120 mm
    assert float(((img - expect).abs() / expect).max()) < 1e-3


def test_beam_hardening_effective_mu_falls_with_thickness(spectrum):
    thickness_cm = torch.tensor([1.0, 5.0, 10.0, 20.0, 30.0], dtype=torch.float64)
    L = thickness_cm.reshape(1, 1, -1)  # (B=1, M=1, N) water path lengths, g/cm²
    mu = torch.as_tensor(mass_attenuation("water", spectrum.energies_kev)).unsqueeze(0)
    poly = attenuate(L, mu, torch.as_tensor(spectrum.weights()), output="line_integral")[0] / thickness_cm
    assert bool((poly[1:] < poly[:-1]).all()), poly  # hardening: the beam gets more penetrating
    assert float(poly[0] / poly[-1]) > 1.1
    mono = monoenergetic(60.0)
    mu1 = torch.as_tensor(mass_attenuation("water", mono.energies_kev)).unsqueeze(0)
    flat = attenuate(L, mu1, torch.as_tensor(mono.weights()), output="line_integral")[0] / thickness_cm
    assert torch.allclose(flat, torch.full_like(flat, float(mu1[0, 0])), rtol=1e-12)
    # any thickness stays finite: far beyond underflow, −ln(I/I0) → μ_min·L − ln(w of that bin)
    huge = torch.tensor([[[1e4]]], dtype=torch.float64)
    mu2 = torch.tensor([[0.3, 0.2]], dtype=torch.float64)
    w2 = torch.tensor([0.25, 0.75], dtype=torch.float64)
    far = attenuate(huge, mu2, w2, output="line_integral")
    assert float(far) == pytest.approx(0.2 * 1e4 - math.log(0.75), rel=1e-12)
    assert float(attenuate(huge, mu2, w2)) == 0.0


@pytest.fixture(scope="module")
def default_ct():
    vol = load_default_ct()
    return vol


@pytest.mark.parametrize("method", ["trilinear", "siddon"])
def test_material_channels_add_up_to_the_total_density(default_ct, method):
    hu = default_ct.data.to(torch.float32)
    aff = default_ct.affine.to(torch.float32)
    cam = ap_view(default_ct.center_world, rows=48, detector_mm=400.0)
    model = MaterialModel()
    L = material_path_lengths(hu, aff, cam, materials=model, method=method)
    assert L.shape == (1, 3, 48, 48)
    assert float(L[:, 2].max()) > 0.5 and float(L[:, 0].max()) > 0  # bone and air present
    rho_tf = ThresholdTransfer(DEEPDRR_DENSITY, (), width=1.0)  # one channel: ρ(HU) itself
    total = render(hu, aff, cam, transfer=rho_tf, method=method)[:, 0] * 0.1
    assert torch.allclose(L.sum(1), total, rtol=1e-5, atol=1e-6)
    if method == "siddon":  # voxels are constant: the channels sum to ∫ ρ(HU) dl
        direct = render(hu_to_density(hu), aff, cam, method="siddon") * 0.1
        assert torch.allclose(L.sum(1), direct, rtol=1e-4, atol=1e-5)


def test_mono_and_poly_images_correlate_on_the_default_ct(default_ct, spectrum):
    hu = default_ct.data.to(torch.float32)
    aff = default_ct.affine.to(torch.float32)
    pose = carm_pose(
        torch.tensor([0.0, 25.0]),
        torch.tensor([0.0, -10.0]),
        0.0,
        source_to_isocenter=600.0,
        isocenter=default_ct.center_world.float(),
    )
    cam = Camera(Intrinsics(sdd=1020.0, rows=64, cols=64, dy=4.0, dx=4.0), pose)
    mono = render(hu_to_mu(hu), aff, cam)
    poly = render_polychromatic(hu, aff, cam, spectrum=spectrum, output="line_integral")
    assert poly.shape == mono.shape == (2, 64, 64)
    for a, b in zip(mono, poly, strict=True):
        a, b = a - a.mean(), b - b.mean()
        ncc = float((a * b).sum() / (a.norm() * b.norm()))
        assert ncc > 0.95
    # the polychromatic beam is harder than the water-equivalent monochromatic model: not the same image
    assert float((poly - mono).abs().max()) > 0.05


def test_poly_gradcheck_pose_and_volume(spectrum):
    g = torch.Generator().manual_seed(3)
    shape = (7, 6, 5)
    hu = torch.rand(shape, generator=g, dtype=torch.float64) * 1600 - 900
    aff = torch.diag(torch.tensor([6.0, 6.0, 7.0, 1.0], dtype=torch.float64))
    centre = aff[:3, :3] @ ((torch.tensor(shape, dtype=torch.float64) - 1) / 2)
    pose = carm_pose(10.0, -15.0, 5.0, source_to_isocenter=150.0, isocenter=centre, dtype=torch.float64)
    intr = Intrinsics(sdd=300.0, rows=3, cols=4, dy=12.0, dx=12.0)
    opts = dict(spectrum=spectrum, backend="fused", multires=False, n_samples=13)

    def by_pose(xi):
        return render_polychromatic(hu, aff, Camera(intr, se3_exp(xi) @ pose), **opts)

    xi = (torch.randn(1, 6, generator=g, dtype=torch.float64) * 1e-3).requires_grad_(True)
    assert torch.autograd.gradcheck(by_pose, (xi,), eps=1e-6, atol=1e-6, rtol=1e-3)

    def by_volume(v):
        return render_polychromatic(v, aff, Camera(intr, pose), **opts)

    assert torch.autograd.gradcheck(
        by_volume, (hu.clone().requires_grad_(True),), eps=1e-3, atol=1e-6, rtol=1e-3
    )


def test_polychromatic_drr_class_and_errors(default_ct, spectrum):
    hu = default_ct.data.to(torch.float32)
    aff = default_ct.affine.to(torch.float32)
    cam = ap_view(default_ct.center_world, rows=32, detector_mm=400.0)
    drr = PolychromaticDRR(hu, aff, cam.intrinsics, spectrum=spectrum)
    a = drr(cam.pose)
    b = render_polychromatic(hu, aff, cam, spectrum=spectrum)
    assert torch.allclose(a, b)
    assert float(a.min()) > 0 and float(a.max()) <= 1.0
    assert torch.allclose(drr(cam.pose, output="line_integral"), -torch.log(a), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="names"):
        render_polychromatic(hu, aff, cam, materials=("water", "bone"))
    with pytest.raises(InputError, match="unknown"):
        render_polychromatic(hu[None], aff, cam, materials=("kryptonite",))
    with pytest.raises(InputError, match="output"):
        render_polychromatic(hu, aff, cam, output="counts")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="transfer"):
        material_path_lengths(hu, aff, cam, transfer=None)
    assert set(MATERIALS) >= {"air", "soft_tissue", "bone", "titanium", "water"}
