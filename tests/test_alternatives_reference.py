"""bnlib.reference's layer, group, instance norm and batch renorm (NumPy) against
torch.nn.functional (the truth for outputs and autograd gradients, float64),
central finite differences (float64), closed forms and bad input.

Tolerances: float64 against torch differs only in summation order, a few ulps
on at most a few hundred values per group, so 1e-10 (absolute, values of
order 1) leaves a wide margin while catching any algorithmic slip (n vs n-1
alone is a 1e-2 error). Finite differences with step h = 1e-6 have truncation
error O(h^2) ~ 1e-12 and rounding error ~ 1e-16 / h ~ 1e-10, so 1e-7.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnlib.reference as ref
import bnlib.reference_alternatives as ra

TOL = dict(rtol=1e-10, atol=1e-10)
FD_TOL = dict(rtol=1e-7, atol=1e-7)


def _rand(shape, seed=0, mean=1.5, std=2.0):
    rng = np.random.default_rng(seed)
    return mean + std * rng.normal(size=shape)


def _torch_grads(fn, x, params, dy):
    """Output and autograd gradients of ``fn(x, *params)`` for upstream ``dy``."""
    xt = torch.tensor(x, requires_grad=True)
    pt = [None if p is None else torch.tensor(p, requires_grad=True) for p in params]
    y = fn(xt, *pt)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), xt.grad.numpy(), [None if p is None else p.grad.numpy() for p in pt]


def _finite_difference(f, x, dy, h=1e-6):
    """d/dx of sum(f(x) * dy) by central differences, one element at a time."""
    grad = np.zeros_like(x)
    flat = x.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        plus = np.sum(f(x) * dy)
        flat[i] = old - h
        minus = np.sum(f(x) * dy)
        flat[i] = old
        grad.reshape(-1)[i] = (plus - minus) / (2 * h)
    return grad


def test_reexported_from_reference_and_numpy_only():
    for name in ra.__all__:
        assert getattr(ref, name) is getattr(ra, name)
    code = "import sys, bnlib.reference; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reexported_whichever_module_is_imported_first():
    """Imported before bnlib.reference, bnlib.reference_alternatives used to
    leave bnlib.reference without its names (an import cycle: each imports
    the other), and a test file that imported it first broke later ones."""
    code = ("import bnlib.reference_alternatives as ra, bnlib.reference as ref; "
            "missing = [n for n in ra.__all__ if getattr(ref, n, None) is not getattr(ra, n)]; "
            "assert not missing, missing")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------
# Against torch.nn.functional
# --------------------------------------------------------------------------

LN_CASES = [((4, 6), (6,)), ((3, 4, 5), (5,)), ((3, 4, 5), (4, 5)), ((2, 3, 4, 2), (3, 4, 2)), ((1, 7), (7,))]


@pytest.mark.parametrize("shape,normalized_shape", LN_CASES)
@pytest.mark.parametrize("affine", ["both", "gamma", "none"])
def test_layernorm_vs_torch(shape, normalized_shape, affine):
    x = _rand(shape)
    rng = np.random.default_rng(1)
    gamma = rng.uniform(0.5, 1.5, normalized_shape) if affine != "none" else None
    beta = rng.normal(size=normalized_shape) if affine == "both" else None
    dy = rng.normal(size=shape)
    y, cache = ref.layernorm_forward(x, gamma, beta, normalized_shape=normalized_shape)
    dx, dgamma, dbeta = ref.layernorm_backward(dy, cache)
    y_t, dx_t, (dg_t, db_t) = _torch_grads(lambda a, g, b: F.layer_norm(a, normalized_shape, g, b), x, [gamma, beta], dy)
    np.testing.assert_allclose(y, y_t, **TOL)
    np.testing.assert_allclose(dx, dx_t, **TOL)
    assert (dgamma is None) == (gamma is None) and (dbeta is None) == (beta is None)
    if gamma is not None:
        np.testing.assert_allclose(dgamma, dg_t, **TOL)
    if beta is not None:
        np.testing.assert_allclose(dbeta, db_t, **TOL)
    k = len(normalized_shape)
    assert cache.mu.shape == shape[: len(shape) - k] and cache.var.shape == shape[: len(shape) - k]


def test_layernorm_default_axes_and_torch_order():
    """Without gamma: every axis but 0 (the GN paper's LN); with gamma: its shape;
    torch's argument order (x, normalized_shape, gamma, beta, eps) gives the same."""
    x = _rand((3, 4, 5))
    y, _ = ref.layernorm_forward(x)
    np.testing.assert_allclose(y, F.layer_norm(torch.tensor(x), (4, 5)).numpy(), **TOL)
    gamma, beta = np.full(5, 2.0), np.full(5, 0.5)
    y1, _ = ref.layernorm_forward(x, gamma, beta, 1e-3)
    y2, _ = ref.layernorm_forward(x, (5,), gamma, beta, 1e-3)
    y3, _ = ref.layernorm_forward(x, 5, gamma)
    expected = F.layer_norm(torch.tensor(x), (5,), torch.tensor(gamma), torch.tensor(beta), 1e-3).numpy()
    np.testing.assert_allclose(y1, expected, **TOL)
    np.testing.assert_allclose(y2, expected, **TOL)
    np.testing.assert_allclose(y3, F.layer_norm(torch.tensor(x), (5,), torch.tensor(gamma)).numpy(), **TOL)


GN_CASES = [((4, 6), 3), ((3, 6, 5), 2), ((2, 4, 3, 3), 1), ((2, 4, 3, 3), 4), ((3, 6, 2, 3), 3), ((1, 4, 5), 2)]


@pytest.mark.parametrize("shape,num_groups", GN_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm_vs_torch(shape, num_groups, affine):
    c = shape[1]
    x = _rand(shape, seed=2)
    rng = np.random.default_rng(3)
    gamma = rng.uniform(0.5, 1.5, c) if affine else None
    beta = rng.normal(size=c) if affine else None
    dy = rng.normal(size=shape)
    y, cache = ref.groupnorm_forward(x, gamma, beta, num_groups)
    dx, dgamma, dbeta = ref.groupnorm_backward(dy, cache)
    y_t, dx_t, (dg_t, db_t) = _torch_grads(lambda a, g, b: F.group_norm(a, num_groups, g, b), x, [gamma, beta], dy)
    np.testing.assert_allclose(y, y_t, **TOL)
    np.testing.assert_allclose(dx, dx_t, **TOL)
    if affine:
        np.testing.assert_allclose(dgamma, dg_t, **TOL)
        np.testing.assert_allclose(dbeta, db_t, **TOL)
    else:
        assert dgamma is None and dbeta is None
    assert cache.mu.shape == (shape[0], num_groups)


def test_groupnorm_torch_argument_order():
    x = _rand((3, 6, 4))
    gamma, beta = np.linspace(0.5, 2, 6), np.linspace(-1, 1, 6)
    y1, _ = ref.groupnorm_forward(x, gamma, beta, 3, 1e-3)
    y2, _ = ref.groupnorm_forward(x, 3, gamma, beta, 1e-3)
    y3, _ = ref.groupnorm_forward(x, num_groups=3, gamma=gamma, beta=beta, eps=1e-3)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(y1, y3)


@pytest.mark.parametrize("shape", [(4, 3, 5), (2, 3, 4, 5), (3, 2, 2, 3, 2), (1, 1, 2)])
def test_instancenorm_vs_torch(shape):
    c = shape[1]
    x = _rand(shape, seed=4)
    rng = np.random.default_rng(5)
    gamma, beta, dy = rng.uniform(0.5, 1.5, c), rng.normal(size=c), rng.normal(size=shape)
    y, cache = ref.instancenorm_forward(x, gamma, beta)
    dx, dgamma, dbeta = ref.instancenorm_backward(dy, cache)
    y_t, dx_t, (dg_t, db_t) = _torch_grads(lambda a, g, b: F.instance_norm(a, weight=g, bias=b), x, [gamma, beta], dy)
    for ours, theirs in [(y, y_t), (dx, dx_t), (dgamma, dg_t), (dbeta, db_t)]:
        np.testing.assert_allclose(ours, theirs, **TOL)
    assert cache.mu.shape == shape[:2]


def test_group_norm_special_cases_are_layer_and_instance_norm():
    """GN with one group is LN over (C, H, W); with C groups it is IN (closed forms of the GN paper)."""
    x = _rand((3, 4, 2, 5), seed=6)
    y_gn1, _ = ref.groupnorm_forward(x, None, None, 1)
    y_ln, _ = ref.layernorm_forward(x)
    np.testing.assert_allclose(y_gn1, y_ln, **TOL)
    y_gnc, _ = ref.groupnorm_forward(x, None, None, 4)
    y_in, _ = ref.instancenorm_forward(x)
    np.testing.assert_allclose(y_gnc, y_in, **TOL)


def test_statistics_do_not_depend_on_the_batch():
    """LN, GN and IN of a sample are the same alone or in a batch (unlike BN)."""
    x = _rand((5, 4, 3, 3), seed=7)
    for forward in (lambda a: ref.layernorm_forward(a)[0], lambda a: ref.groupnorm_forward(a, None, None, 2)[0],
                    lambda a: ref.instancenorm_forward(a)[0]):
        np.testing.assert_allclose(forward(x)[2:3], forward(x[2:3]), **TOL)


# --------------------------------------------------------------------------
# Finite differences (float64)
# --------------------------------------------------------------------------

FD_CASES = {
    "layernorm": (lambda x, g, b: ref.layernorm_forward(x, g, b), ref.layernorm_backward, (3, 2, 4), (2, 4)),
    "groupnorm": (lambda x, g, b: ref.groupnorm_forward(x, g, b, 2), ref.groupnorm_backward, (2, 4, 3), (4,)),
    "instancenorm": (lambda x, g, b: ref.instancenorm_forward(x, g, b), ref.instancenorm_backward, (2, 3, 4), (3,)),
}


@pytest.mark.parametrize("name", sorted(FD_CASES))
def test_backward_vs_finite_differences(name):
    forward, backward, shape, pshape = FD_CASES[name]
    rng = np.random.default_rng(8)
    x, dy = _rand(shape, seed=9), rng.normal(size=shape)
    gamma, beta = rng.uniform(0.5, 1.5, pshape), rng.normal(size=pshape)
    _, cache = forward(x, gamma, beta)
    dx, dgamma, dbeta = backward(dy, cache)
    np.testing.assert_allclose(dx, _finite_difference(lambda a: forward(a, gamma, beta)[0], x.copy(), dy), **FD_TOL)
    np.testing.assert_allclose(dgamma, _finite_difference(lambda g: forward(x, g, beta)[0], gamma.copy(), dy), **FD_TOL)
    np.testing.assert_allclose(dbeta, _finite_difference(lambda b: forward(x, gamma, b)[0], beta.copy(), dy), **FD_TOL)


# --------------------------------------------------------------------------
# Batch renorm
# --------------------------------------------------------------------------


def _brn_inputs(shape=(6, 3, 4), seed=10):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = _rand(shape, seed=seed)
    return x, rng.uniform(0.5, 1.5, c), rng.normal(size=c), rng.normal(size=c), rng.uniform(0.5, 4.0, c), rng.normal(size=shape)


def test_batchrenorm_is_batchnorm_without_room():
    """r_max = 1, d_max = 0: r = 1, d = 0, and BN's output and gradients exactly (up to rounding)."""
    x, gamma, beta, rm, rv, dy = _brn_inputs()
    y, cache = ref.batchrenorm_forward(x, gamma, beta, rm, rv, r_max=1.0, d_max=0.0)
    y_bn, cache_bn = ref.batchnorm_forward(x, gamma, beta)
    np.testing.assert_allclose(y, y_bn, **TOL)
    np.testing.assert_array_equal(cache.r, 1.0)
    np.testing.assert_array_equal(cache.d, 0.0)
    for ours, theirs in zip(ref.batchrenorm_backward(dy, cache), ref.batchnorm_backward(dy, cache_bn)):
        np.testing.assert_allclose(ours, theirs, **TOL)


def test_batchrenorm_closed_form_and_clipping():
    """r and d against the paper's formulas with sigma = sqrt(running_var + eps), and their clipping."""
    x, gamma, beta, rm, rv, _ = _brn_inputs()
    eps, r_max, d_max = 1e-5, 1.5, 0.3
    y, cache = ref.batchrenorm_forward(x, gamma, beta, rm, rv, r_max=r_max, d_max=d_max, eps=eps)
    mu, var = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
    sigma_b, sigma = np.sqrt(var + eps), np.sqrt(rv + eps)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu - rm) / sigma, -d_max, d_max)
    np.testing.assert_allclose(cache.r, r, **TOL)
    np.testing.assert_allclose(cache.d, d, **TOL)
    assert np.any(np.abs(cache.d) == d_max), "the test should exercise clipping"
    x_hat = (x - mu[None, :, None]) / sigma_b[None, :, None] * r[None, :, None] + d[None, :, None]
    np.testing.assert_allclose(y, gamma[None, :, None] * x_hat + beta[None, :, None], **TOL)
    # without clipping the output is the running-statistics normalization: (x - rm) / sigma
    y_free, _ = ref.batchrenorm_forward(x, None, None, rm, rv, r_max=1e6, d_max=1e6, eps=eps)
    np.testing.assert_allclose(y_free, (x - rm[None, :, None]) / sigma[None, :, None], **TOL)


