"""Lazy norm modules (bnlib.nn.LazyBatchNorm*d, LazyInstanceNorm*d) against torch's.

Truth: torch.nn's lazy modules of the same name, fed the same inputs in
float64 (outputs, gradients, running estimates and state dicts must agree to
1e-12, a few roundings of the same sums); the module torch's becomes
(``cls_to_become``) tells which plain bnlib module ours must become.
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy

import bnlib.nn as bnn
from bnlib import adaptation
from bnlib.moving_average import is_batchnorm, precise_bn

CASES = [  # (ours, torch's, the plain bnlib module, a batched input shape)
    (bnn.LazyBatchNorm1d, nn.LazyBatchNorm1d, bnn.BatchNorm1d, (6, 3)),
    (bnn.LazyBatchNorm1d, nn.LazyBatchNorm1d, bnn.BatchNorm1d, (6, 3, 5)),
    (bnn.LazyBatchNorm2d, nn.LazyBatchNorm2d, bnn.BatchNorm2d, (4, 3, 5, 4)),
    (bnn.LazyBatchNorm3d, nn.LazyBatchNorm3d, bnn.BatchNorm3d, (2, 3, 3, 4, 2)),
    (bnn.LazyInstanceNorm1d, nn.LazyInstanceNorm1d, bnn.InstanceNorm1d, (4, 3, 6)),
    (bnn.LazyInstanceNorm2d, nn.LazyInstanceNorm2d, bnn.InstanceNorm2d, (4, 3, 5, 4)),
    (bnn.LazyInstanceNorm3d, nn.LazyInstanceNorm3d, bnn.InstanceNorm3d, (2, 3, 3, 4, 2)),
]
OPTIONS = [
    {},
    {"affine": True, "track_running_stats": True},
    {"affine": False, "track_running_stats": False},
    {"affine": True, "track_running_stats": True, "bias": False, "momentum": None},
    {"affine": True, "track_running_stats": False, "eps": 1e-3},
]
IDS = [f"{c[0].__name__}-{len(c[3])}d" for c in CASES]


def _input(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=gen, dtype=torch.float64) + 1).requires_grad_(True)


def _state(module):
    return {k: v for k, v in module.state_dict().items()}


def _assert_same_state(ours, theirs):
    a, b = _state(ours), _state(theirs)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.filterwarnings("ignore:input's size at dim=1 does not match num_features")  # torch's, affine=False
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
@pytest.mark.parametrize("ours_cls, torch_cls, plain, shape", CASES, ids=IDS)
def test_lazy_module_matches_torch_and_becomes_the_plain_module(ours_cls, torch_cls, plain, shape, options):
    ours = ours_cls(dtype=torch.float64, **options)
    theirs = torch_cls(dtype=torch.float64, **options)
    assert isinstance(ours, LazyModuleMixin) and ours.num_features == 0
    assert _state(ours).keys() == _state(theirs).keys()
    for step in range(3):  # the first call initializes; the others train on
        x = _input(shape, seed=step)
        y_ours, y_theirs = ours(x), theirs(x)
        torch.testing.assert_close(y_ours, y_theirs, rtol=1e-12, atol=1e-12)
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(10 + step), dtype=torch.float64)
        ours_grads = torch.autograd.grad(y_ours, [x] + list(ours.parameters()), dy)
        theirs_grads = torch.autograd.grad(y_theirs, [x] + list(theirs.parameters()), dy)
        for a, b in zip(ours_grads, theirs_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert type(ours) is plain and ours.num_features == shape[1]
    assert not any(is_lazy(t) for t in list(ours.parameters()) + list(ours.buffers()))
    assert all(type(p) is nn.Parameter and p.dtype == torch.float64 for p in ours.parameters())
    _assert_same_state(ours, theirs)
    ours.eval()
    theirs.eval()
    x = _input(shape, seed=9)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ours_cls, torch_cls, plain, shape", CASES, ids=IDS)
def test_state_dicts_load_in_either_direction_before_the_first_call(ours_cls, torch_cls, plain, shape):
    options = {"affine": True, "track_running_stats": True}
    trained = torch_cls(dtype=torch.float64, **options)
    trained(_input(shape, seed=1))  # now a plain torch module with values of its own
    with torch.no_grad():
        trained.weight.uniform_(0.5, 2.0)
        trained.bias.uniform_(-1.0, 1.0)
    ours = ours_cls(dtype=torch.float64, **options)
    ours.load_state_dict(trained.state_dict())
    _assert_same_state(ours, trained)  # the loaded values, not the starting ones...
    x = _input(shape, seed=2)
    torch.testing.assert_close(ours(x), trained(x), rtol=1e-12, atol=1e-12)  # ...kept by the first call
    assert type(ours) is plain
    _assert_same_state(ours, trained)
    # and back: ours, initialized, into a lazy torch module
    back = torch_cls(dtype=torch.float64, **options)
    back.load_state_dict(ours.state_dict())
    _assert_same_state(back, ours)


def test_a_partly_loaded_state_keeps_what_was_loaded():
    trained = nn.BatchNorm1d(4, dtype=torch.float64)
    with torch.no_grad():
        trained.weight.fill_(3.0)
    ours = bnn.LazyBatchNorm1d(dtype=torch.float64)
    ours.load_state_dict({"weight": trained.weight}, strict=False)
    ours(_input((5, 4), seed=0))
    assert torch.equal(ours.weight.detach(), torch.full((4,), 3.0, dtype=torch.float64))
    assert torch.equal(ours.bias.detach(), torch.zeros(4, dtype=torch.float64))
    assert ours.num_batches_tracked.item() == 1


@pytest.mark.parametrize("ours_cls, x, match", [
    (bnn.LazyBatchNorm1d, torch.randn(5), r"LazyBatchNorm1d expected 2D or 3D input \(got 1D input\)"),
    (bnn.LazyBatchNorm2d, torch.randn(2, 3, 4), r"LazyBatchNorm2d expected 4D input \(got 3D input\)"),
    (bnn.LazyBatchNorm1d, torch.ones(4, 3, dtype=torch.int64), "LazyBatchNorm1d.*floating"),
    (bnn.LazyBatchNorm1d, torch.randn(1, 3), r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 3\]\)"),
    (bnn.LazyBatchNorm3d, torch.randn(1, 2, 1, 1, 1), "Expected more than 1 value per channel when training"),
    (bnn.LazyInstanceNorm1d, torch.randn(5), r"LazyInstanceNorm1d expected 2D or 3D input \(got 1D input\)"),
    (bnn.LazyInstanceNorm2d, torch.randn(2, 3, 1, 1), "Expected more than 1 spatial element when training"),
    (bnn.LazyInstanceNorm1d, torch.ones(2, 3, 4, dtype=torch.int32), "LazyInstanceNorm1d.*floating"),
    # another device (meta standing in for a GPU): refused before the tensors are made
    (bnn.LazyBatchNorm1d, torch.randn(4, 3, device="meta"), "same device.*input on meta"),
    (bnn.LazyInstanceNorm2d, torch.randn(2, 3, 4, 4, device="meta"), "same device.*input on meta"),
])
def test_a_bad_first_input_raises_and_leaves_the_module_lazy(ours_cls, x, match):
    module = ours_cls(affine=True, track_running_stats=True)
    before = repr(module)
    with pytest.raises(ValueError, match=match):
        module(x)
    assert type(module) is ours_cls and module.num_features == 0
    assert all(is_lazy(t) for t in (module.weight, module.bias, module.running_mean, module.running_var))
    assert module.num_batches_tracked.item() == 0
    assert repr(module) == before
    good = {1: (4, 3), 2: (4, 3, 2, 2), 3: (2, 3, 2, 2, 2)}
    dims = int(ours_cls.__name__[-2])
    module(torch.randn(good[dims] if "Batch" in ours_cls.__name__ else (2, 3) + (4,) * dims))
    assert module.num_features == 3  # it still initializes from the next, good input


def test_a_first_input_that_does_not_match_the_loaded_state_raises():
    module = bnn.LazyBatchNorm1d()
    module.load_state_dict(nn.BatchNorm1d(4).state_dict())
    with pytest.raises(ValueError, match=r"loaded tensors to have shape \(C,\) for the first input's C = 3.*"
                                         r"weight \(4,\)"):
        module(torch.randn(5, 3))
    assert type(module) is bnn.LazyBatchNorm1d and module.num_features == 0
    module(torch.randn(5, 4))
    assert type(module) is bnn.BatchNorm1d and module.num_features == 4


@pytest.mark.parametrize("state", [
    {"weight": torch.ones(4), "bias": torch.zeros(5)},       # two lengths
    {"weight": torch.ones(4, 1), "bias": torch.zeros(4)},    # not 1-D
    {"weight": torch.tensor(1.0), "bias": torch.zeros(4)},   # 0-D
])
def test_loaded_tensors_must_all_be_one_channel_vector(state):
    module = bnn.LazyBatchNorm1d()
    module.load_state_dict(state, strict=False)
    with pytest.raises(ValueError, match="loaded tensors to have shape"):
        module(torch.randn(5, 4))
    assert type(module) is bnn.LazyBatchNorm1d and module.num_features == 0


@pytest.mark.parametrize("make, x", [
    (lambda: bnn.LazyBatchNorm1d(), torch.randn(1, 3)),                       # one sample: fine in eval
    (lambda: bnn.LazyBatchNorm2d(track_running_stats=False), None),
    (lambda: bnn.LazyInstanceNorm2d(), torch.randn(2, 3, 1, 1)),              # one position, running stats
])
def test_an_eval_mode_first_call_initializes_and_stays_in_eval_mode(make, x):
    module = make().eval()
    if x is None:
        x = torch.randn(4, 3, 2, 2)
    y = module(x)
    assert not module.training and module.num_features == 3 and y.shape == x.shape
    if module.track_running_stats:
        assert module.num_batches_tracked.item() == 0
        assert torch.equal(module.running_mean, torch.zeros(3)) and torch.equal(module.running_var, torch.ones(3))


def test_an_eval_mode_instance_norm_without_running_stats_still_needs_two_positions():
    module = bnn.LazyInstanceNorm2d(track_running_stats=False).eval()
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        module(torch.randn(2, 3, 1, 1))
    assert type(module) is bnn.LazyInstanceNorm2d and module.num_features == 0


@pytest.mark.parametrize("call", [
    lambda m: bnn.SyncBatchNorm.convert_sync_batchnorm(m),
    lambda m: adaptation.configure_tent(m),
    lambda m: precise_bn(m, [torch.randn(4, 3)]),
], ids=["convert_sync_batchnorm", "configure_tent", "precise_bn"])
def test_bnlib_tools_refuse_a_lazy_layer_before_changing_anything(call):
    model = nn.Sequential(bnn.BatchNorm1d(3), nn.Linear(3, 3), bnn.LazyBatchNorm1d()).eval()
    with pytest.raises(ValueError, match="LazyBatchNorm1d that has not seen an input yet"):
        call(model)
    assert [type(m) for m in model] == [bnn.BatchNorm1d, nn.Linear, bnn.LazyBatchNorm1d]
    assert not model.training and model[1].weight.requires_grad
    assert torch.equal(model[0].running_mean, torch.zeros(3)) and model[0].num_batches_tracked.item() == 0


def test_an_unbatched_first_input_counts_its_channels_on_axis_0():
    module = bnn.LazyInstanceNorm1d(affine=True)
    module(torch.randn(3, 6))  # (C, L)
    assert type(module) is bnn.InstanceNorm1d and module.num_features == 3 and module.weight.shape == (3,)


def test_without_tensors_to_create_num_features_is_still_inferred():
    module = bnn.LazyBatchNorm2d(affine=False, track_running_stats=False)
    module(torch.randn(4, 5, 3, 3))
    assert module.num_features == 5
    with pytest.raises(ValueError, match="5"):  # the plain module checks the channel count from then on
        module(torch.randn(4, 6, 3, 3))


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": 0.0}, "eps"),
    ({"eps": -1e-5}, "eps"),
    ({"momentum": 1.5}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
])
@pytest.mark.parametrize("ours_cls", [bnn.LazyBatchNorm1d, bnn.LazyInstanceNorm2d])
def test_constructor_refuses_what_the_plain_module_refuses(ours_cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ours_cls(**kwargs)


def test_dtype_and_device_moves_before_the_first_call():
    module = bnn.LazyBatchNorm2d().double()
    module(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    assert module.weight.dtype == torch.float64 and module.running_mean.dtype == torch.float64
    module = bnn.LazyBatchNorm1d(device="cpu", dtype=torch.float32)
    module(torch.randn(4, 3))
    assert module.running_var.device.type == "cpu" and module.running_var.dtype == torch.float32


def test_torch_tools_see_a_batch_norm():
    module = bnn.LazyBatchNorm2d()
    assert isinstance(module, nn.modules.batchnorm._BatchNorm) and is_batchnorm(module)
    assert repr(module).startswith("LazyBatchNorm2d(0,")
    module(torch.randn(2, 3, 2, 2))
    copied = copy.deepcopy(module)  # (before the first call neither torch's nor ours copies)
    assert type(copied) is bnn.BatchNorm2d and torch.equal(copied.running_mean, module.running_mean)


@pytest.mark.parametrize("ours_cls, torch_cls", [(bnn.LazyBatchNorm1d, nn.LazyBatchNorm1d),
                                                 (bnn.LazyInstanceNorm2d, nn.LazyInstanceNorm2d)])
def test_reset_parameters_before_the_first_call_does_nothing(ours_cls, torch_cls):
    ours, theirs = ours_cls(), torch_cls()
    ours.reset_parameters()  # torch's lazy modules allow it: nothing to reset yet
    theirs.reset_parameters()
    assert ours.num_features == 0 and is_lazy(ours.weight) and is_lazy(ours.running_mean)
