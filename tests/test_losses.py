"""Tests of xraypose.losses (image similarities, ImageLoss, pose errors) against hand values and numpy/scipy
reference implementations written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from xraypose import losses as L
from xraypose.errors import InputError
from xraypose.geometry.se3 import make_transform

F64 = torch.float64
DTYPES = [torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def _smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random image (blurred noise plus a blob), values roughly in [0, 1]."""
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.normal(size=(h, w)), 2.0, mode="nearest")
    yy, xx = np.mgrid[:h, :w]
    img += np.exp(-((yy - h / 2) ** 2 + (xx - w / 3) ** 2) / (2 * (h / 5) ** 2))
    return img


# --------------------------------------------------------------------------------------------------
# numpy references
# --------------------------------------------------------------------------------------------------


def np_ncc(a: np.ndarray, b: np.ndarray, w: np.ndarray | None = None, eps: float = 1e-8) -> float:
    """Weighted Pearson correlation of two arrays (0 for an empty weight or a constant array)."""
    a, b = a.ravel().astype(float), b.ravel().astype(float)
    w = np.ones_like(a) if w is None else w.ravel().astype(float)
    if w.sum() == 0:
        return 0.0
    w = w / w.sum()
    ma, mb = (w * a).sum(), (w * b).sum()
    va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
    if va <= eps * (va + ma**2) or vb <= eps * (vb + mb**2):
        return 0.0
    return float((w * (a - ma) * (b - mb)).sum() / math.sqrt(va * vb))


def np_patch_ncc(a, b, p, stride=None, w=None, min_coverage=0.5) -> float:
    """Mean NCC over patches at (i, j) = (k*stride, l*stride) that fit in the image, by explicit loops."""
    s = stride or p
    vals = []
    for i in range(0, a.shape[0] - p + 1, s):
        for j in range(0, a.shape[1] - p + 1, s):
            wp = None if w is None else w[i : i + p, j : j + p]
            if wp is not None and wp.mean() < min_coverage:
                continue
            vals.append(np_ncc(a[i : i + p, j : j + p], b[i : i + p, j : j + p], wp))
    return float(np.mean(vals)) if vals else 0.0


