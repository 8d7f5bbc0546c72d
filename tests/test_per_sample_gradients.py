"""bnlib.training.per_sample_gradients: each sample's gradient in the batch's graph.

Truths: a loop of batch-size-1 forward and backward passes with
torch.autograd (for models in which no sample sees another: no
normalization, LN, GN, BN in eval mode, FrozenBatchNorm), the Jacobian of
the vector of per-sample losses from torch.func.jacrev with torch's own
BatchNorm1d (BN in training mode), and the gradient of the mean loss.
Everything runs in float64: the two sides compute the same sums in another
order (a batch's matrix product against one row's), a few ulps apart, so
1e-10 relative is a wide margin that still catches any real difference.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from bnlib import data, models, training
import bnlib.nn

TOL = dict(rtol=1e-10, atol=1e-12)


def _batch(n=12, seed=0):
    x, y = data.gaussian_blobs(n, n_features=5, n_classes=3, seed=seed, dtype=torch.float64)
    return x, y


def _mlp(norm_layer=None, seed=0):
    return models.make_mlp(5, 8, 3, depth=2, activation="tanh", norm_layer=norm_layer, seed=seed).double()


def _trained_bn(seed=0):
    """A BN MLP whose running statistics are not the initial ones (eval mode then differs from identity)."""
    net = _mlp(bnlib.nn.BatchNorm1d, seed)
    x, y = data.gaussian_blobs(64, n_features=5, n_classes=3, seed=seed + 1, dtype=torch.float64)
    training.train(net, x, y, steps=20, batch_size=16, lr=0.1, seed=seed)
    return net


def _independent_models():
    bn_eval = _trained_bn().eval()
    frozen = bnlib.nn.FrozenBatchNorm.convert_frozen_batchnorm(copy.deepcopy(_trained_bn()))
    return {
        "no norm": _mlp(),
        "LN": _mlp(lambda c: bnlib.nn.LayerNorm(c)),
        "GN": _mlp(lambda c: bnlib.nn.GroupNorm(2, c)),
        "BN eval": bn_eval,
        "FrozenBatchNorm": frozen,
    }


def _loop_of_one(model, x, y):
    """The truth where samples do not interact: each sample alone, a batch of size 1."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.autograd.grad(loss, [p for _, p in named], allow_unused=True))
    return {n: torch.stack([r[k] if r[k] is not None else torch.zeros_like(p) for r in rows])
            for k, (n, p) in enumerate(named)}


@pytest.mark.parametrize("kind", ["no norm", "LN", "GN", "BN eval", "FrozenBatchNorm"])
def test_matches_a_loop_of_batch_size_one_where_samples_do_not_interact(kind):
    model = _independent_models()[kind]
    x, y = _batch()
    got = training.per_sample_gradients(model, x, y)
    want = _loop_of_one(model, x, y)
    assert list(got) == list(want) == [n for n, p in model.named_parameters() if p.requires_grad]
    for name in want:
        p = dict(model.named_parameters())[name]
        assert got[name].shape == (x.shape[0], *p.shape)
        torch.testing.assert_close(got[name], want[name], **TOL)
    if kind == "FrozenBatchNorm":  # its statistics and gamma, beta are buffers: no gradient of its own
        assert not any(".weight" in n and n.startswith("norm") for n in got)


def test_bn_in_training_mode_is_the_jacobian_of_the_losses():
    # torch's own BN (no running statistics, so jacrev may run it in training
    # mode): row i of the Jacobian of the (N,) losses is g_i.
    model = _mlp(lambda c: torch.nn.BatchNorm1d(c, track_running_stats=False, dtype=torch.float64))
    x, y = _batch()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def losses(p):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    jac = torch.func.jacrev(losses)(params)
    got = training.per_sample_gradients(model, x, y)
    for name in params:
        torch.testing.assert_close(got[name], jac[name], **TOL)


