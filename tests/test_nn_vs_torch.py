"""bnlib.nn.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d (the truth).

The contract: a drop-in replacement with the same constructor, parameters,
buffers, state dict, outputs, gradients and running statistics, in train and
eval mode, including the empty batch.  Tolerances are in helpers.py
(OUT_TOL, GRAD_TOL, STAT_TOL) with their reasons; num_batches_tracked and
None-ness of buffers must match exactly.
"""

from __future__ import annotations

import copy
import inspect
import io

import numpy as np
import pytest
import torch

import bnlib.nn
from helpers import (
    GRAD_TOL,
    OUT_TOL,
    SHAPES,
    STAT_TOL,
    assert_close,
    assert_same_buffers,
    bnlib_bn_class,
    dim_of_shape,
    random_affine,
    random_input,
    set_affine,
    torch_bn_class,
)

# Every test here runs on both CPU paths: the fused kernels and the tensor ops.
pytestmark = pytest.mark.usefixtures("each_cpu_path")

DTYPES = [torch.float32, torch.float64]

CONFIGS = [
    dict(),
    dict(affine=False),
    dict(bias=False),
    dict(momentum=0.5),
    dict(momentum=None),
    dict(track_running_stats=False),
    dict(affine=False, momentum=None),
    dict(momentum=None, bias=False, eps=1e-3),
    dict(momentum=0.5, track_running_stats=False, affine=False),
]


def _cfg_id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items()) or "default"


ALL_SHAPES = [s for d in (1, 2, 3) for s in SHAPES[d]]


def make_pair(d, c, dtype, seed=0, **kw):
    """A torch module and a bnlib module with identical (random) affine params."""
    ref = torch_bn_class(d)(c, dtype=dtype, **kw)
    ours = bnlib_bn_class(d)(c, dtype=dtype, **kw)
    w, b = random_affine(c, dtype, seed=seed + 100)
    set_affine(ref, w, b)
    set_affine(ours, w, b)
    return ours, ref


def _params(m):
    return {n: p for n, p in m.named_parameters()}


def step_and_compare(ours, ref, x, dtype, seed, what, lr=0.1):
    """One forward + backward on both modules; compare output, grads, buffers,
    then take the same SGD step on both (so later steps see changed params)."""
    xo = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    yo = ours(xo)
    yr = ref(xr)
    assert yo.dtype == yr.dtype, f"{what}: output dtype {yo.dtype} vs torch {yr.dtype}"
    assert yo.shape == yr.shape
    assert_close(yo, yr, OUT_TOL[dtype], f"{what}: output")
    g = random_input(yr.shape, dtype, seed=seed + 7, spread=False)
    (yo * g).sum().backward()
    (yr * g).sum().backward()
    assert_close(xo.grad, xr.grad, GRAD_TOL[dtype], f"{what}: input grad")
    po, pr = _params(ours), _params(ref)
    assert sorted(po) == sorted(pr), f"{what}: parameters {sorted(po)} vs torch {sorted(pr)}"
    for n in pr:
        assert po[n].grad is not None, f"{what}: {n}.grad is None"
        assert_close(po[n].grad, pr[n].grad, GRAD_TOL[dtype], f"{what}: {n}.grad")
    assert_same_buffers(ours, ref, dtype)
    with torch.no_grad():
        for n in pr:
            pr[n] -= lr * pr[n].grad
            po[n] -= lr * po[n].grad
            pr[n].grad = None
            po[n].grad = None


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=str)
def test_train_eval_steps_match_torch(shape, dtype, cfg):
    """3 training steps on different batches, 2 eval steps, 1 more training step."""
    d = dim_of_shape(shape)
    c = shape[1]
    ours, ref = make_pair(d, c, dtype, **cfg)
    for step in range(3):
        x = random_input(shape, dtype, seed=10 * step + 1)
        step_and_compare(ours, ref, x, dtype, seed=step, what=f"train step {step}")
    assert ours.eval() is ours
    ref.eval()
    assert ours.training is False
    for step in range(2):
        # eval batches deliberately off the training distribution
        x = random_input(shape, dtype, seed=100 + step) * 2.0 + 1.0
        step_and_compare(ours, ref, x, dtype, seed=50 + step, what=f"eval step {step}")
    assert ours.train() is ours
    ref.train()
    assert ours.training is True
    x = random_input(shape, dtype, seed=999)
    step_and_compare(ours, ref, x, dtype, seed=99, what="train again")


