"""bnlib.landscape: noisy BN, ICS as gradient change, smoothness along the gradient, scale invariance.

Truths: torch's own batch norm (``torch.nn.BatchNorm1d``,
``torch.nn.functional.batch_norm``), the same measurement written out by
hand with ``copy.deepcopy`` and autograd, a forward pass written out by hand
(BN as its formula) with autograd, the closed-form gradient of a linear
network, the closed forms of a quadratic loss (its gradient, Hessian and
largest eigenvalue), and the closed form of BN of a scaled input,
``(z - mu) / sqrt(var + eps / a^2)``.

Everything runs in float64 unless said otherwise, so tolerances of 1e-9 to
1e-12 leave room for a different order of summation only.
"""

import copy
import functools
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlib.nn
from bnlib import landscape, models, training

F64 = torch.float64


def _data(n=32, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def _mlp(norm, seed=0, **noise):
    kw = {}
    if norm == "bn":
        kw["norm"] = "bn"
    elif norm == "noisy":
        kw["norm_layer"] = functools.partial(landscape.NoisyBatchNorm1d, **noise)
    return models.make_mlp(6, 5, 3, depth=3, activation="tanh", seed=seed, **kw).double()


def _state(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def _same_state(a, b):
    return len(a) == len(b) and all(torch.equal(s, t) for s, t in zip(a, b))


# --------------------------------------------------------------------------
# NoisyBatchNorm1d
# --------------------------------------------------------------------------


def _assert_is_torch_bn(module, shape=(16, 4)):
    """``module`` (4 features, float64) against ``torch.nn.BatchNorm1d``: outputs, input and
    parameter gradients and running statistics over three training steps, then eval mode.
    The same float64 ops up to summation order: 1e-12 (1e-10 for gradients)."""
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm1d(4, dtype=F64)
    with torch.no_grad():
        for m in (module, ref):
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 1.0]))
    for step in range(3):
        x = (3 * torch.randn(*shape, dtype=F64) + 2).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        out, out_ref = module(x), ref(x2)
        torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
        dy = torch.randn_like(out)
        out.backward(dy)
        out_ref.backward(dy)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    assert int(module.num_batches_tracked) == 3
    module.eval(), ref.eval()
    x = torch.randn(*shape, dtype=F64)
    torch.testing.assert_close(module(x), ref(x), rtol=1e-12, atol=1e-12)


def test_noisy_bn_without_noise_is_bn():
    # n_mu = 0, n_sigma = 1: scale 1 and shift 0 exactly.
    _assert_is_torch_bn(landscape.NoisyBatchNorm1d(4, n_mu=0.0, n_sigma=1.0, dtype=F64))


def test_noisy_bn_is_bn_times_scale_plus_shift_of_the_step():
    # Truth: torch's BN output y; then out = s * y + m per unit with the
    # (s, m) that noise(step) reports, drawn in the documented ranges.
    torch.manual_seed(1)
    n_mu, n_sigma = 0.7, 1.8
    noisy = landscape.NoisyBatchNorm1d(5, n_mu=n_mu, n_sigma=n_sigma, seed=42, dtype=F64)
    seen = []
    for step in (1, 2, 3):
        x = torch.randn(20, 5, dtype=F64)
        y = F.batch_norm(x, None, None, noisy.weight.detach(), noisy.bias.detach(), training=True)
        scale, shift = noisy.noise(step)
        torch.testing.assert_close(noisy(x).detach(), y * scale + shift, rtol=1e-12, atol=1e-12)
        assert torch.all((scale >= 1) & (scale <= n_sigma)) and torch.all(shift.abs() <= n_mu)
        seen.append(scale)
    assert not torch.equal(seen[0], seen[1]), "the noise must change from step to step"
    # the same (seed, step) gives the same noise; another seed another one
    torch.testing.assert_close(noisy.noise(2)[0], seen[1], rtol=0, atol=0)
    other = landscape.NoisyBatchNorm1d(5, n_mu=n_mu, n_sigma=n_sigma, seed=43)
    assert not torch.equal(other.noise(2)[0], seen[1])


def test_noisy_bn_noise_statistics():
    # Over many steps the scale is U(1, n_sigma) and the shift U(-n_mu, n_mu):
    # means (1 + n_sigma) / 2 and 0, variances (n_sigma - 1)^2 / 12 and n_mu^2 / 3.
    # 4000 steps x 50 units = 2e5 draws: standard errors below 1e-3.
    noisy = landscape.NoisyBatchNorm1d(50, n_mu=1.0, n_sigma=2.0, seed=0)
    s, m = zip(*(noisy.noise(t) for t in range(1, 4001)))
    s, m = torch.stack(s), torch.stack(m)
    assert abs(float(s.mean()) - 1.5) < 5e-3 and abs(float(s.var()) - 1 / 12) < 5e-3
    assert abs(float(m.mean())) < 5e-3 and abs(float(m.var()) - 1 / 3) < 5e-3


def test_noisy_bn_eval_uses_the_expected_scale():
    noisy = landscape.NoisyBatchNorm1d(3, n_mu=1.0, n_sigma=3.0, dtype=F64).eval()
    ref = torch.nn.BatchNorm1d(3, dtype=F64).eval()
    x = torch.randn(7, 3, dtype=F64)
    torch.testing.assert_close(noisy(x), 2.0 * ref(x), rtol=1e-12, atol=1e-12)
    assert int(noisy.noise_step) == 0