def test_batchrenorm_backward_vs_finite_differences_with_r_d_fixed():
    """The stop-gradient backward is the derivative of the forward with r and d frozen."""
    x, gamma, beta, rm, rv, dy = _brn_inputs(shape=(4, 2, 3), seed=11)
    y, cache = ref.batchrenorm_forward(x, gamma, beta, rm, rv, r_max=2.0, d_max=1.0)
    dx, dgamma, dbeta = ref.batchrenorm_backward(dy, cache)
    r, d = cache.r[None, :, None], cache.d[None, :, None]

    def frozen(a, g=gamma, b=beta):
        mu = a.mean(axis=(0, 2), keepdims=True)
        sigma_b = np.sqrt(a.var(axis=(0, 2), keepdims=True) + 1e-5)
        return g[None, :, None] * ((a - mu) / sigma_b * r + d) + b[None, :, None]

    np.testing.assert_allclose(frozen(x), y, **TOL)
    np.testing.assert_allclose(dx, _finite_difference(frozen, x.copy(), dy), **FD_TOL)
    np.testing.assert_allclose(dgamma, _finite_difference(lambda g: frozen(x, g=g), gamma.copy(), dy), **FD_TOL)
    np.testing.assert_allclose(dbeta, _finite_difference(lambda b: frozen(x, b=b), beta.copy(), dy), **FD_TOL)


