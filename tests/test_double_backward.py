"""Second derivatives (``create_graph=True``, as in a gradient penalty) through bnlib's
hand-written backward passes: ``torch.autograd.gradgradcheck`` (finite
differences of the gradient) in float64, and agreement with torch.nn.

The hand-written backward passes use statistics saved by their forward; when
asked for a graph they take their gradients from autograd of the same map in
plain tensor ops instead (``bnlib.functional.grads_through_formula``), so the
second derivatives include the paths through ``mu`` and ``var``. SyncBN's
backward across processes is once-differentiable: differentiating it again
raises instead.
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import bnlib.nn
from bnlib import alternatives as alt
from bnlib import functional as bnF

pytestmark = pytest.mark.usefixtures("each_cpu_path")


def _inputs(shape, seed=0, affine=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul_(2).add_(1).requires_grad_()
    C = shape[1]
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(C, generator=g, dtype=torch.float64).requires_grad_() if affine else None
    return x, w, b


@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 4, 5), (2, 2, 3, 2, 2)], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batch_norm_train(shape, affine):
    x, w, b = _inputs(shape, affine=affine)
    args = (x, w, b) if affine else (x,)
    assert gradgradcheck(lambda x, w=None, b=None: bnF.batch_norm(x, None, None, w, b, True), args)


def test_batch_norm_train_channels_last():
    x, w, b = _inputs((3, 2, 4, 5))
    x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert gradgradcheck(lambda x, w, b: bnF.batch_norm(x, None, None, w, b, True), (x, w, b))


def test_batch_norm_eval():
    x, w, b = _inputs((6, 3))
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert gradgradcheck(lambda x, w, b: bnF.batch_norm(x, rm, rv, w, b, False), (x, w, b))


def test_gradient_penalty_matches_torch():
    """A WGAN-GP style penalty on a small critic: the parameters' gradients equal torch.nn's."""
    torch.manual_seed(0)
    lin, head = torch.nn.Linear(4, 3).double(), torch.nn.Linear(3, 1).double()
    ours, theirs = bnlib.nn.BatchNorm1d(3).double(), torch.nn.BatchNorm1d(3).double()
    x = torch.randn(8, 4, dtype=torch.float64)

    def penalty_grads(bn):
        lin.zero_grad()
        xr = x.clone().requires_grad_()
        out = head(torch.tanh(bn(lin(xr)))).sum()
        g, = torch.autograd.grad(out, xr, create_graph=True)
        ((g.norm(dim=1) - 1) ** 2).mean().backward()
        return lin.weight.grad.clone(), bn.weight.grad.clone()

    for got, want in zip(penalty_grads(ours), penalty_grads(theirs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_half_input():
    """float16 input: the second derivatives reach the input itself (not its float32 copy)."""
    x = torch.randn(8, 3).half().requires_grad_()
    y = bnF.batch_norm(x, None, None, None, None, True)
    g, = torch.autograd.grad((y.float() ** 3).sum(), x, create_graph=True)
    gg, = torch.autograd.grad(g.float().sum(), x)
    x64 = x.detach().double().requires_grad_()
    y64 = torch.nn.functional.batch_norm(x64, None, None, None, None, True)
    g64, = torch.autograd.grad((y64 ** 3).sum(), x64, create_graph=True)
    gg64, = torch.autograd.grad(g64.sum(), x64)
    assert torch.allclose(gg.double(), gg64, rtol=0.05, atol=0.05 * gg64.abs().max().item())


def test_layer_group_instance_norm():
    x, w, b = _inputs((3, 4, 5))
    assert gradgradcheck(lambda x, w, b: alt.layer_norm(x, (5,), w[:1].expand(5).contiguous(), b[:1].expand(5).contiguous()),
                         (x, w, b))
    assert gradgradcheck(lambda x, w, b: alt.group_norm(x, 2, w.repeat(2)[:4], b.repeat(2)[:4]), (x, w, b))
    x, w, b = _inputs((2, 3, 5))
    assert gradgradcheck(lambda x, w, b: alt.instance_norm(x, weight=w, bias=b), (x, w, b))


def test_batch_renorm():
    x, w, b = _inputs((6, 3))
    # r and d are stop-gradient: finite differences agree only where both are
    # clipped (constant near x). A running variance far below the batch's and a
    # running mean far away clip them at r_max and -d_max.
    rm, rv = torch.full((3,), 100.0, dtype=torch.float64), torch.full((3,), 0.01, dtype=torch.float64)

    def f(x, w, b):
        return alt.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, momentum=0.0, r_max=1.5, d_max=0.5)

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_weight_and_spectral_norm():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gain = (torch.rand(2, 1, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    assert gradgradcheck(lambda v, gain: alt.WeightNormFunction.apply(v, gain, 0), (v, gain))
    assert gradgradcheck(lambda v, gain: alt.WeightNormFunction.apply(v, gain, -1), (v, gain.detach()[0, 0].requires_grad_()))
    # spectral norm: u and v are the power iteration's estimates, constants here
    u_vec = torch.randn(2, generator=g, dtype=torch.float64)
    v_vec = torch.randn(3, generator=g, dtype=torch.float64)
    assert gradgradcheck(lambda w: alt.SpectralNormFunction.apply(w, u_vec, v_vec, 0), (v,))


def test_sync_batch_norm_single_process():
    """Without a process group SyncBatchNorm is batch norm, second derivatives included."""
    x, _, _ = _inputs((6, 3))
    layer = bnlib.nn.SyncBatchNorm(3).double()
    assert gradgradcheck(lambda x: layer(x), (x,))


@pytest.mark.parametrize("case", ["batch_norm_half", "layer_norm", "layer_norm_half", "rms_norm",
                                  "rms_norm_half", "group_norm", "batch_renorm"])
def test_backward_keeps_no_new_activation(case):
    """What the forward saves for the backward: the input itself (alive anyway) and
    per-row or per-channel values, never a new tensor of the input's size (such as
    x_hat), also now that the backward can give second derivatives."""
    from bnlib import perf

    half = case.endswith("_half")
    x = torch.randn(8, 4, 6, 5, dtype=torch.float16 if half else torch.float32, requires_grad=True)
    w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    calls = {
        "batch_norm_half": lambda x: bnF.batch_norm(x, None, None, w, b, True),
        "layer_norm": lambda x: alt.layer_norm(x, (5,)),
        "layer_norm_half": lambda x: alt.layer_norm(x, (5,)),
        "rms_norm": lambda x: alt.rms_norm(x, (6, 5), torch.ones(6, 5, requires_grad=True)),
        "rms_norm_half": lambda x: alt.rms_norm(x, (5,)),
        "group_norm": lambda x: alt.group_norm(x, 2, w, b),
        "batch_renorm": lambda x: alt.batch_renorm(x, torch.zeros(4), torch.ones(4), w, b, True),
    }
    _, saved = perf.saved_tensors(calls[case], x)
    big = [s for s in saved if s["bytes"] >= x.numel() * x.element_size()]
    assert big and all(s["is_arg"] for s in big), big
