"""Feature normalization: standardization, min-max scaling, PCA and ZCA whitening.

The chapter "Feature normalization" uses these functions. Every transform is
split into a *fit* (compute statistics from the training set) and an *apply*
(use given statistics on any set), because the test set must be transformed
with the training set's statistics (see :func:`standardize`).

Shapes: ``X`` is ``(n, d)``: ``n`` samples (rows), ``d`` features (columns).
Statistics are taken per feature, over the rows (axis 0). Everything is NumPy,
computed in float64.

Formulas (``m_i``, ``sigma_i``: mean and standard deviation of feature ``i``
over the training rows; ``C = U Lambda U^T``: the training covariance and its
eigendecomposition):

- standardization      ``x_i <- (x_i - m_i) / sigma_i``
- min-max scaling      ``x_i <- (x_i - min_i) / (max_i - min_i)``
- PCA whitening        ``z = W_pca (x - m)``, ``W_pca = (Lambda + eps)^{-1/2} U^T``
- ZCA whitening        ``z = W_zca (x - m)``, ``W_zca = U (Lambda + eps)^{-1/2} U^T``
"""

from __future__ import annotations

import time

import numpy as np

__all__ = [
    "standardize_fit",
    "standardize_apply",
    "standardize",
    "standardize_by_batch",
    "minmax_fit",
    "minmax_apply",
    "minmax_scale",
    "covariance",
    "whitening_fit",
    "whitening_apply",
    "whiten",
    "make_scaled_data",
    "make_regression",
    "make_classification",
    "flop_counts",
    "time_normalizers",
]