# --------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["layer", "group", "instance", "renorm"])
def test_float32_large_mean_variance_is_stable(method):
    """float32 with mean 1e4 and std 1: the variance within 1e-3 (relative) of float64's."""
    x64 = 1e4 + _rand((4, 4, 64), seed=12, mean=0.0, std=1.0)
    x32 = x64.astype(np.float32)
    run = {
        "layer": lambda a: ref.layernorm_forward(a)[1].var,
        "group": lambda a: ref.groupnorm_forward(a, None, None, 2)[1].var,
        "instance": lambda a: ref.instancenorm_forward(a)[1].var,
        "renorm": lambda a: ref.batchrenorm_forward(a, None, None, np.zeros(4), np.ones(4))[1].var,
    }[method]
    v32, v64 = run(x32), run(x64)
    assert v32.dtype == np.float32
    np.testing.assert_allclose(v32, v64, rtol=1e-3)


def test_half_input_is_computed_in_float32():
    x16 = _rand((3, 4, 8), seed=13).astype(np.float16)
    for y, _ in (ref.layernorm_forward(x16), ref.groupnorm_forward(x16, None, None, 2), ref.instancenorm_forward(x16)):
        assert y.dtype == np.float32
    y, _ = ref.layernorm_forward(x16)
    expected, _ = ref.layernorm_forward(x16.astype(np.float64))
    np.testing.assert_allclose(y, expected, atol=1e-5)  # float32 arithmetic on the same float16 values


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def test_bad_input_raises_value_error():
    x = _rand((4, 6, 3))
    with pytest.raises(ValueError, match=r"normalized_shape=\[5\].*\[4, 6, 3\]"):
        ref.layernorm_forward(x, normalized_shape=(5,))
    with pytest.raises(ValueError, match=r"gamma should have shape \(6, 3\), got \(3,\)"):
        ref.layernorm_forward(x, np.ones(3), None, normalized_shape=(6, 3))
    with pytest.raises(ValueError, match=r"num_channels \(6\) must be divisible by num_groups \(4\)"):
        ref.groupnorm_forward(x, None, None, 4)
    with pytest.raises(ValueError, match="num_groups"):
        ref.groupnorm_forward(x, None, None, 0)
    with pytest.raises(ValueError, match=r"gamma should have shape \(6,\), got \(5,\)"):
        ref.groupnorm_forward(x, np.ones(5), None, 3)
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        ref.instancenorm_forward(x[:, :, 0])
    with pytest.raises(ValueError, match="eps"):
        ref.instancenorm_forward(x, eps=0.0)
    with pytest.raises(ValueError, match="r_max"):
        ref.batchrenorm_forward(x, None, None, np.zeros(6), np.ones(6), r_max=0.5)
    with pytest.raises(ValueError, match="d_max"):
        ref.batchrenorm_forward(x, None, None, np.zeros(6), np.ones(6), d_max=-1.0)
    with pytest.raises(ValueError, match=r"running_var should have shape \(6,\)"):
        ref.batchrenorm_forward(x, None, None, np.zeros(6), np.ones(5))


