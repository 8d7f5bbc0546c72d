"""Normalizer-free networks: adaptive gradient clipping (bnlib.training) and the NF residual MLP (bnlib.models).

Truths: the clipping rule of Brock et al. (2021) written out unit by unit in
plain Python (rows of a weight, a whole bias), torch.nn.functional for the
block's forward pass, the variance a ReLU passes on ((1 - 1/pi) / 2, a closed
form), and the stream's variance 1 + b * alpha^2 measured on Gaussian inputs.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlib import experiments as ex
from bnlib import models, training


def _agc_by_hand(weight, grad, clipping, eps):
    # The rule of the paper, one unit at a time: a row of a weight of 2 or more
    # dims, the whole tensor for a bias, a gain or a scalar.
    weight, grad = weight.double(), grad.double().clone()
    units = [...] if weight.ndim <= 1 else list(range(weight.shape[0]))
    for unit in units:
        w_norm = max(weight[unit].norm().item(), eps)
        g_norm = grad[unit].norm().item()
        if g_norm / w_norm > clipping:
            grad[unit] *= clipping * w_norm / g_norm
    return grad


def _with_grads(shapes, seed, grad_scale):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
        p.grad = grad_scale * torch.randn(shape, generator=gen, dtype=torch.float64)
        params.append(p)
    return params


SHAPES = [(6, 5), (4, 3, 3, 3), (7,), (), (3, 2, 5)]


@pytest.mark.parametrize("clipping", [0.01, 0.16, 1.0])
@pytest.mark.parametrize("grad_scale", [0.01, 1.0, 30.0])
def test_agc_matches_the_rule_unit_by_unit(clipping, grad_scale):
    params = _with_grads(SHAPES, seed=1, grad_scale=grad_scale)
    expected = [_agc_by_hand(p.detach(), p.grad, clipping, 1e-3) for p in params]
    weights = [p.detach().clone() for p in params]
    training.adaptive_grad_clip_(params, clipping)
    for p, want, w in zip(params, expected, weights):
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=0)
        assert torch.equal(p.detach(), w)  # the weights are not touched


def test_agc_caps_each_ratio_and_leaves_small_units_bit_for_bit():
    params = _with_grads(SHAPES, seed=2, grad_scale=0.5)
    before = [p.grad.clone() for p in params]
    clipping = 0.3
    clipped = training.adaptive_grad_clip_(params, clipping)
    total = 0
    for p, g0 in zip(params, before):
        w_norm = training.unitwise_norm(p.detach()).clamp_min(1e-3)
        ratio_before = training.unitwise_norm(g0) / w_norm
        ratio_after = training.unitwise_norm(p.grad) / w_norm
        assert torch.all(ratio_after <= clipping * (1 + 1e-12))
        small = (ratio_before <= clipping).expand_as(p.grad)
        assert torch.equal(p.grad[small], g0[small])
        big = ratio_before > clipping
        torch.testing.assert_close(ratio_after[big], torch.full_like(ratio_after[big], clipping))
        total += int(big.sum())
    assert 0 < total and clipped.item() == total and clipped.dtype == torch.int64


def test_unitwise_norm_shapes():
    assert training.unitwise_norm(torch.ones(4, 9)).shape == (4, 1)
    torch.testing.assert_close(training.unitwise_norm(torch.ones(4, 9)), torch.full((4, 1), 3.0))
    assert training.unitwise_norm(torch.ones(2, 3, 4, 4)).shape == (2, 1, 1, 1)
    torch.testing.assert_close(training.unitwise_norm(torch.ones(2, 3, 4, 4)), torch.full((2, 1, 1, 1), 48 ** 0.5))
    # at most one dim: one unit, the whole tensor
    assert training.unitwise_norm(torch.ones(16)).shape == ()
    torch.testing.assert_close(training.unitwise_norm(torch.ones(16)), torch.tensor(4.0))
    torch.testing.assert_close(training.unitwise_norm(torch.tensor(-2.0)), torch.tensor(2.0))


def test_agc_eps_caps_the_steps_of_zero_weights():
    """A zero-initialized bias or SkipInit alpha: its gradient is capped at clipping * eps, not zeroed."""
    alpha = nn.Parameter(torch.zeros(()))
    alpha.grad = torch.tensor(-5.0)
    bias = nn.Parameter(torch.zeros(3))
    bias.grad = torch.tensor([3.0, 0.0, 4.0])
    training.adaptive_grad_clip_([alpha, bias], 0.01)  # the default eps, 1e-3
    # relative tolerances only: these are below assert_close's default atol
    torch.testing.assert_close(alpha.grad, torch.tensor(-1e-5), rtol=1e-5, atol=0)
    torch.testing.assert_close(bias.grad, torch.tensor([6e-6, 0.0, 8e-6]), rtol=1e-5, atol=0)
    training.adaptive_grad_clip_([alpha], 0.01, eps=0.1)
    torch.testing.assert_close(alpha.grad, torch.tensor(-1e-5), rtol=1e-5, atol=0)  # under 0.01 * 0.1


def test_agc_a_unit_exactly_at_the_threshold_is_left_alone():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    w.grad = torch.tensor([[1.5, 2.0]])  # norm 2.5 = 0.5 * 5
    assert training.adaptive_grad_clip_(w, 0.5).item() == 0
    assert torch.equal(w.grad, torch.tensor([[1.5, 2.0]]))


def test_agc_zero_gradient_and_missing_gradient():
    w = nn.Parameter(torch.zeros(3, 4))
    w.grad = torch.zeros(3, 4)
    frozen = nn.Parameter(torch.ones(2))
    assert training.adaptive_grad_clip_([w, frozen], 0.01).item() == 0
    assert torch.equal(w.grad, torch.zeros(3, 4)) and frozen.grad is None
    assert training.adaptive_grad_clip_([frozen], 0.01).item() == 0  # nothing to clip
    assert training.adaptive_grad_clip_([], 0.01).item() == 0


def test_agc_takes_one_tensor_and_a_generator():
    lin = nn.Linear(4, 3)
    lin.weight.grad = 100 * torch.ones(3, 4)
    lin.bias.grad = torch.zeros(3)
    assert training.adaptive_grad_clip_(lin.weight, 0.1).item() == 3
    lin.weight.grad = 100 * torch.ones(3, 4)
    assert training.adaptive_grad_clip_(lin.parameters(), 0.1).item() == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_agc_low_precision_norms_do_not_overflow(dtype):
    """A float16 gradient whose row norm is above 65504: the norm is taken in float32."""
    w = nn.Parameter(torch.ones(2, 64, dtype=dtype))
    w.grad = torch.full((2, 64), 10000.0, dtype=dtype)  # row norm 80000
    training.adaptive_grad_clip_([w], 0.5)
    assert w.grad.dtype == dtype and torch.isfinite(w.grad).all()
    torch.testing.assert_close(training.unitwise_norm(w.grad.float()), torch.full((2, 1), 4.0), rtol=1e-2, atol=0)


@pytest.mark.parametrize("bad", [0, -0.1, float("inf"), float("nan"), True, np.bool_(True), "0.1", None,
                                 torch.tensor(0.1), np.float32(-1)])
def test_agc_bad_clipping_or_eps_changes_nothing(bad):
    params = _with_grads(SHAPES, seed=3, grad_scale=10.0)
    before = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match="clipping must be a finite number > 0"):
        training.adaptive_grad_clip_(params, bad)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        training.adaptive_grad_clip_(params, 0.1, eps=bad)
    # a generator is consumed by then: still no gradient changed
    with pytest.raises(ValueError, match="clipping"):
        training.adaptive_grad_clip_((p for p in params), bad)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


def test_agc_takes_numpy_numbers():
    one, two = _with_grads(SHAPES, seed=4, grad_scale=5.0), _with_grads(SHAPES, seed=4, grad_scale=5.0)
    training.adaptive_grad_clip_(one, 0.25, eps=1e-3)
    training.adaptive_grad_clip_(two, np.float32(0.25), eps=np.float64(1e-3))
    for p, q in zip(one, two):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=0)  # np.float32(0.25) is exact


def test_agc_leaves_non_finite_units_alone_and_clips_the_rest():
    w = nn.Parameter(torch.ones(3, 4))
    grad = torch.full((3, 4), 10.0)
    grad[0, 1] = float("inf")
    grad[1, 2] = float("nan")
    w.grad = grad.clone()
    assert training.adaptive_grad_clip_([w], 0.1).item() == 1  # only the finite row
    assert torch.equal(w.grad[0], grad[0]) and torch.equal(w.grad[1].isnan(), grad[1].isnan())
    torch.testing.assert_close(w.grad[2], torch.full((4,), 0.1))  # norm 0.1 * |w_2| = 0.2


def test_agc_size_one_dimensions_and_a_tensor_given_twice():
    # (n, 1): n units of one weight each; (1, n): one unit
    column = nn.Parameter(torch.tensor([[2.0], [-1.0], [0.5]]))
    column.grad = torch.tensor([[1.0], [1.0], [1.0]])
    assert training.adaptive_grad_clip_([column, column], 0.8).item() == 2  # clipped once, not twice
    torch.testing.assert_close(column.grad, torch.tensor([[1.0], [0.8], [0.4]]))
    row = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    row.grad = torch.tensor([[0.0, 10.0]])
    assert training.adaptive_grad_clip_(row, 0.5).item() == 1
    torch.testing.assert_close(row.grad, torch.tensor([[0.0, 2.5]]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_agc_on_cuda_does_not_synchronize():
    model = models.make_nf_resmlp(16, 32, 4, blocks=2, seed=0).cuda()
    x, y = torch.randn(8, 16, device="cuda"), torch.arange(8, device="cuda") % 4
    F.cross_entropy(model(x), y).backward()
    reference = [p.grad.double().cpu() for p in model.parameters()]
    weights = [p.detach().double().cpu() for p in model.parameters()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clipped = training.adaptive_grad_clip_(model.parameters(), 0.01)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert clipped.device.type == "cuda" and clipped.item() > 0
    for p, g, w in zip(model.parameters(), reference, weights):
        torch.testing.assert_close(p.grad.double().cpu(), _agc_by_hand(w, g, 0.01, 1e-3), rtol=1e-5, atol=1e-8)


def test_train_calls_clip_gradients_between_backward_and_step():
    """One full-batch SGD step with clipping equals the step taken by hand with the clipped gradient."""
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 3
    model = models.make_nf_resmlp(5, 4, 3, blocks=2, seed=0)
    by_hand = models.make_nf_resmlp(5, 4, 3, blocks=2, seed=0)
    F.cross_entropy(by_hand(x), y).backward()
    training.adaptive_grad_clip_(by_hand[:-1].parameters(), 0.01)
    with torch.no_grad():
        for p in by_hand.parameters():
            p -= 0.5 * p.grad
    seen = []

    def clip(net):
        assert all(p.grad is not None for p in net.parameters())
        seen.append(training.adaptive_grad_clip_(net[:-1].parameters(), 0.01).item())

    training.train(model, x, y, steps=1, lr=0.5, clip_gradients=clip)
    assert len(seen) == 1 and seen[0] > 0
    for p, q in zip(model.parameters(), by_hand.parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="clip_gradients must be a callable"):
        training.train(model, x, y, steps=1, clip_gradients=0.01)


# --- the normalizer-free residual MLP ---


def test_relu_gain_gives_unit_variance():
    # a ReLU passes on (1 - 1/pi) / 2 of a standard Gaussian's variance
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert models.RELU_GAIN == pytest.approx(1.7129, abs=1e-4)
    assert (models.RELU_GAIN * torch.relu(z)).var().item() == pytest.approx(1.0, abs=3e-3)


def test_nf_resmlp_structure_and_betas():
    m = models.make_nf_resmlp(6, 5, 3, blocks=4, alpha=0.5, seed=0)
    assert [n for n, _ in m.named_children()] == ["stem", "block1", "block2", "block3", "block4", "relu", "out"]
    for b in range(1, 5):
        block = getattr(m, f"block{b}")
        assert isinstance(block, models.NFResidualBlock) and block.alpha == 0.5
        assert block.beta == pytest.approx(math.sqrt(1 + (b - 1) * 0.25))
        for fc in (block.fc1, block.fc2):
            assert torch.equal(fc.bias, torch.zeros(5))
            torch.testing.assert_close(fc.weight.sum(1), torch.zeros(5), atol=1e-6, rtol=0)  # rows of mean 0
            torch.testing.assert_close(fc.weight.norm(dim=1), torch.ones(5), atol=1e-4, rtol=0)  # length 1 (eps)
    assert isinstance(m.out, nn.Linear) and not hasattr(m.out, "parametrizations")
    assert isinstance(m.relu, nn.ReLU)
    x = torch.randn(7, 6)
    stream = m[:-2](x)  # the stem and the blocks
    assert (stream < 0).any()
    torch.testing.assert_close(m(x), m.out(torch.relu(stream)))
    # no parameter outside the blocks' and the stem's gains and biases, and out's
    names = {n for n, _ in m.named_parameters()}
    assert "block2.fc1.parametrizations.weight.0.gain" in names and "out.weight" in names
    # seeded: the same network twice, the caller's random state untouched
    state = torch.random.get_rng_state()
    again = models.make_nf_resmlp(6, 5, 3, blocks=4, alpha=0.5, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(m.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_nf_block_forward_by_hand():
    block = models.NFResidualBlock(5, alpha=0.3, beta=1.7)
    with torch.no_grad():
        for fc in (block.fc1, block.fc2):
            fc.bias.normal_()
    h = torch.randn(8, 5)
    w1, w2 = block.fc1.weight, block.fc2.weight
    gain = models.RELU_GAIN
    branch = F.linear(gain * torch.relu(F.linear(gain * torch.relu(h / 1.7), w1, block.fc1.bias)),
                      w2, block.fc2.bias)
    torch.testing.assert_close(block.branch(h), branch)
    torch.testing.assert_close(block(h), h + 0.3 * branch)
    # each sample alone: the same in a batch of one, and in eval mode
    torch.testing.assert_close(block(h[2:3]), block(h)[2:3])
    torch.testing.assert_close(block.eval()(h), h + 0.3 * branch)


def test_nf_stream_variance_grows_by_alpha_squared_per_block():
    """Signal propagation at the start: with Gaussian inputs, the stream's variance after block b is
    about 1 + b * alpha^2 (the stem keeps variance 1), and every unit's mean stays near 0."""
    x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0))
    m = models.make_nf_resmlp(256, 256, 10, blocks=12, alpha=0.3, seed=1)
    variance = ex.stream_std(m, x) ** 2
    predicted = 1 + 0.09 * torch.arange(13).double()
    torch.testing.assert_close(torch.as_tensor(variance), predicted, rtol=0.06, atol=0)
    with torch.no_grad():
        h = m.stem(x)
        for b in range(1, 13):
            h = getattr(m, f"block{b}")(h)
        assert h.mean(0).pow(2).mean().item() < 0.02 * h.var(0).mean().item()
    # branch / stream: alpha times the branch over the stream, about alpha / beta_b at the start
    ratios = ex.branch_ratios(m, x)
    expected = [0.3 / math.sqrt(1 + b * 0.09) for b in range(12)]
    assert ratios == pytest.approx(expected, rel=0.08)