def np_ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5, L: float | None = None):
    """Wang et al. SSIM with a Gaussian window, over every window position inside the image (loops)."""
    r = window // 2
    t = np.arange(-r, r + 1)
    g = np.exp(-(t**2) / (2 * sigma**2))
    G = np.outer(g, g) / g.sum() ** 2
    L = b.max() - b.min() if L is None else L
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(r, a.shape[0] - r):
        for j in range(r, a.shape[1] - r):
            pa, pb = a[i - r : i + r + 1, j - r : j + r + 1], b[i - r : i + r + 1, j - r : j + r + 1]
            ma, mb = (G * pa).sum(), (G * pb).sum()
            va, vb = (G * pa * pa).sum() - ma**2, (G * pb * pb).sum() - mb**2
            cab = (G * pa * pb).sum() - ma * mb
            vals.append(((2 * ma * mb + c1) * (2 * cab + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def np_parzen_mi(a: np.ndarray, b: np.ndarray, bins: int, sigma: float) -> float:
    """MI as KL(P || px py) of the Parzen joint histogram (Gaussian kernel normalised per pixel)."""
    centres = np.linspace(0, 1, bins)

    def soft(v):
        v = v.ravel()
        v = (v - v.min()) / (v.max() - v.min())
        logit = -((v[:, None] - centres) ** 2) / (2 * sigma**2)
        e = np.exp(logit - logit.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    A, B = soft(a), soft(b)
    P = A.T @ B / A.shape[0]
    Q = np.outer(P.sum(1), P.sum(0))
    nz = P > 0
    return float((P[nz] * np.log(P[nz] / Q[nz])).sum())


# --------------------------------------------------------------------------------------------------
# NCC
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ncc_affine_relation_is_plus_or_minus_one(dtype: torch.dtype, device: str) -> None:
    x = _rand(3, 9, 11, dtype=dtype).to(device)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(
        L.ncc(x, 3.0 * x + 2.0), torch.ones(3, dtype=dtype, device=device), atol=tol, rtol=0
    )
    torch.testing.assert_close(
        L.ncc(x, -0.25 * x + 7.0), -torch.ones(3, dtype=dtype, device=device), atol=tol, rtol=0
    )
    # (B, 1, H, W) is accepted and gives the same values.
    y = _rand(3, 9, 11, seed=1, dtype=dtype).to(device)
    torch.testing.assert_close(L.ncc(x[:, None], y[:, None]), L.ncc(x, y))


def test_ncc_hand_computed_2x3() -> None:
    x = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]], dtype=F64)
    y = torch.tensor([[[1.0, 3.0, 2.0], [6.0, 4.0, 5.0]]], dtype=F64)
    # Means 3.5; sum dx*dy = 13.5, sum dx^2 = sum dy^2 = 17.5  ->  27/35.
    torch.testing.assert_close(L.ncc(x, y), torch.tensor([27.0 / 35.0], dtype=F64))


def test_ncc_mask_restricts_statistics() -> None:
    x, y = _rand(2, 8, 10, seed=2), _rand(2, 8, 10, seed=3)
    mask = _rand(2, 8, 10, seed=4) > 0.4
    ref = [np_ncc(x[b].numpy()[mask[b].numpy()], y[b].numpy()[mask[b].numpy()]) for b in range(2)]
    torch.testing.assert_close(L.ncc(x, y, mask), torch.tensor(ref, dtype=F64))
    # Changing masked-out pixels changes nothing.
    x2 = torch.where(mask, x, 100.0 * _rand(2, 8, 10, seed=5))
    torch.testing.assert_close(L.ncc(x2, y, mask), L.ncc(x, y, mask))
    # Float weights: weighted moments.
    wts = _rand(2, 8, 10, seed=6)
    ref = [np_ncc(x[b].numpy(), y[b].numpy(), wts[b].numpy()) for b in range(2)]
    torch.testing.assert_close(L.ncc(x, y, wts), torch.tensor(ref, dtype=F64))
    # A broadcast (H, W) mask equals the expanded one.
    torch.testing.assert_close(L.ncc(x, y, mask[0]), L.ncc(x, y, mask[0].expand(2, -1, -1)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ncc_degenerate_inputs_give_zero_and_finite_gradients(dtype: torch.dtype) -> None:
    y = _rand(2, 6, 7, dtype=dtype)
    for const in (0.0, 1234.5):
        x = torch.full((2, 6, 7), const, dtype=dtype, requires_grad=True)
        v = L.ncc(x, y)
        v.sum().backward()
        assert torch.equal(v.detach(), torch.zeros(2, dtype=dtype))
        assert torch.isfinite(x.grad).all()
    x = _rand(2, 6, 7, seed=1, dtype=dtype).requires_grad_()
    v = L.ncc(x, y, torch.zeros(2, 6, 7, dtype=torch.bool))
    v.sum().backward()
    assert torch.equal(v.detach(), torch.zeros(2, dtype=dtype))
    assert torch.isfinite(x.grad).all()


def test_ncc_batch_items_are_independent() -> None:
    x, y = _rand(3, 7, 9, seed=7), _rand(3, 7, 9, seed=8)
    full = L.ncc(x, y)
    for b in range(3):
        torch.testing.assert_close(full[b : b + 1], L.ncc(x[b : b + 1], y[b : b + 1]))
    x2 = x.clone()
    x2[1] = 5.0 * _rand(7, 9, seed=9)
    out = L.ncc(x2, y)
    torch.testing.assert_close(out[[0, 2]], full[[0, 2]])


def test_ncc_rejects_bad_inputs() -> None:
    x = _rand(2, 5, 5)
    with pytest.raises(InputError, match="same shape"):
        L.ncc(x, _rand(2, 5, 6))
    with pytest.raises(InputError, match="dtype"):
        L.ncc(x, x.float())
    with pytest.raises(InputError, match=r"\(B, H, W\)"):
        L.ncc(x[0], x[0])
    with pytest.raises(InputError, match="mask"):
        L.ncc(x, x, torch.ones(3, 5, 5))


# --------------------------------------------------------------------------------------------------
# Patch and multiscale NCC
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("p", "stride"), [(5, None), (4, 3), (6, 1)])
def test_patch_ncc_matches_explicit_loops(p: int, stride: int | None) -> None:
    x, y = _rand(2, 17, 23, seed=10), _rand(2, 17, 23, seed=11)
    y = y + 0.7 * x  # correlated, so patch values differ from 0
    ref = [np_patch_ncc(x[b].numpy(), y[b].numpy(), p, stride) for b in range(2)]
    torch.testing.assert_close(L.patch_ncc(x, y, p, stride=stride), torch.tensor(ref, dtype=F64))


def test_patch_ncc_with_mask_excludes_poorly_covered_patches() -> None:
    x, y = _rand(2, 16, 21, seed=12), _rand(2, 16, 21, seed=13) + 0.5 * _rand(2, 16, 21, seed=12)
    mask = torch.zeros(2, 16, 21, dtype=torch.bool)
    mask[0, 2:14, 3:12] = True
    mask[1] = _rand(16, 21, seed=14) > 0.3
    for cov in (0.25, 0.5, 0.9):
        ref = [
            np_patch_ncc(x[b].numpy(), y[b].numpy(), 4, None, mask[b].numpy().astype(float), cov)
            for b in range(2)
        ]
        torch.testing.assert_close(L.patch_ncc(x, y, 4, mask, min_coverage=cov), torch.tensor(ref, dtype=F64))
    # Masked-out pixel values do not matter.
    x2 = torch.where(mask, x, -50.0)
    torch.testing.assert_close(L.patch_ncc(x2, y, 4, mask), L.patch_ncc(x, y, 4, mask))
    # No patch covered enough -> 0, with finite gradients.
    sparse = torch.zeros(2, 16, 21, dtype=torch.bool)
    sparse[:, ::5, ::5] = True
    xg = x.clone().requires_grad_()
    v = L.patch_ncc(xg, y, 4, sparse)
    v.sum().backward()
    assert torch.equal(v.detach(), torch.zeros(2, dtype=F64))
    assert torch.isfinite(xg.grad).all()


def test_patch_ncc_whole_image_patch_equals_ncc_and_rejects_bad_sizes() -> None:
    x, y = _rand(2, 12, 12, seed=15), _rand(2, 12, 12, seed=16)
    torch.testing.assert_close(L.patch_ncc(x, y, 12), L.ncc(x, y))
    with pytest.raises(InputError, match="patch_size"):
        L.patch_ncc(x, y, 13)
    with pytest.raises(InputError, match="patch_size"):
        L.patch_ncc(x, y, 1)
    with pytest.raises(InputError, match="stride"):
        L.patch_ncc(x, y, 4, stride=0)


def test_multiscale_ncc_is_weighted_sum_of_scales() -> None:
    x, y = _rand(2, 20, 26, seed=17), _rand(2, 20, 26, seed=18) + 0.4 * _rand(2, 20, 26, seed=17)
    ref = [
        0.5 * np_ncc(x[b].numpy(), y[b].numpy()) + 0.5 * np_patch_ncc(x[b].numpy(), y[b].numpy(), 13)
        for b in range(2)
    ]
    torch.testing.assert_close(L.multiscale_ncc(x, y), torch.tensor(ref, dtype=F64))
    got = L.multiscale_ncc(x, y, (None, 5, 7), (0.2, 0.3, 1.5))
    want = 0.2 * L.ncc(x, y) + 0.3 * L.patch_ncc(x, y, 5) + 1.5 * L.patch_ncc(x, y, 7)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(L.multiscale_ncc(x, y, (None,), (1.0,)), L.ncc(x, y))
    mask = _rand(2, 20, 26, seed=19) > 0.2
    got = L.multiscale_ncc(x, y, (None, 5), (0.5, 0.5), mask, stride=2)
    torch.testing.assert_close(got, 0.5 * L.ncc(x, y, mask) + 0.5 * L.patch_ncc(x, y, 5, mask, stride=2))
    with pytest.raises(InputError, match="equal length"):
        L.multiscale_ncc(x, y, (None, 5), (1.0,))


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [None, 1.0])
def test_sobel_of_linear_ramp_is_constant(sigma: float | None) -> None:
    rows, cols = torch.meshgrid(torch.arange(20, dtype=F64), torch.arange(24, dtype=F64), indexing="ij")
    x = (2.0 * cols - 3.0 * rows + 1.0)[None]
    g = L.image_gradients(x, sigma)
    assert g.shape == (1, 2, 20, 24)
    r = 1 + (0 if sigma is None else 3)
    inner = g[..., r:-r, r:-r]
    torch.testing.assert_close(inner[0, 0], torch.full_like(inner[0, 0], 2.0))
    torch.testing.assert_close(inner[0, 1], torch.full_like(inner[0, 1], -3.0))


@pytest.mark.parametrize("sigma", [None, 1.0, 2.0])
def test_image_gradients_match_scipy(sigma: float | None) -> None:
    a = _smooth_image(15, 19, seed=1)
    s = a if sigma is None else ndimage.gaussian_filter(a, sigma, mode="nearest", truncate=3.0)
    ref = np.stack([ndimage.sobel(s, axis=1, mode="nearest"), ndimage.sobel(s, axis=0, mode="nearest")]) / 8
    got = L.image_gradients(torch.tensor(a)[None, None], sigma)[0]
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-12)


