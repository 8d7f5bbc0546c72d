"""Filter response normalization with its thresholded linear unit (FRN + TLU).

Truths: the NumPy reference (bnlib.reference_alternatives.frn_forward/backward)
against central finite differences in float64; the torch path against the
reference (outputs and every gradient, every layout), torch's gradcheck and
gradgradcheck; the properties the chapter uses (no dependence on the batch, the
same map in both modes, nearly sign(x) on a 1x1 map with a small eps); and
the contract's errors.
"""

import numpy as np
import pytest
import torch

import bnlib.fx
import bnlib.nn as bnn
from bnlib import alternatives as A
from bnlib import reference as R
from helpers import GRAD_TOL, OUT_TOL, assert_close

# On both CPU paths: bnlib's C++ loops (RMS norm of each map) and the tensor ops.
pytestmark = pytest.mark.usefixtures("each_cpu_path")

SHAPES = [(3, 4, 5), (2, 3, 4, 5), (2, 3, 2, 3, 2), (1, 2, 1, 1), (4, 1, 7)]


def _params(c, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=c).astype(dtype), rng.normal(size=c).astype(dtype), (0.3 * rng.normal(size=c)).astype(dtype)


def _numeric_grad(f, arr, h=1e-6):
    grad = np.zeros_like(arr)
    for i in np.ndindex(arr.shape):
        up, down = arr.copy(), arr.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (f(up) - f(down)) / (2 * h)
    return grad