def test_inputs_are_not_modified():
    x = _rand((3, 4, 5))
    before = x.copy()
    for forward in (lambda a: ref.layernorm_forward(a), lambda a: ref.groupnorm_forward(a, None, None, 2),
                    lambda a: ref.instancenorm_forward(a),
                    lambda a: ref.batchrenorm_forward(a, None, None, np.zeros(4), np.ones(4))):
        forward(x)
        np.testing.assert_array_equal(x, before)


def test_layernorm_torch_order_with_keywords():
    """torch's order (x, normalized_shape, weight, bias, eps) with eps by keyword
    gives F.layer_norm's result (eps was silently replaced by 1e-5)."""
    x = np.random.default_rng(0).normal(size=(3, 4)) * 0.05
    w, b = np.arange(1.0, 5.0), np.arange(4.0)
    t = torch.tensor
    cases = [
        (ra.layernorm_forward(x, 4, eps=0.1), F.layer_norm(t(x), (4,), eps=0.1)),
        (ra.layernorm_forward(x, (4,), w, eps=0.1), F.layer_norm(t(x), (4,), t(w), eps=0.1)),
        (ra.layernorm_forward(x, [4], w, b, eps=0.1), F.layer_norm(t(x), (4,), t(w), t(b), eps=0.1)),
        (ra.layernorm_forward(x, w, b, eps=0.1), F.layer_norm(t(x), (4,), t(w), t(b), eps=0.1)),
    ]
    for (y, _), expected in cases:
        np.testing.assert_allclose(y, expected.numpy(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="eps twice"):
        ra.layernorm_forward(x, w, b, 0.1, eps=0.2)
    with pytest.raises(ValueError, match="normalized_shape twice"):
        ra.layernorm_forward(x, (4,), normalized_shape=(4,))


def test_numpy_eps_accepted():
    x = np.random.default_rng(0).normal(size=(2, 4, 3))
    y, _ = ra.groupnorm_forward(x, None, None, 2, eps=np.float32(1e-5))
    np.testing.assert_allclose(y, ra.groupnorm_forward(x, None, None, 2, eps=1e-5)[0], rtol=1e-6)


def test_backwards_refuse_a_dy_of_another_shape():
    """NumPy would broadcast a (N, 1) dy, or reshape a transposed one, without
    a word: every backward checks dy's shape."""
    x = np.random.default_rng(0).standard_normal((6, 3, 4))
    cases = {
        "layernorm_backward": (ra.layernorm_forward(x, np.ones(4))[1], ra.layernorm_backward),
        "groupnorm_backward": (ra.groupnorm_forward(x, num_groups=3)[1], ra.groupnorm_backward),
        "instancenorm_backward": (ra.instancenorm_forward(x)[1], ra.instancenorm_backward),
        "rmsnorm_backward": (ra.rmsnorm_forward(x, np.ones(4))[1], ra.rmsnorm_backward),
        "frn_backward": (ra.frn_forward(x)[1], ra.frn_backward),
        "batchrenorm_backward": (ra.batchrenorm_forward(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3))[1],
                                 ra.batchrenorm_backward),
    }
    for name, (cache, backward) in cases.items():
        with pytest.raises(ValueError, match=f"{name} expected dy of the input's shape"):
            backward(np.ones((6, 3, 1)), cache)
    _, cache = ra.weightstd_forward(np.random.default_rng(1).standard_normal((4, 3)))
    with pytest.raises(ValueError, match="weightstd_backward expected dy"):
        ra.weightstd_backward(np.ones((3, 4)), cache)