def test_gradient_ncc_invariances_and_reference() -> None:
    a, b = _smooth_image(24, 28, seed=2), _smooth_image(24, 28, seed=3)
    x, y = torch.tensor(np.stack([a, b])), torch.tensor(np.stack([b + 0.5 * a, a]))
    for sigma in (None, 1.0):
        v = L.gradient_ncc(x, y, sigma=sigma)
        torch.testing.assert_close(L.gradient_ncc(x + 17.0, y, sigma=sigma), v)
        torch.testing.assert_close(L.gradient_ncc(3.5 * x, y, sigma=sigma), v)
        torch.testing.assert_close(L.gradient_ncc(y, x, sigma=sigma), v)
    # Independent value: mean of the NCCs of scipy's Sobel images.
    ref = []
    for b_ in range(2):
        gx = [ndimage.sobel(x[b_].numpy(), axis=k, mode="nearest") for k in (1, 0)]
        gy = [ndimage.sobel(y[b_].numpy(), axis=k, mode="nearest") for k in (1, 0)]
        ref.append(0.5 * (np_ncc(gx[0], gy[0]) + np_ncc(gx[1], gy[1])))
    torch.testing.assert_close(L.gradient_ncc(x, y), torch.tensor(ref, dtype=F64))
    torch.testing.assert_close(L.gradient_correlation(x, y), L.gradient_ncc(x, y, sigma=None))
    torch.testing.assert_close(L.gradient_ncc(x, x), torch.ones(2, dtype=F64))


def test_gradient_smoothing_reduces_noise_response() -> None:
    noise = torch.randn(1, 48, 48, generator=torch.Generator().manual_seed(0), dtype=F64)
    raw = L.image_gradients(noise).std()
    smooth = L.image_gradients(noise, sigma=1.5).std()
    assert smooth < 0.3 * raw
    clean = torch.tensor(_smooth_image(48, 48, seed=4))[None]
    noisy = clean + 0.05 * noise
    assert L.gradient_ncc(noisy, clean, sigma=1.5) > L.gradient_ncc(noisy, clean) + 0.05


