"""Test-time adaptation (bnlib.adaptation: TENT) and the blur of bnlib.data.

Truths: the entropy written out in float64 from its definition (and its
closed forms: log K for equal logits, 0 for a certain prediction),
torch.nn.functional.batch_norm with batch statistics for what a configured
layer computes, autograd of the written-out entropy for the step, and
torch's conv2d-free arithmetic (sums of neighbours by hand) for the blur.
"""

import copy
import inspect
import math
import re
import warnings

import pytest
import torch
from torch import nn

import bnlib.nn as bnn
from bnlib import adaptation, data


def _mlp(bn_class=bnn.BatchNorm1d, affine=True, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), bn_class(5, affine=affine), nn.ReLU(), nn.Linear(5, 4),
                          bn_class(4, affine=affine), nn.ReLU(), nn.Linear(4, 3)).double()
    model.train()
    model(torch.randn(32, 6, dtype=torch.float64))  # running statistics away from (0, 1)
    model.eval()
    return model


def _entropy_by_hand(logits):
    total = 0.0
    for row in logits.double().tolist():
        z = max(row)
        norm = sum(math.exp(v - z) for v in row)
        p = [math.exp(v - z) / norm for v in row]
        total -= sum(q * math.log(q) for q in p if q > 0)
    return total / logits.shape[0]


# ---------------------------------------------------------------------------
# prediction_entropy
# ---------------------------------------------------------------------------


def test_entropy_matches_its_definition():
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    got = adaptation.prediction_entropy(logits)
    assert got.shape == ()
    assert abs(got.item() - _entropy_by_hand(logits)) < 1e-12  # float64, 35 terms


def test_entropy_closed_forms_and_large_logits():
    assert abs(adaptation.prediction_entropy(torch.zeros(4, 10)).item() - math.log(10)) < 1e-6  # float32
    certain = torch.tensor([[1e4, 0.0, -1e4], [0.0, 3e4, 0.0]])  # exp would overflow float32
    got = adaptation.prediction_entropy(certain)
    assert torch.isfinite(got) and got.item() == 0.0
    # adding a constant to a row changes no probability
    logits = torch.randn(5, 4, dtype=torch.float64)
    shifted = logits + torch.arange(5, dtype=torch.float64)[:, None] * 100
    assert abs(adaptation.prediction_entropy(shifted) - adaptation.prediction_entropy(logits)) < 1e-12


def test_entropy_of_masked_classes_is_finite():
    """A logit of -inf (a masked class) is probability 0 and adds 0 * log 0 = 0,
    as torch.distributions.Categorical's entropy: log 2 for two equal classes
    and a masked third, and a gradient with no NaN."""
    logits = torch.tensor([[0.0, 0.0, float("-inf")], [1.0, 2.0, 3.0]], requires_grad=True)
    h = adaptation.prediction_entropy(logits)
    expected = torch.distributions.Categorical(logits=logits.detach()).entropy().mean()
    torch.testing.assert_close(h.detach(), expected)
    torch.testing.assert_close(adaptation.prediction_entropy(logits[:1].detach()), torch.tensor(math.log(2)))
    h.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 2] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_entropy_of_half_logits_is_taken_in_float32(dtype):
    logits = torch.tensor([[6e4, 0.0, -6e4], [1.0, 2.0, 3.0]], dtype=dtype)  # exp overflows float16
    got = adaptation.prediction_entropy(logits)
    assert got.dtype == dtype and torch.isfinite(got)
    want = _entropy_by_hand(logits.double())
    assert abs(got.double().item() - want) < 1e-2 * want  # rounding of the result to half


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_entropy_refuses_integer_logits(dtype):
    with pytest.raises(ValueError, match="expected floating-point logits, got torch." + str(dtype).split(".")[1]):
        adaptation.prediction_entropy(torch.zeros(3, 4, dtype=dtype))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (0, 3), (3, 0), ()])
