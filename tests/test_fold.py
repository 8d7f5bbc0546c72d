"""bnlib.fold: the folded layer against the unfolded pair (layer, then eval-mode BN).

The truth is the model before folding, run by torch's own layers (and
torch.nn.BatchNorm*d or bnlib.nn.BatchNorm*d in eval mode).
Tolerances: float64 folds and runs in the same precision, so outputs agree to
~1e-15 relative; 1e-10 leaves room for the different summation order. float32
stores the folded weights rounded to float32 and sums in another order:
a few ulps of values of order 1-10, so 1e-4 absolute.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import bnlib.nn
from bnlib.fold import bn_scale_shift, fold_bn, fold_model
from bnlib.models import make_mlp

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
BN = {
    ("torch", 1): nn.BatchNorm1d, ("torch", 2): nn.BatchNorm2d, ("torch", 3): nn.BatchNorm3d,
    ("bnlib", 1): bnlib.nn.BatchNorm1d, ("bnlib", 2): bnlib.nn.BatchNorm2d, ("bnlib", 3): bnlib.nn.BatchNorm3d,
}


def _trained_bn(bn, x, steps=3):
    """Give a BN layer non-trivial running stats and affine parameters, then eval mode."""
    g = torch.Generator().manual_seed(1)
    bn.train()
    with torch.no_grad():
        for _ in range(steps):
            bn(x + torch.randn(x.shape, generator=g, dtype=x.dtype))
        if bn.weight is not None:
            bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=g, dtype=x.dtype))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g, dtype=x.dtype))
    return bn.eval()


def _check_fold(layer, bn, x, dtype):
    with torch.no_grad():
        _trained_bn(bn, layer(x))
        expected = bn(layer(x))
        state = copy.deepcopy((layer.state_dict(), bn.state_dict()))
        folded = fold_bn(layer, bn)
        got = folded(x)
    assert type(folded) is type(layer)
    assert folded.weight.dtype == dtype and folded.bias is not None
    torch.testing.assert_close(got, expected, **TOL[dtype])
    # the inputs are untouched
    for a, b in zip(state, (layer.state_dict(), bn.state_dict())):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("impl", ["torch", "bnlib"])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_linear(dtype, impl, bias):
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=bias, dtype=dtype)
    x = 3.0 + 2.0 * torch.randn(20, 6, dtype=dtype)
    _check_fold(layer, BN[impl, 1](4, dtype=dtype), x, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("impl", ["torch", "bnlib"])
@pytest.mark.parametrize(
    "d, kwargs",
    [
        (1, dict(kernel_size=3, padding=1)),
        (2, dict(kernel_size=3, stride=2, padding=1, bias=False)),
        (2, dict(kernel_size=(3, 1), groups=2, dilation=(1, 2))),
        (3, dict(kernel_size=2, bias=True)),
    ],
)
def test_fold_conv(dtype, impl, d, kwargs):
    torch.manual_seed(0)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d](4, 6, dtype=dtype, **kwargs)
    x = 1.0 + torch.randn((3, 4) + (7,) * d, dtype=dtype)
    _check_fold(conv, BN[impl, d](6, dtype=dtype), x, dtype)


def test_fold_without_affine_and_formula():
    # affine=False: scale = 1/sqrt(var + eps), shift = -mean * scale (closed form).
    bn = nn.BatchNorm1d(3, affine=False, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0], dtype=torch.float64))
    bn.eval()
    scale, shift = bn_scale_shift(bn)
    expected_scale = 1 / torch.sqrt(torch.tensor([4.0, 0.25, 1.0], dtype=torch.float64) + 1e-5)
    torch.testing.assert_close(scale, expected_scale, rtol=1e-15, atol=0)
    torch.testing.assert_close(shift, -torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * expected_scale)
    lin = nn.Linear(2, 3, dtype=torch.float64)
    _check_fold(lin, bn.train(), torch.randn(5, 2, dtype=torch.float64), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fold_model_mlp(dtype):
    torch.manual_seed(0)
    model = make_mlp(8, 16, 3, depth=3, norm="bn", seed=0).to(dtype)
    x = 2.0 + torch.randn(64, 8, dtype=dtype)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):                      # parameters and running stats away from their start
        opt.zero_grad()
        model(x + torch.randn_like(x)).square().mean().backward()
        opt.step()
    model.eval()
    before = copy.deepcopy(model.state_dict())
    folded = fold_model(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[dtype])
    assert [n for n, _ in folded.named_children()] == ["fc1", "act1", "fc2", "act2", "fc3", "act3", "out"]
    assert not any(isinstance(m, (nn.BatchNorm1d, bnlib.nn.BatchNorm1d)) for m in folded.modules())
    for k, v in model.state_dict().items():  # the original model is unchanged
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert isinstance(model.norm1, bnlib.nn.BatchNorm1d)


def test_fold_model_nested_and_unfoldable_bn():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.BatchNorm2d(3),                            # first: nothing to fold into
                nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                nn.Sequential(nn.Conv2d(5, 4, 3), bnlib.nn.BatchNorm2d(4)),
                nn.ReLU(), nn.BatchNorm2d(4),                 # after an activation: kept
            )
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    net = Net()
    x = torch.randn(6, 3, 9, 9)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(x + torch.randn_like(x))
    net.eval()
    folded = fold_model(net)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)
    kinds = [type(m).__name__ for m in folded.features]
    assert kinds == ["BatchNorm2d", "Conv2d", "ReLU", "Sequential", "ReLU", "BatchNorm2d"]
    assert [type(m).__name__ for m in folded.features[3]] == ["Conv2d"]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (nn.Linear(3, 4), nn.BatchNorm1d(4)), "training mode"),
        (lambda: (nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False).eval()), "running statistics"),
        (lambda: (nn.Linear(3, 4), bnlib.nn.BatchNorm1d(5).eval()), "5 channels .* 4 output channels"),
        (lambda: (nn.ConvTranspose2d(3, 4, 2), nn.BatchNorm2d(4).eval()), "got ConvTranspose2d"),
        (lambda: (nn.ReLU(), nn.BatchNorm1d(4).eval()), "got ReLU"),
        (lambda: (nn.Linear(3, 4), nn.LayerNorm(4)), "batch norm layer"),
    ],
)
def test_fold_bn_bad_input(make, match):
    layer, bn = make()
    before = copy.deepcopy((layer.state_dict(), bn.state_dict()))
    with pytest.raises(ValueError, match=match):
        fold_bn(layer, bn)
    for a, b in zip(before, (layer.state_dict(), bn.state_dict())):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_fold_model_bad_input():
    model = make_mlp(4, 5, 2, depth=2, norm="bn", seed=0)
    with pytest.raises(ValueError, match="eval mode"):
        fold_model(model)                   # a new model is in training mode
    model.eval()
    model.norm2.train()                     # one BN left in training mode
    with pytest.raises(ValueError, match="norm2"):
        fold_model(model)
    with pytest.raises(ValueError, match="expected an nn.Module"):
        fold_model("not a model")
    bad = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="running statistics"):
        fold_model(bad)


def test_fold_model_keeps_sequential_subclasses():
    class Scaled(nn.Sequential):            # a Sequential subclass with its own forward
        def forward(self, x):
            return 2.0 * super().forward(x)

    torch.manual_seed(0)
    model = Scaled(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3))
    model.eval()
    folded = fold_model(model)
    assert type(folded) is Scaled and len(folded) == 2
    x = torch.randn(5, 3)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[torch.float32])


def test_fold_refuses_what_it_cannot_fold_exactly():
    """NoisyBatchNorm1d's eval output is BN's times a factor the fold would
    drop; a parametrized weight (weight or spectral norm) cannot be replaced."""
    from bnlib import landscape

    noisy = landscape.NoisyBatchNorm1d(4, seed=0)
    noisy(torch.randn(16, 4))
    noisy.eval()
    with pytest.raises(ValueError, match="cannot be folded"):
        fold_bn(nn.Linear(3, 4), noisy)
    bn = bnlib.nn.BatchNorm1d(4).eval()
    for parametrized in (nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)),
                         nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4))):
        with pytest.raises(ValueError, match="parametrized"):
            fold_bn(parametrized, bn)
    # torch's older hook-based versions recompute the weight before every call
    for make, name in ((nn.utils.weight_norm, "weight_norm"), (nn.utils.spectral_norm, "spectral_norm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # (deprecated in torch)
            hooked = make(nn.Linear(3, 4))
        with pytest.raises(ValueError, match=f"hook-based {name}: remove it first"):
            fold_bn(hooked, bn)
        with pytest.raises(ValueError, match=f"hook-based {name}"):
            fold_model(nn.Sequential(hooked, bn).eval())
    with pytest.raises(ValueError, match="lazy one that has not seen an input yet"):
        fold_bn(nn.LazyLinear(4), bn)


def test_fold_takes_batch_renorm_whose_eval_mode_is_bns():
    layer = nn.Linear(5, 4).double()
    renorm = bnlib.nn.BatchRenorm1d(4).double()
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        renorm(layer(torch.randn(16, 5, generator=g, dtype=torch.float64)))
    renorm.eval()
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fold_bn(layer, renorm)(x), renorm(layer(x)), **TOL[torch.float64])


def test_torch_ao_fuse_modules_with_the_readme_s_mapping():
    """torch's quantization fuser looks bnlib's layer up by exact type; the
    mapping the README gives makes it fuse conv, BN and ReLU."""
    from torch.ao.quantization import fuse_modules
    from torch.ao.quantization.fuser_method_mappings import fuse_conv_bn_relu

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnlib.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    mapping = {(torch.nn.Conv2d, bnlib.nn.BatchNorm2d, torch.nn.ReLU): fuse_conv_bn_relu}
    fused = fuse_modules(model, [["0", "1", "2"]],
                         fuse_custom_config_dict={"additional_fuser_method_mapping": mapping})
    assert isinstance(fused[1], torch.nn.Identity)
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["negative running_var", "eps"])
def test_fold_refuses_statistics_that_give_nan_weights(change):
    bn = bnlib.nn.BatchNorm1d(3).eval()
    if change == "eps":
        bn.eps = -2.0
    else:
        with torch.no_grad():
            bn.running_var[1] = -1.0
    with pytest.raises(ValueError, match=r"running_var \+ eps > 0 in every channel"):
        fold_bn(nn.Linear(2, 3), bn)