@pytest.mark.parametrize("momentum", [0.1, None], ids=str)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_varying_batch_sizes(d, momentum):
    """Different N per step (cumulative average weights batches, not samples)."""
    dtype = torch.float64
    ours, ref = make_pair(d, 3, dtype, momentum=momentum)
    tail = {1: (4,), 2: (2, 3), 3: (2, 1, 3)}[d]
    for i, n in enumerate([2, 7, 3, 5]):
        x = random_input((n, 3) + tail, dtype, seed=i)
        step_and_compare(ours, ref, x, dtype, seed=i, what=f"N={n}")


@pytest.mark.parametrize("d", [1, 2, 3])
def test_eval_without_running_stats_uses_batch_stats(d):
    """track_running_stats=False: eval normalizes with the batch's own stats."""
    dtype = torch.float64
    shape = {1: (6, 3), 2: (4, 3, 2, 3), 3: (3, 3, 2, 2, 2)}[d]
    ours, ref = make_pair(d, 3, dtype, track_running_stats=False)
    ours.eval()
    ref.eval()
    x = random_input(shape, dtype, seed=3) * 5 + 7
    y = ours(x)
    assert_close(y, ref(x), OUT_TOL[dtype], "eval, untracked")
    # and that is batch normalization: with the default weight=1/bias=0 the
    # per-channel mean is 0 (closed form; atol for float64 rounding)
    plain = bnlib_bn_class(d)(3, dtype=dtype, track_running_stats=False).eval()
    z = plain(x)
    dims = [i for i in range(z.dim()) if i != 1]
    torch.testing.assert_close(z.mean(dims), torch.zeros(3, dtype=dtype), atol=1e-12, rtol=0)


@pytest.mark.parametrize("make", ["1d", "2d", "3d", "sync"])
def test_eval_after_tracking_is_switched_off_keeps_using_the_running_stats(make):
    """A trained layer, then .eval() and track_running_stats = False with the
    buffers kept: torch normalizes with the running statistics (they exist),
    and so must bnlib; nothing is updated. (A mutation that keyed this on
    track_running_stats alone raised "needs running_mean" and no test saw.)"""
    d = {"1d": 1, "2d": 2, "3d": 3, "sync": 2}[make]
    shape = {1: (6, 3), 2: (4, 3, 2, 3), 3: (3, 3, 2, 2, 2)}[d]
    dtype = torch.float64
    ours = (bnlib.nn.SyncBatchNorm(3, dtype=dtype) if make == "sync" else bnlib_bn_class(d)(3, dtype=dtype))
    ref = torch_bn_class(d)(3, dtype=dtype)
    ref.load_state_dict(ours.state_dict())
    x = random_input(shape, dtype, seed=4) * 3 + 2
    for layer in (ours, ref):
        layer(x)
        layer.eval()
        layer.track_running_stats = False
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x2 = random_input(shape, dtype, seed=5) * 2 - 1
    assert_close(ours(x2), ref(x2), OUT_TOL[dtype], "eval after tracking is switched off")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_eval_output_backpropagates_after_a_training_step_of_the_same_layer(dtype):
    """A teacher branch in eval mode, a student branch in training, one
    backward: the training call updates the running estimates in place,
    which the eval call's backward must not depend on (it raised "modified
    by an inplace operation"). Its gradients are those of the map the eval
    call applied, the running estimates of that moment. (torch's own op
    reads the updated buffers instead, so its dgamma differs here.)"""
    layer = bnlib.nn.BatchNorm2d(4, dtype=dtype)
    set_affine(layer, *random_affine(4, dtype, seed=1))
    layer.running_mean.normal_()
    layer.running_var.uniform_(0.5, 2.0)
    frozen = copy.deepcopy(layer).eval()
    x = random_input((3, 4, 2, 2), dtype, seed=2).requires_grad_()
    y = layer.eval()(x)
    layer.train()(random_input((3, 4, 2, 2), dtype, seed=3) * 3 + 1)
    y.sum().backward()
    expected_x = x.detach().clone().requires_grad_()
    frozen(expected_x).sum().backward()
    for got, want in [(x.grad, expected_x.grad), (layer.weight.grad, frozen.weight.grad),
                      (layer.bias.grad, frozen.bias.grad)]:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_training_under_no_grad_updates_stats():
    """torch.no_grad() in train mode still normalizes with batch stats and updates buffers."""
    dtype = torch.float32
    ours, ref = make_pair(2, 3, dtype)
    x = random_input((4, 3, 2, 2), dtype, seed=1)
    with torch.no_grad():
        yo, yr = ours(x), ref(x)
    assert_close(yo, yr, OUT_TOL[dtype], "no_grad output")
    assert_same_buffers(ours, ref, dtype)