@pytest.mark.parametrize("kwargs, match", [
    (dict(blocks=0), "blocks >= 1"),
    (dict(width=1), "width >= 2"),
    (dict(in_features=1), "in_features >= 2"),
    (dict(out_features=0), "out_features >= 1"),
    (dict(alpha=0), "alpha must be a finite number > 0"),
    (dict(alpha=float("nan")), "alpha must be"),
    (dict(alpha=True), "alpha must be"),
])
def test_nf_resmlp_bad_arguments(kwargs, match):
    args = dict(in_features=6, width=5, out_features=3, blocks=2) | kwargs
    with pytest.raises(ValueError, match=match):
        models.make_nf_resmlp(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(width=1), "width must be an int >= 2"),
    (dict(width=4, beta=0), "beta must be a finite number > 0"),
    (dict(width=4, alpha=-1), "alpha must be"),
])
def test_nf_block_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.NFResidualBlock(**kwargs)


def test_agc_lets_the_nf_network_take_a_large_learning_rate():
    """The chapter's claim in small: at a learning rate where plain SGD blows the loss up, AGC keeps it finite
    and lower than at the start."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    y = (x[:, :4].argmax(1))
    losses = {}
    for clipping in (None, 0.01):
        model = models.make_nf_resmlp(16, 32, 4, blocks=8, seed=0)
        clip = None if clipping is None else (lambda net: training.adaptive_grad_clip_(net[:-1].parameters(), 0.01))
        history = training.train(model, x, y, steps=60, batch_size=32, lr=4.0, clip_gradients=clip)
        losses[clipping] = history.loss
    assert losses[0.01][-1] < losses[0.01][0]
    assert not math.isfinite(losses[None][-1]) or losses[None][-1] > 2 * losses[0.01][-1]