def test_noisy_bn_state_dict_is_bn_and_bad_input():
    noisy = landscape.NoisyBatchNorm1d(4)
    assert list(noisy.state_dict()) == list(torch.nn.BatchNorm1d(4).state_dict())
    for kwargs in (dict(n_mu=-0.1), dict(n_sigma=0.9), dict(n_mu=float("nan"))):
        with pytest.raises(ValueError, match="n_mu|n_sigma"):
            landscape.NoisyBatchNorm1d(4, **kwargs)
    before = _state(noisy)
    with pytest.raises(ValueError, match="channels"):
        noisy(torch.randn(8, 5))
    assert _same_state(before, _state(noisy)), "a bad input must not change any state"


# --------------------------------------------------------------------------
# LpBatchNorm1d
# --------------------------------------------------------------------------


def _lp_truth(x, p, eps=1e-5):
    """The formula of LpBatchNorm1d's docstring in NumPy, float64, gamma = 1 and beta = 0."""
    x = np.asarray(x, dtype=np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    d = np.abs(x - mean)
    s = d.max(axis=axes, keepdims=True) if math.isinf(p) else (d ** p).mean(axis=axes, keepdims=True) ** (1 / p)
    return (x - mean) / np.sqrt(s ** 2 + eps), mean.ravel(), (s ** 2).ravel()


@pytest.mark.parametrize("shape", [(16, 4), (6, 4, 5)])
def test_lp_bn_with_p_2_is_torch_bn(shape):
    _assert_is_torch_bn(landscape.LpBatchNorm1d(4, p=2, dtype=F64), shape)


@pytest.mark.parametrize("p", [1, 3, math.inf])
@pytest.mark.parametrize("shape", [(16, 4), (6, 4, 5)])
def test_lp_bn_matches_the_formula(p, shape):
    # Truth: the docstring's formula in NumPy; running estimates after one
    # step with momentum 1 are the batch's mu and s_p^2 (no m / (m - 1) for p != 2).
    x = 3 * torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(1)) - 1
    lp = landscape.LpBatchNorm1d(4, p=p, momentum=1.0, affine=False, dtype=F64)
    want, mean, spread_sq = _lp_truth(x.numpy(), p)
    np.testing.assert_allclose(lp(x).numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lp.running_mean.numpy(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lp.running_var.numpy(), spread_sq, rtol=1e-12, atol=1e-12)
    lp.eval()
    np.testing.assert_allclose(lp(x).numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [1, 1.5, math.inf])
def test_lp_bn_gradients_match_finite_differences(p):
    # Continuous random input: no ties for the max, no deviation exactly 0.
    torch.manual_seed(2)
    lp = landscape.LpBatchNorm1d(3, p=p, dtype=F64)
    with torch.no_grad():
        lp.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
    x = torch.randn(7, 3, dtype=F64, requires_grad=True)
    # Each call changes the running estimates, never the output: gradcheck is unaffected.
    assert torch.autograd.gradcheck(lambda t, w: F.linear(lp(t), w), (x, torch.randn(2, 3, dtype=F64)))
    assert torch.autograd.gradcheck(lambda w: lp(x.detach()) * w, (torch.randn(3, dtype=F64, requires_grad=True),))


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lp_bn_is_invariant_to_the_scale_and_shift_of_its_input(p):
    # Every s_p is positively homogeneous and shift-invariant: LpBN(a x + b) = LpBN(x)
    # up to eps (the inputs' spreads are about 3, a^2 s^2 >> eps for a >= 1).
    x = 3 * torch.randn(32, 5, dtype=F64, generator=torch.Generator().manual_seed(3))
    lp = landscape.LpBatchNorm1d(5, p=p, dtype=F64)
    for a, b in [(1.0, 5.0), (10.0, -3.0), (1000.0, 0.0)]:
        torch.testing.assert_close(lp(a * x + b), lp(x), rtol=0, atol=1e-5)


def test_lp_bn_spread_of_normal_inputs():
    # For normal inputs: s_1 = sigma sqrt(2/pi), so std(x_hat) = sqrt(pi/2) = 1.2533;
    # s_inf is the batch's largest deviation, so std(x_hat) falls as the batch grows.
    x = torch.randn(200_000, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        std_1 = float(landscape.LpBatchNorm1d(2, p=1, dtype=F64)(x).std())
        stds = [float(landscape.LpBatchNorm1d(2, p=math.inf, dtype=F64)(x[:m]).std()) for m in (16, 256, 4096)]
    assert abs(std_1 - math.sqrt(math.pi / 2)) < 5e-3
    assert stds[0] > stds[1] > stds[2]


def test_lp_bn_nan_rule_and_bad_input():
    lp = landscape.LpBatchNorm1d(3, p=1, momentum=0.5)
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    out = lp(x)
    assert torch.isnan(out[:, 1]).all() and torch.isfinite(out[:, [0, 2]]).all()
    assert lp.running_mean[1] == 0 and lp.running_var[1] == 1, "the NaN channel keeps its estimates"
    assert lp.running_mean[0] != 0 and lp.running_var[0] != 1
    for p in (0.5, float("nan"), "1", True, None):
        with pytest.raises(ValueError, match="p must be"):
            landscape.LpBatchNorm1d(3, p=p)
    assert list(lp.state_dict()) == list(torch.nn.BatchNorm1d(3).state_dict())
    before = _state(lp)
    for bad in (torch.randn(8, 4), torch.randn(1, 3), torch.randn(2, 3, 4, 5)):
        with pytest.raises(ValueError):
            lp(bad)
    assert _same_state(before, _state(lp)), "a bad input must not change any state"
    assert "p=1.0" in repr(lp)


def test_lp_bn_trains_in_an_mlp():
    # The chapter's use: a norm_layer factory for make_mlp; SGD learns labels
    # that a linear map of the input decides.
    x, _ = _data(n=64)
    y = (x @ torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(5))).argmax(dim=1)
    model = models.make_mlp(6, 8, 3, depth=2, activation="relu", seed=0,
                            norm_layer=functools.partial(landscape.LpBatchNorm1d, p=math.inf)).double()
    hist = training.train(model, x, y, epochs=60, batch_size=16, lr=0.2, seed=0)
    assert np.mean(hist.loss[-4:]) < 0.5 * np.mean(hist.loss[:4])


# --------------------------------------------------------------------------
# ICS as a change of gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [None, "bn", "noisy"])
def test_ics_is_zero_when_lr_is_zero(norm):
    # lr = 0: the earlier layers do not move, G' is the same computation as G
    # on the same buffers (and the same noise): bit for bit equal on the CPU.
    model = _mlp(norm)
    x, y = _data()
    before = _state(model)
    res = landscape.ics_gradient_change(model, x, y, lr=0.0)
    assert res.names == ["fc1", "fc2", "fc3", "out"]
    np.testing.assert_array_equal(res.l2, 0.0)
    np.testing.assert_allclose(res.cosine, 1.0, rtol=0, atol=1e-12)
    assert np.all(res.grad_norm > 0)
    assert _same_state(before, _state(model)), "the measurement must leave the model as it was"
    assert model.training


@pytest.mark.parametrize("norm", [None, "bn", "noisy"])
def test_ics_matches_a_hand_written_measurement(norm):
    # Truth: deep copies of the model, a hand-made SGD step on the parameters
    # of fc1, norm1, act1, fc2, ... before layer i, autograd for G and G'.
    lr = 0.3
    model = _mlp(norm, seed=3)
    x, y = _data(seed=1)
    res = landscape.ics_gradient_change(model, x, y, lr=lr, layers=["fc1", "fc3", "out"])

    def grad_w(m, name):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        return getattr(m, name).weight.grad.detach().clone()

    for k, name in enumerate(["fc1", "fc3", "out"]):
        m0 = copy.deepcopy(model)
        G = grad_w(m0, name)
        m1 = copy.deepcopy(model)
        grads = {n: p.grad for n, p in m0.named_parameters()}
        earlier = [n for n, _ in model.named_children()]
        earlier = earlier[: earlier.index(name)]
        with torch.no_grad():
            for n, p in m1.named_parameters():
                if n.split(".")[0] in earlier:
                    p -= lr * grads[n]
        G1 = grad_w(m1, name)
        assert math.isclose(res.l2[k], float((G - G1).norm()), rel_tol=1e-9, abs_tol=1e-13)
        cos = float((G * G1).sum() / (G.norm() * G1.norm()))
        assert math.isclose(res.cosine[k], cos, rel_tol=1e-9)
        assert math.isclose(res.grad_norm[k], float(G.norm()), rel_tol=1e-9)
    assert res.l2[0] == 0.0  # nothing before fc1
    assert res.l2[1] > 0 and res.l2[2] > 0


def test_ics_bad_input():
    model = _mlp("bn")
    x, y = _data()
    with pytest.raises(ValueError, match="lr"):
        landscape.ics_gradient_change(model, x, y, lr=-1.0)
    with pytest.raises(ValueError, match="layers"):
        landscape.ics_gradient_change(model, x, y, lr=0.1, layers=["act1"])
    with pytest.raises(ValueError, match="same N"):
        landscape.ics_gradient_change(model, x, y[:-1], lr=0.1)


# --------------------------------------------------------------------------
# Gradient norms layer by layer
# --------------------------------------------------------------------------


def _relu_mlp(norm, seed=0):
    """Three hidden ReLU layers of 5 units (BN before each ReLU with norm="bn"), float64,
    with BN's gamma and beta and the biases moved away from 1 and 0."""
    model = models.make_mlp(6, 5, 3, depth=3, activation="relu", seed=seed,
                            norm=norm).double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
    return model


@pytest.mark.parametrize("norm", [None, "bn"])
def test_gradient_norms_match_a_hand_written_forward_pass(norm):
    # Truth: the network's forward pass written out with tensor ops (BN as
    # its formula, biased variance, eps), differentiated by autograd. The
    # same float64 arithmetic up to the order of sums: 1e-12.
    model = _relu_mlp(norm, seed=1)
    x, y = _data(n=16, seed=4)
    res = landscape.gradient_norms_by_layer(model, x, y)
    assert res.shape == (3,) and res.dtype == np.float64
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    h = x
    for l in (1, 2, 3):
        z = h @ leaves[f"fc{l}.weight"].T
        if norm is None:
            z = z + leaves[f"fc{l}.bias"]
        else:
            mu = z.mean(0)
            var = ((z - mu) ** 2).mean(0)
            z = (leaves[f"norm{l}.weight"] * (z - mu) / torch.sqrt(var + 1e-5)
                 + leaves[f"norm{l}.bias"])
        h = torch.relu(z)
    out = h @ leaves["out.weight"].T + leaves["out.bias"]
    ws = [leaves[f"fc{l}.weight"] for l in (1, 2, 3)]
    grads = torch.autograd.grad(F.cross_entropy(out, y), ws)
    np.testing.assert_allclose(res, [float(g.norm()) for g in grads], rtol=1e-12)
    # naming the layers picks them out, in the order given
    again = landscape.gradient_norms_by_layer(model, x, y, layers=["fc3", "fc1"])
    np.testing.assert_array_equal(again, res[[2, 0]])


def test_gradient_norms_of_a_linear_network_are_the_closed_form():
    # L = 1/2 ||x W1^T W2^T Wo^T - t||^2: with R = out - t,
    # dL/dW1 = (R Wo W2)^T x, dL/dW2 = (R Wo)^T (x W1^T), dL/dWo = R^T (x W1^T W2^T).
    g = torch.Generator().manual_seed(0)
    sizes = [(4, 5), (5, 3), (3, 2)]
    W1, W2, Wo = (torch.randn(o, i, generator=g, dtype=F64) for i, o in sizes)
    model = nn.Sequential(OrderedDict(
        (name, nn.Linear(i, o, bias=False).double())
        for name, (i, o) in zip(["fc1", "fc2", "out"], sizes)))
    with torch.no_grad():
        for layer, W in zip(model, (W1, W2, Wo)):
            layer.weight.copy_(W)
    x = torch.randn(7, 4, generator=g, dtype=F64)
    t = torch.randn(7, 2, generator=g, dtype=F64)
    R = x @ W1.T @ W2.T @ Wo.T - t
    want = [(R @ Wo @ W2).T @ x, (R @ Wo).T @ (x @ W1.T), R.T @ (x @ W1.T @ W2.T)]
    loss_fn = lambda out, target: 0.5 * ((out - target) ** 2).sum()  # noqa: E731
    res = landscape.gradient_norms_by_layer(model, x, t, loss_fn=loss_fn)
    np.testing.assert_allclose(res, [float(w.norm()) for w in want[:2]], rtol=1e-12)
    res = landscape.gradient_norms_by_layer(model, x, t, layers=["out"], loss_fn=loss_fn)
    np.testing.assert_allclose(res, [float(want[2].norm())], rtol=1e-12)


def test_gradient_norms_leave_the_model_as_it_was():
    # Parameters, buffers (running statistics, num_batches_tracked), every
    # submodule's mode and .grad come back unchanged; the measurement itself
    # runs in training mode whatever the model's mode.
    model = _relu_mlp("bn", seed=2)
    x, y = _data(n=16, seed=5)
    want = landscape.gradient_norms_by_layer(copy.deepcopy(model).train(), x, y)
    model.train()
    training.train(model, x, y, steps=2, batch_size=8, lr=0.1)  # running stats away from 0 and 1
    model.norm2.eval()                  # one BN frozen inside a model in training mode
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = _state(model)
    modes = [m.training for m in model.modules()]
    res = landscape.gradient_norms_by_layer(model, x, y)
    assert _same_state(before, _state(model))
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    # a model in eval mode is measured in training mode too
    model.eval()
    trained = copy.deepcopy(model).train()
    np.testing.assert_array_equal(landscape.gradient_norms_by_layer(model, x, y),
                                  landscape.gradient_norms_by_layer(trained, x, y))
    assert not any(m.training for m in model.modules())
    assert not np.allclose(res, want), "training changed the gradients"


def test_gradient_norms_of_a_residual_network_by_name():
    # The default layers of make_resmlp are the stem's linear map and both of
    # every block's, in order; with gamma = 0 in each block's last BN
    # (zero_init) no gradient reaches the blocks' weights: exactly 0.
    x, y = _data(n=16, d=6, seed=6)
    for zero_init in (False, True):
        model = models.make_resmlp(6, 5, 3, blocks=2, zero_init=zero_init, seed=0).double()
        res = landscape.gradient_norms_by_layer(model, x, y)
        names = ["stem.0", "block1.fc1", "block1.fc2", "block2.fc1", "block2.fc2"]
        np.testing.assert_array_equal(res, landscape.gradient_norms_by_layer(model, x, y, layers=names))
        assert res[0] > 0
        assert np.all(res[1:] == 0) if zero_init else np.all(res[1:] > 0)


def test_bn_gradients_grow_toward_the_input_at_the_mean_field_rate():
    # Yang et al. (2019): with BN before every ReLU and He initialization, the
    # weight gradient grows by sqrt(pi / (pi - 1)) ~ 1.211 per layer toward
    # the input as width and batch grow; without normalization it stays about
    # level. Width 128, batch 256, 20 layers, Gaussian inputs: the factor
    # fitted to log g_l of seeds 0 to 9 is 1.189 to 1.198 with BN (finite width
    # and batch move it by up to 0.02), hence a tolerance of 0.04; without BN
    # 0.93 to 0.99 (random-matrix fluctuations), hence the range 0.85 to 1.05.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    theory = math.sqrt(math.pi / (math.pi - 1))
    for seed in range(3):
        factor = {}
        for norm in ("bn", None):
            model = models.make_mlp(32, 128, 10, depth=20, activation="relu", norm=norm,
                                    weight_scale=math.sqrt(2), seed=seed)
            norms = landscape.gradient_norms_by_layer(model, x, y)
            factor[norm] = math.exp(-np.polyfit(np.arange(1, 21), np.log(norms), 1)[0])
        assert abs(factor["bn"] - theory) < 0.04, (seed, factor)
        assert 0.85 < factor[None] < 1.05, (seed, factor)


def test_gradient_norms_bad_input():
    model = _relu_mlp("bn")
    x, y = _data()
    with pytest.raises(ValueError, match="same N"):
        landscape.gradient_norms_by_layer(model, x, y[:-1])
    for bad in (["act1"], ["fc9"], ["norm1.nope"]):
        with pytest.raises(ValueError, match="weight that requires grad"):
            landscape.gradient_norms_by_layer(model, x, y, layers=bad)
    with pytest.raises(ValueError, match="empty"):
        landscape.gradient_norms_by_layer(model, x, y, layers=[])
    with pytest.raises(ValueError, match="list of names"):
        landscape.gradient_norms_by_layer(model, x, y, layers="fc1")
    with pytest.raises(ValueError, match="no hidden one"):
        landscape.gradient_norms_by_layer(nn.Linear(6, 3).double(), x, y)
    frozen = copy.deepcopy(model)
    frozen.fc2.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="'fc2'"):
        landscape.gradient_norms_by_layer(frozen, x, y)
    # errors raised in the forward pass or by the loss change no state either
    model.eval()
    before = _state(model)
    with pytest.raises(ValueError, match="scalar"):
        landscape.gradient_norms_by_layer(
            model, x, y, loss_fn=functools.partial(F.cross_entropy, reduction="none"))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        landscape.gradient_norms_by_layer(model, x[:1], y[:1])
    assert _same_state(before, _state(model)) and not any(m.training for m in model.modules())