@pytest.mark.parametrize("kind", ["BN train", "no norm", "LN", "GN", "BN eval", "FrozenBatchNorm"])
def test_the_per_sample_gradients_add_up_to_the_batch_gradient(kind):
    model = _trained_bn().train() if kind == "BN train" else _independent_models()[kind]
    x, y = _batch(16, seed=3)
    got = training.per_sample_gradients(model, x, y)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with models.buffers_kept(model):
        mean_grads = torch.autograd.grad(F.cross_entropy(model(x), y), [p for _, p in named])
    for (name, _), g in zip(named, mean_grads):
        torch.testing.assert_close(got[name].sum(0), x.shape[0] * g, **TOL)


def _relative_change_of_others(model, x, y, x_new):
    """max over i != 0 of ||g_i(x with sample 0 replaced) - g_i(x)|| / ||g_i(x)||, and its min."""
    x2 = x.clone()
    x2[0] = x_new
    flat = [torch.cat([g.flatten(1) for g in training.per_sample_gradients(model, xs, y).values()], 1)
            for xs in (x, x2)]
    rel = ((flat[1] - flat[0]).norm(dim=1) / flat[0].norm(dim=1))[1:]
    return float(rel.min()), float(rel.max())


def test_bn_in_training_mode_lets_one_sample_move_every_other_gradient():
    x, y = _batch(10, seed=4)
    x_new = x[0] + 3.0
    lowest, _ = _relative_change_of_others(_trained_bn().train(), x, y, x_new)
    assert lowest > 1e-3  # every other sample's g_i moves (seen: 2e-2 and more)
    for kind, model in _independent_models().items():
        _, highest = _relative_change_of_others(model, x, y, x_new)
        assert highest < 1e-12, kind  # only sample 0's own gradient changes


def test_buffers_modes_parameters_and_grad_are_left_as_they_were():
    model = _trained_bn().train()
    model.norm2.eval()  # a mixed model: modes must come back per submodule
    model.zero_grad(set_to_none=True)  # (training left its last gradients)
    model.fc1.weight.grad = torch.full_like(model.fc1.weight, 7.0)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    x, y = _batch()
    training.per_sample_gradients(model, x, y)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(model.fc1.weight.grad, torch.full_like(model.fc1.weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc1.weight")


def test_a_custom_per_sample_loss_and_frozen_parameters():
    # squared error per sample; fc1 frozen (requires_grad=False): not in the result
    model = _mlp(lambda c: bnlib.nn.LayerNorm(c))
    model.fc1.weight.requires_grad_(False)
    x, _ = _batch()
    target = torch.randn(x.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = training.per_sample_gradients(model, x, target, loss=lambda out, t: ((out - t) ** 2).sum(1))
    assert "fc1.weight" not in got
    for i in (0, 5):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        loss = ((model(x[i : i + 1]) - target[i : i + 1]) ** 2).sum()
        for (name, _), g in zip(named, torch.autograd.grad(loss, [p for _, p in named])):
            torch.testing.assert_close(got[name][i], g, **TOL)


class _WithUnused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _mlp()
        self.unused = torch.nn.Linear(2, 2).double()  # a parameter outside the forward pass

    def forward(self, x):
        return self.net(x)


def test_a_parameter_the_loss_does_not_reach_gets_zeros():
    model = _WithUnused()
    x, y = _batch()
    got = training.per_sample_gradients(model, x, y)
    assert torch.equal(got["unused.weight"], torch.zeros(x.shape[0], 2, 2, dtype=torch.float64))


def test_bad_input_raises_and_changes_nothing():
    model = _trained_bn().train()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    x, y = _batch()
    cases = [
        ((model, x, y[:-1]), {}, "same N"),
        ((model, x.numpy(), y), {}, "must be tensors"),
        ((model, x[:0], y[:0]), {}, "N >= 1"),
        ((lambda t: t, x, y), {}, "torch.nn.Module"),
        ((model, x, y), {"loss": "cross_entropy"}, "must be a callable"),
        # a mean loss: one number for the batch, not one per sample
        ((model, x, y), {"loss": F.cross_entropy}, r"one value per sample, shape \(12,\), got \(\)"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            training.per_sample_gradients(*args, **kwargs)
        for n, b in model.named_buffers():  # the mean-loss case ran a forward pass first
            assert torch.equal(b, buffers[n]), (message, n)
    frozen_all = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        training.per_sample_gradients(frozen_all, x, y)