def test_training_under_inference_mode():
    """torch.inference_mode() in train mode: same output and buffer update as torch."""
    dtype = torch.float32
    ours, ref = make_pair(1, 3, dtype)
    x = random_input((5, 3, 4), dtype, seed=2)
    with torch.inference_mode():
        yo, yr = ours(x), ref(x)
    assert_close(yo, yr, OUT_TOL[dtype], "inference_mode output")
    assert_same_buffers(ours, ref, dtype)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_non_contiguous_input(layout):
    """Strided inputs give the same results as torch (stats are over every axis but 1)."""
    dtype = torch.float64
    base = random_input((4, 3, 5, 6), dtype, seed=2)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = base.transpose(2, 3)
    else:
        x = base[:, :, ::2, 1::2]
    assert not x.is_contiguous()
    ours, ref = make_pair(2, 3, dtype)
    step_and_compare(ours, ref, x, dtype, seed=5, what=layout)


# --------------------------------------------------------------------------
# Empty batch: whatever torch 2.13 does (output of the same empty shape, the
# running mean/var untouched, num_batches_tracked incremented, zero grads for
# weight and bias), bnlib does too.
# --------------------------------------------------------------------------
EMPTY_SHAPES = [(0, 3), (0, 3, 4), (2, 3, 0), (0, 3, 2, 2), (2, 3, 0, 2), (0, 3, 2, 1, 2)]


EMPTY_CFGS = [dict(), dict(momentum=None), dict(track_running_stats=False), dict(affine=False)]


def _empty_setup(shape, cfg):
    dtype = torch.float32
    ours, ref = make_pair(dim_of_shape(shape), 3, dtype, **cfg)
    # one normal step first (no zero sizes) so the running stats are not the initial values
    x0 = random_input((4, 3) + tuple(max(s, 2) for s in shape[2:]), dtype, seed=0)
    step_and_compare(ours, ref, x0, dtype, seed=0, what="first step")
    return ours, ref, dtype


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cfg", EMPTY_CFGS, ids=_cfg_id)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_batch_forward_like_torch(shape, cfg, mode):
    """Output shape/dtype and running statistics (num_batches_tracked too) as torch."""
    ours, ref, dtype = _empty_setup(shape, cfg)
    getattr(ours, mode)()
    getattr(ref, mode)()
    x = torch.zeros(shape, dtype=dtype)
    yr = ref(x)
    yo = ours(x)
    assert yo.shape == yr.shape, f"{mode}: empty output shape {yo.shape} vs torch {yr.shape}"
    assert yo.dtype == yr.dtype
    assert_same_buffers(ours, ref, dtype)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cfg", EMPTY_CFGS, ids=_cfg_id)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_batch_backward_like_torch(shape, cfg, mode):
    """Backward through an empty batch: an empty input grad, and weight/bias
    grads exactly torch's (zeros: a sum over no elements), not NaN."""
    ours, ref, dtype = _empty_setup(shape, cfg)
    getattr(ours, mode)()
    getattr(ref, mode)()
    x = torch.zeros(shape, dtype=dtype)
    xo = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    ref(xr).sum().backward()
    ours(xo).sum().backward()
    assert xo.grad is not None and xo.grad.shape == xr.grad.shape
    for n, pr in _params(ref).items():
        po = _params(ours)[n]
        if pr.grad is None:
            assert po.grad is None or torch.count_nonzero(po.grad) == 0
        else:
            assert po.grad is not None, f"{mode}: {n}.grad is None, torch gives {pr.grad}"
            assert torch.equal(po.grad, pr.grad), f"{mode}: {n}.grad {po.grad} vs torch {pr.grad}"