# --------------------------------------------------------------------------
# The landscape along the gradient
# --------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [None, "bn", "noisy"])
def test_landscape_at_eta_zero_is_the_loss(norm):
    model = _mlp(norm, seed=2)
    x, y = _data(seed=2)
    expected = float(F.cross_entropy(copy.deepcopy(model).train()(x), y).detach())
    before = _state(model)
    res = landscape.loss_landscape_along_gradient(model, x, y, [0.0, 0.1, 0.5])
    assert math.isclose(res.loss0, expected, rel_tol=1e-12)
    assert res.loss[0] == res.loss0 and res.grad_change[0] == 0.0
    assert res.loss[1] < res.loss0  # a small step along -g goes down
    assert _same_state(before, _state(model))


def _quadratic(seed=0):
    """y_hat = x w, L = mean((x w - t)^2), H = (2/n) X^T X = diag(2 * d_k^2) with orthogonal columns."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(40, 4, generator=g, dtype=F64))
    d = torch.tensor([3.0, 1.0, 0.5, 0.2], dtype=F64)
    X = q * d * math.sqrt(40)          # X^T X = 40 diag(d^2)
    H = 2 / 40 * X.T @ X               # = diag(2 d^2): eigenvalues 18, 2, 0.5, 0.08
    w_star = torch.randn(4, generator=g, dtype=F64)
    model = nn.Linear(4, 1, bias=False).double()
    loss_fn = lambda out, t: ((out.squeeze(1) - t) ** 2).mean()  # noqa: E731
    return X, X @ w_star, w_star, H, model, loss_fn


def test_beta_smoothness_of_a_quadratic_is_its_largest_eigenvalue():
    # Along g, g(w - eta g) - g(w) = -eta H g exactly, so every ratio is
    # ||H g|| / ||g||; with w - w* on the top eigenvector it is lambda_max = 18.
    X, t, w_star, H, model, loss_fn = _quadratic()
    lam = torch.linalg.eigvalsh(H)
    with torch.no_grad():
        model.weight.copy_((w_star + 0.3 * torch.eye(4, dtype=F64)[0]).unsqueeze(0))
    res = landscape.loss_landscape_along_gradient(model, X, t, [0.001, 0.01, 0.05], loss_fn=loss_fn)
    assert math.isclose(res.beta, float(lam.max()), rel_tol=1e-9)
    # any other point: beta = ||H g|| / ||g|| <= lambda_max, and the loss is the closed form
    w = w_star + torch.tensor([0.2, -0.5, 1.0, 0.7], dtype=F64)
    with torch.no_grad():
        model.weight.copy_(w.unsqueeze(0))
    etas = [0.01, 0.05, 0.1]
    res = landscape.loss_landscape_along_gradient(model, X, t, etas, loss_fn=loss_fn)
    g = H @ (w - w_star)
    assert math.isclose(res.beta, float((H @ g).norm() / g.norm()), rel_tol=1e-9)
    assert res.beta < float(lam.max())
    for k, eta in enumerate(etas):
        w_eta = w - eta * g
        assert math.isclose(res.loss[k], float(((X @ w_eta - t) ** 2).mean()), rel_tol=1e-10)
        assert math.isclose(res.grad_change[k], eta * float((H @ g).norm()), rel_tol=1e-9)


def test_landscape_bad_input():
    model = _mlp(None)
    x, y = _data()
    for bad in ([], [-0.1], [float("inf")]):
        with pytest.raises(ValueError, match="step_sizes"):
            landscape.loss_landscape_along_gradient(model, x, y, bad)


# --------------------------------------------------------------------------
# A plane through the parameters
# --------------------------------------------------------------------------


def test_filter_normalized_direction_has_the_filters_norms():
    model = nn.Sequential(nn.Linear(5, 4), bnlib.nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 3, 2)).double()
    d = landscape.filter_normalized_direction(model, torch.Generator().manual_seed(0))
    params = list(model.parameters())
    assert [t.shape for t in d] == [p.shape for p in params]
    for p, t in zip(params, d):
        if p.dim() == 1:   # biases, gamma, beta
            assert torch.count_nonzero(t) == 0
        else:
            torch.testing.assert_close(t.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1),
                                       rtol=1e-12, atol=0)
            assert not torch.allclose(t, p.detach())
    again = landscape.filter_normalized_direction(model, torch.Generator().manual_seed(0))
    assert all(torch.equal(s, t) for s, t in zip(d, again)), "the generator decides the draw"


def test_loss_surface_of_a_linear_model_is_its_quadratic():
    # Truth: for z = x (W + a D1 + b D2)^T and the loss mean(z^2),
    # L(a, b) = mean((Z0 + a Z1 + b Z2)^2), written out with the three products.
    x, _ = _data(n=20, d=6)
    model = nn.Linear(6, 3, bias=False).double()
    d1 = landscape.filter_normalized_direction(model, torch.Generator().manual_seed(1))
    d2 = landscape.filter_normalized_direction(model, torch.Generator().manual_seed(2))
    alphas, betas = np.linspace(-1, 1, 5), np.linspace(-0.5, 1.5, 4)
    y0 = torch.zeros(20, 3, dtype=F64)
    s = landscape.loss_surface(model, x, y0, (d1, d2), alphas, betas, loss_fn=F.mse_loss)
    z0, z1, z2 = (x @ w.T for w in (model.weight.detach(), d1[0], d2[0]))
    want = np.array([[float(((z0 + a * z1 + b * z2) ** 2).mean()) for a in alphas] for b in betas])
    np.testing.assert_allclose(s, want, rtol=1e-12)
    assert landscape.negative_curvature_fraction(s, alphas, betas) == 0.0, "a convex quadratic"


def test_loss_surface_leaves_the_model_as_it_was():
    model = _mlp("bn")
    model.eval()
    x, y = _data()
    before = _state(model)
    d = [landscape.filter_normalized_direction(model, torch.Generator().manual_seed(s)) for s in (0, 1)]
    s = landscape.loss_surface(model, x, y, d, [-0.5, 0.0, 0.5], [0.0, 1.0])
    assert _same_state(before, _state(model)) and not model.training
    # the centre is the loss in training mode at the model's own parameters
    model.train()
    with torch.no_grad():
        assert s[0, 1] == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-12)
    with pytest.raises(ValueError, match="two lists"):
        landscape.loss_surface(model, x, y, d[:1], [0.0], [0.0])
    with pytest.raises(ValueError, match="shape"):
        landscape.loss_surface(model, x, y, (d[0], d[1][::-1]), [0.0], [0.0])
    with pytest.raises(ValueError, match="finite"):
        landscape.loss_surface(model, x, y, d, [float("nan")], [0.0])


def _orthogonal_directions(w, seed=0):
    """Two directions whose every filter has w's filter norm and is orthogonal to w's filter and to the other."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for w_k in w:
        basis = [w_k / w_k.norm()]
        for _ in range(2):
            v = torch.randn(w_k.shape, generator=g, dtype=F64)
            for e in basis:
                v = v - (v @ e) * e
            basis.append(v / v.norm())
        rows.append([e * w_k.norm() for e in basis[1:]])
    return [torch.stack([r[0] for r in rows])], [torch.stack([r[1] for r in rows])]


