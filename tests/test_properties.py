"""Property tests (hypothesis): closed-form facts of batch norm on random shapes and scales.

All in float64 so the tolerances can be tight; each states its own.
Examples are kept small (at most ~300 elements) and few (max_examples=50) so
the file runs in a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import bnlib.functional as BF
import bnlib.reference as R
from helpers import bnlib_bn_class, dim_of_shape

# Every test here runs on both CPU paths: the fused kernels and the tensor ops.
pytestmark = pytest.mark.usefixtures("each_cpu_path")

PROFILE = settings(
    deadline=None,
    max_examples=50,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    database=None,  # no .hypothesis directory left in the repository
)


@st.composite
def shapes(draw, min_n=2):
    ndim = draw(st.integers(2, 5))
    n = draw(st.integers(min_n, 6))
    c = draw(st.integers(1, 4))
    rest = [draw(st.integers(1, 3)) for _ in range(ndim - 2)]
    return (n, c, *rest)


@st.composite
def batches(draw, min_n=2):
    """A float64 batch with per-channel location in [-1e3, 1e3] and scale in [1e-2, 1e2]."""
    shape = draw(shapes(min_n))
    seed = draw(st.integers(0, 2**31 - 1))
    c = shape[1]
    g = torch.Generator().manual_seed(seed)
    view = [1, c] + [1] * (len(shape) - 2)
    loc = torch.tensor(draw(st.lists(st.floats(-1e3, 1e3), min_size=c, max_size=c)), dtype=torch.float64)
    log_scale = torch.tensor(draw(st.lists(st.floats(-2, 2), min_size=c, max_size=c)), dtype=torch.float64)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * (10.0**log_scale).view(view) + loc.view(view)
    return x


def _red(x):
    return [i for i in range(x.dim()) if i != 1]


def _module(x, **kw):
    return bnlib_bn_class(dim_of_shape(x.shape))(x.shape[1], dtype=torch.float64, **kw)


@PROFILE
@given(x=batches(), eps=st.sampled_from([1e-5, 1e-3, 1.0]))
def test_x_hat_mean_zero_and_variance(x, eps):
    """affine=False output per channel: mean 0 and biased variance var/(var+eps).

    Tolerances: the mean of x_hat is a sum of O(1) values, atol 1e-9; the
    variance ratio is computed in float64 on both sides, rtol 1e-8 (the
    input's location up to 1e3 costs ~1e3*eps_f64 relative in x - mu).
    """
    y = _module(x, eps=eps, affine=False)(x)
    dims = _red(x)
    var = x.var(dims, unbiased=False)
    torch.testing.assert_close(y.mean(dims), torch.zeros_like(var), atol=1e-9, rtol=0)
    torch.testing.assert_close(y.var(dims, unbiased=False), var / (var + eps), rtol=1e-8, atol=1e-10)


@PROFILE
@given(x=batches(), data=st.data())
def test_invariance_to_per_channel_affine_input(x, data):
    """BN(a*x + b) == BN(x) for per-channel a > 0, b (training mode, float64).

    With eps > 0 this holds only up to eps/var: var(a x) = a^2 var, so the
    two outputs differ by about eps/(2 min(var, a^2 var)) relative. With
    eps=1e-12 and both variances >= 1e-6 (degenerate draws are skipped) that
    is <= 5e-7, so rtol 2e-6. atol: the location (<= 1e3) and shift (<= 1e3)
    cost <= 2e3 * 2e-16 in x - mu against a std >= 1e-3, i.e. ~4e-10.
    """
    c = x.shape[1]
    view = [1, c] + [1] * (x.dim() - 2)
    a = torch.tensor(data.draw(st.lists(st.floats(1e-2, 1e2), min_size=c, max_size=c)), dtype=torch.float64)
    b = torch.tensor(data.draw(st.lists(st.floats(-1e3, 1e3), min_size=c, max_size=c)), dtype=torch.float64)
    var = x.var(_red(x), unbiased=False)
    assume(bool(var.min() >= 1e-6) and bool(((a**2) * var).min() >= 1e-6))
    eps = 1e-12
    y1 = BF.batch_norm(x, None, None, training=True, eps=eps)
    y2 = BF.batch_norm(a.view(view) * x + b.view(view), None, None, training=True, eps=eps)
    torch.testing.assert_close(y2, y1, rtol=2e-6, atol=1e-8)


@PROFILE
@given(x=batches(), s=st.floats(1e-2, 1e2), eps=st.sampled_from([1e-5, 1e-1]))
def test_scalar_scale_invariance_with_scaled_eps(x, s, eps):
    """Exact form: BN_eps(x) == BN_{s^2 eps}(s x) for a scalar s > 0 (rtol 1e-9, float64 rounding)."""
    y1 = BF.batch_norm(x, None, None, training=True, eps=eps)
    y2 = BF.batch_norm(s * x, None, None, training=True, eps=eps * s * s)
    torch.testing.assert_close(y2, y1, rtol=1e-9, atol=1e-9)


@PROFILE
@given(x=batches(min_n=1), data=st.data())
def test_eval_output_is_affine_in_input(x, data):
    """Eval mode: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias,
    per channel (closed form; rtol 1e-10, float64 rounding), hence linear:
    y(x1 + x2) - y(0) = (y(x1) - y(0)) + (y(x2) - y(0))."""
    c = x.shape[1]
    m = _module(x, eps=1e-3).eval()
    floats = lambda lo, hi: torch.tensor(  # noqa: E731
        data.draw(st.lists(st.floats(lo, hi), min_size=c, max_size=c)), dtype=torch.float64
    )
    with torch.no_grad():
        m.running_mean.copy_(floats(-10, 10))
        m.running_var.copy_(floats(1e-2, 1e2))
        m.weight.copy_(floats(-3, 3))
        m.bias.copy_(floats(-3, 3))
        view = [1, c] + [1] * (x.dim() - 2)
        expect = (x - m.running_mean.view(view)) / torch.sqrt(m.running_var.view(view) + 1e-3) * m.weight.view(
            view
        ) + m.bias.view(view)
        y = m(x)
        torch.testing.assert_close(y, expect, rtol=1e-10, atol=1e-9)
        x2 = torch.flip(x, [0])
        y0 = m(torch.zeros_like(x))
        torch.testing.assert_close(m(x + x2) - y0, (y - y0) + (m(x2) - y0), rtol=1e-9, atol=1e-7)


@PROFILE
@given(x=batches(), momentum=st.sampled_from([0.1, 0.5, None]), steps=st.integers(1, 3), data=st.data())
def test_reference_equals_nn(x, momentum, steps, data):
    """bnlib.reference and bnlib.nn in float64 agree on outputs, grads and running stats
    over a few steps (rtol 1e-9: two float64 implementations, summation order only)."""
    c = x.shape[1]
    ref = R.BatchNorm(c, momentum=momentum)
    mod = _module(x, momentum=momentum)
    w = np.asarray(data.draw(st.lists(st.floats(0.1, 3), min_size=c, max_size=c)))
    b = np.asarray(data.draw(st.lists(st.floats(-3, 3), min_size=c, max_size=c)))
    ref.gamma[...] = w
    ref.beta[...] = b
    with torch.no_grad():
        mod.weight.copy_(torch.from_numpy(w))
        mod.bias.copy_(torch.from_numpy(b))
    for i in range(steps):
        xi = x * (1 + i) + i
        dy = torch.cos(torch.arange(x.numel(), dtype=torch.float64)).view(x.shape)
        xt = xi.clone().requires_grad_(True)
        y_mod = mod(xt)
        (y_mod * dy).sum().backward()
        y_ref = ref(xi.numpy())
        dx_ref = ref.backward(dy.numpy())
        # scale-aware: outputs are O(1..10), grads scale like 1/std (std >= 1e-2)
        np.testing.assert_allclose(y_ref, y_mod.detach().numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(dx_ref, xt.grad.numpy(), rtol=1e-8, atol=1e-7)
        np.testing.assert_allclose(ref.dgamma, mod.weight.grad.numpy(), rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(ref.dbeta, mod.bias.grad.numpy(), rtol=1e-9, atol=1e-9)
        mod.weight.grad = mod.bias.grad = None
        np.testing.assert_allclose(ref.running_mean, mod.running_mean.numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(ref.running_var, mod.running_var.numpy(), rtol=1e-9, atol=1e-9)
        assert int(ref.num_batches_tracked) == int(mod.num_batches_tracked)