def test_references_refuse_complex_input():
    with pytest.raises(ValueError, match="real numbers"):
        ra.layernorm_forward(np.ones((2, 3)) + 1j)


def test_batch_renorm_removes_the_mean_s_rounding_error():
    """A constant float32 channel: r_max = 1, d_max = 0 is batch norm, which
    gives exactly 0 (the mean's rounding error is measured and removed)."""
    x = np.full((100, 2), 10000.1, np.float32)
    y, cache = ra.batchrenorm_forward(x, None, None, np.zeros(2), np.ones(2), r_max=1.0, d_max=0.0)
    assert np.abs(y).max() == 0 and np.all(cache.var == 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r_max="3"), "r_max must be a number >= 1"), (dict(r_max=True), "r_max must be a number >= 1"),
    (dict(d_max=None), "d_max must be a number >= 0"),
    (dict(running_var=-np.ones(3)), "running_var must be >= 0"),
])
def test_batch_renorm_refuses_bad_limits_and_estimates(kwargs, message):
    args = dict(running_mean=np.zeros(3), running_var=np.ones(3)) | kwargs
    with pytest.raises(ValueError, match=message):
        ra.batchrenorm_forward(_rand((4, 3)), None, None, **args)


@pytest.mark.parametrize("eps", ["1e-5", True, float("inf"), float("nan"), 0.0])
def test_frn_refuses_a_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        ra.frn_forward(_rand((2, 3, 2, 2)), eps=eps)


