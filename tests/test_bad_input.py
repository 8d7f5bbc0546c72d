"""Bad input (contract, "Bad input: a clear error, and no state changed").

* ValueError (a subclass is fine) whose message says what was expected and
  what came, for: one value per channel when training, a number of dims the
  class does not take, a channel count that is not num_features, and bad
  constructor arguments.
* After every error the running statistics and num_batches_tracked are
  bit-for-bit what they were (torch.equal / np.array_equal, no tolerance:
  "exactly as before the call").
* The NaN/Inf rule: a training batch with NaN or Inf in channel k leaves
  channel k's running statistics exactly unchanged, updates the other
  channels as torch does on a clean batch (float64, tolerance helpers.STAT_TOL:
  summation order only), and the output of channel k is NaN.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import bnlib.functional as BF
import bnlib.nn
import bnlib.reference as R
from helpers import (
    OUT_TOL,
    STAT_TOL,
    assert_buffers_exactly,
    assert_close,
    bnlib_bn_class,
    buffers_snapshot,
    message_mentions,
    random_input,
    torch_bn_class,
)

# Every test here runs on both CPU paths: the fused kernels and the tensor ops.
pytestmark = pytest.mark.usefixtures("each_cpu_path")

ONE_VALUE_MSG = "Expected more than 1 value per channel when training, got input size"


def _warm(module, shape, steps=2):
    """A couple of good training steps so the buffers are not the initial values."""
    for s in range(steps):
        module(random_input(shape, torch.float32, seed=s))
    return module


def _ref_snapshot(bn):
    return {
        "running_mean": None if bn.running_mean is None else np.array(bn.running_mean, copy=True),
        "running_var": None if bn.running_var is None else np.array(bn.running_var, copy=True),
        "num_batches_tracked": int(bn.num_batches_tracked) if bn.running_mean is not None else None,
    }


def _ref_assert_exactly(bn, snap):
    for name in ("running_mean", "running_var"):
        if snap[name] is None:
            assert getattr(bn, name) is None
        else:
            assert np.array_equal(getattr(bn, name), snap[name]), f"{name} changed"
    if snap["num_batches_tracked"] is not None:
        assert int(bn.num_batches_tracked) == snap["num_batches_tracked"], "num_batches_tracked changed"


# --------------------------------------------------------------------------
# One value per channel when training
# --------------------------------------------------------------------------
ONE_VALUE_CASES = [(1, (1, 3)), (1, (1, 3, 1)), (2, (1, 3, 1, 1)), (3, (1, 3, 1, 1, 1))]


@pytest.mark.parametrize("cfg", [dict(), dict(momentum=None), dict(track_running_stats=False)], ids=str)
@pytest.mark.parametrize("d,shape", ONE_VALUE_CASES, ids=[str(s) for _, s in ONE_VALUE_CASES])
def test_nn_one_value_per_channel(d, shape, cfg):
    m = bnlib_bn_class(d)(3, **cfg)
    good = (4,) + shape[1:-1] + (2,) if len(shape) > 2 else (4, 3)
    _warm(m, good)
    snap = buffers_snapshot(m)
    with pytest.raises(ValueError) as e:
        m(torch.randn(shape))
    assert str(e.value).startswith(ONE_VALUE_MSG), str(e.value)
    assert_buffers_exactly(m, snap)
    # eval mode with running stats: one value per channel is fine (torch too)
    if m.track_running_stats:
        m.eval()
        assert m(torch.randn(shape)).shape == shape
        assert_buffers_exactly(m, snap)
    else:
        # eval without running stats normalizes with batch stats: torch raises there too
        m.eval()
        with pytest.raises(ValueError) as e:
            m(torch.randn(shape))
        assert str(e.value).startswith(ONE_VALUE_MSG), str(e.value)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)], ids=str)
def test_reference_one_value_per_channel(shape):
    bn = R.BatchNorm(3)
    bn(random_input((4,) + shape[1:], torch.float64, seed=0).numpy())
    snap = _ref_snapshot(bn)
    with pytest.raises(ValueError) as e:
        bn(np.ones(shape))
    assert str(e.value).startswith(ONE_VALUE_MSG), str(e.value)
    _ref_assert_exactly(bn, snap)


@pytest.mark.parametrize("with_stats", [True, False])
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)], ids=str)
def test_functional_one_value_per_channel(shape, with_stats):
    rm, rv = torch.tensor([0.5, 1.0, 1.5]), torch.tensor([2.0, 3.0, 4.0])
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.raises(ValueError) as e:
        BF.batch_norm(torch.randn(shape), rm if with_stats else None, rv if with_stats else None, training=True)
    assert str(e.value).startswith(ONE_VALUE_MSG), str(e.value)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


# --------------------------------------------------------------------------
# Wrong number of dims. Digits in the shapes are chosen so that the expected
# and received numbers of dims can be found in the message.
# --------------------------------------------------------------------------
WRONG_DIMS = [
    # (class dim, num_features, bad shape, received ndim, expected ndims)
    (1, 5, (6, 5, 7, 8), 4, (2, 3)),
    (1, 5, (5,), 1, (2, 3)),
    (1, 5, (6, 5, 7, 8, 9), 5, (2, 3)),
    (2, 5, (6, 5, 7), 3, (4,)),
    (2, 5, (6, 5), 2, (4,)),
    (2, 5, (6, 5, 7, 8, 9), 5, (4,)),
    (3, 6, (7, 6, 8, 9), 4, (5,)),
    (3, 6, (7, 6, 8, 9, 7, 8), 6, (5,)),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("d,c,shape,got,expected", WRONG_DIMS, ids=[f"{d}d-{s}" for d, _, s, _, _ in WRONG_DIMS])
def test_nn_wrong_number_of_dims(d, c, shape, got, expected, train):
    m = bnlib_bn_class(d)(c)
    _warm(m, {1: (4, c, 2), 2: (4, c, 2, 2), 3: (4, c, 2, 2, 2)}[d])
    m.train(train)
    snap = buffers_snapshot(m)
    with pytest.raises(ValueError) as e:
        m(torch.randn(shape))
    msg = str(e.value)
    assert message_mentions(msg, got), f"message does not say what came ({got}D): {msg!r}"
    assert any(message_mentions(msg, n) for n in expected), f"message does not say what was expected {expected}: {msg!r}"
    assert_buffers_exactly(m, snap)


@pytest.mark.parametrize("shape", [(5,), ()], ids=str)
def test_reference_wrong_number_of_dims(shape):
    """The reference takes 2-5 dims (N, C, ...); fewer is a ValueError, state untouched."""
    bn = R.BatchNorm(5)
    bn(random_input((4, 5), torch.float64, seed=0).numpy())
    snap = _ref_snapshot(bn)
    with pytest.raises(ValueError):
        bn(np.ones(shape))
    _ref_assert_exactly(bn, snap)


# --------------------------------------------------------------------------
# Channel count != num_features
# --------------------------------------------------------------------------
WRONG_C = [(1, (4, 5)), (1, (4, 5, 6)), (2, (4, 5, 6, 6)), (3, (4, 5, 6, 6, 6))]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("d,shape", WRONG_C, ids=[str(s) for _, s in WRONG_C])
def test_nn_wrong_channel_count(d, shape, train):
    m = bnlib_bn_class(d)(7)
    _warm(m, (4, 7) + shape[2:])
    m.train(train)
    snap = buffers_snapshot(m)
    with pytest.raises(ValueError) as e:
        m(torch.randn(shape))
    msg = str(e.value)
    assert message_mentions(msg, 7, 5), f"message must name expected (7) and received (5) channels: {msg!r}"
    assert_buffers_exactly(m, snap)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64], ids=str)
def test_non_floating_input(dtype, train):
    """An integer, boolean or complex input: ValueError naming the dtype, before num_batches_tracked moves."""
    m = bnlib_bn_class(1)(3)
    _warm(m, (4, 3))
    m.train(train)
    snap = buffers_snapshot(m)
    x = torch.ones(4, 3).to(dtype)
    with pytest.raises(ValueError, match="floating-point input.*" + re.escape(str(dtype))):
        m(x)
    assert_buffers_exactly(m, snap)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="floating-point input"):
        BF.batch_norm(x, rm, rv, training=train)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("make", [lambda: bnlib.nn.SyncBatchNorm(3), lambda: bnlib.nn.BatchRenorm1d(3),
                                  lambda: bnlib.nn.GhostBatchNorm(3, 2), lambda: bnlib.nn.FrozenBatchNorm(3)],
                         ids=["sync", "renorm", "ghost", "frozen"])
def test_non_floating_input_other_modules(make, train):
    m = make()
    m(torch.randn(4, 3))
    m.train(train)
    snap = buffers_snapshot(m)
    with pytest.raises(ValueError, match="floating-point input"):
        m(torch.ones(4, 3, dtype=torch.int64))
    assert_buffers_exactly(m, snap)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(4, 5), (4, 5, 6), (4, 5, 6, 6)], ids=str)
def test_reference_wrong_channel_count(shape, affine):
    bn = R.BatchNorm(7, affine=affine)
    bn(random_input((4, 7) + shape[2:], torch.float64, seed=0).numpy())
    for mode in ("train", "eval"):
        getattr(bn, mode)()
        snap = _ref_snapshot(bn)
        with pytest.raises(ValueError) as e:
            bn(np.ones(shape))
        assert message_mentions(str(e.value), 7, 5), str(e.value)
        _ref_assert_exactly(bn, snap)


@pytest.mark.parametrize("training", [True, False])
def test_functional_wrong_channel_count(training):
    """Running stats of length 7 for an input with 5 channels: ValueError, buffers untouched."""
    rm, rv = torch.arange(7.0), torch.arange(1.0, 8.0)
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.raises(ValueError) as e:
        BF.batch_norm(torch.randn(4, 5, 6), rm, rv, training=training)
    assert message_mentions(str(e.value), 7, 5), str(e.value)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_functional_one_running_estimate_in_training(given):
    """torch raises too: one estimate updated and the other not would go unnoticed."""
    stat = torch.zeros(3) if given == "running_mean" else torch.ones(3)
    kept = stat.clone()
    args = (stat, None) if given == "running_mean" else (None, stat)
    with pytest.raises(ValueError, match=f"both given or both None, got only {given}"):
        BF.batch_norm(torch.randn(8, 3) + 5, *args, training=True)
    assert torch.equal(stat, kept)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_functional_eps_must_be_positive_in_training(eps):
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="eps > 0"):
        BF.batch_norm(torch.randn(8, 3), rm, rv, training=True, eps=eps)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("momentum", [float("nan"), float("inf"), None, "0.1"], ids=repr)
@pytest.mark.parametrize("call", ["batch_norm", "instance_norm", "batch_renorm"])
def test_functional_momentum_must_be_a_finite_number_when_estimates_update(call, momentum):
    """NaN momentum would make the running estimates NaN (torch's functional
    batch norm takes it); None is the modules' cumulative average, which the
    functional forms cannot keep. Both refused, the estimates untouched."""
    import bnlib.alternatives as alt

    rm, rv = torch.zeros(3), torch.ones(3)
    x = torch.randn(4, 3, 5)
    calls = {
        "batch_norm": lambda: BF.batch_norm(x, rm, rv, training=True, momentum=momentum),
        "instance_norm": lambda: alt.instance_norm(x, rm, rv, momentum=momentum),
        "batch_renorm": lambda: alt.batch_renorm(x, rm, rv, training=True, momentum=momentum),
    }
    with pytest.raises(ValueError, match="finite number for momentum"):
        calls[call]()
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")], ids=repr)
@pytest.mark.parametrize("call", ["layer_norm", "group_norm", "instance_norm", "batch_renorm"])
def test_alternatives_functional_eps_must_be_positive(call, eps):
    """As rms_norm, filter_response_norm and batch_norm in training: eps <= 0
    gave NaN on one path and a finite result on another (the tensor ops lift
    eps to the smallest float)."""
    import bnlib.alternatives as alt

    rm, rv = torch.zeros(3), torch.ones(3)
    x = torch.randn(4, 3, 5)
    calls = {
        "layer_norm": lambda: alt.layer_norm(x, (5,), eps=eps),
        "group_norm": lambda: alt.group_norm(x, 3, eps=eps),
        "instance_norm": lambda: alt.instance_norm(x, rm, rv, eps=eps),
        "batch_renorm": lambda: alt.batch_renorm(x, rm, rv, training=True, eps=eps),
    }
    with pytest.raises(bnlib.nn.InputError, match="eps must be"):
        calls[call]()
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("call", ["group_norm", "instance_norm", "batch_renorm"])
def test_per_channel_parameters_must_be_vectors(call):
    """A (2, 2) weight for 4 channels: torch refuses it; it used to pass the
    count check and broadcast as 4 values."""
    import bnlib.alternatives as alt

    x, w = torch.randn(2, 4, 3), torch.ones(2, 2)
    calls = {
        "group_norm": lambda: alt.group_norm(x, 2, w),
        "instance_norm": lambda: alt.instance_norm(x, weight=w),
        "batch_renorm": lambda: alt.batch_renorm(x, torch.zeros(4), torch.ones(4), w, training=True),
    }
    with pytest.raises(ValueError, match=r"vector of 4 elements .* got shape \[2, 2\]"):
        calls[call]()


@pytest.mark.parametrize("bad", [
    ("running_var", torch.ones(4, 1), r"running_var should be a vector of 4 elements .* got shape \[4, 1\]"),
    ("running_mean", torch.zeros(4, dtype=torch.long), "running_mean should be a floating-point tensor, got torch.int64"),
    ("running_var", torch.ones(4, dtype=torch.bool), "running_var should be a floating-point tensor, got torch.bool"),
    ("weight", torch.ones(4, dtype=torch.complex64), "weight should be a floating-point tensor, got torch.complex64"),
    ("weight", torch.ones(4, 1), r"weight should be a vector of 4 elements .* got shape \[4, 1\]"),
    ("bias", [0.0] * 4, "bias should be a tensor"),
], ids=lambda b: f"{b[0]}-{getattr(b[1], 'dtype', 'list')}-{tuple(getattr(b[1], 'shape', ()))}")
@pytest.mark.parametrize("module", [BF, "renorm", "instance"], ids=["batch_norm", "batch_renorm", "instance_norm"])
def test_functional_per_channel_tensors_are_float_vectors(bad, module):
    """torch refuses these (its kernels want 1-D estimates of the input's
    float type); bnlib's tensor ops used to write half of a (4, 1) estimate
    before failing, and to truncate an integer estimate (0 -> 2)."""
    import bnlib.alternatives as alt

    name, tensor, message = bad
    if module != BF and (name == "bias" or (module == "instance" and name.startswith("running"))):
        pytest.skip("checked by batch_norm's rule only")
    args = {"running_mean": torch.zeros(4), "running_var": torch.ones(4), "weight": None, "bias": None}
    args[name] = tensor
    kept = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    x = torch.randn(8, 4, 3) * 3 + 5
    call = {BF: lambda: BF.batch_norm(x, training=True, momentum=0.5, **args),
            "renorm": lambda: alt.batch_renorm(x, training=True, momentum=0.5, **args),
            "instance": lambda: alt.instance_norm(x, use_input_stats=True, momentum=0.5, **args)}[module]
    with pytest.raises(ValueError, match=message):
        call()
    for k, v in kept.items():
        assert torch.equal(args[k], v), k


def test_functional_takes_a_0_dim_weight_for_one_channel_as_torch():
    x = torch.randn(4, 1, 3)
    ours = BF.batch_norm(x, torch.zeros(1), torch.ones(1), torch.tensor(2.0), torch.tensor(0.5), training=True)
    theirs = torch.nn.functional.batch_norm(x, torch.zeros(1), torch.ones(1), torch.tensor(2.0), torch.tensor(0.5),
                                            training=True)
    assert_close(ours, theirs, OUT_TOL[torch.float32])
    with pytest.raises(ValueError, match="running_mean should be a vector of 1 elements"):
        BF.batch_norm(x, torch.tensor(0.0), torch.ones(1), training=True)


def test_functional_bad_training_flag_eps_and_input():
    """torch refuses training="False" (a TypeError; truthy, it would train)
    and a negative eps in eval mode (the two CPU paths gave x/1 and x/2)."""
    x, rm, rv = torch.randn(4, 3), torch.zeros(3), torch.full((3,), 4.0)
    with pytest.raises(ValueError, match="expected training to be a bool, got 'False'"):
        BF.batch_norm(x, rm, rv, training="False")
    assert torch.equal(rm, torch.zeros(3))
    for eps in (-3.0, float("nan")):
        with pytest.raises(ValueError, match="eps must be non-negative"):
            BF.batch_norm(x, rm, rv, eps=eps)
    with pytest.raises(ValueError, match="expected the input to be a tensor, got ndarray"):
        BF.batch_norm(x.numpy(), rm, rv)
    # torch raises TypeError for these three: bnlib's error is one too
    for call in (lambda: BF.batch_norm(x, rm, rv, training="False"), lambda: BF.batch_norm(x.numpy(), rm, rv),
                 lambda: BF.batch_norm(x, rm.numpy(), rv)):
        with pytest.raises(TypeError):
            call()
    with pytest.raises(TypeError):
        torch.nn.functional.batch_norm(x, rm, rv, training="False")


@pytest.mark.parametrize("attr, value", [("momentum", float("nan")), ("momentum", "0.1"), ("eps", -1.0)],
                         ids=repr)
@pytest.mark.parametrize("make", [lambda: bnlib.nn.GhostBatchNorm(3, virtual_batch_size=2),
                                  lambda: bnlib.nn.BatchRenorm2d(3)], ids=["ghost", "renorm"])
def test_attributes_set_after_construction_are_checked_at_call_time(make, attr, value):
    """As BatchNorm's: a NaN momentum made the estimates NaN, a string one
    raised a TypeError after the batch was counted, a negative eps gave NaN."""
    layer = make()
    setattr(layer, attr, value)
    before = buffers_snapshot(layer)
    with pytest.raises(ValueError, match="momentum|eps"):
        layer(torch.randn(4, 3, 2, 2))
    assert_buffers_exactly(layer, before)


@pytest.mark.parametrize("momentum", [torch.tensor(0.1), True, np.float32(0.1)], ids=repr)
def test_functional_momentum_takes_what_torch_takes(momentum):
    """A one-element tensor and a bool are momentum values torch's batch norm
    takes: so does bnlib's, with the same running estimates."""
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    ours, torchs = (torch.zeros(3), torch.ones(3)), (torch.zeros(3), torch.ones(3))
    BF.batch_norm(x, *ours, training=True, momentum=momentum)
    torch.nn.functional.batch_norm(x, *torchs, training=True, momentum=momentum)
    for a, b in zip(ours, torchs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dim", [1.0, "0", True], ids=repr)
def test_weight_norm_dim_must_be_an_integer(dim):
    import bnlib.alternatives as alt

    layer = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="dim must be an integer or None"):
        alt.weight_norm(layer, dim=dim)
    assert not hasattr(layer, "parametrizations")

