"""Tests for bnlib.surfaces against independent truths.

Truths: central finite differences in float64 (gradients, Hessians),
numpy.linalg (eigenvalues, condition numbers, normal equations), scikit-learn
(LinearRegression, LogisticRegression, log_loss), the closed form of gradient
descent on a quadratic (``e_t = (I - lr H)^t e_0``), and torch (the MLP forward).

Tolerances, and why:
- central differences with step h have truncation error O(h^2) and round-off
  O(eps_machine / h); with h = 1e-5 on values of order 1 both are ~1e-10, so
  we allow 1e-6 relative;
- closed forms and numpy.linalg agree to round-off: 1e-10 relative;
- measured convergence rates approach the predicted ones as the slower modes
  die out; after hundreds of steps the remaining gap is < 1e-3.
"""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import log_loss

from bnlib import features as F
from bnlib import surfaces as S

FD_RTOL = 1e-6
RTOL = 1e-10


@pytest.fixture
def reg():
    X, y = F.make_regression(200, scales=(0.5, 5.0), means=(1.0, -2.0), corr=0.3, noise=0.3, seed=0)
    return X, y


@pytest.fixture
def clf():
    return F.make_classification(200, scales=(0.5, 5.0), means=(1.0, -2.0), corr=0.3, separation=1.0, seed=0)


def central_diff(f, theta, h=1e-5):
    theta = np.asarray(theta, dtype=np.float64)
    g = np.zeros_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        g[i] = (f(theta + e) - f(theta - e)) / (2 * h)
    return g


# --------------------------------------------------------------------------
# Linear model
# --------------------------------------------------------------------------

def test_loss_is_mse(reg):
    X, y = reg
    theta = np.array([0.3, -1.0, 0.2])
    np.testing.assert_allclose(S.loss(theta, X, y), np.mean((theta[0] + X @ theta[1:] - y) ** 2), rtol=RTOL)


def test_gradient_finite_differences(reg):
    X, y = reg
    theta = np.array([0.3, -1.0, 0.2])
    fd = central_diff(lambda th: S.loss(th, X, y), theta)
    np.testing.assert_allclose(S.gradient(theta, X, y), fd, rtol=FD_RTOL)


def test_hessian_finite_differences(reg):
    X, y = reg
    theta = np.array([0.3, -1.0, 0.2])
    H_fd = np.stack([central_diff(lambda th: S.gradient(th, X, y)[i], theta) for i in range(3)])
    np.testing.assert_allclose(S.hessian(X), H_fd, rtol=FD_RTOL, atol=FD_RTOL * np.abs(H_fd).max())


