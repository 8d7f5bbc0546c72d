"""Error surfaces of small models, and gradient descent on them.

The chapters "Error surfaces" and "Feature normalization" use these functions.

The model: a linear model with a bias, ``y_hat = b + w_1 x_1 + ... + w_d x_d``,
written with the parameter vector ``theta = (b, w_1, ..., w_d)`` and the
design matrix ``A = [1, X]`` (a column of ones, then the features), so that
``y_hat = A theta``. Its mean squared error

    L(theta) = (1/n) sum_r (y_hat^r - y^r)^2 = (1/n) ||A theta - y||^2

is a quadratic bowl with

    gradient  g(theta) = (2/n) A^T (A theta - y)
    Hessian   H        = (2/n) A^T A          (the same at every theta)

Gradient descent ``theta <- theta - lr * g(theta)`` moves the error
``e = theta - theta_star`` by ``e <- (I - lr H) e``. Along the eigenvector of
``H`` with eigenvalue ``lambda_i`` the error is multiplied by ``1 - lr lambda_i``
each step, so

- it converges iff ``lr < 2 / lambda_max``              (:func:`max_stable_lr`)
- the error shrinks by ``rho = max_i |1 - lr lambda_i|`` per step in the long
  run                                                  (:func:`predicted_rate`)
- the best fixed ``lr = 2 / (lambda_min + lambda_max)`` gives
  ``rho = (kappa - 1) / (kappa + 1)`` with the condition number
  ``kappa = lambda_max / lambda_min``                  (:func:`condition_number`)
- with momentum (:func:`heavy_ball`) and the best fixed lr and momentum the
  factor is ``(sqrt(kappa) - 1) / (sqrt(kappa) + 1)`` instead

Shapes: ``X`` (n, d), ``y`` (n,), ``theta`` (d + 1,). NumPy, float64.
"""

from __future__ import annotations

import numpy as np

from bnlib.features import standardize

__all__ = [
    "design_matrix",
    "loss",
    "gradient",
    "hessian",
    "optimum",
    "loss_grid",
    "grid_around",
    "eigenvalues",
    "condition_number",
    "max_stable_lr",
    "best_lr",
    "predicted_rate",
    "gradient_descent",
    "heavy_ball",
    "adam",
    "diagonal_preconditioned",
    "linear_gd",
    "errors",
    "measured_rate",
    "iterations_to",
    "logistic_loss",
    "logistic_gradient",
    "logistic_optimum",
    "fit_gd",
    "random_mlp",
    "mlp_layers",
]


def _xy(X, y=None):
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must have shape (n, d), got an array with shape {X.shape}")
    if y is None:
        return X
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (X.shape[0],):
        raise ValueError(f"y must have shape ({X.shape[0]},) to match X, got {y.shape}")
    return X, y


def design_matrix(X):
    """``A = [1, X]``: shape (n, d + 1); column 0 multiplies the bias ``b``."""
    X = _xy(X)
    return np.column_stack([np.ones(X.shape[0]), X])


# --------------------------------------------------------------------------
# The linear model with MSE loss
# --------------------------------------------------------------------------

def loss(theta, X, y):
    """``L(theta) = (1/n) ||A theta - y||^2`` (a float)."""
    X, y = _xy(X, y)
    r = design_matrix(X) @ np.asarray(theta, dtype=np.float64) - y
    return float(np.mean(r ** 2))


def gradient(theta, X, y):
    """``g(theta) = (2/n) A^T (A theta - y)``, shape (d + 1,)."""
    X, y = _xy(X, y)
    A = design_matrix(X)
    return 2.0 / X.shape[0] * A.T @ (A @ np.asarray(theta, dtype=np.float64) - y)


def hessian(X):
    """``H = (2/n) A^T A``, shape (d + 1, d + 1). It does not depend on theta or y.

    With centred features (mean 0) the bias separates: ``H`` is block
    diagonal, ``H = diag(2, 2 C)`` with ``C`` the features' covariance.
    """
    A = design_matrix(X)
    return 2.0 / A.shape[0] * A.T @ A