def _backward_calls():
    x = _rand((2, 4, 3))
    return {
        "layernorm": (ra.layernorm_backward, ra.layernorm_forward(x)[1], x.shape),
        "groupnorm": (ra.groupnorm_backward, ra.groupnorm_forward(x, num_groups=2)[1], x.shape),
        "instancenorm": (ra.instancenorm_backward, ra.instancenorm_forward(x)[1], x.shape),
        "rmsnorm": (ra.rmsnorm_backward, ra.rmsnorm_forward(x)[1], x.shape),
        "frn": (ra.frn_backward, ra.frn_forward(x)[1], x.shape),
        "batchrenorm": (ra.batchrenorm_backward,
                        ra.batchrenorm_forward(x, None, None, np.zeros(4), np.ones(4))[1], x.shape),
        "weightstd": (ra.weightstd_backward, ra.weightstd_forward(x)[1], x.shape),
    }


@pytest.mark.parametrize("name", list(_backward_calls()))
@pytest.mark.parametrize("kind", ["bool", "complex"])
def test_every_backward_refuses_a_dy_that_is_not_real_numbers(name, kind):
    backward, cache, shape = _backward_calls()[name]
    dy = np.ones(shape, bool) if kind == "bool" else np.ones(shape) * (1 + 1j)
    with pytest.raises(ValueError, match="expected an array of real numbers"):
        backward(dy, cache)


