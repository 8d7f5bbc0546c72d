"""bnlib.training.per_sample_gradients: each sample's gradient in the batch's graph.

Truths: a loop of batch-size-1 forward and backward passes with
torch.autograd (for models in which no sample sees another: no
normalization, LN, GN, BN in eval mode, FrozenBatchNorm), the Jacobian of
the vector of per-sample losses from torch.func.jacrev with torch's and
bnlib's BatchNorm1d and BatchNorm2d (BN in training mode, on (N, C) and on
(N, C, H, W) inputs), and the gradient of the mean loss (also with dropout,
whose masks the same seed repeats).
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


@pytest.fixture(scope="module")
def trained_bn():
    """One trained BN MLP for the module (its seeds are explicit); a test
    that changes modes or .grad takes a copy."""
    return _trained_bn()


@pytest.fixture(scope="module")
def independent_models(trained_bn):
    """Models in which no sample sees another, built once for the module
    (per_sample_gradients leaves every one as it was, as tested below)."""
    return {
        "no norm": _mlp(),
        "LN": _mlp(lambda c: bnlib.nn.LayerNorm(c)),
        "RMSNorm": _mlp(lambda c: bnlib.nn.RMSNorm(c)),
        "GN": _mlp(lambda c: bnlib.nn.GroupNorm(2, c)),
        "BN eval": copy.deepcopy(trained_bn).eval(),
        "FrozenBatchNorm": bnlib.nn.FrozenBatchNorm.convert_frozen_batchnorm(copy.deepcopy(trained_bn)),
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
def test_matches_a_loop_of_batch_size_one_where_samples_do_not_interact(kind, independent_models):
    model = independent_models[kind]
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


class _ConvNet(torch.nn.Module):
    """(N, 2, 5, 5) -> conv 3x3 -> norm -> ReLU -> mean over H, W -> linear: 3 logits."""

    def __init__(self, norm_layer, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.norm = norm_layer(4)
        self.out = torch.nn.Linear(4, 3)
        self.double()

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def _untracked(kind):
    """BN in training mode without running statistics (jacrev may then run it)."""
    lib, dims = kind.split()
    module = {("torch", "1d"): torch.nn.BatchNorm1d, ("torch", "2d"): torch.nn.BatchNorm2d,
              ("bnlib", "1d"): bnlib.nn.BatchNorm1d, ("bnlib", "2d"): bnlib.nn.BatchNorm2d}[lib, dims]
    return lambda c: module(c, track_running_stats=False, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["torch 1d", "bnlib 1d", "torch 2d", "bnlib 2d"])
def test_bn_in_training_mode_is_the_jacobian_of_the_losses(kind):
    # row i of the Jacobian of the (N,) losses is g_i; 1d: an MLP on (N, C),
    # 2d: a conv net on (N, C, H, W). bnlib's BN runs its formula under
    # jacrev and its hand-written backward in per_sample_gradients.
    if kind.endswith("1d"):
        model, (x, y) = _mlp(_untracked(kind)), _batch()
    else:
        model, (x, y) = _ConvNet(_untracked(kind)), _images()
    assert model.training
    params = {n: p.detach() for n, p in model.named_parameters()}

    def losses(p):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    jac = torch.func.jacrev(losses)(params)
    got = training.per_sample_gradients(model, x, y)
    assert list(got) == list(params)
    for name in params:
        torch.testing.assert_close(got[name], jac[name], **TOL)


def test_a_batch_of_one():
    # N = 1: g_0 is the gradient of the one loss. A conv net's BN still has
    # H * W values per channel; BatchNorm1d has one and refuses the batch
    # (InputError, a ValueError), as torch does, changing nothing.
    conv = _ConvNet(bnlib.nn.BatchNorm2d)
    x, y = _images(1)
    got = training.per_sample_gradients(conv, x, y)
    with models.buffers_kept(conv):
        want = torch.autograd.grad(F.cross_entropy(conv(x), y), list(conv.parameters()))
    for (name, _), g in zip(conv.named_parameters(), want):
        torch.testing.assert_close(got[name], g.unsqueeze(0), **TOL)
    mlp = _mlp(bnlib.nn.BatchNorm1d)
    buffers = {n: b.clone() for n, b in mlp.named_buffers()}
    x, y = _batch()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        training.per_sample_gradients(mlp, x[:1], y[:1])
    for n, b in mlp.named_buffers():
        assert torch.equal(b, buffers[n]), n


class _WithDropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _mlp(bnlib.nn.BatchNorm1d)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.net(self.drop(x))


def test_dropout_masks_are_drawn_once_per_call():
    # The one forward pass draws the masks: after the same seed, the g_i add
    # up to the batch gradient with the same masks; two calls in a row draw
    # other masks (the global generator advances), so their g_i differ.
    model = _WithDropout()
    x, y = _batch()
    torch.manual_seed(7)
    got = training.per_sample_gradients(model, x, y)
    again = training.per_sample_gradients(model, x, y)
    torch.manual_seed(7)
    with models.buffers_kept(model):
        mean_grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), mean_grads):
        torch.testing.assert_close(got[name].sum(0), x.shape[0] * g, **TOL)
    assert not torch.allclose(got["net.fc1.weight"], again["net.fc1.weight"])


def test_vmap_of_grad_gives_the_same_where_samples_do_not_interact(independent_models):
    # the faster route the docstring names, for a model without BN in
    # training mode: torch.func.vmap over the gradient of one sample's loss
    model = independent_models["LN"]
    x, y = _batch()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one_loss(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    want = torch.func.vmap(torch.func.grad(one_loss), in_dims=(None, 0, 0))(params, x, y)
    got = training.per_sample_gradients(model, x, y)
    for name in params:
        torch.testing.assert_close(got[name], want[name], **TOL)


@pytest.mark.parametrize("kind", ["BN train", "no norm", "LN", "GN", "BN eval", "FrozenBatchNorm"])
def test_the_per_sample_gradients_add_up_to_the_batch_gradient(kind, trained_bn, independent_models):
    model = copy.deepcopy(trained_bn).train() if kind == "BN train" else independent_models[kind]
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


def test_bn_in_training_mode_lets_one_sample_move_every_other_gradient(trained_bn, independent_models):
    x, y = _batch(10, seed=4)
    x_new = x[0] + 3.0
    lowest, _ = _relative_change_of_others(copy.deepcopy(trained_bn).train(), x, y, x_new)
    assert lowest > 1e-3  # every other sample's g_i moves (seen: 2e-2 and more)
    for kind, model in independent_models.items():
        _, highest = _relative_change_of_others(model, x, y, x_new)
        assert highest < 1e-12, kind  # only sample 0's own gradient changes


def test_buffers_modes_parameters_and_grad_are_left_as_they_were(trained_bn):
    model = copy.deepcopy(trained_bn).train()
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


def test_bad_input_raises_and_changes_nothing(trained_bn):
    model = copy.deepcopy(trained_bn).train()
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
        # a loss that autograd cannot follow back to the parameters
        ((model, x, y), {"loss": lambda out, t: F.cross_entropy(out.detach(), t, reduction="none")},
         "does not require grad"),
    ]
    with torch.inference_mode():
        x_inference = x.clone()
    cases.append(((model, x_inference, y), {}, "inference tensor"))
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            training.per_sample_gradients(*args, **kwargs)
        for n, b in model.named_buffers():  # the mean-loss case ran a forward pass first
            assert torch.equal(b, buffers[n]), (message, n)
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"under torch.inference_mode\(\)"):
            training.per_sample_gradients(model, x, y)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), ("inference_mode", n)
    frozen_all = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        training.per_sample_gradients(frozen_all, x, y)
