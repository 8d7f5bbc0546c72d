"""bnlib.moving_average against closed forms and torch.nn.BatchNorm's own running statistics.

Truths: the unrolled EMA (a geometric sum), the cumulative mean
(``np.cumsum / t``), torch.nn.BatchNorm1d's ``running_mean`` / ``running_var``
after the same batches, and ``torch.optim.swa_utils.update_bn`` (torch's own
recomputation of BN statistics with ``momentum=None``).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import bnlib.nn
from bnlib import moving_average as ma
from bnlib.models import modes_kept

# Closed forms vs a float64 loop of at most a few hundred steps: rounding
# errors of ~T ulps, so 1e-12 is wide and still catches any wrong factor.
F64 = dict(rtol=1e-12, atol=1e-12)
# torch's float32 buffers vs our float64 recursion: float32 rounding (~1e-7
# relative per step, a few hundred steps at most, values of order 1-10).
F32 = dict(rtol=1e-5, atol=1e-5)


# --- conventions -------------------------------------------------------------

@pytest.mark.parametrize(
    "value, source, target, expected",
    [
        (0.1, "torch", "lecture", 0.9),
        (0.1, "torch", "keras", 0.9),
        (0.99, "keras", "torch", 0.01),
        (0.9, "lecture", "torch", 0.1),
        (0.99, "keras", "lecture", 0.99),   # the lecture's p and Keras' momentum are the same number
        (0.3, "pytorch", "tf", 0.7),        # aliases
        (None, "torch", "torch", None),
    ],
)
def test_convert_momentum(value, source, target, expected):
    got = ma.convert_momentum(value, source, target)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("conv", ["torch", "lecture", "keras"])
def test_round_trip(conv):
    for v in [0.0, 0.01, 0.1, 0.5, 0.99, 1.0]:
        assert ma.from_torch_momentum(ma.to_torch_momentum(v, conv), conv) == pytest.approx(v, abs=1e-15)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ma.to_torch_momentum(0.1, "caffe"), "convention must be one of"),
        (lambda: ma.to_torch_momentum(1.5, "torch"), r"in \[0, 1\], got 1.5"),
        (lambda: ma.to_torch_momentum(-0.1, "keras"), r"in \[0, 1\]"),
        (lambda: ma.to_torch_momentum(True, "torch"), r"in \[0, 1\]"),
        (lambda: ma.to_torch_momentum(None, "keras"), "only in the 'torch' convention"),
        (lambda: ma.from_torch_momentum(None, "lecture"), "no 'lecture' equivalent"),
        (lambda: ma.effective_window(None), "not momentum=None"),
        (lambda: ma.equivalent_batches(None), "not momentum=None"),
        (lambda: ma.equivalent_batches(1.2), r"in \[0, 1\]"),
        (lambda: ma.steps_to_forget(0.1, tol=0), r"tol must be a number in \(0, 1\)"),
        (lambda: ma.ema_weights(-1, 0.1), "t must be an integer >= 0"),
        (lambda: ma.ema_trace([], 0.1), r"shape \(T,\) or \(T, C\)"),
        (lambda: ma.ema_trace(np.zeros((2, 2, 2)), 0.1), r"shape \(T,\) or \(T, C\)"),
        (lambda: ma.debias([1.0], 0.0), "nothing to debias"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_window_and_forgetting_closed_forms():
    assert ma.effective_window(0.1) == pytest.approx(10.0)
    assert ma.effective_window(0.99, "keras") == pytest.approx(100.0)
    assert ma.effective_window(0.0) == math.inf
    # smallest t with (1 - a)^t < tol, checked by brute force
    for a in [0.5, 0.1, 0.01, 0.003]:
        for tol in [0.5, 0.01, 1e-4]:
            t = ma.steps_to_forget(a, tol)
            assert (1 - a) ** t < tol <= (1 - a) ** (t - 1)
    assert ma.steps_to_forget(0.1) == 44   # ln(0.01) / ln(0.9) = 43.7
    # exact boundaries, where the quotient of logarithms rounds below the integer
    assert ma.steps_to_forget(0.1, tol=0.9) == 2   # 0.9^1 is not < 0.9
    assert ma.steps_to_forget(0.5, tol=0.25) == 3  # 0.5^2 is not < 0.25
    assert ma.steps_to_forget(1.0) == 1
    assert ma.steps_to_forget(0.0) == math.inf


# --- the EMA itself ----------------------------------------------------------

def test_constant_input_closed_form():
    # From init 0, a constant c gives c * (1 - (1 - a)^t).
    a, c, T = 0.1, 3.0, 60
    t = np.arange(1, T + 1)
    np.testing.assert_allclose(ma.ema_trace(np.full(T, c), a), c * (1 - (1 - a) ** t), **F64)
    # ... and from init 1 (the variance's start): c + (1 - c)(1 - a)^t
    np.testing.assert_allclose(ma.ema_trace(np.full(T, c), a, init=1.0), c + (1 - c) * (1 - a) ** t, **F64)


@pytest.mark.parametrize("momentum", [0.5, 0.1, 0.013, None])
def test_trace_equals_unrolled_weights(momentum):
    rng = np.random.default_rng(1)
    v = rng.normal(size=(40, 3))
    init = np.array([0.0, 1.0, -2.0])
    trace = ma.ema_trace(v, momentum, init=init)
    for t in [1, 2, 17, 40]:
        w = ma.ema_weights(t, momentum)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        expected = w[0] * init + w[1:] @ v[:t]
        np.testing.assert_allclose(trace[t - 1], expected, **F64)


def test_cumulative_average():
    v = np.random.default_rng(2).normal(size=50)
    np.testing.assert_allclose(ma.ema_trace(v, None, init=123.0), np.cumsum(v) / np.arange(1, 51), **F64)


def test_conventions_give_the_same_trace():
    v = np.random.default_rng(3).normal(size=30)
    ref = ma.ema_trace(v, 0.1, "torch")
    np.testing.assert_allclose(ma.ema_trace(v, 0.9, "lecture"), ref, **F64)
    np.testing.assert_allclose(ma.ema_trace(v, 0.9, "keras"), ref, **F64)


def test_debias_removes_the_start_value():
    # A constant stream is recovered exactly at every step, whatever the start.
    a, c = 0.01, -2.5
    for init in [0.0, 1.0]:
        trace = ma.ema_trace(np.full(25, c), a, init=init)
        np.testing.assert_allclose(ma.debias(trace, a, init=init), np.full(25, c), **F64)
    # For any stream: the debiased value is the batch weights renormalized.
    v = np.random.default_rng(4).normal(size=(20, 2))
    tr = ma.debias(ma.ema_trace(v, 0.2, init=1.0), 0.2, init=1.0)
    w = ma.ema_weights(20, 0.2)[1:]
    np.testing.assert_allclose(tr[-1], (w / w.sum()) @ v, **F64)


def test_effective_window_is_mean_age_plus_one():
    # weights a (1-a)^j for age j: mean age (1-a)/a, so 1 + mean age = 1/a
    a = 0.05
    w = ma.ema_weights(5000, a)[1:][::-1]  # index = age
    mean_age = (w * np.arange(w.size)).sum() / w.sum()
    assert 1 + mean_age == pytest.approx(ma.effective_window(a), rel=1e-9)


# --- against torch's own BatchNorm ------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("cls", [nn.BatchNorm1d, bnlib.nn.BatchNorm1d])
def test_trace_matches_batchnorm_running_stats(momentum, cls):
    g = torch.Generator().manual_seed(0)
    m, C, T = 8, 3, 30
    bn = cls(C, momentum=momentum)
    means, uvars, rm, rv = [], [], [], []
    for t in range(T):
        x = 2.0 + t * 0.05 + torch.randn(m, C, generator=g) * 1.5
        bn(x)
        xd = x.double()
        means.append(xd.mean(0).numpy())
        uvars.append(xd.var(0, unbiased=True).numpy())   # m / (m - 1) times the biased one
        rm.append(bn.running_mean.double().numpy().copy())
        rv.append(bn.running_var.double().numpy().copy())
    np.testing.assert_allclose(ma.ema_trace(means, momentum, init=0.0), rm, **F32)
    np.testing.assert_allclose(ma.ema_trace(uvars, momentum, init=1.0), rv, **F32)


# --- precise BN --------------------------------------------------------------

def _mlp(bn_cls, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 7), bn_cls(7), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(7, 4), bn_cls(4), nn.Tanh(), nn.Linear(4, 2),
    )


def _batches(n=6, m=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(3.0 + 2.0 * torch.randn(m, 5, generator=g), torch.zeros(m)) for _ in range(n)]


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, bnlib.nn.BatchNorm1d])
def test_precise_bn_equals_torch_update_bn(cls):
    from torch.optim.swa_utils import update_bn

    # update_bn only knows torch's BN classes: the truth is always a torch twin
    # (bnlib's modules are drop-ins, so the state dict loads across).
    ours, theirs = _mlp(cls), _mlp(nn.BatchNorm1d)
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):           # some stale EMA state to overwrite
        model.train()
        model(torch.randn(8, 5) * 10)
        model.eval()
    batches = _batches()
    ma.precise_bn(ours, batches)
    update_bn([b[0] for b in batches], theirs)
    for a, b in zip(ma.running_stat_layers(ours), ma.running_stat_layers(theirs)):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-6, atol=1e-6)
        assert int(a.num_batches_tracked) == len(batches)
        assert a.momentum == 0.1             # restored
    assert not ours.training and not any(m.training for m in ours.modules())


def test_precise_bn_first_layer_closed_form():
    # Layer 1 sees x W^T + b: its running stats are the mean over batches of the
    # batch means and of the unbiased batch variances (float64 throughout).
    model = _mlp(bnlib.nn.BatchNorm1d).double()
    batches = [b.double() for b, _ in _batches(n=5, m=10)]
    ma.precise_bn(model, batches)
    with torch.no_grad():
        z = [model[0](b) for b in batches]
    mean = torch.stack([zi.mean(0) for zi in z]).mean(0)
    var = torch.stack([zi.var(0, unbiased=True) for zi in z]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, var, rtol=1e-12, atol=1e-12)


def test_precise_bn_pooled_first_layer_closed_form():
    # estimator="pooled": the mean and unbiased variance of all values that
    # reached the layer, as one batch (batches of unequal size weigh by size)
    model = _mlp(bnlib.nn.BatchNorm1d).double()
    batches = [b.double() for b, _ in _batches(n=5, m=10)] + [3 + torch.randn(3, 5, dtype=torch.float64)]
    ma.precise_bn(model, batches, estimator="pooled")
    with torch.no_grad():
        z = torch.cat([model[0](b) for b in batches])
    torch.testing.assert_close(model[1].running_mean, z.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, z.var(0, unbiased=True), rtol=1e-12, atol=1e-12)
    assert int(model[1].num_batches_tracked) == 6
    assert not model[1]._forward_pre_hooks               # the recorders are gone


def test_precise_bn_pooled_is_less_biased_after_a_bn_layer_with_small_batches():
    # Behind a BN layer that normalizes each batch by its own statistics, the
    # average of m/(m-1) times the batch variances overshoots the eval-mode
    # variance, here by 17% for m = 8 (1/(m-1) = 14%); pooling the batches
    # does not (chapter 5).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), bnlib.nn.BatchNorm1d(32), nn.Linear(32, 16),
                          bnlib.nn.BatchNorm1d(16)).eval()
    x = 1 + 2 * torch.randn(1344, 10)
    batches = list(torch.split(x, 8))
    gaps = {}
    for estimator in ("batch_average", "pooled"):
        fixed = ma.precise_bn(copy.deepcopy(model), batches, estimator=estimator)
        gaps[estimator] = ma.running_stat_gaps(fixed, x)[1][1].median().item()
    assert 0.1 < gaps["batch_average"] < 0.25, gaps
    assert abs(gaps["pooled"]) < 0.01, gaps


def test_precise_bn_pooled_refuses_a_layer_called_around_its_hooks():
    # bn.forward(x) skips the pre-hook that reads the inputs: the layer would
    # keep the batch average under the name of the pooled estimate
    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bnlib.nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn.forward(x)

    model = Direct()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="could not read the inputs of bn"):
        ma.precise_bn(model, [torch.randn(5, 3), 3 + torch.randn(9, 3)], estimator="pooled")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.bn._forward_pre_hooks and model.bn.momentum == 0.1


def test_precise_bn_pooled_refuses_bad_estimators_and_restores_on_error():
    model = _mlp(nn.BatchNorm1d)
    model.train()
    model(torch.randn(8, 5))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="estimator='batch_average' or 'pooled', got 'mean'"):
        ma.precise_bn(model, _batches(), estimator="mean")
    with pytest.raises(RuntimeError):            # wrong width: torch's Linear fails midway
        ma.precise_bn(model, [torch.randn(4, 5), torch.randn(4, 9)], estimator="pooled")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(not bn._forward_pre_hooks for bn in ma.running_stat_layers(model))
    assert model[1].momentum == 0.1 and not model.training


def test_precise_bn_restores_modes_and_switches_dropout_off():
    model = _mlp(nn.BatchNorm1d, dropout=0.9)
    model.train()
    model[3].eval()                              # a mixed state to restore exactly
    modes = [m.training for m in model.modules()]
    no_dropout = _mlp(nn.BatchNorm1d, dropout=0.0)
    no_dropout.load_state_dict(model.state_dict())
    ma.precise_bn(model, _batches())
    ma.precise_bn(no_dropout, _batches())
    assert [m.training for m in model.modules()] == modes
    # Dropout was in eval mode during the pass: layer 2 saw the same inputs as without dropout.
    torch.testing.assert_close(model[5].running_mean, no_dropout[5].running_mean)
    assert all(p.grad is None for p in model.parameters())


def test_precise_bn_max_batches_and_generators():
    model = _mlp(nn.BatchNorm1d)
    batches = _batches(n=6)
    ma.precise_bn(model, (b for b in batches), max_batches=2)
    ref = _mlp(nn.BatchNorm1d)
    ma.precise_bn(ref, batches[:2])
    assert int(model[1].num_batches_tracked) == 2
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)


def test_precise_bn_bad_input_changes_nothing():
    model = _mlp(nn.BatchNorm1d)
    model.train()
    model(torch.randn(8, 5))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="at least one batch"):
        ma.precise_bn(model, [])
    with pytest.raises(ValueError, match="max_batches"):
        ma.precise_bn(model, _batches(), max_batches=0)
    with pytest.raises(RuntimeError):            # wrong width: torch's Linear fails midway
        ma.precise_bn(model, [torch.randn(4, 5), torch.randn(4, 9)])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert model[1].momentum == 0.1 and not model.training
    with pytest.raises(ValueError, match="at least one BN layer"):
        ma.precise_bn(nn.Sequential(nn.Linear(2, 2)), [torch.randn(3, 2)])
    with pytest.raises(ValueError, match="at least one BN layer"):
        ma.precise_bn(nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)), [torch.randn(3, 2)])


def test_conversion_table_text():
    text = ma.conversion_table((0.1, 0.01))
    lines = text.splitlines()
    assert len(lines) == 4  # two header lines
    assert lines[2].split() == ["0.1", "0.9", "0.9", "10", "44"]
    assert lines[3].split() == ["0.01", "0.99", "0.99", "100", "459"]
    assert max(map(len, ma.conversion_table().splitlines())) <= 72


def test_precise_bn_takes_no_batch_beyond_max_batches():
    model = nn.Sequential(nn.Linear(3, 4), bnlib.nn.BatchNorm1d(4))
    batches = iter([torch.randn(8, 3) for _ in range(5)])
    ma.precise_bn(model, batches, max_batches=2)
    assert len(list(batches)) == 3


# --- equivalent batches, population statistics, gaps -------------------------

@pytest.mark.parametrize("a", [0.5, 0.1, 0.01])
def test_equivalent_batches_is_kish_effective_size_and_mean_age(a):
    # 1 / sum of squared weights of a long EMA (start value forgotten)
    w = ma.ema_weights(20_000, a)[1:][::-1]            # index = age
    k = ma.equivalent_batches(a)
    assert k == pytest.approx(1 / (w ** 2).sum(), rel=1e-9)
    # a plain average of k batches has the EMA's mean age, (k - 1) / 2
    assert (k - 1) / 2 == pytest.approx((w * np.arange(w.size)).sum(), rel=1e-9)


def test_equivalent_batches_values():
    assert ma.equivalent_batches(0.1) == pytest.approx(19.0)
    assert ma.equivalent_batches(0.99, "keras") == pytest.approx(199.0)
    assert ma.equivalent_batches(0.0) == math.inf


def test_ema_sampling_std_matches_a_simulation_of_epochs():
    """Epochs of disjoint batches of a fixed population (a shuffle per epoch, the
    leftover values unused, as training.minibatches deals them): the EMA's spread
    at each position of the epoch, across many epochs, is the formula's."""
    rng = np.random.default_rng(0)
    population, batch, per_epoch, a = 40, 4, 8, 0.3
    values = rng.standard_normal(population)
    values = (values - values.mean()) / values.std()     # mean 0, sigma 1 (over N)
    epochs = 20_000
    order = np.argsort(rng.random((epochs, population)), axis=1)[:, :batch * per_epoch]
    means = values[order].reshape(epochs * per_epoch, batch).mean(axis=1)
    ema = ma.ema_trace(means, a).reshape(epochs, per_epoch)[100:]   # after the start
    predicted = ma.ema_sampling_std(a, batch, population, per_epoch)
    assert ema.std(axis=0) == pytest.approx(predicted, rel=0.04)
    # the last batch of an epoch has most of its epoch behind it: least noise
    assert predicted.argmin() == per_epoch - 1