def test_filter_norm_growth_is_sqrt_of_1_plus_a2_plus_b2_for_orthogonal_directions():
    model = nn.Linear(6, 3, bias=False).double()
    d1, d2 = _orthogonal_directions(model.weight.detach())
    for a, b in [(0.0, 0.0), (0.5, 0.0), (1.0, 1.0), (-0.3, 0.7)]:
        np.testing.assert_allclose(landscape.filter_norm_growth(model, (d1, d2), a, b),
                                   [math.sqrt(1 + a * a + b * b)], rtol=1e-12)
    # random filter-normalized directions are nearly orthogonal in many
    # dimensions (cosines of order 1 / sqrt(1000))
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(1000, 20), nn.ReLU(), nn.Linear(20, 3)).double()
    d = [landscape.filter_normalized_direction(wide, torch.Generator().manual_seed(s)) for s in (0, 1)]
    growth = landscape.filter_norm_growth(wide, d, 0.5, 0.0)
    assert growth.shape == (2,), "one factor per weight, none for the biases"
    assert growth[0] == pytest.approx(math.sqrt(1.25), rel=0.01)
    # a zero filter has no ratio: left out, not a NaN
    with torch.no_grad():
        model.weight[0] = 0.0
    d1[0][0] = 0.0
    d2[0][0] = 0.0
    np.testing.assert_allclose(landscape.filter_norm_growth(model, (d1, d2), 1.0, 1.0), [math.sqrt(3)], rtol=1e-12)
    with pytest.raises(ValueError, match="finite"):
        landscape.filter_norm_growth(model, (d1, d2), float("inf"), 0.0)
    with pytest.raises(ValueError, match="two lists"):
        landscape.filter_norm_growth(model, (d1,), 1.0, 0.0)