def optimum(X, y):
    """``theta_star`` minimizing L (least squares, ``numpy.linalg.lstsq``)."""
    X, y = _xy(X, y)
    return np.linalg.lstsq(design_matrix(X), y, rcond=None)[0]


def loss_grid(X, y, w1, w2, b):
    """L on a grid of the two weights, with the bias held at ``b``.

    For a two-feature X: ``Z[i, j] = L((b, w1[j], w2[i]))`` -- rows follow
    ``w2``, columns ``w1``, as ``matplotlib``'s ``contour(w1, w2, Z)`` expects.
    Computed from the sufficient statistics, so the grid costs O(len(w1) len(w2)).
    """
    X, y = _xy(X, y)
    if X.shape[1] != 2:
        raise ValueError(f"loss_grid needs exactly 2 features, got {X.shape[1]}")
    W1, W2 = np.meshgrid(np.asarray(w1, float), np.asarray(w2, float))
    A = design_matrix(X)
    G = A.T @ A / X.shape[0]            # second moments
    c = A.T @ y / X.shape[0]
    T = np.stack([np.full_like(W1, b), W1, W2])  # (3, len(w2), len(w1))
    quad = np.einsum("i...,ij,j...->...", T, G, T)
    return quad - 2.0 * np.einsum("i,i...->...", c, T) + np.mean(y ** 2)


def grid_around(theta, half=5.0, num=201):
    """The grids ``w1``, ``w2`` for :func:`loss_grid` around ``theta = (b, w1, w2)``.

    ``num`` points each, from ``theta[i] - half`` to ``theta[i] + half``
    (i = 1, 2): a square window of the same size around any minimum.
    """
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (3,):
        raise ValueError(f"theta must be (b, w1, w2), got shape {theta.shape}")
    return (np.linspace(theta[1] - half, theta[1] + half, num),
            np.linspace(theta[2] - half, theta[2] + half, num))


# --------------------------------------------------------------------------
# Curvature and what it says about gradient descent
# --------------------------------------------------------------------------

def eigenvalues(H):
    """Eigenvalues of the symmetric matrix H, ascending (``numpy.linalg.eigvalsh``).

    Raises ``ValueError`` for an H that is not a non-empty, finite, symmetric
    square matrix (``eigvalsh`` would read its lower triangle only).
    """
    H = np.asarray(H, dtype=np.float64)
    if H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] == 0:
        raise ValueError(f"H must be a non-empty square matrix, got shape {H.shape}")
    if not np.all(np.isfinite(H)):
        raise ValueError("H must be finite, got NaN or infinite entries")
    scale = np.abs(H).max()
    if not np.allclose(H, H.T, rtol=1e-8, atol=1e-12 * scale):
        raise ValueError(f"H must be symmetric, got max |H - H^T| = {np.abs(H - H.T).max():.3g}")
    return np.linalg.eigvalsh(H)


def condition_number(H):
    """``kappa = lambda_max / lambda_min`` of a symmetric positive definite H.

    Raises ``ValueError`` when H is singular to working precision: a smallest
    eigenvalue at most ``d * eps * lambda_max`` (``d`` the size, ``eps`` float64's
    machine epsilon) is rounding noise, positive or negative as the rounding
    falls, and so would be any kappa computed from it (above ~1e14).
    """
    lam = eigenvalues(H)
    if lam[0] <= len(lam) * np.finfo(np.float64).eps * abs(lam[-1]):
        raise ValueError(f"H must be positive definite (and not singular to working precision), its "
                         f"eigenvalues run from {lam[0]:.3g} to {lam[-1]:.3g}")
    return float(lam[-1] / lam[0])


def max_stable_lr(H):
    """``2 / lambda_max``: gradient descent on the quadratic diverges for any larger lr."""
    return float(2.0 / eigenvalues(H)[-1])


def best_lr(H):
    """``2 / (lambda_min + lambda_max)``: the fixed lr with the smallest ``rho``."""
    lam = eigenvalues(H)
    return float(2.0 / (lam[0] + lam[-1]))