def test_every_cache_holds_a_copy_of_gamma():
    """An in-place change of gamma between forward and backward (an
    optimizer's step) must not change the gradients."""
    x, dy = _rand((2, 4, 3)), _rand((2, 4, 3), seed=1)
    for forward, backward, gamma in [
        (lambda x, g: ra.groupnorm_forward(x, g, None, num_groups=2), ra.groupnorm_backward, _rand(4, seed=2)),
        (lambda x, g: ra.layernorm_forward(x, g, None), ra.layernorm_backward, _rand((4, 3), seed=3)),
        (lambda x, g: ra.rmsnorm_forward(x, g), ra.rmsnorm_backward, _rand((4, 3), seed=4)),
    ]:
        expected = backward(dy, forward(x, gamma.copy())[1])[0]
        _, cache = forward(x, gamma)
        gamma *= 2
        np.testing.assert_array_equal(backward(dy, cache)[0], expected)


def test_a_list_of_ints_in_layer_norm_s_second_place():
    """torch's normalized_shape or this module's gamma: the reading that fits
    the input, a ValueError where both fit."""
    x = _rand((4, 2, 2))
    with pytest.raises(ValueError, match="both as torch's normalized_shape and as gamma"):
        ra.layernorm_forward(x, [2, 2])
    np.testing.assert_allclose(ra.layernorm_forward(x, [2, 2], normalized_shape=(2,))[0],
                               ra.layernorm_forward(x, np.array([2.0, 2.0]))[0], **TOL)
    y = _rand((4, 3))
    np.testing.assert_allclose(ra.layernorm_forward(y, [1, 2, 3])[0],
                               ra.layernorm_forward(y, np.array([1.0, 2.0, 3.0]))[0], **TOL)
    assert ra.layernorm_forward(y, [3])[1].gamma is None  # torch's order: normalized_shape (3,)


@pytest.mark.parametrize("gamma", [np.ones(3) * (1 + 1j), np.array(["1", "2", "3"]), np.array([True, False, True])],
                         ids=["complex", "strings", "bools"])
def test_reference_parameters_must_be_real_numbers(gamma):
    """A complex gamma lost its imaginary part (a warning at most), a string
    one was parsed, a boolean one taken as 0 and 1."""
    x = np.random.default_rng(0).standard_normal((4, 3))
    with pytest.raises(ValueError, match="expected an array of real numbers"):
        ref.batchnorm_forward(x, gamma, np.zeros(3))
    with pytest.raises(ValueError, match="gamma expected an array of real numbers"):
        ra.layernorm_forward(x, gamma, np.zeros(3))