def test_loss_surface_keeping_filter_norms():
    x, _ = _data(n=20, d=6)
    target = torch.randn(20, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    alphas, betas = np.linspace(-1, 1, 5), np.linspace(-0.5, 1.5, 4)

    def surfaces(model):
        d = [landscape.filter_normalized_direction(model, torch.Generator().manual_seed(s)) for s in (1, 2)]
        plain = landscape.loss_surface(model, x, target, d, alphas, betas, loss_fn=F.mse_loss)
        kept = landscape.loss_surface(model, x, target, d, alphas, betas, loss_fn=F.mse_loss,
                                      keep_filter_norms=True)
        return d, plain, kept

    # Truth 1: BN is scale invariant in the weights that feed it (up to eps),
    # so keeping their norms changes nothing.
    torch.manual_seed(0)
    feeds_bn = nn.Sequential(nn.Linear(6, 4, bias=False), bnlib.nn.BatchNorm1d(4, eps=1e-12, affine=False)).double()
    _, plain, kept = surfaces(feeds_bn)
    np.testing.assert_allclose(kept, plain, rtol=1e-9)
    # Truth 2: without BN, every point is the loss at the weights rescaled
    # filter by filter, written out here for a ReLU network.
    no_bn = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 4, bias=False)).double()
    with torch.no_grad():
        no_bn[0].weight[2] = 0.0   # a zero filter stays zero, without a NaN
    (d1, d2), plain, kept = surfaces(no_bn)
    w1, w2 = (m.weight.detach() for m in (no_bn[0], no_bn[2]))
    for j, b in enumerate(betas):
        for i, a in enumerate(alphas):
            moved = [w + a * u + b * v for w, u, v in zip((w1, w2), (d1[0], d1[1]), (d2[0], d2[1]))]
            kept_w = [m * torch.nan_to_num(w.norm(dim=1, keepdim=True) / m.norm(dim=1, keepdim=True))
                      for w, m in zip((w1, w2), moved)]
            want = F.mse_loss(torch.relu(x @ kept_w[0].T) @ kept_w[1].T, target)
            assert kept[j, i] == pytest.approx(float(want), rel=1e-12)
    assert np.all(np.isfinite(kept))
    assert not np.allclose(kept, plain), "without BN the norms matter"