def test_ema_sampling_std_special_cases():
    n, b = 1347, 32
    one_batch = math.sqrt((n - b) / (b * (n - 1)))
    # momentum 1: the newest batch alone
    assert ma.ema_sampling_std(1.0, b, n, 42) == pytest.approx(np.full(42, one_batch))
    # one batch per epoch: independent batches, the variance of equivalent_batches
    assert ma.ema_sampling_std(0.1, b, n, 1) == pytest.approx([one_batch / math.sqrt(19)])
    # the book's case: between 19 batches of one epoch and 19 independent ones
    spread = ma.ema_sampling_std(0.1, b, n, 42)
    assert math.sqrt((1 - 19 * b / n) / (19 * b)) < spread.mean() < math.sqrt(1 / (19 * b))


@pytest.mark.parametrize("args, message", [
    ((0.1, 0, 100, 2), "batch_size must be a positive integer"),
    ((0.1, 4, 100, 2.0), "batches_per_epoch must be a positive integer"),
    ((0.1, 4, True, 2), "population must be a positive integer"),
    ((0.1, 10, 100, 11), "needs at least 110 values"),
    ((0.0, 4, 100, 2), "momentum 0"),
    ((None, 4, 100, 2), "not momentum=None"),
])
def test_ema_sampling_std_refuses(args, message):
    with pytest.raises(ValueError, match=message):
        ma.ema_sampling_std(*args)