# --------------------------------------------------------------------------
# Constructor arguments
# --------------------------------------------------------------------------
BAD_CTOR = [
    dict(num_features=0),
    dict(num_features=-3),
    dict(num_features=4, eps=0.0),
    dict(num_features=4, eps=-1e-5),
    dict(num_features=4, momentum=-0.1),
    dict(num_features=4, momentum=1.5),
]
GOOD_CTOR = [
    dict(num_features=1),
    dict(num_features=4, momentum=None),
    dict(num_features=4, momentum=0.0),
    dict(num_features=4, momentum=1.0),
    dict(num_features=4, eps=1e-12),
]


def _kw_id(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("kw", BAD_CTOR, ids=_kw_id)
@pytest.mark.parametrize("d", [1, 2, 3, "ref"])
def test_bad_constructor_arguments(d, kw):
    cls = R.BatchNorm if d == "ref" else bnlib_bn_class(d)
    with pytest.raises(ValueError) as e:
        cls(**kw)
    bad = [v for k, v in kw.items() if k != "num_features" or len(kw) == 1][-1]
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", str(e.value))]
    assert float(bad) in numbers, f"message should show the value that came ({bad}): {e.value!r}"


@pytest.mark.parametrize("kw", GOOD_CTOR, ids=_kw_id)
@pytest.mark.parametrize("d", [1, 2, 3, "ref"])
def test_boundary_constructor_arguments_are_accepted(d, kw):
    cls = R.BatchNorm if d == "ref" else bnlib_bn_class(d)
    m = cls(**kw)
    if d != "ref":
        t = torch_bn_class(d)(**kw)
        assert m.momentum == t.momentum and m.eps == t.eps


# --------------------------------------------------------------------------
# The NaN / Inf rule
# --------------------------------------------------------------------------
NAN_SHAPES = [(6, 3), (4, 3, 5), (3, 3, 2, 3), (2, 3, 2, 2, 2)]
BAD_VALUES = [float("nan"), float("inf"), float("-inf")]


def _poison(x, k, value, where=(1,)):
    x = x.clone()
    idx = (where[0], k) + (0,) * (x.dim() - 2)
    x[idx] = value
    return x


@pytest.mark.parametrize("momentum", [0.1, None], ids=str)
@pytest.mark.parametrize("value", BAD_VALUES, ids=str)
@pytest.mark.parametrize("shape", NAN_SHAPES, ids=str)
def test_nn_nan_rule(shape, value, momentum):
    dtype = torch.float64
    d = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]
    k = 1
    ours = bnlib_bn_class(d)(3, momentum=momentum, dtype=dtype)
    ref = torch_bn_class(d)(3, momentum=momentum, dtype=dtype)
    x0 = random_input(shape, dtype, seed=0)
    ours(x0)
    ref(x0)
    before = buffers_snapshot(ours)
    clean = random_input(shape, dtype, seed=1)
    bad = _poison(clean, k, value)
    y = ours(bad)
    y_ref = ref(clean)  # torch on the clean batch: the truth for the other channels
    others = [c for c in range(3) if c != k]
    assert torch.isnan(y[:, k]).all(), f"output of the poisoned channel should be NaN: {y[:, k]}"
    assert_close(y[:, others], y_ref[:, others], OUT_TOL[dtype], "output of clean channels")
    for name in ("running_mean", "running_var"):
        now = getattr(ours, name)
        assert torch.equal(now[k], before[name][k]), f"{name}[{k}] changed: {before[name][k]} -> {now[k]}"
        assert_close(now[others], getattr(ref, name)[others], STAT_TOL[dtype], f"{name} of clean channels")
    # a further clean step continues from the protected state
    x2 = random_input(shape, dtype, seed=2)
    ours(x2)
    assert torch.isfinite(ours.running_mean).all() and torch.isfinite(ours.running_var).all()


