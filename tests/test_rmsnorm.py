"""RMS norm: bnlib.nn.RMSNorm and bnlib.alternatives.rms_norm against
torch.nn.RMSNorm and torch.nn.functional.rms_norm (the truth); the NumPy
reference (bnlib.reference_alternatives.rmsnorm_forward/backward) against
finite differences and the torch path; the hand-written backward against
gradcheck and gradgradcheck; what sets RMS norm apart from layer norm
(invariant to scaling a sample, not to shifting it; equal to layer norm on
zero-mean samples); bad input (ValueError, and RuntimeError as torch).
"""

import copy
import inspect
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import bnlib.alternatives as alt
import bnlib.nn
import bnlib.reference_alternatives as ra
from helpers import (
    GRAD_TOL,
    OUT_TOL,
    assert_close,
    assert_same_run,
    forward_backward,
    random_input,
    randomize_params,
)

DTYPES = [torch.float32, torch.float64]
# On both CPU paths: bnlib's C++ loops (without the mean) and the tensor ops.
pytestmark = pytest.mark.usefixtures("each_cpu_path")
# (input shape, normalized_shape); the last two have no leading dims, so the
# weight gradient sums over nothing
CASES = [((4, 6), 6), ((3, 5, 4), (4,)), ((3, 5, 4), (5, 4)), ((2, 3, 4, 5), (3, 4, 5)), ((2, 3), [3]),
         ((5,), 5), ((3, 5), (3, 5))]
CONFIGS = [dict(), dict(eps=1e-3), dict(elementwise_affine=False), dict(eps=1e-6, elementwise_affine=False)]