def test_epoch_batch_stats_are_the_batches_of_minibatches():
    """Each epoch's batches are those training.minibatches deals with the same
    generator (a new permutation per epoch, the leftover rows unused); their
    means and unbiased variances against torch's, batch by batch, in float64."""
    from bnlib.training import minibatches

    z = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    means, variances = ma.epoch_batch_stats(z, 8, 3, torch.Generator().manual_seed(7))
    assert means.shape == variances.shape == (3, 6, 3)
    # the first batches only: the same permutations, the same values
    first, first_var = ma.epoch_batch_stats(z, 8, 3, torch.Generator().manual_seed(7), batches=2)
    np.testing.assert_array_equal(first, means[:, :2])
    np.testing.assert_array_equal(first_var, variances[:, :2])
    g = torch.Generator().manual_seed(7)
    for e in range(3):
        for t, idx in enumerate(minibatches(50, 8, g)):
            np.testing.assert_allclose(means[e, t], z[idx].mean(0).numpy(), **F64)
            np.testing.assert_allclose(variances[e, t], z[idx].var(0).numpy(), **F64)


def test_epoch_batch_stats_give_precise_bn_of_a_first_layer():
    """What the chapter relies on: for a BN layer right after a fixed linear map
    of the inputs, precise BN over the first k batches of an epoch is the
    average of those batches' means and unbiased variances (float64 model, so
    only summation order differs)."""
    from bnlib.training import minibatches

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70, 5, dtype=torch.float64, generator=gen)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), bnlib.nn.BatchNorm1d(4)).double()
    with torch.no_grad():
        z = model[0](x)
    means, variances = ma.epoch_batch_stats(z, 16, 1, torch.Generator().manual_seed(3))
    batches = [x[idx] for idx in minibatches(70, 16, torch.Generator().manual_seed(3))][:3]
    ma.precise_bn(model, batches)
    np.testing.assert_allclose(model[1].running_mean.numpy(), means[0, :3].mean(0), **F64)
    np.testing.assert_allclose(model[1].running_var.numpy(), variances[0, :3].mean(0), **F64)


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(10, 2), 1, 2), "batch_size must be at least 2"),
    ((torch.zeros(10, 2), 4, 0), "epochs must be a positive integer"),
    ((torch.zeros(10, 2), 4.0, 1), "batch_size must be a positive integer"),
    ((torch.zeros(10), 4, 1), r"shape \(N, C\)"),
    ((torch.zeros(3, 2), 4, 1), "at least one batch of 4 rows"),
])
def test_epoch_batch_stats_refuses(args, message):
    with pytest.raises(ValueError, match=message):
        ma.epoch_batch_stats(*args, torch.Generator())


