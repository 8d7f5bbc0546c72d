"""bnlib.nn.weight_standardization (Qiao et al. 2019; the scaled form of
Brock et al. 2021) and its NumPy reference.

torch has no weight standardization, so the truth here is its definition,
layer norm of the weight's rows, computed with torch's own
``torch.nn.functional.layer_norm`` and differentiated by torch's autograd;
the hand-written backward is also checked against finite differences
(gradcheck, gradgradcheck in float64). Tolerances are helpers.OUT_TOL /
GRAD_TOL.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils import parametrize

import bnlib.alternatives as alt
import bnlib.nn
import bnlib.reference_alternatives as ra
from helpers import GRAD_TOL, OUT_TOL, assert_close, random_input

# (module, input shape): a linear layer and convolutions of each rank
MODULES = {
    "Linear": (lambda dtype: nn.Linear(5, 4, dtype=dtype), (3, 5)),
    "Conv1d": (lambda dtype: nn.Conv1d(3, 4, 3, dtype=dtype), (2, 3, 7)),
    "Conv2d": (lambda dtype: nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=dtype), (2, 3, 5, 5)),
    "Conv3d": (lambda dtype: nn.Conv3d(2, 3, 2, dtype=dtype), (2, 2, 3, 3, 3)),
}


def _layer_norm_of_rows(weight, gain, scale, eps=1e-6):
    """The definition, written with torch's layer norm: the truth for bnlib's Function."""
    rows = F.layer_norm(weight.reshape(weight.shape[0], -1), (weight[0].numel(),), eps=eps)
    factor = scale if gain is None else scale * gain.to(rows.dtype).unsqueeze(1)
    return (factor * rows).reshape(weight.shape)


class _StandardizedByLayerNorm(nn.Module):
    """:func:`_layer_norm_of_rows` as a parametrization, with a gain in the scaled form."""

    def __init__(self, out_features, fan_in, eps, scaled):
        super().__init__()
        self.eps = eps
        self.scale = 1 / math.sqrt(fan_in) if scaled else 1.0
        self.gain = nn.Parameter(torch.ones(out_features)) if scaled else None

    def forward(self, weight):
        return _layer_norm_of_rows(weight, self.gain, self.scale, self.eps)


def _pair(name, dtype, scaled, eps=1e-6):
    make, shape = MODULES[name]
    torch.manual_seed(0)
    ours = make(dtype)
    theirs = copy.deepcopy(ours)
    bnlib.nn.weight_standardization(ours, eps=eps, scaled=scaled)
    weight = theirs.weight
    parametrize.register_parametrization(
        theirs, "weight", _StandardizedByLayerNorm(weight.shape[0], weight[0].numel(), eps, scaled).to(dtype))
    if scaled:  # gains away from 1, the same in both
        gain = torch.linspace(0.5, 2.0, weight.shape[0], dtype=dtype)
        with torch.no_grad():
            ours.parametrizations.weight[0].gain.copy_(gain)
            theirs.parametrizations.weight[0].gain.copy_(gain)
    return ours, theirs, shape


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_outputs_and_gradients_vs_layer_norm_of_the_rows(name, scaled, dtype):
    ours, theirs, shape = _pair(name, dtype, scaled)
    x = random_input(shape, seed=1).to(dtype)
    assert_close(ours.weight, theirs.weight, OUT_TOL[dtype], "standardized weight")
    y_ours, y_theirs = ours(x), theirs(x)
    assert_close(y_ours, y_theirs, OUT_TOL[dtype], "output")
    dy = random_input(y_ours.shape, seed=2).to(dtype)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    for (key, p_ours), (_, p_theirs) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert_close(p_ours.grad, p_theirs.grad, GRAD_TOL[dtype], f"gradient of {key}")


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 3, 3), (2, 2)])
def test_reference_vs_layer_norm_of_the_rows(scaled, shape):
    """The NumPy reference: forward, dw and dgain against torch's layer norm and autograd."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.3 + 0.1).requires_grad_()
    gain = (torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    n = math.prod(shape[1:])
    scale = 1 / math.sqrt(n) if scaled else 1.0
    want = _layer_norm_of_rows(w, gain, scale)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    dw_want, dgain_want = torch.autograd.grad(want, (w, gain), dy)

    got, cache = ra.weightstd_forward(w.detach().numpy(), gain.detach().numpy(), scaled=scaled)
    dw, dgain = ra.weightstd_backward(dy.numpy(), cache)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dw, dw_want.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dgain, dgain_want.numpy(), rtol=1e-9, atol=1e-11)
    # without a gain: no dgain
    _, cache = ra.weightstd_forward(w.detach().numpy(), scaled=scaled)
    assert ra.weightstd_backward(dy.numpy(), cache)[1] is None


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_no_grad_forward_is_the_functions_bit_for_bit(name, scaled, dtype):
    """Without grad the parametrization skips the Function and computes its formula: the same ops, the same bits."""
    ours, _, _ = _pair(name, dtype, scaled)
    with torch.no_grad():
        without = ours.weight
    with_grad = ours.weight
    assert with_grad.grad_fn is not None and without.dtype == with_grad.dtype == dtype
    assert torch.equal(without, with_grad.detach())