def test_gradient_ncc_mask_is_eroded_and_patch_version_matches_loops() -> None:
    a, b = _smooth_image(20, 22, seed=5), _smooth_image(20, 22, seed=6)
    x, y = torch.tensor(a)[None], torch.tensor(b + a)[None]
    mask = torch.zeros(1, 20, 22, dtype=torch.bool)
    mask[0, 3:17, 4:19] = True
    for sigma in (None, 1.0):
        v = L.gradient_ncc(x, y, mask, sigma)
        x2 = torch.where(mask, x, 10.0 * torch.rand(1, 20, 22, dtype=F64))
        torch.testing.assert_close(L.gradient_ncc(x2, y, mask, sigma), v)
        torch.testing.assert_close(
            L.patch_gradient_ncc(x2, y, 5, mask, sigma), L.patch_gradient_ncc(x, y, 5, mask, sigma)
        )
    # Without a mask: mean of the loop reference over both gradient images.
    gx, gy = L.image_gradients(x)[0].numpy(), L.image_gradients(y)[0].numpy()
    ref = 0.5 * (np_patch_ncc(gx[0], gy[0], 5, 2) + np_patch_ncc(gx[1], gy[1], 5, 2))
    torch.testing.assert_close(L.patch_gradient_ncc(x, y, 5, stride=2), torch.tensor([ref], dtype=F64))


# --------------------------------------------------------------------------------------------------
# Mutual information
# --------------------------------------------------------------------------------------------------


def test_mi_of_image_with_itself_is_its_entropy() -> None:
    rng = np.random.default_rng(0)
    levels = rng.choice(8, size=(1, 20, 20), p=[0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05])
    levels[0, 0, :8] = np.arange(8)  # every level present: rescaling maps level k to bin centre k/7
    p = np.bincount(levels.ravel(), minlength=8) / levels.size
    entropy = -(p * np.log(p)).sum()
    x = torch.tensor(levels, dtype=F64)
    mi = L.mutual_information(x, x, bins=8, sigma=0.05 / 7)
    torch.testing.assert_close(mi, torch.tensor([entropy], dtype=F64), atol=1e-9, rtol=0)
    nmi = L.mutual_information(x, x, bins=8, sigma=0.05 / 7, normalized=True)
    torch.testing.assert_close(nmi, torch.tensor([2.0], dtype=F64), atol=1e-9, rtol=0)
    # Affine intensity changes do not matter (per-image rescaling).
    torch.testing.assert_close(L.mutual_information(3.0 * x - 1.0, x, bins=8, sigma=0.05 / 7), mi)


def test_mi_matches_reference_and_orders_dependence() -> None:
    a = _smooth_image(24, 24, seed=7)
    noise = np.random.default_rng(1).random((24, 24))
    x = torch.tensor(np.stack([a, a]))
    y = torch.tensor(np.stack([a**2 + 0.05 * noise, noise]))
    got = L.mutual_information(x, y, bins=16)
    ref = [np_parzen_mi(x[b].numpy(), y[b].numpy(), 16, 0.5 / 15) for b in range(2)]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64))
    assert got[0] > 2 * got[1] > 0
    torch.testing.assert_close(L.mutual_information(y, x, bins=16), got)  # symmetric
    nmi = L.mutual_information(x, y, bins=16, normalized=True)
    assert bool(((nmi >= 1.0) & (nmi <= 2.0)).all()) and nmi[0] > nmi[1]
    self_mi = L.mutual_information(x, x, bins=16)
    assert bool((self_mi > got).all())


def test_mi_degenerate_and_mask() -> None:
    x, y = _rand(2, 10, 12, seed=20), _rand(2, 10, 12, seed=21)
    c = torch.full((2, 10, 12), 3.0, dtype=F64, requires_grad=True)
    v = L.mutual_information(c, y)
    v.sum().backward()
    torch.testing.assert_close(v.detach(), torch.zeros(2, dtype=F64), atol=1e-12, rtol=0)
    assert torch.isfinite(c.grad).all()
    mask = _rand(2, 10, 12, seed=22) > 0.3
    v = L.mutual_information(x, y, mask=mask)
    x2 = torch.where(mask, x, 1e3)
    torch.testing.assert_close(L.mutual_information(x2, y, mask=mask), v)
    ref = [
        np_parzen_mi(x[b].numpy()[mask[b].numpy()], y[b].numpy()[mask[b].numpy()], 32, 0.5 / 31)
        for b in range(2)
    ]
    torch.testing.assert_close(v, torch.tensor(ref, dtype=F64))
    xg = x.clone().requires_grad_()
    v = L.mutual_information(xg, y, mask=torch.zeros(2, 10, 12, dtype=torch.bool))
    v.sum().backward()
    assert torch.equal(v.detach(), torch.zeros(2, dtype=F64)) and torch.isfinite(xg.grad).all()
    with pytest.raises(InputError, match="bins"):
        L.mutual_information(x, y, bins=1)


# --------------------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------------------


def test_ssim_identity_noise_and_reference() -> None:
    a = _smooth_image(19, 21, seed=8)
    x = torch.tensor(a)[None]
    torch.testing.assert_close(L.ssim(x, x), torch.ones(1, dtype=F64))
    rng = np.random.default_rng(2)
    noise = rng.normal(size=a.shape)
    values = [float(L.ssim(x + s * torch.tensor(noise)[None], x)) for s in (0.02, 0.1, 0.3)]
    assert values[0] > values[1] > values[2]
    b = a + 0.1 * noise
    for window, sigma, L_ in ((11, 1.5, None), (7, 1.0, None), (5, 2.0, 4.0)):
        ref = np_ssim(b, a, window, sigma, L_)
        got = L.ssim(torch.tensor(b)[None], x, window, sigma, data_range=L_)
        np.testing.assert_allclose(got.numpy(), [ref], atol=1e-5)
        assert abs(float(got) - ref) < 1e-12