@pytest.mark.parametrize("value", BAD_VALUES, ids=str)
def test_nn_nan_rule_every_channel(value):
    """NaN/Inf in every channel: no running statistic moves."""
    m = bnlib_bn_class(2)(3)
    _warm(m, (4, 3, 2, 2))
    snap = buffers_snapshot(m)
    x = torch.randn(4, 3, 2, 2)
    x[0, :, 0, 0] = value
    y = m(x)
    assert torch.isnan(y).all()
    assert torch.equal(m.running_mean, snap["running_mean"])
    assert torch.equal(m.running_var, snap["running_var"])


@pytest.mark.parametrize("value", BAD_VALUES, ids=str)
@pytest.mark.parametrize("shape", [(6, 3), (3, 3, 2, 3)], ids=str)
def test_functional_nan_rule(shape, value):
    dtype = torch.float64
    k = 2
    rm, rv = torch.tensor([0.5, 1.0, 1.5], dtype=dtype), torch.tensor([2.0, 3.0, 4.0], dtype=dtype)
    rm_t, rv_t = rm.clone(), rv.clone()
    clean = random_input(shape, dtype, seed=3)
    y = BF.batch_norm(_poison(clean, k, value), rm, rv, training=True, momentum=0.3)
    y_t = torch.nn.functional.batch_norm(clean, rm_t, rv_t, training=True, momentum=0.3)
    assert torch.isnan(y[:, k]).all()
    assert rm[k] == 1.5 and rv[k] == 4.0, (rm, rv)
    assert_close(rm[:k], rm_t[:k], STAT_TOL[dtype], "running_mean clean channels")
    assert_close(rv[:k], rv_t[:k], STAT_TOL[dtype], "running_var clean channels")
    assert_close(y[:, :k], y_t[:, :k], OUT_TOL[dtype], "output clean channels")