def test_negative_curvature_fraction_of_known_surfaces():
    a = np.linspace(-1, 1, 9)
    b = np.linspace(-2, 2, 7)
    A, B = np.meshgrid(a, b)
    assert landscape.negative_curvature_fraction(A**2 + 3 * B**2, a, b) == 0.0
    assert landscape.negative_curvature_fraction(A**2 - B**2, a, b) == 1.0      # saddle
    assert landscape.negative_curvature_fraction(-(A**2) - B**2, a, b) == 1.0   # cap
    # curving down by less than ratio times the upward curvature does not count
    assert landscape.negative_curvature_fraction(A**2 - 0.05 * B**2, a, b, ratio=0.1) == 0.0
    assert landscape.negative_curvature_fraction(A**2 - 0.05 * B**2, a, b, ratio=0.01) == 1.0
    # a rotated saddle (only the mixed derivative) is a saddle too
    assert landscape.negative_curvature_fraction(A * B, a, b) == 1.0
    # the mask covers the inner points; a surface convex on the left, a cap on the right
    half = np.where(A < 0, A**2 + B**2, -(A**2) - B**2)
    mask = landscape.negative_curvature_mask(half, a, b)
    assert mask.shape == (5, 7)
    assert not mask[:, :2].any() and mask[:, 4:].all()   # columns a = -0.75, -0.5 and 0.25 .. 0.75
    with pytest.raises(ValueError, match="evenly spaced"):
        landscape.negative_curvature_fraction(A * B, a**3, b)
    with pytest.raises(ValueError, match="len"):
        landscape.negative_curvature_fraction(A * B, b, a)