def test_entropy_refuses_other_shapes(shape):
    with pytest.raises(ValueError, match=r"expected logits of shape \(N, K\).*" + re.escape(str(tuple(shape)))):
        adaptation.prediction_entropy(torch.zeros(shape))


# ---------------------------------------------------------------------------
# configure_tent
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bn_class", [bnn.BatchNorm1d, nn.BatchNorm1d])
def test_configure_returns_only_the_bn_affine_parameters(bn_class):
    model = _mlp(bn_class)
    params = adaptation.configure_tent(model)
    bns = [model[1], model[4]]
    assert [id(p) for p in params] == [id(bns[0].weight), id(bns[0].bias), id(bns[1].weight), id(bns[1].bias)]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    assert model.training and all(m.training for m in model.modules())
    for m in bns:
        assert m.track_running_stats is False and m.running_mean is None and m.running_var is None


@pytest.mark.parametrize("bn_class", [bnn.BatchNorm1d, nn.BatchNorm1d])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_configured_layers_normalize_with_the_batch_in_either_mode(bn_class, mode):
    model = _mlp(bn_class)
    adaptation.configure_tent(model)
    getattr(model, mode)()
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    h = model[0](x)
    want = nn.functional.batch_norm(h, None, None, model[1].weight, model[1].bias, training=True)
    torch.testing.assert_close(model[1](h), want, rtol=1e-12, atol=1e-12)
    # and the whole model depends on the batch: the first row alone in a batch of two differs
    out_all = model(x)
    out_two = model(x[:2])
    assert not torch.allclose(out_all[:2], out_two)


def test_configure_leaves_layers_without_affine_normalizing_with_the_batch():
    model = nn.Sequential(nn.Linear(6, 5), bnn.BatchNorm1d(5, affine=False), nn.Linear(5, 4),
                          bnn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    params = adaptation.configure_tent(model)
    assert [id(p) for p in params] == [id(model[3].weight), id(model[3].bias)]
    assert model[1].running_mean is None and model[1].track_running_stats is False


def test_configure_works_on_conv_nets():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), bnn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(4, 2, 6, 6))
    params = adaptation.configure_tent(model)
    assert len(params) == 2 and all(p.shape == (4,) for p in params)
    opt = torch.optim.SGD(params, lr=0.1)
    logits = adaptation.tent_step(model, torch.randn(8, 2, 6, 6), opt)
    assert logits.shape == (8, 3)


@pytest.mark.skipif("bias" not in inspect.signature(nn.BatchNorm1d.__init__).parameters,
                    reason="this torch's BatchNorm has no bias= (added in 2.13)")
def test_configure_adapts_whatever_affine_parameter_a_layer_has():
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, bias=False), nn.Linear(5, 4),
                          nn.BatchNorm1d(4), nn.Linear(4, 3))
    params = adaptation.configure_tent(model)
    assert [id(p) for p in params] == [id(model[1].weight), id(model[3].weight), id(model[3].bias)]
    only = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, bias=False), nn.Linear(5, 3))
    assert [id(p) for p in adaptation.configure_tent(only)] == [id(only[1].weight)]