@pytest.mark.parametrize("momentum", [0.1, None], ids=str)
@pytest.mark.parametrize("value", BAD_VALUES, ids=str)
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 3, 2, 2)], ids=str)
def test_reference_nan_rule(shape, value, momentum):
    k = 0
    bn = R.BatchNorm(3, momentum=momentum)
    ref = torch_bn_class({2: 1, 3: 1, 4: 2}[len(shape)])(3, momentum=momentum, dtype=torch.float64)
    x0 = random_input(shape, torch.float64, seed=0)
    bn(x0.numpy())
    ref(x0)
    before = _ref_snapshot(bn)
    clean = random_input(shape, torch.float64, seed=1)
    with np.errstate(all="ignore"):
        y = bn(_poison(clean, k, value).numpy())
    y_ref = ref(clean).detach().numpy()
    assert np.isnan(y[:, k]).all()
    np.testing.assert_allclose(y[:, 1:], y_ref[:, 1:], rtol=1e-10, atol=1e-12)
    assert bn.running_mean[k] == before["running_mean"][k] and bn.running_var[k] == before["running_var"][k]
    np.testing.assert_allclose(bn.running_mean[1:], ref.running_mean[1:].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bn.running_var[1:], ref.running_var[1:].numpy(), rtol=1e-10, atol=1e-12)


