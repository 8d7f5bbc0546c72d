"""bnlib.data: the digits split (standardized with training statistics only) and blobs.

Truths: scikit-learn's own loader and splitter, NumPy's mean/std, the
definition of the generators.
"""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from bnlib import data


def test_digits_shapes_and_dtypes():
    s = data.load_digits_split(test_size=0.25, seed=0)
    assert s.x_train.shape == (1347, 64) and s.x_test.shape == (450, 64)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    # stratified: every class keeps its share (each has 174..183 images)
    counts = torch.bincount(s.y_test, minlength=10)
    assert int(counts.min()) >= 43 and int(counts.max()) <= 46


def test_digits_uses_training_statistics_only():
    # Recompute from scikit-learn directly in float64; the float32 copy is
    # within float32 rounding (values are at most ~40 in size): 1e-5 relative.
    s = data.load_digits_split(test_size=0.25, seed=3)
    d = load_digits()
    x_tr, x_te, _, y_te = train_test_split(d.data, d.target, test_size=0.25, random_state=3, stratify=d.target)
    mu, std = x_tr.mean(0), x_tr.std(0)
    std[std == 0] = 1.0
    np.testing.assert_allclose(s.x_train.numpy(), (x_tr - mu) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.x_test.numpy(), (x_te - mu) / std, rtol=1e-5, atol=1e-5)
    assert np.array_equal(s.y_test.numpy(), y_te)
    # train columns: mean 0, std 1 (or all 0 for a blank pixel); the test split is not re-centred
    xt = s.x_train.double()
    assert float(xt.mean(0).abs().max()) < 1e-6
    sd = xt.std(0, unbiased=False)
    assert torch.all(((sd - 1).abs() < 1e-5) | (sd == 0))
    assert int((sd == 0).sum()) >= 1  # digits has blank border pixels: they stay 0, not NaN
    assert not torch.isnan(s.x_test).any()
    assert float(s.x_test.double().mean(0).abs().max()) > 0.01


def test_digits_is_reproducible_and_seed_dependent():
    a, b = data.load_digits_split(seed=1), data.load_digits_split(seed=1)
    c = data.load_digits_split(seed=2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a.y_train, c.y_train)


def test_fit_standardizer_constant_column():
    x = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    mu, std = data.fit_standardizer(x)
    np.testing.assert_array_equal(mu, [3.0, 5.0])
    np.testing.assert_allclose(std, [np.sqrt(8 / 3), 1.0], rtol=1e-15)
    np.testing.assert_allclose(data.standardize(x, mu, std)[:, 1], 0.0)


@pytest.mark.parametrize("bad", [np.zeros(3), np.zeros((0, 2))])
def test_fit_standardizer_bad_input(bad):
    with pytest.raises(ValueError, match="expected a 2-D array"):
        data.fit_standardizer(bad)


def test_digits_bad_test_size():
    with pytest.raises(ValueError, match="test_size"):
        data.load_digits_split(test_size=1.5)


def test_gaussian_blobs():
    x, y = data.gaussian_blobs(3000, n_features=3, n_classes=3, spread=0.5, seed=0)
    assert x.shape == (3000, 3) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(torch.bincount(y), torch.tensor([1000, 1000, 1000]))
    # within-class std is `spread`: 1000 draws per coordinate, std error ~2%; 10% margin
    for k in range(3):
        sd = x[y == k].double().std(0)
        assert torch.all((sd / 0.5 - 1).abs() < 0.1)
    x2, _ = data.gaussian_blobs(3000, n_features=3, n_classes=3, spread=0.5, seed=0)
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="n_samples"):
        data.gaussian_blobs(0)


def test_fit_standardizer_constant_column_whose_mean_rounds_off():
    """0.7 is not a float64 number: its computed mean misses it by a rounding
    error, which used to leave std ~1e-16 and turn the column into +-1."""
    x = np.column_stack([np.arange(6.0), np.full(6, 0.7)])
    mu, std = data.fit_standardizer(x)
    assert std[1] == 1.0 and np.all(data.standardize(x, mu, std)[:, 1] == 0.0)


