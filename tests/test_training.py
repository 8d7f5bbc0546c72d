"""bnlib.training: batches, one SGD step, determinism, the callback, evaluation.

Truths: a gradient-descent step written out by hand with torch.autograd,
counting, hand-computed accuracy, the model's own eval-mode forward.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnlib.nn
from bnlib import data, models, training
from torch import nn


def test_minibatches_cover_every_index_once():
    g = torch.Generator().manual_seed(0)
    batches = list(training.minibatches(10, 3, g))
    assert [len(b) for b in batches] == [3, 3, 3]  # the last, short batch is dropped
    assert len(set(torch.cat(batches).tolist())) == 9
    batches = list(training.minibatches(10, 3, g, drop_last=False))
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="batch_size"):
        list(training.minibatches(10, 11, g))


def test_one_full_batch_sgd_step_by_hand():
    # float64; the update is w - lr * dL/dw with the gradient from autograd on
    # a copy of the parameters: agreement to rounding (1e-12).
    x, y = data.gaussian_blobs(20, n_features=3, n_classes=2, seed=0, dtype=torch.float64)
    m = models.make_mlp(3, 4, 2, depth=2, seed=0).double()
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    names = [n for n, _ in m.named_parameters()]
    out = torch.func.functional_call(m, dict(zip(names, params)), (x,))
    grads = torch.autograd.grad(F.cross_entropy(out, y), params)
    h = training.train(m, x, y, steps=1, lr=0.3)
    for p, p0, g in zip(m.parameters(), params, grads):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.3 * g, rtol=1e-12, atol=1e-12)
    assert h.step == [1]
    assert h.loss[0] == pytest.approx(float(F.cross_entropy(out, y).detach()), rel=1e-12)


def test_training_is_deterministic_and_learns():
    # seed 0: the two centres are 7.7 apart, 15 noise stds: separable
    x, y = data.gaussian_blobs(256, n_features=2, n_classes=2, spread=0.5, seed=0)
    runs = []
    for _ in range(2):
        m = models.make_mlp(2, 8, 2, depth=2, norm="bn", seed=0)
        h = training.train(m, x, y, epochs=5, batch_size=32, lr=0.1, momentum=0.9, seed=3)
        runs.append((h, m))
    (h1, m1), (h2, m2) = runs
    assert h1.loss == h2.loss
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert len(h1.step) == 5 * (256 // 32)
    # well separated blobs: the training set is learned
    assert np.mean(h1.loss[-4:]) < 0.5 * h1.loss[0]
    assert training.evaluate(m1, x, y)[1] > 0.95


def test_adam_runs():
    x, y = data.gaussian_blobs(64, seed=0)
    m = models.make_mlp(2, 4, 2, depth=1, seed=0)
    h = training.train(m, x, y, steps=20, batch_size=16, lr=1e-2, optimizer="adam")
    assert len(h.loss) == 20 and h.loss[-1] < h.loss[0]


def test_callback_sees_every_state():
    x, y = data.gaussian_blobs(40, seed=0)
    m = models.make_mlp(2, 4, 2, depth=1, seed=0)
    seen = []
    training.train(m, x, y, steps=7, batch_size=10, callback=lambda step, model: seen.append(step))
    assert seen == list(range(8))  # 0 = before the first update, then after each of the 7 (2 epochs)


def test_accuracy_and_evaluate():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert training.accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    x, y = data.gaussian_blobs(30, seed=0)
    m = models.make_mlp(2, 4, 2, depth=1, norm="bn", seed=0)
    m.train()
    loss, acc = training.evaluate(m, x, y)
    assert m.training  # mode restored
    m.eval()
    with torch.no_grad():
        assert loss == pytest.approx(float(F.cross_entropy(m(x), y)), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one of steps or epochs"),
        (dict(steps=1, epochs=1), "exactly one of steps or epochs"),
        (dict(steps=1, batch_size=100), "batch_size"),
        (dict(steps=1, batch_size=0), r"batch_size must be in \[1, n=20\]"),
        (dict(steps=1, batch_size=2.5), r"batch_size must be in \[1, n=20\] \(an integer\), got 2.5"),
        (dict(steps=2.5, batch_size=4), "steps must be an integer >= 0, got 2.5"),
        (dict(steps=-1), "steps must be an integer >= 0"),
        (dict(epochs=True), "epochs must be an integer >= 0, got True"),
        (dict(steps=1, optimizer="rmsprop"), "optimizer"),
    ],
)
def test_bad_arguments(kwargs, match):
    x, y = data.gaussian_blobs(20, seed=0)
    m = models.make_mlp(2, 4, 2, depth=1, seed=0)
    before = [p.clone() for p in m.parameters()]
    with pytest.raises(ValueError, match=match):
        training.train(m, x, y, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


@pytest.mark.parametrize("y, match", [
    (torch.zeros(20), r"dtype torch.long \(or uint8\), got \(20,\) torch.float32"),
    (torch.zeros(20, 1, dtype=torch.long), r"a \(N,\) tensor of dtype torch.long \(or uint8\), got \(20, 1\)"),
    (-torch.ones(20, dtype=torch.long), "class indices >= 0, got -1"),
], ids=["float", "column", "negative"])
def test_bad_labels_are_refused_before_any_bn_layer_changes(y, match):
    x, _ = data.gaussian_blobs(20, seed=0)
    m = nn.Sequential(nn.Linear(2, 4), bnlib.nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        training.train(m, x, y, steps=1)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_minibatches_refuses_what_is_no_batch_size():
    for bad in (2.5, True, 0):
        with pytest.raises(ValueError, match=rf"an integer in \[1, n=10\], got {bad}"):
            list(training.minibatches(10, bad, torch.Generator()))


def test_helpers_restore_each_submodules_mode():
    """A BN layer frozen in eval mode inside a model in training mode stays
    frozen after evaluate, recorders.probe and the landscape measurements
    (model.train(was_training) used to unfreeze it)."""
    from bnlib import experiments, landscape, recorders

    model = models.make_mlp(3, 8, 2, depth=2, norm="bn", seed=0)
    model.train()
    model.norm1.eval()
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    training.evaluate(model, x, y)
    recorders.probe(model, x)
    experiments.evaluate_batch_stats(model, x, y)
    landscape.loss_landscape_along_gradient(model, x, y, [0.0, 0.1])
    assert model.training and not model.norm1.training and model.norm2.training


def test_decay_bn_false_exempts_only_the_bn_parameters():
    """One SGD step from zero gradient: weight decay alone moves a parameter by -lr * wd * p."""
    model = models.make_mlp(4, 6, 3, depth=1, norm="bn", seed=0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for decay_bn in (True, False):
        net = copy.deepcopy(model)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt = training._optimizer(net, "sgd", lr=0.5, momentum=0.0, weight_decay=0.1, decay_bn=decay_bn)
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for n, p in net.named_parameters():
            decayed = decay_bn or not n.startswith("norm")
            want = before[n] * (1 - 0.05) if decayed else before[n]
            torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
    # and train() passes it on, leaving the default path as it was
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    training.train(a, x, y, steps=3, batch_size=4, weight_decay=0.1)
    training.train(b, x, y, steps=3, batch_size=4, weight_decay=0.1, decay_bn=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_exempt_from_decay_spares_only_the_named_modules():
    """One SGD step from zero gradient: weight decay alone moves a parameter by -lr * wd * p,
    except in the modules named (alone, or together with decay_bn=False)."""
    model = models.make_mlp(4, 6, 3, depth=2, norm="bn", seed=0)
    for decay_bn, exempt, spared in ((True, ("norm2",), ("norm2.",)),
                                     (True, ("norm1", "out"), ("norm1.", "out.")),
                                     (False, ("fc1",), ("norm1.", "norm2.", "fc1."))):
        net = copy.deepcopy(model)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt = training._optimizer(net, "sgd", lr=0.5, momentum=0.0, weight_decay=0.1,
                                  decay_bn=decay_bn, exempt_from_decay=exempt)
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for n, p in net.named_parameters():
            want = before[n] if n.startswith(spared) else before[n] * (1 - 0.05)
            torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)


def test_exempt_from_decay_in_train_equals_adding_the_decay_by_hand():
    """Exempting norm2 through train() gives the same weights, bit for bit, as decay_bn=False
    with norm1's decay added to its gradient by hand (clip_gradients)."""
    model = models.make_mlp(4, 6, 3, depth=2, norm="bn", seed=0)
    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    training.train(a, x, y, steps=5, batch_size=8, lr=0.3, weight_decay=0.1, exempt_from_decay=["norm2"])

    def decay_norm1(net):
        with torch.no_grad():
            for p in net.norm1.parameters():
                p.grad.add_(p, alpha=0.1)

    training.train(b, x, y, steps=5, batch_size=8, lr=0.3, weight_decay=0.1, decay_bn=False,
                   clip_gradients=decay_norm1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    # and an empty collection is the default
    c, d = copy.deepcopy(model), copy.deepcopy(model)
    training.train(c, x, y, steps=3, batch_size=8, weight_decay=0.1)
    training.train(d, x, y, steps=3, batch_size=8, weight_decay=0.1, exempt_from_decay=())
    for pc, pd in zip(c.parameters(), d.parameters()):
        assert torch.equal(pc, pd)


@pytest.mark.parametrize("exempt, match", [("norm1", "got the string 'norm1'"),
                                           (["norm9"], r"does not have: \['norm9'\]"),
                                           (3, "collection of module names, got 3")],
                         ids=["string", "unknown", "not-iterable"])
def test_exempt_from_decay_refuses_bad_names_before_the_model_changes(exempt, match):
    model = models.make_mlp(4, 6, 3, depth=2, norm="bn", seed=0)
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match=match):
        training.train(model, x, y, steps=1, batch_size=4, weight_decay=0.1, exempt_from_decay=exempt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # checked even where nothing decays
    with pytest.raises(ValueError, match=match):
        training.train(model, x, y, steps=1, batch_size=4, exempt_from_decay=exempt)


@pytest.mark.parametrize("y", [torch.tensor([[0], [1], [2]]), torch.tensor([0])], ids=["column", "one"])
def test_accuracy_refuses_labels_that_would_broadcast(y):
    """A (N, 1) or (1,) y broadcast into an N x N comparison (0.556, not 1)."""
    logits = torch.eye(3)
    with pytest.raises(ValueError, match=r"labels of shape \(N,\)"):
        training.accuracy(logits, y)
    assert training.accuracy(logits, torch.tensor([0, 1, 2])) == 1.0