@pytest.mark.parametrize("with_gain", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_function_against_finite_differences(with_gain, scale):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 2, 2, generator=g, dtype=torch.float64).requires_grad_()
    gain = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_() if with_gain else None

    def f(w, *gain_):
        return alt.WeightStandardizationFunction.apply(w, gain_[0] if gain_ else None, 1e-6, scale)

    inputs = (w, gain) if with_gain else (w,)
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


def test_rows_have_mean_zero_and_variance_one():
    module = bnlib.nn.weight_standardization(nn.Conv2d(8, 6, 3, dtype=torch.float64))
    rows = module.weight.detach().reshape(6, -1)
    original = module.parametrizations.weight.original.detach().reshape(6, -1)
    var_original = original.var(1, unbiased=False)
    assert_close(rows.mean(1), torch.zeros(6, dtype=torch.float64), dict(rtol=0, atol=1e-14), "row means")
    # var / (var + eps): 1 up to eps over the rows' variance
    assert_close(rows.var(1, unbiased=False), var_original / (var_original + 1e-6), dict(rtol=1e-12, atol=0),
                 "row variances")


def test_output_ignores_a_scale_and_shift_of_each_row_and_the_gradient_knows():
    """w_i -> a_i w_i + b_i leaves the layer unchanged (up to eps), so the gradient
    of each row sums to zero and is orthogonal to the row: the compact formula's two
    projections, as for BN's input."""
    module = bnlib.nn.weight_standardization(nn.Linear(6, 3, dtype=torch.float64), eps=1e-12)
    x = random_input((8, 6), seed=4)
    y = module(x)
    original = module.parametrizations.weight.original
    with torch.no_grad():
        original.mul_(torch.tensor([[0.1], [3.0], [7.0]], dtype=torch.float64)).add_(
            torch.tensor([[2.0], [-1.0], [0.5]], dtype=torch.float64))
    # eps / var is at most 2e-9 here
    assert_close(module(x), y, dict(rtol=1e-7, atol=1e-8), "output after scaling and shifting the rows")
    module(x).pow(2).sum().backward()
    grad = original.grad
    centered = original.detach() - original.detach().mean(1, keepdim=True)
    # relative to the sums of the terms' sizes: the row sums are zero up to
    # rounding; the dot products up to eps / (var + eps) (mean(w_hat^2) is
    # var / (var + eps), not 1), at most 2e-9 here
    assert torch.all(grad.sum(1).abs() <= 1e-12 * grad.abs().sum(1)), "row sums of the gradient"
    assert torch.all((grad * centered).sum(1).abs() <= 1e-7 * (grad * centered).abs().sum(1)), \
        "gradient . (w - mu)"


def test_scaled_rows_have_length_gain_and_keep_the_variance():
    torch.manual_seed(0)
    linear = nn.Linear(256, 64, bias=False, dtype=torch.float64)
    nn.init.normal_(linear.weight)  # rows of variance 1: eps = 1e-6 shrinks them by 5e-7 only
    module = bnlib.nn.weight_standardization(linear, scaled=True)
    gain = module.parametrizations.weight[0].gain
    assert gain.shape == (64,) and torch.equal(gain, torch.ones(64, dtype=torch.float64))
    with torch.no_grad():
        gain.copy_(torch.linspace(0.5, 2.0, 64))
    assert_close(module.weight.norm(dim=1), gain, dict(rtol=1e-6, atol=0), "row lengths")
    with torch.no_grad():
        gain.fill_(1.0)
    x = torch.randn(4096, 256, dtype=torch.float64)  # uncorrelated inputs of variance 1
    variance = module(x).var(0).mean()
    assert 0.9 < variance < 1.1, variance


