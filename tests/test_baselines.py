"""The baselines (CMA-ES + BOBYQA, Euler-angle gradient descent) register the default CT; the registry works."""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import replace

import pytest
import torch

from xraypose.errors import InputError
from xraypose.geometry import Camera, Intrinsics, carm_pose
from xraypose.io import load_default_ct
from xraypose.metrics import mtre
from xraypose.registration import RegistrationConfig, RegistrationResult, Scale, VolumeRenderer, baselines
from xraypose.registration.baselines import METHODS, CMAESConfig, register_cmaes, register_euler_gd
from xraypose.registration.engine import _loss_fn

# 64² target; CMA-ES at 16 px (population 20), BOBYQA at 32 px
FAST = CMAESConfig(population=20, generations=25, downsample=4, local_downsample=2, local_evaluations=60)


class Counting:
    """A renderer that counts its calls and remembers each call's batch size."""

    def __init__(self, renderer, nan_every: int = 0) -> None:
        self.renderer, self.nan_every = renderer, nan_every
        self.batches: list[int] = []

    def __getattr__(self, name):  # volume, affine: the default pivot is the CT's centre
        return getattr(self.renderer, name)

    def __call__(self, camera, pixels=None):
        self.batches.append(camera.batch_size)
        image = self.renderer(camera, pixels)
        if self.nan_every and len(self.batches) % self.nan_every == 0:
            image = image.clone()
            image[: max(1, image.shape[0] // 2)] = math.nan
        return image


@pytest.fixture(scope="module")
def scene(registration_scene):
    return registration_scene(64)


@pytest.fixture(scope="module")
def cmaes_run(scene):
    renderer, intr, _truth, target, init, _ = scene
    counting = Counting(renderer)
    calls_at_step: list[tuple[int, int, int]] = []
    result = register_cmaes(
        counting,
        target[:1],
        intr,
        init[:1],
        FAST,
        callback=lambda step, pose: calls_at_step.append((step.level, step.step, len(counting.batches))),
    )
    return result, counting, calls_at_step


def test_cmaes_recovers_a_known_pose_from_5_degrees_10_mm(scene, cmaes_run):
    _renderer, _intr, truth, _target, init, landmarks = scene
    result, _, _ = cmaes_run
    before = float(mtre(init[:1], truth[:1], landmarks)[0])
    after = float(mtre(result.pose, truth[:1], landmarks)[0])
    assert before > 8.0
    assert after < 2.0, after  # measured 0.03 mm (level 1 alone: 4.3 mm)
    assert isinstance(result, RegistrationResult)
    assert result.pose.shape == (1, 4, 4) and result.pose.dtype == init.dtype
    assert bool(torch.isfinite(result.pose).all()) and bool(torch.isfinite(result.loss).all())
    assert bool((result.loss < result.initial_loss).all())
    assert not bool(result.diverged.any())
    assert result.stop_reason in ("iterations", "converged", "plateau")
    # the trajectory starts at the initial pose; one pose per step; increasing times
    assert result.poses.shape == (len(result.trajectory), 1, 4, 4)
    assert torch.allclose(result.poses[0], init[:1], atol=1e-4)
    assert result.trajectory[0].level == 0 and result.trajectory[-1].level == 1
    assert all(b.seconds >= a.seconds for a, b in itertools.pairwise(result.trajectory))


def test_cmaes_renders_each_generation_in_one_batched_call(cmaes_run):
    _result, counting, calls_at_step = cmaes_run
    level1 = [(s, n) for level, s, n in calls_at_step if level == 0]
    generations = len(level1) - 1  # step 0 scores the initial pose
    assert 1 <= generations <= FAST.generations
    # exactly one renderer call per generation, with the whole population in it
    for (_, a), (_, b) in itertools.pairwise(level1):
        assert b - a == 1
    assert counting.batches[: generations + 1] == [1] + [FAST.population] * generations
    # BOBYQA: one pose per evaluation, then the best and initial poses scored together
    n_local = sum(1 for level, _, _ in calls_at_step if level == 1)
    assert 1 <= n_local <= FAST.local_evaluations
    assert counting.batches[generations + 1 :] == [1] * n_local + [2]


def test_cmaes_is_reproducible(scene, cmaes_run):
    renderer, intr, _truth, target, init, _ = scene
    first, _, _ = cmaes_run
    again = register_cmaes(renderer, target[:1], intr, init[:1], FAST)
    assert torch.equal(again.pose, first.pose)
    assert torch.equal(again.poses, first.poses)
    short = CMAESConfig(population=8, generations=3, downsample=4, local="none")
    a = register_cmaes(renderer, target[:1], intr, init[:1], short)
    b = register_cmaes(renderer, target[:1], intr, init[:1], replace(short, seed=1))
    assert not torch.equal(a.poses[1:], b.poses[1:])


def test_cmaes_batches_by_looping_and_offers_a_cmaes_refinement(scene):
    renderer, intr, _truth, target, init, _ = scene
    counting = Counting(renderer)
    config = CMAESConfig(
        population=6,
        generations=2,
        downsample=4,
        local="cmaes",
        local_downsample=2,
        local_evaluations=8,
        local_population=4,
        parameterization="euler",
    )
    result = register_cmaes(counting, target, intr, init, config)
    assert result.pose.shape == (2, 4, 4) and result.loss.shape == result.initial_loss.shape == (2,)
    assert result.poses.shape[1:] == (2, 4, 4) and result.poses.shape[0] == len(result.trajectory)
    assert result.trajectory[0].loss.shape == (2,)
    assert result.diverged.shape == (2,)
    # per problem: initial, 2 generations of 6, level-2 start, 2 generations of 4, final scoring
    assert counting.batches == [1, 6, 6, 1, 4, 4, 2] * 2


def test_cmaes_never_returns_nan(scene):
    renderer, intr, _truth, target, init, _ = scene
    flaky = Counting(renderer, nan_every=2)  # every other call: half the population renders NaN
    config = CMAESConfig(population=8, generations=4, downsample=4, local_downsample=2, local_evaluations=10)
    result = register_cmaes(flaky, target[:1], intr, init[:1], config)
    assert bool(torch.isfinite(result.pose).all())
    assert bool(result.diverged.all())


def test_euler_gd_rotates_about_the_source_and_reduces_the_error(scene, monkeypatch):
    renderer, intr, truth, target, init, landmarks = scene
    pivots = []
    engine_register = baselines.register

    def spy(*args, **kwargs):
        pivots.append(kwargs["pivot_world"])
        assert args[4].parameterization == "euler" and args[4].search is None
        return engine_register(*args, **kwargs)

    monkeypatch.setattr(baselines, "register", spy)
    config = RegistrationConfig(scales=(Scale(16, 60, 2e-2, 2.0), Scale(32, 50, 5e-3, 0.5)))
    result = register_euler_gd(renderer, target, intr, init, config)
    # the two initial sources differ: one engine call per problem, each pivoting at its source
    assert len(pivots) == 2
    for b in range(2):
        assert torch.allclose(pivots[b], init[b, :3, 3])
    before = mtre(init, truth, landmarks)
    after = mtre(result.pose, truth, landmarks)
    assert bool((after < 0.8 * before).all()), (before, after)  # measured 10.9 → 5.8 mm, 10.6 → 6.7 mm
    assert result.pose.shape == (2, 4, 4) and bool(torch.isfinite(result.pose).all())
    assert result.poses.shape == (len(result.trajectory), 2, 4, 4)


def test_registry_methods_share_one_signature():
    assert set(METHODS) == {"diffpose", "diffpose-fine", "cmaes", "euler-gd", "none"}
    for method in METHODS.values():
        params = inspect.signature(method).parameters
        assert list(params)[:4] == ["renderer", "target", "intrinsics", "init_pose"]
        assert params["seed"].kind is inspect.Parameter.KEYWORD_ONLY and params["seed"].default == 0


def test_none_method_returns_the_initial_pose_scored(scene):
    renderer, intr, _truth, target, init, _ = scene
    result = METHODS["none"](renderer, target, intr, init)
    assert torch.equal(result.pose, init) and result.iterations == 0 and result.stop_reason == "none"
    expected = _loss_fn(RegistrationConfig().loss)(renderer(Camera(intr, init)), target)
    assert torch.allclose(result.loss, expected) and torch.equal(result.loss, result.initial_loss)
    with pytest.raises(InputError, match="target"):
        METHODS["none"](renderer, target[:, :10], intr, init)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"population": 1}, "population"),
        ({"sigma": (15.0, 15.0, 30.0, 50.0, 50.0)}, "sigma"),
        ({"sigma": (15.0, 15.0, -30.0, 50.0, 50.0, 100.0)}, "sigma"),
        ({"local_step": "big"}, "local_step"),
        ({"generations": 0}, "generations"),
        ({"downsample": 0}, "downsample"),
        ({"local": "newuoa"}, "local"),
        ({"local_bound": 0.5}, "local_bound"),
        ({"parameterization": "quaternion"}, "parameterization"),
        ({"seed": -1}, "seed"),
        ({"rel_tol": math.nan}, "rel_tol"),
    ],
)
def test_bad_config_raises_clear_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        CMAESConfig(**kwargs)