def test_configure_returns_a_shared_parameter_once():
    first, second = bnn.BatchNorm1d(5), bnn.BatchNorm1d(5)
    second.weight = first.weight  # tied gammas
    model = nn.Sequential(nn.Linear(6, 5), first, nn.Linear(5, 5), second, nn.Linear(5, 3))
    params = adaptation.configure_tent(model)
    assert [id(p) for p in params] == [id(first.weight), id(first.bias), id(second.bias)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns of parameters given twice
        torch.optim.Adam(params, lr=1e-3)


def test_configure_takes_ghost_batch_norm_and_leaves_frozen_bn():
    ghost = bnn.GhostBatchNorm(5, virtual_batch_size=4)
    frozen = bnn.FrozenBatchNorm(4)
    model = nn.Sequential(nn.Linear(6, 5), ghost, nn.Linear(5, 4), frozen, nn.Linear(4, 3))
    params = adaptation.configure_tent(model)
    assert [id(p) for p in params] == [id(ghost.weight), id(ghost.bias)]
    assert ghost.running_mean is None and ghost.track_running_stats is False
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen_state = {k: v.clone() for k, v in frozen.state_dict().items()}
    adaptation.tent_step(model, torch.randn(8, 6), torch.optim.SGD(params, lr=0.1))
    assert all(torch.equal(v, frozen.state_dict()[k]) for k, v in frozen_state.items())


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
    lambda: nn.Sequential(nn.Linear(4, 3), bnn.BatchNorm1d(3, affine=False), nn.Linear(3, 2)),
    lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, affine=False), nn.Linear(3, 2)),
])
def test_configure_refuses_a_model_with_nothing_to_adapt_and_changes_nothing(make):
    model = make().eval()
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, bnn.BatchNorm1d))]
    with pytest.raises(ValueError, match=r"at least one batch norm layer with a weight or a bias.*got "
                                         + str(len(bns))):
        adaptation.configure_tent(model)
    assert not model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(m.track_running_stats and m.running_mean is not None for m in bns)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------
# tent_step
# ---------------------------------------------------------------------------


def test_step_returns_the_predictions_made_before_the_update_and_moves_only_gamma_beta():
    model = _mlp()
    params = adaptation.configure_tent(model)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapted = [p.detach().clone() for p in params]
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(x)
    logits = adaptation.tent_step(model, x, torch.optim.SGD(params, lr=0.5))
    assert torch.equal(logits, want) and not logits.requires_grad
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert not any(torch.equal(p, q) for p, q in zip(params, adapted))


def test_step_is_one_gradient_step_on_the_entropy():
    model = _mlp()
    params = adaptation.configure_tent(model)
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    # the truth: autograd of the entropy written out from its definition
    logits = model(x)
    p = torch.softmax(logits, dim=1)
    grads = torch.autograd.grad(-(p * torch.log(p)).sum(1).mean(), params)
    want = [q.detach() - 0.1 * g for q, g in zip(params, grads)]
    for q in params:
        q.grad = torch.full_like(q, 7.0)  # a stale gradient must not leak into the step
    adaptation.tent_step(model, x, torch.optim.SGD(params, lr=0.1))
    for q, w in zip(params, want):
        torch.testing.assert_close(q.detach(), w, rtol=1e-12, atol=1e-14)


def test_step_works_inside_no_grad():
    model = _mlp()
    params = adaptation.configure_tent(model)
    before = [p.detach().clone() for p in params]
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():  # an evaluation loop
        adaptation.tent_step(model, x, torch.optim.SGD(params, lr=0.1))
    assert not any(torch.equal(p, b) for p, b in zip(params, before))


