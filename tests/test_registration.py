"""The registration engine recovers known poses on the default CT; its guards and options work."""

from __future__ import annotations

import math

import pytest
import torch

from xraypose.errors import InputError
from xraypose.geometry import Camera, Intrinsics
from xraypose.geometry.se3 import invert, se3_exp, se3_log, transform_points
from xraypose.io import load_default_ct
from xraypose.losses import ImageLoss
from xraypose.metrics import mtre
from xraypose.registration import (
    RegistrationConfig,
    Scale,
    Search,
    VolumeRenderer,
    preset,
    register,
    search_starts,
)
from xraypose.registration.engine import _pivot_world


def _pivot(renderer):
    return _pivot_world(renderer, None).float()


@pytest.fixture(scope="module")
def scene(registration_scene):
    return registration_scene(128)


FAST = RegistrationConfig(scales=(Scale(32, 60, 2e-2, 2.0), Scale(64, 50, 5e-3, 0.5)), search=None)


def test_recovers_a_known_pose_from_5_degrees_10_mm(scene):
    renderer, intr, truth, target, init, landmarks = scene
    before = mtre(init, truth, landmarks)
    assert bool((before > 8.0).all())
    steps = []
    result = register(renderer, target, intr, init, FAST, callback=lambda step, pose: steps.append(step.step))
    after = mtre(result.pose, truth, landmarks)
    assert bool((after < 0.3).all()), after
    assert bool((result.loss < result.initial_loss).all())
    assert result.pose.shape == (2, 4, 4) and bool(torch.isfinite(result.pose).all())
    assert result.iterations == len(steps) == len(result.trajectory) == result.poses.shape[0]
    assert result.stop_reason in ("iterations", "plateau")
    assert not bool(result.diverged.any())
    # the trajectory starts at the initial pose and records per-problem losses and increasing times
    assert torch.allclose(result.poses[0], init, atol=1e-4)
    assert result.trajectory[0].loss.shape == (2,)
    assert all(b.seconds >= a.seconds for a, b in zip(result.trajectory, result.trajectory[1:], strict=False))


def test_sparse_patches_and_euler_parameterisation(scene):
    renderer, intr, truth, target, init, landmarks = scene
    sparse = RegistrationConfig(
        scales=(Scale(32, 60, 2e-2, 2.0), Scale(64, 60, 5e-3, 0.5, patches=(24, 8))), seed=3
    )
    result = register(renderer, target[:1], intr, init[:1], sparse)
    assert float(mtre(result.pose, truth[:1], landmarks)[0]) < 1.0
    euler = RegistrationConfig(scales=FAST.scales, parameterization="euler")
    result = register(renderer, target[:1], intr, init[:1], euler)
    assert float(mtre(result.pose, truth[:1], landmarks)[0]) < 1.0


def test_divergence_returns_the_best_pose_and_says_so(scene):
    renderer, intr, _truth, target, init, _landmarks = scene
    calls = {"n": 0}

    def flaky(camera, pixels=None):
        calls["n"] += 1
        image = renderer(camera, pixels)
        return image * math.nan if calls["n"] > 8 else image

    config = RegistrationConfig(scales=(Scale(32, 40, 2e-2, 2.0),), max_divergences=3)
    result = register(
        flaky, target, intr, init, config, pivot_world=renderer.volume.new_tensor([0.0, 0.0, 0.0])
    )
    assert result.stop_reason == "diverged"
    assert bool(result.diverged.all())
    assert bool(torch.isfinite(result.pose).all())
    # the pose returned is, per problem, the visited pose of least loss before the renderer broke
    losses = torch.stack([step.loss for step in result.trajectory])  # (S, B)
    assert bool(torch.isnan(losses[-1]).all()) and bool(torch.isfinite(losses[0]).all())
    best = torch.where(torch.isfinite(losses), losses, torch.inf).argmin(0)
    for b in range(losses.shape[1]):
        assert torch.allclose(result.pose[b], result.poses[best[b], b], atol=1e-5)
    assert bool((best > 0).all())  # it moved: not the initial pose


