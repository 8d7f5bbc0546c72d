"""bnlib.nn.FrozenBatchNorm against the truth: torch's own BatchNorm*d in eval mode.

A frozen layer is the eval-mode map of the BN layer it was made from, whatever
mode it or its model is in, with no parameters to train. The tolerances are
those of tests/helpers.py: float64 agrees to a few ulps (another order of
operations), float32 to ~1e-6 relative.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlib.nn
from bnlib import models, training
from bnlib.fold import bn_scale_shift, fold_model
from bnlib.frozen_batchnorm import FrozenBatchNorm, freezable
from bnlib.landscape import NoisyBatchNorm1d

from helpers import GRAD_TOL, OUT_TOL

SHAPES = {1: (6, 3), 2: (4, 3, 5), 3: (2, 3, 4, 5), 4: (2, 3, 2, 3, 4)}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}
BNLIB_BN = {1: bnlib.nn.BatchNorm1d, 2: bnlib.nn.BatchNorm1d, 3: bnlib.nn.BatchNorm2d, 4: bnlib.nn.BatchNorm3d}


def _trained(bn, shape, dtype, steps=3):
    """A BN layer with running statistics and affine parameters away from their start."""
    g = torch.Generator().manual_seed(7)
    bn = bn.to(dtype).train()
    with torch.no_grad():
        for _ in range(steps):
            bn(3 + 2 * torch.randn(shape, generator=g, dtype=dtype))
        if bn.weight is not None:
            bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=g, dtype=dtype))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g, dtype=dtype))
    return bn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("which", ["torch", "bnlib"])
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_equals_eval_mode_bn_in_every_mode(case, which, affine, dtype):
    shape = SHAPES[case]
    make = (TORCH_BN if which == "torch" else BNLIB_BN)[case]
    bn = _trained(make(3, affine=affine), shape, dtype)
    frozen = FrozenBatchNorm.from_batch_norm(bn)
    x = torch.randn(shape, dtype=dtype)
    expected = bn.eval()(x)
    for mode in (True, False):
        frozen.train(mode)
        torch.testing.assert_close(frozen(x), expected, **OUT_TOL[dtype])
    assert list(frozen.parameters()) == []


def test_input_gradient_equals_eval_mode_bn_and_gradcheck():
    bn = _trained(nn.BatchNorm2d(3), SHAPES[3], torch.float64).eval()
    frozen = FrozenBatchNorm.from_batch_norm(bn)
    x = torch.randn(SHAPES[3], dtype=torch.float64, requires_grad=True)
    dy = torch.randn(SHAPES[3], dtype=torch.float64)
    (dx_bn,) = torch.autograd.grad(bn(x), x, dy)
    (dx_frozen,) = torch.autograd.grad(frozen(x), x, dy)
    torch.testing.assert_close(dx_frozen, dx_bn, **GRAD_TOL[torch.float64])
    assert torch.autograd.gradcheck(frozen, (x,))
    assert torch.autograd.gradgradcheck(frozen, (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_is_computed_in_float32(dtype):
    bn = _trained(nn.BatchNorm2d(3), SHAPES[3], torch.float32).eval()
    frozen = FrozenBatchNorm.from_batch_norm(bn)
    x = torch.randn(SHAPES[3]).to(dtype)
    out = frozen(x)
    assert out.dtype == dtype
    # the float32 map of the same (rounded) input, rounded once
    torch.testing.assert_close(out, bn(x.float()).to(dtype), rtol=0, atol=0)
    # half buffers too (model.half()): the map is still formed in float32
    half = copy.deepcopy(frozen).to(dtype)
    torch.testing.assert_close(half(x).float(), bn(x.float()), **{"rtol": 2e-2, "atol": 2e-2})


def test_output_is_not_a_view_and_in_place_works():
    frozen = FrozenBatchNorm(3)
    x = torch.randn(4, 3)
    out = frozen(x)
    out += 1  # e.g. a residual add after the layer
    torch.testing.assert_close(x + 1, out)  # weight 1, bias 0, mean 0, var 1: the identity up to eps
    assert out.data_ptr() != x.data_ptr()


def test_state_dict_loads_both_ways():
    bn = _trained(nn.BatchNorm1d(3), SHAPES[1], torch.float32)
    frozen = FrozenBatchNorm(3)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    x = torch.randn(SHAPES[1])
    torch.testing.assert_close(frozen(x), bn.eval()(x), **OUT_TOL[torch.float32])
    back = nn.BatchNorm1d(3)
    back.load_state_dict(frozen.state_dict())  # torch fills in num_batches_tracked = 0
    assert int(back.num_batches_tracked) == 0
    torch.testing.assert_close(back.eval()(x), bn(x), **OUT_TOL[torch.float32])


def test_from_batch_norm_copies_and_keeps_device_dtype_eps():
    bn = _trained(nn.BatchNorm1d(3, eps=1e-3), SHAPES[1], torch.float64)
    frozen = FrozenBatchNorm.from_batch_norm(bn)
    assert frozen.eps == 1e-3 and frozen.running_mean.dtype == torch.float64
    assert frozen.running_mean.data_ptr() != bn.running_mean.data_ptr()
    before = frozen.running_mean.clone()
    with torch.no_grad():
        bn.running_mean += 1
    torch.testing.assert_close(frozen.running_mean, before)
    assert repr(frozen) == "FrozenBatchNorm(3, eps=0.001)"


def test_convert_replaces_every_bn_and_training_leaves_them_alone():
    torch.manual_seed(0)
    model = models.make_mlp(8, 16, 4, depth=2, norm="bn", seed=0)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    training.train(model, x, y, steps=5, batch_size=16)
    n_bn = sum(isinstance(m, bnlib.nn.BatchNorm1d) for m in model.modules())
    expected = training.evaluate(model, x, y)
    with torch.no_grad():
        reference = copy.deepcopy(model).eval()(x)
    out = FrozenBatchNorm.convert_frozen_batchnorm(model)
    assert out is model
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm)]
    assert len(frozen) == n_bn == 2
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # in training mode the model now computes what it computed in eval mode
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, **OUT_TOL[torch.float32])
    assert training.evaluate(model, x, y) == pytest.approx(expected, rel=1e-5)
    # a training loop calls model.train(); the frozen statistics do not move
    stats = [m.running_mean.clone() for m in frozen]
    training.train(model, x, y, steps=5, batch_size=2)
    for m, s in zip(frozen, stats):
        torch.testing.assert_close(m.running_mean, s, rtol=0, atol=0)


def test_convert_takes_torch_sync_ghost_and_renorm_and_returns_a_copy_for_a_bn_root():
    bn = _trained(nn.BatchNorm1d(3), SHAPES[1], torch.float32)
    root = FrozenBatchNorm.convert_frozen_batchnorm(bn)
    assert isinstance(root, FrozenBatchNorm)
    model = nn.Sequential(nn.SyncBatchNorm(3), nn.Sequential(bnlib.nn.GhostBatchNorm(3, 2)),
                          bnlib.nn.SyncBatchNorm(3), bnlib.nn.BatchRenorm1d(3))
    FrozenBatchNorm.convert_frozen_batchnorm(model)
    assert [type(m) for m in (model[0], model[1][0], model[2], model[3])] == [FrozenBatchNorm] * 4
    assert not freezable(nn.LayerNorm(3)) and freezable(bnlib.nn.BatchRenorm2d(3))


def test_batch_renorm_freezes_to_its_eval_mode():
    renorm = bnlib.nn.BatchRenorm1d(3)
    for step in range(3):
        renorm(3 + 2 * torch.randn(8, 3))
    x = torch.randn(5, 3)
    torch.testing.assert_close(FrozenBatchNorm.from_batch_norm(renorm)(x), renorm.eval()(x),
                               **OUT_TOL[torch.float32])


def test_convert_keeps_sharing_and_the_training_flag():
    bn = _trained(nn.BatchNorm1d(3), SHAPES[1], torch.float32)
    model = nn.Sequential(bn, nn.ReLU(), bn).eval()
    FrozenBatchNorm.convert_frozen_batchnorm(model)
    assert isinstance(model[0], FrozenBatchNorm) and model[0] is model[2]
    assert not any(m.training for m in model.modules())


def test_fold_takes_a_frozen_layer_in_either_mode():
    model = models.make_mlp(8, 16, 4, depth=2, norm="bn", seed=0)
    model(torch.randn(32, 8))
    model.eval()
    frozen = FrozenBatchNorm.convert_frozen_batchnorm(copy.deepcopy(model))
    x = torch.randn(5, 8)
    folded = fold_model(frozen)
    assert not any(isinstance(m, FrozenBatchNorm) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **OUT_TOL[torch.float32])
    for bn, fz in ((model.norm1, frozen.norm1), (model.norm2, frozen.norm2)):
        fz.train()
        for got, want in zip(bn_scale_shift(fz), bn_scale_shift(bn)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_convert_refuses_a_lazy_layer_before_its_first_input():
    first = nn.BatchNorm1d(3)
    model = nn.Sequential(first, nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match="run one forward pass first"):
        FrozenBatchNorm.convert_frozen_batchnorm(model)
    assert model[0] is first
    model(torch.randn(4, 3))
    FrozenBatchNorm.convert_frozen_batchnorm(model)
    assert isinstance(model[1], FrozenBatchNorm) and model[1].num_features == 3


@pytest.mark.parametrize("bad", [lambda: nn.BatchNorm1d(3, track_running_stats=False),
                                 lambda: NoisyBatchNorm1d(3)], ids=["no-running-stats", "noisy"])
def test_convert_refuses_and_changes_nothing(bad):
    first = nn.BatchNorm1d(3)
    model = nn.Sequential(first, nn.ReLU(), bad())
    with pytest.raises(ValueError, match="cannot be frozen|running statistics"):
        FrozenBatchNorm.convert_frozen_batchnorm(model)
    assert model[0] is first


def test_from_batch_norm_refuses_another_layer():
    with pytest.raises(ValueError, match="expected a batch norm layer"):
        FrozenBatchNorm.from_batch_norm(nn.LayerNorm(3))


@pytest.mark.parametrize("shape", [(3,), (2, 3, 1, 1, 1, 1), (4, 5)], ids=["1d", "6d", "channels"])
def test_bad_input_raises_value_error(shape):
    frozen = FrozenBatchNorm(3)
    with pytest.raises(ValueError, match="FrozenBatchNorm expected"):
        frozen(torch.randn(shape))


def test_integer_input_and_bad_constructor_raise_value_error():
    with pytest.raises(ValueError, match="floating-point"):
        FrozenBatchNorm(3)(torch.ones(4, 3, dtype=torch.int64))
    for kwargs in ({"num_features": 0}, {"num_features": 3, "eps": 0.0}):
        with pytest.raises(ValueError):
            FrozenBatchNorm(**kwargs)


def test_meta_device_then_to_empty_then_reset_parameters_is_the_identity():
    layer = FrozenBatchNorm(3, device="meta").to_empty(device="cpu")
    layer.reset_parameters()
    x = torch.randn(4, 3, 2)
    torch.testing.assert_close(layer(x), x / (1 + layer.eps) ** 0.5)
    assert [k for k, _ in layer.named_buffers()] == ["weight", "bias", "running_mean", "running_var"]