# --------------------------------------------------------------------------
# Constructor, parameters, buffers
# --------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 3])
def test_constructor_signature_matches_torch(d):
    """Names, defaults and kinds of the __init__ parameters (annotations ignored)."""
    sig_t = inspect.signature(torch_bn_class(d).__init__)
    sig_o = inspect.signature(bnlib_bn_class(d).__init__)
    simple = lambda sig: [(p.name, p.kind, p.default) for p in sig.parameters.values()]  # noqa: E731
    assert simple(sig_o) == simple(sig_t)


CTOR_CONFIGS = [
    dict(),
    dict(affine=False),
    dict(bias=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False),
    dict(bias=False, track_running_stats=False),
]


@pytest.mark.parametrize("cfg", CTOR_CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_parameters_buffers_and_state_dict_keys(d, cfg):
    ref = torch_bn_class(d)(5, **cfg)
    ours = bnlib_bn_class(d)(5, **cfg)
    p_t = {n: (p.dtype, tuple(p.shape)) for n, p in ref.named_parameters()}
    p_o = {n: (p.dtype, tuple(p.shape)) for n, p in ours.named_parameters()}
    assert p_o == p_t
    b_t = {n: (b.dtype, tuple(b.shape)) for n, b in ref.named_buffers()}
    b_o = {n: (b.dtype, tuple(b.shape)) for n, b in ours.named_buffers()}
    assert b_o == b_t
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        t = getattr(ref, name)
        o = getattr(ours, name)
        if t is None:
            assert o is None, f"{name} should be None like torch's"
        else:
            assert o is not None and torch.equal(o, t), f"{name} initial value {o} vs torch {t}"
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    if ref.num_batches_tracked is not None:
        assert ours.num_batches_tracked.dtype == torch.long


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, None], ids=str)
def test_device_dtype_kwargs(device, dtype):
    ref = torch.nn.BatchNorm2d(4, device=device, dtype=dtype)
    ours = bnlib.nn.BatchNorm2d(4, device=device, dtype=dtype)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(ours, name).dtype == getattr(ref, name).dtype, name
        assert getattr(ours, name).device == getattr(ref, name).device, name
    x = random_input((3, 4, 2, 2), dtype or torch.float32, seed=0)
    assert ours(x).dtype == ref(x).dtype


@pytest.mark.parametrize(
    "kw",
    [dict(num_features=np.int64(4)), dict(num_features=4, eps=np.float32(1e-3)), dict(num_features=4, momentum=np.float32(0.25))],
    ids=["np.int64-num_features", "np.float32-eps", "np.float32-momentum"],
)
def test_constructor_accepts_numpy_scalars_like_torch(kw):
    """torch.nn.BatchNorm2d takes NumPy scalars for its numeric arguments (a
    size read off an array, a hyper-parameter from a NumPy grid); a drop-in does too."""
    ref = torch.nn.BatchNorm2d(**kw)
    ours = bnlib.nn.BatchNorm2d(**kw)
    x = random_input((3, 4, 2, 2), torch.float32, seed=0)
    assert_close(ours(x), ref(x), OUT_TOL[torch.float32], "output")
    assert_same_buffers(ours, ref, torch.float32)


@pytest.mark.parametrize("cfg", [dict(), dict(affine=False), dict(track_running_stats=False)], ids=_cfg_id)
def test_repr_does_not_crash(cfg):
    m = bnlib.nn.BatchNorm2d(3, **cfg)
    assert isinstance(repr(m), str)
    assert isinstance(str(torch.nn.Sequential(m)), str)
    assert isinstance(m.extra_repr(), str)