def test_ssim_float32_mask_and_errors() -> None:
    a, b = _smooth_image(16, 16, seed=9), _smooth_image(16, 16, seed=10)
    got = L.ssim(torch.tensor(b, dtype=torch.float32)[None], torch.tensor(a, dtype=torch.float32)[None], 7)
    np.testing.assert_allclose(got.numpy(), [np_ssim(b, a, 7)], atol=1e-5)
    x, y = torch.tensor(np.stack([a, b])), torch.tensor(np.stack([b, a]))
    mask = torch.ones(2, 16, 16, dtype=torch.bool)
    torch.testing.assert_close(L.ssim(x, y, 7, mask=mask), L.ssim(x, y, 7))
    mask[:, :, 12:] = False
    x2 = torch.where(mask, x, 9.0)
    torch.testing.assert_close(L.ssim(x2, y, 7, mask=mask), L.ssim(x, y, 7, mask=mask))
    with pytest.raises(InputError, match="odd"):
        L.ssim(x, y, 6)
    with pytest.raises(InputError, match="window"):
        L.ssim(x, y, 17)
    with pytest.raises(InputError, match="data_range"):
        L.ssim(x, y, 7, data_range=torch.ones(3, dtype=F64))
    torch.testing.assert_close(
        L.ssim(x, y, 7, data_range=torch.tensor([2.0, 3.0], dtype=F64))[1],
        L.ssim(x[1:], y[1:], 7, data_range=3.0)[0],
    )


# --------------------------------------------------------------------------------------------------
# Sparse rendering support
# --------------------------------------------------------------------------------------------------


def test_scatter_pixels_and_masked_ncc_equal_the_subset() -> None:
    dense_x, dense_y = _rand(2, 6, 8, seed=23), _rand(2, 6, 8, seed=24) + 0.3 * _rand(2, 6, 8, seed=23)
    pixels = torch.tensor([0, 3, 9, 10, 17, 25, 30, 41, 47])
    vx = dense_x.flatten(1)[:, pixels].requires_grad_()
    img, mask = L.scatter_pixels(vx, pixels, (6, 8))
    assert img.shape == mask.shape == (2, 6, 8) and int(mask.sum()) == 2 * len(pixels)
    assert torch.equal(img.flatten(1)[:, pixels], vx.detach())
    y_sub = dense_y.flatten(1)[:, pixels]
    got = L.ncc(img, dense_y, mask)
    ref = [np_ncc(vx[b].detach().numpy(), y_sub[b].numpy()) for b in range(2)]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64))
    got.sum().backward()
    assert torch.isfinite(vx.grad).all() and bool((vx.grad != 0).any())


# --------------------------------------------------------------------------------------------------
# ImageLoss
# --------------------------------------------------------------------------------------------------


def test_image_loss_parse_grammar_and_round_trip() -> None:
    loss = L.ImageLoss.parse(" 0.5 * ncc + 0.25*pncc:13,stride=2 + mi:16,normalized=true + 1e+0*gncc:1.5")
    assert [(t.name, t.weight, t.kwargs) for t in loss.terms] == [
        ("ncc", 0.5, {}),
        ("pncc", 0.25, {"patch_size": 13, "stride": 2}),
        ("mi", 1.0, {"bins": 16, "normalized": True}),
        ("gncc", 1.0, {"sigma": 1.5}),
    ]
    assert L.ImageLoss.parse(loss.spec) == loss
    assert L.ImageLoss(loss.spec) == loss
    tup = L.ImageLoss.parse("mncc:patch_sizes=none/9/13,weights=0.25/0.25/0.5")
    assert tup.terms[0].kwargs == {"patch_sizes": (None, 9, 13), "weights": (0.25, 0.25, 0.5)}
    assert L.ImageLoss.parse(tup.spec) == tup
    listed = L.ImageLoss([("mncc", 0.5, {}), ("pgncc", 0.5, {"patch_size": 11}), ("ncc", 2)])
    assert listed == L.ImageLoss("0.5*mncc+0.5*pgncc:11+2*ncc")
    assert "pgncc:11" in repr(listed)
    assert L.ImageLoss.diffpose() == L.ImageLoss(L.DIFFPOSE_LOSS)
    assert L.ImageLoss.xvr().spec == "0.5*mncc:9,stride=1+0.5*pgncc:11,stride=1"
    assert set(L.LOSS_TERMS) == {"ncc", "mncc", "pncc", "gncc", "pgncc", "mi", "ssim", "pwls"}


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "empty"),
        ("foo", "unknown term name 'foo'"),
        ("0.5*ncc+0.5*nccc", "unknown term name 'nccc'"),
        ("ncc++ncc", "cannot read term"),
        ("abc*ncc", "not a number"),
        ("-1*ncc", "positive"),
        ("0*ncc", "positive"),
        ("inf*ncc", "positive"),
        ("ncc:3", "positional"),
        ("pncc:3,4", "positional"),
        ("pncc", "needs parameter"),
        ("pncc:13,foo=1", "unknown parameter"),
        ("pncc:13,patch_size=4", "twice"),
        ("pncc:x3", "cannot read value"),
        ("mncc:9,patch_sizes=none/9", "not both"),
    ],
)
def test_image_loss_parse_errors_name_spec_and_allowed_names(spec: str, match: str) -> None:
    with pytest.raises(InputError, match=match) as err:
        L.ImageLoss.parse(spec)
    assert repr(spec) in str(err.value)
    if "name" in match or "cannot read term" in match:
        assert "ncc, mncc, pncc, gncc, pgncc, mi, ssim" in str(err.value)