def test_bad_input_is_caught_as_torch_code_catches_it():
    """torch raises RuntimeError where bnlib's contract says ValueError; bnlib's InputError is both."""
    import bnlib.nn

    cases = [
        (bnlib.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3), torch.randn(4, 5)),  # channels
        (bnlib.nn.LayerNorm(4), torch.nn.LayerNorm(4), torch.randn(2, 5)),  # normalized_shape
        (bnlib.nn.GroupNorm(2, 4), torch.nn.GroupNorm(2, 4), torch.randn(4, 6, 3)),  # channels
        (bnlib.nn.GroupNorm(2, 4), torch.nn.GroupNorm(2, 4), torch.randn(4)),  # 1-D input
    ]
    for ours, theirs, x in cases:
        with pytest.raises(RuntimeError):
            theirs(x)
        with pytest.raises(RuntimeError) as caught:
            ours(x)
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, bnlib.nn.InputError)


def test_ghost_batch_norm_bad_input_is_an_input_error():
    """GhostBatchNorm raised a plain ValueError, which torch-style code catching RuntimeError missed."""
    ghost = bnlib.nn.GhostBatchNorm(3, virtual_batch_size=4)
    for x in (torch.randn(5, 3), torch.randn(3)):  # a last virtual batch of one row; a 1-D input
        with pytest.raises(bnlib.nn.InputError):
            ghost(x)
    assert int(ghost.num_batches_tracked) == 0


