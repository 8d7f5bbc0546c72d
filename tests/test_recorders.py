"""bnlib.recorders: hooks, saturation, gradient norms and distribution drift.

Truths: the forward pass written out by hand with retained gradients (torch
autograd), hand-counted saturation, the normal CDF for a large sample, NumPy
statistics, the closed form of W2 between normals and the quantile coupling
of two large samples.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnlib import models, recorders, training


def _manual_forward(m, x):
    """fc -> norm -> tanh by hand (train-mode BN), keeping every intermediate."""
    zs, us, as_ = [], [], []
    h = x
    for l in (1, 2):
        fc, bn = getattr(m, f"fc{l}"), getattr(m, f"norm{l}")
        z = F.linear(h, fc.weight, fc.bias)
        u = F.batch_norm(z, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        u.retain_grad()
        h = torch.tanh(u)
        zs.append(z), us.append(u), as_.append(h)
    return F.linear(h, m.out.weight, m.out.bias), zs, us, as_


def test_record_matches_a_hand_written_forward_and_backward():
    # float64, same ops in the same order: 1e-12 is rounding only.
    torch.manual_seed(0)
    m = models.make_mlp(4, 3, 2, depth=2, norm_layer=torch.nn.BatchNorm1d, weight_scale=2.0).double()
    with torch.no_grad():
        for bn in models.get_layers(m, "norm"):
            bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    with recorders.record(m, grads=True) as rec:
        F.cross_entropy(m(x), y).backward()
    out, zs, us, as_ = _manual_forward(m, x)
    F.cross_entropy(out, y).backward()
    assert rec.names == ["act1", "act2"]
    for l in range(2):
        torch.testing.assert_close(rec.z[l], zs[l].detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rec.act_in[l], us[l].detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rec.a[l], as_[l].detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rec.grad_act_in[l], us[l].grad, rtol=1e-10, atol=1e-14)
    # the hooks are gone afterwards
    assert all(len(mod._forward_hooks) == 0 for mod in m.modules())


def test_record_without_norm_z_is_act_in():
    m = models.make_mlp(3, 4, 2, depth=2, seed=0)
    with recorders.record(m) as rec:
        m(torch.randn(5, 3))
    assert all(torch.equal(z, u) for z, u in zip(rec.z, rec.act_in))
    assert rec.grad_act_in == [None, None]


def test_probe_has_no_side_effects():
    m = models.make_mlp(3, 4, 2, depth=2, norm="bn", seed=0)
    x = torch.randn(8, 3) * 3 + 1
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rec = recorders.probe(m, x, train=True)
    assert not m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    # train mode: BN used the probe's own statistics, so with gamma=1, beta=0
    # every unit of act_in has mean 0 and (biased) variance var / (var + eps) ~ 1
    mu, std = recorders.unit_stats(rec.act_in[0])
    assert float(mu.abs().max()) < 1e-5 and float((std - 1).abs().max()) < 1e-3
    # eval mode: running stats (mean 0, var 1 at init): act_in = z / sqrt(1 + eps)
    rec_eval = recorders.probe(m, x, train=False)
    torch.testing.assert_close(rec_eval.act_in[0], rec_eval.z[0] / math.sqrt(1 + 1e-5))


def test_saturation_fraction_hand_count():
    # atanh(0.99) = 2.6467: four of the six entries lie beyond it
    u = torch.tensor([0.0, 1.0, 2.65, 3.0, -3.0, 10.0])
    assert recorders.saturation_fraction(u, "tanh") == pytest.approx(4 / 6, abs=1e-15)
    # 2 sigmoid(u) - 1 = tanh(u / 2): sigmoid at 2u is the same as tanh at u
    assert recorders.saturation_fraction(2 * u, "sigmoid") == recorders.saturation_fraction(u, "tanh")
    assert recorders.saturation_fraction(torch.tensor([-6.0]), "sigmoid") == 1.0
    assert recorders.saturation_fraction(torch.tensor([-6.0]), "sigmoid", threshold=0.999) == 0.0


def test_saturation_fraction_normal_sample():
    # u ~ N(0, s^2): P(|tanh u| > t) = 2 (1 - Phi(atanh(t) / s)). 10^6 draws:
    # binomial std error < 5e-4; 3e-3 is a wide margin.
    s, t = 3.0, 0.99
    u = s * torch.randn(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = math.erfc(math.atanh(t) / s / math.sqrt(2))
    assert abs(recorders.saturation_fraction(u, "tanh", t) - expected) < 3e-3


@pytest.mark.parametrize("kwargs, match", [(dict(activation="relu"), "tanh"), (dict(threshold=1.0), "threshold")])
def test_saturation_fraction_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        recorders.saturation_fraction(torch.zeros(3), **kwargs)


def test_weight_grad_norms_and_init_grad_norms():
    m = models.make_mlp(4, 5, 3, depth=3, norm="bn", seed=1)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    buffers = [b.clone() for b in m.buffers()]
    norms = recorders.init_grad_norms(m, x, y)
    assert all(torch.equal(a, b) for a, b in zip(buffers, m.buffers()))
    # independent: autograd.grad on a fresh copy of the loss
    weights = [m.fc1.weight, m.fc2.weight, m.fc3.weight, m.out.weight]
    grads = torch.autograd.grad(F.cross_entropy(m(x), y), weights)
    np.testing.assert_allclose(norms, [float(g.norm()) for g in grads], rtol=1e-5)
    assert norms.shape == (4,)


def test_unit_stats_against_numpy():
    x = torch.randn(6, 3, 5, dtype=torch.float64) * 2 + 1
    mu, std = recorders.unit_stats(x)
    xn = x.numpy().transpose(1, 0, 2).reshape(3, -1)
    np.testing.assert_allclose(mu.numpy(), xn.mean(1), rtol=1e-13)
    np.testing.assert_allclose(std.numpy(), xn.std(1), rtol=1e-13)
    with pytest.raises(ValueError, match="at least 2 dims"):
        recorders.unit_stats(torch.zeros(4))


def test_gaussian_w2_closed_form_and_quantile_coupling():
    z = torch.tensor(0.0, dtype=torch.float64)
    assert float(recorders.gaussian_w2(z, z + 1, z + 3, z + 5)) == 5.0  # sqrt(3^2 + 4^2)
    # Two large normal samples: W2^2 = mean (sorted a - sorted b)^2 (quantile
    # coupling is optimal in 1-D). 2*10^5 draws: sampling error ~1e-2 here.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, generator=g, dtype=torch.float64) * 1.0 + 0.0
    b = torch.randn(200_000, generator=g, dtype=torch.float64) * 2.0 + 1.5
    empirical = float(((a.sort().values - b.sort().values) ** 2).mean().sqrt())
    closed = float(recorders.gaussian_w2(z, z + 1, z + 1.5, z + 2))
    assert abs(empirical - closed) < 2e-2


def test_drift():
    x = torch.randn(50, 4, dtype=torch.float64)
    assert recorders.drift(x, x) == 0.0
    assert recorders.drift(x, x + 0.3) == pytest.approx(0.3, abs=1e-12)
    # scaling by 3 leaves the means' shift (2 mu) and the stds' change (2 std): sqrt per unit
    mu, std = recorders.unit_stats(x)
    expected = float(torch.sqrt((2 * mu) ** 2 + (2 * std) ** 2).mean())
    assert recorders.drift(x, 3 * x) == pytest.approx(expected, rel=1e-12)
    assert recorders.drift(x, x + 0.3, relative=True) == pytest.approx(0.3 / float(std.mean()), rel=1e-12)
    with pytest.raises(ValueError, match="same C"):
        recorders.drift(x, x[:, :3])


def test_snapshots_as_training_callback():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    m = models.make_mlp(3, 4, 2, depth=2, norm="bn", seed=0)
    snap = recorders.Snapshots(x, every=2)
    training.train(m, x, y, steps=5, batch_size=8, lr=0.1, callback=snap)
    assert snap.steps == [0, 2, 4]
    d = snap.drift("a")
    assert d.shape == (2, 2) and np.all(d > 0)
    first = snap.drift("a", reference="first")
    np.testing.assert_allclose(first[0], d[0])
    with pytest.raises(ValueError, match="what"):
        snap.drift("b")
    with pytest.raises(ValueError, match="every"):
        recorders.Snapshots(x, every=0)


def test_init_grad_norms_wrt_act_in_against_retained_grads():
    # ||dL/du_l|| from the hook vs .grad of the hand-written forward (float64).
    torch.manual_seed(2)
    m = models.make_mlp(4, 3, 2, depth=2, norm_layer=torch.nn.BatchNorm1d, weight_scale=1.5).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 2, (9,))
    norms = recorders.init_grad_norms(m, x, y, wrt="act_in")
    out, _, us, _ = _manual_forward(m, x)
    F.cross_entropy(out, y).backward()
    np.testing.assert_allclose(norms, [float(u.grad.norm()) for u in us], rtol=1e-10)
    with pytest.raises(ValueError, match="wrt"):
        recorders.init_grad_norms(m, x, y, wrt="bias")


def test_record_an_inplace_activation():
    """ReLU(inplace=True) overwrites its input: act_in and its gradient are
    taken before the activation runs, so they equal those of ReLU()."""
    torch.manual_seed(0)
    x = torch.randn(8, 3)
    recordings = []
    for inplace in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(inplace=inplace),
                                    torch.nn.Linear(4, 2))
        with recorders.record(model, grads=True) as rec:
            model(x).sum().backward()
        recordings.append(rec)
    plain, inplace = recordings
    assert plain.act_in[0].min() < 0  # (some inputs negative: the overwrite would show)
    for what in ("z", "act_in", "a", "grad_act_in"):
        torch.testing.assert_close(getattr(inplace, what)[0], getattr(plain, what)[0], rtol=0, atol=0)