@pytest.mark.parametrize(
    ("terms", "match"),
    [
        ([], "at least one"),
        ([("nope", 1.0)], "unknown name 'nope'.*allowed names: ncc"),
        ([("ncc", -1.0)], "positive"),
        ([("ncc", float("nan"))], "positive"),
        ([("ncc", True)], "positive"),
        ([("ncc", 1.0, {"bad": 1})], "unknown parameter"),
        ([("ncc",)], "LossTerm or a"),
        (["ncc"], "LossTerm or a"),
    ],
)
def test_image_loss_list_errors(terms: list, match: str) -> None:
    with pytest.raises(InputError, match=match):
        L.ImageLoss(terms)


def test_image_loss_value_is_weighted_sum_of_terms() -> None:
    x, y = _rand(2, 16, 18, seed=25), _rand(2, 16, 18, seed=26) + 0.5 * _rand(2, 16, 18, seed=25)
    mask = _rand(2, 16, 18, seed=27) > 0.1
    loss = L.ImageLoss("0.5*ncc+0.25*pncc:5+2*mi:16+0.1*ssim:7+0.3*pgncc:4,sigma=1+0.2*gncc+0.4*mncc")
    want = (
        0.5 * (1 - L.ncc(x, y, mask))
        + 0.25 * (1 - L.patch_ncc(x, y, 5, mask))
        - 2 * L.mutual_information(x, y, 16, mask)
        + 0.1 * (1 - L.ssim(x, y, 7, mask=mask))
        + 0.3 * (1 - L.patch_gradient_ncc(x, y, 4, mask, 1.0))
        + 0.2 * (1 - L.gradient_ncc(x, y, mask))
        + 0.4 * (1 - L.multiscale_ncc(x, y, mask=mask))
    )
    torch.testing.assert_close(loss(x, y, mask), want)
    parts = loss.components(x, y, mask)
    assert list(parts) == ["ncc", "pncc:5", "mi:16", "ssim:7", "pgncc:4,sigma=1", "gncc", "mncc"]
    torch.testing.assert_close(
        sum(t.weight * v for t, v in zip(loss.terms, parts.values(), strict=True)), want
    )
    # The presets: DiffPose's is 1 - mNCC; xvr's is 0.5 (1 - mNCC[None, 9]) + 0.5 (1 - patch gNCC 11).
    xs, ys = _rand(1, 24, 24, seed=28), _rand(1, 24, 24, seed=29)
    torch.testing.assert_close(L.ImageLoss.diffpose()(xs, ys), 1 - L.multiscale_ncc(xs, ys, stride=1))
    want_xvr = 0.5 * (1 - L.multiscale_ncc(xs, ys, (None, 9), stride=1)) + 0.5 * (
        1 - L.patch_gradient_ncc(xs, ys, 11, stride=1)
    )
    torch.testing.assert_close(L.ImageLoss.xvr()(xs, ys), want_xvr)


@pytest.mark.parametrize(
    "spec", ["ncc", "pncc:3", "gncc", "gncc:0.8", "pgncc:3", "mi:8", "ssim:5", "0.5*mncc:3+0.5*mi:6"]
)
def test_image_loss_gradcheck(spec: str) -> None:
    x, y = _rand(1, 7, 8, seed=30), _rand(1, 7, 8, seed=31) + 0.5 * _rand(1, 7, 8, seed=30)
    loss = L.ImageLoss(spec)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x.requires_grad_(),))


def test_gradcheck_with_mask() -> None:
    x, y = _rand(2, 6, 7, seed=32), _rand(2, 6, 7, seed=33)
    wts = _rand(2, 6, 7, seed=34)
    for fn in (
        lambda t: L.ncc(t, y, wts),
        lambda t: L.patch_ncc(t, y, 3, wts, min_coverage=0.1),
        lambda t: L.mutual_information(t, y, 8, wts > 0.3),
    ):
        assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(),))


# --------------------------------------------------------------------------------------------------
# Pose errors
# --------------------------------------------------------------------------------------------------


def _pose(rotvec_deg: list[float], t: list[float]) -> torch.Tensor:
    R = torch.tensor(Rotation.from_rotvec(rotvec_deg, degrees=True).as_matrix())
    return make_transform(R, torch.tensor(t, dtype=F64))