def test_bad_inputs_raise_clear_errors(scene):
    renderer, intr, _truth, target, init, _ = scene
    with pytest.raises(InputError, match="target"):
        register_cmaes(renderer, target[:, :10], intr, init, FAST)
    with pytest.raises(InputError, match="NaN"):
        register_cmaes(renderer, target * math.nan, intr, init, FAST)
    with pytest.raises(InputError, match="config"):
        register_cmaes(renderer, target, intr, init, RegistrationConfig())  # type: ignore[arg-type]
    with pytest.raises(InputError, match="config"):
        register_euler_gd(renderer, target, intr, init, FAST)  # type: ignore[arg-type]


def test_cmaes_survives_candidates_with_the_source_inside_the_ct():
    """A wide search puts some candidates' X-ray source inside the CT: they are infeasible, not an error."""
    from xraypose.errors import GeometryError
    from xraypose.registration import CMAESConfig, register_cmaes

    volume = load_default_ct(with_labels=False)
    renderer = VolumeRenderer(volume)
    centre = volume.center_world.float()
    intr = Intrinsics(sdd=1020.0, rows=128, cols=128, dy=2.4, dx=2.4)
    # the source 220 mm from the centre: depth moves of ±100 mm σ reach into the CT
    pose = carm_pose(0.0, 0.0, 0.0, source_to_isocenter=220.0, isocenter=centre)
    with torch.no_grad():
        target = renderer(Camera(intr, pose))
    config = CMAESConfig(generations=3, population=12, local="none")
    result = register_cmaes(renderer, target, intr, pose, config)
    assert bool(torch.isfinite(result.pose).all())
    with pytest.raises(GeometryError):  # the engine itself refuses such a pose outright
        inside = pose.clone()
        inside[:, :3, 3] = centre
        renderer(Camera(intr, inside))