def test_bad_inputs_raise_clear_errors(scene):
    renderer, intr, _truth, target, init, _ = scene
    with pytest.raises(InputError, match="target"):
        register(renderer, target[:, :10], intr, init, FAST)
    with pytest.raises(InputError, match="NaN"):
        register(renderer, target * math.nan, intr, init, FAST)
    with pytest.raises(InputError, match="parameterization"):
        RegistrationConfig(parameterization="axis-angle")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="scale"):
        Scale(2, 10)
    with pytest.raises(InputError, match="physics"):
        VolumeRenderer(load_default_ct(with_labels=False), physics="xray")  # type: ignore[arg-type]


def test_search_starts_rotate_about_the_pivot_in_the_detector_plane(scene):
    renderer, intr, _truth, _target, init, _ = scene
    pivot = renderer.volume.new_tensor([10.0, -5.0, 20.0]).double()
    init = init.double()
    starts = search_starts(init, intr, 15.0, 5, pivot_world=pivot).view(2, 5, 4, 4)
    assert torch.allclose(starts[:, 0], init)
    for b in range(2):
        pivot_cam = transform_points(invert(init[b]), pivot[None])[0]
        for k in range(1, 5):
            rel = invert(init[b]) @ starts[b, k]  # motion in the initial camera frame
            omega = se3_log(rel)[3:]
            assert math.degrees(float(omega.norm())) == pytest.approx(15.0, abs=1e-6)
            assert abs(float(omega[2])) < 1e-9  # axis in the detector plane
            phi = 2 * math.pi * (k - 1) / 4
            axis = omega / omega.norm()
            assert float(axis[0]) == pytest.approx(math.cos(phi), abs=1e-6)
            assert float(axis[1]) == pytest.approx(math.sin(phi), abs=1e-6)
            # the pivot stays where it was in the camera frame
            moved = transform_points(invert(starts[b, k]), pivot[None])[0]
            assert torch.allclose(moved, pivot_cam, atol=1e-9)


def test_search_chooses_the_start_of_least_loss(scene):
    renderer, intr, truth, target, _init, landmarks = scene
    centre = _pivot(renderer)
    # initial poses 20° out of plane from the truth, about the camera's x axis through the pivot: the search's
    # first rotated start lands on the truth exactly, and must be the one chosen
    to_pivot = torch.eye(4).repeat(2, 1, 1)
    to_pivot[:, :3, 3] = transform_points(invert(truth), centre.expand(2, 1, 3))[:, 0]
    back = se3_exp(torch.tensor([[0.0, 0, 0, -math.radians(20.0), 0, 0]]).expand(2, 6))
    init = truth @ to_pivot @ back @ invert(to_pivot)
    assert bool((mtre(init, truth, landmarks) > 15).all())
    search = Search(size=32, iterations=10, starts=4, rotation_deg=20.0)
    config = RegistrationConfig(scales=(Scale(32, 20, 5e-3, 0.5),), search=search)
    seen = []
    result = register(renderer, target, intr, init, config, callback=lambda s, p: seen.append((s, p.shape)))
    assert torch.allclose(result.poses[0], truth, atol=1e-3)  # the chosen start's first pose
    assert bool((mtre(result.pose, truth, landmarks) < 0.5).all())
    levels = [s.level for s in result.trajectory]
    n_search = levels.count(-1)
    assert 1 <= n_search <= 10 and levels[:n_search] == [-1] * n_search
    assert all(s.loss.shape == (2,) and shape == (2, 4, 4) for s, shape in seen)
    assert result.poses.shape == (len(result.trajectory), 2, 4, 4)
    # the initial loss is that of the given initial pose, not of the chosen start
    assert bool((result.initial_loss > result.loss + 0.05).all())
    with pytest.raises(InputError, match="search"):
        Search(starts=0)


def test_presets():
    assert preset("default") == RegistrationConfig()
    fine = preset("fine", seed=4)
    assert fine.scales[-1].size == 256 and fine.seed == 4 and fine.search is not None
    assert fine.scales[0] == RegistrationConfig().scales[0] and fine.scales[0].solver == "adam"
    assert [(s.size, s.physics, s.solver, s.loss) for s in fine.scales[1:]] == [
        (128, "poly", "newton", "pwls"),
        (256, "poly", "newton", "pwls"),
    ]
    with pytest.raises(InputError, match="preset"):
        preset("best")
    with pytest.raises(InputError, match="preset 'fine'"):
        preset("fine", colour="red")