def test_state_dict_gain_parameter_and_removal():
    ours = bnlib.nn.weight_standardization(nn.Conv2d(3, 4, 3), scaled=True)
    assert set(ours.state_dict()) == {"bias", "parametrizations.weight.original", "parametrizations.weight.0.gain"}
    names = {name for name, _ in ours.named_parameters()}
    assert "parametrizations.weight.0.gain" in names  # an optimizer over parameters() trains the gain
    other = bnlib.nn.weight_standardization(nn.Conv2d(3, 4, 3), scaled=True)
    with torch.no_grad():
        ours.parametrizations.weight[0].gain.mul_(1.5)
    other.load_state_dict(ours.state_dict())
    assert torch.equal(other.weight, ours.weight)
    standardized = ours.weight.detach().clone()
    parametrize.remove_parametrizations(ours, "weight")  # the standardized weight, stored for inference
    assert isinstance(ours.weight, nn.Parameter) and torch.equal(ours.weight.detach(), standardized)
    assert "scaled=True" in repr(other)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights_are_standardized_in_float32(dtype):
    torch.manual_seed(0)
    half = bnlib.nn.weight_standardization(nn.Linear(64, 8, dtype=dtype), scaled=True)
    single = bnlib.nn.weight_standardization(nn.Linear(64, 8), scaled=True)
    with torch.no_grad():
        single.parametrizations.weight.original.copy_(half.parametrizations.weight.original.float())
    assert half.weight.dtype == dtype
    torch.testing.assert_close(half.weight, single.weight.to(dtype), rtol=0, atol=0)
    half.weight.sum().backward()
    single.weight.sum().backward()
    grad_half = half.parametrizations.weight.original.grad
    assert grad_half.dtype == dtype
    torch.testing.assert_close(grad_half, single.parametrizations.weight.original.grad.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gradients_with_a_graph_and_second_derivatives_vs_layer_norm_of_the_rows(dtype):
    """create_graph=True goes through a formula of its own: its gradients and their
    derivatives against the truth (bfloat16: computed in float32, as the first-order path)."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    gain = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    dy = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64).to(dtype)
    scale = 1 / math.sqrt(8)
    tol = OUT_TOL[torch.float64] if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)

    def grads(fn, create_graph):
        return torch.autograd.grad((fn(weight, gain) * dy).sum(), (weight, gain), create_graph=create_graph)

    ours = lambda w, g_: alt.WeightStandardizationFunction.apply(w, g_, 1e-6, scale)  # noqa: E731
    truth = lambda w, g_: _layer_norm_of_rows(w.double(), g_.double(), scale).to(dtype)  # noqa: E731
    plain, graph, want = grads(ours, False), grads(ours, True), grads(truth, True)
    for got_plain, got_graph, expected, what in zip(plain, graph, want, ("weight", "gain")):
        assert got_graph.dtype == dtype
        # both compute in float32 and round once: a bfloat16 ulp at most
        same = tol if dtype == torch.float64 else dict(rtol=2 ** -8, atol=1e-6)
        assert_close(got_graph, got_plain, same, f"d{what} with a graph vs without")
        assert_close(got_graph, expected, tol, f"d{what} with a graph vs layer norm of the rows")
    if dtype == torch.float64:  # second derivatives: of sum(dweight^2) and of sum(dgain^2)
        for k, what in enumerate(("weight", "gain")):
            # dgain does not depend on the gain: zeros there
            kw = dict(retain_graph=True, allow_unused=True, materialize_grads=True)
            got = torch.autograd.grad(graph[k].square().sum(), (weight, gain), **kw)
            expected = torch.autograd.grad(want[k].square().sum(), (weight, gain), **kw)
            for a, b in zip(got, expected):
                assert_close(a, b, GRAD_TOL[torch.float64], f"second derivative through d{what}")


def test_frozen_weight_trainable_gain():
    """Fine-tuning only the gains: the gain still gets its gradient."""
    ours, theirs, shape = _pair("Conv2d", torch.float64, scaled=True)
    for module in (ours, theirs):
        module.parametrizations.weight.original.requires_grad_(False)
    x = random_input(shape, seed=1)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    assert ours.parametrizations.weight.original.grad is None
    assert_close(ours.parametrizations.weight[0].gain.grad, theirs.parametrizations.weight[0].gain.grad,
                 GRAD_TOL[torch.float64], "gain gradient")


@pytest.mark.parametrize("make,kwargs,match", [
    (lambda: nn.Linear(3, 2), dict(eps=0.0), "eps must be a finite number > 0"),
    (lambda: nn.Linear(3, 2), dict(eps=float("nan")), "eps must be a finite number > 0"),
    (lambda: nn.Linear(3, 2), dict(scaled=1), "scaled must be True or False"),
    (lambda: nn.Linear(3, 2), dict(name="foo"), "no parameter or buffer with name 'foo'"),
    (lambda: nn.Linear(1, 2), {}, r"at least 2 weights per output unit, got shape \(2, 1\)"),
    (lambda: nn.LayerNorm(4), {}, r"of shape \(out, in, \*kernel\).*got shape \(4,\)"),
    (lambda: nn.ConvTranspose2d(4, 3, 3), {}, "ConvTranspose2d has its input channels there"),
])
def test_bad_arguments_raise_and_leave_the_module_alone(make, kwargs, match):
    module = make()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=match):
        bnlib.nn.weight_standardization(module, **kwargs)
    assert not parametrize.is_parametrized(module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_standardizing_twice_is_refused():
    module = bnlib.nn.weight_standardization(nn.Linear(4, 3), scaled=True)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match="already has weight standardization"):
        bnlib.nn.weight_standardization(module)
    assert len(module.parametrizations.weight) == 1
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