def test_hessian_centred_is_block_diagonal(reg):
    X = reg[0] - reg[0].mean(axis=0)
    H = S.hessian(X)
    np.testing.assert_allclose(H[0], [2.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(H[1:, 1:], 2 * np.cov(X, rowvar=False, bias=True), rtol=RTOL)


def test_optimum_matches_sklearn(reg):
    X, y = reg
    theta = S.optimum(X, y)
    lr = LinearRegression().fit(X, y)
    np.testing.assert_allclose(theta, np.r_[lr.intercept_, lr.coef_], rtol=1e-9)
    np.testing.assert_allclose(S.gradient(theta, X, y), 0.0, atol=1e-10)


def test_loss_grid_matches_pointwise(reg):
    X, y = reg
    w1, w2, b = np.linspace(-2, 2, 5), np.linspace(-1, 1, 4), 0.7
    Z = S.loss_grid(X, y, w1, w2, b)
    assert Z.shape == (4, 5)
    ref = np.array([[S.loss([b, a, c], X, y) for a in w1] for c in w2])
    np.testing.assert_allclose(Z, ref, rtol=1e-9)


# --------------------------------------------------------------------------
# Curvature
# --------------------------------------------------------------------------

def test_eigenvalues_and_condition_number(reg):
    H = S.hessian(reg[0])
    lam = np.sort(np.linalg.eig(H)[0].real)
    np.testing.assert_allclose(S.eigenvalues(H), lam, rtol=1e-9)
    np.testing.assert_allclose(S.condition_number(H), np.linalg.cond(H), rtol=1e-9)
    np.testing.assert_allclose(S.max_stable_lr(H), 2 / lam[-1], rtol=1e-9)
    np.testing.assert_allclose(S.best_lr(H), 2 / (lam[0] + lam[-1]), rtol=1e-9)


def test_standardizing_and_whitening_improve_conditioning(reg):
    X = reg[0]
    k_raw = S.condition_number(S.hessian(X))
    k_std = S.condition_number(S.hessian(F.standardize(X)[0]))
    k_white = S.condition_number(S.hessian(F.whiten(X, eps=0.0)[0]))
    assert k_raw > 10 * k_std
    # standardized features with correlation r: kappa = (1 + |r|) / (1 - |r|) (bias eigenvalue 2 in between)
    r = np.corrcoef(X, rowvar=False)[0, 1]
    np.testing.assert_allclose(k_std, (1 + abs(r)) / (1 - abs(r)), rtol=1e-9)
    np.testing.assert_allclose(k_white, 1.0, rtol=1e-9)


def test_gd_closed_form(reg):
    # on a quadratic, gradient descent is e_t = (I - lr H)^t e_0 exactly
    X, y = reg
    H = S.hessian(X)
    theta_star = S.optimum(X, y)
    lr = 0.5 * S.max_stable_lr(H)
    path = S.linear_gd(X, y, lr, 30)
    e0 = path[0] - theta_star
    ref = np.stack([np.linalg.matrix_power(np.eye(3) - lr * H, t) @ e0 for t in range(31)])
    np.testing.assert_allclose(path - theta_star, ref, rtol=1e-7, atol=1e-9 * np.abs(e0).max())


def test_gradient_descent_generic_matches_linear_gd(reg):
    X, y = reg
    lr = 0.1 * S.max_stable_lr(S.hessian(X))
    p1 = S.gradient_descent(lambda th: S.gradient(th, X, y), np.zeros(3), lr, 10)
    np.testing.assert_allclose(p1, S.linear_gd(X, y, lr, 10), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("factor, converges", [(0.99, True), (1.01, False)])
def test_max_stable_lr_is_the_boundary(reg, factor, converges):
    X, y = reg
    H = S.hessian(X)
    theta_star = S.optimum(X, y)
    e = S.errors(S.linear_gd(X, y, factor * S.max_stable_lr(H), 2000), theta_star)
    assert (e[-1] < 1e-3 * e[0]) == converges
    assert (e[-1] > e[0]) == (not converges)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 1.05])
@pytest.mark.parametrize("standardized", [False, True])
def test_measured_rate_approaches_predicted(reg, fraction, standardized):
    # standardized: the error reaches round-off within tens of steps, so the
    # measurement must stop at the floor instead of reading ratios of noise
    X, y = reg
    if standardized:
        X = F.standardize(X)[0]
    H = S.hessian(X)
    lr = fraction * S.max_stable_lr(H)
    steps = 3000 if fraction < 0.5 else 600
    path = S.linear_gd(X, y, lr, steps)
    np.testing.assert_allclose(S.measured_rate(path, S.optimum(X, y)), S.predicted_rate(H, lr), rtol=1e-3)


def test_best_lr_rate_is_kappa_formula(reg):
    H = S.hessian(reg[0])
    k = S.condition_number(H)
    np.testing.assert_allclose(S.predicted_rate(H, S.best_lr(H)), (k - 1) / (k + 1), rtol=1e-9)


def test_iterations_to():
    assert S.iterations_to([8.0, 4.0, 2.0, 1.0], 0.25) == 2
    assert S.iterations_to([8.0, 4.0, 2.0, 1.0], 0.01) is None


# --------------------------------------------------------------------------
# Logistic regression
# --------------------------------------------------------------------------

def test_logistic_loss_matches_sklearn(clf):
    X, y = clf
    theta = np.array([0.1, 0.5, -0.05])
    p = 1 / (1 + np.exp(-(theta[0] + X @ theta[1:])))
    np.testing.assert_allclose(S.logistic_loss(theta, X, y), log_loss(y, p), rtol=1e-9)


def test_logistic_gradient_finite_differences(clf):
    X, y = clf
    theta = np.array([0.1, 0.5, -0.05])
    fd = central_diff(lambda th: S.logistic_loss(th, X, y), theta)
    np.testing.assert_allclose(S.logistic_gradient(theta, X, y), fd, rtol=FD_RTOL)


def test_logistic_optimum_matches_sklearn(clf):
    X, y = clf
    theta = S.logistic_optimum(X, y)
    np.testing.assert_allclose(S.logistic_gradient(theta, X, y), 0.0, atol=1e-12)
    sk = LogisticRegression(penalty=None, tol=1e-12, max_iter=10_000).fit(X, y)
    # lbfgs stops on its own tolerance: agreement to ~1e-5 is what it delivers
    np.testing.assert_allclose(theta, np.r_[sk.intercept_, sk.coef_[0]], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# Fitting to a tolerance
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_fit_gd_reaches_tolerance_and_normalizing_helps(clf, reg, kind):
    X, y = reg if kind == "linear" else clf
    raw = S.fit_gd(X, y, kind, tol=1e-6)
    std = S.fit_gd(F.standardize(X)[0], y, kind, tol=1e-6)
    white = S.fit_gd(F.whiten(X, eps=0.0)[0], y, kind, tol=1e-6)
    for r in (raw, std, white):
        assert r["iterations"] is not None
        assert r["gaps"][-1] <= 1e-6 * r["gaps"][0]
        assert len(r["gaps"]) == r["iterations"] + 1
    assert raw["iterations"] > std["iterations"] >= white["iterations"]
    if kind == "linear":
        # whitened: H = 2 I and lr = 1/2, so one step lands on the optimum
        assert white["iterations"] == 1
        np.testing.assert_allclose(raw["theta"], S.optimum(X, y), rtol=1e-2)


def test_fit_gd_max_iter():
    X, y = F.make_regression(100, scales=(1.0, 100.0), seed=0)
    r = S.fit_gd(X, y, "linear", tol=1e-12, max_iter=5)
    assert r["iterations"] is None and len(r["gaps"]) == 6


# --------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------

def test_random_mlp_init_bounds():
    layers = S.random_mlp((4, 8, 3), seed=0)
    assert [W.shape for W, _ in layers] == [(8, 4), (3, 8)]
    assert np.abs(layers[0][0]).max() <= 0.5 and np.abs(layers[1][0]).max() <= 1 / np.sqrt(8)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "linear"])