def test_running_estimates_that_require_grad_are_refused_as_torch():
    """torch refuses them ("not differentiable with respect to running_mean"); bnlib gave them no
    gradient in eager mode and a gradient under torch.func (the formula): refused, with nothing changed."""
    x = torch.randn(4, 3)
    for training in (False, True):
        rm, rv = torch.zeros(3, requires_grad=True), torch.ones(3)
        with pytest.raises(RuntimeError):
            torch.nn.functional.batch_norm(x, rm, rv, training=training)
        for running in ((rm, rv), (rv.detach(), rm)):
            with pytest.raises(bnlib.nn.InputError, match="do not require grad"):
                BF.batch_norm(x, *running, training=training)
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("make", [lambda m: bnlib.nn.BatchNorm1d(3, momentum=m),
                                  lambda m: bnlib.nn.BatchRenorm1d(3, momentum=m)],
                         ids=["BatchNorm1d", "BatchRenorm1d"])
@pytest.mark.parametrize("failure", ["weight of 4", "input on meta"])
def test_a_call_failing_after_the_checks_counts_no_batch(make, momentum, failure):
    """Errors that only the computation finds (a weight replaced by one of the
    wrong size, an input on another device than the buffers) leave
    num_batches_tracked as it was, as the other errors do; so with
    momentum=None the next good batch still gets the cumulative factor 1."""
    module = make(momentum)
    x = random_input((8, 3), torch.float32, seed=1)
    module(x)
    before = buffers_snapshot(module)
    if failure == "weight of 4":
        original = module.weight
        module.weight = torch.nn.Parameter(torch.ones(4))
        bad = x
    else:
        bad = torch.randn(8, 3, device="meta")
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)):
        module(bad)
    assert_buffers_exactly(module, before)
    if failure == "weight of 4":
        module.weight = original
    module(x)
    assert int(module.num_batches_tracked) == 2


