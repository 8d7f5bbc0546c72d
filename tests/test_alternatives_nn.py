"""bnlib.nn's LayerNorm, GroupNorm, InstanceNorm1d/2d/3d, weight_norm and spectral_norm
against torch.nn (the truth): constructors, parameters, buffers, state dicts,
outputs, gradients and running statistics; the hand-written backward passes
against torch.autograd.gradcheck (finite differences, float64) and against
the NumPy references; bad input (ValueError, state untouched).

Tolerances are helpers.OUT_TOL / GRAD_TOL / STAT_TOL (float64: a few ulps of
reordering; float32: ~1e-6 relative, looser for input gradients, which
subtract means). The power iteration of spectral norm does the same float
operations as torch's, so u and v are compared at the same tolerances.
"""

from __future__ import annotations

import copy
import inspect
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import bnlib.alternatives as alt
import bnlib.nn
import bnlib.reference as ref
from helpers import (
    GRAD_TOL,
    OUT_TOL,
    STAT_TOL,
    TORCH_NORMS_TAKE_BIAS,
    assert_close,
    assert_same_run,
    forward_backward,
    np64,
    random_input,
    randomize_params,
)

DTYPES = [torch.float32, torch.float64]
# Layer, group and instance norm on both CPU paths: bnlib's C++ loops and the tensor ops.
pytestmark = pytest.mark.usefixtures("each_cpu_path")


def assert_same_state(ours, theirs, dtype):
    s1, s2 = ours.state_dict(), theirs.state_dict()
    assert list(s1) == list(s2)
    for key in s1:
        assert s1[key].dtype == s2[key].dtype, key
        if s1[key].dtype == torch.long:
            assert torch.equal(s1[key], s2[key]), key
        else:
            assert_close(s1[key], s2[key], STAT_TOL[dtype], key)


def test_reexported_from_bnlib_nn():
    for name in ["LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "BatchRenorm1d",
                 "BatchRenorm2d", "weight_norm", "spectral_norm"]:
        assert getattr(bnlib.nn, name) is getattr(alt, name)


@pytest.mark.parametrize("ours,theirs", [(alt.LayerNorm, nn.LayerNorm), (alt.GroupNorm, nn.GroupNorm),
                                         (alt.InstanceNorm1d, nn.InstanceNorm1d), (alt.InstanceNorm2d, nn.InstanceNorm2d),
                                         (alt.InstanceNorm3d, nn.InstanceNorm3d)])
def test_same_constructor_signature(ours, theirs):
    """Names, kinds (positional / keyword-only) and defaults; torch's type annotations aside."""
    def shape(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls.__init__).parameters.values()]

    assert shape(ours) == shape(theirs)


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LayerNorm",
                                  "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm"])
def test_forward_takes_torchs_argument_name(name):
    """A call by keyword works in both: ``norm(input=x)``, but ``RMSNorm(...)(x=x)``."""
    def names(cls):
        return list(inspect.signature(cls.forward).parameters)

    assert names(getattr(bnlib.nn, name)) == names(getattr(nn, name))


@pytest.mark.parametrize("name,args", [("BatchNorm2d", (3,)), ("InstanceNorm2d", (3,)), ("GroupNorm", (1, 3)),
                                       ("LayerNorm", ((3, 2, 2),)), ("RMSNorm", ((3, 2, 2),))])
def test_constructors_take_a_0_dim_tensor_eps_and_momentum(name, args):
    """As torch's do; the layer then computes what torch's computes."""
    kw = dict(eps=torch.tensor(1e-5))
    if "momentum" in inspect.signature(getattr(nn, name).__init__).parameters:
        kw["momentum"] = torch.tensor(0.1)
    ours, theirs = getattr(bnlib.nn, name)(*args, **kw), getattr(nn, name)(*args, **kw)
    x = torch.randn(4, 3, 2, 2)
    assert_close(ours(x), theirs(x), dict(rtol=0, atol=1e-5), name)
    assert repr(ours) == repr(theirs)
    with pytest.raises(ValueError, match="eps"):
        getattr(bnlib.nn, name)(*args, eps=torch.tensor(0.0))


def test_instance_norm_calls_a_subclass_input_check():
    """torch's instance norms check dims in ``_check_input_dim``, a hook a subclass may override."""
    for lib in (nn, bnlib.nn):
        class Strict(lib.InstanceNorm1d):
            def _check_input_dim(self, input):
                if input.dim() != 3:
                    raise ValueError("custom: batched input only")

        with pytest.raises(ValueError, match="custom"):
            Strict(3)(torch.randn(3, 7))
        assert Strict(3)(torch.randn(2, 3, 7)).shape == (2, 3, 7)
        assert lib.InstanceNorm2d(3)._get_no_batch_dim() == 3


# --------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------