def test_per_level_physics_renders_the_last_level_polychromatically(scene):
    renderer, intr, truth, target, init, landmarks = scene
    poly = renderer.with_physics("poly")
    assert poly is renderer.with_physics("poly") and poly.physics == "poly"
    assert renderer.with_physics("mono") is renderer and poly.with_physics("mono") is renderer
    # the view is the polychromatic renderer of the same CT
    ref = VolumeRenderer(load_default_ct(with_labels=False), "poly")
    small = intr.resized(32, 32)
    with torch.no_grad():
        assert torch.allclose(poly(Camera(small, truth)), ref(Camera(small, truth)))
    config = RegistrationConfig(
        scales=(Scale(32, 40, 2e-2, 2.0), Scale(64, 20, 5e-3, 0.5, physics="poly")), search=None
    )
    result = register(renderer, target[:1], intr, init[:1], config)
    assert float(mtre(result.pose, truth[:1], landmarks)[0]) < 1.0
    # the reported loss is the polychromatic one at the last level, not the monochromatic one
    loss_fn = ImageLoss.parse(config.loss)
    tgt = torch.nn.functional.interpolate(target[:1, None], size=(64, 64), mode="area")[:, 0]
    with torch.no_grad():
        camera = Camera(intr.resized(64, 64), result.pose)
        expected, mono = loss_fn(poly(camera), tgt), loss_fn(renderer(camera), tgt)
    assert torch.allclose(result.loss, expected, atol=1e-5) and not torch.allclose(
        result.loss, mono, atol=1e-5
    )


def test_per_level_physics_guards():
    with pytest.raises(InputError, match="physics"):
        Scale(32, 10, physics="spectral")
    vol = load_default_ct(with_labels=False)
    with pytest.raises(InputError, match="spectrum"):
        VolumeRenderer(vol, "mono", spectrum=None)
    intr = Intrinsics(sdd=1020.0, rows=16, cols=16, dy=19.2, dx=19.2)
    plain = VolumeRenderer(vol)

    def bare(camera, pixels=None):  # a renderer without with_physics
        return plain(camera, pixels)

    pose = _pivot_pose(vol)
    with torch.no_grad():
        target = plain(Camera(intr, pose))
    config = RegistrationConfig(scales=(Scale(16, 2, physics="poly"),), search=None)
    with pytest.raises(InputError, match="with_physics"):
        register(bare, target, intr, pose, config)


def _pivot_pose(vol):
    from xraypose.geometry import carm_pose

    return carm_pose(
        torch.tensor([0.0]),
        torch.tensor([0.0]),
        0.0,
        source_to_isocenter=620.0,
        isocenter=vol.center_world.float(),
    )


def test_noise_weighted_level_passes_the_weights_and_reports_the_weighted_loss(scene):
    from xraypose.losses import quantum_noise_weights

    renderer, intr, truth, target, init, landmarks = scene
    base = ImageLoss.parse("0.5*mncc+0.5*gncc")
    seen = []

    def spy(pred, tgt, mask=None):
        seen.append(mask)
        return base(pred, tgt, mask=mask)

    config = RegistrationConfig(
        scales=(Scale(32, 40, 2e-2, 2.0), Scale(64, 30, 5e-3, 0.5, noise_weight=1.0)), loss=spy, search=None
    )
    result = register(renderer, target[:1], intr, init[:1], config)
    assert float(mtre(result.pose, truth[:1], landmarks)[0]) < 1.0
    # the coarse level is unweighted, the last one weighted by the X-ray's quantum-noise weights
    tgt = torch.nn.functional.interpolate(target[:1, None], size=(64, 64), mode="area")[:, 0]
    expected_w = quantum_noise_weights(tgt)
    weighted = [m for m in seen if m is not None]
    assert any(m is None for m in seen) and weighted
    assert all(m.shape == (1, 64, 64) and torch.allclose(m, expected_w) for m in weighted)
    with torch.no_grad():
        camera = Camera(intr.resized(64, 64), result.pose)
        expected, plain = base(renderer(camera), tgt, mask=expected_w), base(renderer(camera), tgt)
    assert torch.allclose(result.loss, expected, atol=1e-5) and not torch.allclose(
        result.loss, plain, atol=1e-5
    )
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="noise_weight"):
            Scale(64, 10, noise_weight=bad)