@pytest.mark.parametrize("call", ["batch_norm", "batch_norm eval", "layer_norm", "group_norm", "rms_norm"])
def test_a_parameter_on_another_device_is_refused(call):
    """A meta weight beside a CPU input: the C++ ops dispatch on every
    argument, so their fake (meta) kernel ran and returned uninitialized
    memory, silently; torch raises. Now an InputError, nothing updated."""
    import bnlib.alternatives as alt

    x, meta = torch.randn(2, 4, 5), torch.ones(4, device="meta")
    rm, rv = torch.zeros(4), torch.ones(4)
    calls = {
        "batch_norm": lambda: BF.batch_norm(x, rm, rv, meta, training=True),
        "batch_norm eval": lambda: BF.batch_norm(x, meta, rv, training=False),
        "layer_norm": lambda: alt.layer_norm(x, (5,), torch.ones(5, device="meta")),
        "group_norm": lambda: alt.group_norm(x, 2, meta),
        "rms_norm": lambda: alt.rms_norm(x, (5,), torch.ones(5, device="meta")),
    }
    with pytest.raises(bnlib.nn.InputError, match="same device"):
        calls[call]()
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))


def test_layers_without_a_weight_ignore_the_default_device():
    """The ones that stand for a missing weight are made on the input's
    device, not the default one (a meta default gave garbage)."""
    import bnlib.alternatives as alt

    x = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    with torch.device("meta"):
        y = alt.group_norm(x, 2)
    torch.testing.assert_close(y, torch.nn.functional.group_norm(x, 2))