# --------------------------------------------------------------------------
# Scale invariance
# --------------------------------------------------------------------------


@pytest.mark.parametrize("a", [0.5, 3.0, 100.0])
def test_bn_of_scaled_weights_is_bn_and_gradient_scales_as_one_over_a(a):
    # eps = 1e-12 makes eps / var negligible (var ~ 6 here), so the identities
    # hold to float64 rounding: 1e-9.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g, dtype=F64)
    W = torch.randn(4, 6, generator=g, dtype=F64)
    # the helper against torch's own batch norm
    torch.testing.assert_close(landscape.linear_bn(x, W, eps=1e-12),
                               F.batch_norm(x @ W.T, None, None, training=True, eps=1e-12),
                               rtol=1e-10, atol=1e-10)
    res = landscape.scale_invariance(x, W, a, eps=1e-12)
    assert res.output_diff < 1e-9
    assert math.isclose(res.grad_ratio, a, rel_tol=1e-9)
    assert math.isclose(res.grad_cosine, 1.0, abs_tol=1e-12)
    assert abs(res.grad_dot_w) < 1e-12   # the gradient is orthogonal to W


def test_scale_invariance_is_broken_only_by_eps():
    # Closed form: BN(a z) = (z - mu) / sqrt(var + eps / a^2).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 5, generator=g, dtype=F64)
    W = 0.01 * torch.randn(3, 5, generator=g, dtype=F64)  # small z: var ~ 1e-4, comparable to eps / a^2
    a, eps = 0.1, 1e-5
    z = x @ W.T
    mu, var = z.mean(0), z.var(0, unbiased=False)
    res = landscape.scale_invariance(x, W, a, eps=eps)
    expected = float(((z - mu) / torch.sqrt(var + eps) - (z - mu) / torch.sqrt(var + eps / a**2)).abs().max())
    assert math.isclose(res.output_diff, expected, rel_tol=1e-6)
    assert res.output_diff > 0.1   # visibly broken
    with pytest.raises(ValueError, match="a must be"):
        landscape.scale_invariance(x, W, 0.0)


def test_weight_norms_effective_lr_and_norm_growth_of_sgd():
    # For weights that feed BN, <g, W> = 0 (exactly when eps -> 0), so a plain
    # SGD step gives ||W - lr g||^2 = ||W||^2 + lr^2 ||g||^2. eps = 1e-12 and
    # float64: 1e-10 relative.
    bn = functools.partial(bnlib.nn.BatchNorm1d, eps=1e-12)
    model = models.make_mlp(6, 5, 3, depth=2, norm_layer=bn, activation="relu", seed=0).double()
    x, y = _data(seed=3)
    lr = 0.5
    norms = landscape.weight_norms(model)
    np.testing.assert_allclose(norms, [float(model.fc1.weight.detach().norm()), float(model.fc2.weight.detach().norm())], rtol=1e-12)
    np.testing.assert_allclose(landscape.effective_lr(model, lr), lr / norms**2, rtol=1e-12)
    rec = landscape.WeightNorms(every=1)
    rec(0, model)
    F.cross_entropy(model(x), y).backward()
    grads = [model.fc1.weight.grad.clone(), model.fc2.weight.grad.clone()]
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    rec(1, model)
    new = landscape.weight_norms(model)
    for k, gk in enumerate(grads):
        assert math.isclose(new[k] ** 2, norms[k] ** 2 + lr**2 * float(gk.norm()) ** 2, rel_tol=1e-10)
    assert np.isnan(rec.angles[0]).all()
    # the recorded angle is the angle between the two weight matrices
    w1 = model.fc1.weight.detach().flatten()
    w0 = w1 + lr * grads[0].flatten()
    angle = math.acos(float(w0 @ w1 / (w0.norm() * w1.norm())))
    assert math.isclose(rec.angles[1][0], angle, rel_tol=1e-6)
    np.testing.assert_allclose(rec.norms[1], new, rtol=1e-12)