def test_a_level_minimises_its_own_loss_and_reports_it(scene):
    renderer, intr, truth, target, init, landmarks = scene
    base, own = ImageLoss.parse("0.5*mncc+0.5*gncc"), ImageLoss.parse("pwls")
    calls = {"config": 0, "level": 0}

    def config_loss(pred, tgt, mask=None):
        calls["config"] += 1
        return base(pred, tgt, mask=mask)

    def level_loss(pred, tgt, mask=None):
        calls["level"] += 1
        return own(pred, tgt, mask=mask)

    config = RegistrationConfig(
        scales=(Scale(32, 40, 2e-2, 2.0), Scale(64, 8, 5e-3, 0.5, solver="newton", loss=level_loss)),
        loss=config_loss,
        search=None,
    )
    result = register(renderer, target[:1], intr, init[:1], config)
    assert float(mtre(result.pose, truth[:1], landmarks)[0]) < 1.0
    assert calls["config"] > 0 and calls["level"] > 0
    # the result's losses are the last level's own: at the result and at the initial pose
    tgt = torch.nn.functional.interpolate(target[:1, None], size=(64, 64), mode="area")[:, 0]
    with torch.no_grad():
        at_result = own(renderer(Camera(intr.resized(64, 64), result.pose)), tgt)
        at_init = own(renderer(Camera(intr.resized(64, 64), init[:1])), tgt)
    assert torch.allclose(result.loss, at_result, atol=1e-6)
    assert torch.allclose(result.initial_loss, at_init, atol=1e-6)
    # a bad loss is refused when the level is made, naming it
    with pytest.raises(InputError, match="nope"):
        Scale(64, 5, loss="0.5*nope")
    with pytest.raises(InputError, match="scale: loss"):
        Scale(64, 5, loss=3)  # type: ignore[arg-type]


def test_newton_levels_recover_a_known_pose_in_a_few_steps(scene):
    renderer, intr, truth, target, init, landmarks = scene
    config = RegistrationConfig(
        scales=(Scale(32, 15, 3e-2, 3.0, solver="newton"), Scale(64, 15, 1e-2, 1.0, solver="newton")),
        search=None,
    )
    result = register(renderer, target, intr, init, config)
    after = mtre(result.pose, truth, landmarks)
    assert bool((after < 0.3).all()), after
    assert bool((result.loss < result.initial_loss).all()) and not bool(result.diverged.any())
    # far fewer steps than Adam needs on the same problem (FAST: 60 + 50 steps at most)
    assert result.iterations <= 24, result.iterations
    assert result.stop_reason in ("converged", "iterations", "plateau")
    # the reported loss is the exact loss of the returned pose at the last level
    loss_fn = ImageLoss.parse(config.loss)
    tgt = torch.nn.functional.interpolate(target[:, None], size=(64, 64), mode="area")[:, 0]
    with torch.no_grad():
        expected = loss_fn(renderer(Camera(intr.resized(64, 64), result.pose)), tgt)
    assert torch.allclose(result.loss, expected, atol=1e-5)


def test_newton_solver_guards():
    with pytest.raises(InputError, match="solver"):
        Scale(32, 10, solver="lbfgs")
    with pytest.raises(InputError, match="patches"):
        Scale(32, 10, patches=(8, 8), solver="newton")