def _as_2d(X, name="X"):
    """Return ``X`` as a float64 array of shape (n, d), or raise ValueError."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must have shape (n, d), got an array with shape {X.shape}")
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got shape {X.shape}")
    return X


def _check_width(X, d, name="X"):
    if X.shape[1] != d:
        raise ValueError(f"{name} must have {d} features (columns) like the training set, got {X.shape[1]}")


# --------------------------------------------------------------------------
# Standardization
# --------------------------------------------------------------------------

def standardize_fit(X):
    """Per-feature mean and standard deviation of the training set.

    ``m_i = (1/n) sum_r x_i^r``,  ``sigma_i = sqrt((1/n) sum_r (x_i^r - m_i)^2)``
    (the biased standard deviation, as ``sklearn.preprocessing.StandardScaler``).
    A constant feature (all its values equal) gets ``m_i`` = that value and
    ``sigma_i = 1``, so it becomes exactly 0, never divided by zero. (Its
    computed mean can miss the value by a rounding error, e.g. for 0.7, which
    would leave a ``sigma_i`` of about 1e-17 and turn every 0 into +-1.)

    X: (n, d).  Returns ``(m, sigma)``, each of shape (d,).
    """
    X = _as_2d(X)
    m = X.mean(axis=0)
    sigma = np.sqrt(((X - m) ** 2).mean(axis=0))  # two passes: stable
    if X.shape[0] > 0:
        constant = np.all(X == X[0], axis=0)
        m = np.where(constant, X[0], m)
        sigma = np.where(constant, 0.0, sigma)
    sigma = np.where(sigma > 0, sigma, 1.0)
    return m, sigma


def standardize_apply(X, m, sigma):
    """``x_i <- (x_i - m_i) / sigma_i`` with the given statistics. X: (n, d)."""
    X = _as_2d(X)
    m = np.asarray(m, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    _check_width(X, m.shape[0])
    if sigma.shape != m.shape:
        raise ValueError(f"m and sigma must have the same shape, got {m.shape} and {sigma.shape}")
    return (X - m) / sigma


def standardize(X_train, X_test=None):
    """Fit on the training set, apply to both sets.

    Returns ``(Z_train, Z_test, m, sigma)``: the standardized sets (``Z_test``
    is None without ``X_test``) and the training statistics that were used for
    both. Returning the statistics is the point: the test set is transformed
    with ``m`` and ``sigma`` from the training set, never with its own (that
    would leak information about the test set into the evaluation, and a
    single test sample has no standard deviation at all).
    """
    m, sigma = standardize_fit(X_train)
    Z_train = standardize_apply(X_train, m, sigma)
    Z_test = None if X_test is None else standardize_apply(X_test, m, sigma)
    return Z_train, Z_test, m, sigma


def standardize_by_batch(X, batch_size, seed=0):
    """Standardize each random batch of rows with that batch's own statistics.

    The rows are shuffled (``seed``) and cut into batches of ``batch_size``
    (the last one may be smaller); each batch gets ``x_i <- (x_i - m_i) / sigma_i``
    with its own ``m_i`` and ``sigma_i``, as batch normalization does in
    training. Returns an array like X, rows in their original order: a row's
    result depends on which other rows shared its batch.
    """
    X = _as_2d(X)
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = np.random.default_rng(seed).permutation(X.shape[0])
    Z = np.empty_like(X)
    for start in range(0, X.shape[0], batch_size):
        rows = order[start:start + batch_size]
        Z[rows] = standardize_apply(X[rows], *standardize_fit(X[rows]))
    return Z


# --------------------------------------------------------------------------
# Min-max scaling
# --------------------------------------------------------------------------

def minmax_fit(X):
    """Per-feature minimum and maximum of the training set. Returns ``(lo, hi)``, each (d,)."""
    X = _as_2d(X)
    return X.min(axis=0), X.max(axis=0)


def minmax_apply(X, lo, hi):
    """``x_i <- (x_i - min_i) / (max_i - min_i)``: the training range goes to [0, 1].

    A constant feature (``max_i == min_i``) is divided by 1. Test values
    outside the training range land outside [0, 1]; that is intended.
    """
    X = _as_2d(X)
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    _check_width(X, lo.shape[0])
    span = hi - lo
    span = np.where(span > 0, span, 1.0)
    return (X - lo) / span


def minmax_scale(X_train, X_test=None):
    """Fit on the training set, apply to both. Returns ``(Z_train, Z_test, lo, hi)``."""
    lo, hi = minmax_fit(X_train)
    Z_train = minmax_apply(X_train, lo, hi)
    Z_test = None if X_test is None else minmax_apply(X_test, lo, hi)
    return Z_train, Z_test, lo, hi


# --------------------------------------------------------------------------
# Whitening
# --------------------------------------------------------------------------

def covariance(X):
    """Mean and covariance of the rows of X.

    ``m = (1/n) sum_r x^r``,  ``C = (1/n) sum_r (x^r - m)(x^r - m)^T``  (biased, divide by n).
    Cost: O(n d^2) for C.  X: (n, d).  Returns ``(m, C)`` of shapes (d,), (d, d).
    """
    X = _as_2d(X)
    m = X.mean(axis=0)
    Xc = X - m
    C = Xc.T @ Xc / X.shape[0]
    return m, C


def whitening_fit(X, method="zca", eps=1e-5):
    """Fit a whitening transform ``z = W (x - m)`` on the training set.

    With ``C = U Lambda U^T`` (``numpy.linalg.eigh``, cost O(d^3)):

    - ``method="pca"``: ``W_pca = (Lambda + eps)^{-1/2} U^T`` -- rotate onto the
      principal axes (largest variance first), then scale each to variance 1.
    - ``method="zca"``: ``W_zca = U (Lambda + eps)^{-1/2} U^T`` -- the same, then
      rotate back. ``W_zca`` is symmetric, and among all whitening matrices it
      changes the data the least (Kessy, Lewin, Strimmer 2018).

    ``eps`` keeps directions of (almost) zero variance from being blown up; with
    ``eps = 0`` and a full-rank ``C``, ``W C W^T = I`` exactly.
    The eigenvector signs are fixed so the PCA result is reproducible: the
    largest entry (in absolute value) of each column is positive, and where
    several entries tie for largest (within a relative 1e-9, as for two
    standardized features, whose eigenvectors are (1, 1)/sqrt(2) and
    (1, -1)/sqrt(2) up to sign), the first of them.

    Returns ``(m, W)`` of shapes (d,), (d, d).
    """
    if method not in ("pca", "zca"):
        raise ValueError(f"method must be 'pca' or 'zca', got {method!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)) or not 0 <= eps < np.inf:
        raise ValueError(f"eps must be >= 0 and finite, got {eps!r}")  # (NaN too: it would make W NaN)
    m, C = covariance(X)
    lam, U = np.linalg.eigh(C)             # ascending
    lam, U = lam[::-1], U[:, ::-1]         # largest variance first
    lam = np.clip(lam, 0.0, None)          # round-off can make tiny ones negative
    size = np.abs(U)
    # the first entry within round-off of the largest: a tie is not decided
    # by the last bits of eigh's output
    first_largest = np.argmax(size >= size.max(axis=0) * (1 - 1e-9), axis=0)
    signs = np.sign(U[first_largest, np.arange(U.shape[1])])
    U = U * signs
    if eps == 0 and lam[-1] <= lam[0] * lam.shape[0] * np.finfo(float).eps:
        raise ValueError(
            f"the covariance is singular (eigenvalues from {lam[0]:.3g} down to {lam[-1]:.3g}): "
            "whitening needs eps > 0"
        )
    scale = 1.0 / np.sqrt(lam + eps)
    W = scale[:, None] * U.T               # (Lambda + eps)^{-1/2} U^T
    if method == "zca":
        W = U @ W                           # U (Lambda + eps)^{-1/2} U^T
    return m, W


def whitening_apply(X, m, W):
    """``z^r = W (x^r - m)`` for every row: ``Z = (X - m) W^T``. X: (n, d)."""
    X = _as_2d(X)
    _check_width(X, W.shape[1])
    return (X - m) @ W.T


def whiten(X_train, X_test=None, method="zca", eps=1e-5):
    """Fit on the training set, apply to both. Returns ``(Z_train, Z_test, m, W)``."""
    m, W = whitening_fit(X_train, method=method, eps=eps)
    Z_train = whitening_apply(X_train, m, W)
    Z_test = None if X_test is None else whitening_apply(X_test, m, W)
    return Z_train, Z_test, m, W


# --------------------------------------------------------------------------
# Data with features on very different scales
# --------------------------------------------------------------------------

def make_scaled_data(n, scales=(1.0, 100.0), means=None, corr=0.0, seed=0):
    """Gaussian features with very different scales and a common correlation.

    Feature ``i`` has mean ``means[i]`` and standard deviation ``scales[i]``;
    every pair of features has correlation ``corr``:
    ``x = means + scales * (L g)`` with ``g ~ N(0, I)`` and ``L L^T = R``,
    ``R = (1 - corr) I + corr 11^T``.

    Returns X of shape (n, len(scales)).
    """
    scales = np.asarray(scales, dtype=np.float64)
    d = scales.shape[0]
    means = np.zeros(d) if means is None else np.asarray(means, dtype=np.float64)
    if means.shape != (d,):
        raise ValueError(f"means must have {d} entries like scales, got shape {means.shape}")
    if np.any(scales <= 0):
        raise ValueError(f"scales must be positive, got {scales}")
    if not (-1.0 / max(d - 1, 1) < corr < 1.0):
        raise ValueError(f"corr must lie in (-1/(d-1), 1) for a valid correlation matrix, got {corr}")
    R = (1.0 - corr) * np.eye(d) + corr * np.ones((d, d))
    L = np.linalg.cholesky(R)
    g = np.random.default_rng(seed).standard_normal((n, d))
    return means + scales * (g @ L.T)


def make_regression(n, scales=(1.0, 100.0), means=None, corr=0.0, noise=0.5, seed=0):
    """Linear-regression data ``y = b + sum_i w_i x_i + noise`` on scaled features.

    The true weights are ``w_i = 1 / scales[i]`` (every feature moves y by
    about the same amount), ``b = 1``. Returns ``(X, y)``, shapes (n, d), (n,).
    """
    X = make_scaled_data(n, scales, means, corr, seed)
    w = 1.0 / np.asarray(scales, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    y = 1.0 + X @ w + noise * rng.standard_normal(n)
    return X, y


def make_classification(n, scales=(1.0, 100.0), means=None, corr=0.0, separation=1.5, seed=0):
    """Two overlapping Gaussian classes on scaled features (labels 0 and 1).

    In standardized units, class 1 sits ``separation`` standard deviations
    from class 0 along every feature. The classes overlap, so logistic
    regression has a finite optimum. Returns ``(X, y)``, shapes (n, d), (n,).
    """
    X = make_scaled_data(n, scales, means, corr, seed)
    scales = np.asarray(scales, dtype=np.float64)
    y = (np.arange(n) % 2).astype(np.float64)
    np.random.default_rng(seed + 1).shuffle(y)
    X = X + np.outer(y - 0.5, separation * scales)
    return X, y


# --------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------

def flop_counts(n, d):
    """Leading-order floating-point operation counts (an add or a multiply is
    one flop) of each normalizer on an (n, d) batch, fit and apply alike.

    standardization: the mean (~n d), the variance (a subtraction, a square
    and an add per value, ~3 n d) and applying it (a subtraction and a
    multiplication by 1/std, ~2 n d), ~6 n d in all; covariance: the product
    ``X^T X`` of the centred batch, ~2 n d^2; symmetric eigendecomposition
    with eigenvectors: ~9 d^3 (Householder tridiagonalization plus QR, Golub
    & Van Loan); applying ``W``: a (n, d) x (d, d) product, ~2 n d^2.
    Returns a dict of ints.
    """
    return {
        "standardize": 6 * n * d,
        "covariance": 2 * n * d * d,
        "eigh": 9 * d ** 3,
        "apply W": 2 * n * d * d,
    }


def time_normalizers(dims, n=1000, repeats=3, seed=0):
    """Wall-clock seconds (best of ``repeats``) of each step, for each d in ``dims``.

    Steps: per-feature standardization (fit and apply), the covariance, its
    eigendecomposition. Timings depend on the machine: plot them, never print
    them as numbers. Returns a dict: step name -> array of len(dims).
    """
    rng = np.random.default_rng(seed)
    out = {"standardize": [], "covariance": [], "eigh": []}
    for d in dims:
        X = rng.standard_normal((n, d))
        _, C = covariance(X)
        steps = {
            "standardize": lambda: standardize_apply(X, *standardize_fit(X)),
            "covariance": lambda: covariance(X),
            "eigh": lambda: np.linalg.eigh(C),
        }
        for name, fn in steps.items():
            best = np.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            out[name].append(best)
    return {k: np.array(v) for k, v in out.items()}