@pytest.mark.parametrize("with_tau", [True, False])
@pytest.mark.parametrize("eps", [1e-3, "per channel"])
def test_reference_backward_matches_finite_differences(with_tau, eps):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 4, 5, 2))
    gamma, beta, tau = _params(4)
    tau = tau if with_tau else None
    eps = np.array([1e-3, 1e-2, 0.1, 1.0]) if eps == "per channel" else eps
    dz = rng.normal(size=x.shape)
    z, cache = R.frn_forward(x, gamma, beta, tau, eps)
    dx, dgamma, dbeta, dtau = R.frn_backward(dz, cache)

    def loss(x=x, gamma=gamma, beta=beta, tau=tau):
        return float(np.sum(dz * R.frn_forward(x, gamma, beta, tau, eps)[0]))

    np.testing.assert_allclose(dx, _numeric_grad(lambda a: loss(x=a), x), atol=1e-7)
    np.testing.assert_allclose(dgamma, _numeric_grad(lambda a: loss(gamma=a), gamma), atol=1e-7)
    np.testing.assert_allclose(dbeta, _numeric_grad(lambda a: loss(beta=a), beta), atol=1e-7)
    if with_tau:
        np.testing.assert_allclose(dtau, _numeric_grad(lambda a: loss(tau=a), tau), atol=1e-7)
    else:
        assert dtau is None and np.array_equal(z, gamma.reshape(1, 4, 1, 1) * cache.x_hat + beta.reshape(1, 4, 1, 1))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_path_matches_the_reference(shape, dtype, layout):
    if layout == "channels_last" and len(shape) not in (4, 5):
        pytest.skip("channels-last is 4D or 5D")
    g = torch.Generator().manual_seed(2)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    dz = torch.randn(shape, generator=g, dtype=torch.float64)
    c = shape[1]
    gamma, beta, tau = (torch.from_numpy(p) for p in _params(c))
    x = x64.clone().to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    elif layout == "strided":
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    x.requires_grad_()
    params = [p.to(dtype).clone().requires_grad_() for p in (gamma, beta, tau)]
    z = A.filter_response_norm(x, *params, eps=1e-3)
    z.backward(dz.to(dtype))
    z_ref, cache = R.frn_forward(x64.numpy(), gamma.numpy(), beta.numpy(), tau.numpy(), 1e-3)
    grads_ref = R.frn_backward(dz.numpy(), cache)
    assert z.dtype == dtype and z.shape == x.shape
    if layout == "channels_last":
        assert z.is_contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    assert_close(z.double(), torch.from_numpy(z_ref), OUT_TOL[dtype], "output")
    for got, want, what in zip([x.grad, *(p.grad for p in params)], grads_ref, ["dx", "dgamma", "dbeta", "dtau"]):
        assert_close(got.double(), torch.from_numpy(want), GRAD_TOL[dtype], what)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_per_channel_tensor_eps_and_the_module_learned_eps_match_the_reference(layout):
    """The learned-eps path (a tensor eps, tensor ops): outputs and every
    gradient against the reference with eps = (1e-3, 1e-2, 0.1, 1), and the
    module with a negative eps_learned, which it uses as eps + |eps_learned|."""
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64) * 0.3
    dz = torch.randn(x64.shape, generator=g, dtype=torch.float64)
    gamma, beta, tau = (torch.from_numpy(p) for p in _params(4, seed=6))
    eps = torch.tensor([1e-3, 1e-2, 0.1, 1.0], dtype=torch.float64)
    x = x64.clone()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    params = [p.clone().requires_grad_() for p in (gamma, beta, tau)]
    z = A.filter_response_norm(x, *params, eps=eps)
    z.backward(dz)
    z_ref, cache = R.frn_forward(x64.numpy(), gamma.numpy(), beta.numpy(), tau.numpy(), eps.numpy())
    assert_close(z, torch.from_numpy(z_ref), OUT_TOL[torch.float64], "output")
    for got, want, what in zip([x.grad, *(p.grad for p in params)], R.frn_backward(dz.numpy(), cache),
                               ["dx", "dgamma", "dbeta", "dtau"]):
        assert_close(got, torch.from_numpy(want), GRAD_TOL[torch.float64], what)
    if layout == "channels_last":
        assert z.is_contiguous(memory_format=torch.channels_last)
    layer = bnn.FilterResponseNorm(4, learnable_eps=True, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(gamma), layer.bias.copy_(beta), layer.tau.copy_(tau)
        layer.eps_learned.copy_(-(eps - layer.eps))  # negative: the layer takes its size
    assert_close(layer(x64), torch.from_numpy(z_ref), OUT_TOL[torch.float64], "module output")


def test_a_tie_sends_its_whole_gradient_to_tau_as_the_reference():
    """beta = tau = 0 at the start: an exact zero in the input is a tie y == tau."""
    x = torch.tensor([[[0.0, 1.0, -2.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    beta, tau = torch.zeros(1, dtype=torch.float64, requires_grad=True), torch.zeros(1, dtype=torch.float64,
                                                                                   requires_grad=True)
    gamma = torch.ones(1, dtype=torch.float64, requires_grad=True)
    z = A.filter_response_norm(x, gamma, beta, tau, eps=1e-3)
    z.sum().backward()
    _, cache = R.frn_forward(x.detach().numpy(), gamma.detach().numpy(), beta.detach().numpy(),
                             tau.detach().numpy(), 1e-3)
    dx, _, dbeta, dtau = R.frn_backward(np.ones((1, 1, 4)), cache)
    assert_close(x.grad, torch.from_numpy(dx), GRAD_TOL[torch.float64], "dx")
    assert float(beta.grad) == dbeta[0] == 1.0 and float(tau.grad) == dtau[0] == 3.0


def test_gradcheck_and_gradgradcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    params = [torch.from_numpy(p).requires_grad_() for p in _params(3)]
    eps_learned = torch.full((3,), 1e-2, dtype=torch.float64, requires_grad=True)

    def fixed_eps(x, w, b, t):
        return A.filter_response_norm(x, w, b, t, eps=1e-3)

    def learned_eps(x, w, b, t, e):
        return A.filter_response_norm(x, w, b, t, eps=1e-6 + e.abs())

    assert torch.autograd.gradcheck(fixed_eps, (x, *params))
    assert torch.autograd.gradgradcheck(fixed_eps, (x, *params))
    assert torch.autograd.gradcheck(learned_eps, (x, *params, eps_learned))


def test_no_dependence_on_the_batch_and_the_same_map_in_both_modes():
    layer = bnn.FilterResponseNorm(3)
    x = torch.randn(6, 3, 4, 4)
    other = x.clone()
    other[1:] = torch.randn(5, 3, 4, 4) * 10 + 3
    z = layer(x)
    assert torch.equal(layer(other)[0], z[0])
    assert torch.equal(layer.eval()(x), z)


def test_a_one_by_one_map_gives_nearly_the_sign_unless_eps_is_learned():
    """m = 1 value per sample and channel: x / sqrt(x^2 + eps) ~ sign(x) for x^2 >> eps;
    the magnitude is lost and the gradient eps / (x^2 + eps)^(3/2) nearly 0."""
    x = torch.randn(64, 8, 1, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x[x.abs().amin(dim=(1, 2, 3)) > 0.1].requires_grad_()  # rows with every |x| > 0.1
    plain = bnn.FilterResponseNorm(8, tlu=False, dtype=torch.float64)
    z = plain(x)
    assert torch.allclose(z, torch.sign(x), atol=1e-3)
    (dx,) = torch.autograd.grad(z.sum(), x)
    assert dx.abs().max() < 1e-3
    learned = bnn.FilterResponseNorm(8, tlu=False, learnable_eps=True, learnable_eps_init=1.0, dtype=torch.float64)
    assert (learned(x) - torch.sign(x)).abs().max() > 0.1


def test_module_parameters_state_dict_and_repr():
    assert set(bnn.FilterResponseNorm(4).state_dict()) == {"weight", "bias", "tau"}
    assert set(bnn.FilterResponseNorm(4, tlu=False).state_dict()) == {"weight", "bias"}
    layer = bnn.FilterResponseNorm(4, learnable_eps=True)
    assert set(layer.state_dict()) == {"weight", "bias", "tau", "eps_learned"}
    assert torch.equal(layer.eps_learned, torch.full((4,), 1e-4))
    assert repr(layer) == "FilterResponseNorm(4, eps=1e-06, learnable_eps=True, tlu=True, learnable_eps_init=0.0001)"
    assert bnn.FilterResponseNorm in bnlib.fx.LEAF_MODULES


def test_half_input_is_computed_in_float32_and_rounded_once():
    x = torch.randn(4, 3, 5, 5)
    layer = bnn.FilterResponseNorm(3)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0), layer.bias.uniform_(-1, 1), layer.tau.uniform_(-1, 0)
    for dtype in (torch.float16, torch.bfloat16):
        z = layer(x.to(dtype))
        assert z.dtype == dtype
        assert torch.equal(z, layer(x.to(dtype).float()).to(dtype))


def test_torch_func_grad_equals_autograd():
    layer = bnn.FilterResponseNorm(3)
    x = torch.randn(2, 3, 4, dtype=torch.float32)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    grad = torch.func.grad(lambda p, x: torch.func.functional_call(layer, p, (x,)).square().sum())(params, x)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grad[name], p.grad)


@pytest.mark.parametrize("shape, pattern", [((4, 3), "at least one spatial dimension"),
                                            ((4, 5, 2), "expected input with 3 channels|3 channels|num_features")])
def test_bad_input_raises_value_error(shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        bnn.FilterResponseNorm(3)(torch.randn(shape))


def test_bad_arguments():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="floating"):
        A.filter_response_norm(torch.ones(2, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="weight should have 3 elements"):
        A.filter_response_norm(x, torch.ones(4))
    with pytest.raises(ValueError, match="tau should have 3 elements"):
        A.filter_response_norm(x, tau=torch.ones(2))
    with pytest.raises(ValueError, match="eps"):
        A.filter_response_norm(x, eps=0.0)
    with pytest.raises(ValueError, match="1 or 3 elements"):
        A.filter_response_norm(x, eps=torch.ones(2))
    with pytest.raises(ValueError, match="eps must be > 0 in every channel"):
        A.filter_response_norm(x, eps=torch.tensor([1e-3, 0.0, 1e-3]))
    for kwargs in (dict(num_features=0), dict(num_features=3, eps=-1.0),
                   dict(num_features=3, learnable_eps=True, learnable_eps_init=0.0)):
        with pytest.raises(ValueError):
            bnn.FilterResponseNorm(**kwargs)