def test_mlp_layers_match_torch(activation):
    X = np.random.default_rng(0).standard_normal((10, 4))
    layers = S.random_mlp((4, 6, 5), seed=1)
    zs, acts = S.mlp_layers(X, layers, activation)
    f = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu,
         "linear": lambda z: z}[activation]
    a = torch.from_numpy(X)
    for (W, b), z_ref, a_ref in zip(layers, zs, acts):
        z = torch.nn.functional.linear(a, torch.from_numpy(W), torch.from_numpy(b))
        a = f(z)
        np.testing.assert_allclose(z_ref, z.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(a_ref, a.numpy(), rtol=1e-12, atol=1e-14)


def test_mlp_layers_standardize_z_is_batch_norm_before_the_activation():
    # Truth: torch's batch_norm in training mode (eps 0 is not allowed:
    # eps=1e-12, far below these variances) before the sigmoid.
    X = np.random.default_rng(0).standard_normal((50, 4))
    layers = S.random_mlp((4, 6, 5), seed=1)
    zs, acts = S.mlp_layers(X, layers, "sigmoid", standardize_z=True)
    a = torch.from_numpy(X)
    for (W, b), z_ref, a_ref in zip(layers, zs, acts):
        z = torch.nn.functional.linear(a, torch.from_numpy(W), torch.from_numpy(b))
        z = torch.nn.functional.batch_norm(z, None, None, training=True, eps=1e-12)
        a = torch.sigmoid(z)
        np.testing.assert_allclose(z_ref, z.numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(a_ref, a.numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(z_ref.std(axis=0), 1.0, rtol=1e-12)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

def test_bad_input(reg):
    X, y = reg
    with pytest.raises(ValueError, match=r"y must have shape \(200,\)"):
        S.loss(np.zeros(3), X, y[:5])
    with pytest.raises(ValueError, match="X must have shape"):
        S.hessian(np.ones(4))
    with pytest.raises(ValueError, match="exactly 2 features, got 3"):
        S.loss_grid(np.ones((4, 3)), np.ones(4), [0.0], [0.0], 0.0)
    with pytest.raises(ValueError, match="positive definite"):
        S.condition_number(np.diag([1.0, 0.0]))
    with pytest.raises(ValueError, match="lr must be positive"):
        S.linear_gd(X, y, 0.0, 3)
    with pytest.raises(ValueError, match="kind must be 'linear' or 'logistic'"):
        S.fit_gd(X, y, kind="svm")
    with pytest.raises(ValueError, match="activation must be one of"):
        S.mlp_layers(X, S.random_mlp((2, 3)), "gelu")
    with pytest.raises(ValueError, match="needs more than k=20 steps"):
        S.measured_rate(np.zeros((5, 3)), np.ones(3))
    with pytest.raises(ValueError, match="too fast to measure"):
        S.measured_rate(np.r_[[np.ones(3)], np.zeros((30, 3))], np.zeros(3))


def torch_optimizer_path(X, y, theta0, make_optimizer, steps):
    """The path of a torch optimizer on the linear model's MSE, in float64:
    the truth for bnlib.surfaces' own optimizers."""
    A, yt = torch.tensor(S.design_matrix(X)), torch.tensor(y)
    theta = torch.tensor(theta0, requires_grad=True)
    opt = make_optimizer([theta])
    path = [theta.detach().clone().numpy()]
    for _ in range(steps):
        opt.zero_grad()
        ((A @ theta - yt) ** 2).mean().backward()
        opt.step()
        path.append(theta.detach().clone().numpy())
    return np.array(path)


def test_adam_matches_torch_optim_adam(reg):
    """Adam's path on the linear model's MSE, step for step, against torch.optim.Adam (float64)."""
    X, y = reg
    theta0 = S.optimum(X, y) + np.array([-1.0, -4.0, 3.0])
    path = S.adam(lambda th: S.gradient(th, X, y), theta0, lr=0.05, steps=40)
    want = torch_optimizer_path(X, y, theta0, lambda p: torch.optim.Adam(p, lr=0.05), 40)
    np.testing.assert_allclose(path, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="lr must be positive"):
        S.adam(lambda th: th, theta0, 0.0, 3)


def test_heavy_ball_matches_torch_sgd_with_momentum(reg):
    """The path, step for step, against torch.optim.SGD(momentum=...) in
    float64; momentum 0 is plain gradient descent."""
    X, y = reg
    grad = lambda th: S.gradient(th, X, y)
    theta0 = S.optimum(X, y) + np.array([-1.0, -4.0, 3.0])
    path = S.heavy_ball(grad, theta0, lr=0.01, momentum=0.8, steps=40)
    want = torch_optimizer_path(X, y, theta0, lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.8), 40)
    np.testing.assert_allclose(path, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S.heavy_ball(grad, theta0, 0.01, 0.0, 40),
                               S.gradient_descent(grad, theta0, 0.01, 40), rtol=RTOL)
    with pytest.raises(ValueError, match="lr must be positive"):
        S.heavy_ball(grad, theta0, 0.0, 0.5, 3)
    with pytest.raises(ValueError, match="momentum"):
        S.heavy_ball(grad, theta0, 0.01, 1.0, 3)


def test_heavy_ball_rate_is_the_sqrt_kappa_formula():
    """Polyak's lr and momentum on a quadratic with kappa = 1e4: the error
    along each eigenvector follows (e_t, e_{t-1}) -> M (e_t, e_{t-1}) with
    M = [[1 + momentum - lr lambda, -momentum], [1, 0]], whose spectral radius
    is (sqrt(kappa) - 1) / (sqrt(kappa) + 1) for every lambda in the range
    (numpy.linalg.eigvals; a double root at both ends, found to ~sqrt(eps),
    hence 1e-6). The measured rate approaches it; at the ends the double root
    adds a factor t to rho^t, (1000 / 980)^(1/20) ~ 1.001 over the last 20 of
    1000 steps: hence 3e-3."""
    lam = np.array([0.01, 0.3, 7.0, 100.0])
    kappa = lam[-1] / lam[0]
    lr = 4 / (np.sqrt(lam[-1]) + np.sqrt(lam[0])) ** 2
    rho = (np.sqrt(kappa) - 1) / (np.sqrt(kappa) + 1)
    momentum = rho ** 2
    for l in lam:
        M = np.array([[1 + momentum - lr * l, -momentum], [1.0, 0.0]])
        assert np.abs(np.linalg.eigvals(M)).max() == pytest.approx(rho, abs=1e-6)
    H = np.diag(lam)
    path = S.heavy_ball(lambda th: H @ th, np.ones(4), lr, momentum, 1000)
    assert S.measured_rate(path, np.zeros(4)) == pytest.approx(rho, abs=3e-3)
    gd_rate = (kappa - 1) / (kappa + 1)
    assert rho < gd_rate - 0.01   # 0.980 against 0.9998


def test_grid_around():
    w1, w2 = S.grid_around([9.0, 1.0, -2.0], half=5.0, num=11)
    np.testing.assert_allclose(w1, np.linspace(-4.0, 6.0, 11))
    np.testing.assert_allclose(w2, np.linspace(-7.0, 3.0, 11))
    with pytest.raises(ValueError, match=r"\(b, w1, w2\)"):
        S.grid_around([1.0, 2.0])


def test_diagonal_preconditioning_is_standardizing_centred_inputs(reg):
    """Unit diagonal; for centred inputs the same eigenvalues as the Hessian of the standardized inputs."""
    X, y = reg
    Xc = X - X.mean(axis=0)
    P = S.diagonal_preconditioned(S.hessian(Xc))
    np.testing.assert_allclose(np.diag(P), 1.0)
    Xs = Xc / Xc.std(axis=0)
    np.testing.assert_allclose(S.eigenvalues(P), S.eigenvalues(S.hessian(Xs)) / 2, rtol=1e-10)


def test_condition_number_of_a_singular_hessian_always_raises():
    """A constant feature copies the bias column: H is singular, and its
    smallest eigenvalue is rounding noise of either sign. One answer: raise."""
    for value in (5.0, 0.7):
        X = np.column_stack([np.arange(6.0), np.full(6, value)])
        with pytest.raises(ValueError, match="singular"):
            S.condition_number(S.hessian(X))


@pytest.mark.parametrize("H,pattern", [
    ([[1.0, 100.0], [0.0, 1.0]], "symmetric"),
    ([[np.nan, 0.0], [0.0, 1.0]], "finite"),
    (np.zeros((0, 0)), "non-empty square"),
    (np.ones(3), "non-empty square"),
])
def test_eigenvalues_reject_what_eigvalsh_would_misread(H, pattern):
    with pytest.raises(ValueError, match=pattern):
        S.condition_number(H)