def test_small_steps_lower_the_entropy_of_the_batch():
    model = _mlp()
    params = adaptation.configure_tent(model)
    opt = torch.optim.SGD(params, lr=0.05)
    x = torch.randn(32, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    entropies = []
    for _ in range(5):
        entropies.append(adaptation.prediction_entropy(adaptation.tent_step(model, x, opt)).item())
    assert all(b < a for a, b in zip(entropies, entropies[1:]))


@pytest.mark.parametrize("drop_last", [False, True])
def test_pass_is_a_step_per_random_batch_with_logits_in_input_order(drop_last):
    x = torch.randn(23, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    by_pass, by_hand = _mlp(), _mlp()
    opt_pass = torch.optim.SGD(adaptation.configure_tent(by_pass), lr=0.2)
    opt_hand = torch.optim.SGD(adaptation.configure_tent(by_hand), lr=0.2)
    got = adaptation.tent_pass(by_pass, x, opt_pass, 5, torch.Generator().manual_seed(1), drop_last=drop_last)
    # the truth: the same permutation (training.minibatches' rule), one step per batch
    order = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    want = torch.full((23, 3), float("nan"), dtype=torch.float64)
    stop = 20 if drop_last else 23
    for start in range(0, stop, 5):
        idx = order[start:start + 5]
        want[idx] = adaptation.tent_step(by_hand, x[idx], opt_hand)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got.isnan().any(dim=1).sum() == (3 if drop_last else 0)
    for p, q in zip(by_pass.parameters(), by_hand.parameters()):
        assert torch.equal(p, q)


def test_pass_refuses_a_bad_batch_size():
    model = _mlp()
    opt = torch.optim.SGD(adaptation.configure_tent(model), lr=0.1)
    x = torch.randn(4, 6, dtype=torch.float64)
    for bad in (5, 2.5, True):
        with pytest.raises(ValueError, match=rf"batch_size must be an integer in \[1, n=4\], got {bad}"):
            adaptation.tent_pass(model, x, opt, bad, torch.Generator())


def test_pass_refuses_a_last_batch_of_one_row_before_any_step():
    # 10 rows in batches of 3: the fourth batch holds one row, which BN in
    # training mode refuses; nothing may have changed by then
    model = _mlp()
    opt = torch.optim.SGD(adaptation.configure_tent(model), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    g_state = g.get_state()
    with pytest.raises(ValueError, match="would end with a batch of one row"):
        adaptation.tent_pass(model, torch.randn(10, 6, dtype=torch.float64), opt, 3, g)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert torch.equal(g.get_state(), g_state)          # nothing drawn either
    logits = adaptation.tent_pass(model, torch.randn(10, 6, dtype=torch.float64), opt, 3, torch.Generator(),
                                  drop_last=True)
    assert logits.isnan().all(dim=1).sum() == 1   # the row left out


# ---------------------------------------------------------------------------
# data.blur_images
# ---------------------------------------------------------------------------


def _blur_by_hand(image):
    # one pass: binomial weights, the border repeated
    side = len(image)
    w = [1, 2, 1]
    out = [[0.0] * side for _ in range(side)]
    for i in range(side):
        for j in range(side):
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    ii = min(max(i + di, 0), side - 1)
                    jj = min(max(j + dj, 0), side - 1)
                    out[i][j] += w[di + 1] * w[dj + 1] * image[ii][jj] / 16
    return out


@pytest.mark.parametrize("passes", [0, 1, 2])
def test_blur_matches_the_weights_by_hand(passes):
    x = torch.randn(3, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    got = data.blur_images(x, passes=passes)
    for row, out in zip(x, got):
        image = row.view(5, 5).tolist()
        for _ in range(passes):
            image = _blur_by_hand(image)
        torch.testing.assert_close(out.view(5, 5), torch.tensor(image, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert got.data_ptr() != x.data_ptr()


def test_blur_keeps_constant_images_and_the_digits_shape():
    assert torch.equal(data.blur_images(torch.full((2, 64), 3.0), passes=3), torch.full((2, 64), 3.0))
    x = data.load_digits_split().x_test[:5]
    assert data.blur_images(x).shape == (5, 64)


@pytest.mark.parametrize("x, passes, match", [
    (torch.zeros(2, 63), 1, r"square images.*\(2, 63\)"),
    (torch.zeros(64), 1, r"square images.*\(64,\)"),
    (torch.zeros(2, 8, 8), 1, r"square images.*\(2, 8, 8\)"),
    (torch.zeros(2, 64), -1, "passes must be an int >= 0, got -1"),
    (torch.zeros(2, 64), 1.0, "passes must be an int >= 0, got 1.0"),
    (torch.zeros(2, 64), True, "passes must be an int >= 0, got True"),
])
def test_blur_refuses_bad_input(x, passes, match):
    with pytest.raises(ValueError, match=match):
        data.blur_images(x, passes=passes)