@pytest.mark.parametrize("make, call", [
    (lambda: bnlib.nn.BatchNorm2d(3), None), (lambda: bnlib.nn.LazyBatchNorm2d(), None),
    (lambda: bnlib.nn.BatchRenorm2d(3), None), (lambda: bnlib.nn.GhostBatchNorm(3, 2), None),
    (lambda: bnlib.nn.FrozenBatchNorm(3), None), (lambda: bnlib.nn.SyncBatchNorm(3), None),
    (lambda: bnlib.nn.LayerNorm([5, 5]), None), (lambda: bnlib.nn.RMSNorm([5, 5]), None),
    (lambda: bnlib.nn.GroupNorm(1, 3), None), (lambda: bnlib.nn.InstanceNorm2d(3), None),
    (lambda: bnlib.nn.LazyInstanceNorm2d(), None), (lambda: bnlib.nn.FilterResponseNorm(3), None),
    (lambda: bnlib.nn.ConditionalBatchNorm2d(3, 4), lambda m, x: m(x, torch.zeros(4, dtype=torch.long))),
], ids=["BatchNorm2d", "LazyBatchNorm2d", "BatchRenorm2d", "GhostBatchNorm", "FrozenBatchNorm",
        "SyncBatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm2d", "LazyInstanceNorm2d",
        "FilterResponseNorm", "ConditionalBatchNorm2d"])
def test_layers_refuse_an_array_input_with_a_type_error_naming_them(make, call):
    """An array gave an AttributeError from deep inside (torch's layers too), and a lazy
    layer could take its shape first: now an InputTypeError (a ValueError and a TypeError)
    before anything changes."""
    layer = make()
    kind = type(layer)
    state = {k: v.clone() for k, v in layer.state_dict().items() if not torch.nn.parameter.is_lazy(v)}
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    with pytest.raises(bnlib.nn.InputError, match="expected the input to be a tensor, got ndarray") as caught:
        (call or (lambda m, x: m(x)))(layer, x)
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, ValueError)
    assert type(layer) is kind  # a lazy layer stays lazy
    for k, v in state.items():
        assert torch.equal(layer.state_dict()[k], v), k