def test_same_constructor_signature_repr_and_state_dict_as_torch():
    def shape(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls.__init__).parameters.values()]

    assert shape(bnlib.nn.RMSNorm) == shape(nn.RMSNorm)
    for kw in (dict(), dict(eps=1e-3), dict(elementwise_affine=False)):
        ours, theirs = bnlib.nn.RMSNorm([2, 3], **kw), nn.RMSNorm([2, 3], **kw)
        assert repr(ours) == repr(theirs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert bnlib.nn.RMSNorm is alt.RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,normalized_shape", CASES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_module_vs_torch(shape, normalized_shape, cfg, dtype):
    ours = bnlib.nn.RMSNorm(normalized_shape, dtype=dtype, **cfg)
    theirs = nn.RMSNorm(normalized_shape, dtype=dtype, **cfg)
    randomize_params(ours, theirs)
    assert_same_run(ours, theirs, random_input(shape, dtype=dtype), dtype)


def test_state_dict_loads_both_ways():
    ours, theirs = bnlib.nn.RMSNorm(5), nn.RMSNorm(5)
    randomize_params(theirs)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours.load_state_dict(torch.load(buffer))
    assert torch.equal(ours.weight, theirs.weight)
    back = nn.RMSNorm(5)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    x = torch.randn(3, 5)
    assert_close(back(x), ours(x), OUT_TOL[torch.float32])


def _torch_rms_norm_computes_half_in_float32():
    """torch 2.4's F.rms_norm computed a half input in half (x^2 overflowed,
    half's eps), returned float32 beside a float32 weight, and kept a
    non-contiguous layout; newer ones compute in float32 like bnlib."""
    y = F.rms_norm(torch.full((1, 2), 300.0, dtype=torch.float16), (2,), torch.ones(2))
    contiguous = F.rms_norm(torch.randn(3, 4, 5).transpose(1, 2), (4,)).is_contiguous()
    return bool(y.dtype == torch.float16 and (y == 1).all()) and contiguous


TORCH_RMS_NORM_IN_FLOAT32 = _torch_rms_norm_computes_half_in_float32()
like_torch_rms_norm = pytest.mark.skipif(not TORCH_RMS_NORM_IN_FLOAT32,
                                         reason="this torch's F.rms_norm computes half inputs in half")


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
@like_torch_rms_norm
def test_half_input_computes_in_float32_like_torch(half, affine):
    """float32 statistics and torch's default eps (float32's machine epsilon), output in the input's dtype."""
    x = (torch.randn(6, 16) * 3).to(half)
    ours, theirs = bnlib.nn.RMSNorm(16, elementwise_affine=affine), nn.RMSNorm(16, elementwise_affine=affine)
    randomize_params(ours, theirs)
    y1, dx1, _ = forward_backward(ours, x)
    y2, dx2, _ = forward_backward(theirs, x)
    assert y1.dtype == y2.dtype == half
    tol = dict(rtol=1e-2, atol=1e-2)
    assert_close(y1.float(), y2.float(), tol, "output")
    assert_close(dx1.float(), dx2.float(), tol, "input gradient")


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_input_large_and_tiny_values(half):
    """Large half values (x^2 overflows float16 beyond 256) and a tiny sample
    whose mean square is below eps: float32 statistics and float32's eps."""
    x = (torch.randn(4, 16, generator=torch.Generator().manual_seed(3)) * 400).to(half)
    if TORCH_RMS_NORM_IN_FLOAT32:
        assert_close(alt.rms_norm(x, (16,)).float(), F.rms_norm(x, (16,)).float(), dict(rtol=1e-2, atol=1e-2))
    tiny = torch.full((2, 4), 1e-4).to(half)
    expected = tiny.float() / torch.sqrt(tiny.float().square() + torch.finfo(torch.float32).eps)
    assert_close(alt.rms_norm(tiny, (4,)).float(), expected, dict(rtol=1e-2, atol=1e-4))
    if TORCH_RMS_NORM_IN_FLOAT32:
        assert_close(alt.rms_norm(tiny, (4,)).float(), F.rms_norm(tiny, (4,)).float(), dict(rtol=1e-2, atol=1e-4))


def test_formula_path_with_a_large_eps_and_a_random_weight():
    """The plain-op formula (second derivatives, torch.func) against torch,
    where eps and the weight both matter."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, dtype=torch.float64, generator=g) * 0.5
    w = torch.rand(6, dtype=torch.float64, generator=g) + 0.5
    dy = torch.randn(3, 6, dtype=torch.float64, generator=g)
    grads = []
    for fn, create_graph in ((F.rms_norm, False), (alt.rms_norm, True)):
        x_leaf, w_leaf = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(x_leaf, (6,), w_leaf, eps=0.5)
        grads.append(torch.autograd.grad(y, (x_leaf, w_leaf), dy, create_graph=create_graph))
    for ours, theirs in zip(grads[1], grads[0]):
        assert_close(ours.detach(), theirs, GRAD_TOL[torch.float64])
    vmapped = torch.func.vmap(lambda row: alt.rms_norm(row, (6,), w, eps=0.5))(x)
    assert_close(vmapped, F.rms_norm(x, (6,), w, eps=0.5), OUT_TOL[torch.float64])


def test_channels_last_layout_as_torch():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    for normalized_shape in ((5,), (4, 5)):
        ours, theirs = alt.rms_norm(x, normalized_shape), F.rms_norm(x, normalized_shape)
        assert ours.stride() == theirs.stride()
        assert_close(ours, theirs, OUT_TOL[torch.float32])


def test_default_eps_is_the_computation_machine_epsilon():
    """eps=None: float32's epsilon for float32 input, float64's for float64.
    On a tiny sample (mean square 1e-14) the two choices differ visibly."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((2, 4), 1e-7, dtype=dtype)
        assert_close(alt.rms_norm(x, (4,)), F.rms_norm(x, (4,)), OUT_TOL[dtype])
    x = torch.full((1, 4), 1e-7, dtype=torch.float64)
    expected = 1e-7 / np.sqrt(1e-14 + np.finfo(np.float64).eps)
    assert_close(alt.rms_norm(x, (4,)), torch.full_like(x, expected), OUT_TOL[torch.float64])


def test_gradcheck_and_gradgradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(4, 5, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    assert gradcheck(lambda x, w: alt.rms_norm(x, (4, 5), w, eps=1e-3), (x, w))
    assert gradgradcheck(lambda x, w: alt.rms_norm(x, (4, 5), w, eps=1e-3), (x, w))
    assert gradcheck(lambda x: alt.rms_norm(x, (5,)), (x,))


def test_reference_vs_finite_differences():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(3, 2, 4))
    gamma = rng.uniform(0.5, 1.5, size=(2, 4))
    dy = rng.normal(size=x.shape)
    y, cache = ra.rmsnorm_forward(x, gamma, 1e-3)
    dx, dgamma = ra.rmsnorm_backward(dy, cache)

    def loss(x_, gamma_):
        return np.sum(ra.rmsnorm_forward(x_, gamma_, 1e-3)[0] * dy)

    h = 1e-6
    for analytic, wrt in ((dx, "x"), (dgamma, "gamma")):
        base = x if wrt == "x" else gamma
        numeric = np.zeros_like(base)
        for i in np.ndindex(base.shape):
            step = np.zeros_like(base)
            step[i] = h
            plus = loss(x + step, gamma) if wrt == "x" else loss(x, gamma + step)
            minus = loss(x - step, gamma) if wrt == "x" else loss(x, gamma - step)
            numeric[i] = (plus - minus) / (2 * h)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape,normalized_shape", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_reference_vs_torch(shape, normalized_shape, affine):
    x = random_input(shape, dtype=torch.float64)
    w = (torch.rand(normalized_shape if isinstance(normalized_shape, (tuple, list)) else (normalized_shape,),
                    dtype=torch.float64) + 0.5) if affine else None
    x_leaf = x.clone().requires_grad_()
    w_leaf = None if w is None else w.clone().requires_grad_()
    y_torch = F.rms_norm(x_leaf, list(np.atleast_1d(normalized_shape)), w_leaf)
    dy = random_input(y_torch.shape, dtype=torch.float64, seed=3, spread=False)
    y_torch.backward(dy)
    y, cache = ra.rmsnorm_forward(x.numpy(), None if w is None else w.numpy(), normalized_shape=normalized_shape)
    dx, dgamma = ra.rmsnorm_backward(dy.numpy(), cache)
    np.testing.assert_allclose(y, y_torch.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, x_leaf.grad.numpy(), rtol=1e-9, atol=1e-10)
    if affine:
        np.testing.assert_allclose(dgamma, w_leaf.grad.numpy(), rtol=1e-9, atol=1e-10)
    else:
        assert dgamma is None
    assert cache.mean_square.shape == x.shape[: x.dim() - len(np.atleast_1d(normalized_shape))]


def test_float16_reference_computes_in_float32():
    x16 = (np.random.default_rng(1).normal(size=(4, 8)) * 3).astype(np.float16)
    y, _ = ra.rmsnorm_forward(x16)
    assert y.dtype == np.float32
    expected, _ = ra.rmsnorm_forward(x16.astype(np.float64), eps=float(np.finfo(np.float32).eps))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_scaling_a_sample_changes_nothing_shifting_it_does():
    """RMS norm keeps layer norm's invariance to scaling a sample but drops its
    invariance to shifting one (there is no mean to subtract)."""
    x = random_input((5, 8), dtype=torch.float64)
    y = alt.rms_norm(x, (8,), eps=1e-12)
    assert_close(alt.rms_norm(3.7 * x, (8,), eps=1e-12), y, OUT_TOL[torch.float64])
    shifted = alt.rms_norm(x + 2.0, (8,), eps=1e-12)
    assert (shifted - y).abs().max() > 0.1
    ln = alt.layer_norm(x, (8,))
    assert_close(alt.layer_norm(x + 2.0, (8,)), ln, OUT_TOL[torch.float64])


def test_equal_to_layer_norm_on_zero_mean_samples():
    """On a sample whose mean is 0, mean(x^2) is its variance: RMS norm is layer norm."""
    x = random_input((6, 10), dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    w = torch.rand(10, dtype=torch.float64) + 0.5
    assert_close(alt.rms_norm(x, (10,), w, eps=1e-5), alt.layer_norm(x, (10,), w, None, eps=1e-5),
                 OUT_TOL[torch.float64])


def test_input_gradient_is_orthogonal_to_the_sample():
    """Scaling a sample leaves the output unchanged, so (eps aside) the input
    gradient has no component along the sample: sum_i x_i dx_i = 0 per sample.
    Layer norm's is also orthogonal to the all-ones direction; RMS norm's is not."""
    x = random_input((4, 7), dtype=torch.float64).requires_grad_()
    dy = random_input((4, 7), dtype=torch.float64, seed=5, spread=False)
    alt.rms_norm(x, (7,), eps=1e-12).backward(dy)
    assert (x.grad * x.detach()).sum(-1).abs().max() < 1e-10
    assert x.grad.sum(-1).abs().max() > 1e-3


def test_output_is_contiguous_and_takes_inplace_ops():
    x = torch.randn(3, 4, 5).transpose(1, 2)
    y = alt.rms_norm(x, (4,))
    assert y.is_contiguous() and (F.rms_norm(x, (4,)).is_contiguous() or not TORCH_RMS_NORM_IN_FLOAT32)
    assert_close(y, F.rms_norm(x, (4,)), OUT_TOL[torch.float32])
    out = bnlib.nn.RMSNorm(5, elementwise_affine=False)(torch.randn(3, 5, requires_grad=True))
    out.relu_()  # no "view of a leaf" error: the output is not a view
    out.sum().backward()


def test_empty_batch_and_zero_sample():
    assert alt.rms_norm(torch.empty(0, 3), (3,)).shape == (0, 3)
    assert torch.equal(alt.rms_norm(torch.zeros(2, 3), (3,)), torch.zeros(2, 3))


@pytest.mark.parametrize("make,kw", [
    (lambda **k: bnlib.nn.RMSNorm(0, **k), {}),
    (lambda **k: bnlib.nn.RMSNorm((), **k), {}),
    (lambda **k: bnlib.nn.RMSNorm(4, **k), dict(eps=0.0)),
    (lambda **k: bnlib.nn.RMSNorm(4, **k), dict(eps=-1e-5)),
    (lambda **k: bnlib.nn.RMSNorm(4, **k), dict(eps=float("inf"))),
])
def test_bad_constructor_arguments(make, kw):
    with pytest.raises(ValueError):
        make(**kw)


@pytest.mark.parametrize("call,pattern", [
    (lambda: bnlib.nn.RMSNorm(4)(torch.randn(2, 3)), r"normalized_shape=\[4\].*\[2, 3\]"),
    (lambda: bnlib.nn.RMSNorm((3, 4))(torch.randn(2, 4, 3)), r"normalized_shape=\[3, 4\]"),
    (lambda: alt.rms_norm(torch.randn(2, 6), (6,), torch.ones(5)), r"weight of shape \[6\].*got \[5\]"),
    (lambda: alt.rms_norm(torch.randn(2, 6), (6,), torch.ones(2, 3)), r"weight of shape \[6\].*got \[2, 3\]"),
    (lambda: alt.rms_norm(torch.ones(2, 6, dtype=torch.long), (6,)), r"floating-point"),
])
def test_bad_input_raises_value_error_and_runtime_error(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()
    with pytest.raises(RuntimeError):  # what torch raises for the same shape mistakes
        call()


def test_empty_normalized_shape_raises_like_torch():
    for fn in (alt.rms_norm, lambda x, shape: alt.layer_norm(x, shape)):
        with pytest.raises(ValueError, match="at least 1-dimensional"):
            fn(torch.randn(2, 3), ())
    with pytest.raises(RuntimeError, match="at least 1-dimensional"):
        F.rms_norm(torch.randn(2, 3), ())


def test_functional_bad_eps():
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got -1.0"):
        alt.rms_norm(torch.randn(2, 6), (6,), eps=-1.0)


def test_reference_bad_input():
    with pytest.raises(ValueError, match=r"normalized_shape=\[5\]"):
        ra.rmsnorm_forward(np.ones((2, 4)), normalized_shape=(5,))
    with pytest.raises(ValueError, match="gamma should have shape"):
        ra.rmsnorm_forward(np.ones((2, 4)), np.ones(3), normalized_shape=(4,))
    with pytest.raises(ValueError, match="eps must be"):
        ra.rmsnorm_forward(np.ones((2, 4)), eps=0.0)
