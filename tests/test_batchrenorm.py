"""bnlib.nn.BatchRenorm1d/2d (Ioffe 2017; torch has none).

Truths: torch.nn.BatchNorm*d (with r_max = 1, d_max = 0 batch renorm *is*
batch norm in training: outputs, gradients, running statistics), the NumPy
reference ``bnlib.reference.batchrenorm_forward/backward`` (float64) with the
running estimates updated by batch norm's formula written out here, closed
forms (no clipping: the output is the running-statistics normalization), and
torch.autograd.gradcheck where r and d are clipped (then locally constant, so
the stop-gradient backward is the true derivative). Tolerances: helpers.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnlib.alternatives
import bnlib.nn
import bnlib.reference as ref
from bnlib.alternatives import BatchRenormTrainFunction, LinearRamp, paper_schedule
from helpers import GRAD_TOL, OUT_TOL, STAT_TOL, assert_close, np64, random_input

DTYPES = [torch.float32, torch.float64]
CONFIGS = [dict(), dict(affine=False), dict(bias=False), dict(momentum=None), dict(momentum=0.5, eps=1e-3)]
CASES = [(bnlib.nn.BatchRenorm1d, torch.nn.BatchNorm1d, [(8, 3), (4, 3, 5)]),
         (bnlib.nn.BatchRenorm2d, torch.nn.BatchNorm2d, [(4, 3, 2, 3), (2, 3, 1, 2)])]


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _set_params(*modules, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = modules[0].num_features
    w, b = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for m in modules:
            if m.weight is not None:
                m.weight.copy_(w)
            if m.bias is not None:
                m.bias.copy_(b)


def _step(module, x, seed):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(random_input(y.shape, dtype=y.dtype, seed=seed, spread=False))
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ours_cls,torch_cls,shapes", CASES, ids=["1d", "2d"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_no_room_is_batchnorm(ours_cls, torch_cls, shapes, cfg, dtype):
    ours = ours_cls(3, dtype=dtype, r_max=1.0, d_max=0.0, **cfg)
    theirs = torch_cls(3, dtype=dtype, **cfg)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _set_params(ours, theirs)
    for step, shape in enumerate(shapes * 2):  # several training steps with moving statistics
        x = random_input(shape, dtype=dtype, seed=step) * (1 + step)
        y1, dx1, g1 = _step(ours, x, step)
        y2, dx2, g2 = _step(theirs, x, step)
        assert_close(y1, y2, OUT_TOL[dtype], "output")
        assert_close(dx1, dx2, GRAD_TOL[dtype], "input gradient")
        for name in g2:
            assert_close(g1[name], g2[name], GRAD_TOL[dtype], name)
        for key, value in theirs.state_dict().items():
            tol = STAT_TOL[dtype] if value.is_floating_point() else dict(rtol=0, atol=0)
            assert_close(ours.state_dict()[key], value, tol, key)
        torch.testing.assert_close(ours.last_r, torch.ones(3, dtype=dtype))
        torch.testing.assert_close(ours.last_d, torch.zeros(3, dtype=dtype))
    ours.eval(), theirs.eval()
    x = random_input(shapes[0], dtype=dtype, seed=9)
    y1, dx1, _ = _step(ours, x, 9)
    y2, dx2, _ = _step(theirs, x, 9)
    assert_close(y1, y2, OUT_TOL[dtype], "eval output")
    assert_close(dx1, dx2, GRAD_TOL[dtype], "eval input gradient")


def test_vs_numpy_reference_several_steps():
    """Output, gradients and running estimates against the reference over 4 steps,
    with r clipped at first (running var 1 vs batch stds 0.5 .. 3) and freer later."""
    module = bnlib.nn.BatchRenorm2d(3, dtype=torch.float64, momentum=0.3, r_max=1.5, d_max=0.5)
    _set_params(module)
    running_mean, running_var = np.zeros(3), np.ones(3)
    gamma, beta = np64(module.weight), np64(module.bias)
    for step in range(4):
        x = random_input((4, 3, 3, 2), seed=step)
        y, dx, grads = _step(module, x, step + 10)
        dy = np64(random_input(y.shape, dtype=torch.float64, seed=step + 10, spread=False))
        y_ref, cache = ref.batchrenorm_forward(np64(x), gamma, beta, running_mean, running_var, r_max=1.5, d_max=0.5)
        dx_ref, dgamma_ref, dbeta_ref = ref.batchrenorm_backward(dy, cache)
        for ours, theirs in [(y, y_ref), (dx, dx_ref), (grads["weight"], dgamma_ref), (grads["bias"], dbeta_ref),
                             (module.last_r, cache.r), (module.last_d, cache.d)]:
            np.testing.assert_allclose(np64(ours), theirs, rtol=1e-10, atol=1e-10)
        m = 4 * 3 * 2
        running_mean = 0.7 * running_mean + 0.3 * cache.mu  # batch norm's rule
        running_var = 0.7 * running_var + 0.3 * cache.var * m / (m - 1)
        np.testing.assert_allclose(np64(module.running_mean), running_mean, rtol=1e-12)
        np.testing.assert_allclose(np64(module.running_var), running_var, rtol=1e-12)
        if step == 0:
            assert np.all(np.isin(cache.r, [1 / 1.5, 1.5])), "the first step should clip r (stds 0.5 .. 3 vs 1)"
    assert int(module.num_batches_tracked) == 4


def test_without_clipping_training_uses_running_statistics():
    """r and d unclipped: x_hat = (x - running_mean) / sqrt(running_var + eps), as in eval mode."""
    module = bnlib.nn.BatchRenorm1d(3, dtype=torch.float64, r_max=1e6, d_max=1e6, momentum=0.0)
    with torch.no_grad():
        module.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        module.running_var.copy_(torch.tensor([4.0, 0.25, 9.0]))
    x = random_input((16, 3), seed=3)
    y_train = module(x).detach()
    y_eval = module.eval()(x).detach()
    assert_close(y_train, y_eval, OUT_TOL[torch.float64], "train vs eval")


def test_gradcheck_where_r_and_d_are_clipped():
    """With r and d at their clipping limits they are locally constant, so finite
    differences of the whole forward test the stop-gradient backward."""
    x = random_input((5, 3, 2), seed=4).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()
    running_mean = torch.full((3,), 10.0, dtype=torch.float64)  # far from the batch means: d clipped
    running_var = torch.full((3,), 100.0, dtype=torch.float64)  # far from the batch variances: r clipped
    _, _, _, r, d = BatchRenormTrainFunction.apply(x, w, b, running_mean, running_var, 1e-5, 2.0, 0.5)
    assert torch.all(r == 0.5) and torch.all(d == -0.5)

    def f(x, w, b):
        return BatchRenormTrainFunction.apply(x, w, b, running_mean, running_var, 1e-5, 2.0, 0.5)[0]

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("module_cls,shape", [(bnlib.nn.BatchRenorm1d, (16, 3)), (bnlib.nn.BatchRenorm2d, (4, 3, 2, 3))])
def test_gradient_through_r_and_d_unclipped_is_the_running_statistics_map(module_cls, shape):
    """stop_gradient=False, r and d unclipped: y = gamma (x - running_mean) / sigma + beta as a
    function of x, so dx = gamma / sigma * dy, dgamma and dbeta those of that affine map."""
    module = module_cls(3, dtype=torch.float64, r_max=1e6, d_max=1e6, momentum=0.3, stop_gradient=False)
    _set_params(module)
    running_mean, running_var = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([4.0, 0.25, 9.0], dtype=torch.float64)
    with torch.no_grad():
        module.running_mean.copy_(running_mean)
        module.running_var.copy_(running_var)
    x = random_input(shape, seed=3).requires_grad_()
    dy = random_input(shape, seed=4)
    y = module(x)
    dx, dw, db = torch.autograd.grad(y, (x, module.weight, module.bias), dy)
    view = (1, 3) + (1,) * (len(shape) - 2)
    sigma = torch.sqrt(running_var + module.eps).view(view)
    x_hat = (x.detach() - running_mean.view(view)) / sigma
    w = module.weight.detach().view(view)
    dims = [0] + list(range(2, len(shape)))
    assert_close(y.detach(), w * x_hat + module.bias.detach().view(view), OUT_TOL[torch.float64], "y")
    assert_close(dx, w / sigma * dy, GRAD_TOL[torch.float64], "dx")
    assert_close(dw, (dy * x_hat).sum(dims), GRAD_TOL[torch.float64], "dgamma")
    assert_close(db, dy.sum(dims), GRAD_TOL[torch.float64], "dbeta")
    # the running estimates move as with the paper's stop-gradient
    paper = module_cls(3, dtype=torch.float64, r_max=1e6, d_max=1e6, momentum=0.3)
    with torch.no_grad():
        paper.running_mean.copy_(running_mean)
        paper.running_var.copy_(running_var)
    paper(x.detach())
    assert_close(module.running_mean, paper.running_mean, STAT_TOL[torch.float64], "running_mean")
    assert_close(module.running_var, paper.running_var, STAT_TOL[torch.float64], "running_var")
    assert "stop_gradient=False" in repr(module) and "stop_gradient" not in repr(paper)


def test_gradient_through_r_and_d_clipped_is_batchnorms():
    """stop_gradient=False with r_max = 1, d_max = 0: r and d are clipped constants, so
    outputs and gradients are batch norm's (torch.nn.BatchNorm1d's)."""
    ours = bnlib.nn.BatchRenorm1d(3, dtype=torch.float64, r_max=1.0, d_max=0.0, stop_gradient=False)
    theirs = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    _set_params(ours, theirs)
    x = random_input((8, 3, 4), seed=5).requires_grad_()
    dy = random_input((8, 3, 4), seed=6)
    got = torch.autograd.grad(ours(x), (x, ours.weight, ours.bias), dy)
    want = torch.autograd.grad(theirs(x), (x, theirs.weight, theirs.bias), dy)
    for name, a, b in zip(("dx", "dgamma", "dbeta"), got, want):
        assert_close(a, b, GRAD_TOL[torch.float64], name)
    assert_close(ours.running_var, theirs.running_var, STAT_TOL[torch.float64], "running_var")
    # and where the limits leave room, the gradient differs from the paper's
    free = bnlib.nn.BatchRenorm1d(3, dtype=torch.float64, r_max=3.0, d_max=5.0, stop_gradient=False)
    paper = bnlib.nn.BatchRenorm1d(3, dtype=torch.float64, r_max=3.0, d_max=5.0)
    dx_free, dx_paper = (torch.autograd.grad(m(x), x, dy)[0] for m in (free, paper))
    assert not torch.allclose(dx_free, dx_paper)


def test_gradient_through_r_and_d_functional_and_bad_values():
    x = random_input((8, 3), seed=7).requires_grad_()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = bnlib.alternatives.batch_renorm(x, rm, rv, training=True, r_max=1e6, d_max=1e6, stop_gradient=False)
    # running estimates 0 and ~1 before this step: y is x / sqrt(1 + eps)
    assert_close(y.detach(), x.detach() / (1 + 1e-5) ** 0.5, OUT_TOL[torch.float64], "y")
    for bad in (None, 1, "no"):
        with pytest.raises(ValueError, match="stop_gradient"):
            bnlib.nn.BatchRenorm1d(3, stop_gradient=bad)
        with pytest.raises(ValueError, match="stop_gradient"):
            bnlib.alternatives.batch_renorm(x, rm, rv, training=True, stop_gradient=bad)


def test_state_dict_is_batchnorms():
    bn = torch.nn.BatchNorm2d(3)
    for seed in range(3):
        bn(random_input((4, 3, 2, 2), dtype=torch.float32, seed=seed))
    brn = bnlib.nn.BatchRenorm2d(3)
    brn.load_state_dict(bn.state_dict())
    back = torch.nn.BatchNorm2d(3)
    back.load_state_dict(brn.state_dict())
    for key, value in bn.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x = random_input((2, 3, 2, 2), dtype=torch.float32, seed=5)
    assert_close(brn.eval()(x), bn.eval()(x), OUT_TOL[torch.float32], "eval")


def test_schedule():
    ramp = LinearRamp(10, 20, 1.0, 3.0)
    assert [ramp(s) for s in (0, 10, 15, 20, 99)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    sched = paper_schedule(scale=0.001)  # BN for 5 steps; r_max -> 3 at 40, d_max -> 5 at 25
    assert (sched["r_max"](5), sched["r_max"](40), sched["d_max"](5), sched["d_max"](25)) == (1.0, 3.0, 0.0, 5.0)
    module = bnlib.nn.BatchRenorm1d(2, **sched)
    limits = []
    for step in range(45):
        limits.append(module.current_limits())
        module(random_input((4, 2), dtype=torch.float32, seed=step))
    assert limits[0] == (1.0, 0.0) and limits[5] == (1.0, 0.0)
    assert limits[40] == (3.0, 5.0) and limits[25][1] == 5.0
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(limits, limits[1:]))
    with pytest.raises(ValueError):
        LinearRamp(5, 2, 1.0, 3.0)


def test_half_input_float32_statistics():
    module = bnlib.nn.BatchRenorm2d(3, r_max=2.0, d_max=1.0)
    x = random_input((4, 3, 4, 4), dtype=torch.float32, seed=6)
    y = module(x.half().requires_grad_())
    assert y.dtype == torch.float16 and module.running_mean.dtype == torch.float32
    y.float().sum().backward()
    reference = bnlib.nn.BatchRenorm2d(3, r_max=2.0, d_max=1.0)
    torch.testing.assert_close(y.float(), reference(x.half().float()), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(module.running_var, reference.running_var, rtol=1e-5, atol=1e-6)


def test_large_mean_float32_is_stable():
    x = 1e4 + random_input((64, 2), seed=7, spread=False)
    m32 = bnlib.nn.BatchRenorm1d(2, r_max=1.0, d_max=0.0)
    m32(x.float())
    m64 = bnlib.nn.BatchRenorm1d(2, r_max=1.0, d_max=0.0, dtype=torch.float64)
    m64(x)
    # running_var = 0.9 + 0.1 * var_unbiased: a variance within 1e-3 (relative) moves it by < 1e-4
    torch.testing.assert_close(m32.running_var.double(), m64.running_var, rtol=1e-4, atol=0)


def test_nonfinite_batch_leaves_running_stats_of_its_channel():
    module = bnlib.nn.BatchRenorm1d(3)
    x = random_input((6, 3), dtype=torch.float32, seed=8)
    x[2, 1] = float("inf")
    y = module(x)
    assert not torch.isfinite(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()
    assert module.running_mean[1] == 0 and module.running_var[1] == 1 and module.running_mean[0] != 0


@pytest.mark.parametrize("kw", [dict(r_max=0.5), dict(d_max=-1.0), dict(track_running_stats=False), dict(eps=0.0),
                                dict(momentum=2.0), dict(r_max=float("inf"))])
def test_bad_constructor_arguments(kw):
    with pytest.raises(ValueError):
        bnlib.nn.BatchRenorm1d(3, **kw)


@pytest.mark.parametrize("module,shape,pattern", [
    (lambda: bnlib.nn.BatchRenorm1d(3), (1, 3), "more than 1 value per channel"),
    (lambda: bnlib.nn.BatchRenorm1d(3), (4, 2), r"3 channels.*got 2"),
    (lambda: bnlib.nn.BatchRenorm1d(3), (4, 3, 2, 2), r"2D or 3D input \(got 4D"),
    (lambda: bnlib.nn.BatchRenorm2d(3), (4, 3, 2), "4D input"),
    (lambda: bnlib.nn.BatchRenorm2d(3, r_max=lambda step: 0.5), (4, 3, 2, 2), "r_max"),
    (lambda: bnlib.nn.BatchRenorm2d(3, d_max=lambda step: -1), (4, 3, 2, 2), "d_max"),
])
def test_bad_input_raises_and_changes_nothing(module, shape, pattern):
    module = module()
    before = _state(module)
    with pytest.raises(ValueError, match=pattern):
        module(torch.randn(shape))
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_count_set_to_none_trains_with_fixed_limits():
    """torch's BN trains with num_batches_tracked set to None; so does batch
    renorm where no schedule needs the step (the count is then not read)."""
    layer = bnlib.nn.BatchRenorm1d(3)
    layer.num_batches_tracked = None
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert layer.num_batches_tracked is None


def test_decay_bn_false_exempts_batch_renorm_parameters():
    """training.train(decay_bn=False) puts batch renorm's gamma and beta in the
    group without weight decay, as BN's."""
    from bnlib.training import _parameter_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), bnlib.nn.BatchRenorm1d(3))
    decayed, exempt = _parameter_groups(model, 1e-4, decay_bn=False)
    assert {id(p) for p in exempt["params"]} == {id(model[1].weight), id(model[1].bias)}
    assert exempt["weight_decay"] == 0.0 and decayed["weight_decay"] == 1e-4