def _quadratic(hessian: torch.Tensor, minimum: torch.Tensor):
    def loss_and_grad(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = p - minimum
        return 0.5 * torch.einsum("bi,bij,bj->b", d, hessian, d), torch.einsum("bij,bj->bi", hessian, d)

    return loss_and_grad


def test_newton_steps_on_a_quadratic():
    from xraypose.registration.engine import _Newton

    torch.manual_seed(0)
    A = torch.randn(2, 6, 6, dtype=torch.float64)
    H = A @ A.transpose(1, 2) + 0.5 * torch.eye(6, dtype=torch.float64)
    minimum = 0.01 * torch.randn(2, 6, dtype=torch.float64)
    f = _quadratic(H, minimum)
    scale = Scale(64, 10, 1.0, 1.0, solver="newton")
    # the exact Hessian: one (slightly damped) step lands near the minimum, three on it
    newton = _Newton(H.clone(), scale, 3)
    p = torch.zeros(2, 6, dtype=torch.float64)
    p, _ = newton.step(p, *f(p))
    assert float((p - minimum).norm(dim=-1).max()) < 0.1 * float(minimum.norm(dim=-1).min())
    for _ in range(2):
        p, _ = newton.step(p, *f(p))
    assert float((p - minimum).norm(dim=-1).max()) < 1e-3 * float(minimum.norm(dim=-1).min())
    # a Hessian 4× too large: the exact gradients' BFGS corrections restore fast convergence
    newton = _Newton(4 * H, scale, 3)
    p = torch.zeros(2, 6, dtype=torch.float64)
    for _ in range(8):
        p, _ = newton.step(p, *f(p))
    assert float((p - minimum).norm(dim=-1).max()) < 1e-3 * float(minimum.norm(dim=-1).min())


def test_newton_rejects_a_step_that_raised_the_loss_and_respects_the_trust_radius():
    from xraypose.registration.engine import _Newton

    H = torch.eye(6, dtype=torch.float64).unsqueeze(0)
    minimum = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0, 0.0]], dtype=torch.float64)
    f = _quadratic(H, minimum)
    newton = _Newton(H.clone(), Scale(64, 10, 0.1, 1.0, solver="newton"), 3)
    # the minimum is 5 mm away: the step stops at the trust radius (lr_translation = 1 mm)
    p0 = torch.zeros(1, 6, dtype=torch.float64)
    loss0, grad0 = f(p0)
    p1, converged = newton.step(p0, loss0, grad0)
    assert not converged
    assert torch.allclose(p1[0, 3:], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-6)
    # a step whose loss came out higher is taken back: the next one starts from p0, at most half as long
    bad = p0 + 3 * (p1 - p0)
    q, _ = newton.step(bad, loss0 + 1.0, f(bad)[1])
    step = q - p0
    assert 0 < float(step.norm()) <= 0.5 + 1e-9 and float(step[0, 3]) > 0
    assert float(newton.lam[0]) > 1e-2  # and more damping
    # from there on it converges onto the minimum and says so
    p = q
    for _ in range(40):
        p, converged = newton.step(p, *f(p))
        if converged:
            break
    assert converged and float((p - minimum).norm()) < 0.05


def test_a_newton_level_without_steps_still_scores_its_pose(scene):
    renderer, intr, _, target, init, _ = scene
    config = RegistrationConfig(
        scales=(Scale(32, 10, 3e-2, 3.0, solver="newton"), Scale(64, 0, solver="newton")), search=None
    )
    result = register(renderer, target, intr, init, config)
    loss_fn = ImageLoss.parse(config.loss)
    tgt = torch.nn.functional.interpolate(target[:, None], size=(64, 64), mode="area")[:, 0]
    with torch.no_grad():
        expected = loss_fn(renderer(Camera(intr.resized(64, 64), result.pose)), tgt)
    assert bool(torch.isfinite(result.loss).all()) and torch.allclose(result.loss, expected, atol=1e-5)


def test_levels_and_scores_never_render_finer_than_the_xray(registration_scene) -> None:
    """A level (or a score) asking for more rows than the X-ray has is rendered at the X-ray's own size, so the
    loss register reports equals the one the refinements' scorer computes for the same pose."""
    from xraypose.registration.engine import _level_intrinsics, _score

    renderer, intr, _, target, init, _ = registration_scene(32)
    wide = Intrinsics(sdd=1020.0, rows=32, cols=48, dy=9.6, dx=9.6)
    capped = _level_intrinsics(wide, 128)
    assert (capped.rows, capped.cols) == (32, 48)
    half = _level_intrinsics(wide, 16)
    assert (half.rows, half.cols) == (16, 24) and half.dx == pytest.approx(19.2)
    loss = "0.5*mncc+0.5*gncc"
    at_own = _score(renderer, target, intr, init, loss, 32)
    at_more = _score(renderer, target, intr, init, loss, 128)
    assert torch.allclose(at_more, at_own) and bool((at_own > 0.01).all())
    cfg = RegistrationConfig(scales=(Scale(128, 3, 1e-2, 1.0),), search=None, loss=loss)
    result = register(renderer, target, intr, init, cfg)
    assert torch.allclose(result.initial_loss, at_own, atol=1e-6)
    assert torch.allclose(result.loss, _score(renderer, target, intr, result.pose, loss, 32), atol=1e-6)