LN_CASES = [((4, 6), 6), ((3, 5, 4), (4,)), ((3, 5, 4), (5, 4)), ((2, 3, 4, 5), (3, 4, 5)), ((2, 3), [3]),
            ((5,), 5), ((3, 5), (3, 5))]  # the last two: no leading dims, so nothing to sum the parameters over
LN_CONFIGS = [dict(), dict(elementwise_affine=False), dict(bias=False), dict(eps=1e-3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,normalized_shape", LN_CASES)
@pytest.mark.parametrize("cfg", LN_CONFIGS, ids=str)
def test_layernorm_vs_torch(shape, normalized_shape, cfg, dtype):
    ours = bnlib.nn.LayerNorm(normalized_shape, dtype=dtype, **cfg)
    theirs = nn.LayerNorm(normalized_shape, dtype=dtype, **cfg)
    if TORCH_NORMS_TAKE_BIAS:
        assert repr(ours) == repr(theirs)
    assert_same_state(ours, theirs, dtype)
    randomize_params(ours, theirs)
    x = random_input(shape, dtype=dtype)
    for train in (True, False):
        ours.train(train), theirs.train(train)
        assert_same_run(ours, theirs, x, dtype)


# --------------------------------------------------------------------------
# GroupNorm
# --------------------------------------------------------------------------

GN_CASES = [(3, 6, (4, 6)), (2, 6, (3, 6, 5)), (1, 4, (2, 4, 3, 3)), (4, 4, (2, 4, 3, 3)), (2, 4, (2, 4, 2, 1, 3)),
            (2, 4, (1, 4, 3))]
GN_CONFIGS = [dict(), dict(affine=False), dict(bias=False), dict(eps=1e-3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups,channels,shape", GN_CASES)
@pytest.mark.parametrize("cfg", GN_CONFIGS, ids=str)
def test_groupnorm_vs_torch(groups, channels, shape, cfg, dtype):
    ours = bnlib.nn.GroupNorm(groups, channels, dtype=dtype, **cfg)
    theirs = nn.GroupNorm(groups, channels, dtype=dtype, **cfg)
    if TORCH_NORMS_TAKE_BIAS:
        assert repr(ours) == repr(theirs)
    assert_same_state(ours, theirs, dtype)
    randomize_params(ours, theirs)
    assert_same_run(ours, theirs, random_input(shape, dtype=dtype), dtype)


# --------------------------------------------------------------------------
# InstanceNorm1d / 2d
# --------------------------------------------------------------------------

IN_CONFIGS = [dict(), dict(affine=True), dict(affine=True, bias=False), dict(track_running_stats=True),
              dict(affine=True, track_running_stats=True, momentum=0.3), dict(track_running_stats=True, momentum=None)]
IN_SHAPES = {1: [(4, 3, 5), (3, 5), (2, 3, 2)], 2: [(2, 3, 4, 5), (3, 4, 5), (3, 3, 1, 2)],
             3: [(2, 3, 2, 3, 4), (3, 2, 3, 2), (2, 3, 1, 2, 2)]}
IN_CLASSES = {1: (bnlib.nn.InstanceNorm1d, nn.InstanceNorm1d), 2: (bnlib.nn.InstanceNorm2d, nn.InstanceNorm2d),
              3: (bnlib.nn.InstanceNorm3d, nn.InstanceNorm3d)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("cfg", IN_CONFIGS, ids=str)
def test_instancenorm_vs_torch(d, cfg, dtype):
    ours = IN_CLASSES[d][0](3, dtype=dtype, **cfg)
    theirs = IN_CLASSES[d][1](3, dtype=dtype, **cfg)
    if TORCH_NORMS_TAKE_BIAS:
        assert repr(ours) == repr(theirs)
    assert_same_state(ours, theirs, dtype)
    if ours.affine:
        randomize_params(ours, theirs)
    for step, shape in enumerate(IN_SHAPES[d] * 2):  # several training steps, then eval
        x = random_input(shape, dtype=dtype, seed=step)
        assert_same_run(ours, theirs, x, dtype, seed=step + 10)
        assert_same_state(ours, theirs, dtype)
    ours.eval(), theirs.eval()
    for shape in IN_SHAPES[d]:
        assert_same_run(ours, theirs, random_input(shape, dtype=dtype, seed=7), dtype)
    assert_same_state(ours, theirs, dtype)


@pytest.mark.parametrize("make", [
    lambda lib: lib.GroupNorm(2, 4), lambda lib: lib.LayerNorm(5), lambda lib: lib.LayerNorm((3, 5)),
    lambda lib: lib.InstanceNorm2d(4), lambda lib: lib.InstanceNorm2d(4, track_running_stats=True).eval(),
    lambda lib: lib.GroupNorm(2, 4, dtype=torch.float64)], ids=["group", "layer", "layer2", "instance", "instance_eval",
                                                               "group_f64"])
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "contiguous"])
def test_output_layout_as_torch(make, fmt):
    """The output's memory layout is torch's for the same input (values are checked elsewhere)."""
    ours, theirs = make(bnlib.nn), make(nn)
    dtype = ours.weight.dtype if getattr(ours, "weight", None) is not None else torch.float32
    x = torch.randn(2, 4, 3, 5, dtype=dtype).contiguous(memory_format=fmt)
    assert ours(x).stride() == theirs(x).stride()


def test_group_norm_layout_3d():
    x = torch.randn(2, 4, 3, 5, 2).contiguous(memory_format=torch.channels_last_3d)
    assert bnlib.nn.GroupNorm(2, 4)(x).stride() == nn.GroupNorm(2, 4)(x).stride()


def test_instancenorm_state_dict_loads_both_ways():
    theirs = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    theirs(random_input((2, 3, 4, 4), dtype=torch.float32))
    ours = bnlib.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours.load_state_dict(torch.load(buffer))
    back = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    back.load_state_dict(ours.state_dict())
    assert_same_state(back, theirs, torch.float32)


# --------------------------------------------------------------------------
# Hand-written backward: gradcheck, and the NumPy references
# --------------------------------------------------------------------------


def _gradcheck(fn, *tensors):
    inputs = tuple(t.detach().clone().requires_grad_() for t in tensors)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_layer_group_instance_norm():
    x = random_input((3, 4, 5), seed=3)
    w, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    w_ln, b_ln = torch.rand(4, 5, dtype=torch.float64) + 0.5, torch.randn(4, 5, dtype=torch.float64)
    _gradcheck(lambda a, g, c: alt.layer_norm(a, (4, 5), g, c), x, w_ln, b_ln)
    _gradcheck(lambda a, g, c: alt.group_norm(a, 2, g, c), x, w, b)
    _gradcheck(lambda a, g, c: alt.instance_norm(a, weight=g, bias=c), x, w, b)
    _gradcheck(lambda a: alt.group_norm(a, 4), x)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_gradcheck_weight_and_spectral_norm(dim):
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(4, 3, 2, dtype=torch.float64, generator=gen)
    g = alt._norm_except_dim(v, -1 if dim is None else dim) * 1.3
    _gradcheck(lambda a, b: alt.WeightNormFunction.apply(a, b, -1 if dim is None else dim), v, g)
    if dim is not None:
        # u and v as power iteration leaves them, the top singular pair (a random
        # pair can give sigma = u^T W v near 0, where W / sigma is ill-conditioned
        # and the finite differences fail, as the global RNG's state falls)
        left, _, right = torch.linalg.svd(alt._to_matrix(v, dim))
        _gradcheck(lambda a: alt.SpectralNormFunction.apply(a, left[:, 0], right[0], dim), v)


def test_modules_vs_numpy_reference():
    """float64: bnlib.nn and bnlib.reference agree to a few ulps (two independent codes)."""
    x, dy = random_input((3, 4, 2, 3), seed=4), random_input((3, 4, 2, 3), seed=5, spread=False)  # _run draws the same dy
    cases = [
        (bnlib.nn.LayerNorm((4, 2, 3), dtype=torch.float64), lambda a, m: ref.layernorm_forward(a, *m), ref.layernorm_backward),
        (bnlib.nn.GroupNorm(2, 4, dtype=torch.float64), lambda a, m: ref.groupnorm_forward(a, *m, 2), ref.groupnorm_backward),
        (bnlib.nn.InstanceNorm2d(4, affine=True, dtype=torch.float64), lambda a, m: ref.instancenorm_forward(a, *m),
         ref.instancenorm_backward),
    ]
    for module, forward, backward in cases:
        randomize_params(module)
        y, dx, grads = forward_backward(module, x, 5)
        y_ref, cache = forward(np64(x), [np64(module.weight), np64(module.bias)])
        dx_ref, dw_ref, db_ref = backward(np64(dy), cache)
        for ours, theirs in [(y, y_ref), (dx, dx_ref), (grads["weight"], dw_ref), (grads["bias"], db_ref)]:
            np.testing.assert_allclose(np64(ours), theirs, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------
# Numerics: half inputs, large means
# --------------------------------------------------------------------------


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_input_float32_statistics(half):
    x = random_input((4, 6, 8), dtype=torch.float32, seed=6).to(half)
    for module in (bnlib.nn.LayerNorm(8), bnlib.nn.GroupNorm(3, 6), bnlib.nn.InstanceNorm1d(6, affine=True)):
        y = module(x.clone().requires_grad_())
        assert y.dtype == half
        expected = module(x.float())  # the same float32 arithmetic on the same half values
        torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)  # half's rounding of y
        y.sum().backward()


def test_float32_large_mean_is_stable():
    x64 = 1e4 + random_input((4, 4, 256), seed=8, spread=False)
    for module in (bnlib.nn.LayerNorm(256), bnlib.nn.GroupNorm(2, 4), bnlib.nn.InstanceNorm1d(4)):
        y32 = module.float()(x64.float())
        y64 = module.double()(x64)
        # y = (x - mu) / std: a variance off by 1e-3 would show as 5e-4 here; two-pass float32 keeps ~1e-4
        assert_close(y32.double(), y64, dict(rtol=0, atol=2e-3), type(module).__name__)


# --------------------------------------------------------------------------
# Bad input: ValueError, state untouched
# --------------------------------------------------------------------------


@pytest.mark.parametrize("make,kw", [
    (lambda **k: bnlib.nn.GroupNorm(4, 6, **k), {}),
    (lambda **k: bnlib.nn.GroupNorm(0, 6, **k), {}),
    (lambda **k: bnlib.nn.GroupNorm(2, 4, **k), dict(eps=0.0)),
    (lambda **k: bnlib.nn.LayerNorm(0, **k), {}),
    (lambda **k: bnlib.nn.LayerNorm((), **k), {}),
    (lambda **k: bnlib.nn.LayerNorm(4, **k), dict(eps=-1.0)),
    (lambda **k: bnlib.nn.InstanceNorm1d(0, **k), {}),
    (lambda **k: bnlib.nn.InstanceNorm2d(3, **k), dict(momentum=1.5)),
    (lambda **k: bnlib.nn.RMSNorm(4, **k), dict(eps=0.0)),
    (lambda **k: bnlib.nn.LayerNorm(4, **k), dict(eps=float("inf"))),
    (lambda **k: bnlib.nn.FilterResponseNorm(4, **k), dict(eps=0)),
])
def test_bad_constructor_arguments(make, kw):
    """A plain ValueError, as the BN layers raise (the README): InputError is for calls."""
    with pytest.raises(ValueError) as error:
        make(**kw)
    assert type(error.value) is ValueError, type(error.value)


def test_groupnorm_divisibility_message():
    with pytest.raises(ValueError, match=r"num_channels \(6\) must be divisible by num_groups \(4\)"):
        bnlib.nn.GroupNorm(4, 6)


@pytest.mark.parametrize("num_groups", [0, -2, 2.0, True])
def test_functional_group_norm_checks_num_groups(num_groups):
    """Not an internal error from the C++ loops (-2) or a ZeroDivisionError (0)."""
    with pytest.raises(ValueError, match="num_groups must be an integer >= 1"):
        alt.group_norm(torch.randn(3, 4, 2), num_groups)


@pytest.mark.parametrize("path", ["kernels", "tensor_ops"])
@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_constant_rows_at_a_large_value_normalize_to_zero(path, eps):
    """float32 rows of 10000.1: a mean a unit in the last place off, times
    1/sqrt(eps), left the tensor-op path's output at 0.3 (torch's layer norm
    gives 0); the mean is corrected once, so every path gives 0."""
    x = torch.full((2, 6, 5), 10000.1)
    with bnlib.functional.cpu_backend(path):
        for y in (alt.layer_norm(x, (6, 5), eps=eps), alt.group_norm(x, 3, eps=eps),
                  alt.instance_norm(x, eps=eps)):
            assert y.abs().max().item() == 0


@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_constant_rows_at_a_large_value_normalize_to_zero_in_the_references(eps):
    """The NumPy references and weight standardization correct the mean once
    too: before, they gave 0.3 (eps 1e-5) and 1.0 (eps 1e-12) here, and a
    Conv2d weight filled with 3.3 standardized to 0.43 (eps 1e-12), though
    a constant row is documented to standardize to zeros."""
    import bnlib.reference_alternatives as RA

    x = np.full((2, 6, 5), 10000.1, dtype=np.float32)
    outputs = [RA.layernorm_forward(x, eps=eps, normalized_shape=(6, 5))[0],
               RA.groupnorm_forward(x, num_groups=3, eps=eps)[0],
               RA.weightstd_forward(x.reshape(2, 30), eps=eps)[0],
               ref.batchnorm_forward(x.reshape(12, 5), np.ones(5, np.float32), np.zeros(5, np.float32), eps=eps)[0]]
    for value in (3.3, 10000.1):
        conv = torch.nn.Conv2d(64, 4, 3)
        conv.weight.data.fill_(value)
        alt.weight_standardization(conv, eps=eps)
        outputs.append(conv.weight.detach().numpy())
    assert [float(np.abs(y).max()) for y in outputs] == [0.0] * len(outputs)


@pytest.mark.parametrize("module,x,pattern", [
    (lambda: bnlib.nn.LayerNorm(4), (2, 3), r"normalized_shape=\[4\].*\[2, 3\]"),
    (lambda: bnlib.nn.LayerNorm((3, 4)), (2, 4, 3), r"normalized_shape=\[3, 4\]"),
    (lambda: bnlib.nn.GroupNorm(2, 4), (2, 6, 3), r"4 channels.*got 6"),
    (lambda: bnlib.nn.GroupNorm(2, 4), (4,), "at least 2 dimensions"),
    (lambda: bnlib.nn.GroupNorm(4, 4), (1, 4), "more than 1 value"),
    (lambda: bnlib.nn.InstanceNorm1d(3), (2, 4, 5), r"3 channels.*got 4"),
    (lambda: bnlib.nn.InstanceNorm1d(3, affine=True, track_running_stats=True), (2, 4, 5), r"3 channels.*got 4"),
    (lambda: bnlib.nn.InstanceNorm1d(3, track_running_stats=True), (2, 3, 1), "more than 1 spatial element"),
    (lambda: bnlib.nn.InstanceNorm1d(3), (2, 3, 4, 5), "2D or 3D input"),
    (lambda: bnlib.nn.InstanceNorm2d(3, track_running_stats=True), (4, 3, 4), r"3 channels.*axis 0, got 4"),
    (lambda: bnlib.nn.InstanceNorm2d(3), (2, 3), "3D or 4D input"),
])
def test_bad_input_raises_and_changes_nothing(module, x, pattern):
    module = module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, not torch's warning
        with pytest.raises(ValueError, match=pattern):
            module(torch.randn(x))
    after = module.state_dict()
    assert list(before) == list(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_instancenorm_nonfinite_batch_leaves_running_stats():
    """A NaN in one channel: its output is NaN, its running estimates unchanged; the others update."""
    module = bnlib.nn.InstanceNorm1d(3, track_running_stats=True)
    x = random_input((2, 3, 5), dtype=torch.float32)
    x[1, 1, 2] = float("nan")
    y = module(x)
    assert torch.isnan(y[1, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()
    assert module.running_mean[1] == 0 and module.running_var[1] == 1
    assert module.running_mean[0] != 0


# --------------------------------------------------------------------------
# weight_norm
# --------------------------------------------------------------------------


def _pair(make, seed=0):
    torch.manual_seed(seed)
    ours = make()
    return ours, copy.deepcopy(ours)


WN_MODULES = [
    (lambda: nn.Linear(5, 4, dtype=torch.float64), (3, 5)),
    (lambda: nn.Conv2d(3, 4, 3, dtype=torch.float64), (2, 3, 5, 5)),
    (lambda: nn.ConvTranspose1d(3, 2, 3, dtype=torch.float64), (2, 3, 6)),
]


@pytest.mark.parametrize("make,shape", WN_MODULES)
@pytest.mark.parametrize("dim", [0, 1, None, -2])
def test_weight_norm_vs_torch(make, shape, dim):
    ours, theirs = _pair(make)
    bnlib.nn.weight_norm(ours, dim=dim)
    nn.utils.parametrizations.weight_norm(theirs, dim=dim)
    p_ours, p_theirs = ours.parametrizations.weight, theirs.parametrizations.weight
    assert p_ours.original0.shape == p_theirs.original0.shape
    assert_same_state(ours, theirs, torch.float64)
    assert_close(ours.weight, theirs.weight, OUT_TOL[torch.float64], "w = g v / ||v|| at the start")
    with torch.no_grad():  # move g and v away from w so that g != ||v||
        for p in (p_ours, p_theirs):
            p.original0.mul_(1.7)
            p.original1.add_(0.3)
    x = random_input(shape, seed=2)
    assert_same_run(ours, theirs, x, torch.float64)
    # one SGD step on both, then the same again
    for module in (ours, theirs):
        with torch.no_grad():
            for p in module.parameters():
                p -= 0.1 * p.grad
    assert_same_state(ours, theirs, torch.float64)
    assert_same_run(ours, theirs, x, torch.float64)


def test_weight_norm_state_dicts_and_old_keys():
    ours, theirs = _pair(lambda: nn.Linear(5, 4))
    bnlib.nn.weight_norm(ours)
    nn.utils.parametrizations.weight_norm(theirs)
    with torch.no_grad():
        theirs.parametrizations.weight.original0.mul_(2.0)
    ours.load_state_dict(theirs.state_dict())
    assert_close(ours.weight, theirs.weight, OUT_TOL[torch.float32], "after loading torch's state dict")
    old = {"weight_g": theirs.parametrizations.weight.original0.detach().clone(),
           "weight_v": theirs.parametrizations.weight.original1.detach().clone(), "bias": theirs.bias.detach().clone()}
    fresh = bnlib.nn.weight_norm(nn.Linear(5, 4))
    fresh.load_state_dict(old)  # the keys of torch.nn.utils.weight_norm (the old API)
    assert_close(fresh.weight, theirs.weight, OUT_TOL[torch.float32], "after loading weight_g / weight_v")
    torch.nn.utils.parametrize.remove_parametrizations(fresh, "weight")
    assert isinstance(fresh.weight, nn.Parameter)


def test_weight_norm_decouples_length_and_direction():
    """The gradient of v is orthogonal to v (eq. 3 of Salimans & Kingma): ||v|| grows only at second order."""
    module = bnlib.nn.weight_norm(nn.Linear(6, 3, dtype=torch.float64), dim=0)
    x = random_input((8, 6), seed=3)
    module(x).pow(2).sum().backward()
    v = module.parametrizations.weight.original1
    dots = (v.grad * v).sum(1)
    assert_close(dots, torch.zeros_like(dots), dict(rtol=0, atol=1e-12), "v . dv")


def test_weight_norm_bad_name():
    with pytest.raises(ValueError, match="foo"):
        bnlib.nn.weight_norm(nn.Linear(3, 2), name="foo")


# --------------------------------------------------------------------------
# spectral_norm
# --------------------------------------------------------------------------

SN_MODULES = [
    (lambda: nn.Linear(5, 7), (4, 5)),
    (lambda: nn.Conv2d(3, 4, 3), (2, 3, 5, 5)),
    (lambda: nn.ConvTranspose2d(3, 2, 3), (2, 3, 4, 4)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make,shape", SN_MODULES)
@pytest.mark.parametrize("n_power_iterations", [1, 3])
def test_spectral_norm_vs_torch(make, shape, n_power_iterations, dtype):
    """The same seed gives the same u, v; then several training steps (power
    iteration and an SGD step each), then eval mode (no iteration)."""
    ours, theirs = _pair(lambda: make().to(dtype))
    torch.manual_seed(5)
    bnlib.nn.spectral_norm(ours, n_power_iterations=n_power_iterations)
    torch.manual_seed(5)
    nn.utils.parametrizations.spectral_norm(theirs, n_power_iterations=n_power_iterations)
    assert_same_state(ours, theirs, dtype)
    for step in range(4):
        x = random_input(shape, dtype=dtype, seed=step)
        assert_same_run(ours, theirs, x, dtype, seed=step + 20)
        assert_same_state(ours, theirs, dtype)
        for module in (ours, theirs):
            with torch.no_grad():
                for p in module.parameters():
                    p -= 0.05 * p.grad
    ours.eval(), theirs.eval()
    u_before = ours.parametrizations.weight[0]._u.clone()
    assert_same_run(ours, theirs, random_input(shape, dtype=dtype, seed=9), dtype)
    assert torch.equal(ours.parametrizations.weight[0]._u, u_before), "eval mode must not iterate"
    assert_same_state(ours, theirs, dtype)


def test_spectral_norm_sigma_is_about_one_against_svd():
    """The largest singular value of W_SN is about 1 (SVD as the truth).

    Power iteration converges like (sigma_2 / sigma_1)^(2k): a random Gaussian
    matrix has its top two singular values close (here 1.097 and 1.095), so
    after the 15 + 10 iterations below sigma is only within 1e-2 of 1; with a
    gap (sigma_2 / sigma_1 = 1/2) the same 25 iterations give 1e-10.
    """
    torch.manual_seed(0)
    layer = bnlib.nn.spectral_norm(nn.Linear(20, 30, dtype=torch.float64))
    for _ in range(10):  # every training-mode access does one more iteration
        w = layer.weight
    assert abs(torch.linalg.svdvals(w.detach())[0].item() - 1.0) < 1e-2

    u, _ = torch.linalg.qr(torch.randn(30, 20, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([4.0, 2.0], dtype=torch.float64), torch.linspace(1.5, 0.1, 18, dtype=torch.float64)])
    gapped = nn.Linear(20, 30, dtype=torch.float64)
    with torch.no_grad():
        gapped.weight.copy_(u @ torch.diag(spectrum) @ v.T)
    bnlib.nn.spectral_norm(gapped)
    for _ in range(10):
        w = gapped.weight
    assert abs(torch.linalg.svdvals(w.detach())[0].item() - 1.0) < 1e-10
    assert_close(w.detach() * 4.0, gapped.parametrizations.weight.original.detach(), dict(rtol=1e-9, atol=1e-12))


def test_spectral_norm_state_dict_loads_both_ways():
    ours, theirs = _pair(lambda: nn.Conv2d(2, 3, 3))
    bnlib.nn.spectral_norm(ours)
    nn.utils.parametrizations.spectral_norm(theirs)
    theirs(torch.randn(1, 2, 4, 4))
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(1, 2, 4, 4)
    assert_close(ours(x), theirs(x), OUT_TOL[torch.float32], "after loading")
    back = nn.utils.parametrizations.spectral_norm(nn.Conv2d(2, 3, 3)).eval()
    back.load_state_dict(ours.state_dict())
    assert_close(back(x), theirs(x), OUT_TOL[torch.float32], "loaded back into torch")


def test_spectral_norm_bad_arguments():
    with pytest.raises(ValueError, match="foo"):
        bnlib.nn.spectral_norm(nn.Linear(3, 2), name="foo")
    with pytest.raises(IndexError, match="Dimension out of range"):
        bnlib.nn.spectral_norm(nn.Linear(3, 2), dim=2)
    with pytest.raises(ValueError, match="Dimension out of range"):
        bnlib.nn.spectral_norm(nn.Linear(3, 2), dim=-3)
    with pytest.raises(ValueError, match="n_power_iterations"):
        bnlib.nn.spectral_norm(nn.Linear(3, 2), n_power_iterations=0)


def test_spectral_norm_of_a_vector():
    ours, theirs = _pair(lambda: nn.Linear(3, 2))
    bnlib.nn.spectral_norm(ours, name="bias")
    nn.utils.parametrizations.spectral_norm(theirs, name="bias")
    assert_close(ours.bias, theirs.bias, OUT_TOL[torch.float32], "b / ||b||")


@pytest.mark.parametrize("dim", [2, -3])
def test_weight_norm_dim_out_of_range_like_torch(dim):
    """A dim the weight does not have: IndexError (torch's), before anything is registered."""
    for weight_norm in (bnlib.nn.weight_norm, nn.utils.parametrizations.weight_norm):
        module = nn.Linear(4, 3)
        with pytest.raises(IndexError):
            weight_norm(module, dim=dim)
        assert not torch.nn.utils.parametrize.is_parametrized(module)


# --------------------------------------------------------------------------
# masked_batch_norm: batch norm of padded sequences over the real tokens
# --------------------------------------------------------------------------


def _padded(lengths, d=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    seqs = [2.0 + torch.randn(n, d, generator=g, dtype=dtype) for n in lengths]
    x = nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    mask = nn.utils.rnn.pad_sequence([torch.ones(n, dtype=torch.bool) for n in lengths], batch_first=True)
    return seqs, x, mask


def test_masked_batch_norm_is_torch_batch_norm_of_the_real_tokens():
    # Truth: torch's batch norm of the real tokens stacked into (M, D), and
    # its gradients; the padding's outputs are 0 and get no gradient.
    seqs, x, mask = _padded([5, 2, 7])
    x.requires_grad_(True)
    weight, bias = torch.tensor([0.5, 1.0, 2.0, -1.0], dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    rm, rv, rm_t, rv_t = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), \
        torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    y = alt.masked_batch_norm(x, mask, rm, rv, weight, bias, training=True, momentum=0.3)
    stacked = torch.cat(seqs).requires_grad_(True)
    want = torch.nn.functional.batch_norm(stacked, rm_t, rv_t, weight, bias, training=True, momentum=0.3)
    assert_close(y[mask], want, OUT_TOL[torch.float64])
    assert torch.count_nonzero(y[~mask]) == 0
    assert_close(rm, rm_t, STAT_TOL[torch.float64])
    assert_close(rv, rv_t, STAT_TOL[torch.float64])
    dy = torch.randn_like(y)
    y.backward(dy)
    want.backward(dy[mask])
    assert_close(x.grad[mask], stacked.grad, GRAD_TOL[torch.float64])
    assert torch.count_nonzero(x.grad[~mask]) == 0
    # eval mode: the running estimates
    y_eval = alt.masked_batch_norm(x.detach(), mask, rm, rv, weight, bias, training=False)
    want_eval = torch.nn.functional.batch_norm(torch.cat(seqs), rm, rv, weight, bias, training=False)
    assert_close(y_eval[mask], want_eval, OUT_TOL[torch.float64])


def test_masked_batch_norm_does_not_depend_on_the_padding_length():
    seqs, x, mask = _padded([3, 6])
    longer = torch.cat([x, torch.zeros(2, 30, 4, dtype=x.dtype)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 30, dtype=torch.bool)], dim=1)
    short = alt.masked_batch_norm(x, mask, training=True)
    long = alt.masked_batch_norm(longer, longer_mask, training=True)
    assert torch.equal(short, long[:, :6])
    # plain BN over (N, D, L) sees the padding: the same tokens come out otherwise
    plain = lambda t: torch.nn.functional.batch_norm(t.transpose(1, 2), None, None, training=True).transpose(1, 2)
    assert (plain(x)[mask] - plain(longer)[:, :6][mask]).abs().max() > 0.1


def test_masked_batch_norm_bad_input():
    _, x, mask = _padded([3, 2])
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for bad_x, bad_mask, match in [(x[0], mask, r"\(N, L, D\)"), (x, mask.float(), "bool mask"),
                                   (x, mask[:, :2], "bool mask"), (x, None, "bool mask")]:
        with pytest.raises(ValueError, match=match):
            alt.masked_batch_norm(bad_x, bad_mask, rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(4, dtype=torch.float64)) and torch.equal(rv, torch.ones(4, dtype=torch.float64))
    no_token = torch.zeros(2, 3, dtype=torch.bool)
    one_token = no_token.clone()
    one_token[0, 0] = True
    for few in (no_token, one_token):
        with pytest.raises(ValueError, match="more than 1 real token"):
            alt.masked_batch_norm(x, few, rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(4, dtype=torch.float64)) and torch.equal(rv, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("make", [
    lambda: bnlib.nn.InstanceNorm2d(3),
    lambda: bnlib.nn.GroupNorm(1, 3, affine=False),
    lambda: bnlib.nn.LayerNorm(4, elementwise_affine=False),
    lambda: bnlib.nn.InstanceNorm2d(3, affine=True),
], ids=["instance", "group", "layer", "instance-affine"])
def test_output_takes_inplace_ops(make):
    """ReLU(inplace=True) and ``out += residual`` after the layer, as after
    torch's (the output without weight and bias must not be a view)."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    layer = make().double()
    y = nn.ReLU(inplace=True)(layer(x))
    (dx_relu,) = torch.autograd.grad(y.square().sum(), x)
    out = layer(x)
    out += x  # a residual connection
    (dx_residual,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(y, torch.relu(layer(x)))
    assert torch.isfinite(dx_relu).all() and torch.isfinite(dx_residual).all()


@pytest.mark.parametrize("module", [lambda: bnlib.nn.LayerNorm(3), lambda: bnlib.nn.GroupNorm(1, 3),
                                    lambda: bnlib.nn.InstanceNorm1d(3, track_running_stats=True)],
                         ids=["layer", "group", "instance"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64], ids=str)
def test_non_floating_input_raises_value_error(module, dtype):
    module = module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="floating-point input"):
        module(torch.ones(2, 3, 3, dtype=dtype))
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_numpy_scalars_are_accepted_like_python_numbers():
    assert bnlib.nn.LayerNorm(4, eps=np.float32(1e-5)).eps == np.float32(1e-5)
    assert bnlib.nn.GroupNorm(2, 4, eps=np.float64(1e-3)).eps == 1e-3
    ghost = bnlib.nn.GhostBatchNorm(4, np.int64(2))
    assert ghost.virtual_batch_size == 2 and type(ghost.virtual_batch_size) is int
    ghost(torch.randn(6, 4))


def test_instance_norm_one_running_estimate_raises():
    rm = torch.zeros(3)
    with pytest.raises(ValueError, match="both given or both None"):
        alt.instance_norm(torch.randn(2, 3, 4), rm, None)
    assert torch.equal(rm, torch.zeros(3))


def test_layer_norm_weight_of_another_shape_raises():
    """A (3, 4) weight for normalized_shape (4, 3) has the right count but
    would put its elements on the wrong features: torch raises, and so do we."""
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=r"weight of shape \[4, 3\].*got \[3, 4\]"):
        alt.layer_norm(x, (4, 3), torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"bias of shape \[4, 3\]"):
        alt.layer_norm(x, (4, 3), None, torch.zeros(12))


# --------------------------------------------------------------------------
# Autocast: layer, group and RMS norm run in float32 where torch runs them so
# --------------------------------------------------------------------------

AUTOCAST_CASES = {
    "layer_norm": (lambda x, w, b: alt.layer_norm(x, (5,), w, b), (5,)),
    "group_norm": (lambda x, w, b: alt.group_norm(x, 2, w, b), (4,)),
    "rms_norm": (lambda x, w, b: alt.rms_norm(x, (5,), w), (5,)),
}


@pytest.mark.parametrize("name", AUTOCAST_CASES)
def test_autocast_runs_in_float32_on_listed_devices(name, monkeypatch):
    """torch's CUDA autocast casts these three up to float32 (its float32 op
    list); listing "cpu" exercises bnlib's path on CPU autocast: a float32
    output equal to the float32 computation, gradients back in the input's dtype."""
    fn, param_shape = AUTOCAST_CASES[name]
    x = torch.randn(3, 4, 5).bfloat16().requires_grad_()
    w = (torch.rand(param_shape) + 0.5).requires_grad_()
    b = torch.randn(param_shape).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fn(x, w, b).dtype == torch.bfloat16  # not listed: the input's dtype, as torch's on the CPU
    monkeypatch.setattr(alt, "AUTOCAST_FLOAT32_DEVICES", ("cpu",))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x, w, b)
    assert y.dtype == torch.float32
    expected = fn(x.detach().float(), w.detach(), b.detach())
    assert_close(y.detach(), expected, OUT_TOL[torch.float32], "output")
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    x64 = x.detach().double()  # autocast leaves float64 alone, as torch's does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64 = fn(x64, w.detach().double(), b.detach().double())
    assert y64.dtype == torch.float64
    assert_close(y64, fn(x64, w.detach().double(), b.detach().double()), OUT_TOL[torch.float64], "float64")