@pytest.mark.parametrize("batches", [0, 3, 1.0, True])
def test_epoch_batch_stats_refuses_batches(batches):
    with pytest.raises(ValueError, match="batches must be an integer from 1 to"):
        ma.epoch_batch_stats(torch.zeros(10, 2), 4, 1, torch.Generator(), batches=batches)


def test_equivalent_batches_matches_simulated_noise():
    # EMA of i.i.d. standard normal batch values: steady-state variance 1 / K
    rng = np.random.default_rng(0)
    a = 0.1
    trace = ma.ema_trace(rng.standard_normal((4000, 200)), a)[1000:]
    assert 1 / trace.var() == pytest.approx(ma.equivalent_batches(a), rel=0.05)


def _conv_net(norm):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), norm(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4),
                         bnlib.nn.BatchNorm1d(4))


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, bnlib.nn.BatchNorm2d])
def test_population_statistics_are_the_eval_mode_inputs_statistics(norm):
    model = _conv_net(norm).double()
    model.train()
    model(torch.randn(16, 2, 6, 6, dtype=torch.float64) * 3 + 1)   # some running statistics
    model[0].eval()                                   # a mixed mode to keep
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(40, 2, 6, 6, dtype=torch.float64) * 2 + 5
    stats = ma.population_statistics(model, x)
    # the truth: each BN layer's input in the eval-mode model, in one pass
    with modes_kept(model), torch.no_grad():
        model.eval()
        z1 = model[0](x).transpose(0, 1).reshape(3, -1)       # (C, N*H*W)
        z2 = model[4](model[3](model[2](model[1](model[0](x)))))
    for (mean, var), (want_mean, want_var) in zip(stats, [(z1.mean(1), z1.var(1)), (z2.mean(0), z2.var(0))]):
        assert mean.dtype == torch.float64
        torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, want_var, rtol=1e-12, atol=1e-12)
    # batch by batch (tensors and (x, y) tuples) gives the same numbers
    parts = [x[:7], (x[7:20], None), x[20:]]
    for (m1, v1), (m2, v2) in zip(stats, ma.population_statistics(model, parts)):
        torch.testing.assert_close(m1, m2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v1, v2, rtol=1e-12, atol=1e-12)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_population_statistics_survive_a_large_mean_in_float32():
    # E[x^2] - E[x]^2 in float32 would lose the variance; the float32 sums of
    # x - shift (merged in float64) keep the mean to far better than float32's
    # 6e-8 (relative), and the variance
    bn = bnlib.nn.BatchNorm1d(2)
    x = 1e4 + torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    (mean, var), = ma.population_statistics(bn, list(x.split(100)))
    truth = x.double()
    torch.testing.assert_close(mean, truth.mean(0), rtol=1e-10, atol=0)
    torch.testing.assert_close(var, truth.var(0), rtol=1e-5, atol=0)


