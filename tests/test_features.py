"""Tests for bnlib.features against independent truths.

Truths: scikit-learn's StandardScaler, MinMaxScaler and PCA(whiten=True);
numpy.cov and numpy.linalg; closed forms (a whitened covariance is the
identity, W_zca is the symmetric inverse square root of C, ZCA is the
whitening that moves the data the least).

Tolerances: the transforms are a handful of float64 operations on values of
order 1 to 100, so results agree with the other implementation to ~1e-12
relative; we allow 1e-10. Eigendecomposition-based results (whitening) lose
a factor of the condition number of C (here < 1e4), so we allow 1e-8.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.decomposition import PCA
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from bnlib import features as F

RTOL = 1e-10     # elementwise transforms (see module docstring)
WTOL = 1e-8      # eigendecomposition-based transforms


@pytest.fixture
def data():
    X_train = F.make_scaled_data(300, scales=(1.0, 10.0, 100.0), means=(2.0, -20.0, 300.0), corr=0.6, seed=1)
    X_test = F.make_scaled_data(50, scales=(1.0, 10.0, 100.0), means=(2.5, -18.0, 320.0), corr=0.6, seed=2)
    return X_train, X_test


# --------------------------------------------------------------------------
# Standardization
# --------------------------------------------------------------------------

def test_standardize_matches_sklearn(data):
    X_train, X_test = data
    Z_train, Z_test, m, sigma = F.standardize(X_train, X_test)
    sc = StandardScaler().fit(X_train)
    np.testing.assert_allclose(m, sc.mean_, rtol=RTOL)
    np.testing.assert_allclose(sigma, sc.scale_, rtol=RTOL)
    np.testing.assert_allclose(Z_train, sc.transform(X_train), rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(Z_test, sc.transform(X_test), rtol=RTOL, atol=RTOL)


def test_standardize_train_has_zero_mean_unit_std_test_does_not(data):
    X_train, X_test = data
    Z_train, Z_test, _, _ = F.standardize(X_train, X_test)
    np.testing.assert_allclose(Z_train.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(Z_train.std(axis=0), 1.0, rtol=1e-12)
    # the test set was shifted: with the training statistics the shift stays visible
    assert np.all(np.abs(Z_test.mean(axis=0)) > 0.1)


def test_standardize_constant_feature_like_sklearn():
    X = np.column_stack([np.arange(5.0), np.full(5, 7.0)])
    _, _, m, sigma = F.standardize(X)
    sc = StandardScaler().fit(X)
    np.testing.assert_allclose(sigma, sc.scale_)  # sklearn also uses 1 for a zero variance
    np.testing.assert_allclose(F.standardize_apply(X, m, sigma), sc.transform(X), atol=RTOL)


def test_single_sample_standardizes_to_zero():
    x = np.array([[3.0, 150.0]])
    m, sigma = F.standardize_fit(x)
    np.testing.assert_array_equal(sigma, [1.0, 1.0])  # its own sigma is 0
    np.testing.assert_array_equal(F.standardize_apply(x, m, sigma), [[0.0, 0.0]])


def test_standardize_without_test_set(data):
    Z_train, Z_test, _, _ = F.standardize(data[0])
    assert Z_test is None and Z_train.shape == data[0].shape


def test_standardize_by_batch(data):
    X = data[0][:30]
    # the whole set as one batch: plain standardization
    np.testing.assert_allclose(F.standardize_by_batch(X, 30), StandardScaler().fit_transform(X), rtol=RTOL, atol=RTOL)
    # batches of one: every row becomes zeros (its own sigma is 0, replaced by 1)
    np.testing.assert_array_equal(F.standardize_by_batch(X, 1), np.zeros_like(X))
    # batches of 4 (the last one of 2): each batch is standardized on its own
    Z = F.standardize_by_batch(X, 4, seed=3)
    order = np.random.default_rng(3).permutation(30)
    for start in range(0, 30, 4):
        rows = order[start:start + 4]
        np.testing.assert_allclose(Z[rows], StandardScaler().fit_transform(X[rows]), rtol=RTOL, atol=RTOL)
    # a row's value depends on its batch-mates: another shuffle changes it
    assert not np.allclose(Z, F.standardize_by_batch(X, 4, seed=4))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        F.standardize_by_batch(X, 0)


# --------------------------------------------------------------------------
# Min-max scaling
# --------------------------------------------------------------------------

def test_minmax_matches_sklearn(data):
    X_train, X_test = data
    Z_train, Z_test, lo, hi = F.minmax_scale(X_train, X_test)
    sc = MinMaxScaler().fit(X_train)
    np.testing.assert_allclose(lo, sc.data_min_, rtol=RTOL)
    np.testing.assert_allclose(hi, sc.data_max_, rtol=RTOL)
    np.testing.assert_allclose(Z_train, sc.transform(X_train), rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(Z_test, sc.transform(X_test), rtol=RTOL, atol=RTOL)
    assert Z_train.min() == 0.0 and Z_train.max() == 1.0


def test_minmax_constant_feature_like_sklearn():
    X = np.column_stack([np.arange(5.0), np.full(5, -2.0)])
    Z, _, _, _ = F.minmax_scale(X)
    np.testing.assert_allclose(Z, MinMaxScaler().fit_transform(X), atol=RTOL)


# --------------------------------------------------------------------------
# Covariance and whitening
# --------------------------------------------------------------------------

def test_covariance_matches_numpy(data):
    m, C = F.covariance(data[0])
    np.testing.assert_allclose(m, data[0].mean(axis=0), rtol=RTOL)
    np.testing.assert_allclose(C, np.cov(data[0], rowvar=False, bias=True), rtol=RTOL)


@pytest.mark.parametrize("method", ["pca", "zca"])
def test_whitened_covariance_is_identity(data, method):
    Z, _, _, W = F.whiten(data[0], method=method, eps=0.0)
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=WTOL)
    np.testing.assert_allclose(np.cov(Z, rowvar=False, bias=True), np.eye(3), atol=WTOL)


@pytest.mark.parametrize("method", ["pca", "zca"])
def test_whitening_with_eps_closed_form(data, method):
    # with eps, the variances along the principal axes are lam / (lam + eps)
    eps = 50.0
    lam = np.linalg.eigvalsh(np.cov(data[0], rowvar=False, bias=True))
    Z, _, _, _ = F.whiten(data[0], method=method, eps=eps)
    got = np.linalg.eigvalsh(np.cov(Z, rowvar=False, bias=True))
    np.testing.assert_allclose(got, np.sort(lam / (lam + eps)), rtol=WTOL)


def test_pca_whitening_matches_sklearn(data):
    X_train, X_test = data
    n = X_train.shape[0]
    Z_train, Z_test, _, _ = F.whiten(X_train, X_test, method="pca", eps=0.0)
    pca = PCA(whiten=True).fit(X_train)
    # sklearn divides by the unbiased variance (n - 1), we by the biased one (n);
    # principal axes are defined up to sign, so align each column's sign first.
    ref_train = pca.transform(X_train) * np.sqrt(n / (n - 1))
    ref_test = pca.transform(X_test) * np.sqrt(n / (n - 1))
    signs = np.sign(np.sum(ref_train * Z_train, axis=0))
    np.testing.assert_allclose(Z_train * signs, ref_train, rtol=WTOL, atol=WTOL)
    np.testing.assert_allclose(Z_test * signs, ref_test, rtol=WTOL, atol=WTOL)


def test_pca_signs_do_not_depend_on_round_off():
    # Two standardized features: the eigenvectors are (1, 1)/sqrt(2) and
    # (1, -1)/sqrt(2) up to sign, their entries tie, and the tie-break (the
    # first entry positive) must hold whatever the last bits: ten data sets,
    # each also scaled by 1 + 1e-7.
    for seed in range(10):
        X = np.random.default_rng(seed).standard_normal((200, 2)) @ np.array([[1.0, 0.6], [0.0, 0.8]])
        Z = F.standardize(X)[0]
        for data in (Z, Z * (1 + 1e-7)):
            _, W = F.whitening_fit(data, method="pca", eps=0.0)
            assert (W[:, 0] > 0).all(), (seed, W)
            np.testing.assert_allclose(np.abs(W[:, 0] * np.sqrt(np.linalg.eigvalsh(np.cov(data.T, bias=True))[::-1])),
                                       np.sqrt(0.5), rtol=1e-6)


def test_pca_components_ordered_by_variance(data):
    _, W = F.whitening_fit(data[0], method="pca", eps=0.0)
    lam = np.linalg.eigvalsh(np.cov(data[0], rowvar=False, bias=True))[::-1]
    # the rows of W_pca are the principal axes divided by sqrt(lam): norms 1/sqrt(lam)
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1.0 / np.sqrt(lam), rtol=WTOL)


def test_zca_is_symmetric_inverse_square_root(data):
    _, C = F.covariance(data[0])
    _, W = F.whitening_fit(data[0], method="zca", eps=0.0)
    np.testing.assert_allclose(W, W.T, rtol=0, atol=1e-12 * np.abs(W).max())
    np.testing.assert_allclose(W @ W, np.linalg.inv(C), rtol=WTOL, atol=WTOL * np.abs(np.linalg.inv(C)).max())


def test_zca_is_closest_whitening(data):
    # every whitening matrix is Q W_zca with Q orthogonal; ZCA (Q = I) moves the
    # centred data the least: mean ||x_c - W x_c||^2 is smallest (Kessy et al. 2018)
    X = F.standardize(data[0])[0]   # same units, so the distance is meaningful
    m, W_zca = F.whitening_fit(X, method="zca", eps=0.0)
    _, W_pca = F.whitening_fit(X, method="pca", eps=0.0)
    Xc = X - m

    def moved(W):
        return np.mean(np.sum((Xc - Xc @ W.T) ** 2, axis=1))

    best = moved(W_zca)
    rng = np.random.default_rng(0)
    for _ in range(50):
        Q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        W = Q @ W_zca
        Z = Xc @ W.T
        np.testing.assert_allclose(np.cov(Z, rowvar=False, bias=True), np.eye(3), atol=WTOL)
        assert moved(W) >= best - 1e-12
    assert moved(W_pca) > best


def test_test_set_uses_training_statistics(data):
    X_train, X_test = data
    _, Z_test, m, W = F.whiten(X_train, X_test, method="zca")
    np.testing.assert_allclose(Z_test, F.whitening_apply(X_test, *F.whitening_fit(X_train)), rtol=0, atol=0)
    np.testing.assert_allclose(m, X_train.mean(axis=0), rtol=RTOL)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=8, max_value=60),
    d=st.integers(min_value=1, max_value=5),
    seed=st.integers(min_value=0, max_value=10_000),
    log_scale=st.floats(min_value=-3, max_value=3),
)
def test_whitening_property(n, d, seed, log_scale):
    # any full-rank Gaussian data, at any overall scale, whitens to the identity
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 10.0 ** log_scale
    lam = np.linalg.eigvalsh(np.atleast_2d(np.cov(X, rowvar=False, bias=True)))
    if lam[0] < 1e-6 * lam[-1]:      # too close to singular for a 1e-6 check
        return
    for method in ("pca", "zca"):
        Z, _, _, _ = F.whiten(X, method=method, eps=0.0)
        cov = np.atleast_2d(np.cov(Z, rowvar=False, bias=True))
        np.testing.assert_allclose(cov, np.eye(d), atol=1e-6)


# --------------------------------------------------------------------------
# Data generators
# --------------------------------------------------------------------------

def test_make_scaled_data_moments():
    # n = 200000: the sample std and correlation are within ~3/sqrt(n) ~ 0.7% of the truth
    X = F.make_scaled_data(200_000, scales=(1.0, 100.0), means=(5.0, -3.0), corr=0.8, seed=0)
    np.testing.assert_allclose(X.mean(axis=0) / [1.0, 100.0], [5.0, -0.03], atol=0.01)
    np.testing.assert_allclose(X.std(axis=0), [1.0, 100.0], rtol=0.01)
    np.testing.assert_allclose(np.corrcoef(X, rowvar=False)[0, 1], 0.8, atol=0.01)


def test_make_scaled_data_is_seeded():
    a = F.make_scaled_data(10, seed=3)
    np.testing.assert_array_equal(a, F.make_scaled_data(10, seed=3))
    assert not np.array_equal(a, F.make_scaled_data(10, seed=4))


def test_make_regression_recovers_weights():
    X, y = F.make_regression(20_000, scales=(1.0, 100.0), means=(1.0, 50.0), noise=0.1, seed=0)
    A = np.column_stack([np.ones(len(y)), X])
    theta = np.linalg.lstsq(A, y, rcond=None)[0]
    # the noise std is 0.1: the estimates are within a few 0.1/sqrt(n) standard errors
    np.testing.assert_allclose(theta, [1.0, 1.0, 0.01], rtol=0.02, atol=0.01)


def test_make_classification_balanced_and_separated():
    X, y = F.make_classification(1000, scales=(1.0, 100.0), separation=2.0, seed=0)
    assert set(np.unique(y)) == {0.0, 1.0} and y.sum() == 500
    gap = X[y == 1].mean(axis=0) - X[y == 0].mean(axis=0)
    np.testing.assert_allclose(gap / np.array([1.0, 100.0]), 2.0, atol=0.2)


# --------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------

def test_flop_counts():
    assert F.flop_counts(10, 4) == {"standardize": 240, "covariance": 320, "eigh": 576, "apply W": 320}


def test_time_normalizers_shapes():
    t = F.time_normalizers([2, 4], n=20, repeats=1)
    assert set(t) == {"standardize", "covariance", "eigh"}
    assert all(v.shape == (2,) and np.all(v > 0) for v in t.values())


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

def test_bad_input():
    X = np.ones((5, 2))
    with pytest.raises(ValueError, match=r"shape \(n, d\), got an array with shape \(5,\)"):
        F.standardize_fit(np.ones(5))
    with pytest.raises(ValueError, match="must have 2 features"):
        F.standardize_apply(np.ones((5, 3)), np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="same shape"):
        F.standardize_apply(X, np.zeros(2), np.ones(3))
    with pytest.raises(ValueError, match="must have 2 features"):
        F.minmax_apply(np.ones((5, 3)), np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="method must be 'pca' or 'zca', got 'svd'"):
        F.whitening_fit(X, method="svd")
    for eps in (-1.0, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match="eps must be >= 0 and finite"):
            F.whitening_fit(X, eps=eps)
    with pytest.raises(ValueError, match="singular"):
        F.whitening_fit(np.column_stack([np.arange(5.0), 2 * np.arange(5.0)]), eps=0.0)
    with pytest.raises(ValueError, match="at least one row"):
        F.standardize_fit(np.ones((0, 2)))
    with pytest.raises(ValueError, match="corr must lie"):
        F.make_scaled_data(5, scales=(1.0, 2.0), corr=1.0)
    with pytest.raises(ValueError, match="scales must be positive"):
        F.make_scaled_data(5, scales=(1.0, 0.0))
    with pytest.raises(ValueError, match="means must have 2 entries"):
        F.make_scaled_data(5, scales=(1.0, 2.0), means=(0.0,))


def test_singular_covariance_with_eps_is_fine():
    X = np.column_stack([np.arange(5.0), 2 * np.arange(5.0)])
    Z, _, _, _ = F.whiten(X, eps=1e-3)
    assert np.all(np.isfinite(Z))


@pytest.mark.parametrize("value", [0.7, 0.1, 1e6 + 0.3, 7.0])
def test_constant_feature_becomes_zero_whatever_its_value(value):
    """A constant whose mean rounds off (0.7) left sigma ~1e-17 and turned the
    feature into +-1; it is now exactly 0, as for a representable constant."""
    X = np.column_stack([np.arange(6.0), np.full(6, value)])
    Z = F.standardize(X)[0]
    assert np.all(Z[:, 1] == 0.0)
    assert np.all(F.standardize_by_batch(X, 3)[:, 1] == 0.0)