def predicted_rate(H, lr):
    """``rho = max_i |1 - lr lambda_i|``: the long-run factor by which the error shrinks each step."""
    return float(np.max(np.abs(1.0 - lr * eigenvalues(H))))


def gradient_descent(grad, theta0, lr, steps):
    """Run ``theta <- theta - lr * grad(theta)`` for ``steps`` steps.

    ``grad``: a function of theta. Returns the path, shape (steps + 1, len(theta0)),
    row 0 being ``theta0``.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    path = np.empty((steps + 1, len(theta0)))
    path[0] = theta = np.asarray(theta0, dtype=np.float64)
    for t in range(steps):
        theta = theta - lr * grad(theta)
        path[t + 1] = theta
    return path


def heavy_ball(grad, theta0, lr, momentum, steps):
    r"""Gradient descent with momentum (Polyak's heavy ball).

    With ``v_0 = 0``::

        v_t     = momentum * v_{t-1} - lr * grad(theta_{t-1})
        theta_t = theta_{t-1} + v_t,

    the steps of ``torch.optim.SGD(lr=lr, momentum=momentum)`` (which keeps
    ``buf_t = momentum buf_{t-1} + g_t`` and moves by ``-lr buf_t``);
    ``momentum = 0`` is :func:`gradient_descent`. On a quadratic whose
    Hessian has its eigenvalues in ``[lambda_min, lambda_max]``, the error
    along eigenvector i follows ``e_{t+1} = (1 + momentum - lr lambda_i) e_t
    - momentum e_{t-1}``; with ``lr = 4 / (sqrt(lambda_max) +
    sqrt(lambda_min))^2`` and ``momentum = ((sqrt(kappa) - 1) / (sqrt(kappa)
    + 1))^2`` every direction shrinks by ``(sqrt(kappa) - 1) / (sqrt(kappa) +
    1)`` per step in the long run, against gradient descent's
    ``(kappa - 1) / (kappa + 1)``. Returns the path, shape
    ``(steps + 1, len(theta0))``, as :func:`gradient_descent`.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    path = np.empty((steps + 1, len(theta0)))
    path[0] = theta = np.asarray(theta0, dtype=np.float64)
    velocity = np.zeros_like(theta)
    for t in range(steps):
        velocity = momentum * velocity - lr * grad(theta)
        theta = theta + velocity
        path[t + 1] = theta
    return path


def adam(grad, theta0, lr, steps, beta1=0.9, beta2=0.999, eps=1e-8):
    r"""Adam (Kingma and Ba 2015): a learning rate per parameter, from the gradients' own size.

    With ``g_t = grad(theta_{t-1})``::

        m_t = beta1 m_{t-1} + (1 - beta1) g_t          (mean of the gradient)
        v_t = beta2 v_{t-1} + (1 - beta2) g_t^2        (mean of its square)
        theta_t = theta_{t-1} - lr * m_hat_t / (sqrt(v_hat_t) + eps),

    with the bias-corrected ``m_hat_t = m_t / (1 - beta1^t)``,
    ``v_hat_t = v_t / (1 - beta2^t)``. A parameter whose gradients are large
    (a steep direction) takes steps of about ``lr`` all the same, and so does
    one whose gradients are small. Returns the path, shape
    ``(steps + 1, len(theta0))``, as :func:`gradient_descent`.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    path = np.empty((steps + 1, len(theta0)))
    path[0] = theta = np.asarray(theta0, dtype=np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t in range(1, steps + 1):
        g = grad(theta)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
        path[t] = theta
    return path


def diagonal_preconditioned(H):
    """``D^{-1/2} H D^{-1/2}`` with ``D = diag(H)``: the Hessian seen by gradient descent with
    the learning rate ``lr / H_ii`` for parameter ``i`` (its diagonal is 1)."""
    H = np.asarray(H, dtype=np.float64)
    d = np.sqrt(np.diag(H))
    return H / np.outer(d, d)


def linear_gd(X, y, lr, steps, theta0=None):
    """Gradient descent on the linear model's MSE; returns the path (steps + 1, d + 1)."""
    X, y = _xy(X, y)
    A = design_matrix(X)
    H = 2.0 / X.shape[0] * A.T @ A
    c = 2.0 / X.shape[0] * A.T @ y
    theta0 = np.zeros(A.shape[1]) if theta0 is None else theta0
    return gradient_descent(lambda th: H @ th - c, theta0, lr, steps)


def errors(path, theta_star):
    """``||theta_t - theta_star||`` for every row of the path."""
    return np.linalg.norm(np.asarray(path) - np.asarray(theta_star), axis=1)


def measured_rate(path, theta_star, k=20, floor=1e-12):
    """The error's shrink factor per step, measured at the end of the path.

    ``(||e_T|| / ||e_{T-k}||)^{1/k}``: the geometric mean of k successive
    ratios, which tends to :func:`predicted_rate` once the slowest direction
    dominates. ``T`` is the last step, or, if the error has fallen below
    ``floor * ||e_0||`` (where round-off, not the rate, decides), the last step
    above that floor; ``k`` shrinks to fit (at least 2). Keep k even: an error
    that flips sign every step is then measured the same.
    """
    e = errors(path, theta_star)
    if len(e) <= k:
        raise ValueError(f"the path needs more than k={k} steps, got {len(e) - 1}")
    T = int(np.flatnonzero(e >= floor * e[0])[-1])
    k = min(k, T - T % 2)
    if k < 2:
        raise ValueError(f"the error fell below floor={floor} within {T + 1} steps: too fast to measure")
    return float((e[T] / e[T - k]) ** (1.0 / k))


def iterations_to(values, tol):
    """First t with ``values[t] <= tol * values[0]``, or None if never.

    ``values`` is a decreasing quantity: an error norm or a loss gap ``L_t - L_star``.
    """
    values = np.asarray(values)
    hit = np.flatnonzero(values <= tol * values[0])
    return int(hit[0]) if hit.size else None


# --------------------------------------------------------------------------
# Logistic regression (labels 0/1)
# --------------------------------------------------------------------------

def _sigmoid(s):
    return 0.5 * (1.0 + np.tanh(0.5 * s))  # no overflow for large |s|


def logistic_loss(theta, X, y):
    """``L = (1/n) sum_r [log(1 + exp(s^r)) - y^r s^r]`` with ``s = A theta``."""
    X, y = _xy(X, y)
    s = design_matrix(X) @ np.asarray(theta, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def logistic_gradient(theta, X, y):
    """``g = (1/n) A^T (sigmoid(A theta) - y)``."""
    X, y = _xy(X, y)
    A = design_matrix(X)
    return A.T @ (_sigmoid(A @ np.asarray(theta, dtype=np.float64)) - y) / X.shape[0]


def logistic_optimum(X, y, steps=50):
    """The minimizer of :func:`logistic_loss` by Newton's method (a reference, not a demo).

    ``theta <- theta - H^{-1} g`` with ``H = (1/n) A^T diag(p (1 - p)) A``.
    Needs overlapping classes (separable data has no finite optimum).
    """
    X, y = _xy(X, y)
    A = design_matrix(X)
    theta = np.zeros(A.shape[1])
    for _ in range(steps):
        p = _sigmoid(A @ theta)
        g = A.T @ (p - y) / len(y)
        Hn = (A * (p * (1 - p))[:, None]).T @ A / len(y)
        step = np.linalg.solve(Hn, g)
        theta = theta - step
        if np.linalg.norm(step) < 1e-13 * (1 + np.linalg.norm(theta)):
            break
    return theta


# --------------------------------------------------------------------------
# Fitting by gradient descent, with a stopping tolerance
# --------------------------------------------------------------------------

def fit_gd(X, y, kind="linear", tol=1e-6, max_iter=50_000, lr=None):
    """Gradient descent from ``theta = 0`` until the loss gap falls by ``tol``.

    Stops at the first t with ``L_t - L_star <= tol * (L_0 - L_star)``, where
    ``L_star`` is the exact minimum (least squares, or Newton's method for
    ``kind="logistic"``). The default lr is ``1 / S``, the classic safe step
    for a loss whose curvature is at most S: ``S = lambda_max((2/n) A^T A)``
    for the MSE, ``S = lambda_max((1/n) A^T A) / 4`` for the logistic loss
    (``p (1 - p) <= 1/4``).

    Returns a dict: ``iterations`` (None if ``max_iter`` was reached),
    ``gaps`` (``L_t - L_star`` for every step run), ``theta``, ``lr``.
    """
    if kind not in ("linear", "logistic"):
        raise ValueError(f"kind must be 'linear' or 'logistic', got {kind!r}")
    X, y = _xy(X, y)
    A = design_matrix(X)
    n = X.shape[0]
    M = A.T @ A / n

    def loss_and_grad(th):          # one product A @ th serves both
        s = A @ th
        if kind == "linear":
            r = s - y
            return float(np.mean(r ** 2)), 2.0 / n * (A.T @ r)
        return float(np.mean(np.logaddexp(0.0, s) - y * s)), A.T @ (_sigmoid(s) - y) / n

    if kind == "linear":
        S = 2.0 * eigenvalues(M)[-1]
        L_star = loss_and_grad(optimum(X, y))[0]
    else:
        S = eigenvalues(M)[-1] / 4.0
        L_star = loss_and_grad(logistic_optimum(X, y))[0]
    lr = 1.0 / S if lr is None else lr
    theta = np.zeros(A.shape[1])
    gaps = []
    iterations = None
    for t in range(max_iter + 1):
        L, g = loss_and_grad(theta)
        gaps.append(L - L_star)
        if t > 0 and gaps[-1] <= tol * gaps[0]:
            iterations = t
            break
        if t < max_iter:
            theta = theta - lr * g
    return {"iterations": iterations, "gaps": np.array(gaps), "theta": theta, "lr": lr}


# --------------------------------------------------------------------------
# Inside a network: the inputs of deeper layers
# --------------------------------------------------------------------------

def random_mlp(widths, seed=0):
    """Weights of an MLP with layer widths ``widths = (d_in, h_1, ..., h_L)``.

    Initialized like ``torch.nn.Linear``: ``W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
    Returns a list of ``(W, b)`` with ``W`` of shape (fan_out, fan_in).
    """
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        bound = 1.0 / np.sqrt(fan_in)
        layers.append((rng.uniform(-bound, bound, (fan_out, fan_in)),
                       rng.uniform(-bound, bound, fan_out)))
    return layers


_ACTIVATIONS = {
    "relu": lambda z: np.maximum(z, 0.0),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    # a control: the same network without any nonlinearity
    "linear": lambda z: z,
}


def mlp_layers(X, layers, activation="sigmoid", standardize_z=False):
    """Forward X through the MLP; keep every layer's ``z`` and ``a``.

    ``activation``: ``"sigmoid"``, ``"tanh"``, ``"relu"`` or ``"linear"``
    (no nonlinearity, ``a = z``: a control).

    ``z^l = a^{l-1} W_l^T + b_l`` (the pre-activation), ``a^l = f(z^l)``,
    ``a^0 = X``. Returns ``(zs, acts)``: lists of arrays (n, h_l), one per layer.
    ``acts[l]`` is what layer l + 1 takes as its input: its "features".

    ``standardize_z=True`` standardizes each unit's ``z`` over the ``n``
    rows before the activation, ``a^l = f((z^l - mu) / sigma)``
    (:func:`bnlib.features.standardize`), as batch normalization does with
    a batch of ``n``; ``zs`` then holds the standardized values.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    f = _ACTIVATIONS[activation]
    a = _xy(X)
    zs, acts = [], []
    for W, b in layers:
        z = a @ W.T + b
        if standardize_z:
            z = standardize(z)[0]
        a = f(z)
        zs.append(z)
        acts.append(a)
    return zs, acts