def test_population_statistics_make_no_float64_copy_of_the_inputs():
    """Each batch is summarized in its own precision (a float64 copy would
    double the memory on a GPU, and MPS has no float64): float64 appears
    only in (C,) vectors; half inputs are summarized in float32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Float64Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    self.sizes.append(t.numel())
            return out

    for dtype in (torch.float32, torch.bfloat16):
        bn = bnlib.nn.BatchNorm1d(3).to(dtype)
        x = (5 + torch.randn(64, 3, generator=torch.Generator().manual_seed(0))).to(dtype)
        with Float64Sizes() as seen:
            (mean, var), = ma.population_statistics(bn, list(x.split(16)))
        assert max(seen.sizes, default=0) <= 3, (dtype, seen.sizes)
        truth = x.double()
        # float32 sums of x - shift: digits beyond float32's 6e-8 survive
        torch.testing.assert_close(mean, truth.mean(0), rtol=1e-8, atol=0)
        torch.testing.assert_close(var, truth.var(0), rtol=1e-5, atol=0)


def test_running_stat_gaps_after_precise_bn_on_the_same_data():
    # Layer 1 after precise BN over one epoch of equal batches: its running mean
    # is the exact mean (gap 0); its variance the mean of the batch variances.
    model = _mlp(bnlib.nn.BatchNorm1d).double()
    batches = [b.double() for b, _ in _batches(n=5, m=10)]
    ma.precise_bn(model, batches)
    (mean_gap, var_gap), _ = ma.running_stat_gaps(model, batches)
    assert mean_gap.max() < 1e-12
    with torch.no_grad():
        z = [model[0](b) for b in batches]
    mean_of_batch_vars = torch.stack([zi.var(0) for zi in z]).mean(0)
    want = mean_of_batch_vars / torch.cat(z).var(0) - 1
    torch.testing.assert_close(var_gap, want, rtol=1e-12, atol=1e-12)
    # a shifted running mean: gap = shift / sigma
    with torch.no_grad():
        model[1].running_mean += 2 * torch.cat(z).std(0)
    (mean_gap, _), _ = ma.running_stat_gaps(model, torch.cat(batches))
    torch.testing.assert_close(mean_gap, torch.full_like(mean_gap, 2.0), rtol=1e-9, atol=1e-9)
    # shifted the other way: the gap is a distance, +2 again
    with torch.no_grad():
        model[1].running_mean -= 4 * torch.cat(z).std(0)
    (mean_gap, _), _ = ma.running_stat_gaps(model, torch.cat(batches))
    torch.testing.assert_close(mean_gap, torch.full_like(mean_gap, 2.0), rtol=1e-9, atol=1e-9)


def test_population_statistics_bad_input_changes_nothing():
    model = _mlp(nn.BatchNorm1d)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="at least one BN layer"):
        ma.population_statistics(nn.Sequential(nn.Linear(2, 2)), torch.randn(3, 2))
    with pytest.raises(ValueError, match="at least one batch"):
        ma.population_statistics(model, [])
    with pytest.raises(ValueError, match="an input tensor or an iterable"):
        ma.running_stat_gaps(model, 3.0)
    with pytest.raises(ValueError, match="at least 2 values"):
        ma.population_statistics(model, torch.randn(1, 5))
    with pytest.raises(RuntimeError):                 # wrong width: Linear fails midway
        ma.population_statistics(model, [torch.randn(4, 5), torch.randn(4, 9)])
    assert model.training and all(m.training for m in model.modules())
    assert not any(bn._forward_pre_hooks for bn in ma.running_stat_layers(model))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("lazy", [nn.LazyBatchNorm1d, bnlib.nn.LazyBatchNorm1d])
def test_population_statistics_refuse_an_uninitialized_lazy_layer(lazy):
    """Its first call would turn it into a BatchNorm1d with fresh estimates:
    refused, as precise_bn refuses it, and the layer stays lazy."""
    model = nn.Sequential(nn.Linear(3, 4), lazy())
    for fn in (ma.population_statistics, ma.running_stat_gaps):
        with pytest.raises(ValueError, match="has not seen an input yet"):
            fn(model, torch.randn(8, 3))
    assert type(model[1]) is lazy


def test_population_statistics_other_layouts_shared_layers_and_keywords():
    # (N, C, L) and channels_last (N, C, D, H, W) inputs; a layer called twice
    # pools both calls; a layer called with input=... is seen too
    bn1, bn3 = bnlib.nn.BatchNorm1d(3).double(), nn.BatchNorm3d(2).double()
    x1 = torch.randn(6, 3, 5, dtype=torch.float64) * 2 + 1
    x3 = (torch.randn(4, 2, 3, 3, 3, dtype=torch.float64) + 3).to(memory_format=torch.channels_last_3d)
    for bn, x in [(bn1, x1), (bn3, x3)]:
        (mean, var), = ma.population_statistics(bn, x)
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        torch.testing.assert_close(mean, flat.mean(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, flat.var(1), rtol=1e-12, atol=1e-12)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bnlib.nn.BatchNorm1d(3).double()

        def forward(self, x):
            return self.bn(input=self.bn(x) + 5)

    model = Twice()
    x = torch.randn(8, 3, dtype=torch.float64)
    (mean, var), = ma.population_statistics(model, x)
    with torch.no_grad():
        both = torch.cat([x, model.bn.eval()(x) + 5])
    torch.testing.assert_close(mean, both.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, both.var(0), rtol=1e-12, atol=1e-12)


def test_population_statistics_skip_empty_batches():
    bn = bnlib.nn.BatchNorm1d(3).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    (mean, var), = ma.population_statistics(bn, [x[:0], x[:4], x[:0], x[4:]])
    torch.testing.assert_close(mean, x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.var(0), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="only empty ones"):
        ma.population_statistics(bn, [x[:0]])


class _AuxHead(nn.Module):
    # an auxiliary head that runs only in training mode, as in Inception
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), bnlib.nn.BatchNorm1d(4))
        self.aux = nn.Sequential(nn.Linear(4, 2), bnlib.nn.BatchNorm1d(2))

    def forward(self, x):
        z = self.body(x)
        return (z, self.aux(z)) if self.training else z


@pytest.mark.parametrize("estimator", ["batch_average", "pooled"])
def test_a_layer_no_batch_reaches(estimator):
    """(With "pooled", the unreached layer, whose old count restore() put back,
    was once taken for a layer called without its hooks.)"""
    torch.manual_seed(0)
    model = _AuxHead()
    model.train()
    model(torch.randn(16, 3) * 3 + 2)            # running statistics in both BN layers
    model.eval()
    aux_before = {k: v.clone() for k, v in model.aux[1].named_buffers()}
    with pytest.raises(ValueError, match="no batch reached aux.1"):
        ma.population_statistics(model, torch.randn(8, 3))
    # precise BN leaves the unreached layer as it was, and measures the other
    ma.precise_bn(model, [torch.randn(8, 3)], estimator=estimator)
    for k, v in model.aux[1].named_buffers():
        torch.testing.assert_close(v, aux_before[k], rtol=0, atol=0)
    assert int(model.body[1].num_batches_tracked) == 1


def test_precise_bn_takes_a_single_tensor_as_one_batch():
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(4)) * 2 + 1
    one, listed = _mlp(bnlib.nn.BatchNorm1d), _mlp(bnlib.nn.BatchNorm1d)
    ma.precise_bn(one, x)
    ma.precise_bn(listed, [x])
    assert int(one[1].num_batches_tracked) == 1
    for a, b in zip(one.buffers(), listed.buffers()):
        assert torch.equal(a, b)
    before = {k: v.clone() for k, v in one.state_dict().items()}
    with pytest.raises(ValueError, match="an input tensor or an iterable"):
        ma.precise_bn(one, 3.0)
    assert all(torch.equal(v, before[k]) for k, v in one.state_dict().items())


@pytest.mark.parametrize("momentum, tol", [(1e-9, 0.01), (1e-12, 0.01), (1e-17, 0.5), (0.1, 0.9), (0.3, 1e-6)])
def test_steps_to_forget_is_quick_and_right_for_any_momentum(momentum, tol):
    """A tiny momentum: the rounded base 1 - alpha was walked one step at a
    time (1e-12: 1e8 steps, 14 s) or was 1.0 (1e-17: no end). The count
    stays within a step of the logarithms' estimate."""
    import math

    t = ma.steps_to_forget(momentum, tol)
    estimate = math.log(tol) / math.log1p(-momentum)
    assert abs(t - estimate) <= 2


def test_precise_bn_skips_an_empty_batch():
    """It would count as a batch (torch's update_bn counts it), pulling the
    averages towards the reset values."""
    torch.manual_seed(0)
    batches = [torch.randn(8, 3) * 2 + 3 for _ in range(3)]
    with_empty, without = (bnlib.nn.BatchNorm1d(3), bnlib.nn.BatchNorm1d(3))
    ma.precise_bn(with_empty, [torch.zeros(0, 3)] + batches)
    ma.precise_bn(without, batches)
    torch.testing.assert_close(with_empty.running_mean, without.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(with_empty.running_var, without.running_var, rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least one batch"):
        ma.precise_bn(bnlib.nn.BatchNorm1d(3), [torch.zeros(0, 3)])