def test_two_spirals_split_is_standardized_with_training_statistics():
    split = data.two_spirals_split(1500, 500, seed=3)
    assert split.x_train.shape == (1500, 2) and split.x_test.shape == (500, 2)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    assert set(split.y_train.tolist()) == {0, 1} and 0.45 < split.y_train.double().mean() < 0.55
    torch.testing.assert_close(split.x_train.double().mean(0), torch.zeros(2, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(split.x_train.double().std(0, unbiased=False), torch.ones(2, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    # the test split gets the training transform: the raw points, standardized
    # with the training split's mu and std (not its own, nor pooled ones)
    rng = np.random.default_rng(3)
    raw_train, y_train = data._spiral_points(rng, 1500, 0.2)
    raw_test, y_test = data._spiral_points(rng, 500, 0.2)
    mu, std = data.fit_standardizer(raw_train)
    torch.testing.assert_close(split.x_test, torch.as_tensor(data.standardize(raw_test, mu, std),
                                                             dtype=torch.float32))
    assert torch.equal(split.y_test, torch.as_tensor(y_test))
    # the training split does not depend on n_test
    assert torch.equal(data.two_spirals_split(1500, 20, seed=3).x_train, split.x_train)
    again = data.two_spirals_split(1500, 500, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(split, again))
    assert not torch.equal(data.two_spirals_split(1500, 500, seed=4).x_train, split.x_train)


def test_two_spirals_need_more_than_a_straight_line():
    """Nearest neighbours separate the arms; the best linear fit does not."""
    split = data.two_spirals_split(2000, 1000, seed=0)
    nearest = torch.cdist(split.x_test, split.x_train).argmin(dim=1)
    assert (split.y_train[nearest] == split.y_test).double().mean() > 0.95
    # least squares on (x, 1) against +-1 labels, then the sign
    design = torch.cat([split.x_train.double(), torch.ones(2000, 1, dtype=torch.float64)], dim=1)
    target = 2.0 * split.y_train.double() - 1
    w = torch.linalg.lstsq(design, target[:, None]).solution
    test_design = torch.cat([split.x_test.double(), torch.ones(1000, 1, dtype=torch.float64)], dim=1)
    linear = ((test_design @ w).squeeze(1) > 0).long()
    assert (linear == split.y_test).double().mean() < 0.75


def test_spiral_points_lie_on_their_arms():
    """Without noise a point of class y at radius t has the angle t + pi*y (mod 2 pi):
    class 1 is class 0 turned by half a turn."""
    x, y = data._spiral_points(np.random.default_rng(0), 400, 0.0)
    radius = np.hypot(x[:, 0], x[:, 1])
    assert radius.max() <= 3 * np.pi + 1e-9 and set(y.tolist()) == {0, 1}
    offset = np.angle(np.exp(1j * (np.arctan2(x[:, 1], x[:, 0]) - radius - np.pi * y)))
    np.testing.assert_allclose(offset, 0, atol=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_train=1), "n_train must be >= 2"),
    (dict(n_test=0), "n_test >= 1"),
    (dict(noise=-0.1), "noise must be >= 0"),
])
def test_two_spirals_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.two_spirals_split(**kwargs)


def test_digit_pixels_test_size_is_checked():
    with pytest.raises(ValueError, match="test_size"):
        data.load_digit_pixels(test_size=0.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_samples=5.5), "n_samples must be an integer >= 1"),
    (dict(n_samples=5, spread=float("nan")), "spread must be a finite number >= 0"),
    (dict(n_samples=5, spread=-1.0), "spread must be a finite number >= 0"),
])
def test_gaussian_blobs_check_their_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.gaussian_blobs(**kwargs)