def test_probe_during_training_does_not_change_training():
    # The measurements restore every parameter and buffer (the noise counter
    # included), so training with them gives the same model as without.
    from bnlib import data

    x, y = data.gaussian_blobs(64, n_features=6, n_classes=3, seed=0, dtype=F64)
    runs = []
    for with_probe in (False, True):
        model = _mlp("noisy", seed=5, n_mu=1.0, n_sigma=2.0)
        probe = landscape.Probe(
            2,
            ics=lambda m: landscape.ics_gradient_change(m, x[:16], y[:16], lr=0.1),
            land=lambda m: landscape.loss_landscape_along_gradient(m, x[:16], y[:16], [0.1]),
        ) if with_probe else None
        training.train(model, x, y, steps=6, batch_size=16, lr=0.1, seed=0, callback=probe)
        runs.append(_state(model))
    assert _same_state(*runs)
    assert probe.steps == [0, 2, 4, 6] and len(probe.values["ics"]) == 4
    with pytest.raises(ValueError, match="every"):
        landscape.Probe(0, f=len)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lp_batchnorm_keeps_a_half_input_dtype(dtype):
    """As BatchNorm1d: float32 statistics, output in the input's dtype; p = 2 matches BN."""
    x = (torch.randn(32, 3) * 2 + 1).to(dtype)
    lp, bn = landscape.LpBatchNorm1d(3, p=2), bnlib.nn.BatchNorm1d(3)
    for mode in ("train", "eval"):
        getattr(lp, mode)(), getattr(bn, mode)()
        y = lp(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y, bn(x))


# --------------------------------------------------------------------------
# PartialBatchNorm1d: centring only, scaling only, or both (= BN)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 4), (8, 4, 3)], ids=["NC", "NCL"])
def test_partial_bn_parts_against_their_formulas(shape):
    x = 2 + 3 * torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dims = [0] if len(shape) == 2 else [0, 2]
    view = (1, -1) + (1,) * (len(shape) - 2)
    mu = x.mean(dim=dims).view(view)
    var = x.var(dim=dims, unbiased=False).view(view)
    expected = {(True, True): (x - mu) / torch.sqrt(var + 1e-5),
                (True, False): x - mu,
                (False, True): x / torch.sqrt(var + 1e-5)}
    torch_bn = torch.nn.BatchNorm1d(4).double()
    for (center, scale), want in expected.items():
        layer = landscape.PartialBatchNorm1d(4, center=center, scale=scale).double()
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
        # running estimates: batch norm's, whatever the parts
        torch_bn.reset_running_stats()
        torch_bn(x)
        torch.testing.assert_close(layer.running_mean, torch_bn.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, torch_bn.running_var, rtol=1e-12, atol=1e-12)
        assert layer.foldable == (center and scale)


def test_partial_bn_eval_mode_uses_the_running_estimates_for_its_parts():
    x = 2 + 3 * torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for center, scale in ((True, False), (False, True)):
        layer = landscape.PartialBatchNorm1d(4, center=center, scale=scale).double()
        layer(x)
        layer.eval()
        mean, var = layer.running_mean, layer.running_var
        want = x - mean if center else x / torch.sqrt(var + layer.eps)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_partial_bn_refuses_no_parts_and_bad_input():
    with pytest.raises(ValueError, match="at least one True"):
        landscape.PartialBatchNorm1d(4, center=False, scale=False)
    layer = landscape.PartialBatchNorm1d(4, center=False)
    before = layer.running_mean.clone()
    with pytest.raises(ValueError):
        layer(torch.randn(1, 4))
    with pytest.raises(ValueError):
        layer(torch.randn(5, 3))
    assert torch.equal(layer.running_mean, before)


@pytest.mark.parametrize("p", [1, 3, 4, math.inf])
def test_lp_batchnorm_constant_channel_has_a_finite_gradient(p):
    """A constant channel (a dead unit): s_p = 0, and u^(2/p) has an infinite
    slope at 0 for p > 2; the gradient stays finite, as BatchNorm1d's."""
    layer = landscape.LpBatchNorm1d(2, p=p, dtype=torch.float64)
    x = torch.randn(8, 2, dtype=torch.float64)
    x[:, 1] = 0.5
    x.requires_grad_()
    layer(x).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_negative_curvature_mask_checks_spacing_at_any_scale():
    """Uneven grids are refused at a spacing of 1e-9 as at 1."""
    a = np.array([0, 2.0, 2.1, 3.0])
    b = np.array([0, 1.0, 2.0])
    for scale in (1.0, 1e-9):
        A, B = np.meshgrid(a * scale, b * scale)
        with pytest.raises(ValueError, match="evenly spaced"):
            landscape.negative_curvature_mask(A ** 2 + B ** 2, a * scale, b * scale)