def test_rotation_and_translation_errors() -> None:
    A = _pose([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    B = torch.stack([_pose([10.0, 0.0, 0.0], [4.0, 6.0, 3.0]), _pose([0.0, 0.0, -135.0], [1.0, 2.0, 3.0])])
    torch.testing.assert_close(L.rotation_error_deg(B, A), torch.tensor([10.0, 135.0], dtype=F64))
    torch.testing.assert_close(
        L.rotation_error_deg(B[:, :3, :3], A[:3, :3]), torch.tensor([10.0, 135.0], dtype=F64)
    )
    # A rotation composed with a further 25° about its own y axis is 25° away.
    Ry = torch.tensor(Rotation.from_euler("y", 25, degrees=True).as_matrix())
    torch.testing.assert_close(
        L.rotation_error_deg(B[0, :3, :3] @ Ry, B[0, :3, :3]), torch.tensor(25.0, dtype=F64)
    )
    torch.testing.assert_close(L.translation_error_mm(B, A), torch.tensor([5.0, 0.0], dtype=F64))
    t = torch.tensor([[3.0, 4.0, 12.0], [0.0, 0.0, 0.0]], dtype=F64, requires_grad=True)
    d = L.translation_error_mm(t, torch.zeros(3, dtype=F64))
    torch.testing.assert_close(d.detach(), torch.tensor([13.0, 0.0], dtype=F64))
    d.sum().backward()
    assert torch.isfinite(t.grad).all() and torch.equal(t.grad[1], torch.zeros(3, dtype=F64))
    with pytest.raises(InputError, match="both"):
        L.translation_error_mm(t, A)
    with pytest.raises(InputError, match="rotations"):
        L.rotation_error_deg(torch.eye(2, dtype=F64), torch.eye(2, dtype=F64))


def test_double_geodesic_on_known_pose_pair() -> None:
    A = _pose([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    B = _pose([90.0, 0.0, 0.0], [3.0, 4.0, 0.0])
    r = 510.0
    want = math.hypot(r * math.pi / 2, 5.0)
    torch.testing.assert_close(L.double_geodesic(B[None], A[None], r), torch.tensor([want], dtype=F64))
    assert L.double_geodesic is not L.double_geodesic_distance  # thin wrapper, same values
    torch.testing.assert_close(L.double_geodesic(B, A, r), L.double_geodesic_distance(B, A, radius=r))
    with pytest.raises(InputError, match="radius"):
        L.double_geodesic(B, A, -1.0)


def test_non_finite_images_give_nan_not_a_score():
    """NaN or inf in an image is an error upstream (e.g. a diverged pose), not a constant image: NCC-type
    similarities return NaN so that a caller's guard sees it."""
    x = torch.rand(2, 16, 16, dtype=torch.float64)
    y = torch.rand(2, 16, 16, dtype=torch.float64)
    bad = x.clone()
    bad[0, 3, 4] = float("nan")
    for fn in (L.ncc, lambda a, b: L.patch_ncc(a, b, 4), L.gradient_ncc):
        out = fn(bad, y)
        assert bool(torch.isnan(out[0])) and bool(torch.isfinite(out[1]))


def test_quantum_noise_weights_follow_the_poisson_inverse_variance() -> None:
    quantum_noise_weights = L.quantum_noise_weights

    # two flat regions, the second attenuating ln 4 more: a quarter of the quanta, a quarter of the weight
    p = torch.full((1, 6, 8), 2.0, dtype=torch.float64)
    p[:, :, 4:] += math.log(4.0)
    w = quantum_noise_weights(p, smooth_px=1)
    assert w.shape == (1, 6, 8) and w.dtype == torch.float64
    assert torch.allclose(w[..., :4], torch.ones(1, 6, 4, dtype=torch.float64))
    assert torch.allclose(w[..., 4:], torch.full((1, 6, 4), 0.25, dtype=torch.float64))
    # an offset of p does not change them; gamma scales the exponent; (H, W) input is one image
    assert torch.allclose(quantum_noise_weights(p + 7.0, smooth_px=1), w)
    assert torch.allclose(
        quantum_noise_weights(p, gamma=0.5, smooth_px=1)[..., 4:], torch.tensor(0.5).double()
    )
    assert torch.allclose(quantum_noise_weights(p[0], smooth_px=1), w)
    # smoothing: a single noisy pixel barely moves its weight; without smoothing it would follow it fully
    noisy = torch.zeros(1, 9, 9)
    noisy[0, 4, 4] = 5.0
    smoothed = quantum_noise_weights(noisy, smooth_px=5)
    assert float(smoothed[0, 4, 4]) == pytest.approx(math.exp(-5.0 / 25.0), rel=1e-5)
    assert float(quantum_noise_weights(noisy, smooth_px=1)[0, 4, 4]) == pytest.approx(
        math.exp(-5.0), rel=1e-5
    )
    # a weighted NCC ignores what happens where the weight vanishes
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    y = x.clone()
    y[..., 4:] = torch.randn(1, 6, 4, dtype=torch.float64)
    far = quantum_noise_weights(p * 20.0, smooth_px=1)
    assert float(L.ncc(x, y, mask=far)) > 0.999 and float(L.ncc(x, y)) < 0.99
    for bad in ({"gamma": 0.0}, {"gamma": float("nan")}, {"smooth_px": 4}, {"smooth_px": 0}):
        with pytest.raises(InputError, match="quantum_noise_weights"):
            quantum_noise_weights(p, **bad)
    with pytest.raises(InputError, match="target"):
        quantum_noise_weights(torch.ones(4, dtype=torch.int64))


def _mirror_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with edge-not-repeated reflection (SciPy's 'mirror'), truncated at 4 sigma."""
    return ndimage.gaussian_filter(image, sigma, mode="mirror", truncate=4.0)


def test_poisson_wls_matches_a_hand_computed_weighted_fit() -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(0.2, 2.5, (1, 5, 6))
    y = x + rng.normal(0, 0.05, x.shape)
    # no scatter term: t ≈ a P, weights 1/t (no smoothing); the explained fraction of the weighted variance
    p, t = np.exp(-x).ravel(), np.exp(-y).ravel()
    w = 1.0 / t
    a = (w * p * t).sum() / (w * p * p).sum()
    mean = (w * t).sum() / w.sum()
    expected = 1 - (w * (t - a * p) ** 2).sum() / (w * (t - mean) ** 2).sum()
    got = L.poisson_wls(torch.from_numpy(x), torch.from_numpy(y), sigmas=None, smooth_px=1)
    assert got.shape == (1,) and float(got[0]) == pytest.approx(expected, rel=1e-10)
    # the registry term is 1 - that
    loss = L.ImageLoss("pwls:sigmas=none,smooth_px=1")(torch.from_numpy(x), torch.from_numpy(y))
    assert float(loss[0]) == pytest.approx(1 - expected, rel=1e-10)
    # a mask multiplies the weights: pixels with zero weight do not count, whatever they hold
    mask = torch.ones(1, 5, 6, dtype=torch.float64)
    mask[:, :, 3:] = 0
    wild = torch.from_numpy(y.copy())
    wild[:, :, 3:] = 7.0
    assert torch.allclose(
        L.poisson_wls(torch.from_numpy(x), wild, mask=mask, sigmas=None, smooth_px=1),
        L.poisson_wls(torch.from_numpy(x[:, :, :3]), torch.from_numpy(y[:, :, :3]), sigmas=None, smooth_px=1),
    )


def test_poisson_wls_fits_gain_and_kernel_scatter_and_finds_the_kernel_width() -> None:
    rng = np.random.default_rng(4)
    x = ndimage.uniform_filter(rng.uniform(0, 4, (96, 96)), 7)[None]
    primary = np.exp(-x[0])
    for frac in (0.05, 0.15):
        # the X-ray: gain 0.8, scatter 0.3 × the primary blurred by sigma = frac × rows, made with SciPy
        t = 0.8 * primary + 0.3 * _mirror_blur(primary, frac * 96)
        y = torch.from_numpy(-np.log(t))[None]
        # (the kernel is evaluated on a coarse grid, so the fit is not exact: ~1e-4 of the variance is left)
        searched = 1 - float(L.poisson_wls(torch.from_numpy(x), y)[0])
        known = 1 - float(L.poisson_wls(torch.from_numpy(x), y, sigmas=(frac,))[0])
        assert searched < 2e-4 and known < 2e-4
        # a width 1.5 times too large, a very wrong one or no scatter term leave more unexplained
        for wrong in ((1.5 * frac,), (0.5 if frac < 0.1 else 0.02,), None):
            left = 1 - float(L.poisson_wls(torch.from_numpy(x), y, sigmas=wrong)[0])
            assert left > 4e-4 and left > 4 * searched, (wrong, left)
        # a detector gain (an offset of -ln) changes nothing
        assert torch.allclose(
            L.poisson_wls(torch.from_numpy(x), y + 0.7), L.poisson_wls(torch.from_numpy(x), y)
        )
    # a misaligned DRR explains less
    shifted = torch.from_numpy(np.roll(x, 3, axis=-1))
    t = torch.from_numpy(-np.log(0.8 * primary + 0.3 * _mirror_blur(primary, 0.1 * 96)))[None]
    assert float(L.poisson_wls(shifted, t)[0]) < float(L.poisson_wls(torch.from_numpy(x), t)[0]) - 0.01


def test_poisson_wls_gradients() -> None:
    torch.manual_seed(0)
    x = (torch.rand(2, 12, 14, dtype=torch.float64) * 2).requires_grad_(True)
    y = x.detach() + 0.05 * torch.randn(2, 12, 14, dtype=torch.float64)
    # at a fixed kernel width the loss is smooth: exact gradients
    assert torch.autograd.gradcheck(lambda a: L.poisson_wls(a, y, sigmas=(0.2,)), (x,))
    assert torch.autograd.gradcheck(lambda a: L.poisson_wls(a, y, sigmas=None), (x,))
    # with the width searched, the gradient is taken at the fitted width; batched items are independent
    both = L.poisson_wls(x, y)
    assert torch.allclose(both[1:], L.poisson_wls(x[1:], y[1:]))
    both.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_poisson_wls_rejects_bad_arguments() -> None:
    x = torch.rand(1, 8, 8)
    for bad in (
        {"smooth_px": 4},
        {"smooth_px": 0},
        {"sigmas": ()},
        {"sigmas": (0.1, -1.0)},
        {"sigmas": "wide"},
    ):
        with pytest.raises(InputError, match="poisson_wls"):
            L.poisson_wls(x, x, **bad)
    with pytest.raises(InputError, match="poisson_wls"):
        L.poisson_wls(x, torch.rand(1, 8, 9))
    # an 8-bit display image is not a line integral: refused, naming the range found
    with pytest.raises(InputError, match=r"natural-log units.*\[0, 255\]"):
        L.poisson_wls(x, torch.linspace(0, 255, 64).view(1, 8, 8))
