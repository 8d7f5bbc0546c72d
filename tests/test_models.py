"""bnlib.models: the MLP's structure and initialization, activation derivatives, modes_kept.

Truths: torch autograd for the derivatives, closed forms (sigmoid'(0) = 1/4,
sigmoid'(-6) = e^-6 / (1 + e^-6)^2), a forward pass written out by hand with
torch.nn.functional, and torch.nn.BatchNorm1d for the norm="bn" layers.
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlib.landscape
import bnlib.nn
from bnlib import models


def test_names_and_order_without_norm():
    m = models.make_mlp(5, 4, 3, depth=2)
    assert [n for n, _ in m.named_children()] == ["fc1", "act1", "fc2", "act2", "out"]
    assert isinstance(m.act1, nn.Tanh)
    assert m.fc1.bias is not None  # no norm: hidden layers keep their bias
    assert m(torch.zeros(7, 5)).shape == (7, 3)


def test_bn_between_linear_and_activation():
    m = models.make_mlp(5, [4, 6], 3, activation="sigmoid", norm="bn")
    assert [n for n, _ in m.named_children()] == ["fc1", "norm1", "act1", "fc2", "norm2", "act2", "out"]
    assert isinstance(m.norm2, bnlib.nn.BatchNorm1d) and m.norm2.num_features == 6
    assert isinstance(m.act2, nn.Sigmoid)
    assert m.fc1.bias is None and m.out.bias is not None  # BN cancels a hidden bias


def test_forward_is_linear_then_bn_then_activation():
    # The model against the same layers applied by hand (float64; same ops in
    # the same order, so 1e-12 is only rounding).
    torch.manual_seed(0)
    m = models.make_mlp(4, 3, 2, depth=2, norm_layer=torch.nn.BatchNorm1d, bias=True).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    h = x
    for l in (1, 2):
        fc, bn = getattr(m, f"fc{l}"), getattr(m, f"norm{l}")
        z = F.linear(h, fc.weight, fc.bias)
        u = F.batch_norm(z, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        h = torch.tanh(u)
    expected = F.linear(h, m.out.weight, m.out.bias)
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)


def test_bn_after_the_activation():
    """norm_position="after": fc -> act -> norm, and the linear layers keep their bias (the activation comes between)."""
    m = models.make_mlp(5, [4, 6], 3, activation="relu", norm="bn", norm_position="after")
    assert [n for n, _ in m.named_children()] == ["fc1", "act1", "norm1", "fc2", "act2", "norm2", "out"]
    assert m.fc1.bias is not None and m.fc2.bias is not None
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    h = x
    for l in (1, 2):
        fc, bn = getattr(m, f"fc{l}"), getattr(m, f"norm{l}")
        h = F.batch_norm(F.relu(F.linear(h, fc.weight, fc.bias)), None, None, bn.weight, bn.bias, training=True)
    torch.testing.assert_close(m(x), F.linear(h, m.out.weight, m.out.bias), rtol=1e-5, atol=1e-6)


def test_bnlib_bn_is_drop_in_for_torch_bn():
    # Same seed -> same weights (BN layers draw no random numbers); bnlib's BN
    # and torch's agree to float32 rounding (1e-5 after 3 layers).
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    ours = models.make_mlp(8, 6, 3, depth=3, norm="bn", seed=4)
    ref = models.make_mlp(8, 6, 3, depth=3, norm_layer=torch.nn.BatchNorm1d, seed=4)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_weight_scale_sets_the_std():
    # W ~ N(0, s^2 / fan_in): with 400*300 draws the sample std is within
    # ~3/sqrt(2 * 120000) ~ 0.6% of the truth; 2% leaves room.
    s = 2.5
    m = models.make_mlp(400, 300, 10, depth=2, weight_scale=s, seed=0)
    assert abs(float(m.fc2.weight.detach().std()) / (s / math.sqrt(300)) - 1) < 0.02
    assert abs(float(m.fc1.weight.detach().std()) / (s / math.sqrt(400)) - 1) < 0.02
    assert abs(float(m.out.weight.detach().std()) / (1 / math.sqrt(300)) - 1) < 0.05  # the out layer gets s = 1
    assert float(m.fc1.bias.detach().abs().max()) == 0.0


@pytest.mark.parametrize("factory, cancels", [
    (bnlib.nn.BatchNorm1d, True),
    (torch.nn.BatchNorm1d, True),
    (lambda c: bnlib.nn.GhostBatchNorm(c, 4), True),
    (bnlib.nn.BatchRenorm1d, True),
    (lambda c: bnlib.landscape.PartialBatchNorm1d(c, center=True, scale=False), True),
    (lambda c: bnlib.landscape.PartialBatchNorm1d(c, center=False), False),
    (bnlib.nn.LayerNorm, False),
    (bnlib.nn.RMSNorm, False),
    (lambda c: bnlib.nn.GroupNorm(2, c), False),
    (bnlib.nn.FrozenBatchNorm, False),
])
def test_default_bias_only_where_the_norm_cancels_it(factory, cancels):
    # a per-feature bias cancels under a norm that subtracts each feature's
    # batch mean, not under layer, group or RMS norm
    m = models.make_mlp(5, 4, 3, depth=2, norm_layer=factory, seed=0)
    assert models.cancels_bias(m.norm1) is cancels
    assert (m.fc1.bias is None) is cancels and (m.fc2.bias is None) is cancels
    assert m.out.bias is not None
    explicit = models.make_mlp(5, 4, 3, depth=2, norm_layer=factory, seed=0, bias=cancels)  # overrides
    assert (explicit.fc1.bias is None) is (not cancels)
    # norm_position="after": the activation comes between, the bias stays
    assert models.make_mlp(5, 4, 3, depth=2, norm_layer=factory, norm_position="after", seed=0).fc1.bias is not None


def test_default_bias_decision_draws_nothing():
    # Deciding the default builds one norm layer on the side; the draws of
    # the real layers (weights, and a noisy BN's seed taken from the global
    # generator) are those of the same call with the bias given.
    noisy = bnlib.landscape.NoisyBatchNorm1d
    torch.manual_seed(5)
    default = models.make_mlp(5, 4, 3, depth=2, norm_layer=noisy)
    after_default = torch.rand(2)
    torch.manual_seed(5)
    given = models.make_mlp(5, 4, 3, depth=2, norm_layer=noisy, bias=False)
    after_given = torch.rand(2)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), given.state_dict().values()))
    assert default.norm1.seed == given.norm1.seed and torch.equal(after_default, after_given)


def test_bias_init():
    m = models.make_mlp(3, 4, 2, depth=2, activation="sigmoid", norm="bn", bias=True, bias_init=-6.0)
    assert torch.equal(m.fc2.bias.detach(), torch.full((4,), -6.0))
    with pytest.raises(ValueError, match="bias_init"):
        models.make_mlp(3, 4, 2, depth=2, norm="bn", bias_init=-6.0)


def test_seed_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = models.make_mlp(5, 4, 3, depth=2, weight_scale=1.0, seed=7)
    after = torch.rand(3)
    b = models.make_mlp(5, 4, 3, depth=2, weight_scale=1.0, seed=7)
    c = models.make_mlp(5, 4, 3, depth=2, weight_scale=1.0, seed=8)
    assert torch.equal(after, expected_next)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu"])
def test_activation_derivative_matches_autograd(name):
    # float64, elementwise: the closed form and autograd differ by rounding only.
    z = torch.linspace(-8, 8, 161, dtype=torch.float64)
    z = z[z != 0]  # relu'(0) is a convention
    z.requires_grad_(True)
    f = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}[name]
    (g,) = torch.autograd.grad(f(z).sum(), z)
    torch.testing.assert_close(models.activation_derivative(z.detach(), name), g, rtol=1e-12, atol=1e-15)


def test_activation_derivative_closed_forms():
    d = models.activation_derivative(torch.tensor([0.0, -6.0], dtype=torch.float64), "sigmoid")
    e6 = math.exp(-6)
    assert float(d[0]) == 0.25
    assert abs(float(d[1]) - e6 / (1 + e6) ** 2) < 1e-15
    assert abs(float(d[1]) - 0.002466509) < 1e-9
    assert float(models.activation_derivative(torch.tensor(0.0), "tanh")) == 1.0


def test_get_layers():
    m = models.make_mlp(5, 4, 3, depth=3, norm="bn")
    assert models.get_layers(m, "fc") == [m.fc1, m.fc2, m.fc3]
    assert models.get_layers(m, "norm") == [m.norm1, m.norm2, m.norm3]
    assert len(models.get_layers(m, "act")) == 3
    with pytest.raises(ValueError, match="kind"):
        models.get_layers(m, "out")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(activation="softplus"), "activation must be one of"),
        (dict(norm="ln"), "norm must be None or 'bn'"),
        (dict(norm="bn", norm_layer=nn.BatchNorm1d), "not both"),
        (dict(weight_scale=0.0), "weight_scale"),
        (dict(depth=3, hidden=[4, 4]), "depth=3"),
        (dict(depth=None), "depth is required"),
        (dict(norm="bn", norm_position="between"), "norm_position must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(in_features=5, hidden=4, out_features=3, depth=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        models.make_mlp(**args)
    with pytest.raises(ValueError, match="activation must be one of"):
        models.activation_derivative(torch.zeros(2), "softplus")


def test_resmlp_structure_and_block_formula():
    """stem, blocks, out; a block is relu(h + BN2(W2 relu(BN1(W1 h)))), written out with torch.nn.functional."""
    m = models.make_resmlp(6, 5, 3, blocks=2, seed=0)
    assert [n for n, _ in m.named_children()] == ["stem", "block1", "block2", "out"]
    block = m.block1
    h = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    u = F.batch_norm(F.linear(h, block.fc1.weight), None, None, block.norm1.weight, block.norm1.bias, training=True)
    v = F.batch_norm(F.linear(F.relu(u), block.fc2.weight), None, None, block.norm2.weight, block.norm2.bias,
                     training=True)
    torch.testing.assert_close(block(h), F.relu(h + v), rtol=1e-5, atol=1e-6)
    assert m(torch.zeros(4, 6)).shape == (4, 3)


def test_resmlp_zero_init_starts_every_block_as_the_identity():
    """gamma = 0 in each block's last BN: on a non-negative input (the stem's ReLU output) a block returns its input."""
    m = models.make_resmlp(6, 5, 3, blocks=3, zero_init=True, seed=1)
    assert all(torch.equal(getattr(m, f"block{b}").norm2.weight, torch.zeros(5)) for b in (1, 2, 3))
    assert all(torch.equal(getattr(m, f"block{b}").norm1.weight, torch.ones(5)) for b in (1, 2, 3))
    h = torch.rand(8, 5)
    torch.testing.assert_close(m.block2(h), h)
    same = models.make_resmlp(6, 5, 3, blocks=3, zero_init=False, seed=1)
    assert torch.equal(same.block1.fc1.weight, m.block1.fc1.weight)  # zero_init draws no other numbers
    with pytest.raises(ValueError, match="blocks"):
        models.make_resmlp(6, 5, 3, blocks=0)


@pytest.mark.parametrize("call", ["train", "eval"])
def test_modes_kept_restores_each_submodule_mode_after_an_exception(call):
    """A BN frozen in eval mode inside a model in training mode (and the reverse
    mix): after a block that calls model.train() or model.eval() and raises,
    every submodule has its own mode again, and the exception goes through."""
    m = models.make_mlp(4, [3, 3], 2, norm="bn")
    m.train()
    m.norm1.eval()  # frozen BN in a training model
    m.act2.eval()
    before = {name: module.training for name, module in m.named_modules()}
    assert before[""] is True and before["norm1"] is False and before["norm2"] is True
    with pytest.raises(RuntimeError, match="inside the block"):
        with models.modes_kept(m):
            getattr(m, call)()
            assert all(module.training == (call == "train") for module in m.modules())
            raise RuntimeError("inside the block")
    assert {name: module.training for name, module in m.named_modules()} == before


def test_modes_kept_model_in_eval_with_a_submodule_in_training():
    """The reverse: a model in eval mode with one BN in training mode, and a block that exits normally."""
    m = models.make_resmlp(4, 3, 2, blocks=1, seed=0)
    m.eval()
    m.block1.norm2.train()
    before = {name: module.training for name, module in m.named_modules()}
    with models.modes_kept(m):
        m.train()
    assert {name: module.training for name, module in m.named_modules()} == before
    assert m.training is False and m.block1.norm2.training is True and m.block1.norm1.training is False
    assert "modes_kept" in models.__all__


# --------------------------------------------------------------------------
# ConstantStatsBatchNorm1d: batch norm's forward, a backward without the statistics
# --------------------------------------------------------------------------


def _bn_pair():
    const = models.ConstantStatsBatchNorm1d(4).double()
    bn = torch.nn.BatchNorm1d(4).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in (const, bn):
            layer.weight.copy_(torch.linspace(0.5, 2.0, 4, dtype=torch.float64))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, 4, dtype=torch.float64))
    x = 3 + 2 * torch.randn(16, 4, generator=g, dtype=torch.float64)
    return const, bn, x


def test_constant_stats_bn_forward_and_running_stats_are_batch_norms():
    const, bn, x = _bn_pair()
    for _ in range(3):
        torch.testing.assert_close(const(x), bn(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(const.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(const.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    const.eval(), bn.eval()
    torch.testing.assert_close(const(x), bn(x), rtol=1e-12, atol=1e-12)


def test_constant_stats_bn_gradient_lacks_the_two_statistics_terms():
    const, bn, x = _bn_pair()
    dy = torch.randn(16, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x1 = x.clone().requires_grad_()
    (dx_const,) = torch.autograd.grad(const(x1), x1, dy)
    x2 = x.clone().requires_grad_()
    (dx_bn,) = torch.autograd.grad(bn(x2), x2, dy)
    s = torch.sqrt(x.var(0, unbiased=False) + const.eps)
    x_hat = (x - x.mean(0)) / s
    gamma = const.weight.detach()
    # naive: gamma * dy / s; batch norm's compact formula adds -mean(dy) - x_hat * mean(dy * x_hat)
    torch.testing.assert_close(dx_const, gamma * dy / s, rtol=1e-12, atol=1e-12)
    missing = -gamma / s * (dy.mean(0) + x_hat * (dy * x_hat).mean(0))
    torch.testing.assert_close(dx_bn, dx_const + missing, rtol=1e-10, atol=1e-12)
    # batch norm's gradient sums to 0 per channel, and is orthogonal to x_hat up to eps
    # (sum x_hat^2 = m var / (var + eps)); the naive one is neither
    assert dx_bn.sum(0).abs().max() < 1e-12 and (dx_bn * x_hat).sum(0).abs().max() < 1e-4
    assert dx_const.sum(0).abs().max() > 1e-2 and (dx_const * x_hat).sum(0).abs().max() > 1e-2


def test_constant_stats_bn_bad_input_and_arguments():
    layer = models.ConstantStatsBatchNorm1d(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, 3))
    with pytest.raises(ValueError, match="expected 2D input"):
        layer(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="3 channels"):
        layer(torch.randn(4, 5))
    assert torch.equal(layer.running_mean, torch.zeros(3))  # untouched by the errors
    for kwargs in ({"num_features": 0}, {"num_features": 3, "eps": 0}, {"num_features": 3, "momentum": None}):
        with pytest.raises(ValueError):
            models.ConstantStatsBatchNorm1d(**kwargs)


def test_buffers_kept_restores_every_buffer_in_place_also_after_an_error():
    model = models.make_mlp(4, 6, 3, depth=2, norm="bn", seed=0).train()
    buffers = list(model.buffers())
    before = [b.clone() for b in buffers]
    with models.buffers_kept(model):
        model(torch.randn(8, 4))
        assert not torch.equal(model.norm1.running_mean, before[0])
    with pytest.raises(RuntimeError):
        with models.buffers_kept(model):
            model(torch.randn(8, 4))
            raise RuntimeError("inside the block")
    for b, old, now in zip(buffers, before, model.buffers()):
        assert b is now and torch.equal(b, old)
    assert "buffers_kept" in models.__all__


@pytest.mark.parametrize("zero_init", [False, True])
def test_resmlp_default_is_the_original_recipe(zero_init):
    """The default network draws the same numbers as the recipe it had before its
    options existed (chapters 7 and 11 rely on it): under the seed, a stem
    Linear(bias=False) and BN, per block Linear, BN, Linear, BN, then the out layer."""
    got = models.make_resmlp(6, 5, 3, blocks=2, zero_init=zero_init, seed=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        parts = [nn.Linear(6, 5, bias=False), bnlib.nn.BatchNorm1d(5)]
        for _ in range(2):
            parts += [nn.Linear(5, 5, bias=False), bnlib.nn.BatchNorm1d(5),
                      nn.Linear(5, 5, bias=False), bnlib.nn.BatchNorm1d(5)]
        parts.append(nn.Linear(5, 3))
    want = [t for p in parts for t in p.state_dict().values()]
    have = list(got.state_dict().values())
    assert len(have) == len(want)
    for h, w in zip(have, want):
        if zero_init and h.shape == (5,) and torch.equal(h, torch.zeros(5)) and torch.equal(w, torch.ones(5)):
            continue  # the last gamma of each block, zeroed
        assert torch.equal(h, w)
    assert not any("alpha" in k for k in got.state_dict())
    assert got.block1.fc1.bias is None and isinstance(got.block1.norm2, bnlib.nn.BatchNorm1d)
    assert "BatchNorm1d" in repr(inspect.signature(models.make_resmlp).parameters["norm_layer"].default)


def test_resmlp_without_normalization():
    """norm_layer=None: Identity in the norm slots (names kept), linear layers with zero biases,
    and a block is relu(h + W2 relu(W1 h + b1) + b2)."""
    m = models.make_resmlp(6, 5, 3, blocks=2, norm_layer=None, seed=0)
    assert not any(isinstance(x, (nn.BatchNorm1d, bnlib.nn.BatchNorm1d)) for x in m.modules())
    assert isinstance(m.stem[1], nn.Identity) and isinstance(m.block2.norm1, nn.Identity)
    assert all(torch.equal(b, torch.zeros(5)) for b in (m.block1.fc1.bias, m.block2.fc2.bias, m.stem[0].bias))
    h = torch.rand(4, 5)
    with torch.no_grad():
        m.block1.fc2.bias.fill_(0.3)
        want = F.relu(h + F.linear(F.relu(F.linear(h, m.block1.fc1.weight, m.block1.fc1.bias)),
                                   m.block1.fc2.weight, m.block1.fc2.bias))
        torch.testing.assert_close(m.block1(h), want)
    m.train()
    assert m(torch.randn(1, 6)).shape == (1, 3)   # a batch of one is fine without BN
    with pytest.raises(ValueError, match="skip_init"):
        models.make_resmlp(6, 5, 3, blocks=2, norm_layer=None, zero_init=True)
    with pytest.raises(ValueError, match="norm_layer must be"):
        models.make_resmlp(6, 5, 3, blocks=2, norm_layer="bn")
    with pytest.raises(ValueError, match="norm_layer must be"):
        models.ResidualBlock(5, norm_layer="bn")
    with pytest.raises(ValueError, match="skip_init"):
        models.ResidualBlock(5, zero_init=True, norm_layer=None)


def test_resmlp_other_norm_layer():
    m = models.make_resmlp(6, 5, 3, blocks=1, norm_layer=lambda c: nn.LayerNorm(c), zero_init=True, seed=0)
    assert isinstance(m.stem[1], nn.LayerNorm) and isinstance(m.block1.norm1, nn.LayerNorm)
    assert torch.equal(m.block1.norm2.weight, torch.zeros(5))
    with pytest.raises(ValueError, match="a weight"):
        models.make_resmlp(6, 5, 3, blocks=1, norm_layer=lambda c: nn.Identity(), zero_init=True)


def test_resmlp_bias_option():
    """Biases by default only without normalization, whatever the norm; bias=True gives
    them (zero at the start) with layer norm, bias=False takes them away without one."""
    layer_norm = models.make_resmlp(6, 5, 3, blocks=1, norm_layer=lambda c: nn.LayerNorm(c), seed=0)
    assert layer_norm.stem[0].bias is None and layer_norm.block1.fc2.bias is None
    with_bias = models.make_resmlp(6, 5, 3, blocks=1, norm_layer=lambda c: nn.LayerNorm(c), bias=True, seed=0)
    assert all(torch.equal(b, torch.zeros(5))
               for b in (with_bias.stem[0].bias, with_bias.block1.fc1.bias, with_bias.block1.fc2.bias))
    plain = models.make_resmlp(6, 5, 3, blocks=1, norm_layer=None, bias=False, seed=0)
    assert plain.stem[0].bias is None and plain.block1.fc1.bias is None
    assert models.ResidualBlock(5, bias=True).fc1.bias is not None
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match="bias must be True, False or None"):
            models.make_resmlp(6, 5, 3, blocks=1, bias=bad)


def test_resmlp_skip_init_starts_as_the_identity_and_learns_alpha():
    """SkipInit: alpha = 0 in every block, so after the stem every block returns its
    (non-negative) input; alpha gets a gradient."""
    m = models.make_resmlp(6, 5, 3, blocks=3, norm_layer=None, weight_scale=2 ** 0.5, skip_init=True, seed=0)
    assert all(getattr(m, f"block{b}").alpha.item() == 0 for b in (1, 2, 3))
    x = torch.randn(8, 6)
    stem = m.stem(x)
    torch.testing.assert_close(m(x), m.out(stem), rtol=0, atol=0)
    F.cross_entropy(m(x), torch.arange(8) % 3).backward()
    assert m.block3.alpha.grad is not None and m.block3.alpha.grad.abs() > 0
    names = [n for n, _ in m.named_parameters()]
    assert "block1.alpha" in names
    # with BN, skip_init adds alpha on top of BN
    bn = models.make_resmlp(6, 5, 3, blocks=1, skip_init=True, seed=0)
    assert isinstance(bn.block1.norm1, bnlib.nn.BatchNorm1d) and bn.block1.alpha.item() == 0


def test_resmlp_weight_scale():
    """weight_scale s: hidden weights N(0, s^2 / fan_in), biases 0, the out layer with s = 1."""
    m = models.make_resmlp(64, 400, 10, blocks=2, norm_layer=None, weight_scale=2 ** 0.5, seed=0)
    for fc in (m.stem[0], m.block1.fc1, m.block2.fc2):
        assert fc.weight.std().item() == pytest.approx((2 / fc.in_features) ** 0.5, rel=0.02)
        assert torch.equal(fc.bias, torch.zeros_like(fc.bias))
    assert m.out.weight.std().item() == pytest.approx((1 / 400) ** 0.5, rel=0.05)
    with pytest.raises(ValueError, match="weight_scale"):
        models.make_resmlp(6, 5, 3, blocks=1, weight_scale=0)
    # with BN: the weights are scaled, the (absent) biases left alone
    bn = models.make_resmlp(64, 400, 10, blocks=1, weight_scale=2 ** 0.5, seed=0)
    assert bn.block1.fc1.bias is None
    assert bn.block1.fc1.weight.std().item() == pytest.approx((2 / 400) ** 0.5, rel=0.02)


@pytest.mark.parametrize("make", [
    lambda **k: models.make_mlp(4, 8, 2, depth=2, **k),
    lambda **k: models.make_resmlp(4, 8, 2, 2, **k),
    lambda **k: models.make_nf_resmlp(4, 8, 2, 2, **k),
], ids=["mlp", "resmlp", "nf_resmlp"])
def test_seed_none_draws_from_the_global_generator(make):
    """Without a seed, two calls build two networks (the draws were made in a
    forked generator and repeated); with one, the caller's state is kept."""
    def flat(net):
        return nn.utils.parameters_to_vector(net.parameters())

    torch.manual_seed(0)
    first, second = make(), make()
    assert not torch.equal(flat(first), flat(second))
    state = torch.get_rng_state()
    seeded = [make(seed=3), make(seed=3)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(flat(seeded[0]), flat(seeded[1]))


def test_weight_scale_must_be_finite():
    for scale in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match="weight_scale must be a finite number > 0"):
            models.make_mlp(4, 8, 2, depth=1, weight_scale=scale)
        with pytest.raises(ValueError, match="weight_scale must be a finite number > 0"):
            models.make_resmlp(4, 8, 2, 1, weight_scale=scale)