def _trained_pair(d, c, dtype, steps=3, **cfg):
    ours, ref = make_pair(d, c, dtype, **cfg)
    shape = {1: (5, c, 3), 2: (4, c, 3, 2), 3: (3, c, 2, 2, 2)}[d]
    for s in range(steps):
        step_and_compare(ours, ref, random_input(shape, dtype, seed=s), dtype, seed=s, what=f"warm-up {s}")
    return ours, ref, shape


SD_CONFIGS = [dict(), dict(affine=False), dict(bias=False), dict(track_running_stats=False), dict(momentum=None)]


@pytest.mark.parametrize("direction", ["torch->bnlib", "bnlib->torch"])
@pytest.mark.parametrize("cfg", SD_CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_state_dict_loads_both_ways(d, cfg, direction):
    """A trained module's state dict loads (strict=True) into a fresh module of
    the other library, which then gives the same outputs in eval and train."""
    dtype = torch.float64
    ours, ref, shape = _trained_pair(d, 4, dtype, **cfg)
    src, dst = (ref, bnlib_bn_class(d)(4, dtype=dtype, **cfg)) if direction == "torch->bnlib" else (
        ours,
        torch_bn_class(d)(4, dtype=dtype, **cfg),
    )
    result = dst.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    x = random_input(shape, dtype, seed=77) + 0.5
    for mode in ("eval", "train"):
        getattr(src, mode)()
        getattr(dst, mode)()
        assert_close(dst(x), src(x), OUT_TOL[dtype], f"{direction} {mode}")
        assert_same_buffers(dst, src, dtype)


def test_torch_save_load_state_dict():
    dtype = torch.float32
    ours, ref, shape = _trained_pair(2, 3, dtype)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = bnlib.nn.BatchNorm2d(3)
    fresh.load_state_dict(sd, strict=True)
    fresh.eval()
    ours.eval()
    ref.eval()
    x = random_input(shape, dtype, seed=5)
    assert torch.equal(fresh(x), ours(x))
    assert_close(fresh(x), ref(x), OUT_TOL[dtype], "saved/loaded vs torch")


@pytest.mark.parametrize("cfg", [dict(), dict(affine=False), dict(bias=False), dict(track_running_stats=False)], ids=_cfg_id)
def test_reset_running_stats_and_reset_parameters(cfg):
    dtype = torch.float32
    ours, ref, _ = _trained_pair(2, 3, dtype, **cfg)
    params_before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    assert ours.reset_running_stats() is None
    ref.reset_running_stats()
    assert_same_buffers(ours, ref, dtype)
    if ours.track_running_stats:
        assert torch.equal(ours.running_mean, torch.zeros(3))
        assert torch.equal(ours.running_var, torch.ones(3))
        assert int(ours.num_batches_tracked) == 0
    # reset_running_stats leaves the parameters alone
    for n, p in ours.named_parameters():
        assert torch.equal(p, params_before[n]), n
    # train again so both stats and params differ from the initial values
    x = random_input((4, 3, 2, 2), dtype, seed=11)
    step_and_compare(ours, ref, x, dtype, seed=11, what="after reset_running_stats")
    assert ours.reset_parameters() is None
    ref.reset_parameters()
    assert_same_buffers(ours, ref, dtype)
    for n, p in ref.named_parameters():
        assert torch.equal(dict(ours.named_parameters())[n], p), n


def test_in_sequential_with_conv2d():
    """Conv2d -> BatchNorm2d -> ReLU, trained two steps: everything matches torch."""
    dtype = torch.float32
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 4, 3, padding=1)
    net_t = torch.nn.Sequential(copy.deepcopy(conv), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    net_o = torch.nn.Sequential(copy.deepcopy(conv), bnlib.nn.BatchNorm2d(4), torch.nn.ReLU())
    for step in range(2):
        x = random_input((3, 2, 5, 5), dtype, seed=step)
        yt, yo = net_t(x), net_o(x)
        assert_close(yo, yt, OUT_TOL[dtype], "sequential output")
        yt.square().sum().backward()
        yo.square().sum().backward()
        for (n, pt), (_, po) in zip(net_t.named_parameters(), net_o.named_parameters()):
            # conv grads sum over many positions: scale-aware float32 tolerance
            assert_close(po.grad, pt.grad, dict(rtol=1e-4, atol=1e-4), f"sequential {n}.grad")
        with torch.no_grad():
            for pt, po in zip(net_t.parameters(), net_o.parameters()):
                pt -= 0.01 * pt.grad
                po -= 0.01 * po.grad
                pt.grad = po.grad = None
    assert_same_buffers(net_o[1], net_t[1], dtype)
    net_t.eval()
    net_o.eval()
    x = random_input((2, 2, 5, 5), dtype, seed=9)
    assert_close(net_o(x), net_t(x), OUT_TOL[dtype], "sequential eval")


def test_in_sequential_with_linear():
    dtype = torch.float64
    torch.manual_seed(1)
    lin = torch.nn.Linear(5, 3, dtype=dtype)
    net_t = torch.nn.Sequential(copy.deepcopy(lin), torch.nn.BatchNorm1d(3, dtype=dtype), torch.nn.Tanh())
    net_o = torch.nn.Sequential(copy.deepcopy(lin), bnlib.nn.BatchNorm1d(3, dtype=dtype), torch.nn.Tanh())
    x = random_input((6, 5), dtype, seed=4)
    yt, yo = net_t(x), net_o(x)
    assert_close(yo, yt, OUT_TOL[dtype], "linear-bn output")
    yt.sum().backward()
    yo.sum().backward()
    for (n, pt), (_, po) in zip(net_t.named_parameters(), net_o.named_parameters()):
        assert_close(po.grad, pt.grad, GRAD_TOL[dtype], f"linear-bn {n}.grad")
    assert_same_buffers(net_o[1], net_t[1], dtype)


@pytest.mark.parametrize("how", ["to", "double"])
def test_to_float64(how):
    ours, ref, shape = _trained_pair(2, 3, torch.float32)
    if how == "to":
        assert ours.to(torch.float64) is ours
        ref.to(torch.float64)
    else:
        assert ours.double() is ours
        ref.double()
    assert ours.weight.dtype == torch.float64
    assert ours.running_mean.dtype == torch.float64
    assert ours.running_var.dtype == torch.float64
    assert ours.num_batches_tracked.dtype == torch.long
    x = random_input(shape, torch.float64, seed=21)
    # the buffers carry float32 history: compare at float32 tolerance
    step_and_compare(ours, ref, x, torch.float32, seed=21, what=f"after .{how}()")
    ours.eval()
    ref.eval()
    yo = ours(x)
    assert yo.dtype == torch.float64
    assert_close(yo, ref(x), OUT_TOL[torch.float32], "eval after cast")


def test_deepcopy():
    ours, ref, shape = _trained_pair(1, 3, torch.float64)
    clone = copy.deepcopy(ours)
    assert_same_buffers(clone, ours, torch.float64)
    assert clone.running_mean.data_ptr() != ours.running_mean.data_ptr()
    snap = {k: v.clone() for k, v in ours.state_dict().items()}
    x = random_input(shape, torch.float64, seed=3)
    clone(x)  # training step on the copy only
    for k, v in ours.state_dict().items():
        assert torch.equal(v, snap[k]), f"deepcopy shares {k} with the original"
    assert int(clone.num_batches_tracked) == int(ours.num_batches_tracked) + 1
    step_and_compare(ours, ref, x, torch.float64, seed=3, what="original after copy")


def test_train_eval_flags():
    m = bnlib.nn.BatchNorm1d(3)
    assert m.training is True
    assert m.eval() is m and m.training is False
    assert m.train() is m and m.training is True
    assert m.train(False) is m and m.training is False
    seq = torch.nn.Sequential(m)
    seq.train()
    assert m.training is True


# ---------------------------------------------------------------------------
# num_batches_tracked as torch treats it: old checkpoints, and None
# ---------------------------------------------------------------------------


def _state_without_count(module):
    """A state dict with no ``num_batches_tracked`` and no version: a checkpoint older than torch's version 2."""
    sd = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    return sd  # a plain dict has no _metadata: the version is None


@pytest.mark.parametrize("make", [lambda lib: lib.BatchNorm1d(3), lambda lib: lib.SyncBatchNorm(3),
                                  lambda lib: lib.InstanceNorm1d(3, track_running_stats=True)],
                         ids=["BatchNorm1d", "SyncBatchNorm", "InstanceNorm1d"])
def test_old_checkpoint_keeps_the_module_count(make):
    """A checkpoint without num_batches_tracked leaves the module's count as it was, as in torch."""
    for lib in (torch.nn, bnlib.nn):
        module = make(lib)
        module.num_batches_tracked.fill_(7)
        module.load_state_dict(_state_without_count(make(lib)))
        assert int(module.num_batches_tracked) == 7, lib.__name__


@pytest.mark.parametrize("momentum", [0.1, None])
def test_num_batches_tracked_none_like_torch(momentum):
    """torch lets num_batches_tracked be None: nothing is counted, and momentum=None then means factor 0."""
    ours, theirs = bnlib.nn.BatchNorm1d(3, momentum=momentum), torch.nn.BatchNorm1d(3, momentum=momentum)
    ours.num_batches_tracked = theirs.num_batches_tracked = None
    for seed in range(3):
        x = random_input((8, 3), torch.float64, seed=seed).float()
        assert_close(ours(x), theirs(x), OUT_TOL[torch.float32], "output")
    assert ours.num_batches_tracked is None
    assert_same_buffers(ours, theirs, torch.float32)


def test_instance_norm_pre_0_4_checkpoint_is_an_error_like_torch():
    """Running stats in an unversioned checkpoint for an InstanceNorm that keeps none: torch's error, strict or not."""
    sd = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    for lib in (torch.nn, bnlib.nn):
        for strict in (True, False):
            with pytest.raises(RuntimeError, match="track_running_stats=False"):
                lib.InstanceNorm1d(3).load_state_dict(dict(sd), strict=strict)


# --------------------------------------------------------------------------
# Activation checkpointing, and the layout of the output
# --------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum 0.1", "cumulative"])
def test_checkpointed_block_counts_and_updates_as_torch(momentum, use_reentrant):
    """A BN layer last in a block under torch.utils.checkpoint: torch's BN
    updates its estimates again when the backward recomputes the block (the
    non-reentrant checkpoint stops the recomputation at the last saved tensor,
    after the update), and counts the batch again. bnlib must do the same, on
    both CPU paths, and keep its count and its estimates consistent."""
    from torch.utils.checkpoint import checkpoint

    def three_steps(bn_class):
        torch.manual_seed(0)
        block = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), bn_class(3, momentum=momentum))
        for step in range(3):
            x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(step), requires_grad=True)
            checkpoint(block, x, use_reentrant=use_reentrant).sum().backward()
        return block[1]

    ours, theirs = three_steps(bnlib.nn.BatchNorm2d), three_steps(torch.nn.BatchNorm2d)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_input_gives_a_contiguous_output_as_torch(training, dtype):
    """An (N, C, L) view of an (N, L, C) tensor: torch's BN returns a
    contiguous output (one can .view() it), on every path."""
    x = torch.randn(4, 7, 3, dtype=dtype).transpose(1, 2)
    ours, theirs = bnlib.nn.BatchNorm1d(3).to(dtype), torch.nn.BatchNorm1d(3).to(dtype)
    ours.train(training), theirs.train(training)
    y, expected = ours(x), theirs(x)
    assert y.is_contiguous() and expected.is_contiguous()
    assert y.stride() == expected.stride()
    torch.testing.assert_close(y, expected, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=2e-2)


def test_running_estimates_set_to_none_count_batches_as_torch():
    """track_running_stats=True with the buffers set to None afterwards:
    torch counts the batch and normalizes with the batch statistics."""
    ours, theirs = bnlib.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for layer in (ours, theirs):
        layer.running_mean = layer.running_var = None
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 1