def test_last_at_limits_marks_the_clipped_corrections_with_the_steps_limits():
    """r clipped low, free and high in three channels (batch stds 0.5, 1, 3
    against a running variance of 1), d clipped in the channel whose mean
    sits far from the running mean; the masks use the limits of the step
    taken, not the next step's (a schedule moves them)."""
    module = bnlib.nn.BatchRenorm1d(3, dtype=torch.float64, r_max=LinearRamp(0, 2, 1.5, 2.5), d_max=0.5)
    assert module.last_at_limits() is None
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 3, dtype=torch.float64, generator=gen)
    z = (z - z.mean(0)) / z.std(0, unbiased=False)  # exactly mean 0, std 1 per channel
    x = z * torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64) + torch.tensor([0.0, 0.0, 4.0], dtype=torch.float64)
    module(x)
    assert module.last_limits == (1.5, 0.5) and module.current_limits() == (2.0, 0.5)
    r_low, r_high, d_clipped = module.last_at_limits()
    assert r_low.tolist() == [True, False, False]
    assert r_high.tolist() == [False, False, True]
    assert d_clipped.tolist() == [False, False, True]
    torch.testing.assert_close(module.last_r[[0, 2]], torch.tensor([1 / 1.5, 1.5], dtype=torch.float64))
    # r_max = 1 and d_max = 0, batch norm: every correction at its limits
    bn_phase = bnlib.nn.BatchRenorm1d(3, r_max=1.0, d_max=0.0)
    bn_phase(x.float())
    assert all(mask.all() for mask in bn_phase.last_at_limits())
